"""One live writer per output: a run that would write what another live run is writing is refused.

DVC serializes two `dvc repro`/`dvc exp run` of one checkout, but releases its lock while a stage's
command runs, and knows nothing of a stage run by hand or of `make params` rewriting params.yaml
under a running pipeline. So every writer takes an exclusive lock per path it writes:

- a stage (ortune.stage): its outputs as dvc.yaml declares them, and params.yaml when DVC runs it
  (it reads params.yaml, which `make params` would change under it);
- `make all`/`make repro` (ortune.pipeline): params.yaml and every stage's outputs, for the whole run;
- `make params`, `make best`, `make pull EXP=...`: params.yaml (and the outputs an apply checks out).

Locks are `flock`s on files in .dvc/tmp/ortune/locks/ (one per absolute path), so the kernel drops
them when their process dies, SIGKILL included: nothing stale to clean. DVC's own lock file is another
matter: `release_dead_dvc_locks` drops what a killed DVC left in it. A process's descendants (DVC's
stages under `make all`, torchrun's workers) may write what it holds: the holders' pids travel in
ORTUNE_LOCK_OWNERS.

    python -m ortune.locks CMD [ARG ...]   # run CMD holding params.yaml and every stage's outputs
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ortune.artifacts import HOST, pid_alive
from ortune.errors import OrtuneError

LOCK_DIR = Path(".dvc/tmp/ortune/locks")
OWNERS_ENV = "ORTUNE_LOCK_OWNERS"
_REFERENCE = re.compile(r"\$\{([^}]+)\}")


def _ancestors() -> set[str]:
    return set(os.environ.get(OWNERS_ENV, "").split())


def _shown(path: Path, root: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(root.resolve()))
    return str(path)


def _acquire(folder: Path, path: Path, what: str, root: Path) -> int | None:
    """An fd holding `path`'s lock; None where an ancestor holds it or the file system has no locks."""
    file = folder / f"{hashlib.sha1(str(path).encode()).hexdigest()[:20]}.lock"
    try:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666)  # a colleague sharing the checkout must be able to take it too
    except PermissionError:  # made by another user before: a read-only fd locks as well
        fd = os.open(file, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        os.close(fd)
        if holder.get("host") == HOST and str(holder.get("pid")) in _ancestors():
            return None
        pid = holder.get("pid", "?")
        alive = f" (pid {pid}: {holder.get('what', 'a run')}, since {holder.get('since', '?')})"
        raise OrtuneError(
            f"{_shown(path, root)} is being written by another run{alive}; wait for it to finish or "
            f"stop it (kill {pid}), then rerun"
        ) from None
    except OSError:  # no flock on this file system: run unguarded rather than not at all
        os.close(fd)
        return None
    record = json.dumps(
        {"pid": os.getpid(), "host": HOST, "what": what, "path": str(path), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    ).encode()
    with contextlib.suppress(OSError):  # read-only: the lock holds, only the note of who holds it is missing
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    return fd


@contextlib.contextmanager
def hold(paths: Iterable[str | Path], what: str, root: str | Path) -> Iterator[None]:
    """Hold the write locks of `paths` (relative ones are taken from the working directory, as the
    stages write them) for the block; refuse with one line if another live run holds one."""
    root = Path(root)
    if not (root / ".dvc").is_dir():
        yield  # not a DVC checkout: nothing of ortune's pipeline to protect
        return
    folder = root / LOCK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    held: list[int] = []
    before = os.environ.get(OWNERS_ENV)
    try:
        for path in sorted({Path(p).resolve() for p in paths}):
            fd = _acquire(folder, path, what, root)
            if fd is not None:
                held.append(fd)
        os.environ[OWNERS_ENV] = " ".join(sorted(_ancestors() | {str(os.getpid())}))
        yield
    finally:
        if before is None:
            os.environ.pop(OWNERS_ENV, None)
        else:
            os.environ[OWNERS_ENV] = before
        for fd in held:
            os.close(fd)


def _lookup(params: dict, key: str):
    node = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _resolve(entry: str, params: dict) -> str | None:
    missing = []

    def value(match: re.Match) -> str:
        found = _lookup(params, match[1].strip())
        if found is None:
            missing.append(match[1])
        return str(found)

    text = _REFERENCE.sub(value, entry)
    return None if missing else text


def stage_outputs(stage: str, params: dict, dvc_yaml: Path) -> list[str]:
    """The paths dvc.yaml says `stage` writes (outs, metrics, plots), with params filled in."""
    import yaml

    spec = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"].get(stage) or {}
    found = []
    for section in ("outs", "metrics", "plots"):
        for entry in spec.get(section) or []:
            name = entry if isinstance(entry, str) else next(iter(entry))
            if (path := _resolve(name, params)) is not None:
                found.append(path)
    return found


def pipeline_outputs(params: dict, dvc_yaml: Path) -> list[str]:
    import yaml

    stages = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))["stages"]
    return [path for stage in stages for path in stage_outputs(stage, params, dvc_yaml)]


def _dead(info) -> bool:
    try:
        return not pid_alive(int(info["pid"]))
    except (TypeError, KeyError, ValueError):
        return False  # not DVC's format: DVC judges it (and names the file) itself


def release_dead_dvc_locks(root: str | Path) -> list[str]:
    """Drop the entries of DVC's own lock file (.dvc/tmp/rwlock) whose process is gone; the paths freed.

    DVC judges an owner by psutil.pid_exists, which is true of a zombie: a `dvc exp run` killed with its
    process group where the container's init does not reap leaves one, and every later run is refused
    ("is busy, it is being blocked by") until someone deletes the file by hand. An entry is dropped only
    when its process has ended (a zombie never runs again), so a live DVC run keeps every lock it holds.
    """
    lock_dir = Path(root) / ".dvc" / "tmp"
    try:
        recorded = json.loads((lock_dir / "rwlock").read_text(encoding="utf-8"))
        infos = [*recorded.get("write", {}).values(), *(i for v in recorded.get("read", {}).values() for i in v)]
    except (OSError, ValueError, AttributeError, TypeError):
        return []  # none, or not readable as DVC writes it: DVC's own error names it
    if not any(_dead(info) for info in infos):
        return []  # the common case, without importing DVC
    from dvc.config import Config
    from dvc.exceptions import DvcException
    from dvc.fs import localfs
    from dvc.rwlock import _edit_rwlock  # under DVC's own guard: a DVC run starting now waits for this edit

    freed: set[str] = set()
    try:
        hardlink = Config(dvc_dir=str(lock_dir.parent))["core"].get("hardlink_lock", False)
        with _edit_rwlock(str(lock_dir), localfs, hardlink) as lock:
            for path, info in list(lock["write"].items()):
                if _dead(info):
                    del lock["write"][path]
                    freed.add(path)
            for path, readers in list(lock["read"].items()):
                alive = [info for info in readers if not _dead(info)]
                if len(alive) < len(readers):
                    freed.add(path)
                    if alive:
                        lock["read"][path] = alive
                    else:
                        del lock["read"][path]
    except DvcException:
        return []  # DVC reports the same problem itself when it runs
    return sorted(freed)


def forget_dead_workspace_run(root: str | Path) -> bool:
    """Remove DVC's record of a `dvc exp run` in the workspace (.dvc/tmp/exps/run/workspace/workspace.json) when
    its process has ended; whether it did. DVC removes it itself when the pid no longer exists, but a zombie's
    does, so `make compare` listed a run killed minutes ago as `running`."""
    record = Path(root) / ".dvc" / "tmp" / "exps" / "run" / "workspace" / "workspace.json"
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or not _dead(info):
        return False
    record.unlink(missing_ok=True)
    return True


def workspace_paths(root: Path) -> list[str]:
    """params.yaml and what every stage writes under it: the paths a run of the pipeline holds."""
    import yaml

    params_file = root / "params.yaml"
    params = yaml.safe_load(params_file.read_text(encoding="utf-8")) if params_file.is_file() else {}
    return [str(params_file), *pipeline_outputs(params or {}, root / "dvc.yaml")]


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m ortune.locks CMD [ARG ...]", file=sys.stderr)
        return 2
    root = Path.cwd()
    try:
        with hold(workspace_paths(root), f"`{' '.join(argv)[:80]}`", root):
            return subprocess.run(argv).returncode
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
