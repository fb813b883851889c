"""prepare_data's work, on rows it does not hold: passes over a RowTable (ortune.records) that keep a few
bytes per row (an input digest, a label, where its rendered lines sit in a spill file), then each split
file written row by row in its drawn order.

1. check: every row has what data.format and data.task need (ortune.tasks.check_rows);
2. labels (classification): each row's label, spellings merged (data.label_spellings), the label set;
3. keys: each row's input digest; duplicates and conflicting labels found on the digests (numpy);
   the split drawn on the kept rows' indices (data.split_indices: the same split as on the rows);
4. render: each kept row rendered (tasks.render_rows), its JSON lines appended to an unnamed temporary
   file, its token lengths counted a batch at a time;
5. write: each split's file from the spill file, in the split's order, into data/prepared at once.

Memory is the table's memory-mapped Arrow file, a batch of rows, and ~100 bytes per row (measured:
docs/data.md, "How large a file").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ortune import data, tasks
from ortune.artifacts import atomic_dir
from ortune.errors import OrtuneError
from ortune.metrics import majority_baseline
from ortune.records import RowTable

log = logging.getLogger("ortune")
# rows named in the report and in one-line errors; the counts cover all of them
SHOWN = 5
# rendered rows whose tokens are counted at once (the tokenizer is fastest on batches)
TOKEN_BATCH = 1000


def prepare(cfg: DictConfig, table: RowTable) -> dict:
    """Check, de-duplicate, split and render `table` into cfg.paths.prepared; returns metrics/data.json."""
    spec = cfg.data
    source = str(spec.path)
    input_fields, _, _ = data.input_output_fields(spec)
    tasks.check_rows(table, spec, source)  # per data.format; the label field for classification only
    generation = tasks.is_generation(spec)
    labels, normalized = (None, {}) if generation else _labels(table, spec, source)

    digests = bytearray()  # grown in place: a list of a million bytes objects would be 50 MB more
    for row in table:
        digests += data.input_digest(row, input_fields)
    digests = np.frombuffer(bytes(digests), dtype="V16")
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    first_of = first[inverse.reshape(-1)]  # per row: the first row with the same input
    kept = np.flatnonzero(first_of == np.arange(len(table)))
    conflicts, conflict_rows = (0, []) if generation else _conflicts(table, labels, first_of, input_fields)
    kept_labels = None if generation else [labels[i] for i in kept]
    drawn = data.split_indices(
        len(kept), kept_labels, spec.label_field, spec.validation_fraction, spec.test_fraction, cfg.seed
    )
    parts = {name: kept[np.asarray(part, dtype=np.int64)] for name, part in zip(data.SPLITS, drawn)}

    with tempfile.TemporaryFile(prefix="ortune-prepared-") as spill:
        rendered = _render(cfg, table, parts, labels, spill)
        spill.flush()
        # os.pread, not mmap: mapped pages of the spill file would count in this process's memory
        fd, offsets = spill.fileno(), rendered.offsets
        with atomic_dir(cfg.paths.prepared) as out:
            for name, part in parts.items():
                with open(out / f"{name}.jsonl", "wb") as handle:
                    for i in part:
                        handle.write(os.pread(fd, int(offsets[i + 1] - offsets[i]), int(offsets[i])))
            split_labels = {name: [labels[i] for i in part] for name, part in parts.items()} if labels else None
            every_label = sorted(set(kept_labels)) if kept_labels else []
            (out / "labels.json").write_text(json.dumps(every_label) + "\n", encoding="utf-8")

    made = {name: int(rendered.made[part].sum()) for name, part in parts.items()}
    overlap = {
        f"{a}_{b}_overlap": int(np.intersect1d(rendered.prompts[a], rendered.prompts[b]).size)
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test"))
    }
    report = {
        "rows_read": len(table),
        "duplicates_dropped": len(table) - len(kept),
        **{f"{name}_rows": made[name] for name in data.SPLITS},
    }
    lengths = rendered.tokens.report()
    if generation:
        log.info("prepared %s free-text rows", " / ".join(f"{made[n]} {n}" for n in data.SPLITS))
        return {
            "task": "generation",
            **report,
            # a conversation makes one example per assistant turn
            **{f"{name}_source_rows": len(part) for name, part in parts.items()},
            **overlap,
            **lengths,
            "warnings": lengths.pop("warnings"),
        }
    counts = {name: Counter(split_labels[name]) for name in data.SPLITS}
    small = data.small_labels(counts)
    for warning in small:
        log.warning("%s", warning)
    log.info("prepared %s rows over labels %s", " / ".join(f"{made[n]} {n}" for n in data.SPLITS), every_label)
    return {
        **report,
        # included in duplicates_dropped: same input, another label; the first row's label is kept
        "conflicts": conflicts,
        "conflict_rows": conflict_rows,
        "normalized_labels": normalized,
        **{f"{name}_label_counts": dict(sorted(counts[name].items())) for name in data.SPLITS},
        "rows_per_label": {label: {name: counts[name][label] for name in data.SPLITS} for label in every_label},
        # the headline's floor: always answering the most frequent training label, on the test rows
        "majority_baseline": majority_baseline(split_labels["train"], split_labels["test"]),
        # inputs shared between splits after de-duplication: 0 unless two inputs render to one prompt
        **overlap,
        **lengths,
        "warnings": lengths.pop("warnings") + small,
    }


def _labels(table: RowTable, spec: DictConfig, source: str) -> tuple[list[str], dict[str, str]]:
    """Each row's label as the data means it, and the spellings merged into another (logged)."""
    field = spec.label_field
    seen: dict[str, str] = {}  # one str object per distinct label, not one per row
    written = [seen.setdefault(str(row[field]), str(row[field])) for row in table]
    allowed = list(spec.labels) if spec.labels is not None else None
    # Case and surrounding spaces are merged, not refused: the answer parser ignores them, so `Joy`
    # and `joy` can only ever be one class, and a user fixing a file they did not write gains nothing
    # from a refusal. The merge is never silent: logged here and listed in metrics/data.json.
    normalized = data.label_spellings(Counter(written), allowed)
    for spelling, kept in normalized.items():
        log.warning(
            "label %r read as %r (labels differing only by case or surrounding spaces are one class)", spelling, kept
        )
    labels = [normalized.get(label, label) for label in written]
    if allowed is not None:
        data.check_label_set(labels, allowed, field, table.place)
    data.check_predictable(sorted(set(labels)), source)
    return labels, normalized


def _conflicts(table: RowTable, labels: list[str], first_of: np.ndarray, fields: list[str]) -> tuple[int, list[dict]]:
    """Rows repeating an earlier row's input with another label (the first row's label is kept, and logged):
    how many, and the first SHOWN of them."""
    repeats = np.flatnonzero(first_of != np.arange(len(table)))
    found = [(int(first_of[i]), int(i)) for i in repeats if labels[first_of[i]] != labels[i]]
    shown = []
    for kept, dropped in found[:SHOWN]:
        row = table[dropped]
        shown.append(
            {
                "input": " | ".join(str(row[name]) for name in fields),
                "kept": labels[kept],
                "kept_at": table.place(kept),
                "dropped": labels[dropped],
                "dropped_at": table.place(dropped),
            }
        )
    if shown:
        log.warning(
            "%d row(s) repeat an earlier input with another label; the first row's label is kept, e.g. "
            "%s (%s) over %s (%s); all listed in metrics/data.json",
            len(found),
            shown[0]["kept_at"],
            shown[0]["kept"],
            shown[0]["dropped_at"],
            shown[0]["dropped"],
        )
    return len(found), shown


class _Rendered:
    """What the render pass keeps: row i's lines are spill[offsets[i]:offsets[i + 1]] (empty for a dropped
    row), made[i] the examples it made, prompts[split] the digests of its prompts, and the token counts."""

    def __init__(self, rows: int, tokens: _Tokens):
        self.offsets = np.zeros(rows + 1, dtype=np.int64)
        self.made = np.zeros(rows, dtype=np.int32)
        self.prompts: dict[str, np.ndarray] = {}
        self.tokens = tokens


def _render(cfg: DictConfig, table: RowTable, parts: dict[str, np.ndarray], labels, spill) -> _Rendered:
    spec = cfg.data
    split_of = np.full(len(table), -1, dtype=np.int8)
    for number, part in enumerate(parts.values()):
        split_of[part] = number
    rendered = _Rendered(len(table), _Tokens(cfg, table))
    prompts: list[bytearray] = [bytearray() for _ in parts]
    position, render, label_field = 0, tasks.renderer(spec), spec.label_field
    for index, row in enumerate(table):
        split = split_of[index]
        if split >= 0:
            if labels is not None:
                row[label_field] = labels[index]  # as label_spellings merged it
            made = render(row)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in made).encode("utf-8")
            spill.write(lines)
            position += len(lines)
            rendered.made[index] = len(made)
            for example in made:
                prompts[split] += _digest(data.prompt_key(example["prompt"]))
                rendered.tokens.add(index, example)
        rendered.offsets[index + 1] = position
    rendered.tokens.flush()
    for number, name in enumerate(parts):
        rendered.prompts[name] = np.frombuffer(bytes(prompts[number]), dtype="V16")
    return rendered


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class _Tokens:
    """Token lengths per the base model's tokenizer, counted a batch at a time: percentiles, rows over
    train.max_length (which training truncates), and a refusal naming the rows longer than the model's
    context (no runtime can take them). Skipped, saying why, when the base model is not there yet (a hand
    run)."""

    def __init__(self, cfg: DictConfig, table: RowTable):
        self.table, self.max_length = table, cfg.train.max_length
        self.base = Path(cfg.paths.base_model)
        self.batch: list[tuple[int, dict]] = []
        self.prompt, self.answer = [], []
        self.over_context: list[tuple[int, int]] = []
        self.over_max_length: list[int] = []
        self.long_rows = self.context_rows = 0
        self.tokenizer = self.context = None
        if self.base.is_dir():
            from ortune import modeling

            self.tokenizer = modeling.load_tokenizer(self.base, cfg.model.trust_remote_code)
            self.context = data.model_context(self.base)

    def add(self, index: int, example: dict) -> None:
        if self.tokenizer is None:
            return
        self.batch.append((index, example))
        if len(self.batch) >= TOKEN_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        lengths = data.token_lengths([example for _, example in self.batch], self.tokenizer)
        for (index, _), (prompt, answer) in zip(self.batch, lengths):
            self.prompt.append(prompt)
            self.answer.append(answer)
            total = prompt + answer
            if self.context is not None and total > self.context:
                self.context_rows += 1
                if len(self.over_context) < SHOWN:
                    self.over_context.append((index, total))
            if total > self.max_length:
                self.long_rows += 1
                if len(self.over_max_length) < SHOWN:
                    self.over_max_length.append(index)
        self.batch = []

    def report(self) -> dict:
        if self.tokenizer is None:
            reason = f"no base model at {self.base} (run fetch_model first) to count tokens with"
            log.warning("token lengths not measured: %s", reason)
            return {
                "token_lengths": None,
                "token_lengths_skipped": reason,
                "max_length": self.max_length,
                "rows_over_max_length": None,
                "warnings": [],
            }
        if self.over_context:
            shown = ", ".join(f"{self.table.place(i)} ({total} tokens)" for i, total in self.over_context)
            more = f" and {self.context_rows - SHOWN} more" if self.context_rows > SHOWN else ""
            raise OrtuneError(
                f"{self.context_rows} row(s) are longer than the model's context of {self.context} tokens "
                f"({self.base}/config.json): {shown}{more}; shorten or remove them"
            )
        warnings = []
        if self.long_rows:
            warnings.append(
                f"{self.long_rows} row(s) are longer than train.max_length={self.max_length} tokens and are "
                f"truncated in training (those that lose their whole answer teach nothing), e.g. "
                f"{', '.join(self.table.place(i) for i in self.over_max_length)}; raise train.max_length or "
                "shorten them"
            )
            log.warning("%s", warnings[-1])
        totals = [p + a for p, a in zip(self.prompt, self.answer)]
        return {
            "token_lengths": {
                "tokenizer": str(self.base),
                "prompt": data.percentiles(self.prompt),
                "answer": data.percentiles(self.answer),
                "total": data.percentiles(totals),
                "context": self.context,
            },
            "max_length": self.max_length,
            "rows_over_max_length": self.long_rows,
            "warnings": warnings,
        }
