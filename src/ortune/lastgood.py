"""Nothing lost: a pipeline run that fails, is interrupted or is killed leaves the workspace as the
last successful run left it.

DVC removes a stage's outputs before it runs the stage, and ortune's metrics and plots are
`cache: false`, so without this a bad data file wipes data/prepared and metrics/data.json, and a
`kill -9` during build_onnx leaves no models/onnx for `make predict`. So `make all` and `make repro`
(ortune.pipeline) first keep the workspace's pipeline state:

- params.yaml, dvc.lock, ortune's record of what it composed (ortune.pipeline.STAMP), and every stage's
  outs, metrics and plots as dvc.yaml declares them, under the settings before and after the run;
- into .dvc/tmp/ortune/last-good/ (git- and DVC-ignored), as hard links where the file system has
  them (no copy of a model's gigabyte: the stages and DVC replace files, never rewrite one in place),
  and as copies of the small files, which nothing may then change under the snapshot.

The run succeeds: the snapshot is dropped. It fails (any exit status but 0, Ctrl-C and SIGTERM
included): every kept path is put back and every path the run created where there was none is
removed, then one line says so. It is killed (SIGKILL, a lost machine): the snapshot's marker names a
process that is gone, and the next ortune command that reads or writes the workspace (`make all`,
`repro`, `predict`, `chat`, `plots`, `compare`, `restore`) restores it first and says so.

    python -m ortune.lastgood restore   # `make restore`: put back what a killed run left half-done
    python -m ortune.lastgood recover   # the same, silent when there is nothing to do (`make pull`)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from ortune.artifacts import owner_gone, owner_tag, write_json_atomic

SNAPSHOT = Path(".dvc/tmp/ortune/last-good")
MANIFEST = "manifest.json"
# smaller files are copied: a copy cannot change when something rewrites the workspace's file in place
LINK_FROM_BYTES = 1 << 20
KEPT = ("params.yaml", "dvc.lock", ".dvc/tmp/ortune/params.composed.yaml")


def _relative(path: str | Path, root: Path) -> str | None:
    """`path` relative to root, or None where it lies outside it (never kept: not the workspace's)."""
    path = Path(path)
    absolute = (path if path.is_absolute() else root / path).resolve()
    try:
        rel = absolute.relative_to(root.resolve())
    except ValueError:
        return None
    if rel == Path(".") or (rel.parts[0] in (".git", ".dvc") and str(rel) not in KEPT):
        return None  # the repository itself, or DVC's and git's own state
    return str(rel)


def _place(source: Path, target: Path) -> None:
    """Hard-link (large files) or copy `source` to `target`, folders file by file."""
    if source.is_dir() and not source.is_symlink():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copystat(source, target)
        for entry in source.iterdir():
            _place(entry, target / entry.name)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
        return
    if source.stat().st_size >= LINK_FROM_BYTES:
        try:
            os.link(source, target)
            return
        except OSError:  # another device or no hard links: a copy keeps it as well
            pass
    shutil.copy2(source, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class Snapshot:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.folder = self.root / SNAPSHOT
        self.manifest = self.folder / MANIFEST

    def pending(self) -> dict | None:
        if not self.manifest.is_file():
            return None
        try:
            return json.loads(self.manifest.read_text(encoding="utf-8"))
        except ValueError:
            return None  # written atomically: a torn manifest cannot happen; an edited one is not ours

    def save(self, paths: Iterable[str | Path], what: str) -> None:
        """Keep `paths` (and params.yaml, dvc.lock, the compose record) as they are now."""
        if self.folder.exists():
            shutil.rmtree(self.folder)
        entries: dict[str, bool] = {}
        for path in [*KEPT, *paths]:
            rel = _relative(path, self.root)
            if rel is None or rel in entries:
                continue
            present = (self.root / rel).exists() or (self.root / rel).is_symlink()
            entries[rel] = present
            if present:
                _place(self.root / rel, self.folder / "files" / rel)
        # written last: a snapshot without its manifest is half made and is never restored from
        write_json_atomic(
            self.manifest,
            {"owner": owner_tag(), "what": what, "since": time.strftime("%Y-%m-%d %H:%M:%S"), "paths": entries},
        )

    def drop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.manifest.unlink()  # first: a kill during the removal leaves nothing to restore from
        shutil.rmtree(self.folder, ignore_errors=True)

    def restore(self) -> list[str]:
        """Put every kept path back as it was; remove those the run created. Returns what changed."""
        record = self.pending()
        if record is None:
            return []
        changed = []
        for rel, present in record["paths"].items():
            target, kept = self.root / rel, self.folder / "files" / rel
            if present and not (kept.exists() or kept.is_symlink()):
                continue  # already put back by a restore that was itself interrupted
            if present or target.exists() or target.is_symlink():
                changed.append(rel)
            _remove(target)
            if present:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(kept, target)
        self._unstage(list(record["paths"]))
        self.drop()
        return changed

    def _unstage(self, paths: list[str]) -> None:
        """`dvc exp run` stages the experiment's params.yaml, dvc.lock and metrics while it runs; one killed
        before it unstages them leaves them in git's index, and the next `dvc exp run` refuses to start
        ('Stash apply resulted in merge conflicts'). Only these paths go back to HEAD's entries: the index
        file itself is never replaced, so whatever else was staged or committed meanwhile stays."""
        if not (self.root / ".git").exists() or not paths:
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["git", "reset", "-q", "--", *(f":(literal){path}" for path in paths)],
                cwd=self.root,
                capture_output=True,
                timeout=60,
            )

    def recover_if_killed(self) -> str:
        """Restore what a run that was killed left (its owner is gone); '' when there is nothing to do."""
        record = self.pending()
        if record is None or not owner_gone(str(record.get("owner", ""))):
            return ""
        changed = self.restore()
        return (
            f"ortune: {record.get('what', 'a run')} (started {record.get('since', '?')}) was killed before it "
            f"finished; restored the outputs of the last successful run ({_listed(changed)})"
        )


def _listed(paths: list[str], limit: int = 5) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return (", ".join(paths[:limit]) + more) if paths else "nothing had changed"


def failed_message(what: str, status: int, changed: list[str]) -> str:
    return (
        f"{what} failed (exit {status}); the workspace is as the last successful run left it: restored "
        f"{_listed(changed)}"
    )


def recover(root: str | Path | None = None) -> None:
    """For the apps and tools that read the outputs: restore a killed run's leftovers first, saying so
    on stderr. Takes the workspace's locks, so a live run is never touched."""
    from ortune import locks

    root = Path(root or Path.cwd())
    snapshot = Snapshot(root)
    record = snapshot.pending()
    if record is None or not owner_gone(str(record.get("owner", ""))):
        return  # nothing kept, or the run that kept it is live and restores it itself if it fails
    with locks.hold(locks.workspace_paths(root), "restoring a killed run's outputs", root):
        if message := snapshot.recover_if_killed():
            print(message, file=sys.stderr)


def main(argv: list[str]) -> int:
    from ortune import locks
    from ortune.errors import OrtuneError

    if argv not in (["restore"], ["recover"]):
        print("usage: python -m ortune.lastgood {restore|recover}", file=sys.stderr)
        return 2
    root = Path.cwd()
    snapshot = Snapshot(root)
    try:
        if argv == ["recover"]:  # quiet unless a killed run's outputs were put back (make pull)
            recover(root)
            return 0
        with locks.hold(locks.workspace_paths(root), "make restore", root):
            print(snapshot.recover_if_killed() or "nothing to restore: no run was killed half-way")
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
