"""Stage 1: records -> checked, de-duplicated train/validation/test prompt/completion splits.

Reads: `data.path` (a JSON Lines / JSON / CSV / Parquet / Arrow file, or a folder of them), `data.*`,
`seed`; the base model's tokenizer and context (models/base) and `train.max_length` for lengths in tokens.
Writes: data/prepared/{train,validation,test}.jsonl (prompt, completion and, for classification, label),
data/prepared/labels.json, metrics/data.json (rows read, duplicates and conflicts dropped, labels
normalized, rows per label per split, majority baseline, overlap, prompt/answer token percentiles, rows
over train.max_length, warnings). Classification splits are stratified by label; free text
(data.task=generation) is one seeded shuffle. With data.format=chat or messages, prompt and completion
are messages: the model's chat template renders them (ortune.data.prompt_text), in training and at
inference alike. The rows are read a batch at a time and never all held (ortune.prepare).

    python scripts/prepare_data.py data.validation_fraction=0.1 data.test_fraction=0.2
"""

from __future__ import annotations

from omegaconf import DictConfig

from ortune import prepare, records, stage


def run(cfg: DictConfig) -> dict:
    with records.open_rows(cfg.data.path) as table:
        return prepare.prepare(cfg, table)


if __name__ == "__main__":
    stage.main("prepare_data", run, "data.json")
