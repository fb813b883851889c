"""Reading labelled records, checking them, splitting them, and rendering prompt/completion pairs.

Files are read by Hugging Face `datasets` (the loader the CookBook's Olive workflow uses), so a file
that loads there loads here. What is ours: which files make a dataset, their order, and errors
that name the file and, where it can be known, the line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import shlex
import string
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from ortune.errors import OrtuneError

log = logging.getLogger("ortune")

# suffix -> the `datasets` builder that reads it (a .json file may hold a JSON array or JSON Lines)
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
FORMAT_NAMES = "JSON Lines (.jsonl, or .json), JSON array (.json), CSV, Parquet or Arrow"
# Below this many rows a label can neither be learned nor measured: a warning, not a refusal, so
# that a quick trial on a handful of rows still runs.
MIN_ROWS_PER_LABEL = 10


class Records(list):
    """Rows as read, each with its place ("file:line: row n" or "file: row n") for error messages."""

    def __init__(self, rows: Iterable[dict] = (), places: Iterable[str] = ()):
        super().__init__(rows)
        self.places = list(places)


def place(rows: list[dict], index: int, source: str) -> str:
    if isinstance(rows, Records) and index < len(rows.places):
        return rows.places[index]
    return f"{source}: row {index + 1}"


def placer(rows: list[dict], source: str) -> Callable[[dict], str]:
    """row -> its place, for rows that have since been filtered, split or reordered."""
    places = {id(row): place(rows, index, source) for index, row in enumerate(rows)}
    return lambda row: places.get(id(row), source)


# ---- reading -----------------------------------------------------------------------------------------


def read_records(path: str | Path) -> Records:
    """Rows of a data file or of a folder of them (see FORMATS), in a fixed order: files by path, rows
    as they stand in each file. A folder written by `Dataset.save_to_disk` is read as that dataset."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.exists():
        raise OrtuneError(
            f"data.path={path}: file not found; point data.path at a {FORMAT_NAMES} file or a folder of them"
        )
    if not path.is_file():
        raise OrtuneError(f"data.path={path}: not a regular file; point data.path at a data file or a folder of them")
    if path.suffix.lower() not in FORMATS:
        raise OrtuneError(f"data.path={path}: unsupported format '{path.suffix}'; use one of {', '.join(FORMATS)}")
    records = _read_file(path)
    if not records:
        raise OrtuneError(f"{path}: no rows; it needs labelled rows")
    return records


def data_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """(data files, other files) under `folder`, sorted by relative path; hidden entries are skipped."""
    found, ignored = [], []
    for file in sorted(_walk(folder), key=lambda p: p.relative_to(folder).as_posix()):
        if file.is_file():
            (found if file.suffix.lower() in FORMATS else ignored).append(file)
    return found, ignored


def _walk(folder: Path) -> list[Path]:
    """Every entry under `folder` outside hidden folders. A subfolder this user cannot list is an error:
    Path.rglob would skip it without a word, and its rows would silently be missing from the data."""

    def unreadable(exc: OSError) -> None:
        where = Path(exc.filename or folder)
        raise OrtuneError(
            f"data.path={folder}: cannot list {where} ({exc.strerror or exc}); fix its permissions, "
            f"e.g. chmod -R a+rX {shlex.quote(str(where))}"
        )

    entries = []
    for top, folders, files in os.walk(folder, onerror=unreadable):
        folders[:] = [name for name in folders if not name.startswith(".")]
        entries.extend(Path(top) / name for name in [*folders, *files] if not name.startswith("."))
    return entries


def _read_folder(folder: Path) -> Records:
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise OrtuneError(
            f"data.path={folder}: a saved DatasetDict (splits: {', '.join(splits)}); point data.path "
            f"at one split's folder, e.g. {folder / (splits[0] if splits else 'train')}"
        )
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return _read_saved_dataset(folder)
    files, ignored = data_files(folder)
    if not files:
        raise OrtuneError(f"data.path={folder}: no data files in this folder; it needs {FORMAT_NAMES} files")
    if ignored:
        log.info(
            "data.path=%s: ignoring %d file(s) that are not data: %s",
            folder,
            len(ignored),
            ", ".join(str(p.relative_to(folder)) for p in ignored[:5]) + (" ..." if len(ignored) > 5 else ""),
        )
    records = Records()
    for file in files:
        part = _read_file(file)
        records.extend(part)
        records.places.extend(part.places)
    if not records:
        raise OrtuneError(f"data.path={folder}: its {len(files)} data file(s) hold no rows; it needs labelled rows")
    log.info("data.path=%s: %d rows from %d file(s)", folder, len(records), len(files))
    return records


def _read_saved_dataset(folder: Path) -> Records:
    with _quiet_datasets() as datasets:
        try:
            rows = datasets.load_from_disk(str(folder), keep_in_memory=True).to_list()
        except Exception as exc:  # noqa: BLE001 - any failure of a saved dataset is unreadable input
            raise OrtuneError(f"{folder}: not a readable saved dataset ({_first_line(exc)})") from None
    return Records(rows, (f"{folder}: row {n}" for n in range(1, len(rows) + 1)))


def _read_file(file: Path) -> Records:
    kind = FORMATS[file.suffix.lower()]
    try:
        with open(file, "rb") as handle:
            head = handle.read(1 << 16)
    except PermissionError:
        raise OrtuneError(
            f"{file}: permission denied (this user cannot read it); fix its permissions, "
            f"e.g. chmod a+r {shlex.quote(str(file))}"
        ) from None
    if not head.strip() and file.stat().st_size <= len(head):
        raise OrtuneError(f"{file}: the file is empty; it needs labelled rows")
    if kind == "json":
        _refuse_list_of_non_objects(file, head)
    try:
        rows = _load(file, kind)
    except OrtuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - the loader's many error types become one line here
        raise _unreadable(file, kind, exc) from None
    if kind == "json" and not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        lines = _content_line_numbers(file)
        if len(lines) == len(rows):  # JSON Lines: a row is a line, so name the line
            return Records(rows, (f"{file}:{line}: row {n}" for n, line in enumerate(lines, start=1)))
    return Records(rows, (f"{file}: row {n}" for n in range(1, len(rows) + 1)))


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets`, without progress bars or its error log: a failure becomes our one line instead."""
    import datasets
    from datasets.utils import logging as ds_logging

    before, bars = ds_logging.get_verbosity(), ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    ds_logging.disable_progress_bar()
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(before)
        if bars:
            ds_logging.enable_progress_bar()


def _load(file: Path, kind: str) -> list[dict]:
    with _quiet_datasets() as datasets:
        options: dict = {}
        if kind == "json":
            # rows with `type`/`message` fields would otherwise be taken for agent traces
            options["parse_agent_traces"] = False
        elif kind == "csv":
            # text stays text: "007" is not 7, and "NA", "null" or "None" are phrases, not missing values
            import pandas as pd

            columns = pd.read_csv(file, nrows=0, encoding="utf-8").columns
            if len(columns) == 0:
                raise OrtuneError(f"{file}: no header line; the first line must name the columns")
            if len(columns) == 1 and (separator := next((c for c in ";\t|" if c in columns[0]), None)):
                # one column named "phrase;tone": the rows are another separator's, which CSV does not read
                raise OrtuneError(
                    f"{file}: one column named {columns[0]!r}: the file looks {separator!r}-separated; "
                    "ortune reads comma-separated CSV: re-save it with commas (or as JSON Lines)"
                )
            options["features"] = datasets.Features({name: datasets.Value("string") for name in columns})
            options["na_filter"] = False
        # a throwaway cache: the stage's inputs are the files, never a stale copy of them
        with tempfile.TemporaryDirectory(prefix="ortune-datasets-") as cache:
            dataset = datasets.load_dataset(
                kind, data_files=[str(file)], split="train", cache_dir=cache, keep_in_memory=True, **options
            )
            return dataset.to_list()


def _refuse_list_of_non_objects(file: Path, head: bytes) -> None:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if not text.startswith(b"["):
        return
    first = text[1:].lstrip(b" \t\r\n")[:1]
    if first in (b"{", b"]", b""):
        return
    kind = {b'"': "strings", b"[": "lists", b"t": "booleans", b"f": "booleans", b"n": "nulls"}.get(first, "numbers")
    raise OrtuneError(
        f"{file}: a JSON list of {kind}, not of objects; each row must be an object naming its "
        'fields, e.g. {"phrase": "...", "tone": "joy"}'
    )


def _unreadable(file: Path, kind: str, exc: BaseException) -> OrtuneError:
    """The loader failed: find what is wrong, and where, by reading the file ourselves."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = raw[: bad.start].count(b"\n") + 1
        return OrtuneError(f"{file}:{line}: bytes that are not UTF-8; re-save the file as UTF-8")
    text = text.removeprefix("\ufeff")
    cause = _root_cause(exc)
    if kind == "json":
        return _json_problem(file, text) or OrtuneError(f"{file}: not readable as JSON ({_first_line(cause)})")
    if kind == "csv":
        import re

        message = _first_line(cause)
        if type(cause).__name__ == "EmptyDataError":
            return OrtuneError(f"{file}: the file is empty; it needs a header line and labelled rows")
        if "corresponds to no data" in message:
            return OrtuneError(f"{file}: a header but no rows; it needs labelled rows")
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
        if found:
            expected, line, saw = found.groups()
            return OrtuneError(
                f"{file}:{line}: {saw} fields where the header has {expected}; quote fields that "
                'contain commas ("a, b") or fix that line'
            )
        return OrtuneError(f"{file}: not readable as CSV ({message})")
    return OrtuneError(f"{file}: not a readable {kind.capitalize()} file ({_first_line(cause)}); re-export it")


def _json_problem(file: Path, text: str) -> OrtuneError | None:
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as bad:
            return OrtuneError(f"{file}:{bad.lineno}: invalid JSON ({bad.msg}); fix that line")
        for n, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                return OrtuneError(
                    f"{file}: row {n} is {type(row).__name__}, not an object; every row must be an "
                    "object naming its fields"
                )
        return None
    # JSON Lines end at line feeds only: U+2028 and friends are valid inside a JSON string
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as bad:
            return OrtuneError(f"{file}:{number}: malformed JSON line ({bad.msg}); fix or remove that line")
        if not isinstance(row, dict):
            return OrtuneError(f"{file}:{number}: expected a JSON object per line, found {type(row).__name__}")
    return None


def _content_line_numbers(file: Path) -> list[int]:
    """Numbers of the lines that hold something (the loader skips blank ones)."""
    return [n for n, line in enumerate(file.read_bytes().split(b"\n"), start=1) if line.strip()]


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


def normalize_labels(rows: list[dict], label_field: str, allowed: list[str] | None = None) -> dict[str, str]:
    """Merge labels that differ only by case or surrounding whitespace (`Joy`, `joy`, `joy `).

    The spelling kept is the one in data.labels when given, else the most frequent one (ties: the
    lowercase one, then alphabetical). Rewrites row[label_field] in place and returns
    {spelling as written: spelling kept} for every spelling that changed, for the data report.
    """
    declared: dict[str, str] = {}
    for label in allowed or []:
        if label_key(label) in declared:
            raise OrtuneError(
                f"data.labels lists '{declared[label_key(label)]}' and '{label}', which answers "
                "cannot tell apart (case and surrounding spaces are ignored); keep one"
            )
        declared[label_key(label)] = label
    counts = Counter(str(row[label_field]) for row in rows)
    spellings: dict[str, Counter] = defaultdict(Counter)
    for label, n in counts.items():
        spellings[label_key(label)][label.strip()] += n
    kept = {
        key: declared.get(key) or min(found, key=lambda s: (-found[s], s != s.lower(), s))
        for key, found in spellings.items()
    }
    mapping = {label: kept[label_key(label)] for label in sorted(counts) if kept[label_key(label)] != label}
    if mapping:
        for row in rows:
            row[label_field] = mapping.get(str(row[label_field]), row[label_field])
    return mapping


def check_predictable(labels: list[str], source: str) -> None:
    """A label the answer parser can never return would be a class the model cannot score on."""
    from ortune.metrics import parse_label

    for label in labels:
        if parse_label(label, labels) != label:
            raise OrtuneError(
                f"{source}: label {label!r} can never be predicted: answers are read by their first "
                "line without surrounding punctuation or case (ortune.metrics.parse_label); rename it"
            )


def check_label_set(rows: list[dict], label_field: str, allowed: list[str], source: str) -> None:
    """A label outside data.labels is a typo or a stray row, not a new class to learn silently."""
    for index, row in enumerate(rows):
        if str(row[label_field]) not in allowed:
            raise OrtuneError(
                f"{place(rows, index, source)} has {label_field}={row[label_field]!r}, not one of data.labels "
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
    """(train, validation, test), seeded. With a label field, per label: each label keeps its share in every
    split (at least one row each), so a rare label is measured where it is selected and reported. Without
    one (free-text answers are not classes), one shuffle of all the rows cut in three.

    Validation is what anything that chooses reads (auto quantization, `make best`, training's eval loss);
    test is read only by the eval stage's headline, so no setting was ever tuned on the rows it reports."""
    rng = random.Random(seed)
    if label_field is None:
        groups = {"": list(rows)}
    else:
        groups = defaultdict(list)
        for row in rows:
            groups[str(row[label_field])].append(row)
        if len(groups) < 2:
            raise OrtuneError(
                f"data: only one label ({', '.join(groups)}) in field '{label_field}'; a classifier needs two or more"
            )
    train, validation, test = [], [], []
    for label in sorted(groups):
        group = groups[label]
        if len(group) < len(SPLITS):
            what = f"label '{label}' has" if label_field is not None else "the data has"
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


def small_labels(splits: dict[str, list[dict]], field: str = "label", minimum: int = MIN_ROWS_PER_LABEL) -> list[str]:
    """One warning per label with too few rows to learn it or to measure it (splits: name -> rows)."""
    counts = {name: Counter(str(r[field]) for r in rows) for name, rows in splits.items()}
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
