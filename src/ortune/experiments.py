"""Reading DVC experiments (`dvc exp show --json`), picking the best one under constraints, and the
few lines `make all` prints about the run in the workspace (`python -m ortune.experiments`)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ortune.app import printable
from ortune.errors import OrtuneError

EVAL_METRICS = "metrics/eval.json"


@dataclass
class Experiment:
    rev: str
    name: str
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # {"eval.accuracy": 0.8, ...} flattened per file
    state: str = "success"  # DVC's executor state: success, running, queued or failed


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    else:
        out[prefix] = value


def _state(group: dict, entry: dict) -> str:
    """DVC 3 says where an experiment stands in its group's executor (`status` in the data: older DVC)."""
    if entry.get("error"):
        return "failed"
    state = (group.get("executor") or {}).get("state") or (entry.get("data") or {}).get("status") or "success"
    return str(state).lower()


def _experiment(entry: dict, state: str) -> Experiment:
    data = entry.get("data") or {}
    params: dict = {}
    for file_params in (data.get("params") or {}).values():
        _flatten("", file_params.get("data", {}), params)
    metrics: dict = {}
    for path, content in (data.get("metrics") or {}).items():
        flat: dict = {}
        _flatten("", content.get("data", {}), flat)
        name = path.rsplit("/", 1)[-1].removesuffix(".json")
        metrics.update({f"{name}.{k}": v for k, v in flat.items()})
    if state != "success":
        # a running experiment's metrics are the workspace's, from the run before it: never shown as its own
        metrics = {}
    name = entry.get("name") or ("" if entry["rev"] == "workspace" else entry["rev"][:7])
    return Experiment(rev=entry["rev"], name=name, params=params, metrics=metrics, state=state)


def parse_exp_show(payload: list[dict], unfinished: bool = False) -> list[Experiment]:
    """Every finished experiment in `dvc exp show --json` output (baselines and workspace excluded);
    `unfinished`: running, queued and failed ones too, with their state and without metrics."""
    found = []
    for baseline in payload:
        for group in baseline.get("experiments") or []:
            for rev in group.get("revs", []):
                experiment = _experiment(rev, _state(group, rev))
                experiment.name = experiment.name or group.get("name") or "workspace run"
                if unfinished or experiment.state == "success":
                    found.append(experiment)
    return found


def metric_names(experiments: list[Experiment]) -> list[str]:
    """The numeric metrics finished experiments hold: the headline ones first, then the rest by name."""
    names = {k for e in experiments for k, v in e.metrics.items() if isinstance(v, (int, float))}
    return [m for m in HEADLINE if m in names] + sorted(names - set(HEADLINE))


def check_metric(experiments: list[Experiment], metric: str, setting: str = "METRIC") -> None:
    """One line when no finished experiment has `metric` (a typo would otherwise rank every row as equal)."""
    names = metric_names([e for e in experiments if e.state == "success"])
    if names and metric not in names:
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        raise OrtuneError(
            f"{setting}={metric.removeprefix('eval.')}: no experiment has the metric {metric}; "
            f"valid: {shown} (the eval. prefix may be left out)"
        )


def sweep_combinations(sweep: list[str]) -> list[list[str]]:
    """The runs `dvc exp run --queue -S ...` makes of SWEEP's overrides (DVC's own Hydra expansion), or one line
    (`lora.r=8,,16` had ended in DVC's multi-line "unexpected error")."""
    from dvc.utils.hydra import get_hydra_sweeps

    try:
        return [runs["params.yaml"] for runs in get_hydra_sweeps({"params.yaml": list(sweep)})]
    except Exception as exc:  # noqa: BLE001 - Hydra's parser and DVC raise several types for one bad value
        cause = exc.__cause__ or exc
        message = " ".join(str(cause).split()).split(" See https://hydra.cc")[0]
        message = re.sub(r" expecting \{[^}]*\}", "", message).rstrip(".")  # the grammar's token list
        raise OrtuneError(
            f"SWEEP: {message or type(cause).__name__}; write each swept setting as key=a,b,c "
            '(make sweep SWEEP="lora.r=8,16 precision=int4,int8")'
        ) from None


def load(cwd: str | None = None, unfinished: bool = False) -> list[Experiment]:
    # this interpreter's DVC, whatever PATH holds (tests and tools call this without the venv activated)
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json", "-A"], cwd=cwd, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise OrtuneError(f"`dvc exp show` failed: {done.stderr.strip().splitlines()[-1:]}")
    return parse_exp_show(json.loads(done.stdout or "[]"), unfinished)


def pick_best(
    experiments: list[Experiment], metric: str, maximize: bool = True, limits: dict[str, float] | None = None
) -> tuple[Experiment, list[str]]:
    """The best experiment on `metric` among those within every upper limit in `limits`.

    Returns the winner and one line per experiment saying why it won, lost or was excluded.
    """
    experiments = [e for e in experiments if e.state == "success"]
    if not experiments:
        raise OrtuneError("no finished experiments: run `make all` or `make sweep` first")
    metric = selection_metric(experiments, metric)
    # a limit chooses too: on the validation split's figure where it has one, never on the test split's
    limits = {selection_metric(experiments, key): limit for key, limit in (limits or {}).items()}
    reasons, eligible = [], []
    for exp in experiments:
        value = exp.metrics.get(metric)
        if not isinstance(value, (int, float)):
            reasons.append(f"{exp.name}: excluded, no numeric '{metric}'")
            continue
        broken = [
            f"{key}={exp.metrics.get(key)} > {limit}"
            for key, limit in limits.items()
            if not isinstance(exp.metrics.get(key), (int, float)) or exp.metrics[key] > limit
        ]
        if broken:
            reasons.append(f"{exp.name}: excluded, {', '.join(broken)}")
        else:
            eligible.append(exp)
    if not eligible:
        raise OrtuneError("no experiment meets the constraints: " + "; ".join(reasons))
    eligible.sort(key=lambda e: e.metrics[metric], reverse=maximize)
    best = eligible[0]
    reasons.insert(0, f"{best.name}: best {metric}={best.metrics[metric]:.4g} among {len(eligible)} eligible")
    for other in eligible[1:]:
        reasons.append(f"{other.name}: eligible, {metric}={other.metrics[metric]:.4g}")
    return best, reasons


# eval.json's figures that no row's answer decides (speed, size): ranking on them chooses on no split
SPLIT_FREE = ("ms_per_token", "ttft_ms", "tokens_per_second", "peak_memory_mb", "model_size_mb")


def selection_metric(experiments: list[Experiment], metric: str, strict: bool = True) -> str:
    """What `make best` and `make compare` rank on: the validation split's figure (eval.validation.*). The
    test split's figure is what a run reports, never what a choice is made on: choosing the best of many on
    test would report that choice's luck as its score. `strict` (make best): refuse a test-split figure that
    no experiment has on validation; not strict (the compare table only shows): rank on it."""
    if not metric.startswith("eval.") or metric.startswith("eval.validation."):
        return metric
    name = metric.removeprefix("eval.")
    held_out = f"eval.validation.{name}"
    if any(isinstance(e.metrics.get(held_out), (int, float)) for e in experiments):
        return held_out
    if name.rsplit(".", 1)[-1] in SPLIT_FREE or not strict:
        return metric
    measured = sorted(
        {k for e in experiments for k, v in e.metrics.items() if k.startswith("eval.validation.") and "ci95" not in k}
    )
    offer = (
        f"rank on a figure the validation split has ({', '.join(measured[:6])})"
        if measured
        else "run the experiments again (`make sweep`): an eval from before the validation split has none"
    )
    raise OrtuneError(
        f"METRIC={name}: {metric} is measured on the test split, which nothing may be chosen on, and no experiment "
        f"has {held_out}; {offer}"
    )


def interval_of(experiment: Experiment, metric: str) -> tuple[float, float] | None:
    """The 95 % interval eval.json holds beside `metric` (eval.ci95.accuracy for eval.accuracy), or None."""
    head, _, name = metric.rpartition(".")
    bounds = [experiment.metrics.get(f"{head}.ci95.{name}.{end}") for end in ("low", "high")]
    return tuple(bounds) if all(isinstance(b, (int, float)) for b in bounds) else None


def versus_best(best: Experiment, other: Experiment, metric: str) -> str:
    """`other`'s difference from the best on `metric`, marked "within noise" when it is smaller than the
    wider of their two intervals' half-widths: a reshuffle of the rows could swap them."""
    if other is best:
        return "best"
    value, top = other.metrics.get(metric), best.metrics.get(metric)
    if not isinstance(value, (int, float)) or not isinstance(top, (int, float)):
        return "-"
    widths = [(b[1] - b[0]) / 2 for b in (interval_of(best, metric), interval_of(other, metric)) if b]
    noise = " (within noise)" if widths and abs(value - top) < max(widths) else ""
    return f"{value - top:+.3f}{noise}"


# the columns `make compare` shows where experiments have them: labels' figures, then free text's
HEADLINE = (
    "eval.accuracy",
    "eval.macro_f1",
    "eval.majority_baseline",
    "eval.exact_match",
    "eval.chrf",
    "eval.ms_per_token",
    "eval.quantization_agreement",
    "eval.quantization_identical",
)


def compare_table(experiments: list[Experiment], metric: str) -> str:
    """Markdown: each experiment's state, the params that differ between experiments, then the headline
    metrics (with `metric` among them), best first; unfinished experiments last, without metrics."""
    keys = sorted({k for e in experiments for k in e.params if not k.startswith(("paths.", "wandb."))})
    changed = [k for k in keys if len({repr(e.params.get(k)) for e in experiments}) > 1]
    metric = selection_metric([e for e in experiments if e.state == "success"], metric, strict=False)
    shown = [*HEADLINE, *([metric] if metric not in HEADLINE else [])]
    columns = [*changed, *[m for m in shown if any(m in e.metrics for e in experiments)]]
    ranked = sorted(experiments, key=lambda e: (e.state == "success", _sort_key(e.metrics.get(metric))), reverse=True)
    # differences smaller than their intervals are marked: the ranking among those is noise
    noise = ranked and ranked[0].state == "success" and any(interval_of(e, metric) for e in experiments)
    header = [*columns, *([f"vs best ({metric})"] if noise else [])]
    lines = ["| " + " | ".join(["experiment", "state", *header]) + " |", "|---" * (len(header) + 2) + "|"]
    for exp in ranked:
        cells = [_cell(exp.name), exp.state, *(_cell(exp.params.get(c, exp.metrics.get(c))) for c in columns)]
        if noise:
            cells.append(versus_best(ranked[0], exp, metric) if exp.state == "success" else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _sort_key(value) -> float:
    return value if isinstance(value, (int, float)) else float("-inf")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    # names and settings a user typed: no control character reaches the terminal, no `|` splits the cell
    return "-" if value is None else printable(str(value)).replace("|", "\\|")


def _read_metrics(folder: Path, name: str) -> dict:
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def run_summary(root: Path) -> str:
    """The headline results of the workspace's last run, read from the metrics files that params.yaml
    names (`dvc metrics show` lists every nested key: hundreds of columns)."""
    import yaml

    paths = yaml.safe_load((Path(root) / "params.yaml").read_text(encoding="utf-8"))["paths"]
    folder = Path(root) / paths["metrics"]
    scores, onnx, train = (_read_metrics(folder, f) for f in ("eval.json", "onnx.json", "train.json"))
    if not scores:
        return f"no {folder / 'eval.json'} yet: the pipeline did not reach the eval stage (see the log above)"
    if "exact_match" in scores and "accuracy" not in scores:  # data.task=generation: scored as text
        from ortune.freetext import run_summary as free_text_summary

        return free_text_summary(paths, scores, onnx, train)
    model = f"{onnx.get('precision', '?')} ONNX" if onnx else "ONNX"
    ci = scores.get("ci95") or {}
    judged = (scores.get("judged") or {}).get("split")
    where = f"{judged}, " if judged else ""
    lines = [
        f"eval ({model}, {where}{scores['n']} rows): "
        f"accuracy {_with_interval(scores['accuracy'], ci.get('accuracy'))}, "
        f"macro-F1 {_with_interval(scores['macro_f1'], ci.get('macro_f1'))}"
    ]
    if "baselines" in scores:
        lines += _baseline_lines(scores)
    else:  # an eval.json written before the baselines had intervals
        lines[0] += f" (majority baseline {scores['majority_baseline']:.3f}" + (
            f", untuned base {scores['base_accuracy']:.3f})" if "base_accuracy" in scores else ")"
        )
    if validation := scores.get("validation"):
        lines.append(
            f"validation split ({validation['n']} rows; what onnx.quantization=auto and `make best` choose on): "
            f"accuracy {_with_interval(validation['accuracy'], validation['ci95']['accuracy'])}"
        )
    lines.append(
        f"speed: {scores['ms_per_token']:.2f} ms/token, first token {scores['ttft_ms']:.1f} ms, "
        f"{scores['model_size_mb']:.1f} MB on disk"
    )
    if onnx.get("candidates"):
        lines.append(_auto_line(onnx))
    if "quantization_agreement" in scores:
        agreed = ci.get("quantization_agreement")
        lines.append(
            f"vs merged PyTorch: same label on {100 * scores['quantization_agreement']:.1f} % of rows"
            + (f" (95 % interval {100 * agreed['low']:.1f}-{100 * agreed['high']:.1f} %)" if agreed else "")
            + f", accuracy delta {scores['quantization_accuracy_delta']:+.3f}"
        )
    if train:
        lines.append(
            f"training ({train.get('method')}): {train['steps']} steps, final loss {train['final_loss']:.4f}"
            + (f", eval loss {train['eval_loss']:.4f}" if "eval_loss" in train else "")
        )
    lines += [
        f"shipped model: {paths['onnx']}/ (model card {paths['onnx']}/README.md); "
        f"all metrics: {paths['metrics']}/*.json",
        f"pictures: {paths['plots']}/confusion_matrix.png, `make plots` (HTML report); "
        "every experiment: `make compare`",
    ]
    return "\n".join(lines)


def _auto_line(onnx: dict) -> str:
    """onnx.quantization=auto: what was tried before the shipped candidate, and why it was not shipped."""

    def named(c: dict) -> str:
        extra = ", ".join(f"{k} {v}" for k, v in c["settings"].items() if k != "precision")
        return f"{c['precision']}" + (f" ({extra})" if extra else "")

    shipped = onnx["candidates"][onnx["shipped_candidate"]]
    missed = [
        f"{named(c)} kept {100 * c['label_agreement']:.1f} % of labels"
        for c in onnx["candidates"][: onnx["shipped_candidate"]]
    ]
    return (
        f"quantization (auto): shipped {named(shipped)}, "
        f"{shipped['ms_per_token']:.2f} ms/token, {shipped['size_mb']:.0f} MB"
        + (f"; not enough: {'; '.join(missed)}" if missed else ", the first candidate")
    )


def _with_interval(value: float, bounds: dict | None) -> str:
    """`0.951 ± 0.035`: the figure and half its 95 % interval's width (just the figure without one)."""
    return f"{value:.3f}" + (f" ± {(bounds['high'] - bounds['low']) / 2:.3f}" if bounds else "")


BASELINE_NAMES = {
    "majority": "majority class",
    "base": "fine-tuning prompt",
    "loglik_zero_shot": "log-likelihood zero-shot",
    "loglik_k_shot": "log-likelihood {shots}-shot",
    "prompted": "answer in a sentence",
}


def _baseline_name(name: str, found: dict) -> str:
    return BASELINE_NAMES.get(name, name).format(shots=found.get("shots", "k"))


def _baseline_lines(scores: dict) -> list[str]:
    """Was fine-tuning worth it: every baseline on the same rows, and the gain over the strongest of them
    (majority class included, so never over a number below chance), with its paired interval."""
    found = scores["baselines"]
    prompted = (scores.get("runtimes") or {}).get("prompted") or {}
    asked = " through its chat template" if prompted.get("prompt_format") == "chat" else ""
    listed = ", ".join(
        f"{_baseline_name(name, b)} {_with_interval(b['accuracy'], b['ci95']['accuracy'])}" for name, b in found.items()
    )
    strongest = scores["strongest_baseline"]
    gain = _with_interval(
        scores["gain_over_strongest_baseline"], (scores.get("ci95") or {}).get("gain_over_strongest_baseline")
    )
    lines = [
        f"baselines (the untuned base{asked}, same rows): {listed}",
        f"fine-tuning gained {'+' if not gain.startswith('-') else ''}{gain} accuracy over the strongest baseline "
        f"({_baseline_name(strongest['name'], strongest)}, {strongest['accuracy']:.3f})",
    ]
    if samples := (found.get("prompted") or {}).get("samples"):
        said = "; ".join(
            f"{json.dumps(s['answer'], ensure_ascii=False)} (truth {s['label']}, read as {s['read_as'] or 'no label'})"
            for s in samples
        )
        unparsed = found["prompted"].get("unparsed")
        lines.append(
            f"the prompted baseline answered, e.g.: {said}"
            + (f"; {unparsed} of {scores['n']} answers named no single label" if unparsed is not None else "")
        )
    return lines


def terminal_summary(root: Path) -> str:
    """run_summary as `make all` prints it: labels come from the data and sample answers from a model, so a
    control character in one is shown escaped, never sent to the terminal."""
    return printable(run_summary(root), keep="\n")


if __name__ == "__main__":
    print(terminal_summary(Path.cwd()))
