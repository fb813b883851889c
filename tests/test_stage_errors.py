"""Stage scripts meet bad input with one line and a non-zero exit, never a library traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import path_overrides

REPO = Path(__file__).resolve().parents[1]


def run_stage(script: str, *overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DVC_STAGE", None)
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *path_overrides(tmp_path), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("script", "override", "needle"),
    [
        ("prepare_data.py", "data.path=/no/such/file.jsonl", "data.path=/no/such/file.jsonl: file not found"),
        ("prepare_data.py", "lora.r=abc", "lora.r"),
        ("prepare_data.py", "data.test_fraction=1.2", "data.test_fraction"),
        ("build_onnx.py", "model=does-not-exist", "does-not-exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, script, override, needle):
    done = run_stage(script, override, tmp_path=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and needle in error_lines[0], done.stderr


def test_unexpected_failure_is_one_line_naming_a_file_with_the_whole_traceback(tmp_path):
    """A bug, not bad input: the line is cut short, the traceback kept whole, so a bug report needs no rerun."""
    probe = (
        "import sys; sys.path.insert(0, 'scripts'); from ortune import stage\n"
        "def run(cfg):\n    raise KeyError('x' * 1000)\n"
        "stage.main('prepare_data', run, 'data.json')\n"
    )
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DVC_STAGE", None)
    env.pop("DVC_ROOT", None)
    done = subprocess.run(
        [sys.executable, "-c", probe, *path_overrides(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage prepare_data failed: KeyError: 'xxx") and len(last) < 600
    log = Path(re.search(r"full traceback in (\S+);", last)[1])
    try:
        assert log.parent == REPO / ".dvc/tmp/ortune/errors"
        kept = log.read_text()
        assert "Traceback (most recent call last)" in kept and "x" * 1000 in kept and "in run" in kept
    finally:
        log.unlink()


def test_failed_stage_leaves_no_partial_output(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"phrase": "fine", "tone": "joy"}\n{"phrase": "no tone here"}\n')
    done = run_stage("prepare_data.py", f"data.path={bad}", tmp_path=tmp_path)
    assert done.returncode == 2 and "no field 'tone'" in done.stderr
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "metrics").exists()
