"""Stage 5: judge the shipped ONNX model on labelled rows, beside its baselines and PyTorch twins.

Reads: models/onnx/ (+ models/base, adapter, merged for `eval.compare`), data/prepared/ (labels,
training rows for the majority baseline and the baselines' shots, the validation split), `eval.path`
(default: the prepared test split; any other labelled file is rendered with `data.template`), `eval.*`,
`data.*`. Writes: metrics/eval.json (headline numbers of the shipped model on the test rows at the top
level with their 95 % intervals in `ci95`, the baselines and the strongest of them, the gain over it, the
quantization loss, the shipped model on the validation split (`validation`: what `make best` selects
on), per-class scores and every runtime's scores and latency nested beside them),
metrics/eval_predictions.jsonl, plots/confusion_matrix.png, plots/per_class_f1.csv; to W&B: those
metrics, the confusion matrix and a (text, label, prediction) table.

A generation becomes a label by ortune.metrics.parse_label: first non-empty line, stripped of
whitespace and punctuation, lowercased, matched to a label exactly or by prefix; else unparsed. The
prompted baseline, never taught that format, is read by ortune.metrics.lenient_label. For data.task=generation
the generations are scored as text instead (ortune.freetext, ortune.textmetrics: exact match, token F1, chrF,
ROUGE-L, JSON), on the test rows and on the validation split alike, and the prompted baseline is asked
zero-shot and eval.baseline_shots-shot.

    python scripts/eval.py eval.limit=50 eval.compare=[merged]
    python scripts/eval.py eval.path=data/heldout.csv
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from ortune import baselines, data, evaluation, freetext, label_report, stage, tasks, tracking

log = logging.getLogger("ortune")


def run(cfg: DictConfig) -> dict:
    rows, labels, train = evaluation.load_rows(cfg)
    # chat rows hold messages: every runtime gets the string the shipped model's chat template makes of them
    prompts = [data.prompt_text(r["prompt"], cfg.paths.onnx) for r in rows]
    evaluation.check_context(cfg, rows, prompts)  # before any runtime loads: the rows too long, by place
    log.info("judging %d rows of %s", len(rows), cfg.eval.path)
    generation = tasks.is_generation(cfg.data)
    asked, extra = {}, {"onnx": {}, "prompted": {}}
    if "prompted" in cfg.eval.compare:  # built first: a bad template fails before any model is loaded
        if generation:  # asked k-shot (eval.baseline_shots), and zero-shot beside it in the same process
            asked["prompts"], asked["format"] = freetext.prompted_prompts(cfg, rows, labels, train)
            asked["shots"] = cfg.eval.baseline_shots
            if asked["shots"]:
                zero_shot = freetext.prompted_prompts(cfg, rows, labels, train, shots=0)[0]
                extra["prompted"] = {"variants": {"prompted_zero_shot": zero_shot}}
        else:  # its free answer zero-shot, as a user would ask; the k-shot baseline scores the labels
            asked["prompts"], asked["format"] = baselines.prompted_prompts(cfg, rows, labels, train, shots=0)
            asked["shots"] = 0
            extra["prompted"] = {"choices": baselines.choice_prompts(cfg, rows, labels, train), "labels": labels}
        log.info(
            "prompted baseline (%s, %d shots), first prompt: %r", asked["format"], asked["shots"], asked["prompts"][0]
        )
    # the shipped model on the validation split too: what `make best` selects on, never the test rows
    validation = evaluation.load_validation(cfg)
    extra["onnx"]["validation_prompts"] = [data.prompt_text(r["prompt"], cfg.paths.onnx) for r in validation]
    results = {}
    for kind in ["onnx", *cfg.eval.compare]:
        spec = evaluation.job(kind, cfg, asked["prompts"] if kind == "prompted" else prompts, **extra.get(kind, {}))
        results[kind] = evaluation.judge_in_fresh_process(spec)
        judged = results[kind]
        speed = (
            f": {judged['ms_per_token']:.2f} ms/token, {judged['peak_memory_mb']:.0f} MB peak"
            if spec["latency"]
            else ""
        )
        log.info("%-7s judged in %.1f s%s", kind, judged["eval_seconds"], speed)
    if asked:
        results["prompted"].update(prompt_format=asked["format"], shots=asked["shots"])
        for name, variant in results["prompted"].pop("variants", {}).items():
            results[name] = {**results["prompted"], **variant, "shots": 0}
    if generation:  # free text: scored as text, not parsed into labels
        return judge_free_text(cfg, rows, prompts, results, validation)
    return label_report.report(cfg, rows, prompts, labels, train, results, validation)


def judge_free_text(
    cfg: DictConfig, rows: list[dict], prompts: list[str], results: dict, validation: list[dict]
) -> dict:
    e = cfg.eval
    results = freetext.answers_as_read(results)  # a base model's text baseline ends at its first blank line
    metrics, per_row = freetext.summarize(
        rows, results, freetext.new_tokens(cfg), validation, e.bootstrap_resamples, e.bootstrap_seed
    )
    metrics["judged"] = evaluation.judged_on(cfg)
    lines = freetext.prediction_rows(rows, prompts, results, per_row)
    evaluation.write_predictions(cfg, lines)
    freetext.write_plots(metrics, cfg.paths.plots)
    freetext.log_media(tracking.current(), lines)
    freetext.log_summary(metrics)
    return metrics


if __name__ == "__main__":
    stage.main("eval", run, "eval.json")
