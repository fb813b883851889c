"""Reading, checking and splitting labelled records, and the data report (metrics/data.json)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ortune import data
from ortune.errors import OrtuneError
from ortune.records import read_records

REPO = Path(__file__).resolve().parents[1]
COOKBOOK = REPO / "tests/fixtures/dataset-classification.json"


def rows(n_per_label=10, labels=("joy", "fear", "sadness")):
    return [{"phrase": f"{label} phrase number {i}", "tone": label} for label in labels for i in range(n_per_label)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---- reading ------------------------------------------------------------------------------------------

EXPECTED = [
    {"phrase": "joy phrase number 0", "tone": "joy"},
    {"phrase": "joy phrase number 1", "tone": "joy"},
    {"phrase": "fear phrase number 0", "tone": "fear"},
    {"phrase": "fear phrase number 1", "tone": "fear"},
]


def write_every_format(folder: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(exist_ok=True)
    write_jsonl(folder / "a.jsonl", EXPECTED)
    write_jsonl(folder / "lines.json", EXPECTED)  # the CookBook's layout: JSON Lines in a .json file
    (folder / "array.json").write_text(json.dumps(EXPECTED, indent=2))
    (folder / "a.csv").write_text("phrase,tone\n" + "".join(f"{r['phrase']},{r['tone']}\n" for r in EXPECTED))
    table = pa.Table.from_pylist(EXPECTED)
    pq.write_table(table, folder / "a.parquet")
    with pa.OSFile(str(folder / "a.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def test_every_format_reads_the_same_rows_in_the_same_order(tmp_path):
    write_every_format(tmp_path)
    for name in ("a.jsonl", "lines.json", "array.json", "a.csv", "a.parquet", "a.arrow"):
        assert read_records(tmp_path / name) == EXPECTED, name


def test_the_cookbooks_json_lines_file_loads_as_it_is(make_cfg):
    import prepare_data

    records = read_records(COOKBOOK)
    assert len(records) == 24 and records[0] == {
        "phrase": "We finally booked the trip we have been dreaming about!",
        "tone": "joy",
    }
    metrics = prepare_data.run(make_cfg(f"data.path={COOKBOOK}"))
    assert metrics["rows_read"] == 24 and sorted(metrics["rows_per_label"]) == ["fear", "joy", "sadness", "surprise"]


def test_a_folder_reads_its_files_in_path_order(tmp_path):
    folder = tmp_path / "parts"
    (folder / "b").mkdir(parents=True)
    write_jsonl(folder / "b" / "2.jsonl", EXPECTED[2:])
    (folder / "1.csv").write_text("phrase,tone\n" + "".join(f"{r['phrase']},{r['tone']}\n" for r in EXPECTED[:2]))
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.jsonl").write_text("not json at all")
    assert read_records(folder) == EXPECTED
    # a folder written by Dataset.save_to_disk is that dataset, not a folder of .json/.arrow files
    import datasets

    datasets.Dataset.from_list(EXPECTED).save_to_disk(str(tmp_path / "saved"))
    assert read_records(tmp_path / "saved") == EXPECTED


def test_rows_and_their_order_do_not_change_between_runs(tmp_path):
    records = rows(50, ("joy", "fear"))
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(0, 100, 10):
        write_jsonl(folder / f"part-{i:03d}.jsonl", records[i : i + 10])
    assert read_records(folder) == records
    assert read_records(folder) == read_records(folder)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("bad.jsonl", '{"phrase": "ok", "tone": "joy"}\n{"phrase": "broken",\n', r"bad.jsonl:2: malformed JSON line"),
        ("bad.json", '{"phrase": "ok", "tone": "joy"}\n\n{"phrase": "broken",\n', r"bad.json:3: malformed JSON line"),
        (
            "bad.json",
            '[\n  {"phrase": "ok", "tone": "joy"},\n  {"phrase": "broken" "tone": 1}\n]\n',
            r"bad.json:3: invalid JSON",
        ),
        ("scalar.jsonl", '{"phrase": "ok", "tone": "joy"}\n"a string"\n', r"scalar.jsonl:2: expected a JSON object"),
        (
            "latin.jsonl",
            '{"phrase": "ok", "tone": "joy"}\n{"phrase": "caf\xe9", "tone": "joy"}\n',
            r"latin.jsonl:2: bytes that are not UTF-8",
        ),
        ("cols.csv", "phrase,tone\nok,joy\na, b,joy\n", r"cols.csv:3: 3 fields where the header has 2"),
        ("header.csv", "phrase,tone\n", r"header.csv: a header but no rows"),
        ("bad.parquet", "not parquet", r"bad.parquet: not a readable Parquet file"),
        ("missing.jsonl", None, "file not found"),
        ("a.txt", "hello", "unsupported format"),
        ("e.jsonl", "\n", "empty"),
    ],
)
def test_unreadable_inputs_name_the_file_line_and_problem(tmp_path, name, content, needle):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content.encode("latin-1" if "latin" in name else "utf-8"))
    with pytest.raises(OrtuneError, match=needle) as caught:
        read_records(path)
    assert "\n" not in str(caught.value)


def test_a_json_list_of_strings_is_a_clear_error_not_a_type_error(tmp_path):
    path = tmp_path / "phrases.json"
    path.write_text(json.dumps(["I love it", "I hate it"]))
    with pytest.raises(OrtuneError, match=r"phrases.json: a JSON list of strings, not of objects"):
        read_records(path)


def test_a_phrase_with_a_line_separator_is_one_valid_row(tmp_path):
    phrase = "first part\u2028second part\u2029and a third"
    path = write_jsonl(tmp_path / "sep.jsonl", [{"phrase": phrase, "tone": "joy"}, {"phrase": "plain", "tone": "fear"}])
    assert "\u2028" in path.read_text(encoding="utf-8")  # written raw, as json.dumps(ensure_ascii=False) does
    assert read_records(path) == [{"phrase": phrase, "tone": "joy"}, {"phrase": "plain", "tone": "fear"}]
    assert data.text_lines(f"{phrase}\r\nnext\n") == [phrase, "next", ""]


def test_csv_with_a_byte_order_mark_has_its_first_field(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("phrase,tone\r\nhello there,joy\r\n".encode("utf-8-sig"))
    records = read_records(path)
    data.check_fields(records, ["phrase", "tone"], str(path))
    assert records == [{"phrase": "hello there", "tone": "joy"}]


def test_csv_keeps_quoted_newlines_and_reads_text_as_text(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('phrase,tone\n"two\nlines",joy\n007,NA\nNone,1\n"",fear\n')
    assert read_records(path) == [
        {"phrase": "two\nlines", "tone": "joy"},
        {"phrase": "007", "tone": "NA"},
        {"phrase": "None", "tone": "1"},
        {"phrase": "", "tone": "fear"},
    ]


def test_a_folder_with_no_data_and_an_empty_folder_are_named(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(OrtuneError, match=r"no data files in this folder"):
        read_records(tmp_path)


def _without_root_file_access() -> None:
    """In the child: drop the capabilities that let root read any file (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) from the bounding set, so that the exec'd stage obeys file modes."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _prepare_without_root_access(source: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """prepare_data on `source`, by hand (not under DVC), as a user whom file modes bind."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DVC_STAGE", None)
    return subprocess.run(
        [
            sys.executable,
            "scripts/prepare_data.py",
            f"data.path={source}",
            f"paths.prepared={tmp_path}/p",
            f"paths.metrics={tmp_path}/m",
            f"paths.base_model={tmp_path}/b",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=_without_root_file_access if os.geteuid() == 0 else None,
    )


def test_an_unreadable_file_is_bad_input_exit_2_not_a_crash(tmp_path):
    source = write_jsonl(tmp_path / "secret.jsonl", rows(3, ("joy", "fear")))
    source.chmod(0o000)
    done = _prepare_without_root_access(source, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {source}: permission denied (this user cannot read it); fix its permissions, e.g. chmod a+r {source}"
    )


def test_an_unreadable_subfolder_is_bad_input_not_rows_silently_missing(tmp_path):
    folder = tmp_path / "raw"
    (folder / "locked").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", rows(3, ("joy", "fear")))
    write_jsonl(folder / "locked" / "b.jsonl", rows(3, ("sadness", "fear")))
    (folder / "locked").chmod(0o000)
    try:
        done = _prepare_without_root_access(folder, tmp_path)
    finally:
        (folder / "locked").chmod(0o755)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: data.path={folder}: cannot list {folder / 'locked'} (Permission denied); fix its "
        f"permissions, e.g. chmod -R a+rX {folder / 'locked'}"
    )


# ---- checking and splitting ---------------------------------------------------------------------------


def test_missing_template_field_names_the_field(tmp_path):
    with pytest.raises(OrtuneError, match="no field 'phrase'"):
        data.check_fields([{"text": "hi", "tone": "joy"}], ["phrase", "tone"], "x.jsonl")


def test_a_missing_field_in_a_json_lines_row_names_its_line(tmp_path):
    path = tmp_path / "gap.jsonl"
    path.write_text('{"phrase": "a", "tone": "joy"}\n\n{"phrase": "b"}\n')
    with pytest.raises(OrtuneError, match=rf"^{path}:3: row 2 has no field 'tone' \(missing or null\)"):
        data.check_fields(read_records(path), ["phrase", "tone"], str(path))


def test_a_field_name_hiding_a_character_is_shown_escaped_and_named(tmp_path):
    # a non-breaking space after the header's name (a spreadsheet export), a byte-order mark inside a key
    csv = tmp_path / "nbsp.csv"
    csv.write_text("phrase\u00a0,tone\nhello there,joy\n", encoding="utf-8")
    with pytest.raises(OrtuneError) as caught:
        data.check_fields(read_records(csv), ["phrase", "tone"], str(csv))
    assert str(caught.value) == (
        f"{csv}: row 1 has no field 'phrase' named by data.template, but 'phrase\\xa0': spaces or invisible "
        "characters (a byte-order mark, a non-breaking space) around the name; rename that field 'phrase' in the file"
    )
    jsonl = write_jsonl(tmp_path / "bom.jsonl", [{"\ufefftext": "hello", "tone": "joy"}])
    with pytest.raises(OrtuneError, match=r"\(its fields: tone, '\\ufefftext'\); fix data.template"):
        data.check_fields(read_records(jsonl), ["phrase", "tone"], str(jsonl))


def test_duplicates_are_dropped_before_the_split():
    records = rows(5) + [{"phrase": "joy phrase number 1", "tone": "joy"}]
    unique, dropped = data.drop_duplicates(records, ["phrase"])
    assert dropped == 1 and len(unique) == 15


def test_split_is_stratified_disjoint_and_seeded():
    records = rows(20, ("joy", "fear", "sadness", "surprise"))
    train, validation, test = data.split_rows(records, "tone", 0.15, 0.3, seed=1)
    assert data.label_counts(test, "tone") == {"fear": 6, "joy": 6, "sadness": 6, "surprise": 6}
    assert data.label_counts(validation, "tone") == {"fear": 3, "joy": 3, "sadness": 3, "surprise": 3}
    phrases = [{r["phrase"] for r in split} for split in (train, validation, test)]
    assert not phrases[0] & phrases[1] and not phrases[0] & phrases[2] and not phrases[1] & phrases[2]
    assert len(train) + len(validation) + len(test) == len(records)
    again = data.split_rows(rows(20, ("joy", "fear", "sadness", "surprise")), "tone", 0.15, 0.3, seed=1)
    assert again == (train, validation, test)
    assert data.split_rows(records, "tone", 0.15, 0.3, seed=2)[2] != test


def test_split_without_a_label_field_is_a_seeded_shuffle_cut_in_three():
    # free-text answers (a generation task): every answer unique, so no label could stratify them
    records = [{"question": f"q{i}", "answer": f"answer {i}"} for i in range(40)]
    train, validation, test = data.split_rows(records, None, 0.15, 0.3, seed=1)
    assert (len(train), len(validation), len(test)) == (22, 6, 12)
    assert sorted(r["question"] for r in train + validation + test) == sorted(r["question"] for r in records)
    assert data.split_rows(list(records), None, 0.15, 0.3, seed=1) == (train, validation, test)
    assert data.split_rows(list(records), None, 0.15, 0.3, seed=2)[2] != test
    with pytest.raises(OrtuneError, match="the data has 2 row"):
        data.split_rows(records[:2], None, 0.15, 0.3, seed=1)


def test_each_split_gets_a_row_of_each_label_and_train_keeps_one():
    train, validation, test = data.split_rows(rows(3, ("joy", "fear")), "tone", 0.15, 0.3, seed=0)
    for split in (train, validation, test):
        assert data.label_counts(split, "tone") == {"fear": 1, "joy": 1}
    with pytest.raises(OrtuneError, match="label 'joy' has 2 row"):
        data.split_rows(rows(3, ("fear",)) + rows(2, ("joy",)), "tone", 0.15, 0.3, seed=0)


def test_single_class_is_refused():
    with pytest.raises(OrtuneError, match="only one label"):
        data.split_rows(rows(5, ("joy",)), "tone", 0.15, 0.3, seed=0)


def test_percentiles_are_nearest_rank_values():
    assert data.percentiles(list(range(10, 0, -1))) == {"p50": 5, "p90": 9, "p95": 10, "p99": 10, "max": 10}
    assert data.percentiles([7]) == {"p50": 7, "p90": 7, "p95": 7, "p99": 7, "max": 7}


# ---- the stage and its report -------------------------------------------------------------------------


def test_prepare_data_stage_writes_splits_and_metrics(make_cfg, tmp_path):
    import prepare_data

    source = tmp_path / "in.jsonl"
    records = rows(10, ("joy", "fear")) + [{"phrase": "joy phrase number 3", "tone": "joy"}]
    write_jsonl(source, records)
    cfg = make_cfg(f"data.path={source}", "data.test_fraction=0.2")
    metrics = prepare_data.run(cfg)
    assert metrics["rows_read"] == 21 and metrics["duplicates_dropped"] == 1 and metrics["conflicts"] == 0
    assert metrics["test_label_counts"] == {"fear": 2, "joy": 2} and metrics["train_test_overlap"] == 0
    assert metrics["validation_label_counts"] == {"fear": 2, "joy": 2} and metrics["train_validation_overlap"] == 0
    each = {"train": 6, "validation": 2, "test": 2}
    assert metrics["rows_per_label"] == {"fear": each, "joy": each}
    for name, count in each.items():
        assert len(data.read_jsonl(tmp_path / "prepared" / f"{name}.jsonl")) == 2 * count
    assert metrics["majority_baseline"] == 0.5 and metrics["normalized_labels"] == {} and metrics["warnings"] == []
    # no base model in tmp_path yet: lengths are not guessed, and the report says why
    assert metrics["token_lengths"] is None and "run fetch_model first" in metrics["token_lengths_skipped"]
    first = data.read_jsonl(tmp_path / "prepared" / "train.jsonl")[0]
    assert first["prompt"].startswith("### Text: ") and first["prompt"].endswith("### The tone is:\n")
    assert first["completion"] == first["label"]


def test_labels_differing_by_case_or_space_are_one_class_and_reported(make_cfg, tmp_path):
    import prepare_data

    records = rows(6, ("joy", "fear"))
    records[1]["tone"] = records[2]["tone"] = "Joy"
    records[3]["tone"] = "joy "
    source = write_jsonl(tmp_path / "cases.jsonl", records)
    metrics = prepare_data.run(make_cfg(f"data.path={source}"))
    assert metrics["normalized_labels"] == {"Joy": "joy", "joy ": "joy"}
    each = {"train": 3, "validation": 1, "test": 2}
    assert metrics["rows_per_label"] == {"fear": each, "joy": each}
    prepared = [r for name in data.SPLITS for r in data.read_jsonl(tmp_path / "prepared" / f"{name}.jsonl")]
    assert {r["label"] for r in prepared} == {r["completion"] for r in prepared} == {"joy", "fear"}
    # data.labels, when given, decides the spelling
    metrics = prepare_data.run(make_cfg(f"data.path={source}", "data.labels=[Joy,fear]"))
    assert metrics["normalized_labels"] == {"joy": "Joy", "joy ": "Joy"}


def test_a_label_the_answer_parser_cannot_return_is_refused(make_cfg, tmp_path):
    import prepare_data

    source = write_jsonl(tmp_path / "punct.jsonl", rows(3, ("joy!", "fear")))
    with pytest.raises(OrtuneError, match=r"label 'joy!' can never be predicted"):
        prepare_data.run(make_cfg(f"data.path={source}"))


def test_conflicting_labels_are_counted_and_the_kept_one_is_named(make_cfg, tmp_path):
    import prepare_data

    records = rows(6, ("joy", "fear")) + [
        {"phrase": "joy phrase number 2", "tone": "fear"},
        {"phrase": "fear phrase number 0", "tone": "fear"},
    ]
    source = write_jsonl(tmp_path / "conflict.jsonl", records)
    metrics = prepare_data.run(make_cfg(f"data.path={source}"))
    assert metrics["duplicates_dropped"] == 2 and metrics["conflicts"] == 1
    assert metrics["conflict_rows"] == [
        {
            "input": "joy phrase number 2",
            "kept": "joy",
            "kept_at": f"{source}:3: row 3",
            "dropped": "fear",
            "dropped_at": f"{source}:13: row 13",
        }
    ]
    prepared = [r for name in data.SPLITS for r in data.read_jsonl(tmp_path / "prepared" / f"{name}.jsonl")]
    assert [r["label"] for r in prepared if "joy phrase number 2" in r["prompt"]] == ["joy"]


def test_too_few_rows_per_label_warns_with_the_counts(make_cfg, tmp_path, caplog):
    import prepare_data

    source = write_jsonl(tmp_path / "six.jsonl", rows(3, ("joy", "fear")))
    with caplog.at_level(logging.WARNING, logger="ortune"):
        metrics = prepare_data.run(make_cfg(f"data.path={source}"))
    expected = [
        "label 'fear' has only 3 rows (1 train, 1 validation, 1 test): too few to learn it or to measure it; "
        "add rows (at least 10 per label)",
        "label 'joy' has only 3 rows (1 train, 1 validation, 1 test): too few to learn it or to measure it; "
        "add rows (at least 10 per label)",
    ]
    assert metrics["warnings"] == expected
    assert all(line in caplog.text for line in expected)


def test_a_directory_as_data_path_is_read_not_file_not_found(make_cfg, tmp_path):
    import prepare_data

    folder = tmp_path / "raw"
    folder.mkdir()
    write_jsonl(folder / "joy.jsonl", rows(5, ("joy",)))
    write_jsonl(folder / "fear.jsonl", rows(5, ("fear",)))
    metrics = prepare_data.run(make_cfg(f"data.path={folder}"))
    assert metrics["rows_read"] == 10 and metrics["rows_per_label"]["joy"] == {"train": 2, "validation": 1, "test": 2}


# ---- lengths in tokens, per the base model's tokenizer ------------------------------------------------

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 256,
    "vocab_size": 400,
}


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, tiny_texts):
    from ortune import modeling

    out = tmp_path_factory.mktemp("data-base") / "base_model"
    modeling.build_tiny_phi3(OmegaConf.create(TINY), tiny_texts, seed=0, out_dir=out)
    return out


def test_token_lengths_are_reported_per_the_models_tokenizer(make_cfg, tmp_path, base_model):
    import prepare_data
    from ortune import modeling

    records = rows(10, ("joy", "fear"))
    records[4]["phrase"] = " ".join(["a long phrase"] * 12)
    source = write_jsonl(tmp_path / "in.jsonl", records)
    metrics = prepare_data.run(make_cfg(f"data.path={source}", f"paths.base_model={base_model}", "train.max_length=40"))
    tokenizer = modeling.load_tokenizer(base_model)
    prompts = [f"### Text: {r['phrase']}\n### The tone is:\n" for r in records]
    prompt_tokens = sorted(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
    lengths = metrics["token_lengths"]
    assert lengths["prompt"]["max"] == prompt_tokens[-1] and lengths["prompt"]["p50"] == prompt_tokens[9]
    assert lengths["context"] == 256 and lengths["tokenizer"] == str(base_model)
    # "joy"/"fear" and the end token: 2 or 3 tokens whatever the merges
    assert 2 <= lengths["answer"]["p50"] <= lengths["answer"]["max"] <= 3
    long_rows = sum(p + lengths["answer"]["max"] > 40 for p in prompt_tokens)
    assert metrics["rows_over_max_length"] == 1 == long_rows
    assert metrics["warnings"][0].startswith("1 row(s) are longer than train.max_length=40 tokens")
    assert f"{source}:5: row 5" in metrics["warnings"][0]


def test_a_row_longer_than_the_models_context_is_refused_by_line(make_cfg, tmp_path, base_model):
    import prepare_data

    records = rows(10, ("joy", "fear"))
    records[7]["phrase"] = "x" * 100_000
    source = write_jsonl(tmp_path / "huge.jsonl", records)
    with pytest.raises(
        OrtuneError,
        match=rf"1 row\(s\) are longer than the model's context of 256 tokens "
        rf"\({base_model}/config.json\): {source}:8: row 8 \(\d+ tokens\); "
        "shorten or remove them",
    ):
        prepare_data.run(make_cfg(f"data.path={source}", f"paths.base_model={base_model}"))


def test_a_held_out_row_longer_than_the_models_context_is_refused_by_line_before_any_runtime(
    make_cfg, tmp_path, base_model
):
    """eval.path rows meet no prepare_data: without the check, onnxruntime-genai stops the whole eval with
    `max_length (...) cannot be greater than model context_length` and names no row."""
    import shutil

    import eval as eval_stage
    import prepare_data

    source = write_jsonl(tmp_path / "in.jsonl", rows(10, ("joy", "fear")))
    common = (f"paths.base_model={base_model}", f"data.path={source}")
    prepare_data.run(make_cfg(*common))
    onnx = tmp_path / "onnx"  # what eval reads before loading a runtime: the context and the tokenizer
    onnx.mkdir()
    (onnx / "genai_config.json").write_text(json.dumps({"model": {"context_length": 256}}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_model / name, onnx / name)
    held_out = tmp_path / "heldout.jsonl"
    held_out.write_text(
        '{"phrase": "short", "tone": "joy"}\n\n{"phrase": "' + "x " * 300 + '", "tone": "fear"}\n', encoding="utf-8"
    )
    cfg = make_cfg(*common, f"eval.path={held_out}", "eval.compare=[]", f"paths.onnx={onnx}")
    with pytest.raises(
        OrtuneError,
        match=rf"^eval.path: 1 row\(s\) have a prompt that, with the 6 tokens of the answer \(eval.max_new_tokens\), "
        rf"is over the model's context of 256 tokens \({onnx}/genai_config.json\): {held_out}:3: row 2 "
        r"\(\d+ tokens\); shorten or remove them$",
    ):
        eval_stage.run(cfg)
    # the prepared split names its lines too
    cfg = make_cfg(*common, "eval.compare=[]", f"paths.onnx={onnx}", "eval.max_new_tokens=250")
    with pytest.raises(OrtuneError, match=rf"{tmp_path}/prepared/test.jsonl:1: row 1 \(\d+ tokens\)"):
        eval_stage.run(cfg)


def test_a_folder_dataset_has_a_digest_for_the_model_card(tmp_path):
    from ortune import model_card

    folder = tmp_path / "raw"
    (folder / "b").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", EXPECTED[:2])
    write_jsonl(folder / "b" / "c.jsonl", EXPECTED[2:])
    first = model_card.sha256(folder)
    assert len(first) == 64 and model_card.sha256(folder) == first
    write_jsonl(folder / "b" / "c.jsonl", EXPECTED[3:])
    second = model_card.sha256(folder)
    assert second != first
    (folder / "b" / "c.jsonl").rename(folder / "b" / "d.jsonl")  # same bytes, another file name
    assert model_card.sha256(folder) != second


def _prepare_peak_mb(tmp_path: Path, count: int) -> int:
    """prepare_data in a fresh process on `count` generated rows (4 labels, ~50-character phrases, all
    distinct): that process's peak resident memory, in MB."""
    source = tmp_path / f"rows{count}.jsonl"
    tones = ("joy", "fear", "anger", "sadness")
    with open(source, "w", encoding="utf-8") as handle:
        for i in range(count):
            handle.write(json.dumps({"phrase": f"a quiet evening by the river, row {i}", "tone": tones[i % 4]}) + "\n")
    out = tmp_path / str(count)
    probe = (
        "import re, sys; sys.path.insert(0, 'scripts'); from ortune import config; import prepare_data; "
        "cfg = config.load('prepare_data', sys.argv[1:]); prepare_data.run(cfg); "
        "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)"
    )
    overrides = [f"data.path={source}", f"paths.base_model={tmp_path / 'none'}"]
    overrides += [f"paths.{name}={out / name}" for name in ("prepared", "metrics")]
    done = subprocess.run(
        [sys.executable, "-c", probe, *overrides], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len((out / "prepared" / "train.jsonl").read_text().splitlines()) > count // 2
    return int(done.stdout.split()[-1])


@pytest.mark.slow
def test_prepare_data_memory_grows_by_a_fraction_of_a_kilobyte_per_row(tmp_path):
    """The rows are read a batch at a time and never all held: 200,000 more rows cost well under 100 MB.
    Holding every row as a dict cost about 1 KB per row (docs/data.md, "How large a file")."""
    small, large = _prepare_peak_mb(tmp_path, 50_000), _prepare_peak_mb(tmp_path, 250_000)
    assert large - small < 100, f"{small} MB for 50,000 rows, {large} MB for 250,000"
