"""`make seeds N=3 [ARGS=...]`: the same run on N training seeds, and the mean and spread of its figures.

A run's 95 % interval (ortune.intervals) says how far its figure could move on other rows like the test
rows; it says nothing about how far it moves when only the training seed changes (LoRA's initial
weights, the shuffling order). This does: each seed is one `make all` (a DVC experiment) with
`train.seed` set, on the same prepared splits (the split follows the top-level `seed`, left alone), so
every run is judged on the same test rows. The first seed is the configured one (train.seed, else `seed`),
whose run DVC usually has already.

    python -m ortune.seeds 3 lora.r=32      # = make seeds N=3 ARGS="lora.r=32"
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import yaml

from ortune.errors import OrtuneError

# (eval.json key, name in the report): the test split's headline (the shipped model's), the merged PyTorch
# model's on the same rows with the shipped model's agreement with it (the control of a quantization claim),
# and the validation split's
FIGURES = (
    ("accuracy", "test accuracy"),
    ("macro_f1", "test macro-F1"),
    ("runtimes.merged.accuracy", "merged PyTorch test accuracy"),
    ("quantization_agreement", "agreement with merged"),
    ("validation.accuracy", "validation accuracy"),
)
# a figure's 95 % interval over the test rows, where eval.json has it, shown beside each seed's figure
INTERVALS = {"accuracy": "ci95.accuracy", "runtimes.merged.accuracy": "runtimes.merged.ci95.accuracy"}


def first_seed(params_text: str) -> int:
    """The training seed the settings give: train.seed, else the top-level seed."""
    settings = yaml.safe_load(params_text)
    seed = settings["train"].get("seed")
    return int(settings["seed"] if seed is None else seed)


def figure(scores: dict, key: str) -> float | None:
    for part in key.split("."):
        scores = scores.get(part) if isinstance(scores, dict) else None
    return scores if isinstance(scores, (int, float)) else None


def cell(scores: dict, key: str) -> str:
    """One seed's figure, with its 95 % interval over the test rows where eval.json has one."""
    value = figure(scores, key)
    if value is None:
        return "-"
    low, high = (figure(scores, f"{INTERVALS[key]}.{end}") if key in INTERVALS else None for end in ("low", "high"))
    return f"{value:.3f}" if low is None or high is None else f"{value:.3f} ({low:.3f}-{high:.3f})"


def report(runs: dict[int, dict]) -> str:
    """A table of each seed's figures, then each figure's mean, sample standard deviation and range."""
    names = [(key, name) for key, name in FIGURES if any(figure(s, key) is not None for s in runs.values())]
    rows = next(iter(runs.values())).get("n", "?")
    lines = [
        f"{len(runs)} training seeds, the same {rows} test rows:",
        "| train.seed | " + " | ".join(name for _, name in names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for seed, scores in runs.items():
        cells = [cell(scores, key) for key, _ in names]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    for key, name in names:
        values = [v for v in (figure(s, key) for s in runs.values()) if v is not None]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"{name}: mean {statistics.mean(values):.3f}, standard deviation {spread:.3f} over {len(values)} "
            f"seeds (min {min(values):.3f}, max {max(values):.3f})"
        )
    return "\n".join(lines)


def run(n: int, overrides: list[str]) -> int:
    from ortune import pipeline

    if n < 1:
        raise OrtuneError(f"N={n}: run at least one seed (make seeds N=3)")
    if any(o.split("=", 1)[0].lstrip("+~") in ("train.seed", "seed") for o in overrides):
        raise OrtuneError("ARGS sets the seed that make seeds varies; leave seed and train.seed out of ARGS")
    start = first_seed(pipeline.composed_text(overrides))
    runs = {}
    for seed in range(start, start + n):
        print(f"== seed {seed - start + 1} of {n}: train.seed={seed}", flush=True)
        status = pipeline.run("all", [*overrides, f"train.seed={seed}"])
        if status:
            return status
        metrics = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))["paths"]["metrics"]
        runs[seed] = json.loads((Path(metrics) / "eval.json").read_text(encoding="utf-8"))
    print(report(runs))
    return 0


def main(argv: list[str]) -> int:
    from ortune.pipeline import split_overrides

    try:
        n = int(argv[0]) if argv else 3
    except ValueError:
        print(f"error: N={argv[0]}: a whole number of seeds, e.g. make seeds N=3", file=sys.stderr)
        return 2
    try:
        return run(n, argv[1:] + split_overrides(os.environ.get("ORTUNE_ARGS", "")))
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
