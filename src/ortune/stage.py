"""The thin entry point every stage script shares: config, seed, W&B, run, metrics file."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError

from ortune import config, provenance
from ortune.artifacts import write_json_atomic
from ortune.errors import OrtuneError


def main(stage: str, run: Callable[[DictConfig], dict], metrics_file: str) -> None:
    """Run `run(cfg)` for `stage` and write its metrics to <paths.metrics>/<metrics_file>.

    Command-line arguments are Hydra overrides (only accepted outside DVC).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = config.load(stage, sys.argv[1:])
        if "seed" in cfg:
            random.seed(cfg.seed)
        from ortune import tracking

        with tracking.open_run(stage, cfg) as tracker:
            metrics = run(cfg)
            tracker.log(metrics)
            tracker.summary(metrics)
        metrics["environment"] = provenance.package_versions(config.project_root())
        write_json_atomic(Path(cfg.paths.metrics) / metrics_file, metrics)
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except ConfigAttributeError as exc:
        # the stage read a setting it does not declare: DVC would not rerun it when that setting changes
        print(f"error: stage {stage} reads '{exc.full_key}', which dvc.yaml does not list under "
              f"stages.{stage}.params; add it there", file=sys.stderr)
        sys.exit(2)
