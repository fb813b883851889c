"""Nothing lost: a run that fails, is interrupted or is killed leaves the workspace as the last successful
run left it (ortune.lastgood). Unit tests on a temp folder; end to end on the tiny model in a fresh clone:
a bad data file, a failure inside build_onnx, and a kill -9 during eval."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import clone_project, make_in_clone, ran_stages
from ortune import lastgood
from ortune.artifacts import owner_tag

# ---- unit: the snapshot ------------------------------------------------------------------------------


def state(root: Path, names=("params.yaml", "dvc.lock", "models", "data/prepared", "metrics", "plots")) -> dict:
    """Every file under these paths with its content hash (None for an absent path)."""
    found: dict = {}
    for name in names:
        path = root / name
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and "/." not in f"/{p.relative_to(root)}"):
                found[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
        elif path.is_file():
            found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[name] = None
    return found


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  eval:\n    cmd: x\n    outs: [models/onnx]\n")
    (tmp_path / "models/onnx").mkdir(parents=True)
    (tmp_path / "models/onnx/model.onnx.data").write_bytes(os.urandom(lastgood.LINK_FROM_BYTES + 10))
    (tmp_path / "models/onnx/genai_config.json").write_text("{}")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text('{"accuracy": 0.9}')
    return tmp_path


OUTPUTS = ["models/onnx", "metrics/eval.json", "metrics/onnx.json", "data/prepared"]


def wreck(root: Path) -> None:
    """What a failing run leaves: outputs removed, a half-written one, new files, changed params."""
    import shutil

    shutil.rmtree(root / "models/onnx")
    (root / "metrics/eval.json").unlink()
    (root / "metrics/onnx.json").write_text("{half")
    (root / "data/prepared").mkdir(parents=True)
    (root / "data/prepared/train.jsonl").write_text("{}\n")
    (root / "params.yaml").write_text("seed: 2\n")
    (root / "dvc.lock").write_text("stages: {changed: 1}\n")


def test_a_failed_run_is_rolled_back_to_the_state_before_it(workspace):
    before = state(workspace)
    kept = lastgood.Snapshot(workspace)
    kept.save(OUTPUTS, "make all")
    wreck(workspace)
    changed = kept.restore()
    assert state(workspace) == before
    assert not (workspace / "data/prepared").exists(), "what the failed run created where nothing was is removed"
    assert {"models/onnx", "metrics/eval.json", "metrics/onnx.json", "params.yaml", "dvc.lock"} <= set(changed)
    assert kept.pending() is None and not kept.folder.exists()


def test_large_files_are_kept_as_links_small_ones_as_copies(workspace):
    kept = lastgood.Snapshot(workspace)
    kept.save(OUTPUTS, "make all")
    files = kept.folder / "files"
    big, small = "models/onnx/model.onnx.data", "metrics/eval.json"
    assert (files / big).stat().st_ino == (workspace / big).stat().st_ino, "no copy of a model's weights"
    assert (files / small).stat().st_ino != (workspace / small).stat().st_ino
    # a small file rewritten in place (not replaced) must not change what was kept
    with open(workspace / small, "r+") as handle:
        handle.write('{"accuracy": 0.1}')
    kept.restore()
    assert json.loads((workspace / small).read_text()) == {"accuracy": 0.9}


def test_a_successful_run_drops_what_was_kept(workspace):
    kept = lastgood.Snapshot(workspace)
    kept.save(OUTPUTS, "make all")
    (workspace / "metrics/eval.json").write_text('{"accuracy": 0.95}')
    kept.drop()
    assert kept.pending() is None
    assert lastgood.Snapshot(workspace).restore() == []
    assert json.loads((workspace / "metrics/eval.json").read_text()) == {"accuracy": 0.95}


def test_paths_outside_the_workspace_are_never_kept_or_removed(workspace, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "x.json"
    kept = lastgood.Snapshot(workspace)
    kept.save([str(outside)], "make all")
    outside.write_text("{}")
    kept.restore()
    assert outside.read_text() == "{}"


def killed_snapshot(root: Path) -> lastgood.Snapshot:
    """A snapshot whose owner process is gone, as SIGKILL leaves it."""
    kept = lastgood.Snapshot(root)
    kept.save(OUTPUTS, "make all")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = kept.pending()
    record["owner"] = owner_tag().rsplit("-", 1)[0] + f"-{dead.pid}"
    kept.manifest.write_text(json.dumps(record))
    return kept


def test_a_killed_runs_leftovers_are_restored_by_the_next_command(workspace, capsys):
    before = state(workspace)
    killed_snapshot(workspace)
    wreck(workspace)
    lastgood.recover(workspace)
    assert state(workspace) == before
    message = capsys.readouterr().err
    assert "was killed before it finished" in message and "models/onnx" in message


def test_a_live_runs_snapshot_is_never_touched(workspace):
    kept = lastgood.Snapshot(workspace)
    kept.save(OUTPUTS, "make all")  # owned by this (live) process
    wreck(workspace)
    lastgood.recover(workspace)
    assert (workspace / "metrics/onnx.json").read_text() == "{half", "a live run's outputs are its own"
    assert kept.pending() is not None


def test_an_interrupted_restore_finishes_on_the_next_try(workspace):
    before = state(workspace)
    kept = killed_snapshot(workspace)
    wreck(workspace)
    # the first entries were already put back when the restore itself was killed
    record = kept.pending()
    first = next(rel for rel, present in record["paths"].items() if present)
    (workspace / first).unlink()
    os.replace(kept.folder / "files" / first, workspace / first)
    assert lastgood.Snapshot(workspace).recover_if_killed()
    assert state(workspace) == before


# ---- end to end: make all in a fresh clone on the tiny model ----------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return clone_project(tmp_path_factory, "lastgood", WANDB_MODE="disabled")


def make(project, *args: str, check: bool = True):
    return make_in_clone(project, *args, timeout=1500, check=check)


@pytest.mark.slow
def test_a_bad_data_file_keeps_the_last_good_run(project, tmp_path):
    root, _ = project
    make(project, "all")
    before = state(root)
    assert before["metrics/data.json"] and any(k.startswith("data/prepared/") for k in before)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"phrase":"x","tone":["a"]}\n')
    failed = make(project, "all", f"ARGS=data.path={bad}", check=False)
    assert failed.returncode == 2, failed.stderr
    assert "the workspace is as the last successful run left it" in failed.stderr
    assert state(root) == before
    assert ran_stages(make(project, "all").stdout) == set(), "dvc.lock and the outputs agree again"


@pytest.mark.slow
def test_a_failure_inside_build_onnx_keeps_the_last_good_model(project, tmp_path):
    root, _ = project
    make(project, "all")
    before = state(root)
    # settings that compose, so DVC starts and reruns build_onnx, which then refuses the adapter it reads
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    failed = make(project, "all", f"ARGS=onnx.adapter=separate +onnx.extra_adapters.other={tmp_path}", check=False)
    assert failed.returncode != 0
    assert "Running stage 'build_onnx'" in failed.stdout and "peft_type=IA3" in failed.stderr
    assert "the workspace is as the last successful run left it" in failed.stderr
    assert state(root) == before
    assert make(project, "predict", "TEXT=what a lovely day").stdout.strip()


@contextlib.contextmanager
def reaping_nothing():
    """Make this process the reaper of its orphaned descendants and reap none of them until the block
    ends, as a container whose init does not reap: a killed run's processes stay zombies (CI's case)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_CHILD_SUBREAPER = 36
    assert prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


@pytest.mark.slow
def test_a_kill_9_during_eval_is_restored_before_predict_reads_the_model(project):
    root, env = project
    make(project, "all")
    before = state(root)
    with reaping_nothing():
        killed_during_eval(project)
        predicted = make(project, "predict", "TEXT=what a lovely day")
        assert "was killed before it finished" in predicted.stderr
        assert predicted.stdout.strip()
        assert state(root) == before
        table = make(project, "compare").stdout
        assert "running" not in table.lower(), table
        # the killed `dvc exp run` is a zombie still holding DVC's locks: the next run must not be refused
        again = make(project, "all")
    assert "released DVC's locks" in again.stderr
    assert ran_stages(again.stdout) == set()


def killed_during_eval(project) -> None:
    root, env = project
    run = subprocess.Popen(
        # bounded like every make a test runs (timeout leads the process group that is killed below)
        [
            "timeout",
            "900",
            "make",
            "--no-print-directory",
            "-o",
            ".venv/.installed",
            "all",
            "ARGS=eval.latency.repeats=2",
        ],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = ""
    deadline = time.monotonic() + 900
    while "Running stage 'eval'" not in seen and time.monotonic() < deadline:
        line = run.stdout.readline()
        if not line:
            break
        seen += line
    assert "Running stage 'eval'" in seen, seen[-3000:]
    time.sleep(3)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert not (root / "metrics/eval.json").exists(), "DVC removed eval's outputs before running it"


def test_a_killed_owner_left_as_a_zombie_counts_as_gone(zombie):
    """SIGKILL of a process group leaves children nobody reaps (zombies) where init does not reap: they
    answer kill(pid, 0) but will never write again."""
    from ortune.artifacts import pid_alive

    assert not pid_alive(zombie)
    assert pid_alive(os.getpid())


def test_what_a_killed_dvc_exp_run_staged_is_unstaged(workspace):
    """`dvc exp run` stages the experiment's params.yaml while it runs; killed, it leaves that in git's index
    and the next `dvc exp run` stops on 'Stash apply resulted in merge conflicts'."""
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env = {**os.environ, **git}
    for command in (["git", "init", "-q"], ["git", "add", "params.yaml"], ["git", "commit", "-qm", "x"]):
        subprocess.run(command, cwd=workspace, env=env, check=True)
    kept = killed_snapshot(workspace)
    (workspace / "params.yaml").write_text("seed: 3\n")
    subprocess.run(["git", "add", "params.yaml"], cwd=workspace, env=env, check=True)
    # meanwhile the user stages and commits work of their own: the restore leaves that alone
    (workspace / "notes.md").write_text("mine\n")
    subprocess.run(["git", "add", "notes.md"], cwd=workspace, env=env, check=True)
    kept.recover_if_killed()
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=workspace, capture_output=True, text=True)
    assert staged.stdout == "notes.md\n" and (workspace / "params.yaml").read_text() == "seed: 1\n"
