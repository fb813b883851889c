"""The DVC plots as one HTML page that renders offline: `make plots` (not a pipeline stage).

Shows every plot dvc.yaml declares (training loss, per-class F1, confusion matrix) for the
workspace, or compares revisions and experiments: `make plots REVS="HEAD exp-a1b2c"`.
Vega is inlined from src/ortune/vendor/vega/, so the page needs no network.

    python scripts/report.py [--out dvc_plots] [REV ...]
"""

from __future__ import annotations

import argparse
import sys

from ortune import lastgood
from ortune.errors import OrtuneError
from ortune.plots import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "revisions", nargs="*", help="git revisions or experiment names to compare (default: the workspace)"
    )
    parser.add_argument("--out", default="dvc_plots", help="output folder (default: dvc_plots)")
    args = parser.parse_args(argv)
    try:
        lastgood.recover()
        page = write_report(args.out, args.revisions)
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {page} (open it in a browser; it renders offline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
