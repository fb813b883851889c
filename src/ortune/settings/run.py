"""paths.* and wandb.*: where the stages read and write, and where their logs go (no stage's results
depend on them, so every stage sees them: ortune.config.ALWAYS_VISIBLE)."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ortune.settings.fields import field_problems, setting


@dataclass
class WandbConfig:
    mode: str = setting(
        "W&B logging; the WANDB_MODE environment variable wins when set",
        choices=("offline", "online", "disabled"),
        message="{key}={value} must be {either}",
    )
    project: str = setting("the W&B project")
    entity: str | None = setting("the W&B team or user; null: your default")
    dir: str = setting("W&B writes its runs under <dir>/wandb/, relative to the repo root")


@dataclass
class PathsConfig:
    base_model: str = setting("the fetched base model")
    prepared: str = setting("the prepared train and eval splits")
    adapter: str = setting("the trained LoRA adapter")
    merged: str = setting("the base with the adapter merged in")
    onnx: str = setting("the built ONNX model")
    metrics: str = setting("every stage's metrics")
    plots: str = setting("the plots' data")


def wandb_problems(wandb: DictConfig):
    yield from field_problems(WandbConfig, wandb, "wandb.")


# What no stage may write to: the project's sources, settings and tools, and the raw data. A stage replaces its
# outputs whole (DVC deletes them before it runs the stage), so paths.onnx=src would delete the code.
PROTECTED = (
    "src",
    "scripts",
    "conf",
    "tests",
    "bench",
    "docs",
    "data/raw",
    ".git",
    ".dvc",
    ".venv",
    ".github",
    ".ci",
    "wandb",
    "dvc.yaml",
    "dvc.lock",
    "params.yaml",
    "Makefile",
    "README.md",
    "pyproject.toml",
    "requirements.txt",
    "requirements-nodeps.txt",
    "environment.yml",
)
# git-ignored folders inside a PROTECTED one where a tool points stages on purpose: make bench builds its models
# with build_onnx into its cache
UNPROTECTED = ("bench/.cache",)
FIX = "choose a folder of its own inside the repository, e.g. models/NAME"


def output_problems(paths: DictConfig, root: Path, workspace: bool) -> Iterator[str]:
    """Every paths.* that would overwrite the project: onto or over a PROTECTED path, the repository itself, or
    (for the workspace's pipeline, `workspace`) outside the repository, where DVC tracks nothing. Relative
    paths are the repository's, as DVC runs the stages there."""
    root = root.resolve()
    for f in dataclasses.fields(PathsConfig):
        key, value = f"paths.{f.name}", str(paths[f.name])
        if value.startswith("-"):
            yield f"{key}={value}: starts with '-' (programs would read it as an option); {FIX}"
            continue
        target = (root / Path(value).expanduser()).resolve()
        if root.is_relative_to(target):  # `/`, the home folder: replacing it would delete the repository
            yield f"{key}={value}: holds the repository ({root}); {FIX}"
            continue
        if not target.is_relative_to(root):
            if workspace:
                yield f"{key}={value}: outside the repository ({root}); DVC tracks outputs inside it: {FIX}"
            continue
        if any(target.is_relative_to(root / name) for name in UNPROTECTED):
            continue
        for name in PROTECTED:
            kept = root / name
            if target == kept or target.is_relative_to(kept) or kept.is_relative_to(target):
                where = "is" if target == kept else "is inside" if target.is_relative_to(kept) else "holds"
                yield f"{key}={value}: {where} {name}, which the pipeline must not overwrite; {FIX}"
                break


# st_mode test -> what the file is, for the one-line message
_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def unreadable_as_data(path: Path) -> str | None:
    """What is wrong with reading `path` as data: a symlink loop, or a file that is not regular (a FIFO would
    block the reader, and DVC's hashing of it, forever; a device never ends). None when it is fine or missing."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symlink loop (a link that leads back to itself); point it at the data"
        return None  # missing or unreadable: the stage that reads it says so
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = next((name for test, name in _SPECIAL if test(mode)), "a special file")
    return f"not a regular file ({kind}); reading it would never end: point it at a data file or folder"


def input_problems(cfg: DictConfig, root: Path) -> Iterator[str]:
    """data.path (and eval.path when set): what would hang or loop before any stage runs (DVC hashes a
    stage's dependencies first), so it is checked before `dvc exp run` starts; a folder's files too."""
    for key in ("data.path", "eval.path"):
        value = OmegaConf.select(cfg, key)
        if not value:
            continue
        path = root / Path(str(value)).expanduser()
        if problem := unreadable_as_data(path):
            yield f"{key}={value}: {problem}"
        elif path.is_dir():
            for folder, folders, files in os.walk(path):
                inside = next(
                    (
                        (name, found)
                        for name in sorted(folders + files)
                        if (found := unreadable_as_data(Path(folder) / name))
                    ),
                    None,
                )
                if inside:
                    yield f"{key}={value}: {Path(folder, inside[0]).relative_to(path)} is {inside[1]}"
                    break
