"""train_qlora's resume checkpoints: outside the stage's outs (DVC deletes those before a rerun), in a
folder keyed by a fingerprint of everything that shapes the trained weights, so a killed run resumes from
its own latest complete checkpoint and never from another configuration's."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ortune")

# Inputs whose versions change the trained weights: part of the checkpoint fingerprint.
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")
BIG_FILE = 64 * 2**20


def fingerprint(cfg: DictConfig, inputs: list[Path]) -> str:
    """Digest of everything that shapes the trained weights: the stage's settings, its input files
    (base model, data), its code and library versions. A checkpoint is resumed only under the same one."""
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in ("paths", "wandb")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for package in PACKAGES:
        digest.update(f"{package}=={_version(package)}\n".encode())
    for root in map(Path, inputs):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            name = file.relative_to(root) if root.is_dir() else file.name
            digest.update(f"{name}:{_file_digest(file)}\n".encode())
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def _file_digest(path: Path) -> str:
    """Content hash; for multi-GB weights, size plus head and tail keep it to a fraction of a second."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= BIG_FILE:
            digest.update(handle.read())
        else:
            digest.update(handle.read(BIG_FILE // 2))
            handle.seek(size - BIG_FILE // 2)
            digest.update(handle.read())
    return digest.hexdigest()


def checkpoint_dir(adapter: Path, run_fingerprint: str) -> Path:
    """models/.checkpoints/adapter-<fingerprint>: git-ignored, beside (not inside) the stage's outs."""
    return adapter.parent / ".checkpoints" / f"{adapter.name}-{run_fingerprint[:16]}"


def is_complete(checkpoint: Path, world_size: int) -> bool:
    """The trainer writes trainer_state.json last; a checkpoint killed mid-write lacks it or a piece."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    rng = ["rng_state.pth"] if world_size == 1 else [f"rng_state_{i}.pth" for i in range(world_size)]
    return all((checkpoint / name).is_file() for name in ["optimizer.pt", "scheduler.pt", *rng])


def checkpoint_step(checkpoint: Path) -> int:
    tail = checkpoint.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


# in a run's checkpoint folder: the process training into it (ortune.artifacts.owner_tag)
CHECKPOINT_OWNER = ".owner"


def resumable_checkpoint(folder: Path, world_size: int, tidy: bool) -> Path | None:
    """The latest complete checkpoint of this run, if any. With `tidy` (one process only), first
    claim the folder for this process, then delete half-written checkpoints and the checkpoints of
    other runs (other settings or inputs) whose training process is gone: a live one still uses them."""
    from ortune.artifacts import owner_gone, owner_tag, write_text_atomic

    if tidy:
        write_text_atomic(folder / CHECKPOINT_OWNER, owner_tag() + "\n")
        prefix = folder.name.rsplit("-", 1)[0]
        for other in folder.parent.glob(f"{prefix}-*"):
            if other == folder:
                continue
            try:
                owner = (other / CHECKPOINT_OWNER).read_text(encoding="utf-8")
            except OSError:
                owner = ""  # written before checkpoints had owners, or half-created: nothing live
            if owner and not owner_gone(owner):
                log.info("keeping checkpoints of another configuration, still training (%s): %s", owner.strip(), other)
                continue
            log.info("deleting checkpoints of another configuration: %s", other)
            shutil.rmtree(other, ignore_errors=True)
        for partial in folder.glob("checkpoint-*"):
            if not is_complete(partial, world_size):
                log.info("deleting incomplete checkpoint %s", partial)
                shutil.rmtree(partial, ignore_errors=True)
    done = [p for p in folder.glob("checkpoint-*") if checkpoint_step(p) >= 0 and is_complete(p, world_size)]
    return max(done, key=checkpoint_step) if done else None


def remove_checkpoints(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if folder.parent.is_dir() and not any(folder.parent.iterdir()):
        folder.parent.rmdir()
