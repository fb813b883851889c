"""Reading, checking and splitting labelled records."""

from __future__ import annotations

import json

import pytest

from ortune import data
from ortune.errors import OrtuneError


def rows(n_per_label=10, labels=("joy", "fear", "sadness")):
    return [{"phrase": f"{label} phrase number {i}", "tone": label} for label in labels for i in range(n_per_label)]


def test_reads_jsonl_json_csv_and_parquet_the_same(tmp_path):
    expected = rows(2)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in expected))
    (tmp_path / "a.json").write_text(json.dumps(expected))
    (tmp_path / "a.csv").write_text("phrase,tone\n" + "".join(f"{r['phrase']},{r['tone']}\n" for r in expected))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(expected), tmp_path / "a.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        assert data.read_records(tmp_path / f"a.{suffix}") == expected, suffix


def test_malformed_line_is_reported_with_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"phrase": "ok", "tone": "joy"}\n{"phrase": "broken",\n')
    with pytest.raises(OrtuneError, match=r"bad.jsonl:2: malformed JSON"):
        data.read_records(path)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [("missing.jsonl", None, "file not found"), ("a.txt", "hello", "unsupported format"), ("e.jsonl", "\n", "empty")],
)
def test_unreadable_inputs_name_the_problem(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(OrtuneError, match=needle):
        data.read_records(path)


def test_missing_template_field_names_the_field(tmp_path):
    with pytest.raises(OrtuneError, match="no field 'phrase'"):
        data.check_fields([{"text": "hi", "tone": "joy"}], ["phrase", "tone"], "x.jsonl")


def test_duplicates_are_dropped_before_the_split():
    records = rows(5) + [{"phrase": "joy phrase number 1", "tone": "joy"}]
    unique, dropped = data.drop_duplicates(records, ["phrase"])
    assert dropped == 1 and len(unique) == 15


def test_split_is_stratified_disjoint_and_seeded():
    records = rows(20, ("joy", "fear", "sadness", "surprise"))
    train, evaluation = data.stratified_split(records, "tone", 0.3, seed=1)
    assert data.label_counts(evaluation, "tone") == {"fear": 6, "joy": 6, "sadness": 6, "surprise": 6}
    assert not {r["phrase"] for r in train} & {r["phrase"] for r in evaluation}
    assert len(train) + len(evaluation) == len(records)
    again, _ = data.stratified_split(rows(20, ("joy", "fear", "sadness", "surprise")), "tone", 0.3, seed=1)
    assert again == train


def test_single_class_is_refused():
    with pytest.raises(OrtuneError, match="only one label"):
        data.stratified_split(rows(5, ("joy",)), "tone", 0.3, seed=0)


def test_prepare_data_stage_writes_splits_and_metrics(make_cfg, tmp_path):
    import prepare_data

    source = tmp_path / "in.jsonl"
    records = rows(10, ("joy", "fear")) + [{"phrase": "joy phrase number 3", "tone": "joy"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = make_cfg(f"data.path={source}", "data.eval_fraction=0.2")
    metrics = prepare_data.run(cfg)
    assert metrics["rows_read"] == 21 and metrics["duplicates_dropped"] == 1
    assert metrics["eval_label_counts"] == {"fear": 2, "joy": 2} and metrics["train_eval_overlap"] == 0
    assert metrics["majority_baseline"] == 0.5
    first = data.read_jsonl(tmp_path / "prepared" / "train.jsonl")[0]
    assert first["prompt"].startswith("### Text: ") and first["prompt"].endswith("### The tone is:\n")
    assert first["completion"] == first["label"]
