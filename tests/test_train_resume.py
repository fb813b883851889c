"""Real kills and real processes: a run killed mid-training (SIGTERM by hand, SIGKILL under
`dvc repro`) resumes from its checkpoint and ends with the adapter of an uninterrupted run, and
train.num_processes=2 trains with two CPU processes (torchrun, gloo)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clone_project
from test_train import TINY, adapter_bytes, fetch_and_prepare, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# long enough that a kill lands mid-training, short enough for a test; no eval to keep it quick
RUN = ["train.max_steps=60", "train.save_steps=5", "train.eval_strategy=no", "train.logging_steps=10"]


def env(base: dict = os.environ) -> dict:
    """base (this process's environment unless given) for a stage run: W&B off, output unbuffered,
    and no stage or torchrun variables inherited from whatever runs the tests."""
    environment = {**base, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    for name in ("DVC_STAGE", "DVC_ROOT", "LOCAL_RANK", "RANK", "WORLD_SIZE"):
        environment.pop(name, None)
    return environment


def stage_command(base: Path, name: str, *overrides: str) -> list[str]:
    paths = [f"paths.{p}={base / p}" for p in ("base_model", "prepared", "merged", "onnx")]
    out = base / name
    return [
        sys.executable,
        str(REPO / "scripts/train_qlora.py"),
        *paths,
        *TINY,
        f"paths.adapter={out / 'adapter'}",
        f"paths.metrics={out / 'metrics'}",
        f"paths.plots={out / 'plots'}",
        *overrides,
    ]


def start_stage(base: Path, name: str, *overrides: str) -> subprocess.Popen:
    """The train_qlora stage into base/name, in the background (to be killed), stdout and stderr in one pipe."""
    return subprocess.Popen(
        stage_command(base, name, *overrides),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_checkpoint(folder: Path, process: subprocess.Popen, timeout: float = 300) -> Path:
    """The first complete checkpoint under folder/adapter-*/ (trainer_state.json is written last)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = list(folder.glob("adapter-*/checkpoint-*/trainer_state.json"))
        if done:
            return done[0].parent
        assert process.poll() is None, "training ended before any checkpoint"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return fetch_and_prepare(tmp_path_factory.mktemp("resume"))


def test_sigterm_checkpoints_at_the_next_step_and_the_rerun_ends_identical(base):
    reference = adapter_bytes(train(base, "uninterrupted", *RUN)[1])

    process = start_stage(base, "killed", *RUN)
    wait_for_checkpoint(base / "killed" / ".checkpoints", process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 143, output[-3000:]
    assert "stopped by SIGTERM at step" in output
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 5 <= stopped_at < 60
    assert list((base / "killed" / ".checkpoints").glob(f"adapter-*/checkpoint-{stopped_at}/trainer_state.json"))
    assert not (base / "killed" / "adapter").exists()

    done = subprocess.run(stage_command(base, "killed", *RUN), cwd=REPO, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"checkpoint-{stopped_at}" in done.stderr  # "resuming from ..."
    metrics = json.loads((base / "killed" / "metrics" / "train.json").read_text())
    assert metrics["resumed_from_step"] == stopped_at and metrics["steps"] == 60
    assert adapter_bytes(base / "killed" / "adapter") == reference
    assert not (base / "killed" / ".checkpoints").exists()


def test_two_cpu_processes_train_one_adapter_with_torchrun_and_resume_together(base):
    overrides = [
        "train.num_processes=2",
        "train.max_steps=40",
        "train.save_steps=5",
        "train.eval_strategy=steps",
        "train.eval_steps=20",
        "train.logging_steps=5",
    ]
    process = start_stage(base, "ddp", *overrides)
    wait_for_checkpoint(base / "ddp" / ".checkpoints", process)
    process.send_signal(signal.SIGTERM)  # to the stage, which forwards it through torchrun to both processes
    output = process.communicate(timeout=300)[0]
    assert "launching 2 processes" in output and "torch.distributed.run" in output
    assert process.returncode == 143, output[-3000:]
    # both processes stopped at the same step (one stopping alone would hang the other)
    steps = {
        line.split("stopped by SIGTERM at step ")[1].split(";")[0]
        for line in output.splitlines()
        if "stopped by SIGTERM at step " in line
    }
    assert len(steps) == 1, output[-3000:]

    done = subprocess.run(stage_command(base, "ddp", *overrides), cwd=REPO, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((base / "ddp" / "metrics" / "train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 40 and metrics["resumed_from_step"] == int(steps.pop())
    # 2 processes x 16 rows per step: an epoch of N training rows is ceil(N / 32) steps, not ceil(N / 16)
    rows = len((base / "prepared" / "train.jsonl").read_text().splitlines())
    assert metrics["epochs"] == pytest.approx(40 / math.ceil(rows / 32))
    assert "eval_loss" in metrics and 0 < metrics["padding_waste"] < 0.15
    assert (base / "ddp" / "adapter" / "adapter_model.safetensors").is_file()


def _train_process(root: Path) -> int | None:
    """The pid of the stage's python process that `dvc repro` started in root. DVC runs the command
    through $SHELL -c, or /bin/sh -c when SHELL is unset (as in CI): dash forks instead of exec-ing,
    so a shell whose command line names the script sits between DVC and python. Killing that shell
    would leave python training on, orphaned, so match the interpreter only."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            interpreter = Path(cmdline[0].decode()).name.startswith("python")
            if interpreter and b"scripts/train_qlora.py" in cmdline[1:3] and (proc / "cwd").resolve() == root:
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_dvc_repro_resumes_a_run_killed_with_sigkill(tmp_path_factory):
    # the clone keeps conf/'s default model: the tiny one and the short run come from params.yaml alone
    root, cloned = clone_project(tmp_path_factory, "resume-sigkill", tiny=False, params=(*TINY, *RUN))
    environment = env(cloned)
    dvc = [str(REPO / ".venv/bin/dvc"), "repro", "train_qlora"]

    first = subprocess.Popen(
        dvc, cwd=root, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_checkpoint(root / "models" / ".checkpoints", first, timeout=600)
    pid = _train_process(root)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    output = first.communicate(timeout=120)[0]
    assert first.returncode != 0, output[-2000:]
    assert list((root / "models" / ".checkpoints").glob("adapter-*/checkpoint-*/trainer_state.json"))

    second = subprocess.run(dvc, cwd=root, env=environment, capture_output=True, text=True)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "resuming from" in second.stdout + second.stderr
    assert json.loads((root / "metrics" / "train.json").read_text())["resumed_from_step"] >= 5
    resumed = adapter_bytes(root / "models" / "adapter")
    assert not (root / "models" / ".checkpoints").exists()

    fresh = subprocess.run(
        [*dvc, "--force", "--single-item"], cwd=root, env=environment, capture_output=True, text=True
    )
    assert fresh.returncode == 0, (fresh.stdout + fresh.stderr)[-3000:]
    assert json.loads((root / "metrics" / "train.json").read_text())["resumed_from_step"] == 0
    assert adapter_bytes(root / "models" / "adapter") == resumed
