"""The label eval's outputs: scores from the runtimes' generations, and where they are written and shown.

`report` turns what each runtime generated on the test rows (and the shipped model on the validation
split) into metrics/eval.json's numbers (ortune.evaluation.summarize), the per-row predictions file, the
confusion matrix and per-class F1 plots, the W&B table and confusion matrix, and the log lines a user
reads at the end of `make all`. The free-text counterpart is ortune.freetext.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ortune import evaluation, intervals, plots, tracking
from ortune.metrics import UNPARSED

log = logging.getLogger("ortune")


def report(
    cfg: DictConfig,
    rows: list[dict],
    prompts: list[str],
    labels: list[str],
    train: list[dict],
    results: dict[str, dict],
    validation: list[dict],
) -> dict:
    """Score, write and log the label eval; returns the metrics for metrics/eval.json."""
    e = cfg.eval
    metrics, predictions = evaluation.summarize(
        rows, labels, train, results, validation, e.bootstrap_resamples, e.bootstrap_seed
    )
    metrics["judged"] = evaluation.judged_on(cfg)
    lines = evaluation.prediction_rows(rows, prompts, results, predictions)
    evaluation.write_predictions(cfg, lines)
    matrix = evaluation.shipped_confusion(rows, labels, predictions)
    png = Path(cfg.paths.plots) / "confusion_matrix.png"
    plots.write_confusion_png(
        matrix,
        labels,
        png,
        f"ONNX model on {len(rows)} rows: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}",
    )
    plots.write_per_class_csv(metrics["per_class"], Path(cfg.paths.plots) / "per_class_f1.csv")
    log_media(tracking.current(), lines, labels, png)
    log_summary(metrics)
    return metrics


def log_summary(metrics: dict) -> None:
    """Each runtime's scores, the shipped model's headline with its intervals, the baselines and the gain."""
    for kind, scores in metrics["runtimes"].items():
        log.info(
            "%-7s accuracy %.3f, macro-F1 %.3f, unparsed %d, agrees with ONNX on %.1f%%",
            kind,
            scores["accuracy"],
            scores["macro_f1"],
            scores["unparsed"],
            100 * scores["agreement_with_onnx"],
        )
    ci = metrics["ci95"]
    log.info(
        "shipped ONNX on %d test rows: accuracy %s, macro-F1 %s, TTFT %.1f ms, %.2f ms/token",
        metrics["n"],
        intervals.shown(metrics["accuracy"], ci["accuracy"]),
        intervals.shown(metrics["macro_f1"], ci["macro_f1"]),
        metrics["ttft_ms"],
        metrics["ms_per_token"],
    )
    for name, scores in metrics["baselines"].items():
        log.info("baseline %-16s accuracy %s", name, intervals.shown(scores["accuracy"], scores["ci95"]["accuracy"]))
    log.info(
        "gain over the strongest baseline (%s): %s",
        metrics["strongest_baseline"]["name"],
        intervals.shown(metrics["gain_over_strongest_baseline"], ci["gain_over_strongest_baseline"]),
    )


def log_media(tracker: tracking.Tracker, lines: list[dict], labels: list[str], png: Path) -> None:
    """The W&B confusion matrix and predictions table (the numbers go through stage.main)."""
    if not tracker.active:
        return
    import wandb

    others = [kind for kind in lines[0]["predictions"] if kind != "onnx"] if lines else []
    table = wandb.Table(columns=["text", "label", "prediction", "generation", *(f"prediction_{k}" for k in others)])
    for line in lines:
        table.add_data(
            line["prompt"],
            line["label"],
            line["prediction"] or UNPARSED,
            line["generation"],
            *(line["predictions"][k] or UNPARSED for k in others),
        )
    classes = [*labels, UNPARSED]
    truth = [classes.index(line["label"]) for line in lines]
    predicted = [classes.index(line["prediction"] or UNPARSED) for line in lines]
    tracker.log_media(
        {
            "eval/predictions": table,
            "eval/confusion_matrix": wandb.plot.confusion_matrix(y_true=truth, preds=predicted, class_names=classes),
            "eval/confusion_matrix_png": wandb.Image(str(png)),
        }
    )
