"""Stage 1: labelled records -> checked, de-duplicated, stratified prompt/completion splits.

Reads: `data.path` (JSONL / JSON / CSV / Parquet), `data.*`, `seed`.
Writes: data/prepared/{train,eval}.jsonl (prompt, completion, label), data/prepared/labels.json,
metrics/data.json (rows read, duplicates dropped, per-label counts, majority baseline, overlap).

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
    input_fields = data.template_fields(spec.template.prompt)
    data.check_fields(rows, [*input_fields, *data.template_fields(spec.template.completion), spec.label_field], spec.path)
    unique, duplicates = data.drop_duplicates(rows, input_fields)
    train_rows, eval_rows = data.stratified_split(unique, spec.label_field, spec.eval_fraction, cfg.seed)

    def rendered(part: list[dict]) -> list[dict]:
        return [data.render(r, spec.template.prompt, spec.template.completion, spec.label_field) for r in part]

    train, evaluation = rendered(train_rows), rendered(eval_rows)
    overlap = len({r["prompt"] for r in train} & {r["prompt"] for r in evaluation})
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
