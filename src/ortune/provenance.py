"""What an experiment ran on: installed versions of the pinned packages, git commit, dvc.lock digest.

Recorded in every stage's metrics file and W&B run, so that experiments from different
environments are told apart even when their params are identical.
"""

from __future__ import annotations

import hashlib
import platform
import re
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path


def pinned_names(requirements: Path) -> list[str]:
    names = []
    for line in requirements.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==", line)
        if match:
            names.append(match.group(1))
    return names


@lru_cache(maxsize=4)
def package_versions(root: Path) -> dict[str, str]:
    """Installed version of every package pinned in requirements.txt (and the Python version)."""
    versions = {"python": platform.python_version()}
    requirements = root / "requirements.txt"
    if not requirements.is_file():
        return versions
    for name in pinned_names(requirements):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(root: Path) -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def dvc_lock_digest(root: Path) -> str | None:
    lock = root / "dvc.lock"
    return hashlib.sha256(lock.read_bytes()).hexdigest()[:12] if lock.is_file() else None
