"""Reading labelled records, checking them, splitting them, and rendering prompt/completion pairs."""

from __future__ import annotations

import csv
import functools
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


def check_fields(rows: list[dict], fields: list[str], source: str, setting: str = "data.template") -> None:
    """Every field the template (or `setting`) names must exist and be non-empty in every row."""
    for index, row in enumerate(rows, start=1):
        for name in fields:
            if name not in row:
                raise OrtuneError(
                    f"{source}: row {index} has no field '{name}' named by {setting} "
                    f"(its fields: {', '.join(sorted(row))}); fix {setting} or the file"
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


def input_output_fields(spec) -> tuple[list[str], list[str], str]:
    """The fields a row's prompt and completion come from (per data.format), and the setting naming them."""
    if spec.format == "chat":
        return [spec.input_column], [spec.output_column], "data.input_column/data.output_column"
    return template_fields(spec.template.prompt), template_fields(spec.template.completion), "data.template"


def render_row(row: dict, spec) -> dict:
    """One prepared row in the configured data.format (spec = the `data` settings)."""
    if spec.format == "chat":
        return render_chat(row, spec.input_column, spec.output_column, spec.label_field)
    return render(row, spec.template.prompt, spec.template.completion, spec.label_field)


def render(row: dict, prompt_template: str, completion_template: str, label_field: str) -> dict:
    return {
        "prompt": prompt_template.format(**row),
        "completion": completion_template.format(**row),
        "label": str(row[label_field]),
    }


def render_chat(row: dict, input_column: str, output_column: str, label_field: str) -> dict:
    """A conversational prompt/completion pair (TRL's format): the model's own chat template renders it
    at training and at inference time, so both see the same string."""
    return {
        "prompt": [{"role": "user", "content": str(row[input_column])}],
        "completion": [{"role": "assistant", "content": str(row[output_column])}],
        "label": str(row[label_field]),
    }


def prompt_key(prompt: str | list[dict]) -> str:
    """A hashable identity for a text or chat prompt (for overlap checks)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def prompt_text(prompt: str | list[dict], model_dir: str | Path) -> str:
    """The exact string a model is prompted with: a text prompt as it is; a chat prompt (messages) through
    the chat template saved in `model_dir`, ending with the assistant's turn opening, as in training."""
    if isinstance(prompt, str):
        return prompt
    return _chat_tokenizer(str(model_dir)).apply_chat_template(
        list(prompt), tokenize=False, add_generation_prompt=True
    )


@functools.lru_cache(maxsize=4)
def _chat_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise OrtuneError(f"{model_dir}: the tokenizer has no chat template; use data.format=text for this model")
    return tokenizer


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def label_counts(rows: list[dict], field: str = "label") -> dict[str, int]:
    return dict(sorted(Counter(str(row[field]) for row in rows).items()))


def check_label_set(rows: list[dict], label_field: str, allowed: list[str], source: str) -> None:
    """A label outside data.labels is a typo or a stray row, not a new class to learn silently."""
    for index, row in enumerate(rows, start=1):
        if str(row[label_field]) not in allowed:
            raise OrtuneError(
                f"{source}: row {index} has {label_field}={row[label_field]!r}, not one of data.labels "
                f"({', '.join(allowed)}); fix the row or add the label to data.labels"
            )
