"""Free text, Alpaca rows with empty inputs and multi-turn conversations, each through `make all` on the tiny
model in a fresh clone, then `make predict` (issue 21). Slow: about five minutes on 2 cores."""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import clone_project, make_output, ran_stages
from conftest import run_metrics as metrics

pytestmark = pytest.mark.slow
EVERY_STAGE = {"fetch_model", "prepare_data", "train_qlora", "merge", "build_onnx", "eval"}


def generative_rows() -> list[dict]:
    """Unique answers: numbers, sentences with punctuation, several lines, JSON."""
    rows = []
    for i in range(90):
        answer = [
            f"{1000 + i}",
            f"Could we meet at {i % 12 + 1} pm?",
            f"first line {i}\nsecond line",
            json.dumps({"id": i, "even": i % 2 == 0}),
        ][i % 4]
        rows.append({"question": f"What is the answer to question {i}?", "answer": answer})
    return rows


def alpaca_rows() -> list[dict]:
    return [
        {
            "instruction": f"Repeat the number {i}.",
            "input": "" if i % 3 else f"the number is {i}",
            "output": f"{i} {i}",
        }
        for i in range(60)
    ]


def conversations() -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": f"Hello, I am user {i}."},
                {"role": "assistant", "content": f"Hi user {i}!"},
                {"role": "user", "content": "What is my number?"},
                {"role": "assistant", "content": f"Your number is {i}."},
            ]
        }
        for i in range(40)
    ]


FIXTURES = {"gen.jsonl": generative_rows, "alpaca.jsonl": alpaca_rows, "chats.jsonl": conversations}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root, env = clone_project(tmp_path_factory, "tasks", WANDB_MODE="disabled")
    for name, rows in FIXTURES.items():
        (root / "data/raw" / name).write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    subprocess.run(["git", "add", "data/raw"], cwd=root, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "fixtures"], cwd=root, env=env, check=True)
    return root, env


def test_free_text_answers_train_ship_through_the_gate_and_print_as_text(project):
    root, _ = project
    # trained through the int4 grid (train.method=qat) and built int4 with float activations: the shipped
    # graph computes the merged model's weights, so the free-text gate (95 % identical outputs) is met
    args = (
        "ARGS=data.path=data/raw/gen.jsonl data.task=generation data.input_column=question "
        "data.output_column=answer data.template.prompt='Q: {question}\\nA: ' train.method=qat lora.dropout=0 "
        "onnx.block_size=32 onnx.accuracy_level=1 train.num_train_epochs=12"
    )
    assert ran_stages(make_output(project, "all", args)) == EVERY_STAGE
    data, evaluation, onnx = metrics(root, "data.json"), metrics(root, "eval.json"), metrics(root, "onnx.json")
    assert data["task"] == "generation" and data["rows_read"] == 90
    for key in ("exact_match", "token_f1", "chrf", "rouge_l", "bleu", "json_valid", "json_field_f1"):
        assert 0.0 <= evaluation[key] <= 1.0, key
    assert evaluation["n"] == data["test_rows"] and evaluation["max_new_tokens"] > 6
    assert evaluation["hit_token_limit"] is not None and "prompted_baseline_exact_match" in evaluation
    # what make best ranks on: the shipped model on the validation split, never the test rows
    assert evaluation["validation"]["n"] == data["validation_rows"] and "exact_match" in evaluation["ci95"]
    parity = onnx["parity"]
    assert parity["passed"] and parity["identical_outputs"] >= 0.95 and "exact_match_delta" in parity
    lines = [json.loads(line) for line in (root / "metrics/eval_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == evaluation["n"] and {"prompt", "reference", "generations", "scores"} <= set(lines[0])
    assert lines[0]["prompt"].startswith("Q: What is") and "\nA: " in lines[0]["prompt"]  # \n typed in ARGS
    answer = make_output(project, "predict", "TEXT=What is the answer to question 3?")
    task = json.loads((root / "models/onnx/ortune.json").read_text())
    assert task["task"] == "generation" and answer.strip() and answer.strip() != "?"
    make_output(project, "plots")  # the report ends with the rows, worst first
    assert "Per-row predictions (free text): all" in (root / "dvc_plots/index.html").read_text(encoding="utf-8")


def test_alpaca_rows_with_empty_inputs_run_end_to_end(project):
    root, _ = project
    args = (
        "ARGS=data.path=data/raw/alpaca.jsonl data.task=generation data.input_column=instruction "
        "data.output_column=output data.template.prompt='### Instruction:\\n{instruction}\\n### Input:\\n{input}\\n"
        "### Response:\\n' data.template.prompt_no_input='### Instruction:\\n{instruction}\\n### Response:\\n' "
        "data.template.completion='{output}' precision=fp32"
    )
    make_output(project, "all", args)
    lines = [json.loads(line) for line in (root / "metrics/eval_predictions.jsonl").read_text().splitlines()]
    with_input = [line for line in lines if "### Input:" in line["prompt"]]
    assert with_input and len(with_input) < len(lines)  # both templates reached the eval
    assert metrics(root, "onnx.json")["parity"]["passed"]
    task = json.loads((root / "models/onnx/ortune.json").read_text())
    assert task["input_field"] == "instruction" and "### Input" not in task["prompt_template"]


def test_multi_turn_conversations_train_every_assistant_turn(project):
    root, _ = project
    make_output(
        project, "all", "ARGS=data.path=data/raw/chats.jsonl data.task=generation data.format=messages precision=fp32"
    )
    data = metrics(root, "data.json")
    assert data["train_rows"] == 2 * data["train_source_rows"]  # two assistant turns per conversation
    lines = [json.loads(line) for line in (root / "metrics/eval_predictions.jsonl").read_text().splitlines()]
    # the second turn's prompt holds the first exchange, through the chat template
    assert any("Hi user" in line["prompt"] and line["reference"].startswith("Your number") for line in lines)
    assert metrics(root, "onnx.json")["parity"]["passed"] and "exact_match" in metrics(root, "eval.json")
