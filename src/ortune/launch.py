"""Multi-process training: with `train.num_processes` x `train.num_nodes` > 1 the stage re-launches
its own script through torchrun (default) or accelerate. Every process then runs the same stage with
the same config (params.yaml under DVC, the same overrides by hand); rank 0 alone opens the W&B run
and writes outputs and metrics.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError

from ortune import config, stage
from ortune.errors import OrtuneError

log = logging.getLogger("ortune")


def launched() -> bool:
    """True inside a process started by torchrun or accelerate (both set these)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def expected_world_size(train: DictConfig) -> int:
    return train.num_processes * train.num_nodes


def check_world_size(train: DictConfig) -> int:
    """The world the settings ask for must be the one we are in: launchers can silently start fewer
    processes (`accelerate launch --cpu --num_processes 2` starts one)."""
    expected = expected_world_size(train)
    actual = int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1
    if expected > 1 and not launched():
        raise OrtuneError(
            f"train.num_processes={train.num_processes} x train.num_nodes={train.num_nodes}: run the stage as "
            "`python scripts/train_qlora.py` (or dvc repro), which launches the processes"
        )
    if actual != expected:
        raise OrtuneError(
            f"train.num_processes={train.num_processes} x train.num_nodes={train.num_nodes} asks for {expected} "
            f"processes but the launcher started {actual}; with train.launcher={train.launcher} check its flags"
        )
    return actual


def command(train: DictConfig, script: str, argv: list[str], cuda: bool) -> list[str]:
    """The launcher command line that runs `script argv` in every process of this node."""
    if train.launcher == "accelerate":
        if not cuda:
            raise OrtuneError(
                "train.launcher=accelerate needs CUDA: on CPU `accelerate launch --cpu` silently runs one "
                "process; use train.launcher=torchrun (gloo)"
            )
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(expected_world_size(train)),
            "--num_machines",
            str(train.num_nodes),
            "--machine_rank",
            str(train.node_rank),
            "--main_process_ip",
            train.master_addr,
            "--main_process_port",
            str(train.master_port),
        ]
        cmd += ["--config_file", train.accelerate_config] if train.accelerate_config else ["--multi_gpu"]
        return [*cmd, script, *argv]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(train.num_processes)]
    if train.num_nodes == 1:
        # a free port chosen by torchrun: concurrent runs on one machine never collide
        cmd.append("--standalone")
    else:
        cmd += [
            "--nnodes",
            str(train.num_nodes),
            "--node_rank",
            str(train.node_rank),
            "--master_addr",
            train.master_addr,
            "--master_port",
            str(train.master_port),
        ]
    return [*cmd, script, *argv]


def main(stage_name: str, run: Callable[[DictConfig], dict], metrics_file: str, script: str) -> None:
    """The stage entry point: launch the processes if the settings ask for several, else run the stage."""
    if not launched():
        cfg = _config_or_none(stage_name)
        if cfg is not None and expected_world_size(cfg.train) > 1:
            sys.exit(_launch(cfg.train, script))
    elif rank() != 0:
        _run_worker(stage_name, run)
        return
    stage.main(stage_name, run, metrics_file)


def _config_or_none(stage_name: str) -> DictConfig | None:
    # A config that does not load is reported by stage.main, in the usual one-line form.
    try:
        return config.load(stage_name, sys.argv[1:])
    except (OrtuneError, ConfigAttributeError):
        return None


def _launch(train: DictConfig, script: str) -> int:
    import torch

    try:
        cmd = command(train, script, sys.argv[1:], torch.cuda.is_available())
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"launching {expected_world_size(train)} processes: {' '.join(cmd)}", file=sys.stderr, flush=True)
    child = subprocess.Popen(cmd)
    received: list[int] = []

    def forward(signum, frame):
        # the launcher passes it on to every process, which checkpoints and stops
        received.append(signum)
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = child.wait()
    # torchrun reports a forwarded signal as a failure (1); say "terminated" like a single process does
    return 128 + received[0] if received and status != 0 else status


def _run_worker(stage_name: str, run: Callable[[DictConfig], dict]) -> None:
    """Ranks other than 0 train in lockstep but log nothing to W&B and write no metrics."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        run(config.load(stage_name, sys.argv[1:]))
    except OrtuneError as exc:
        print(f"error: rank {rank()}: {exc}", file=sys.stderr)
        sys.exit(2)
    except stage.Terminated:
        sys.exit(143)
