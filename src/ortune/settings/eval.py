"""eval.*: which rows are judged, which models beside the shipped one, and how speed is measured."""

from __future__ import annotations

import string
from dataclasses import dataclass, fields

from omegaconf import DictConfig

from ortune.settings.fields import field_problems, group, setting


@dataclass
class EvalLatencyConfig:
    new_tokens: int = setting("tokens each timed run decodes", range=">= 2")
    warmup: int = setting("untimed runs first", range=">= 0")
    repeats: int = setting("timed runs; the median is reported", range=">= 1")


@dataclass
class EvalConfig:
    path: str = setting("the labelled rows judged; default: the test split prepare_data held out")
    max_new_tokens: int | None = setting(
        "tokens generated per eval prompt; null = 6 for classification, for generation the longest training "
        "answer plus a quarter of it (at least 8 more)",
        range=">= 1",
    )
    limit: int = setting("rows judged; 0 = every row", range=">= 0")
    compare: list[str] = setting(
        "PyTorch models judged beside the shipped ONNX model; [] = the ONNX model alone",
        choices=("base", "prompted", "adapter", "merged"),
    )
    baseline_prompt: str | None = setting(
        "the prompted baseline's question: {labels} and {input}; null = one that fits data.task: "
        "`Classify the <data.label_field> of the text. Answer with exactly one of: {labels}.` then the text "
        "(classification), `{input}` (generation)"
    )
    baseline_shots: int = setting(
        "k of the k-shot log-likelihood baseline: answered training rows shown first, each label in turn; "
        "0 = zero-shot only",
        range=">= 0",
    )
    baseline_new_tokens: int = setting(
        "tokens the prompted baseline may answer in (a sentence: it was never taught to answer with a bare label)",
        range=">= 1",
    )
    bootstrap_resamples: int = setting("bootstrap resamples of the rows behind every 95 % interval", range=">= 100")
    bootstrap_seed: int = setting("seed of the bootstrap resampling (the same draws for every model)", range=">= 0")
    batch_size: int = setting("prompts per PyTorch generate call", range=">= 1")
    latency: EvalLatencyConfig = group(EvalLatencyConfig, "batch-1 speed of each model on the first row's prompt")


EVAL_COMPARABLE = next(f.metadata["choices"] for f in fields(EvalConfig) if f.name == "compare")
BASELINE_FIELDS = ("labels", "input")  # eval.baseline_prompt's placeholders


def default_baseline_prompt(data: DictConfig) -> str:
    """eval.baseline_prompt=null: a question that fits the task and names nothing the data does not. For
    labels it names the label field ("Classify the tone of the text", the tone example's question); free
    text is asked as it is, its row's question alone ({input})."""
    if data.task == "generation":
        return "{input}"
    field = str(data.label_field).replace("{", "{{").replace("}", "}}")
    return f"Classify the {field} of the text. Answer with exactly one of: {{labels}}.\n\nText: {{input}}"


def problems(e: DictConfig):
    yield from field_problems(EvalConfig, e, "eval.")
    if len(set(e.compare)) != len(e.compare):
        yield f"eval.compare={list(e.compare)} names a model twice"
    if not e.path.strip():
        yield "eval.path is empty; leave it at its default (the prepared eval split) or name a labelled file"
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(e.baseline_prompt) if name is not None}
    except ValueError as exc:
        yield f"eval.baseline_prompt is not a valid template ({exc}); write a literal brace as {{{{ or }}}}"
        return
    if unknown := sorted(names - set(BASELINE_FIELDS)):
        named = ", ".join("{" + name + "}" for name in unknown)
        yield (
            f"eval.baseline_prompt: {named} unknown; its placeholders are {{labels}} (the label set) "
            "and {input} (the text)"
        )
    elif "input" not in names:
        yield "eval.baseline_prompt has no {input}: the model would never see the text to classify; add it"
