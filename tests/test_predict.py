"""The apps on a built model: scripts/predict.py (phrase, file, stdin), scripts/chat.py, their make
targets, their startup (no torch), and, slow, labels from a model the real pipeline trained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import build_onnx
from export_helpers import REPO, make_project, stage_cfg
from ortune.metrics import parse_label

ENV = {**os.environ, "WANDB_MODE": "disabled"}
ENV.pop("DVC_STAGE", None)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_texts):
    root = make_project(tmp_path_factory.mktemp("predict"), tiny_texts, seed=11)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        build_onnx.run(stage_cfg(root, "precision=fp32", "onnx.parity_prompts=4"))
    finally:
        os.chdir(cwd)
    return root / "onnx"


def run(*args: str, stdin: str | None = None, script: str = "scripts/predict.py") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=ENV, input=stdin, capture_output=True, text=True)


def expected_label(model_dir: Path, phrase: str) -> str:
    """What the shipped model says, through the library: the app must print exactly this."""
    from ortune.generation import OnnxGenerator

    task = json.loads((model_dir / "ortune.json").read_text())
    text = OnnxGenerator(model_dir).generate(task["prompt_template"].format(phrase=phrase), task["max_new_tokens"]).text
    return parse_label(text, task["labels"]) or "?"


def test_one_phrase_prints_its_label(model):
    phrase = "cricket is a wonderful sport!"
    done = run("--model", str(model), phrase)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_label(model, phrase) + "\n"


def test_a_file_and_stdin_print_one_label_per_phrase(model, tmp_path):
    phrases = ["I lost my keys again", "We won the cup!", "There is a spider in my bed"]
    (tmp_path / "phrases.txt").write_text("\n".join(phrases[:2]) + "\n\n" + phrases[2] + "\n")
    expected = "".join(f"{expected_label(model, p)}\t{p}\n" for p in phrases)
    from_file = run("--model", str(model), "--file", str(tmp_path / "phrases.txt"))
    from_stdin = run("--model", str(model), stdin="\n".join(phrases) + "\n")
    assert from_file.returncode == from_stdin.returncode == 0
    assert from_file.stdout == from_stdin.stdout == expected


def test_show_prints_the_raw_generation(model):
    done = run("--model", str(model), "--show", "We won the cup!")
    label, raw = done.stdout.rstrip("\n").split("\t")
    assert label == expected_label(model, "We won the cup!") and raw.startswith("'")


@pytest.mark.parametrize(
    ("args", "stdin", "needle"),
    [
        (("--model", "/nonexistent/model", "hi"), None, "no ortune.json"),
        (("--file", "/nonexistent.txt"), None, "--file /nonexistent.txt: no such file"),
        (("hi", "--file", "x.txt"), None, "not both"),
        ((), "\n \n", "no phrases"),
    ],
)
def test_bad_input_is_one_line_and_status_2(model, args, stdin, needle):
    args = args if "--model" in args else ("--model", str(model), *args)
    done = run(*args, stdin=stdin)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error:") and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_phrase_with_a_line_separator_stays_one_phrase(model, tmp_path):
    phrase = "We won\u2028the cup!"  # U+2028 is text inside a phrase, not the end of a line
    (tmp_path / "sep.txt").write_text(f"{phrase}\nI lost my keys\n", encoding="utf-8")
    done = run("--model", str(model), "--file", str(tmp_path / "sep.txt"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{expected_label(model, phrase)}\t{phrase}\n{expected_label(model, 'I lost my keys')}\tI lost my keys\n"


def test_a_phrase_over_the_models_context_names_its_line_not_a_traceback(model, tmp_path):
    (tmp_path / "long.txt").write_text("We won the cup!\n\n" + "ha " * 300_000 + "\n", encoding="utf-8")
    done = run("--model", str(model), "--file", str(tmp_path / "long.txt"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stdout == f"{expected_label(model, 'We won the cup!')}\tWe won the cup!\n"
    context = json.loads((model / "genai_config.json").read_text())["model"]["context_length"]
    assert re.fullmatch(rf"error: {tmp_path}/long.txt:3: the phrase makes a prompt of \d+ tokens; with the \d+ of the "
                        rf"answer that is over the model's context of {context}; shorten the phrase\n", done.stderr)


def test_predict_starts_fast_without_torch_or_transformers(model):
    probe = (
        "import json, sys, time; started = time.perf_counter(); sys.path.insert(0, 'scripts'); import predict; "
        f"status = predict.main(['--model', {str(model)!r}, 'hello there']); "
        "heavy = sorted(m for m in ('torch', 'transformers', 'hydra', 'omegaconf') if m in sys.modules); "
        "print(json.dumps({'status': status, 'heavy': heavy, 'seconds': time.perf_counter() - started}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == 0 and report["heavy"] == []
    assert report["seconds"] < 1.0, f"import + load + classify took {report['seconds']:.2f} s"
    started = time.perf_counter()
    assert run("--model", str(model), "hello").returncode == 0
    assert time.perf_counter() - started < 2.5  # the whole process, interpreter start included


def test_chat_renders_the_chat_template_like_training(model):
    from ortune.app import App
    from ortune.modeling import load_tokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is it safe?"},
                {"role": "assistant", "content": "fear"}, {"role": "user", "content": "We won!"}]
    expected = load_tokenizer(model.parent / "merged").apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert App(model).chat_prompt(messages) == expected


def test_chat_answers_each_line_and_resets(model):
    done = run("--model", str(model), "--max-new-tokens", "4", stdin="hello\n/reset\nwe won the cup\n/quit\nnever read\n",
               script="scripts/chat.py")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2  # one streamed reply per message; /reset and /quit print nothing


def test_make_predict_and_make_chat(model):
    make = ["make", "-s", "-o", ".venv/.installed"]
    phrase = 'it\'s a "wonderful" day, isn\'t it?'
    done = subprocess.run([*make, "predict", f"TEXT={phrase}", f"MODEL={model}"], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected_label(model, phrase) + "\n"
    chat = subprocess.run([*make, "chat", f"MODEL={model}"], cwd=REPO, env=ENV, input="hello\n", capture_output=True, text=True)
    assert chat.returncode == 0 and len(chat.stdout.splitlines()) == 1, chat.stderr
    targets = subprocess.run(["make", "help"], cwd=REPO, env=ENV, capture_output=True, text=True).stdout
    assert "make predict" in targets and "make chat" in targets


@pytest.mark.slow
def test_a_model_the_pipeline_trained_labels_phrases(tmp_path):
    """fetch -> prepare -> train -> merge -> build_onnx (int4, parity gate on) with the default settings,
    then predict on eval phrases: the labels are right, and int4 agrees with PyTorch >= 98 %."""
    paths = [f"paths.{name}={tmp_path / name}" for name in ("base_model", "prepared", "adapter", "merged", "onnx", "metrics", "plots")]
    for stage in ("fetch_model", "prepare_data", "train_qlora", "merge", "build_onnx"):
        done = run(*paths, script=f"scripts/{stage}.py")
        assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
    onnx = json.loads((tmp_path / "metrics" / "onnx.json").read_text())
    assert onnx["precision"] == "int4" and onnx["parity"]["passed"] and onnx["parity"]["label_agreement"] >= 0.98
    rows = [json.loads(line) for line in (tmp_path / "prepared" / "eval.jsonl").read_text().splitlines()][:40]
    phrases = [r["prompt"].split("### Text: ", 1)[1].split("\n", 1)[0] for r in rows]
    done = run("--model", str(tmp_path / "onnx"), stdin="\n".join(phrases) + "\n")
    predicted = [line.split("\t", 1)[0] for line in done.stdout.splitlines()]
    assert len(predicted) == len(rows)
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert accuracy >= 0.7, accuracy
    labels = json.loads((tmp_path / "prepared" / "labels.json").read_text())
    assert run("--model", str(tmp_path / "onnx"), "cricket is a wonderful sport!").stdout.strip() in labels
    card = (tmp_path / "onnx" / "README.md").read_text()
    assert "label_agreement >= 0.98 | True" in card
