"""Pipeline overheads: `make all` from a clean throwaway clone of this working tree, per stage, then
no-op reruns; training throughput and the shipped model's parity from the run's metrics."""

from __future__ import annotations

import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from ortune.artifacts import read_json
from ortune_bench import ROOT, machine

# `make all` from a clean clone on 2 cores: the default (the real model, trained and exported for real), the
# tiny smoke run (issue 11) and the free-text example on the real model (issue 21: data=extract, 10 minutes).
# (name, overrides, goal in seconds)
PIPELINES = (("default", "", 360.0), ("tiny", "model=tiny-phi3", 90.0), ("extract", "data=extract", 600.0))


def headline(scores: dict) -> dict:
    """The run's headline from its metrics/eval.json: accuracy for labels, exact match for free text, on
    the test split with its 95 % interval, and the gain over the strongest baseline."""
    metric = "exact_match" if "exact_match" in scores else "accuracy"
    return {
        "metric": metric,
        "value": scores.get(metric),
        "ci95": (scores.get("ci95") or {}).get(metric),
        "n": scores.get("n"),
        "gain_over_strongest_baseline": scores.get("gain_over_strongest_baseline"),
        "strongest_baseline": (scores.get("strongest_baseline") or {}).get("name"),
    }


def stage_seconds(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Per-stage wall time from timestamped output lines: a stage runs from its "Running stage"
    line to the next one, or to the first DVC line after it that closes the run (else `end`)."""
    marks = [(t, m.group(1)) for t, line in lines if (m := re.search(r"Running stage '([^']+)'", line))]
    closing = [
        t for t, line in lines if re.match(r"(Ran experiment|Reproduced experiment|Use `dvc|To promote)", line.strip())
    ]
    result = {}
    for index, (started, name) in enumerate(marks):
        if index + 1 < len(marks):
            stop = marks[index + 1][0]
        else:
            stop = min([t for t in closing if t > started] or [end])
        result[name] = stop - started
    return result


def timed_lines(command: list[str], cwd: Path, env: dict) -> tuple[int, float, list[tuple[float, str]]]:
    """Run a command, timestamping each output line as it arrives (relative to the start)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in process.stdout]
    status = process.wait()
    return status, time.perf_counter() - started, lines


def throwaway_clone(root: Path) -> tuple[Path, dict]:
    """A clone of this checkout's working tree at root/ortune (ortune.workspace_clone: its own DVC cache and
    config, this checkout's .venv linked in), with params.yaml composed from conf/ whatever the workspace's
    holds: after `make best` or `make all ARGS=...` it is that experiment's, which make all in the clone
    refused. -> (the clone, the environment to run in it)"""
    from ortune.workspace_clone import clone_workspace

    clone = root / "ortune"
    env = clone_workspace(ROOT, clone, root / "home", params=(), PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    return clone, env


def run_pipeline(name: str, overrides: str, goal_s: float, log=print) -> dict:
    """`make all ARGS=<overrides>` from a clean throwaway clone, then no-op reruns."""
    with tempfile.TemporaryDirectory(prefix="ortune-bench-pipeline-") as scratch:
        clone, env = throwaway_clone(Path(scratch))
        # the venv is this checkout's (symlinked), never reinstalled
        make = ["make", "--no-print-directory", "-o", ".venv/.installed"]
        if overrides:
            make.append(f"ARGS={overrides}")
        log(f"  make all ({name}{': ' + overrides if overrides else ''}, clean clone) ...")
        machine.wait_for_quiet(time.perf_counter() + 120)
        before = machine.cpu_snapshot()
        status, wall, lines = timed_lines([*make, "all"], clone, env)
        busy = machine.other_cores(before, machine.cpu_snapshot())
        if status != 0:
            raise RuntimeError("make all failed in the throwaway clone:\n" + "\n".join(text for _, text in lines[-30:]))
        noop, reran = [], set()
        for _ in range(3):
            status, seconds, repro_lines = timed_lines([str(clone / ".venv/bin/dvc"), "repro"], clone, env)
            noop.append(seconds)
            reran |= set(stage_seconds(repro_lines, seconds))
        _, noop_make_all, _ = timed_lines([*make, "all"], clone, env)
        stages = stage_seconds(lines, wall)
        train = read_json(clone / "metrics/train.json", {})
        parity = read_json(clone / "metrics/onnx.json", {}).get("parity") or {}
        scores = read_json(clone / "metrics/eval.json", {})
        kept = keep_metrics(clone, name)
        log(f"  the run's metrics/ kept in {kept}")
        return {
            "name": name,
            "overrides": overrides,
            "goal_s": goal_s,
            "model": read_json(clone / "metrics/base.json", {}).get("model"),
            "make_all_s": wall,
            "make_all_other_cores": busy,
            "stages_s": stages,
            "outside_stages_s": wall - sum(stages.values()),
            "noop_repro_s": statistics.median(noop),
            "noop_repro_runs_s": noop,
            "noop_repro_reran": sorted(reran),
            "noop_make_all_s": noop_make_all,
            "train_tokens_per_s": train.get("tokens_per_second"),
            "train_seconds": train.get("train_seconds"),
            "padding_waste": train.get("padding_waste"),
            # build_onnx's own parity check: greedy labels (free text: whole outputs) of the shipped model vs
            # the merged PyTorch model
            "label_agreement": {"int4_vs_torch_fp32": parity.get("label_agreement"), "n": parity.get("prompts")},
            "free_text": "identical_outputs" in parity,
            "eval_accuracy": scores.get("accuracy"),
            "headline": headline(scores),
        }


def keep_metrics(clone: Path, name: str) -> Path:
    """The clone is thrown away; its metrics/ (every figure of the run) stays in bench/.cache/pipelines/."""
    import shutil

    from ortune_bench import cache_dir

    kept = cache_dir() / "pipelines" / name / "metrics"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(clone / "metrics", kept)
    return kept
