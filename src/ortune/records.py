"""Reading rows from data files, and where each row came from (for errors that name the row).

Files are read by Hugging Face `datasets` (the loader the CookBook's Olive workflow uses), so a file
that loads there loads here. What is ours: which files make a dataset, their order, and errors
that name the file and, where it can be known, the line.

Two ways to hold what was read:
- `open_rows(path)` -> RowTable: the rows stay in `datasets`' Arrow files, memory-mapped from a temporary
  folder that lives as long as the table; iterating builds one batch of dicts at a time, and a row's place
  ("file:line: row n") is worked out when something asks for it. prepare_data reads this way, so its memory
  does not grow with a Python object per row (docs/data.md, "How large a file").
- `read_records(path)` -> Records: every row as a dict in a list, for small files (eval files, tests).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import shlex
import tempfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from pathlib import Path

from ortune.errors import OrtuneError

log = logging.getLogger("ortune")

# suffix -> the `datasets` builder that reads it (a .json file may hold a JSON array or JSON Lines)
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
FORMAT_NAMES = "JSON Lines (.jsonl, or .json), JSON array (.json), CSV, Parquet or Arrow"
# rows turned into dicts at a time while iterating a RowTable: memory is this batch, not the file
BATCH_ROWS = 1000


class Records(list):
    """Rows as read, each with its place ("file:line: row n" or "file: row n") for error messages."""

    def __init__(self, rows: Iterable[dict] = (), places: Iterable[str] = ()):
        super().__init__(rows)
        self.places = list(places)


class _Part:
    """One file's rows as `datasets` holds them (memory-mapped), and how to name a row of it."""

    def __init__(self, dataset, file: Path, numbered_lines: bool):
        self.dataset, self.file, self.numbered_lines = dataset, file, numbered_lines
        self._lines: array | None = None

    def place(self, index: int) -> str:
        if self.numbered_lines and self._lines is None:
            self._lines = _content_line_numbers(self.file)
        if self._lines is not None and len(self._lines) == len(self.dataset):
            return f"{self.file}:{self._lines[index]}: row {index + 1}"  # JSON Lines: a row is a line
        return f"{self.file}: row {index + 1}"


class RowTable:
    """Rows of one or more files, kept where `datasets` wrote them: len(), iteration (dicts built a batch at a
    time, in file order), table[i], and place(i) for messages. close() (or the end of the process) removes
    the temporary Arrow files."""

    def __init__(self, parts: list[_Part], scratch: tempfile.TemporaryDirectory):
        self._parts, self._scratch = parts, scratch
        self._starts = list(accumulate([len(part.dataset) for part in parts], initial=0))

    def __len__(self) -> int:
        return self._starts[-1]

    def __iter__(self) -> Iterator[dict]:
        for part in self._parts:
            for batch in part.dataset.iter(batch_size=BATCH_ROWS):
                columns = list(batch)
                for values in zip(*(batch[name] for name in columns)):
                    yield dict(zip(columns, values))

    def _locate(self, index: int) -> tuple[_Part, int]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        at = bisect.bisect_right(self._starts, index) - 1
        return self._parts[at], index - self._starts[at]

    def __getitem__(self, index: int) -> dict:
        part, local = self._locate(index)
        return part.dataset[local]

    def place(self, index: int) -> str:
        part, local = self._locate(index)
        return part.place(local)

    def places(self) -> list[str]:
        return [self.place(index) for index in range(len(self))]

    def close(self) -> None:
        self._parts = []
        self._scratch.cleanup()

    def __enter__(self) -> RowTable:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def place(rows, index: int, source: str) -> str:
    """Where row `index` of `rows` came from: its file (and line) for rows read here, else `source`."""
    if isinstance(rows, RowTable):
        return rows.place(index)
    if isinstance(rows, Records) and index < len(rows.places):
        return rows.places[index]
    return f"{source}: row {index + 1}"


def placer(rows: list[dict], source: str) -> Callable[[dict], str]:
    """row -> its place, for rows that have since been filtered, split or reordered."""
    places = {id(row): place(rows, index, source) for index, row in enumerate(rows)}
    return lambda row: places.get(id(row), source)


# ---- reading -----------------------------------------------------------------------------------------


def read_records(path: str | Path) -> Records:
    """Every row of a data file or of a folder of them, as dicts in a list (see open_rows)."""
    with open_rows(path) as table:
        return Records(table, table.places())


def open_rows(path: str | Path) -> RowTable:
    """Rows of a data file or of a folder of them (see FORMATS), in a fixed order: files by path, rows
    as they stand in each file. A folder written by `Dataset.save_to_disk` is read as that dataset."""
    path = Path(path)
    scratch = tempfile.TemporaryDirectory(prefix="ortune-datasets-")
    try:
        table = RowTable(_open_parts(path, Path(scratch.name)), scratch)
    except BaseException:
        scratch.cleanup()
        raise
    if not len(table):
        table.close()
        raise OrtuneError(
            f"data.path={path}: its data file(s) hold no rows; it needs labelled rows"
            if path.is_dir()
            else f"{path}: no rows; it needs labelled rows"
        )
    return table


def _open_parts(path: Path, scratch: Path) -> list[_Part]:
    if path.is_dir():
        return _read_folder(path, scratch)
    if not path.exists():
        raise OrtuneError(
            f"data.path={path}: file not found; point data.path at a {FORMAT_NAMES} file or a folder of them"
        )
    if not path.is_file():
        raise OrtuneError(f"data.path={path}: not a regular file; point data.path at a data file or a folder of them")
    if path.suffix.lower() not in FORMATS:
        raise OrtuneError(f"data.path={path}: unsupported format '{path.suffix}'; use one of {', '.join(FORMATS)}")
    return [_read_file(path, scratch)]


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


def _read_folder(folder: Path, scratch: Path) -> list[_Part]:
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise OrtuneError(
            f"data.path={folder}: a saved DatasetDict (splits: {', '.join(splits)}); point data.path "
            f"at one split's folder, e.g. {folder / (splits[0] if splits else 'train')}"
        )
    if (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file():
        return [_read_saved_dataset(folder)]
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
    parts = [_read_file(file, scratch / str(number)) for number, file in enumerate(files)]
    rows = sum(len(part.dataset) for part in parts)
    if rows:
        log.info("data.path=%s: %d rows from %d file(s)", folder, rows, len(files))
    return parts


def _read_saved_dataset(folder: Path) -> _Part:
    with _quiet_datasets() as datasets:
        try:
            dataset = datasets.load_from_disk(str(folder))  # memory-mapped where it lies
        except Exception as exc:  # noqa: BLE001 - any failure of a saved dataset is unreadable input
            raise OrtuneError(f"{folder}: not a readable saved dataset ({_first_line(exc)})") from None
    return _Part(dataset, folder, numbered_lines=False)


def _read_file(file: Path, scratch: Path) -> _Part:
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
        dataset = _load(file, kind, scratch)
    except OrtuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - the loader's many error types become one line here
        raise _unreadable(file, kind, exc) from None
    lines = kind == "json" and not head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    return _Part(dataset, file, numbered_lines=lines)


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


def _load(file: Path, kind: str, scratch: Path):
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
        # a cache of this read only (the stage's inputs are the files, never a stale copy of them), kept
        # memory-mapped: the table's rows are not copied into this process
        dataset = datasets.load_dataset(kind, data_files=[str(file)], split="train", cache_dir=str(scratch), **options)
        # the rows are decoded later, a batch at a time: bytes that are not UTF-8 must fail here, inside the read
        dataset.data.validate(full=True)
        return dataset


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


def _content_line_numbers(file: Path) -> array:
    """Numbers of the lines that hold something (the loader skips blank ones), read a line at a time."""
    numbers = array("L")
    with open(file, "rb") as handle:  # binary lines end at line feeds only, as JSON Lines do
        for number, line in enumerate(handle, start=1):
            if line.strip():
                numbers.append(number)
    return numbers


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
