"""Reading labelled records, checking them, splitting them, and rendering prompt/completion pairs."""

from __future__ import annotations

import csv
import json
import random
import string
from collections import Counter, defaultdict
from pathlib import Path

from ortune.errors import OrtuneError

READERS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_records(path: str | Path) -> list[dict]:
    """Rows of a JSONL / JSON / CSV / Parquet file, with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise OrtuneError(f"data.path={path}: file not found; point data.path at a JSONL, JSON, CSV or Parquet file")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise OrtuneError(
            f"data.path={path}: unsupported format '{path.suffix}'; use one of {', '.join(READERS)}"
        )
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several unrelated types for a bad file
            raise OrtuneError(f"data.path={path}: not a readable Parquet file ({exc})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise OrtuneError(f"{path}:{line}: bytes that are not UTF-8; re-save the file as UTF-8") from None
    if not text.strip():
        raise OrtuneError(f"{path}: the file is empty; it needs labelled rows")
    if kind == "csv":
        return list(csv.DictReader(text.splitlines()))
    if kind == "json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OrtuneError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(rows, list):
            raise OrtuneError(f"{path}: expected a JSON list of objects")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise OrtuneError(f"{path}:{number}: malformed JSON line ({exc.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise OrtuneError(f"{path}:{number}: expected a JSON object per line")
        rows.append(row)
    return rows


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check_fields(rows: list[dict], fields: list[str], source: str) -> None:
    """Every field the template names must exist and be non-empty in every row."""
    for index, row in enumerate(rows, start=1):
        for name in fields:
            if name not in row:
                raise OrtuneError(
                    f"{source}: row {index} has no field '{name}' named by data.template "
                    f"(its fields: {', '.join(sorted(row))}); fix data.template or the file"
                )
            if row[name] is None or not str(row[name]).strip():
                raise OrtuneError(f"{source}: row {index} has an empty '{name}'; fill it in or remove the row")


def drop_duplicates(rows: list[dict], key_fields: list[str]) -> tuple[list[dict], int]:
    """Keep the first row of each distinct input, so no input can land on both sides of the split."""
    seen: set[tuple] = set()
    kept = []
    for row in rows:
        key = tuple(str(row[name]).strip() for name in key_fields)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def stratified_split(rows: list[dict], label_field: str, eval_fraction: float, seed: int):
    """Per-label shuffled split: each label keeps its share on both sides (at least one row each)."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_label[str(row[label_field])].append(row)
    if len(by_label) < 2:
        raise OrtuneError(
            f"data: only one label ({', '.join(by_label)}) in field '{label_field}'; a classifier needs two or more"
        )
    rng = random.Random(seed)
    train, evaluation = [], []
    for label in sorted(by_label):
        group = by_label[label]
        if len(group) < 2:
            raise OrtuneError(
                f"data: label '{label}' has {len(group)} row; each label needs at least 2 rows to be split"
            )
        rng.shuffle(group)
        n_eval = min(len(group) - 1, max(1, round(len(group) * eval_fraction)))
        evaluation.extend(group[:n_eval])
        train.extend(group[n_eval:])
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return train, evaluation


def render(row: dict, prompt_template: str, completion_template: str, label_field: str) -> dict:
    return {
        "prompt": prompt_template.format(**row),
        "completion": completion_template.format(**row),
        "label": str(row[label_field]),
    }


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def label_counts(rows: list[dict], field: str = "label") -> dict[str, int]:
    return dict(sorted(Counter(str(row[field]) for row in rows).items()))
