"""Judging models on labelled rows: which rows, each runtime's generations and latency, and the
summary that becomes metrics/eval.json.

The rows judged are the test split (eval.path): nothing chose anything on them. The shipped ONNX model
is also judged on the validation split, which `make best` selects on. `eval.compare` names the PyTorch
models judged beside it on the same rows with the same prompts and parse rule: `base` (untuned, asked
with the fine-tuning prompt), `adapter` (base + LoRA, as trained) and `merged` (what the ONNX model was
exported from, so ONNX vs merged is the quantization loss). `prompted` is the untuned base asked as a
user would ask it without fine-tuning, and scored by log-likelihood over the labels (ortune.baselines).
Every figure carries a 95 % bootstrap interval over the rows (ortune.intervals). Each runtime runs in a
fresh process, so its peak memory is its own.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from omegaconf import DictConfig

from ortune import baselines, data, intervals, tasks
from ortune.artifacts import folder_megabytes, write_text_atomic
from ortune.config import EVAL_COMPARABLE
from ortune.errors import OrtuneError
from ortune.freetext import LATENCY_KEYS, new_tokens
from ortune.metrics import (
    agreement,
    classification_scores,
    confusion_matrix,
    lenient_label,
    majority_label,
    parse_label,
    per_class_scores,
)
from ortune.records import Records, placer, read_records

log = logging.getLogger("ortune")

# Speed numbers of every runtime (LATENCY_KEYS) are the shipped model's headline (top-level) numbers too.
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
        rows = Records(lines, (f"{path}:{n}: row {n}" for n in range(1, len(lines) + 1)))
    else:
        records = read_records(path)
        rows = Records(render_records(cfg.data, records, f"eval.path={path}"), records.places)
    if cfg.eval.limit:
        rows = Records(rows[: cfg.eval.limit], rows.places[: cfg.eval.limit])
    if not rows:
        raise OrtuneError(f"eval.path={path}: no rows to judge; it needs labelled rows")
    unknown = sorted({r["label"] for r in rows if "label" in r} - set(labels))  # free-text rows have none
    if unknown:
        raise OrtuneError(
            f"eval.path={path}: label(s) {', '.join(unknown)} were never trained on (the model knows "
            f"{', '.join(labels)}); drop those rows or retrain with them"
        )
    return rows, labels, train


def load_validation(cfg: DictConfig) -> list[dict]:
    """The prepared validation split (eval.limit applies): the shipped model is judged on it too, for
    `make best` to select on rows the reported test figures were not measured on."""
    path = Path(cfg.paths.prepared) / "validation.jsonl"
    if not path.is_file():
        raise OrtuneError(f"paths.prepared={path.parent}: no validation.jsonl; rerun prepare_data (dvc repro)")
    rows = data.read_jsonl(path)
    return rows[: cfg.eval.limit] if cfg.eval.limit else rows


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
    room = new_tokens(cfg)
    lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    where = placer(rows, str(cfg.eval.path))
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
    tasks.check_rows(records, spec, source)
    return tasks.render_split(records, spec)[1]


# ---- one runtime, in its own process ----------------------------------------------------------------


def job(kind: str, cfg: DictConfig, prompts: list[str], **extra) -> dict:
    """Everything a fresh process needs to judge one runtime (plain data: it crosses a process boundary).
    extra: `validation_prompts` (generated for too), `variants` ({name: prompts}, generated for too: the
    prompted baseline asked zero-shot beside k-shot), `choices` ({name: {prompts, delimiter, format,
    shots}}) and `labels` (scored by log-likelihood, ortune.baselines)."""
    e = cfg.eval
    return {
        **extra,
        "kind": kind,
        "dirs": {
            name: str(cfg.paths[key])
            for name, key in (("onnx", "onnx"), ("base", "base_model"), ("adapter", "adapter"), ("merged", "merged"))
        },
        "trust_remote_code": bool(cfg.model.trust_remote_code),
        "prompts": prompts,
        # the prompted baseline answers in a sentence: room for one, and for the task's answers
        "max_new_tokens": max(new_tokens(cfg), e.baseline_new_tokens) if kind == "prompted" else new_tokens(cfg),
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
            quantize.make_quantization_aware(model, grid["block_size"], frozen=True)
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
    results = _generate(generator, spec["prompts"], spec["max_new_tokens"], spec["batch_size"])
    eval_seconds = time.perf_counter() - started
    extra = {}
    if spec.get("validation_prompts"):
        generated = _generate(generator, spec["validation_prompts"], spec["max_new_tokens"], spec["batch_size"])
        extra["validation_generations"] = [r.text for r in generated]
        extra["validation_new_tokens"] = [r.new_tokens for r in generated]
    for name, prompts in (spec.get("variants") or {}).items():  # the same model asked another way
        started = time.perf_counter()
        generated = _generate(generator, prompts, spec["max_new_tokens"], spec["batch_size"])
        extra.setdefault("variants", {})[name] = {
            "generations": [r.text for r in generated],
            "new_tokens": [r.new_tokens for r in generated],
            "eval_seconds": time.perf_counter() - started,
        }
    if spec.get("choices"):
        started = time.perf_counter()
        extra["choices"] = {
            name: {
                "scores": baselines.label_log_likelihoods(
                    generator.model,
                    generator.tokenizer,
                    asked["prompts"],
                    spec["labels"],
                    asked["delimiter"],
                    spec["batch_size"],
                ),
                "format": asked["format"],
                "shots": asked["shots"],
            }
            for name, asked in spec["choices"].items()
        }
        log.info("log-likelihood baselines scored in %.1f s", time.perf_counter() - started)
    return {
        **extra,
        "generations": [r.text for r in results],
        "new_tokens": [r.new_tokens for r in results],  # per row: which generations hit the limit
        "max_new_tokens": spec["max_new_tokens"],
        "generated_tokens": sum(r.new_tokens for r in results),
        "model_size_mb": model_megabytes(spec["kind"], spec["dirs"]),
        "load_seconds": load_seconds,
        "eval_seconds": eval_seconds,
        **latency,
    }


def _generate(generator, prompts: list[str], max_new_tokens: int, size: int) -> list:
    if hasattr(generator, "generate_batch"):
        return [
            g
            for i in range(0, len(prompts), size)
            for g in generator.generate_batch(prompts[i : i + size], max_new_tokens)
        ]
    return [generator.generate(prompt, max_new_tokens) for prompt in prompts]


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


# what every PyTorch judge imports before it loads a model (about 3 s on 2 cores): a fork server imports it once
# and forks each of those judges from it, instead of each new interpreter importing it again
TORCH_JUDGE_PRELOAD = ["torch", "transformers", "peft", "ortune.evaluation", "ortune.modeling", "ortune.generation"]


def judge_context(kind: str):
    """Where judge() runs: a fork of a server that has imported only PyTorch's stack and never a model, so
    nothing another runtime loaded counts towards this one's memory; the ONNX judge, which never imports
    PyTorch, in a new interpreter (a fork of that server would count PyTorch's memory as ONNX's)."""
    import multiprocessing

    if kind == "onnx" or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(TORCH_JUDGE_PRELOAD)
    return context


def judge_in_fresh_process(spec: dict) -> dict:
    """judge() in a process of its own: nothing another runtime loaded counts towards this one's memory."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=judge_context(spec["kind"])) as pool:
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


def summarize(
    rows: list[dict],
    labels: list[str],
    train: list[dict],
    results: dict[str, dict],
    validation: list[dict] | None = None,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[dict, dict]:
    """(eval.json's metrics, each runtime's and baseline's predictions). Top-level numbers are the shipped
    ONNX model's, plus the baselines and the quantization loss: the columns `dvc exp show` lists. Each
    figure's 95 % interval is in a `ci95` beside it: bootstrap over the rows, the same `resamples` draws
    (seeded) for every model, so differences between them are paired."""
    truth = [r["label"] for r in rows]
    # the prompted baseline was never taught the answer format: its sentence is read leniently
    predictions = {
        kind: [(lenient_label if kind == "prompted" else parse_label)(g, labels) for g in result["generations"]]
        for kind, result in results.items()
    }
    shipped = predictions["onnx"]
    draws = intervals.resample_rows(len(truth), resamples, seed)
    headline = scored(truth, shipped, labels, draws)
    predictions["majority"] = [majority_label([r["label"] for r in train])] * len(truth)
    found = {"majority": scored(truth, predictions["majority"], labels, draws)}
    train_prompts = {data.prompt_key(r["prompt"]) for r in train}
    metrics = {
        **{key: headline[key] for key in ("accuracy", "macro_f1", "unparsed", "n")},
        "majority_baseline": found["majority"]["accuracy"],
        "majority_baseline_macro_f1": found["majority"]["macro_f1"],
        **{key: results["onnx"][key] for key in LATENCY_KEYS},
        "model_size_mb": results["onnx"]["model_size_mb"],
        "generated_tokens": results["onnx"]["generated_tokens"],
        "train_overlap": sum(data.prompt_key(r["prompt"]) in train_prompts for r in rows),
        "ci95": dict(headline["ci95"]),
    }
    if "base" in results:
        found["base"] = base = scored(truth, predictions["base"], labels, draws)
        metrics.update(base_accuracy=base["accuracy"], base_macro_f1=base["macro_f1"], base_unparsed=base["unparsed"])
    if "prompted" in results:
        found["prompted"] = prompted = scored(truth, predictions["prompted"], labels, draws)
        prompted["samples"] = [  # what it said, for a reader to judge the parse
            {"answer": answer, "label": label, "read_as": read}
            for answer, label, read in list(zip(results["prompted"]["generations"], truth, predictions["prompted"]))[:2]
        ]
        metrics.update(
            prompted_baseline_accuracy=prompted["accuracy"],
            prompted_baseline_macro_f1=prompted["macro_f1"],
            prompted_baseline_unparsed=prompted["unparsed"],
        )
        for name, choice in (results["prompted"].get("choices") or {}).items():
            predictions[name] = baselines.best_labels(choice["scores"], labels)
            found[name] = {**scored(truth, predictions[name], labels, draws), "shots": choice["shots"]}
    # the gain of fine-tuning is stated against the strongest way of doing without it (majority included,
    # so never against a number below always answering the commonest label)
    strongest = max(found, key=lambda name: found[name]["accuracy"])
    metrics["baselines"] = found
    metrics["strongest_baseline"] = {"name": strongest, **found[strongest]}
    metrics["gain_over_strongest_baseline"] = metrics["accuracy"] - found[strongest]["accuracy"]
    metrics["ci95"]["gain_over_strongest_baseline"] = intervals.difference_interval(
        _correct(truth, shipped), _correct(truth, predictions[strongest]), draws
    )
    if "merged" in results:
        merged = classification_scores(truth, predictions["merged"], labels)
        metrics["quantization_accuracy_delta"] = metrics["accuracy"] - merged["accuracy"]
        metrics["quantization_agreement"] = agreement(shipped, predictions["merged"])
        same = [a == b for a, b in zip(shipped, predictions["merged"])]
        metrics["ci95"]["quantization_agreement"] = intervals.mean_interval(same, draws)
    if validation is not None and "validation_generations" in results["onnx"]:
        chosen_on = [r["label"] for r in validation]
        predicted = [parse_label(g, labels) for g in results["onnx"]["validation_generations"]]
        metrics["validation"] = scored(
            chosen_on, predicted, labels, intervals.resample_rows(len(chosen_on), resamples, seed)
        )
    metrics["per_class"] = per_class_scores(truth, shipped, labels)
    metrics["runtimes"] = {}
    for kind, result in results.items():
        scores = scored(truth, predictions[kind], labels, draws)
        metrics["runtimes"][kind] = {
            "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
            "unparsed": scores["unparsed"],
            "ci95": scores["ci95"],
            "onnx_accuracy_delta": metrics["accuracy"] - scores["accuracy"],
            "agreement_with_onnx": agreement(shipped, predictions[kind]),
            **{key: result[key] for key in LATENCY_KEYS if key in result},  # none for UNTIMED baselines
            "model_size_mb": result["model_size_mb"],
            "load_seconds": result["load_seconds"],
            "eval_seconds": result["eval_seconds"],
            **{key: result[key] for key in ("prompt_format", "shots") if key in result},  # the prompted baseline's
        }
    return metrics, predictions


def _correct(truth: list[str], predicted: list[str | None]) -> list[bool]:
    return [t == p for t, p in zip(truth, predicted)]


def scored(truth: list[str], predicted: list[str | None], labels: list[str], draws) -> dict:
    """Accuracy, macro-F1, unparsed and n, with the 95 % intervals of the first two on `draws`."""
    return {
        **classification_scores(truth, predicted, labels),
        "ci95": {
            "accuracy": intervals.mean_interval(_correct(truth, predicted), draws),
            "macro_f1": intervals.macro_f1_interval(truth, predicted, labels, draws),
        },
    }


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


def judged_on(cfg: DictConfig) -> dict:
    """What the headline was measured on, for the summary to say: the prepared test split, or a file."""
    path = Path(cfg.eval.path)
    prepared = path.resolve().parent == Path(cfg.paths.prepared).resolve()
    return {"split": f"{path.stem} split" if prepared else f"file {path}"}


def write_predictions(cfg: DictConfig, lines: list[dict]) -> None:
    """metrics/eval_predictions.jsonl: one JSON line per judged row, written whole or not at all."""
    write_text_atomic(
        Path(cfg.paths.metrics) / "eval_predictions.jsonl",
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
    )
