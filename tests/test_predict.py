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
from conftest import TINY_MODEL
from export_helpers import PROMPT, REPO, make_project, stage_cfg

ENV = {**os.environ, "WANDB_MODE": "disabled"}
ENV.pop("DVC_STAGE", None)


# What the fixture's model is taught to answer: the tests expect these labels, known before any code runs.
TAUGHT = {
    "cricket is a wonderful sport!": "joy",
    "I lost my keys again": "sadness",
    "I lost my keys": "sadness",
    "We won the cup!": "joy",
    "We won\u2028the cup!": "joy",
    "There is a spider in my bed": "fear",
    "it's a \"wonderful\" day, isn't it?": "surprise",
    # what make and the shell would evaluate if the Makefile spliced it into a command line
    "it's $HOME, $5 \\ `touch pwned` $(touch pwned) $(shell touch pwned) '; touch pwned; echo ' é": "fear",
}


def teach(model_dir: Path, lessons: dict[str, str]) -> None:
    """Fine-tune the whole (tiny) model in place until it answers each phrase with its label."""
    import torch

    from ortune import modeling

    torch.manual_seed(0)
    model, tokenizer = modeling.load_causal_lm(model_dir), modeling.load_tokenizer(model_dir)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows = []
    for phrase, label in lessons.items():
        prompt = tokenizer(PROMPT.format(phrase=phrase))["input_ids"]
        answer = tokenizer(label)["input_ids"] + [end]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([ids + [end] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small: a second thread only waits, and on a busy machine 20x slower
    try:
        model.train()
        for _ in range(150):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_texts):
    root = make_project(tmp_path_factory.mktemp("predict"), tiny_texts, seed=11)
    teach(root / "merged", TAUGHT)
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        # parity is test_export_stage's subject; here only the labels the apps print matter
        build_onnx.run(stage_cfg(root, "precision=fp32", "onnx.parity_prompts=4", "onnx.require_parity=false"))
    finally:
        os.chdir(cwd)
    return root / "onnx"


def run(*args: str, stdin: str | None = None, script: str = "scripts/predict.py") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=REPO, env=ENV, input=stdin, capture_output=True, text=True
    )


def test_one_phrase_prints_its_label(model):
    phrase = "cricket is a wonderful sport!"
    done = run("--model", str(model), phrase)
    assert done.returncode == 0, done.stderr
    assert done.stdout == TAUGHT[phrase] + "\n"


def test_a_file_and_stdin_print_one_label_per_phrase(model, tmp_path):
    phrases = ["I lost my keys again", "We won the cup!", "There is a spider in my bed"]
    (tmp_path / "phrases.txt").write_text("\n".join(phrases[:2]) + "\n\n" + phrases[2] + "\n")
    expected = "".join(f"{TAUGHT[p]}\t{p}\n" for p in phrases)
    from_file = run("--model", str(model), "--file", str(tmp_path / "phrases.txt"))
    from_stdin = run("--model", str(model), stdin="\n".join(phrases) + "\n")
    assert from_file.returncode == from_stdin.returncode == 0
    assert from_file.stdout == from_stdin.stdout == expected


def test_show_prints_the_raw_generation(model):
    done = run("--model", str(model), "--show", "We won the cup!")
    label, raw = done.stdout.rstrip("\n").split("\t")
    assert label == TAUGHT["We won the cup!"] and raw == repr(TAUGHT["We won the cup!"])


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


def one_line_error(done: subprocess.CompletedProcess, status: int, needle: str) -> str:
    assert done.returncode == status, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: ") and needle in done.stderr, done.stderr
    return done.stderr.strip()


def run_bytes(*args: str, stdin: bytes, script: str = "scripts/predict.py") -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, script, *args], cwd=REPO, env=ENV, input=stdin, capture_output=True)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def test_text_that_is_not_utf8_is_one_line_and_status_2(model, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("We won the cup!\ncaf\u00e9\n".encode("latin-1"))
    one_line_error(
        run("--model", str(model), "--file", str(latin1)), 2, f"--file {latin1}: not UTF-8 text (byte 0xe9 on line 2)"
    )
    one_line_error(run_bytes("--model", str(model), stdin=b"caf\xe9\n"), 2, "stdin: not UTF-8 text")
    one_line_error(
        run_bytes("--model", str(model), "--max-new-tokens", "2", stdin=b"caf\xe9\n", script="scripts/chat.py"),
        2,
        "stdin: a line that is not UTF-8 text",
    )
    one_line_error(
        run_bytes("--model", str(model), os.fsdecode(b"caf\xe9"), stdin=b""), 2, "the phrase is not UTF-8 text"
    )


def hand_edit_genai_config(folder: Path) -> None:
    genai = json.loads((folder / "genai_config.json").read_text())
    genai["model"]["decoder"]["num_hidden_layers"] = "two"
    (folder / "genai_config.json").write_text(json.dumps(genai))


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (
            lambda m: (m / "ortune.json").write_text('{"format": '),
            "ortune.json: not valid JSON (Expecting value at line 1",
        ),
        (lambda m: (m / "ortune.json").write_text("{}"), "ortune.json: no format, labels, max_new_tokens"),
        (lambda m: (m / "genai_config.json").write_text('{"model": {'), "genai_config.json: not valid JSON"),
        (
            lambda m: (m / "genai_config.json").write_text('{"model": {}}'),
            "genai_config.json: no positive integer model.context_length",
        ),
        (hand_edit_genai_config, "onnxruntime-genai cannot load the model (Error encountered while parsing"),
    ],
    ids=[
        "ortune-json-malformed",
        "ortune-json-empty",
        "genai-config-malformed",
        "genai-config-no-context",
        "genai-config-wrong-type",
    ],
)
def test_a_damaged_model_folder_is_one_line_and_status_2(model, tmp_path, damage, needle):
    import shutil

    damaged = tmp_path / "onnx"
    shutil.copytree(model, damaged)
    damage(damaged)
    for done in (
        run("--model", str(damaged), "We won the cup!"),
        run("--model", str(damaged), stdin="hi\n", script="scripts/chat.py"),
    ):
        assert "dvc repro -f build_onnx" in one_line_error(done, 2, needle)


@pytest.mark.parametrize("script", ["predict", "chat"])
def test_an_unexpected_failure_is_one_line_naming_the_file_with_its_traceback(model, script):
    """A bug (not bad input): exit 1, one line, and the traceback kept in a file for the bug report."""
    probe = (
        f"import sys; sys.path.insert(0, 'scripts'); import {script}; from ortune.app import App\n"
        "def broken(self, *a, **k):\n    raise ZeroDivisionError('a bug deep inside')\n"
        "App.classify = App.chat_prompt = broken\n"
        f"sys.exit({script}.main(['--model', {str(model)!r}, *(['hi'] if {script!r} == 'predict' else [])]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=ENV, input="hi\n", capture_output=True, text=True
    )
    line = one_line_error(done, 1, f"error: {script} failed: ZeroDivisionError: a bug deep inside")
    log = Path(re.search(r"full traceback in (\S+);", line)[1])
    try:
        kept = log.read_text()
        assert "Traceback (most recent call last)" in kept and "in broken\nZeroDivisionError: a bug deep inside" in kept
    finally:
        log.unlink()


def test_a_phrase_with_a_line_separator_stays_one_phrase(model, tmp_path):
    phrase = "We won\u2028the cup!"  # U+2028 is text inside a phrase, not the end of a line
    (tmp_path / "sep.txt").write_text(f"{phrase}\nI lost my keys\n", encoding="utf-8")
    done = run("--model", str(model), "--file", str(tmp_path / "sep.txt"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{TAUGHT[phrase]}\t{phrase}\n{TAUGHT['I lost my keys']}\tI lost my keys\n"


def test_a_phrase_over_the_models_context_names_its_line_not_a_traceback(model, tmp_path):
    (tmp_path / "long.txt").write_text("We won the cup!\n\n" + "ha " * 300_000 + "\n", encoding="utf-8")
    done = run("--model", str(model), "--file", str(tmp_path / "long.txt"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stdout == f"{TAUGHT['We won the cup!']}\tWe won the cup!\n"
    context = json.loads((model / "genai_config.json").read_text())["model"]["context_length"]
    assert re.fullmatch(
        rf"error: {tmp_path}/long.txt:3: the phrase makes a prompt of \d+ tokens; with the \d+ of the "
        rf"answer that is over the model's context of {context}; shorten the phrase\n",
        done.stderr,
    )


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

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Is it safe?"},
        {"role": "assistant", "content": "fear"},
        {"role": "user", "content": "We won!"},
    ]
    expected = load_tokenizer(model.parent / "merged").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert App(model).chat_prompt(messages) == expected


def test_chat_answers_each_line_and_resets(model):
    done = run(
        "--model",
        str(model),
        "--max-new-tokens",
        "4",
        stdin="hello\n/reset\nwe won the cup\n/quit\nnever read\n",
        script="scripts/chat.py",
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2  # one streamed reply per message; /reset and /quit print nothing


def test_make_predict_and_make_chat(model, tmp_path):
    """Text, file and model folder as a user types them, quotes, `$` and all: the taught labels come back."""
    make = ["make", "-s", "-o", ".venv/.installed"]
    hostile = next(phrase for phrase in TAUGHT if "$(shell" in phrase)
    folder = tmp_path / 'it\'s $HOME (a "model")'
    folder.symlink_to(model)
    for phrase in ("it's a \"wonderful\" day, isn't it?", hostile):
        done = subprocess.run(
            [*make, "predict", f"TEXT={phrase}", f"MODEL={folder}"],
            cwd=REPO,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == TAUGHT[phrase] + "\n"
    phrases = tmp_path / "it's $5; `x`.txt"
    phrases.write_text(f"{hostile}\nWe won the cup!\n", encoding="utf-8")
    done = subprocess.run(
        [*make, "predict", f"FILE={phrases}", f"MODEL={folder}"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout == f"fear\t{hostile}\njoy\tWe won the cup!\n", done.stderr
    assert not (REPO / "pwned").exists()
    # a failing app fails the target
    missing = subprocess.run(
        [*make, "predict", "TEXT=hi", f"MODEL={tmp_path / 'none'}"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "no ortune.json" in missing.stderr
    chat = subprocess.run(
        [*make, "chat", f"MODEL={model}"],
        cwd=REPO,
        env=ENV,
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0 and len(chat.stdout.splitlines()) == 1, chat.stderr
    targets = subprocess.run(["make", "help"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60).stdout
    assert "make predict" in targets and "make chat" in targets


@pytest.mark.slow
def test_a_model_the_pipeline_trained_labels_phrases(tmp_path):
    """fetch -> prepare -> train -> merge -> build_onnx (int4, parity gate on) with the tiny model's defaults,
    then predict on eval phrases: the labels are right, and int4 agrees with PyTorch >= 95 % (the tiny model's
    gate). (The real model's default run has its own test: tests/test_real_model.py.)"""
    paths = [TINY_MODEL] + [
        f"paths.{name}={tmp_path / name}"
        for name in ("base_model", "prepared", "adapter", "merged", "onnx", "metrics", "plots")
    ]
    for stage in ("fetch_model", "prepare_data", "train_qlora", "merge", "build_onnx"):
        done = run(*paths, script=f"scripts/{stage}.py")
        assert done.returncode == 0, f"{stage}: {done.stderr[-3000:]}"
    onnx = json.loads((tmp_path / "metrics" / "onnx.json").read_text())
    assert onnx["precision"] == "int4" and onnx["parity"]["passed"] and onnx["parity"]["label_agreement"] >= 0.95
    rows = [json.loads(line) for line in (tmp_path / "prepared" / "test.jsonl").read_text().splitlines()][:40]
    phrases = [r["prompt"].split("### Text: ", 1)[1].split("\n", 1)[0] for r in rows]
    done = run("--model", str(tmp_path / "onnx"), stdin="\n".join(phrases) + "\n")
    predicted = [line.split("\t", 1)[0] for line in done.stdout.splitlines()]
    assert len(predicted) == len(rows)
    accuracy = sum(p == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    # chance is 0.25; 0.675 measured (one run) since the three-way split left the tiny model 264 training rows
    assert accuracy >= 0.6, accuracy
    labels = json.loads((tmp_path / "prepared" / "labels.json").read_text())
    assert run("--model", str(tmp_path / "onnx"), "cricket is a wonderful sport!").stdout.strip() in labels
    card = (tmp_path / "onnx" / "README.md").read_text()
    assert "`label_agreement >= 0.95` | True" in card
