"""Concurrent runs: one live writer per output, refused in one line; a run's own stages and workers
pass; a killed run's locks go with it; params.yaml cannot change under a running pipeline."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import path_overrides
from ortune import locks
from ortune.errors import OrtuneError

REPO = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys, time\n"
    "from ortune import locks\n"
    "with locks.hold(sys.argv[3:], sys.argv[2], sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(300)\n"
)


@contextlib.contextmanager
def another_run(root: Path, *paths: Path, what: str = "make all"):
    """A separate live process (not an ancestor of this one) holding the write locks of `paths`."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), what, *map(str, paths)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "held\n", process.stderr.read()
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def checkout(tmp_path):
    (tmp_path / ".dvc").mkdir()
    return tmp_path


def test_a_second_writer_of_an_output_is_refused_in_one_line(checkout):
    output = checkout / "models" / "adapter"
    with another_run(checkout, output) as run:
        with pytest.raises(OrtuneError) as refused:
            with locks.hold([output, checkout / "metrics/train.json"], "stage train_qlora", checkout):
                pass
    message = str(refused.value)
    assert message.startswith(f"models/adapter is being written by another run (pid {run.pid}: make all, since ")
    assert message.endswith(f"wait for it to finish or stop it (kill {run.pid}), then rerun") and "\n" not in message
    # refused before taking anything: the other path is free
    with locks.hold([checkout / "metrics/train.json"], "stage train_qlora", checkout):
        pass


def test_other_outputs_and_a_finished_or_killed_run_do_not_block(checkout):
    with another_run(checkout, checkout / "models/onnx"):
        with locks.hold([checkout / "models/adapter"], "stage train_qlora", checkout):
            pass
    with another_run(checkout, checkout / "models/onnx") as run:
        run.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops its locks
        run.wait()
        with locks.hold([checkout / "models/onnx"], "stage build_onnx", checkout):
            pass


def test_a_runs_own_stages_and_their_workers_may_write_what_it_holds(checkout):
    child = (
        "import sys\nfrom ortune import locks\n"
        "with locks.hold([sys.argv[2]], 'stage', sys.argv[1]):\n"
        "    print('wrote', flush=True)\n"
    )
    output = checkout / "models/adapter"
    with locks.hold([output], "make all", checkout):
        # DVC's stage under `make all`, and torchrun's worker under that stage: descendants pass
        grandchild = (
            "import subprocess, sys; "
            f"sys.exit(subprocess.run([sys.executable, '-c', {child!r}, *sys.argv[1:]]).returncode)"
        )
        done = subprocess.run(
            [sys.executable, "-c", grandchild, str(checkout), str(output)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and done.stdout == "wrote\n", done.stderr
    assert locks.OWNERS_ENV not in os.environ


def test_a_stage_run_by_hand_is_refused_while_a_pipeline_writes_its_outputs(tmp_path):
    """The README and docs/ advertise running a stage by hand; during `make all` that must not clobber its outputs."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DVC_STAGE", None)
    env.pop(locks.OWNERS_ENV, None)
    with another_run(REPO, tmp_path / "prepared") as run:
        done = subprocess.run(
            [sys.executable, "scripts/prepare_data.py", *path_overrides(tmp_path)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: " + (
        f"{tmp_path / 'prepared'} is being written by another run (pid {run.pid}: make all, since "
        f"{done.stderr.split('since ', 1)[1].split(')', 1)[0]}); "
        f"wait for it to finish or stop it (kill {run.pid}), then rerun"
    )
    assert not (tmp_path / "metrics").exists()


def test_make_params_is_refused_while_a_pipeline_runs_on_params_yaml(tmp_path, monkeypatch, capsys):
    from ortune import pipeline

    shutil.copytree(REPO / "conf", tmp_path / "conf")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv(locks.OWNERS_ENV, raising=False)
    assert pipeline.main(["params"]) == 0
    before = (tmp_path / "params.yaml").read_bytes()
    with another_run(tmp_path, tmp_path / "params.yaml") as run:
        assert pipeline.main(["params", "lora.r=8"]) == 2
    error = capsys.readouterr().err
    assert (
        error.startswith(f"error: params.yaml is being written by another run (pid {run.pid}: make all")
        and error.count("\n") == 1
    )
    assert (tmp_path / "params.yaml").read_bytes() == before


def test_a_stage_knows_what_it_writes_from_dvc_yaml():
    params = {"paths": {"adapter": "models/adapter", "metrics": "metrics", "plots": "plots"}}
    assert locks.stage_outputs("train_qlora", params, REPO / "dvc.yaml") == [
        "models/adapter",
        "metrics/train.json",
        "plots/train_loss.csv",
    ]


def test_make_best_does_not_apply_an_experiment_under_a_running_pipeline(checkout, monkeypatch, capsys):
    import best
    from ortune import experiments

    shutil.copy(REPO / "dvc.yaml", checkout / "dvc.yaml")
    (checkout / "params.yaml").write_text("paths: {metrics: metrics}\n")
    monkeypatch.chdir(checkout)
    monkeypatch.delenv(locks.OWNERS_ENV, raising=False)
    monkeypatch.setattr(experiments, "load", lambda: [])
    monkeypatch.setattr(experiments, "pick_best", lambda found, *a: (type("E", (), {"name": "exp-a"}), ["exp-a wins"]))
    applied = []
    monkeypatch.setattr(
        best.subprocess, "run", lambda argv: applied.append(argv) or subprocess.CompletedProcess(argv, 0)
    )
    with another_run(checkout, checkout / "params.yaml") as run:
        assert best.main(["--apply"]) == 2
    assert not applied and f"params.yaml is being written by another run (pid {run.pid}" in capsys.readouterr().err
    assert best.main(["--apply"]) == 0 and applied == [["dvc", "exp", "apply", "--", "exp-a"]]


def test_dvc_locks_of_a_killed_run_left_as_a_zombie_are_released_and_a_live_runs_kept(tmp_path, zombie):
    """DVC counts a zombie as alive (psutil.pid_exists): a killed `make all` blocked every later run
    ("is busy, it is being blocked by") until .dvc/tmp/rwlock was deleted by hand."""
    from dvc.fs import localfs
    from dvc.lock import LockError
    from dvc.rwlock import rwlock

    tmp = tmp_path / ".dvc" / "tmp"
    tmp.mkdir(parents=True)
    (tmp_path / ".dvc" / "config").write_text("")
    killed = {"pid": zombie, "cmd": "dvc exp run"}
    live = {"pid": os.getpid(), "cmd": "dvc repro"}
    written, read, shared, busy = (str(tmp_path / name) for name in ("base.json", "model", "data", "other"))
    (tmp / "rwlock").write_text(
        json.dumps({"write": {written: killed, busy: live}, "read": {read: [killed], shared: [killed, live]}})
    )

    def take(path: str) -> None:
        with rwlock(str(tmp), localfs, "make all", [], [path], False):
            pass

    with pytest.raises(LockError, match="is being blocked by"):
        take(written)  # what CI hit: DVC alone never frees it

    assert locks.release_dead_dvc_locks(tmp_path) == sorted([written, read, shared])
    take(written)
    take(read)
    with pytest.raises(LockError, match="dvc repro"):
        take(shared)  # the live reader stays
    with pytest.raises(LockError, match="dvc repro"):
        take(busy)
    assert locks.release_dead_dvc_locks(tmp_path) == []


def test_no_dvc_lock_file_or_a_corrupt_one_is_left_for_dvc_to_report(tmp_path):
    assert locks.release_dead_dvc_locks(tmp_path) == []
    (tmp_path / ".dvc" / "tmp").mkdir(parents=True)
    (tmp_path / ".dvc" / "tmp" / "rwlock").write_text("{not json")
    assert locks.release_dead_dvc_locks(tmp_path) == []
    assert (tmp_path / ".dvc" / "tmp" / "rwlock").read_text() == "{not json"


def test_dvc_s_record_of_a_killed_workspace_run_is_forgotten_and_a_live_ones_kept(tmp_path, zombie):
    """DVC shows the workspace experiment as running while the pid in this record exists (a zombie's does)."""
    record = tmp_path / ".dvc" / "tmp" / "exps" / "run" / "workspace" / "workspace.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"pid": os.getpid(), "stdin": None, "stdout": None, "stderr": None}))
    assert not locks.forget_dead_workspace_run(tmp_path) and record.exists()
    record.write_text(json.dumps({"pid": zombie, "stdin": None, "stdout": None, "stderr": None}))
    assert locks.forget_dead_workspace_run(tmp_path) and not record.exists()
    assert not locks.forget_dead_workspace_run(tmp_path)  # none: nothing to do
