"""Shared fixtures: configs composed from the real conf/ with every path redirected into a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never touch the network or a real W&B server.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("DVC_STAGE", None)
# set by the Makefile for queued experiments; tests choose their own W&B folders
os.environ.pop("ORTUNE_WANDB_DIR", None)


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root with no DVC stage variables, as `python scripts/x.py` by hand does
    (data.path and the conf are relative to it)."""
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


@pytest.fixture
def zombie():
    """The pid of an ended process nobody has reaped yet, as a process group killed with SIGKILL leaves
    its children where the container's init does not reap: it answers kill(pid, 0) like a live one."""
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        yield child.pid
    finally:
        child.wait()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_texts):
    """A random 2-layer Phi-3 folder (export_helpers.TINY, seed 3) with a tokenizer trained on tiny_texts."""
    from export_helpers import TINY
    from ortune import modeling

    out = tmp_path_factory.mktemp("tiny")
    modeling.build_tiny_phi3(TINY, tiny_texts, seed=3, out_dir=out)
    return out


# The fast tests run on the tiny random model; the default of `make all` (conf/config.yaml) is the real
# SmolLM2-135M, which tests/test_real_model.py runs end to end.
TINY_MODEL = "model=tiny-phi3"


def path_overrides(root: Path) -> list[str]:
    """Every output in root, on the tiny model."""
    names = ("base_model", "prepared", "adapter", "merged", "onnx", "metrics", "plots")
    return [TINY_MODEL] + [f"paths.{name}={root / name}" for name in names]


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(*overrides) -> the validated full config, as a stage would see it, outputs in tmp_path."""
    from ortune import config

    def _make(*overrides: str):
        composed = config.compose([*path_overrides(tmp_path), *overrides], config_dir=REPO / "conf")
        return config.validate(composed, "test")

    return _make


@pytest.fixture(scope="session")
def tiny_texts():
    from ortune import modeling

    return modeling.phrase_texts(REPO / "data/raw/tones.jsonl")


# The numbers eval.json reports at its top level on the default eval.compare (what `dvc exp show` and
# `dvc metrics diff` show): the eval stage run by hand and in a fresh clone's pipeline must write each.
EVAL_HEADLINE_METRICS = (
    "accuracy",
    "macro_f1",
    "unparsed",
    "majority_baseline",
    "base_accuracy",
    "quantization_accuracy_delta",
    "quantization_agreement",
    "ttft_ms",
    "ms_per_token",
    "tokens_per_second",
    "peak_memory_mb",
    "model_size_mb",
)


def ran_stages(output: str) -> set[str]:
    """The stages DVC actually executed (`dvc status`/`--dry` list only the directly changed ones)."""
    import re

    return set(re.findall(r"Running stage '([^']+)'", output))


def clone_project(
    tmp_path_factory, name: str, tiny: bool = True, params: tuple[str, ...] = (), **extra_env: str
) -> tuple[Path, dict]:
    """A fresh git clone holding this working tree as it is (new files included, run outputs left out),
    committed, with the repo's .venv linked in and DVC/git isolated from the user's config
    (ortune.workspace_clone). `tiny`: the clone's conf/ defaults to the tiny model (and its params.yaml
    follows), so `make all` there is fast. `params`: overrides its params.yaml is written with (as
    `python -m ortune.pipeline params ...` takes them), for a test that runs `dvc repro` on settings of its own."""
    from ortune.workspace_clone import clone_workspace

    root = tmp_path_factory.mktemp(name) / "ortune"
    home = tmp_path_factory.mktemp(f"{name}-home")
    model = TINY_MODEL.split("=", 1)[1] if tiny else None
    env = clone_workspace(REPO, root, home, model=model, params=params if tiny or params else None, **extra_env)
    return root, env


def make_in_clone(project, *args: str, timeout: int = 3600, check: bool = True):
    """`make ARGS...` in a clone_project() clone, as a user runs it; fails the test (with the output's tail)
    unless it succeeds, when `check`. --no-print-directory: under `make test` (CI) this make is a sub-make,
    whose "Leaving directory" line would follow what `make predict` prints."""
    import subprocess

    root, env = project
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def make_output(project, *args: str, timeout: int = 3600) -> str:
    """What a user sees of a successful `make ARGS...` in a clone_project() clone: stdout then stderr."""
    done = make_in_clone(project, *args, timeout=timeout)
    return done.stdout + done.stderr


def run_metrics(root: Path, name: str) -> dict:
    """metrics/<name> of a run in a clone."""
    import json

    return json.loads((root / "metrics" / name).read_text())
