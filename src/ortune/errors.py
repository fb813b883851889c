"""The one exception type users see: a single line saying what is wrong and how to fix it; and the
one line for everything else (a bug), whose traceback goes to a file the line names."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path


class OrtuneError(Exception):
    """Raised for bad input or configuration; stage entry points print it as one line and exit 2."""


def _log_folder() -> Path:
    """Beside the checkout's other run state (git-ignored). DVC_ROOT first: a queued experiment's copy
    of the repo is deleted after the run, and the log must outlive it."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]) / ".dvc/tmp/ortune/errors"
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / ".dvc").is_dir() and (folder / "dvc.yaml").is_file():
            return folder / ".dvc/tmp/ortune/errors"
    import tempfile

    return Path(tempfile.gettempdir()) / "ortune-errors"


def unexpected(exc: BaseException, who: str) -> str:
    """The last line for an exception that is not bad input: what it was, cut short, and where its
    full traceback is (written now, so a bug report carries it without a rerun)."""
    summary = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(summary) > 300:
        summary = summary[:300] + " ..."
    details = "".join(traceback.format_exception(exc))
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in who)
    try:
        folder = _log_folder()
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        log.write_text(f"{' '.join(sys.argv)}\n\n{details}", encoding="utf-8")
    except OSError:  # no room for a log (a full disk, a read-only checkout): the traceback goes above the line
        print(details, file=sys.stderr, end="")
        return f"error: {who} failed: {summary} (unexpected: the traceback is above; include it in a bug report)"
    return f"error: {who} failed: {summary} (unexpected: full traceback in {log}; include it in a bug report)"
