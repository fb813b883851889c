"""End to end on the tiny default, through `make all` exactly as a user runs it, in a fresh clone.

Slow (about two minutes on 2 cores); CI runs it as part of `make test`.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import clone_project, ran_stages

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# made up at run time, so that not even this file contains them
PLANTED_HF_TOKEN = f"hf_{uuid.uuid4().hex}"
PLANTED_WANDB_KEY = uuid.uuid4().hex + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    # planted secrets: no output may ever contain them (see test_no_output_contains_a_secret)
    return clone_project(tmp_path_factory, "clone", WANDB_MODE="offline",
                         HF_TOKEN=PLANTED_HF_TOKEN, WANDB_API_KEY=PLANTED_WANDB_KEY)


def make(project, *args: str) -> str:
    root, env = project
    # -o: the venv is the repo's own (symlinked), never reinstalled from the clone
    done = subprocess.run(["make", "-o", ".venv/.installed", *args], cwd=root, env=env, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def read_metrics(root: Path, name: str) -> dict:
    return json.loads((root / "metrics" / name).read_text())


def test_make_all_runs_every_stage_and_beats_the_baseline(project):
    root, _ = project
    output = make(project, "all")
    assert ran_stages(output) == {"fetch_model", "prepare_data", "train_qlora", "merge", "build_onnx", "eval"}
    evaluation = read_metrics(root, "eval.json")
    data = read_metrics(root, "data.json")
    assert evaluation["majority_baseline"] == pytest.approx(data["majority_baseline"])
    assert evaluation["accuracy"] >= 0.7 > evaluation["majority_baseline"], evaluation
    assert evaluation["n"] == data["eval_rows"] and evaluation["ms_per_token"] > 0
    assert read_metrics(root, "merge.json")["max_abs_logit_diff"] < 1e-4
    # each experiment records the environment it ran in (pinned packages' installed versions)
    assert evaluation["environment"]["torch"].startswith("2.13.0") and "onnxruntime-genai" in evaluation["environment"]
    assert read_metrics(root, "onnx.json")["precision"] == "int4"
    assert (root / "models/onnx/model.onnx").is_file() and (root / "plots/train_loss.csv").is_file()
    genai = json.loads((root / "models/onnx/genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == os.cpu_count()
    # one offline W&B run per stage, in the repo's git-ignored wandb/ folder
    assert len(list((root / "wandb").glob("offline-run-*"))) == 6
    assert "wandb/" not in subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout


def test_second_make_all_reruns_nothing(project):
    make(project, "all")
    assert ran_stages(make(project, "all")) == set()


def test_precision_change_reruns_only_export_and_eval(project):
    root, _ = project
    make(project, "all")
    output = make(project, "all", "ARGS=precision=fp32")
    assert ran_stages(output) == {"build_onnx", "eval"}
    assert read_metrics(root, "onnx.json")["precision"] == "fp32"
    assert read_metrics(root, "eval.json")["accuracy"] >= 0.7


TRAIN_ONWARD = {"train_qlora", "merge", "build_onnx", "eval"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [("eval.max_new_tokens=5", {"eval"}), ("onnx.block_size=64", {"build_onnx", "eval"}), ("lora.dropout=0.05", TRAIN_ONWARD)],
)
def test_a_change_reruns_exactly_the_stages_that_depend_on_it(project, override, expected):
    make(project, "all")
    assert ran_stages(make(project, "all", f"ARGS={override}")) == expected


def test_going_back_restores_outputs_from_the_run_cache(project):
    root, _ = project
    make(project, "all", "ARGS=precision=fp32")
    output = make(project, "all")
    assert ran_stages(output) == set(), output
    assert read_metrics(root, "onnx.json")["precision"] == "int4"


def test_changing_a_shared_module_reruns_only_its_users(project):
    root, env = project
    make(project, "all")
    with open(root / "src/ortune/export.py", "a") as handle:
        handle.write("\n# a harmless edit\n")
    ran = ran_stages(make(project, "all"))
    subprocess.run(["git", "checkout", "src/ortune/export.py"], cwd=root, env=env, check=True)
    assert "build_onnx" in ran and ran <= {"build_onnx", "eval"}


def test_changing_the_data_reruns_everything_from_it(project):
    root, env = project
    make(project, "all")
    with open(root / "data/raw/tones.jsonl", "a") as handle:
        handle.write('{"phrase": "My cat learned to open the fridge by herself!", "tone": "surprise"}\n')
    ran = ran_stages(make(project, "all"))
    subprocess.run(["git", "checkout", "data/raw/tones.jsonl"], cwd=root, env=env, check=True)
    # the tiny base model's tokenizer is trained on the data, so it reruns too
    assert ran == {"fetch_model", "prepare_data", *TRAIN_ONWARD}


def test_sweep_then_best_applies_the_winner(project):
    root, _ = project
    make(project, "all")
    make(project, "sweep", "SWEEP=eval.max_new_tokens=3,4")
    table = make(project, "compare")
    assert "| eval.max_new_tokens |" in table and "| eval.accuracy |" in table
    picked = make(project, "best", "METRIC=accuracy", "MAX_MS_PER_TOKEN=1000")
    assert ": best eval.accuracy=" in picked


def test_shared_experiment_reproduces_in_a_colleagues_clone(project, tmp_path_factory):
    root, env = project
    origin = root.parent / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    subprocess.run(["git", "remote", "set-url", "origin", str(origin)], cwd=root, env=env, check=True)
    make(project, "all", "NAME=shared-exp")
    subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=root, env=env, check=True)
    make(project, "push", "EXP=shared-exp")

    colleague = root.parent / "colleague"  # a sibling, so the repo's relative DVC remote resolves to the same store
    subprocess.run(["git", "clone", "-q", "-b", "main", str(origin), str(colleague)], env=env, check=True)
    (colleague / ".venv").symlink_to(REPO / ".venv")
    theirs = (colleague, env)
    make(theirs, "pull", "EXP=shared-exp")
    assert ran_stages(make(theirs, "repro")) == set()
    for name in ("data.json", "train.json", "eval.json"):
        assert (colleague / "metrics" / name).read_bytes() == (root / "metrics" / name).read_bytes(), name
    status = subprocess.run(["dvc", "status"], cwd=colleague, env={**env, "PATH": f"{REPO}/.venv/bin:{env['PATH']}"},
                            capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    # and a deterministic stage recomputed there gives the very same bytes
    subprocess.run(["dvc", "repro", "-f", "-s", "prepare_data"], cwd=colleague,
                   env={**env, "PATH": f"{REPO}/.venv/bin:{env['PATH']}"}, check=True, capture_output=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (colleague / "data/prepared" / name).read_bytes() == (root / "data/prepared" / name).read_bytes()


def test_hand_run_of_a_stage_uses_the_same_overrides_as_dvc(project):
    root, env = project
    done = subprocess.run(
        [str(root / ".venv/bin/python"), "scripts/prepare_data.py", "data.eval_fraction=0.5"],
        cwd=root, env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_metrics(root, "data.json")["eval_rows"] == 240


def test_no_output_contains_a_secret(project):
    root, _ = project
    make(project, "all")
    leaked = []
    for path in root.rglob("*"):
        if ".git" in path.parts or ".venv" in path.parts or not path.is_file():
            continue
        content = path.read_bytes()
        if PLANTED_HF_TOKEN.encode() in content or PLANTED_WANDB_KEY.encode() in content:
            leaked.append(str(path.relative_to(root)))
    assert not leaked, leaked
    assert list((root / "wandb").glob("offline-run-*")), "the scan must cover real W&B run files"
