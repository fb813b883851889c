"""ortune.workspace_clone: the one clone of a working tree that the tests' end-to-end runs (conftest's
clone_project) and make bench's pipeline timing start from."""

from __future__ import annotations

import os
import subprocess

from ortune.workspace_clone import clone_workspace

IDS = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _workspace(root):
    """A checkout with a committed file edited, a new file, run outputs and an ignored venv."""
    root.mkdir()
    (root / "conf").mkdir()
    (root / "conf/config.yaml").write_text("defaults:\n  - model: smollm2-135m\n  - data: tones\n")
    (root / ".gitignore").write_text("/.venv\n")
    (root / "pyproject.toml").write_text("[project]\n")
    (root / "params.yaml").write_text("lora:\n  r: 8\n")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "x"], cwd=root, check=True, env={**os.environ, **IDS})
    (root / "params.yaml").write_text("lora:\n  r: 16\n")  # edited, not committed
    (root / "new.py").write_text("NEW = 1\n")
    for output in ("metrics", "plots", "dvc_plots"):
        (root / output).mkdir()
        (root / output / "x.json").write_text("{}\n")
    (root / ".venv/bin").mkdir(parents=True)


def test_a_clone_holds_the_working_tree_committed_isolated_and_on_the_chosen_model(tmp_path, monkeypatch):
    source = tmp_path / "source"
    _workspace(source)
    # the caller's DVC stage and Makefile variables must not leak into the clone's commands
    monkeypatch.setenv("DVC_STAGE", "train")
    monkeypatch.setenv("ORTUNE_ARGS", "lora.r=8")
    clone, home = tmp_path / "ortune", tmp_path / "home"
    env = clone_workspace(source, clone, home, model="tiny-phi3", WANDB_MODE="offline")
    assert "DVC_STAGE" not in env and "ORTUNE_ARGS" not in env and env["WANDB_MODE"] == "offline"
    assert env["HOME"] == str(home) and env["DVC_GLOBAL_CONFIG_DIR"] == str(home / "dvc-global")
    assert env["PATH"].startswith(f"{clone / '.venv/bin'}:")
    assert (clone / ".venv").resolve() == (source / ".venv").resolve()
    # the venv's pins are older than its install marker: make setup in the clone never reinstalls into it
    assert (clone / "pyproject.toml").stat().st_mtime == 0
    assert (clone / "conf/config.yaml").read_text() == "defaults:\n  - model: tiny-phi3\n  - data: tones\n"
    # params=None: the working tree's params.yaml as it is, edits included
    assert (clone / "params.yaml").read_text() == "lora:\n  r: 16\n"
    assert (clone / "new.py").read_text() == "NEW = 1\n"
    assert not any((clone / output).exists() for output in ("metrics", "plots", "dvc_plots")), "run outputs left out"
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, env=env, capture_output=True, text=True)
    assert status.stdout == "", "everything the clone holds is committed"


def test_a_clone_of_a_detached_checkout_is_on_branch_main(tmp_path):
    """The docs' sharing flow (tests/test_pipeline.py) pushes `main`: run from a detached worktree (or any other
    branch), the clone followed the source's HEAD and that push failed with "src refspec main"."""
    source = tmp_path / "source"
    _workspace(source)
    subprocess.run(["git", "checkout", "-q", "--detach"], cwd=source, check=True)
    clone = tmp_path / "ortune"
    env = clone_workspace(source, clone, tmp_path / "home")
    branch = subprocess.run(["git", "branch", "--show-current"], cwd=clone, env=env, capture_output=True, text=True)
    assert branch.stdout.strip() == "main"
