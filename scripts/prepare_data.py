"""Stage 1: labelled records -> checked, de-duplicated, stratified train/validation/test prompt/completion splits.

Reads: `data.path` (a JSON Lines / JSON / CSV / Parquet / Arrow file, or a folder of them), `data.*`,
`seed`; the base model's tokenizer and context (models/base) and `train.max_length` for lengths in tokens.
Writes: data/prepared/{train,validation,test}.jsonl (prompt, completion, label), data/prepared/labels.json,
metrics/data.json (rows read, duplicates and conflicts dropped, labels normalized, rows per label per
split, majority baseline, overlap, prompt/answer token percentiles, rows over train.max_length, warnings).
With data.format=chat, prompt and completion are user/assistant messages: the model's chat
template renders them (ortune.data.prompt_text), in training and at inference alike.

    python scripts/prepare_data.py data.validation_fraction=0.1 data.test_fraction=0.2
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from ortune import data, stage, tasks
from ortune.artifacts import atomic_dir
from ortune.errors import OrtuneError
from ortune.metrics import majority_baseline

log = logging.getLogger("ortune")
# rows named in the report and in one-line errors; the counts cover all of them
SHOWN = 5


def run(cfg: DictConfig) -> dict:
    spec = cfg.data
    rows = data.read_records(spec.path)
    where = data.placer(rows, spec.path)
    input_fields, output_fields, setting = data.input_output_fields(spec)
    tasks.check_rows(rows, spec, spec.path)  # per data.format; the label field for classification only
    if tasks.is_generation(spec):  # free text: no label set, class or parse rule to check
        return prepare_free_text(cfg, rows, where, input_fields)
    allowed = list(spec.labels) if spec.labels is not None else None
    # Case and surrounding spaces are merged, not refused: the answer parser ignores them, so `Joy`
    # and `joy` can only ever be one class, and a user fixing a file they did not write gains nothing
    # from a refusal. The merge is never silent: logged here and listed in metrics/data.json.
    normalized = data.normalize_labels(rows, spec.label_field, allowed)
    for spelling, kept in normalized.items():
        log.warning(
            "label %r read as %r (labels differing only by case or surrounding spaces are one class)", spelling, kept
        )
    if allowed is not None:
        data.check_label_set(rows, spec.label_field, allowed, spec.path)
    data.check_predictable(sorted({str(r[spec.label_field]) for r in rows}), spec.path)

    conflicts = data.find_conflicts(rows, input_fields, spec.label_field)
    if conflicts:
        kept, dropped = conflicts[0]
        log.warning(
            "%d row(s) repeat an earlier input with another label; the first row's label is kept, e.g. "
            "%s (%s) over %s (%s); all listed in metrics/data.json",
            len(conflicts),
            where(kept),
            kept[spec.label_field],
            where(dropped),
            dropped[spec.label_field],
        )
    unique, duplicates = data.drop_duplicates(rows, input_fields)
    source_splits = dict(
        zip(
            data.SPLITS,
            data.split_rows(unique, spec.label_field, spec.validation_fraction, spec.test_fraction, cfg.seed),
        )
    )
    splits = {name: [data.render_row(r, spec) for r in part] for name, part in source_splits.items()}
    every_source = [r for part in source_splits.values() for r in part]
    every = [r for part in splits.values() for r in part]
    lengths = token_report(cfg, every_source, every, where)
    small = data.small_labels(splits)
    for warning in small:
        log.warning("%s", warning)
    warnings = lengths.pop("warnings") + small
    keys = {name: {data.prompt_key(r["prompt"]) for r in part} for name, part in splits.items()}
    labels = sorted({r["label"] for r in every})
    with atomic_dir(cfg.paths.prepared) as out:
        for name, part in splits.items():
            data.write_jsonl(part, out / f"{name}.jsonl")
        (out / "labels.json").write_text(json.dumps(labels) + "\n", encoding="utf-8")
    log.info("prepared %s rows over labels %s", " / ".join(f"{len(p)} {n}" for n, p in splits.items()), labels)
    counts = {name: data.label_counts(part) for name, part in splits.items()}
    return {
        "rows_read": len(rows),
        "duplicates_dropped": duplicates,
        # included in duplicates_dropped: same input, another label; the first row's label is kept
        "conflicts": len(conflicts),
        "conflict_rows": [
            {
                "input": " | ".join(str(dropped[f]) for f in input_fields),
                "kept": str(kept[spec.label_field]),
                "kept_at": where(kept),
                "dropped": str(dropped[spec.label_field]),
                "dropped_at": where(dropped),
            }
            for kept, dropped in conflicts[:SHOWN]
        ],
        "normalized_labels": normalized,
        **{f"{name}_rows": len(part) for name, part in splits.items()},
        **{f"{name}_label_counts": counts[name] for name in data.SPLITS},
        "rows_per_label": {label: {name: counts[name].get(label, 0) for name in data.SPLITS} for label in labels},
        # the headline's floor: always answering the most frequent training label, on the test rows
        "majority_baseline": majority_baseline(
            [r["label"] for r in splits["train"]], [r["label"] for r in splits["test"]]
        ),
        # inputs shared between splits after de-duplication: 0 unless two inputs render to one prompt
        "train_validation_overlap": len(keys["train"] & keys["validation"]),
        "train_test_overlap": len(keys["train"] & keys["test"]),
        "validation_test_overlap": len(keys["validation"] & keys["test"]),
        **lengths,
        "warnings": warnings,
    }


def prepare_free_text(cfg: DictConfig, rows: list[dict], where, input_fields: list[str]) -> dict:
    """data.task=generation: de-duplicated inputs, one seeded shuffle cut in three (no label to stratify
    by), each conversation in one split before its assistant turns become examples."""
    spec = cfg.data
    unique, duplicates = data.drop_duplicates(rows, input_fields)
    parts = data.split_rows(unique, None, spec.validation_fraction, spec.test_fraction, cfg.seed)
    made = {name: tasks.render_split(part, spec) for name, part in zip(data.SPLITS, parts)}
    splits = {name: rendered for name, (_, rendered) in made.items()}
    every_source = [row for sources, _ in made.values() for row in sources]
    lengths = token_report(cfg, every_source, [r for part in splits.values() for r in part], where)
    keys = {name: {data.prompt_key(r["prompt"]) for r in part} for name, part in splits.items()}
    with atomic_dir(cfg.paths.prepared) as out:
        for name, part in splits.items():
            data.write_jsonl(part, out / f"{name}.jsonl")
        (out / "labels.json").write_text("[]\n", encoding="utf-8")  # free text: no label set
    log.info("prepared %s free-text rows", " / ".join(f"{len(p)} {n}" for n, p in splits.items()))
    return {
        "task": "generation",
        "rows_read": len(rows),
        "duplicates_dropped": duplicates,
        **{f"{name}_rows": len(part) for name, part in splits.items()},
        # a conversation makes one example per assistant turn
        **{f"{name}_source_rows": len(part) for name, part in zip(data.SPLITS, parts)},
        "train_validation_overlap": len(keys["train"] & keys["validation"]),
        "train_test_overlap": len(keys["train"] & keys["test"]),
        "validation_test_overlap": len(keys["validation"] & keys["test"]),
        **lengths,
        "warnings": lengths.pop("warnings"),
    }


def token_report(cfg: DictConfig, source_rows: list[dict], rendered: list[dict], where) -> dict:
    """Token lengths per the base model's tokenizer: percentiles, rows over train.max_length (which
    training truncates), and a refusal naming the rows longer than the model's context (no runtime
    can take them). Skipped, saying why, when the base model is not there yet (a hand run)."""
    base = Path(cfg.paths.base_model)
    if not base.is_dir():
        reason = f"no base model at {base} (run fetch_model first) to count tokens with"
        log.warning("token lengths not measured: %s", reason)
        return {
            "token_lengths": None,
            "token_lengths_skipped": reason,
            "max_length": cfg.train.max_length,
            "rows_over_max_length": None,
            "warnings": [],
        }
    from ortune import modeling

    tokenizer = modeling.load_tokenizer(base, cfg.model.trust_remote_code)
    lengths = data.token_lengths(rendered, tokenizer)
    totals = [p + a for p, a in lengths]
    context = data.model_context(base)
    if context is not None:
        over = [(where(row), total) for row, total in zip(source_rows, totals) if total > context]
        if over:
            shown = ", ".join(f"{place} ({total} tokens)" for place, total in over[:SHOWN])
            more = f" and {len(over) - SHOWN} more" if len(over) > SHOWN else ""
            raise OrtuneError(
                f"{len(over)} row(s) are longer than the model's context of {context} tokens "
                f"({base}/config.json): {shown}{more}; shorten or remove them"
            )
    max_length = cfg.train.max_length
    long_rows = [where(row) for row, total in zip(source_rows, totals) if total > max_length]
    warnings = []
    if long_rows:
        warnings.append(
            f"{len(long_rows)} row(s) are longer than train.max_length={max_length} tokens and are "
            f"truncated in training (those that lose their whole answer teach nothing), e.g. "
            f"{', '.join(long_rows[:SHOWN])}; raise train.max_length or shorten them"
        )
        log.warning("%s", warnings[-1])
    return {
        "token_lengths": {
            "tokenizer": str(base),
            "prompt": data.percentiles([p for p, _ in lengths]),
            "answer": data.percentiles([a for _, a in lengths]),
            "total": data.percentiles(totals),
            "context": context,
        },
        "max_length": max_length,
        "rows_over_max_length": len(long_rows),
        "warnings": warnings,
    }


if __name__ == "__main__":
    stage.main("prepare_data", run, "data.json")
