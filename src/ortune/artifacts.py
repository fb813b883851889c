"""Atomic outputs: a stage's files appear complete or not at all, even if it is killed mid-write
(and the few helpers that read them back: JSON files, folder sizes).

Temp files and folders are named after the process that owns them (`.<name>.tmp-<host>-<pid>-<random>`),
so that a run cleaning up after a killed one removes only leftovers whose owner is gone, never the
live temp folder of another run writing beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

# pids are per machine: a leftover made on another host (a shared file system) cannot be judged dead
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_OWNED = re.compile(r"\.(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-")


def owner_tag() -> str:
    return f"{HOST}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    # a killed process nobody reaped yet (its parent died with it, and the container's init does not
    # reap) still answers kill(0) as a zombie: it will never write again
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def owner_gone(tag: str) -> bool:
    """Whether the process an owner_tag() names has ended (never for another machine's: unknowable)."""
    host, _, pid = tag.strip().rpartition("-")
    if not pid.isdigit():
        return True
    return host == HOST and not pid_alive(int(pid))


def _owner_gone(name: str) -> bool:
    match = _OWNED.search(name)
    if match is None:
        return True  # named by an ortune before temp names carried their owner: nothing live uses it
    return owner_gone(f"{match['host']}-{match['pid']}")


def _umask() -> int:
    # /proc avoids os.umask's set-and-restore, which races with threads creating files meanwhile
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _share(path: Path, mode: int) -> None:
    """mkdtemp/mkstemp create owner-only entries; outputs are shared like any file the user creates
    (a colleague in the same workspace, a DVC cache on shared storage)."""
    os.chmod(path, mode & ~_umask())


def owned_temp_dir(final: str | Path, label: str = "") -> Path:
    """An empty, owner-named folder beside `final` (removed by a later run once this process is gone)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{owner_tag()}-{label}", dir=final.parent))
    _share(tmp, 0o777)
    return tmp


@contextlib.contextmanager
def _swap_lock(folder: Path) -> Iterator[None]:
    """Serialize the two renames of concurrent writers of one output, so neither meets a half-swapped one."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):  # file systems without flock: the renames stay atomic each
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    tmp = owned_temp_dir(final)
    try:
        yield tmp
        with _swap_lock(final.parent):
            if final.exists():
                # rename away first so a crash between the two renames never leaves a mixed folder
                trash = final.with_name(f".{final.name}.old-{owner_tag()}-{secrets.token_hex(4)}")
                os.replace(final, trash)
                os.replace(tmp, final)
            else:
                trash = None
                os.replace(tmp, final)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_leftovers(final: Path) -> None:
    """Temp entries of an earlier run killed with SIGKILL (no cleanup ran) are garbage once their
    owner is gone; those of a live run (another writer, right now) are left alone."""
    for pattern in (f".{final.name}.tmp-*", f".{final.name}.old-*"):
        for stale in final.parent.glob(pattern):
            if not _owner_gone(stale.name):
                continue
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()


def write_bytes_atomic(path: str | Path, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{owner_tag()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        _share(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | Path, default=None):
    """A JSON file's content, or `default` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def folder_megabytes(*folders: str | Path) -> float:
    """The size on disk of every file in these folders, in MiB."""
    return sum(f.stat().st_size for folder in folders for f in Path(folder).rglob("*") if f.is_file()) / 2**20
