"""Stage 5: judge the shipped ONNX model on labelled rows, beside its baselines and PyTorch twins.

Reads: models/onnx/ (+ models/base, adapter, merged for `eval.compare`), data/prepared/ (labels,
training rows for the majority baseline and the prompted baseline's shots), `eval.path` (default: the
prepared eval split; any other labelled file is rendered with `data.template`), `eval.*`, `data.*`.
Writes: metrics/eval.json (headline numbers of the shipped model at the top level, the baselines,
the quantization loss, per-class scores and every runtime's scores and latency nested beside
them), metrics/eval_predictions.jsonl, plots/confusion_matrix.png, plots/per_class_f1.csv;
to W&B: those metrics, the confusion matrix and a (text, label, prediction) table.

A generation becomes a label by ortune.metrics.parse_label: first non-empty line, stripped of
whitespace and punctuation, lowercased, matched to a label exactly or by prefix; else unparsed.

    python scripts/eval.py eval.limit=50 eval.compare=[merged]
    python scripts/eval.py eval.path=data/heldout.csv
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from ortune import data, evaluation, plots, stage, tracking
from ortune.artifacts import write_text_atomic
from ortune.metrics import UNPARSED

log = logging.getLogger("ortune")


def run(cfg: DictConfig) -> dict:
    rows, labels, train = evaluation.load_rows(cfg)
    # chat rows hold messages: every runtime gets the string the shipped model's chat template makes of them
    prompts = [data.prompt_text(r["prompt"], cfg.paths.onnx) for r in rows]
    evaluation.check_context(cfg, rows, prompts)  # before any runtime loads: the rows too long, by place
    log.info("judging %d rows of %s", len(rows), cfg.eval.path)
    asked = {}
    if "prompted" in cfg.eval.compare:  # built first: a bad template fails before any model is loaded
        asked["prompts"], asked["format"] = evaluation.prompted_prompts(cfg, rows, labels, train)
        log.info(
            "prompted baseline (%s, %d shots), first prompt: %r",
            asked["format"],
            cfg.eval.baseline_shots,
            asked["prompts"][0],
        )
    results = {}
    for kind in ["onnx", *cfg.eval.compare]:
        spec = evaluation.job(kind, cfg, asked["prompts"] if kind == "prompted" else prompts)
        results[kind] = evaluation.judge_in_fresh_process(spec)
        judged = results[kind]
        speed = (
            f": {judged['ms_per_token']:.2f} ms/token, {judged['peak_memory_mb']:.0f} MB peak"
            if spec["latency"]
            else ""
        )
        log.info("%-7s judged in %.1f s%s", kind, judged["eval_seconds"], speed)
    if asked:
        results["prompted"].update(prompt_format=asked["format"], shots=cfg.eval.baseline_shots)
    metrics, predictions = evaluation.summarize(rows, labels, train, results)
    lines = evaluation.prediction_rows(rows, prompts, results, predictions)
    write_text_atomic(
        Path(cfg.paths.metrics) / "eval_predictions.jsonl",
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
    )
    matrix = evaluation.shipped_confusion(rows, labels, predictions)
    png = Path(cfg.paths.plots) / "confusion_matrix.png"
    plots.write_confusion_png(
        matrix,
        labels,
        png,
        f"ONNX model on {len(rows)} rows: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}",
    )
    plots.write_per_class_csv(metrics["per_class"], Path(cfg.paths.plots) / "per_class_f1.csv")
    _log_media(tracking.current(), lines, labels, png)
    for kind, scores in metrics["runtimes"].items():
        log.info(
            "%-7s accuracy %.3f, macro-F1 %.3f, unparsed %d, agrees with ONNX on %.1f%%",
            kind,
            scores["accuracy"],
            scores["macro_f1"],
            scores["unparsed"],
            100 * scores["agreement_with_onnx"],
        )
    log.info(
        "shipped ONNX: accuracy %.3f (majority baseline %.3f), macro-F1 %.3f, TTFT %.1f ms, %.2f ms/token",
        metrics["accuracy"],
        metrics["majority_baseline"],
        metrics["macro_f1"],
        metrics["ttft_ms"],
        metrics["ms_per_token"],
    )
    if "prompted_baseline_accuracy" in metrics:
        log.info(
            "prompted untuned base: accuracy %.3f, %d of %d answers name no label",
            metrics["prompted_baseline_accuracy"],
            metrics["prompted_baseline_unparsed"],
            metrics["n"],
        )
    return metrics


def _log_media(tracker: tracking.Tracker, lines: list[dict], labels: list[str], png: Path) -> None:
    """The W&B confusion matrix and predictions table (the numbers go through stage.main)."""
    if not tracker.active:
        return
    import wandb

    others = [kind for kind in lines[0]["predictions"] if kind != "onnx"] if lines else []
    table = wandb.Table(columns=["text", "label", "prediction", "generation", *(f"prediction_{k}" for k in others)])
    for line in lines:
        table.add_data(
            line["prompt"],
            line["label"],
            line["prediction"] or UNPARSED,
            line["generation"],
            *(line["predictions"][k] or UNPARSED for k in others),
        )
    classes = [*labels, UNPARSED]
    truth = [classes.index(line["label"]) for line in lines]
    predicted = [classes.index(line["prediction"] or UNPARSED) for line in lines]
    tracker.log_media(
        {
            "eval/predictions": table,
            "eval/confusion_matrix": wandb.plot.confusion_matrix(y_true=truth, preds=predicted, class_names=classes),
            "eval/confusion_matrix_png": wandb.Image(str(png)),
        }
    )


if __name__ == "__main__":
    stage.main("eval", run, "eval.json")
