"""Judging models on labelled rows: which rows, each runtime's generations and latency, and the
summary that becomes metrics/eval.json.

The shipped model is the ONNX one; `eval.compare` names the PyTorch models judged beside it on the
same rows with the same prompts and parse rule: `base` (untuned: a baseline), `adapter` (base +
LoRA, as trained) and `merged` (what the ONNX model was exported from, so ONNX vs merged is the
quantization loss). `prompted` is the untuned base asked as a user would ask it without fine-tuning:
an instruction listing the labels (eval.baseline_prompt), through its chat template, optionally after
eval.baseline_shots answered training rows; the same parse rule reads its answer. Each runtime runs
in a fresh process, so its peak memory is its own.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import statistics
import string
import time
from pathlib import Path

from omegaconf import DictConfig

from ortune import data
from ortune.artifacts import folder_megabytes
from ortune.config import EVAL_COMPARABLE
from ortune.errors import OrtuneError
from ortune.metrics import (
    agreement,
    classification_scores,
    confusion_matrix,
    majority_label,
    parse_label,
    per_class_scores,
)

log = logging.getLogger("ortune")

# Speed numbers of every runtime; the shipped model's are also headline (top-level) numbers.
LATENCY_KEYS = ("ttft_ms", "ms_per_token", "tokens_per_second", "peak_memory_mb")
UNTIMED = ("base", "prompted")  # judged on their answers only: their network is the merged model's


# ---- rows -------------------------------------------------------------------------------------------


def load_rows(cfg: DictConfig) -> tuple[list[dict], list[str], list[dict]]:
    """(rows to judge as {prompt, label}, the trained label set, the training rows).

    A file in paths.prepared is a split prepare_data rendered; any other file at eval.path holds raw
    labelled records (a held-out test set) and is rendered here exactly as prepare_data renders.
    """
    prepared = Path(cfg.paths.prepared)
    for name in ("labels.json", "train.jsonl"):
        if not (prepared / name).is_file():
            raise OrtuneError(f"paths.prepared={prepared}: no {name}; run prepare_data first (dvc repro prepare_data)")
    labels = json.loads((prepared / "labels.json").read_text(encoding="utf-8"))
    train = data.read_jsonl(prepared / "train.jsonl")
    path = Path(cfg.eval.path)
    if not path.is_file():
        raise OrtuneError(f"eval.path={path}: file not found; point it at a labelled JSONL, JSON, CSV or Parquet file")
    if path.resolve().parent == prepared.resolve():
        lines = data.read_jsonl(path)  # written by prepare_data: one row per line, no blank lines
        rows = data.Records(lines, (f"{path}:{n}: row {n}" for n in range(1, len(lines) + 1)))
    else:
        records = data.read_records(path)
        rows = data.Records(render_records(cfg.data, records, f"eval.path={path}"), records.places)
    if cfg.eval.limit:
        rows = data.Records(rows[: cfg.eval.limit], rows.places[: cfg.eval.limit])
    if not rows:
        raise OrtuneError(f"eval.path={path}: no rows to judge; it needs labelled rows")
    unknown = sorted({r["label"] for r in rows} - set(labels))
    if unknown:
        raise OrtuneError(
            f"eval.path={path}: label(s) {', '.join(unknown)} were never trained on (the model knows "
            f"{', '.join(labels)}); drop those rows or retrain with them"
        )
    return rows, labels, train


def check_context(cfg: DictConfig, rows: list[dict], prompts: list[str]) -> None:
    """Refuse, naming them, the rows whose prompt and answer (eval.max_new_tokens) do not fit the shipped
    model's context: onnxruntime-genai would stop the whole eval at the first one, naming none. Rows of
    a held-out file (eval.path) meet no other check; prepare_data's splits were checked there."""
    from ortune import modeling
    from ortune.artifacts import read_json

    genai = Path(cfg.paths.onnx) / "genai_config.json"
    try:
        context = int(read_json(genai, {})["model"]["context_length"])
    except (KeyError, TypeError, ValueError):
        return  # no readable context: loading the model reports what is wrong with the folder
    # the shipped model's tokenizer (the builder saves it beside the model), else the base model's
    folders = [Path(cfg.paths.onnx), Path(cfg.paths.base_model)]
    found = next((f for f in folders if (f / "tokenizer.json").is_file() or (f / "tokenizer.model").is_file()), None)
    if found is None:
        return
    tokenizer = modeling.load_tokenizer(found, cfg.model.trust_remote_code)
    room = cfg.eval.max_new_tokens
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    where = data.placer(rows, str(cfg.eval.path))
    over = [(where(row), n) for row, n in zip(rows, lengths) if n + room > context]
    if over:
        shown = ", ".join(f"{place} ({n} tokens)" for place, n in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        raise OrtuneError(
            f"eval.path: {len(over)} row(s) have a prompt that, with the {room} tokens of the answer "
            f"(eval.max_new_tokens), is over the model's context of {context} tokens ({genai}): "
            f"{shown}{more}; shorten or remove them"
        )


def render_records(spec: DictConfig, records: list[dict], source: str) -> list[dict]:
    """Raw records -> {prompt, completion, label} in data.format, checked as prepare_data checks them."""
    input_fields, output_fields, setting = data.input_output_fields(spec)
    data.check_fields(records, [*input_fields, *output_fields], source, setting)
    data.check_fields(records, [spec.label_field], source, "data.label_field")
    return [data.render_row(r, spec) for r in records]


# ---- one runtime, in its own process ----------------------------------------------------------------


def job(kind: str, cfg: DictConfig, prompts: list[str]) -> dict:
    """Everything a fresh process needs to judge one runtime (plain data: it crosses a process boundary)."""
    e = cfg.eval
    return {
        "kind": kind,
        "dirs": {
            name: str(cfg.paths[key])
            for name, key in (("onnx", "onnx"), ("base", "base_model"), ("adapter", "adapter"), ("merged", "merged"))
        },
        "trust_remote_code": bool(cfg.model.trust_remote_code),
        "prompts": prompts,
        "max_new_tokens": e.max_new_tokens,
        "batch_size": e.batch_size,
        # the baselines run the merged model's network (same shapes, same dtype): their speed is the merged
        # model's, and timing them again cost ~16 s of the real default's eval on 2 cores
        "latency": None
        if kind in UNTIMED
        else {"new_tokens": e.latency.new_tokens, "warmup": e.latency.warmup, "repeats": e.latency.repeats},
    }


def load_generator(kind: str, dirs: dict, trust_remote_code: bool = False):
    from ortune.generation import OnnxGenerator, TorchGenerator

    if kind == "onnx":
        return OnnxGenerator(dirs["onnx"])
    if kind not in EVAL_COMPARABLE:
        raise OrtuneError(f"eval.compare: unknown model '{kind}'; use {', '.join(EVAL_COMPARABLE)}")
    from ortune import modeling, quantize

    folder = Path(dirs["base" if kind == "prompted" else kind])
    if not (folder / ("adapter_config.json" if kind == "adapter" else "config.json")).is_file():
        raise OrtuneError(
            f"{folder}: no {kind} model there; run the pipeline up to it, or drop '{kind}' from eval.compare"
        )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if kind == "adapter":
        from peft import PeftModel

        # full-precision base, as merge uses: adapter vs merged then isolates merging, ONNX vs merged quantization
        model = PeftModel.from_pretrained(modeling.load_causal_lm(dirs["base"], trust_remote_code), str(folder))
        if grid := quantize.read_grid(folder):  # trained through the int4 grid: judged as it computes
            quantize.make_quantization_aware(model, grid["block_size"])
    else:
        model = modeling.load_causal_lm(folder, trust_remote_code)
    return TorchGenerator(model, modeling.load_tokenizer(folder, trust_remote_code))


def measure_latency(generator, prompt: str, new_tokens: int, warmup: int, repeats: int) -> dict:
    """Batch-1 greedy decoding of exactly `new_tokens` tokens: `warmup` untimed runs, then the median of
    `repeats`. ttft_ms: prompt in to first token out; ms_per_token: each later token; tokens_per_second:
    all new tokens over the whole run (prefill included)."""
    for _ in range(warmup):
        generator.token_times(prompt, new_tokens)
    runs = [generator.token_times(prompt, new_tokens) for _ in range(repeats)]
    if any(len(times) < 2 for times in runs):
        raise OrtuneError(
            f"eval.latency.new_tokens={new_tokens}: the model produced fewer than 2 tokens; is its context too short?"
        )
    return {
        "ttft_ms": 1000 * statistics.median(times[0] for times in runs),
        "ms_per_token": 1000 * statistics.median((times[-1] - times[0]) / (len(times) - 1) for times in runs),
        "tokens_per_second": statistics.median(len(times) / times[-1] for times in runs),
        "latency_new_tokens": len(runs[0]),
    }


def judge(spec: dict) -> dict:
    """Load one runtime, time it, then generate for every prompt. Peak memory (the process's peak
    resident set) is read after the latency runs, so it is that of batch-1 serving, not of eval batches."""
    started = time.perf_counter()
    generator = load_generator(spec["kind"], spec["dirs"], spec["trust_remote_code"])
    load_seconds = time.perf_counter() - started
    latency = {}
    if spec["latency"] is not None:
        latency = measure_latency(generator, spec["prompts"][0], **spec["latency"])
        latency["peak_memory_mb"] = peak_memory_mb()
    started = time.perf_counter()
    prompts, size = spec["prompts"], spec["batch_size"]
    if hasattr(generator, "generate_batch"):
        results = [
            g
            for i in range(0, len(prompts), size)
            for g in generator.generate_batch(prompts[i : i + size], spec["max_new_tokens"])
        ]
    else:
        results = [generator.generate(prompt, spec["max_new_tokens"]) for prompt in prompts]
    return {
        "generations": [r.text for r in results],
        "generated_tokens": sum(r.new_tokens for r in results),
        "model_size_mb": model_megabytes(spec["kind"], spec["dirs"]),
        "load_seconds": load_seconds,
        "eval_seconds": time.perf_counter() - started,
        **latency,
    }


def peak_memory_mb() -> float:
    """This process's peak resident memory. On Linux, VmHWM: getrusage's ru_maxrss would also count
    the parent's memory, which a spawned child inherits for the instant between fork and exec."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def judge_in_fresh_process(spec: dict) -> dict:
    """judge() in a new interpreter: nothing another runtime loaded counts towards this one's memory."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(judge, spec).result()
        except BrokenProcessPool:
            raise OrtuneError(
                f"eval: the process judging the {spec['kind']} model died (out of memory, or killed); "
                f"drop '{spec['kind']}' from eval.compare or use a bigger machine"
            ) from None


def model_megabytes(kind: str, dirs: dict) -> float:
    """On-disk size of what a runtime loads (the adapter needs its base too)."""
    folders = {
        "onnx": ["onnx"],
        "base": ["base"],
        "prompted": ["base"],
        "merged": ["merged"],
        "adapter": ["base", "adapter"],
    }[kind]
    return folder_megabytes(*(dirs[name] for name in folders))


# ---- summary ----------------------------------------------------------------------------------------


def summarize(rows: list[dict], labels: list[str], train: list[dict], results: dict[str, dict]) -> tuple[dict, dict]:
    """(eval.json's metrics, each runtime's parsed predictions). Top-level numbers are the shipped ONNX
    model's, plus the baselines and the quantization loss: the columns `dvc exp show` lists."""
    truth = [r["label"] for r in rows]
    predictions = {kind: [parse_label(g, labels) for g in result["generations"]] for kind, result in results.items()}
    shipped = predictions["onnx"]
    majority = classification_scores(truth, [majority_label([r["label"] for r in train])] * len(truth), labels)
    train_prompts = {data.prompt_key(r["prompt"]) for r in train}
    metrics = {
        **classification_scores(truth, shipped, labels),
        "majority_baseline": majority["accuracy"],
        "majority_baseline_macro_f1": majority["macro_f1"],
        **{key: results["onnx"][key] for key in LATENCY_KEYS},
        "model_size_mb": results["onnx"]["model_size_mb"],
        "generated_tokens": results["onnx"]["generated_tokens"],
        "train_overlap": sum(data.prompt_key(r["prompt"]) in train_prompts for r in rows),
    }
    if "base" in results:
        base = classification_scores(truth, predictions["base"], labels)
        metrics.update(base_accuracy=base["accuracy"], base_macro_f1=base["macro_f1"], base_unparsed=base["unparsed"])
    if "prompted" in results:
        prompted = classification_scores(truth, predictions["prompted"], labels)
        metrics.update(
            prompted_baseline_accuracy=prompted["accuracy"],
            prompted_baseline_macro_f1=prompted["macro_f1"],
            prompted_baseline_unparsed=prompted["unparsed"],
        )
    if "merged" in results:
        merged = classification_scores(truth, predictions["merged"], labels)
        metrics["quantization_accuracy_delta"] = metrics["accuracy"] - merged["accuracy"]
        metrics["quantization_agreement"] = agreement(shipped, predictions["merged"])
    metrics["per_class"] = per_class_scores(truth, shipped, labels)
    metrics["runtimes"] = {}
    for kind, result in results.items():
        scores = classification_scores(truth, predictions[kind], labels)
        metrics["runtimes"][kind] = {
            "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
            "unparsed": scores["unparsed"],
            "onnx_accuracy_delta": metrics["accuracy"] - scores["accuracy"],
            "agreement_with_onnx": agreement(shipped, predictions[kind]),
            **{key: result[key] for key in LATENCY_KEYS if key in result},  # none for UNTIMED baselines
            "model_size_mb": result["model_size_mb"],
            "load_seconds": result["load_seconds"],
            "eval_seconds": result["eval_seconds"],
            **{key: result[key] for key in ("prompt_format", "shots") if key in result},  # the prompted baseline's
        }
    return metrics, predictions


def prediction_rows(
    rows: list[dict], prompts: list[str], results: dict[str, dict], predictions: dict[str, list]
) -> list[dict]:
    """One line per judged row: the prompt as the models saw it, the shipped model's generation and
    label, and every runtime's label."""
    return [
        {
            "prompt": prompts[i],
            "label": row["label"],
            "generation": results["onnx"]["generations"][i],
            "prediction": predictions["onnx"][i],
            "predictions": {kind: p[i] for kind, p in predictions.items()},
        }
        for i, row in enumerate(rows)
    ]


def shipped_confusion(rows: list[dict], labels: list[str], predictions: dict[str, list]) -> list[list[int]]:
    return confusion_matrix([r["label"] for r in rows], predictions["onnx"], labels)


# ---- the prompted zero-shot (or few-shot) baseline --------------------------------------------------


def prompted_prompts(cfg: DictConfig, rows: list[dict], labels: list[str], train: list[dict]) -> tuple[list[str], str]:
    """(each row as the untuned base is asked it, and how: "chat" through its chat template, or "text"
    when its tokenizer has none). The question is eval.baseline_prompt with {labels} and {input} (the
    row's own text, recovered from its rendered prompt); eval.baseline_shots answered training rows go
    first, as earlier turns of the conversation."""
    from ortune import modeling

    e, spec = cfg.eval, cfg.data
    shots = pick_shots(train, e.baseline_shots)
    listed = ", ".join(labels)
    ask = [e.baseline_prompt.format(labels=listed, input=row_input(r["prompt"], spec)) for r in shots]
    turns = [
        turn
        for question, row in zip(ask, shots)
        for turn in ({"role": "user", "content": question}, {"role": "assistant", "content": row["label"]})
    ]
    questions = [e.baseline_prompt.format(labels=listed, input=row_input(r["prompt"], spec)) for r in rows]
    tokenizer = modeling.load_tokenizer(cfg.paths.base_model, cfg.model.trust_remote_code)
    if tokenizer.chat_template:
        return [
            tokenizer.apply_chat_template(
                [*turns, {"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in questions
        ], "chat"
    # A base model without a chat template is a plain LM: the same question and shots as a text to continue.
    log.warning(
        "%s: the tokenizer has no chat template; the prompted baseline asks in plain text "
        "('<question>\\nAnswer:') instead",
        cfg.paths.base_model,
    )
    examples = "".join(f"{question}\nAnswer: {row['label']}\n\n" for question, row in zip(ask, shots))
    return [f"{examples}{q}\nAnswer:" for q in questions], "text"


def pick_shots(train: list[dict], k: int) -> list[dict]:
    """k training rows, the labels taking turns (sorted), each label's rows in split order: every label
    is shown once before any is shown twice."""
    if k > len(train):
        raise OrtuneError(f"eval.baseline_shots={k}: the training split has only {len(train)} rows; lower it")
    by_label: dict[str, list[dict]] = {}
    for row in train:
        by_label.setdefault(row["label"], []).append(row)
    queues = [by_label[label] for label in sorted(by_label)]
    turns = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
    return turns[:k]


def row_input(prompt: str | list[dict], spec: DictConfig) -> str:
    """The text a prepared prompt was rendered from: a chat prompt's (last) user turn, or the fields of
    data.template.prompt read back out of a text prompt (joined by newlines when there are several)."""
    if not isinstance(prompt, str):
        return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    groups, pattern = _template_pattern(spec.template.prompt)
    if not groups:
        raise OrtuneError(
            "data.template.prompt has no {field}, so a prompt holds no text to ask the prompted "
            "baseline about; drop 'prompted' from eval.compare"
        )
    match = pattern.fullmatch(prompt)
    if match is None:
        raise OrtuneError(
            f"data.template.prompt does not produce the prompt {prompt[:60]!r}; the prepared split "
            "is older than the template: rerun prepare_data (dvc repro), or drop 'prompted' from eval.compare"
        )
    return "\n".join(match.group(group) for group in groups)


@functools.lru_cache(maxsize=8)
def _template_pattern(template: str) -> tuple[list[str], re.Pattern]:
    """A regex that matches exactly what `template` renders, one group per field (a repeated field must repeat)."""
    names: list[str] = []
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is None:
            continue
        if field in names:
            parts.append(f"(?P=f{names.index(field)})")
        else:
            parts.append(f"(?P<f{len(names)}>.*?)")
            names.append(field)
    return [f"f{i}" for i in range(len(names))], re.compile("".join(parts), re.DOTALL)
