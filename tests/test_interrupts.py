"""SIGKILL and SIGTERM in the middle of every stage: its outputs are complete or absent, never half
written, and the next run recovers. (Training's own resume-after-kill is in test_train_resume.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import path_overrides

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
FAST = ["train.num_train_epochs=1", "eval.compare=[]"]
OUTPUTS = {
    "fetch_model": ["base_model", "metrics/base.json"],
    "prepare_data": ["prepared", "metrics/data.json"],
    "merge": ["merged", "metrics/merge.json"],
    "build_onnx": ["onnx", "metrics/onnx.json"],
    "eval": ["metrics/eval.json"],
}


def start(root: Path, stage: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DVC_STAGE", None)
    return subprocess.Popen(
        [sys.executable, f"scripts/{stage}.py", *path_overrides(root), *FAST],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def snapshot(root: Path, stage: str) -> dict[str, list[str] | None]:
    """Each output's file list (None when absent); a metrics file must also parse."""
    state = {}
    for name in OUTPUTS[stage]:
        path = root / name
        if path.is_dir():
            state[name] = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            json.loads(path.read_text())
            state[name] = [path.name]
        else:
            state[name] = None
    return state


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob(".*.tmp-*")]


def remove_outputs(root: Path, stage: str) -> None:
    for name in OUTPUTS[stage]:
        path = root / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupts")
    for stage in ("fetch_model", "prepare_data", "train_qlora"):
        done = start(root, stage)
        assert done.wait(timeout=600) == 0, done.stderr.read()
    return root


@pytest.mark.parametrize("stage", list(OUTPUTS))
def test_killed_stage_leaves_complete_or_absent_outputs_and_reruns(upstream, stage):
    started = time.perf_counter()
    full = start(upstream, stage)
    assert full.wait(timeout=600) == 0, full.stderr.read()
    duration = time.perf_counter() - started
    complete = snapshot(upstream, stage)
    assert all(complete.values())

    for sig in (signal.SIGKILL, signal.SIGTERM):
        killed = False
        for fraction in (0.5, 0.3, 0.15):  # a loaded machine can finish early: try earlier
            remove_outputs(upstream, stage)
            proc = start(upstream, stage)
            time.sleep(duration * fraction)
            if proc.poll() is None:
                proc.send_signal(sig)
                code = proc.wait(timeout=120)
                killed = True
                break
            proc.wait()
        assert killed, f"{stage} always finished before the signal"
        if sig == signal.SIGTERM:
            stderr = proc.stderr.read()
            assert code != 0 and "Traceback" not in stderr, stderr
            assert not leftovers(upstream), "SIGTERM must remove temp outputs"
        else:
            assert code == -signal.SIGKILL
        for name, files in snapshot(upstream, stage).items():
            assert files is None or files == complete[name], f"{stage}: {name} half written after {sig.name}"

    rerun = start(upstream, stage)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    assert snapshot(upstream, stage) == complete
    assert not leftovers(upstream), "the rerun clears what SIGKILL left"
