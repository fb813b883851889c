"""The eval stage for free-text answers (data.task=generation): the token budget, the prompted baseline's
prompts, and the summary, predictions file and W&B table. scripts/eval.py calls these where the
classification path parses labels; the scores themselves are ortune.textmetrics'.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from omegaconf import DictConfig

from ortune import intervals, tasks, textmetrics
from ortune.errors import OrtuneError

log = logging.getLogger("ortune")
# speed figures of every timed runtime, labels or free text
LATENCY_KEYS = ("ttft_ms", "ms_per_token", "tokens_per_second", "peak_memory_mb")


def new_tokens(cfg: DictConfig) -> int:
    """eval.max_new_tokens, or its default: for free text the longest training answer in tokens plus
    tasks.MARGIN of it (at least tasks.MIN_MARGIN), read from the built model's ortune.json (build_onnx
    counted it with the model's tokenizer); for classification tasks.CLASSIFICATION_NEW_TOKENS."""
    if cfg.eval.max_new_tokens is not None:
        return int(cfg.eval.max_new_tokens)
    if not tasks.is_generation(cfg.data):
        return tasks.CLASSIFICATION_NEW_TOKENS
    spec = Path(cfg.paths.onnx) / "ortune.json"
    try:
        longest = int(json.loads(spec.read_text(encoding="utf-8"))["max_new_tokens"])
    except (OSError, KeyError, TypeError, ValueError):
        raise OrtuneError(
            f"{spec}: no max_new_tokens to size the answers by; rebuild the model (dvc repro build_onnx) "
            "or set eval.max_new_tokens"
        ) from None
    return longest + max(tasks.MIN_MARGIN, round(longest * tasks.MARGIN))


# ---- the prompted baseline -------------------------------------------------------------------------


def baseline_input(prompt, spec: DictConfig) -> str:
    """The text a prepared free-text prompt was rendered from: the last user turn of a chat prompt, the
    template's fields read back out of a text prompt (either of Alpaca's two templates)."""
    from ortune.baselines import _template_pattern, row_input

    if not isinstance(prompt, str):
        return tasks.row_input_text(prompt)
    no_input = spec.template.get("prompt_no_input")
    if no_input and _template_pattern(spec.template.prompt)[1].fullmatch(prompt) is None:
        return row_input(prompt, SimpleNamespace(template=SimpleNamespace(prompt=no_input)))
    return row_input(prompt, spec)


# A text-format prompt separates its examples with a blank line, so an answer ends at the first one: a base
# model without a chat template has no end token to stop at and goes on to write the next example, which
# scored as part of its answer would sink it (lm-eval-harness's generation tasks stop at "\n\n" alike).
SHOT_SEPARATOR = "\n\n"


def prompted_prompts(
    cfg: DictConfig, rows: list[dict], labels: list[str], train: list[dict], shots: int | None = None
) -> tuple[list[str], str]:
    """As ortune.evaluation.prompted_prompts, for free text: eval.baseline_prompt with {input} (and an
    empty {labels}), after `shots` (default eval.baseline_shots) answered training rows (the first ones)."""
    from ortune import modeling

    e = cfg.eval
    shots = e.baseline_shots if shots is None else shots
    if shots > len(train):
        raise OrtuneError(f"eval.baseline_shots={shots}: the training split has only {len(train)} rows")
    shown = train[:shots]

    def ask(row):
        return e.baseline_prompt.format(labels="", input=baseline_input(row["prompt"], cfg.data))

    tokenizer = modeling.load_tokenizer(cfg.paths.base_model, cfg.model.trust_remote_code)
    if tokenizer.chat_template:
        turns = [
            turn
            for row in shown
            for turn in ({"role": "user", "content": ask(row)}, {"role": "assistant", "content": tasks.answer(row)})
        ]
        return [
            tokenizer.apply_chat_template(
                [*turns, {"role": "user", "content": ask(r)}], tokenize=False, add_generation_prompt=True
            )
            for r in rows
        ], "chat"
    examples = "".join(f"{ask(row)}\nAnswer: {tasks.answer(row)}{SHOT_SEPARATOR}" for row in shown)
    return [f"{examples}{ask(r)}\nAnswer:" for r in rows], "text"


def answers_as_read(results: dict[str, dict]) -> dict[str, dict]:
    """Each runtime's results with a text-format baseline's generations read up to the first blank line
    (`read_until` says so); chat-format baselines and the fine-tuned runtimes are left as they are."""
    return {
        kind: {
            **result,
            "generations": [g.lstrip().split(SHOT_SEPARATOR, 1)[0] for g in result["generations"]],
            "read_until": SHOT_SEPARATOR,
        }
        if result.get("prompt_format") == "text"
        else result
        for kind, result in results.items()
    }


# ---- the summary -----------------------------------------------------------------------------------


# the untuned model's ways of doing without fine-tuning, as eval.json's `baselines` names them
BASELINES = {
    "base": "the fine-tuning prompt",
    "prompted_zero_shot": "eval.baseline_prompt zero-shot",
    "prompted": "eval.baseline_prompt {shots}-shot",
}
PREFIXES = {"base": "base_", "prompted": "prompted_baseline_", "prompted_zero_shot": "prompted_zero_shot_"}


def baseline_name(kind: str, found: dict) -> str:
    shots = found.get("shots", 0)
    return BASELINES.get(kind, kind).format(shots=shots).replace(" 0-shot", " zero-shot")


def summarize(
    rows: list[dict],
    results: dict[str, dict],
    max_new_tokens: int,
    validation: list[dict] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[dict, dict[str, list]]:
    """(eval.json's metrics, each runtime's per-row scores). Top level: the shipped ONNX model's mean scores
    on the judged (test) rows with their 95 % intervals in `ci95` (bootstrap over rows, the same draws for
    every model), the baselines and the gain over the strongest of them, merged vs ONNX (identical outputs,
    metric delta), generations cut at the limit, and `validation`: the shipped model on the validation
    split, what `make best` selects on."""
    references = [tasks.answer(r) for r in rows]
    draws = intervals.resample_rows(len(rows), resamples, seed)
    scored = {}
    for kind, result in results.items():
        summary, per_row_scores = textmetrics.scores(result["generations"], references)
        scored[kind] = ({**summary, "ci95": score_intervals(per_row_scores, draws, seed)}, per_row_scores)
    per_row = {kind: rows_ for kind, (_, rows_) in scored.items()}
    shipped, onnx = scored["onnx"][0], results["onnx"]
    metrics: dict = {
        **shipped,
        "ci95": dict(shipped["ci95"]),
        "headline_metric": textmetrics.HEADLINE,
        "max_new_tokens": max_new_tokens,
        "hit_token_limit": hits(onnx, max_new_tokens),
        **{key: onnx[key] for key in LATENCY_KEYS},
        "model_size_mb": onnx["model_size_mb"],
        "generated_tokens": onnx["generated_tokens"],
    }
    for kind, prefix in PREFIXES.items():
        if kind in scored:
            metrics.update({f"{prefix}{name}": scored[kind][0][name] for name in (*textmetrics.ROW_SCORES, "bleu")})
    found = {kind: {**scored[kind][0], "shots": results[kind].get("shots", 0)} for kind in BASELINES if kind in scored}
    if found:  # the gain is stated against the strongest way of doing without fine-tuning, paired by row
        head = textmetrics.HEADLINE
        strongest = max(found, key=lambda kind: found[kind][head])
        metrics["baselines"] = found
        metrics["strongest_baseline"] = {"name": strongest, **found[strongest]}
        metrics["gain_over_strongest_baseline"] = shipped[head] - found[strongest][head]
        metrics["ci95"]["gain_over_strongest_baseline"] = intervals.difference_interval(
            [r[head] for r in per_row["onnx"]], [r[head] for r in per_row[strongest]], draws
        )
    if "merged" in scored:
        metrics["quantization_exact_match_delta"] = shipped["exact_match"] - scored["merged"][0]["exact_match"]
        same = [
            float(textmetrics.clean(a) == textmetrics.clean(b))
            for a, b in zip(onnx["generations"], results["merged"]["generations"])
        ]
        metrics["quantization_identical"] = sum(same) / len(same)
        metrics["ci95"]["quantization_identical"] = intervals.mean_interval(same, draws)
    if validation is not None and "validation_generations" in onnx:
        metrics["validation"] = validation_scores(validation, onnx, max_new_tokens, resamples, seed)
    metrics["runtimes"] = {
        kind: {
            **summary,
            "hit_token_limit": hits(results[kind], max_new_tokens),
            "identical_to_onnx": textmetrics.identical_share(onnx["generations"], results[kind]["generations"]),
            "onnx_exact_match_delta": shipped["exact_match"] - summary["exact_match"],
            **{key: results[kind][key] for key in LATENCY_KEYS if key in results[kind]},
            **{
                key: results[kind][key]
                for key in ("model_size_mb", "load_seconds", "eval_seconds")
                if key in results[kind]
            },
            **{key: results[kind][key] for key in ("prompt_format", "shots", "read_until") if key in results[kind]},
        }
        for kind, (summary, _) in scored.items()
    }
    return metrics, per_row


def score_intervals(per_row: list[dict], draws, seed: int = 0) -> dict:
    """{score: {low, high}}: each per-row score's 95 % interval on `draws`. A JSON score that only some rows
    have (their reference is JSON) is resampled over those rows alone; corpus BLEU has none (not a mean)."""
    found = {}
    for name in (*textmetrics.ROW_SCORES, *textmetrics.JSON_SCORES):
        values = [row[name] for row in per_row if name in row]
        if values and len(values) == len(per_row):
            found[name] = intervals.mean_interval(values, draws)
        elif values:
            found[name] = intervals.mean_interval(values, intervals.resample_rows(len(values), draws.shape[0], seed))
    return found


def validation_scores(validation: list[dict], onnx: dict, max_new_tokens: int, resamples: int, seed: int) -> dict:
    """The shipped model's scores on the validation split, with their intervals: what `make best` and
    `make compare` rank on (eval.validation.exact_match), so that no choice is made on the test rows."""
    summary, per_row = textmetrics.scores(onnx["validation_generations"], [tasks.answer(r) for r in validation])
    draws = intervals.resample_rows(len(validation), resamples, seed)
    counted = {"new_tokens": onnx.get("validation_new_tokens"), "max_new_tokens": onnx.get("max_new_tokens")}
    return {**summary, "ci95": score_intervals(per_row, draws, seed), "hit_token_limit": hits(counted, max_new_tokens)}


def hits(result: dict, limit: int) -> int | None:
    """Generations that used every token they were allowed (cut, or ended exactly at the limit); None if not
    counted. A runtime judged under a limit of its own (the prompted baselines' may be larger) is counted
    against that one."""
    counts = result.get("new_tokens")
    limit = result.get("max_new_tokens") or limit
    return None if counts is None else sum(n >= limit for n in counts)


def prediction_rows(rows: list[dict], prompts: list[str], results: dict[str, dict], per_row: dict) -> list[dict]:
    """metrics/eval_predictions.jsonl: per judged row, the prompt as the models saw it, the reference, each
    runtime's generation and per-row scores (the shipped model's headline first), and which runtimes' output
    used every token it was allowed (`cut`: most likely an answer cut short)."""
    limited = {kind: r for kind, r in results.items() if r.get("new_tokens") and r.get("max_new_tokens")}
    return [
        {
            "prompt": prompts[i],
            "reference": tasks.answer(row),
            "generation": results["onnx"]["generations"][i],
            "score": per_row["onnx"][i][textmetrics.HEADLINE],
            "generations": {kind: result["generations"][i] for kind, result in results.items()},
            "scores": {kind: scores[i] for kind, scores in per_row.items()},
            "cut": sorted(kind for kind, r in limited.items() if r["new_tokens"][i] >= r["max_new_tokens"]),
        }
        for i, row in enumerate(rows)
    ]


def worst_first(lines: list[dict]) -> list[dict]:
    """Prediction lines, the shipped model's worst rows first (lowest headline, then lowest chrF)."""
    return sorted(lines, key=lambda line: (line["score"], line["scores"]["onnx"]["chrf"]))


def log_summary(metrics: dict) -> None:
    for kind, s in metrics["runtimes"].items():
        log.info(
            "%-8s exact match %.3f, token F1 %.3f, chrF %.3f, ROUGE-L %.3f%s, identical to ONNX %.1f%%, cut %s",
            kind,
            s["exact_match"],
            s["token_f1"],
            s["chrf"],
            s["rouge_l"],
            f", JSON valid {s['json_valid']:.3f}, field F1 {s['json_field_f1']:.3f}" if "json_valid" in s else "",
            100 * s["identical_to_onnx"],
            s["hit_token_limit"],
        )
    ci = metrics["ci95"]
    log.info(
        "shipped ONNX: exact match %s on %d test rows, %s of them cut at %d new tokens, %.2f ms/token",
        intervals.shown(metrics["exact_match"], ci.get("exact_match")),
        metrics["n"],
        metrics["hit_token_limit"],
        metrics["max_new_tokens"],
        metrics["ms_per_token"],
    )
    if validation := metrics.get("validation"):
        log.info(
            "shipped ONNX on %d validation rows (what make best ranks on): exact match %s",
            validation["n"],
            intervals.shown(validation["exact_match"], validation["ci95"].get("exact_match")),
        )
    if strongest := metrics.get("strongest_baseline"):
        log.info(
            "gain over the strongest baseline (%s): %s exact match",
            strongest["name"],
            intervals.shown(metrics["gain_over_strongest_baseline"], ci.get("gain_over_strongest_baseline")),
        )


# per-row scores shown beside each runtime's output (W&B table, HTML report): the headline, chrF (which
# still tells a near miss from nonsense where exact match is 0 for both), and for a JSON reference field F1
SHOWN_SCORES = (textmetrics.HEADLINE, "chrf", "json_field_f1")


def log_media(tracker, lines: list[dict]) -> None:
    """The W&B predictions table, worst rows first: the prompt, the reference, each runtime's output with
    its per-row scores, and the runtimes cut at the token limit (the numbers go through stage.main)."""
    if not tracker.active or not lines:
        return
    import wandb

    kinds = list(lines[0]["generations"])
    shown = [name for name in SHOWN_SCORES if any(name in line["scores"]["onnx"] for line in lines)]
    columns = [f"{name}_{kind}" for kind in kinds for name in ("generation", *shown)]
    table = wandb.Table(columns=["prompt", "reference", *columns, "cut"])
    for line in worst_first(lines):
        cells = [
            value
            for kind in kinds
            for value in (line["generations"][kind], *(line["scores"][kind].get(name) for name in shown))
        ]
        # the runtimes whose output used every allowed token
        table.add_data(line["prompt"], line["reference"], *cells, ", ".join(line.get("cut", ())))
    tracker.log_media({"eval/predictions": table})


def write_plots(metrics: dict, plots_dir: str | Path) -> None:
    """The eval stage's two plots, for free text: per_class_f1.csv holds one row per score of the shipped
    model (the `f1` column is the score, so `make plots`' bar chart reads it unchanged), and
    confusion_matrix.png a bar chart of each runtime's scores (free text has no confusion matrix)."""
    import io

    import matplotlib

    from ortune.artifacts import write_bytes_atomic

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in (*textmetrics.ROW_SCORES, *textmetrics.JSON_SCORES, "bleu") if name in metrics]
    # ortune.plots.write_per_class_csv's columns (not imported: build_onnx imports this module too)
    lines = ["label,precision,recall,f1,support"]
    lines += [f"{name},{metrics[name]:.6f},{metrics[name]:.6f},{metrics[name]:.6f},{metrics['n']}" for name in names]
    write_bytes_atomic(Path(plots_dir) / "per_class_f1.csv", ("\n".join(lines) + "\n").encode("utf-8"))
    kinds = list(metrics["runtimes"])
    figure, axes = plt.subplots(figsize=(1.5 + 1.1 * len(names), 4), dpi=100)
    width = 0.8 / max(1, len(kinds))
    for k, kind in enumerate(kinds):
        values = [metrics["runtimes"][kind].get(name, 0.0) for name in names]
        axes.bar([i + k * width for i in range(len(names))], values, width, label=kind)
    axes.set_xticks([i + width * (len(kinds) - 1) / 2 for i in range(len(names))], names, rotation=20)
    axes.set_ylim(0, 1)
    axes.set_title(f"free-text scores on {metrics['n']} rows", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    write_bytes_atomic(Path(plots_dir) / "confusion_matrix.png", buffer.getvalue())


def run_summary(paths: dict, scores: dict, onnx: dict, train: dict) -> str:
    """`make all`'s closing summary for a free-text run (ortune.experiments.run_summary's, for labels): the
    judged (test) rows' figures with their 95 % intervals, the gain over the strongest baseline, and the
    validation split's exact match, which is what anything chooses on."""
    ci = scores.get("ci95") or {}
    model = f"{onnx.get('precision', '?')} ONNX" if onnx else "ONNX"
    judged = (scores.get("judged") or {}).get("split")

    def shown(name: str) -> str:
        return intervals.shown(scores[name], ci.get(name))

    json_part = (
        f", JSON valid {shown('json_valid')}, field F1 {shown('json_field_f1')}" if "json_valid" in scores else ""
    )
    lines = [
        f"eval ({model}, free text, {f'{judged}, ' if judged else ''}{scores['n']} rows): exact match "
        f"{shown('exact_match')}, token F1 {shown('token_f1')}, chrF {shown('chrf')}, ROUGE-L {shown('rouge_l')}"
        f"{json_part}; {scores['hit_token_limit']} of {scores['n']} cut at {scores['max_new_tokens']} new tokens"
    ]
    if found := scores.get("baselines"):
        listed = ", ".join(
            f"{baseline_name(kind, b)} {intervals.shown(b['exact_match'], (b.get('ci95') or {}).get('exact_match'))}"
            for kind, b in found.items()
        )
        strongest = scores["strongest_baseline"]
        gain = intervals.shown(scores["gain_over_strongest_baseline"], ci.get("gain_over_strongest_baseline"))
        lines += [
            f"baselines (the untuned base, same rows, exact match): {listed}",
            f"fine-tuning gained {'' if gain.startswith('-') else '+'}{gain} exact match over the strongest baseline "
            f"({baseline_name(strongest['name'], strongest)}, "
            f"{strongest['exact_match']:.3f})",
        ]
    if validation := scores.get("validation"):
        lines.append(
            f"validation split ({validation['n']} rows; what `make best` chooses on): exact match "
            f"{intervals.shown(validation['exact_match'], (validation.get('ci95') or {}).get('exact_match'))}"
        )
    if "quantization_identical" in scores:
        lines.append(
            f"vs merged PyTorch: identical output on {100 * scores['quantization_identical']:.1f} % of rows, "
            f"exact match delta {scores['quantization_exact_match_delta']:+.3f}"
        )
    parity = onnx.get("parity") or {}
    if "identical_outputs" in parity:
        lines.append(
            f"gate ({parity['prompts']} validation prompts): {100 * parity['identical_outputs']:.1f} % identical, "
            f"exact match delta {parity['exact_match_delta']:+.3f} ({parity['target']}: "
            f"{'met' if parity.get('passed') else 'missed'})"
        )
    lines.append(
        f"speed: {scores['ms_per_token']:.2f} ms/token, first token {scores['ttft_ms']:.1f} ms, "
        f"{scores['model_size_mb']:.1f} MB on disk"
    )
    if train:
        lines.append(f"training ({train.get('method')}): {train['steps']} steps, final loss {train['final_loss']:.4f}")
    lines.append(
        f"shipped model: {paths['onnx']}/; every row: {paths['metrics']}/eval_predictions.jsonl, worst first in "
        "`make plots`; every experiment: `make compare METRIC=exact_match`"
    )
    return "\n".join(lines)
