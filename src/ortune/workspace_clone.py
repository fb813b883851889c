"""A throwaway git clone of a working tree as it is: what the tests' end-to-end runs and `make bench`'s
pipeline timing start from. One copy of the logic, so that a fix reaches both (two copies had drifted)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

# run outputs of the working tree: a clone starts clean
LEFT_OUT = ("metrics/", "plots/", "dvc_plots/")
# what a clone must not inherit from its caller: DVC's stage context, the Makefile's per-target variables
# (a `make bench` or a stage calling this), the caller's virtual environment
INHERITED = ("DVC_STAGE", "DVC_ROOT", "VIRTUAL_ENV", "ORTUNE_ARGS", "ORTUNE_SWEEP", "ORTUNE_NAME", "ORTUNE_WANDB_DIR")


def isolated_env(home: Path, **env: str) -> dict:
    """This process's environment with DVC's and git's configuration kept in `home` (never the user's), a
    fixed git identity, and nothing of a caller's DVC stage or Makefile target (INHERITED); `env` added."""
    environment = {
        **os.environ,
        "HOME": str(home),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(home / "dvc-site"),
        "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        **env,
    }
    for name in INHERITED:
        if name not in env:
            environment.pop(name, None)
    return environment


def clone_workspace(
    source: Path, dest: Path, home: Path, model: str | None = None, params: tuple[str, ...] | None = None, **env: str
) -> dict:
    """git clone `source` into `dest` with its working tree's files copied over (tracked and new ones git
    does not ignore, run outputs left out), committed; `source`'s .venv linked in; DVC and git
    configuration isolated in `home`. -> the environment to run commands in the clone with (`env` added).
    `model`: the conf/model entry the clone's conf/config.yaml defaults to. `params`: None keeps the
    working tree's params.yaml; else params.yaml is composed from the clone's conf/ with these overrides,
    as `make params` does (after `make best` or `make all ARGS=...` the workspace's is an experiment's,
    which make all in the clone refuses without ortune's record of composing it, kept in .dvc/tmp)."""
    subprocess.run(["git", "clone", "-q", str(source), str(dest)], check=True)
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for rel in listed:
        if (source / rel).is_file() and not rel.startswith(LEFT_OUT):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, dest / rel)
    (dest / ".venv").symlink_to((source / ".venv").resolve())
    # The linked venv is the source's: a `make setup` in the clone (the README's flow) must find it installed,
    # never reinstall into it (that would point its editable ortune at the clone's src, deleted later)
    for pin in [*dest.glob("requirements*.txt"), dest / "pyproject.toml"]:
        os.utime(pin, (0, 0))
    environment = isolated_env(home, **{"PATH": f"{dest / '.venv/bin'}:{os.environ['PATH']}", **env})
    if model:
        conf = dest / "conf/config.yaml"
        conf.write_text(re.sub(r"(?m)^  - model: .*$", f"  - model: {model}", conf.read_text()))
    if params is not None:
        subprocess.run(
            [str(source / ".venv/bin/python"), "-m", "ortune.pipeline", "params", *params],
            cwd=dest,
            env=environment,
            check=True,
            capture_output=True,
        )
    subprocess.run(["git", "add", "-A"], cwd=dest, env=environment, check=True)
    # on branch main whatever the source is on (a detached worktree, a feature branch): the docs' commands
    # the tests replay push `main`
    subprocess.run(["git", "checkout", "-q", "-B", "main"], cwd=dest, env=environment, check=True)
    subprocess.run(["git", "commit", "-qm", "working tree", "--allow-empty"], cwd=dest, env=environment, check=True)
    return environment
