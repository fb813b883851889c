"""Stage 1: labelled records -> checked, de-duplicated, stratified prompt/completion splits.

Reads: `data.path` (JSONL / JSON / CSV / Parquet), `data.*`, `seed`.
Writes: data/prepared/{train,eval}.jsonl (prompt, completion, label), data/prepared/labels.json,
metrics/data.json (rows read, duplicates dropped, per-label counts, majority baseline, overlap).
With data.format=chat, prompt and completion are user/assistant messages: the model's chat
template renders them (ortune.data.prompt_text), in training and at inference alike.

    python scripts/prepare_data.py data.eval_fraction=0.2
"""

from __future__ import annotations

import json
import logging

from omegaconf import DictConfig

from ortune import data, stage
from ortune.artifacts import atomic_dir
from ortune.metrics import majority_baseline

log = logging.getLogger("ortune")


def run(cfg: DictConfig) -> dict:
    spec = cfg.data
    rows = data.read_records(spec.path)
    input_fields, output_fields, setting = data.input_output_fields(spec)
    data.check_fields(rows, [*input_fields, *output_fields], spec.path, setting)
    data.check_fields(rows, [spec.label_field], spec.path, "data.label_field")
    if spec.labels is not None:
        data.check_label_set(rows, spec.label_field, list(spec.labels), spec.path)
    unique, duplicates = data.drop_duplicates(rows, input_fields)
    train_rows, eval_rows = data.stratified_split(unique, spec.label_field, spec.eval_fraction, cfg.seed)

    train, evaluation = [data.render_row(r, spec) for r in train_rows], [data.render_row(r, spec) for r in eval_rows]
    overlap = len({data.prompt_key(r["prompt"]) for r in train} & {data.prompt_key(r["prompt"]) for r in evaluation})
    labels = sorted({r["label"] for r in train + evaluation})
    with atomic_dir(cfg.paths.prepared) as out:
        data.write_jsonl(train, out / "train.jsonl")
        data.write_jsonl(evaluation, out / "eval.jsonl")
        (out / "labels.json").write_text(json.dumps(labels) + "\n", encoding="utf-8")
    log.info("prepared %d train / %d eval rows over labels %s", len(train), len(evaluation), labels)
    return {
        "rows_read": len(rows),
        "duplicates_dropped": duplicates,
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "train_label_counts": data.label_counts(train),
        "eval_label_counts": data.label_counts(evaluation),
        "majority_baseline": majority_baseline([r["label"] for r in train], [r["label"] for r in evaluation]),
        "train_eval_overlap": overlap,
    }


if __name__ == "__main__":
    stage.main("prepare_data", run, "data.json")
