"""95 % intervals by bootstrap over rows: how far a figure measured on n rows could move on another
draw of n rows like them.

One resampling for every figure of a run: `resample_rows(n, ...)` draws the row indices once (seeded), and
each statistic is computed on the same draws, so two models judged on the same rows get paired
intervals (their difference's interval is narrower than either's alone, as it should be). Any per-row
score (correct or not, same label or not, a free-text score per row) goes through `mean_interval`; a
statistic that is not a mean of rows (macro-F1) through `interval` with its own function of the indices.
Percentile intervals (Efron): the 2.5th and 97.5th percentiles of the resampled statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

LEVEL = 0.95


def resample_rows(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices drawn with replacement; row i of the result is one bootstrap sample."""
    if n < 1:
        raise ValueError("no rows to resample")
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def _bounds(values: np.ndarray) -> dict:
    low, high = np.percentile(values, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return {"low": float(low), "high": float(high)}


def interval(statistic: Callable[[np.ndarray], np.ndarray], draws: np.ndarray) -> dict:
    """{low, high} of `statistic` over the draws; `statistic` maps a (resamples, n) index array to one
    value per resample."""
    return _bounds(np.asarray(statistic(draws), dtype=float))


def mean_interval(per_row: Sequence[float], draws: np.ndarray) -> dict:
    """{low, high} of the mean of a per-row score (1.0/0.0 for correct, or any number per row)."""
    values = np.asarray(per_row, dtype=float)
    if values.shape != (draws.shape[1],):
        raise ValueError(f"{values.shape[0]} per-row scores for draws over {draws.shape[1]} rows")
    return _bounds(values[draws].mean(axis=1))


def difference_interval(first: Sequence[float], second: Sequence[float], draws: np.ndarray) -> dict:
    """{low, high} of mean(first) - mean(second), paired: both on the same resampled rows."""
    return mean_interval(np.asarray(first, dtype=float) - np.asarray(second, dtype=float), draws)


def macro_f1_interval(truth: Sequence[str], predicted: Sequence[str | None], labels: list[str], draws) -> dict:
    """{low, high} of macro-F1 over `labels` (an unparsed prediction is wrong, as in ortune.metrics)."""
    code = {label: i for i, label in enumerate(labels)}
    t = np.array([code[x] for x in truth])
    p = np.array([code.get(x, -1) if x is not None else -1 for x in predicted])

    def macro_f1(idx: np.ndarray) -> np.ndarray:
        ts, ps = t[idx], p[idx]
        f1s = []
        for i in range(len(labels)):
            tp = ((ts == i) & (ps == i)).sum(axis=1)
            fp = ((ts != i) & (ps == i)).sum(axis=1)
            fn = ((ts == i) & (ps != i)).sum(axis=1)
            # F1 = 2tp / (2tp + fp + fn), 0 where undefined (scikit-learn's zero_division=0)
            denominator = 2 * tp + fp + fn
            f1s.append(np.divide(2 * tp, denominator, out=np.zeros(len(idx)), where=denominator > 0))
        return np.mean(f1s, axis=0)

    return interval(macro_f1, draws)


def half_width(bounds: dict | None) -> float | None:
    """Half the interval's width: the `±` of a figure."""
    return None if not bounds else (bounds["high"] - bounds["low"]) / 2


def shown(value: float, bounds: dict | None, n: int | None = None) -> str:
    """`0.951 ± 0.035 (n=144)`: the figure, half its interval's width, and the rows it was measured on."""
    text = f"{value:.3f}" + (f" ± {half_width(bounds):.3f}" if bounds else "")
    return text + (f" (n={n})" if n is not None else "")
