"""Pick the best DVC experiment on a metric under upper-bound constraints, say why, and apply it.

Reads `dvc exp show` (every experiment of the repo). Writes nothing unless asked:
`--apply` runs `dvc exp apply <best>` (workspace gets its params and outputs),
`--branch NAME` runs `dvc exp branch <best> NAME`.

    python scripts/best.py --metric eval.accuracy --max eval.ms_per_token=2.0 --apply
    make best METRIC=accuracy MAX_MS_PER_TOKEN=2.0
    python scripts/best.py --table        # = make compare
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ortune import experiments, lastgood, locks
from ortune.errors import OrtuneError


def parse_limits(pairs: list[str]) -> dict[str, float]:
    limits = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            limits[key] = float(value)
        except ValueError:
            raise OrtuneError(f"--max {pair}: expected METRIC=NUMBER, e.g. eval.ms_per_token=2.0") from None
        if not sep:
            raise OrtuneError(f"--max {pair}: expected METRIC=NUMBER")
    return limits


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", default="eval.accuracy", help="metric to maximize, as <file>.<key>")
    parser.add_argument("--minimize", action="store_true", help="lower is better")
    parser.add_argument("--max", action="append", default=[], metavar="METRIC=LIMIT", help="upper bound, repeatable")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--table", action="store_true", help="only print every experiment, best first")
    action.add_argument("--apply", action="store_true", help="dvc exp apply the winner")
    action.add_argument("--branch", metavar="NAME", help="dvc exp branch the winner into NAME")
    args = parser.parse_args(argv)
    metric = args.metric if "." in args.metric else f"eval.{args.metric}"
    try:
        lastgood.recover(Path.cwd())
        locks.forget_dead_workspace_run(Path.cwd())  # a killed run is not listed as running
        limits = {(k if "." in k else f"eval.{k}"): v for k, v in parse_limits(args.max).items()}
        found = experiments.load(unfinished=True) if args.table else experiments.load()
        experiments.check_metric(found, metric)
        for key in limits:
            experiments.check_metric(found, key, "--max")
        if args.table:
            print(experiments.compare_table(found, metric))
            return 0
        best, reasons = experiments.pick_best(found, metric, not args.minimize, limits)
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(reasons))
    if args.apply:
        # the apply rewrites params.yaml and the outputs: never under a running pipeline (ortune.locks)
        root = Path.cwd()
        try:
            with locks.hold(locks.workspace_paths(root), "make best (dvc exp apply)", root):
                return subprocess.run(["dvc", "exp", "apply", "--", best.name]).returncode
        except OrtuneError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.branch:
        # after `--`: BRANCH=-f is a branch name as typed (DVC refuses it), never DVC's --force
        return subprocess.run(["dvc", "exp", "branch", "--", best.name, args.branch]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
