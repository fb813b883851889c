"""Weights & Biases, optional: one run per stage, grouped by the DVC experiment name.

The mode comes from WANDB_MODE when set, else from `wandb.mode`. `disabled` never imports wandb.
`online` without credentials falls back to `offline` with a warning instead of prompting or hanging.
Only the stage's own settings are logged as the run config; secrets never enter the config.
"""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ortune.config import project_root

log = logging.getLogger("ortune")
# How long an online run may wait for the W&B server before ortune falls back to offline.
ONLINE_INIT_TIMEOUT_S = 20


class Tracker:
    def __init__(self, run=None):
        self._run = run

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self._run is not None:
            numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._run.log(numeric, step=step)

    def summary(self, metrics: dict) -> None:
        if self._run is not None:
            for key, value in metrics.items():
                self._run.summary[key] = value

    def log_media(self, items: dict) -> None:
        """Tables, charts and images: anything wandb.log takes."""
        if self._run is not None:
            self._run.log(items)


_current: Tracker | None = None


def resolve_mode(configured: str) -> str:
    mode = os.environ.get("WANDB_MODE") or configured
    if mode == "dryrun":
        mode = "offline"
    if mode == "online" and not _has_credentials():
        log.warning("wandb.mode=online but no WANDB_API_KEY or netrc login: logging offline instead")
        mode = "offline"
    return mode


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    with contextlib.suppress(FileNotFoundError, netrc.NetrcParseError, OSError):
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    return False


def parent_workspace() -> Path:
    """Where runs must outlive the stage: a queued or temp experiment runs in a copy of the repo that DVC
    deletes afterwards, and DVC_ROOT names the parent workspace only there. The one deliberate use of
    DVC_ROOT: settings are read from the copy (ortune.config.project_root)."""
    return Path(os.environ.get("DVC_ROOT") or project_root())


def experiment_name() -> str:
    return os.environ.get("DVC_EXP_NAME") or "workspace"


@contextlib.contextmanager
def open_run(stage: str, cfg: DictConfig) -> Iterator[Tracker]:
    mode = resolve_mode(cfg.wandb.mode)
    if mode == "disabled":
        yield Tracker()
        return
    import wandb

    from ortune import provenance

    root = project_root()
    run_dir = Path(os.environ.get("ORTUNE_WANDB_DIR") or parent_workspace() / cfg.wandb.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    group = experiment_name()
    # the checkout that ran: for a queued experiment, its copy's commit and dvc.lock, not the parent's
    commit = provenance.git_commit(root)
    lock = provenance.dvc_lock_digest(root)
    tags = [f"git:{commit[:12]}" if commit else "git:none", f"dvc.lock:{lock}" if lock else "dvc.lock:none"]
    init_args = dict(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        dir=str(run_dir),
        group=group,
        job_type=stage,
        name=f"{group}-{stage}",
        tags=tags,
        config={**OmegaConf.to_container(cfg, resolve=True), "environment": provenance.package_versions(root)},
        settings=wandb.Settings(console="off", silent=True, init_timeout=ONLINE_INIT_TIMEOUT_S),
        reinit="create_new",
    )
    try:
        run = wandb.init(mode=mode, **init_args)
    except Exception as exc:  # noqa: BLE001 - wandb raises many types for an unreachable server
        if mode != "online":
            raise
        # credentials but no reachable server: results matter more than the dashboard
        log.warning("W&B online init failed (%s): logging offline instead", type(exc).__name__)
        run = wandb.init(mode="offline", **init_args)
    global _current
    _current = Tracker(run)
    try:
        yield _current
    finally:
        _current = None
        run.finish()


def current() -> Tracker:
    """The open run's tracker (inactive outside open_run or with W&B off): for media a stage logs
    itself, like eval's predictions table. wandb.run is no help: reinit="create_new" leaves it None."""
    return _current or Tracker()
