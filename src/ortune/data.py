"""Checking rows, splitting them, and rendering prompt/completion pairs (reading them: ortune.records).

What is here works on one row, or on what a pass over the rows collected (labels, keys, counts), so that
prepare_data (ortune.prepare) can check and split a file without holding its rows.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from ortune.errors import OrtuneError
from ortune.records import place

log = logging.getLogger("ortune")

# Below this many rows a label can neither be learned nor measured: a warning, not a refusal, so
# that a quick trial on a handful of rows still runs.
MIN_ROWS_PER_LABEL = 10


def text_lines(text: str) -> list[str]:
    """Lines split at line feeds only. str.splitlines() also splits at U+2028, U+0085, form feeds and
    more, which can sit inside a phrase."""
    return [line.removesuffix("\r") for line in text.split("\n")]


# ---- checking ----------------------------------------------------------------------------------------


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check_fields(rows: list[dict], fields: list[str], source: str, setting: str = "data.template") -> None:
    """Every field the template (or `setting`) names must exist and be non-empty text in every row."""
    for index, row in enumerate(rows):
        for name in fields:
            if name not in row:
                near = [field for field in row if _bare(field) == name]
                if near:
                    raise OrtuneError(
                        f"{place(rows, index, source)} has no field '{name}' named by {setting}, but "
                        f"{near[0]!r}: spaces or invisible characters (a byte-order mark, a "
                        f"non-breaking space) around the name; rename that field '{name}' in the file"
                    )
                raise OrtuneError(
                    f"{place(rows, index, source)} has no field '{name}' named by {setting} "
                    f"(its fields: {', '.join(_shown(field) for field in sorted(row))}); fix {setting} or the file"
                )
            value = row[name]
            if value is None:
                # a JSON row without the key reads as null: the loader gives every row every column
                raise OrtuneError(
                    f"{place(rows, index, source)} has no field '{name}' (missing or null); "
                    "fill it in or remove the row"
                )
            if isinstance(value, (dict, list)):
                raise OrtuneError(
                    f"{place(rows, index, source)}: '{name}' is a {type(value).__name__}, not text; "
                    "flatten the file so that each field holds one value"
                )
            if not str(value).strip():
                raise OrtuneError(f"{place(rows, index, source)} has an empty '{name}'; fill it in or remove the row")


# whitespace (str.isspace: the non-breaking space too) and the format characters a byte-order mark or a
# copy from a web page leaves around a name
_AROUND = re.compile(r"^[\s\u200b-\u200f\u2060\ufeff]+|[\s\u200b-\u200f\u2060\ufeff]+$")


def _bare(name: str) -> str:
    return _AROUND.sub("", str(name))


def _shown(name: str) -> str:
    """A field name as printed in an error: quoted and escaped where plain printing would hide a character."""
    name = str(name)
    return name if name.isprintable() and _bare(name) == name else repr(name)


def label_key(label: str) -> str:
    """What the answer parser compares (ortune.metrics.parse_label): two labels with the same key are
    one class to it, so they must be one class in the data too."""
    return str(label).strip().lower()


def label_spellings(counts: Counter, allowed: list[str] | None = None) -> dict[str, str]:
    """Merge labels that differ only by case or surrounding whitespace (`Joy`, `joy`, `joy `).

    counts: rows per label as written. The spelling kept is the one in data.labels when given, else the
    most frequent one (ties: the lowercase one, then alphabetical). Returns {spelling as written: spelling
    kept} for every spelling that changes, which the rows are then read through (and the data report lists).
    """
    declared: dict[str, str] = {}
    for label in allowed or []:
        if label_key(label) in declared:
            raise OrtuneError(
                f"data.labels lists '{declared[label_key(label)]}' and '{label}', which answers "
                "cannot tell apart (case and surrounding spaces are ignored); keep one"
            )
        declared[label_key(label)] = label
    spellings: dict[str, Counter] = defaultdict(Counter)
    for label, n in counts.items():
        spellings[label_key(label)][label.strip()] += n
    kept = {
        key: declared.get(key) or min(found, key=lambda s: (-found[s], s != s.lower(), s))
        for key, found in spellings.items()
    }
    return {label: kept[label_key(label)] for label in sorted(counts) if kept[label_key(label)] != label}


def check_predictable(labels: list[str], source: str) -> None:
    """A label the answer parser can never return would be a class the model cannot score on."""
    from ortune.metrics import parse_label

    for label in labels:
        if parse_label(label, labels) != label:
            raise OrtuneError(
                f"{source}: label {label!r} can never be predicted: answers are read by their first "
                "line without surrounding punctuation or case (ortune.metrics.parse_label); rename it"
            )


def check_label_set(labels: Iterable[str], allowed: list[str], label_field: str, where: Callable[[int], str]) -> None:
    """A label outside data.labels is a typo or a stray row, not a new class to learn silently.
    labels: each row's label (after label_spellings); where: a row's index -> its place."""
    for index, label in enumerate(labels):
        if label not in allowed:
            raise OrtuneError(
                f"{where(index)} has {label_field}={label!r}, not one of data.labels "
                f"({', '.join(allowed)}); fix the row or add the label to data.labels"
            )


def _input_key(row: dict, key_fields: list[str]) -> tuple:
    # an optional field (data.template.prompt_no_input) may be missing or null: the same input as empty;
    # a conversation (a list) is keyed by its JSON
    return tuple(
        json.dumps(row[name], sort_keys=True, ensure_ascii=False)
        if isinstance(row.get(name), (list, dict))
        else str(row.get(name) if row.get(name) is not None else "").strip()
        for name in key_fields
    )


def input_digest(row: dict, key_fields: list[str]) -> bytes:
    """16 bytes standing for a row's input (its key fields): what de-duplication compares when the rows are
    not held. Two distinct inputs share one with a chance of about n^2 / 2^129 (1e-26 for a million rows)."""
    key = json.dumps(_input_key(row, key_fields), ensure_ascii=False)
    return hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()


def drop_duplicates(rows: list[dict], key_fields: list[str]) -> tuple[list[dict], int]:
    """Keep the first row of each distinct input, so no input can land on both sides of the split."""
    seen: set[tuple] = set()
    kept = []
    for row in rows:
        key = _input_key(row, key_fields)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept, len(rows) - len(kept)


def find_conflicts(rows: list[dict], key_fields: list[str], label_field: str) -> list[tuple[dict, dict]]:
    """(row kept, row dropped) for each later row whose input repeats an earlier one with another label:
    drop_duplicates keeps the first, so these are the labels the data contradicts itself on."""
    first: dict[tuple, dict] = {}
    conflicts = []
    for row in rows:
        key = _input_key(row, key_fields)
        if key not in first:
            first[key] = row
        elif str(first[key][label_field]) != str(row[label_field]):
            conflicts.append((first[key], row))
    return conflicts


SPLITS = ("train", "validation", "test")


def split_rows(
    rows: list[dict], label_field: str | None, validation_fraction: float, test_fraction: float, seed: int
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) of `rows`, as split_indices splits them (by row[label_field], or unlabelled)."""
    labels = None if label_field is None else [str(row[label_field]) for row in rows]
    parts = split_indices(len(rows), labels, label_field, validation_fraction, test_fraction, seed)
    return tuple([rows[i] for i in part] for part in parts)


def split_indices(
    count: int,
    labels: list[str] | None,
    label_field: str | None,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) indices of `count` rows, seeded; labels[i] is row i's label, or labels is None.
    With labels, per label: each label keeps its share in every split (at least one row each), so a rare
    label is measured where it is selected and reported. Without (free-text answers are not classes), one
    shuffle of all the rows cut in three.

    Validation is what anything that chooses reads (auto quantization, `make best`, training's eval loss);
    test is read only by the eval stage's headline, so no setting was ever tuned on the rows it reports."""
    rng = random.Random(seed)
    if labels is None:
        groups = {"": list(range(count))}
    else:
        groups = defaultdict(list)
        for index, label in enumerate(labels):
            groups[label].append(index)
        if len(groups) < 2:
            raise OrtuneError(
                f"data: only one label ({', '.join(groups)}) in field '{label_field}'; a classifier needs two or more"
            )
    train, validation, test = [], [], []
    for label in sorted(groups):
        group = groups[label]
        if len(group) < len(SPLITS):
            what = f"label '{label}' has" if labels is not None else "the data has"
            raise OrtuneError(
                f"data: {what} {len(group)} row(s); at least {len(SPLITS)} are needed, one for each of "
                f"train, validation and test: add rows"
            )
        rng.shuffle(group)
        n_test = max(1, round(len(group) * test_fraction))
        n_validation = max(1, round(len(group) * validation_fraction))
        # a small group keeps one training row: the held-out shares give way, test last
        n_validation = min(n_validation, len(group) - 2)
        n_test = min(n_test, len(group) - 1 - n_validation)
        test.extend(group[:n_test])
        validation.extend(group[n_test : n_test + n_validation])
        train.extend(group[n_test + n_validation :])
    for split in (train, validation, test):
        rng.shuffle(split)
    return train, validation, test


def small_labels(counts: dict[str, Counter], minimum: int = MIN_ROWS_PER_LABEL) -> list[str]:
    """One warning per label with too few rows to learn it or to measure it (counts: split -> rows per label)."""
    every = sorted(set().union(*counts.values()))
    warnings = []
    for label in every:
        total = sum(c[label] for c in counts.values())
        if total < minimum:
            each = ", ".join(f"{c[label]} {name}" for name, c in counts.items())
            warnings.append(
                f"label '{label}' has only {total} rows ({each}): too few to learn it or to measure it; "
                f"add rows (at least {minimum} per label)"
            )
    return warnings


# ---- rendering ---------------------------------------------------------------------------------------


def input_output_fields(spec) -> tuple[list[str], list[str], str]:
    """The fields a row's prompt and completion come from (per data.format), and the setting naming them."""
    if spec.format == "messages":
        return [spec.messages_field], [], "data.messages_field"
    if spec.format == "chat":
        return [spec.input_column], [spec.output_column], "data.input_column/data.output_column"
    return template_fields(spec.template.prompt), template_fields(spec.template.completion), "data.template"


def render_row(row: dict, spec) -> dict:
    """One prepared row in the configured data.format (spec = the `data` settings): ortune.tasks renders
    it (optional fields, free-text answers); a `messages` row makes several (tasks.render_rows)."""
    from ortune import tasks

    return tasks.render_row(row, spec)


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
    return _chat_tokenizer(str(model_dir)).apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


@functools.lru_cache(maxsize=4)
def _chat_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise OrtuneError(f"{model_dir}: the tokenizer has no chat template; use data.format=text for this model")
    return tokenizer


# ---- lengths in tokens -------------------------------------------------------------------------------


def token_lengths(rendered: list[dict], tokenizer) -> list[tuple[int, int]]:
    """(prompt tokens, answer tokens) of each prepared row, counted as training counts the sequence: the
    prompt as the model is prompted, the answer with its end token (or end of turn)."""
    prompts, fulls = [], []
    for row in rendered:
        if isinstance(row["prompt"], str):
            prompts.append(row["prompt"])
            fulls.append(row["prompt"] + row["completion"] + (tokenizer.eos_token or ""))
        else:
            if not tokenizer.chat_template:
                raise OrtuneError(
                    "data.format=chat: the base model's tokenizer has no chat template; "
                    "use data.format=text for this model"
                )
            prompts.append(
                tokenizer.apply_chat_template(list(row["prompt"]), tokenize=False, add_generation_prompt=True)
            )
            fulls.append(tokenizer.apply_chat_template([*row["prompt"], *row["completion"]], tokenize=False))
    if not rendered:
        return []
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    return [(len(p), len(f) - len(p)) for p, f in zip(prompt_ids, full_ids)]


def percentiles(values: list[int], points: tuple[int, ...] = (50, 90, 95, 99)) -> dict[str, int]:
    """Nearest-rank percentiles (each is a value that occurs), and the maximum."""
    ordered = sorted(values)
    if not ordered:
        return {}
    out = {f"p{p}": ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1] for p in points}
    out["max"] = ordered[-1]
    return out


def model_context(model_dir: str | Path) -> int | None:
    """The longest sequence the model takes, from its config.json (None where it does not say)."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    settings = json.loads(config.read_text(encoding="utf-8"))
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(settings.get(key), int) and settings[key] > 0:
            return settings[key]
    return None


# ---- files -------------------------------------------------------------------------------------------


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def label_counts(rows: list[dict], field: str = "label") -> dict[str, int]:
    return dict(sorted(Counter(str(row[field]) for row in rows).items()))
