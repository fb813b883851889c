"""Any text task (issue 21): free-text answers, Alpaca's optional input, multi-turn conversations, templates
typed on the command line, the token budget and the baseline question. Each finding of the issue has a test
here that failed on the code before it: fast, on in-memory or tmp files, no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortune import config, data, tasks
from ortune.errors import OrtuneError
from ortune.pipeline import split_overrides

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def qa_rows(n: int = 30) -> list[dict]:
    """Unique answers, with punctuation, several lines and JSON: everything a label check refuses."""
    rows = []
    for i in range(n):
        answer = [f"{1000 + i}", f"Could we meet at {i} pm?", f"line one {i}\nline two", json.dumps({"id": i})][i % 4]
        rows.append({"question": f"question number {i}?", "answer": answer})
    return rows


GENERATION = ("data.task=generation", "data.input_column=question", "data.output_column=answer")


def test_unique_and_punctuated_answers_prepare_as_free_text(make_cfg, tmp_path):
    import prepare_data

    source = write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    # as classification, today's refusal stays: one row per "label" cannot be stratified
    with pytest.raises(OrtuneError, match="label"):
        prepare_data.run(make_cfg(f"data.path={source}", *GENERATION[1:]))
    metrics = prepare_data.run(make_cfg(f"data.path={source}", *GENERATION))
    assert metrics["task"] == "generation" and metrics["rows_read"] == 30
    prepared = tmp_path / "prepared"
    rows = [r for name in ("train", "validation", "test") for r in data.read_jsonl(prepared / f"{name}.jsonl")]
    assert sorted(r["completion"] for r in rows) == sorted(r["answer"] for r in qa_rows())
    assert all("label" not in r for r in rows) and json.loads((prepared / "labels.json").read_text()) == []


def test_free_text_split_is_seeded_and_random(make_cfg, tmp_path):
    import prepare_data

    source = write_jsonl(tmp_path / "qa.jsonl", qa_rows(60))
    prepare_data.run(make_cfg(f"data.path={source}", *GENERATION))
    first = (tmp_path / "prepared/test.jsonl").read_text()
    prepare_data.run(make_cfg(f"data.path={source}", *GENERATION))
    assert (tmp_path / "prepared/test.jsonl").read_text() == first
    prepare_data.run(make_cfg(f"data.path={source}", *GENERATION, "seed=7"))
    assert (tmp_path / "prepared/test.jsonl").read_text() != first


ALPACA = (
    "data.task=generation",
    "data.input_column=instruction",
    "data.output_column=output",
    "data.template.prompt='### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n'",
    "data.template.prompt_no_input='### Instruction:\\n{instruction}\\n\\n### Response:\\n'",
    "data.template.completion='{output}'",
)


def test_alpaca_rows_with_an_empty_input_render_without_it(make_cfg):
    spec = make_cfg(*ALPACA).data
    rows = [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        {"instruction": "Name a colour.", "output": "blue"},  # no input at all
        {"instruction": "Say hi.", "input": None, "output": "hi"},
    ]
    tasks.check_rows(rows, spec, "alpaca.jsonl")  # today: "row 1 has an empty 'input'"
    prompts = [tasks.render_row(r, spec)["prompt"] for r in rows]
    assert prompts[0] == "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    assert prompts[1] == "### Instruction:\nTranslate.\n\n### Input:\nbonjour\n\n### Response:\n"
    assert "### Input" not in prompts[2] + prompts[3]
    # an empty instruction (a required field) is still refused, by row
    with pytest.raises(OrtuneError, match="row 1 has an empty 'instruction'"):
        tasks.check_rows([{"instruction": " ", "input": "x", "output": "y"}], spec, "alpaca.jsonl")
    # rows differing only in the optional input are different inputs (neither dropped as a duplicate)
    kept, dropped = data.drop_duplicates(rows[:2] + [{**rows[1], "input": "merci"}], data.input_output_fields(spec)[0])
    assert dropped == 0 and len(kept) == 3


def test_prompt_no_input_must_be_the_prompt_without_optional_fields(make_cfg):
    spec = make_cfg(*ALPACA[:-2], "data.template.prompt_no_input='{other}'").data
    with pytest.raises(OrtuneError, match="prompt_no_input names other"):
        tasks.optional_fields(spec)


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
]
MESSAGES = ("data.task=generation", "data.format=messages")


def test_a_conversation_trains_every_assistant_turn_once(make_cfg):
    spec = make_cfg(*MESSAGES).data
    tasks.check_rows([{"messages": CONVERSATION}], spec, "chat.jsonl")  # today: "'messages' is a list, not text"
    made = tasks.render_rows({"messages": CONVERSATION}, spec)
    assert [m["completion"] for m in made] == [[CONVERSATION[2]], [CONVERSATION[4]]]
    # each example's prompt is every turn before its answer: loss falls on that answer alone (completion-only)
    assert made[0]["prompt"] == CONVERSATION[:2] and made[1]["prompt"] == CONVERSATION[:4]


@pytest.mark.parametrize(
    ("turns", "problem"),
    [
        ("hello", "non-empty list of turns"),
        ([{"role": "user", "content": "hi"}], "no non-empty assistant turn"),
        ([{"role": "bot", "content": "hi"}], "turn 1"),
        ([{"role": "assistant", "content": "hi"}], "user turn before"),
    ],
)
def test_a_bad_conversation_is_named_by_row(make_cfg, turns, problem):
    with pytest.raises(OrtuneError, match=problem):
        tasks.check_rows([{"messages": turns}], make_cfg(*MESSAGES).data, "chat.jsonl")


def test_messages_need_the_generation_task(make_cfg):
    with pytest.raises(OrtuneError, match="data.format=messages .* set data.task=generation"):
        make_cfg("data.format=messages")


def test_a_conversation_stays_in_one_split(make_cfg, tmp_path):
    import prepare_data

    conversations = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] * 2}
        for i in range(20)
    ]
    source = write_jsonl(tmp_path / "chat.jsonl", conversations)
    metrics = prepare_data.run(make_cfg(f"data.path={source}", *MESSAGES))
    assert metrics["train_rows"] == 2 * metrics["train_source_rows"]
    splits = {n: data.read_jsonl(tmp_path / f"prepared/{n}.jsonl") for n in ("train", "validation", "test")}
    firsts = {n: {r["prompt"][0]["content"] for r in rows} for n, rows in splits.items()}
    assert not (firsts["train"] & firsts["test"]) and not (firsts["train"] & firsts["validation"])


def test_a_newline_escape_typed_in_args_reaches_the_prompt_as_a_newline(tmp_path):
    # make all ARGS="..." -> split_overrides -> Hydra composition -> the config every stage validates
    overrides = split_overrides("data.template.prompt='Question: {phrase}\\nAnswer: ' model=tiny-phi3")
    assert overrides[0] == "data.template.prompt='Question: {phrase}\\nAnswer: '"
    composed = config.compose(overrides, config_dir=REPO / "conf")
    assert composed["data"]["template"]["prompt"] == "Question: {phrase}\\nAnswer: "  # params.yaml: as typed
    cfg = config.validate(composed, "test")
    assert cfg.data.template.prompt == "Question: {phrase}\nAnswer: "
    assert tasks.render_row({"phrase": "p", "tone": "joy"}, cfg.data)["prompt"] == "Question: p\nAnswer: "
    # a doubled backslash keeps one, literally
    cfg = config.validate(config.compose(["model=tiny-phi3", r"data.template.prompt='a\\n{phrase}'"]), "test")
    assert cfg.data.template.prompt == "a\\n{phrase}"


def test_the_baseline_question_fits_the_dataset(make_cfg):
    assert "tone" in make_cfg().eval.baseline_prompt
    extract = make_cfg("data=extract")
    assert "tone" not in extract.eval.baseline_prompt.lower() and extract.data.task == "generation"
    assert make_cfg().data.task == "classification"  # the tone default is unchanged


def test_the_token_budget_fits_the_training_answers(make_cfg, tmp_path):
    from ortune import freetext

    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx/ortune.json").write_text(json.dumps({"max_new_tokens": 40}))
    assert freetext.new_tokens(make_cfg(*GENERATION)) == 50  # 40 + a quarter
    assert freetext.new_tokens(make_cfg()) == 6  # classification: today's budget
    assert freetext.new_tokens(make_cfg(*GENERATION, "eval.max_new_tokens=12")) == 12
    (tmp_path / "onnx/ortune.json").write_text(json.dumps({"max_new_tokens": 4}))
    assert freetext.new_tokens(make_cfg(*GENERATION)) == 12  # at least 8 more


def test_the_free_text_summary_scores_every_runtime_and_counts_cut_generations():
    from ortune import freetext

    rows = [{"prompt": "p1", "completion": '{"a":1}'}, {"prompt": "p2", "completion": '{"a":2}'}]
    speed = {"ttft_ms": 1.0, "ms_per_token": 1.0, "tokens_per_second": 1.0, "peak_memory_mb": 1.0}
    results = {
        "onnx": {
            "generations": ['{"a":1}', '{"a":3'],
            "new_tokens": [5, 8],
            "generated_tokens": 13,
            "model_size_mb": 1.0,
            **speed,
        },
        "merged": {
            "generations": ['{"a":1}', '{"a":2}'],
            "new_tokens": [5, 5],
            "generated_tokens": 10,
            "model_size_mb": 2.0,
            **speed,
        },
    }
    metrics, per_row = freetext.summarize(rows, results, max_new_tokens=8)
    assert metrics["exact_match"] == 0.5 and metrics["json_valid"] == 0.5 and metrics["hit_token_limit"] == 1
    assert metrics["quantization_identical"] == 0.5 and metrics["quantization_exact_match_delta"] == -0.5
    lines = freetext.prediction_rows(rows, ["p1", "p2"], results, per_row)
    assert lines[1]["generations"] == {"onnx": '{"a":3', "merged": '{"a":2}'} and lines[1]["reference"] == '{"a":2}'
    assert freetext.worst_first(lines)[0]["prompt"] == "p2"
