"""The thin entry point every stage script shares: config, seed, W&B, run, metrics file.

It is also where failures become one line: a stage never ends in a library's stack trace (an
unexpected one goes to a log file the line names; ORTUNE_DEBUG=1 raises it), SIGTERM unwinds like an
exception so temp outputs are removed, and a stage refuses to start while another live run writes
its outputs (ortune.locks).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError

from ortune import config, locks, provenance
from ortune.artifacts import write_json_atomic
from ortune.errors import OrtuneError, unexpected


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so `finally` blocks clean up partial outputs."""


_terminated = False


def _raise_terminated(signum, frame):
    global _terminated
    # remembered too: a signal landing in a callback (an import lock, a __del__) has its exception
    # swallowed by Python ("Exception ignored in ..."), and the stage must still not report success
    _terminated = True
    raise Terminated()


def main(stage: str, run: Callable[[DictConfig], dict], metrics_file: str) -> None:
    """Run `run(cfg)` for `stage` and write its metrics to <paths.metrics>/<metrics_file>.

    Command-line arguments are Hydra overrides (only accepted outside DVC).
    Exit status: 0 done, 2 bad input or config, 1 unexpected failure, 143 terminated.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        cfg = config.load(stage, sys.argv[1:])
        if "seed" in cfg:
            random.seed(cfg.seed)
        from ortune import tracking

        with locks.hold(_writes(stage, cfg), f"stage {stage}", config.project_root()):
            with tracking.open_run(stage, cfg) as tracker:
                metrics = run(cfg)
                tracker.log(metrics)
                tracker.summary(metrics)
            if _terminated:
                raise Terminated()
            metrics["environment"] = provenance.package_versions(config.project_root())
            write_json_atomic(Path(cfg.paths.metrics) / metrics_file, metrics)
    except OrtuneError as exc:
        _fail(f"error: {exc}", 2)
    except ConfigAttributeError as exc:
        # the stage read a setting it does not declare: DVC would not rerun it when that setting changes
        _fail(
            f"error: stage {stage} reads '{exc.full_key}', which dvc.yaml does not list under "
            f"stages.{stage}.params; add it there",
            2,
        )
    except Terminated:
        _fail(f"error: stage {stage} terminated (SIGTERM); its partial outputs were removed, rerun it", 143)
    except KeyboardInterrupt:
        _fail(f"error: stage {stage} interrupted; its partial outputs were removed, rerun it", 130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence against deep library tracebacks
        if os.environ.get("ORTUNE_DEBUG"):
            raise
        if (full := _disk_full(exc)) is not None:
            _fail(
                f"error: disk full while stage {stage} was writing {full}; free space (or move the DVC cache) "
                "and rerun",
                1,
            )
        _fail(unexpected(exc, f"stage {stage}"), 1)


def _disk_full(exc: BaseException) -> str | None:
    """What was being written when the disk filled, or None if it did not. Libraries writing in native
    code (safetensors, onnx) report it in their own exception types, with the OS message inside."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(exc.filename or "its outputs")
        if any(sign in str(exc) for sign in ("No space left on device", "os error 28", "Disk quota exceeded")):
            return "its outputs"
        exc = exc.__cause__ or exc.__context__
    return None


def _writes(stage: str, cfg: DictConfig) -> list[str]:
    """What this stage writes (dvc.yaml's outs), and params.yaml under DVC: the stage read it at its
    start, and later stages of the same run read it too."""
    from omegaconf import OmegaConf

    root = config.project_root()
    writes = locks.stage_outputs(stage, OmegaConf.to_container(cfg, resolve=True), root / "dvc.yaml")
    return writes + ([str(root / "params.yaml")] if os.environ.get("DVC_STAGE") else [])


def _fail(message: str, status: int) -> None:
    print(message, file=sys.stderr)
    sys.exit(status)
