"""Stage 5: judge the shipped ONNX model on the eval split with greedy generation.

Reads: models/onnx/, data/prepared/{train,eval}.jsonl, data/prepared/labels.json, `eval.*`.
Writes: metrics/eval.json (accuracy, macro-F1, unparsed count, majority baseline,
mean ms per generated token), metrics/eval_predictions.jsonl.

A generation becomes a label by ortune.metrics.parse_label: first non-empty line, stripped of
whitespace and punctuation, lowercased, matched to a label exactly or by prefix; else unparsed.

    python scripts/eval.py eval.limit=50
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from ortune import data, stage
from ortune.artifacts import write_text_atomic
from ortune.generation import OnnxGenerator
from ortune.metrics import classification_scores, majority_baseline, parse_label

log = logging.getLogger("ortune")


def run(cfg: DictConfig) -> dict:
    from tqdm import tqdm

    prepared = Path(cfg.paths.prepared)
    labels = json.loads((prepared / "labels.json").read_text(encoding="utf-8"))
    rows = data.read_jsonl(prepared / "eval.jsonl")
    if cfg.eval.limit:
        rows = rows[: cfg.eval.limit]
    train_labels = [r["label"] for r in data.read_jsonl(prepared / "train.jsonl")]
    generator = OnnxGenerator(cfg.paths.onnx)
    generator.generate(rows[0]["prompt"], cfg.eval.max_new_tokens)  # warm-up, not timed

    predictions, tokens, seconds = [], 0, 0.0
    for row in tqdm(rows, desc="eval", unit="row"):
        result = generator.generate(row["prompt"], cfg.eval.max_new_tokens)
        tokens += result.new_tokens
        seconds += result.seconds
        predictions.append({"prompt": row["prompt"], "label": row["label"], "generation": result.text,
                            "prediction": parse_label(result.text, labels)})
    scores = classification_scores([p["label"] for p in predictions], [p["prediction"] for p in predictions], labels)
    write_text_atomic(
        Path(cfg.paths.metrics) / "eval_predictions.jsonl",
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions),
    )
    metrics = {
        **scores,
        "majority_baseline": majority_baseline(train_labels, [p["label"] for p in predictions]),
        "ms_per_token": 1000 * seconds / tokens if tokens else 0.0,
        "generated_tokens": tokens,
    }
    log.info("accuracy %.3f (majority baseline %.3f), macro-F1 %.3f, %.2f ms/token",
             metrics["accuracy"], metrics["majority_baseline"], metrics["macro_f1"], metrics["ms_per_token"])
    return metrics


if __name__ == "__main__":
    stage.main("eval", run, "eval.json")
