"""Where a decode step's time goes: an onnxruntime profile of a genai model's decode steps, per op type.

genai runs the decoder graph once for the prompt, then once per new token. With the session option
`enable_profiling` (an og.Config overlay: the model folder is not touched) onnxruntime records every
node's kernel time and every run; this groups the kernels of the decode runs (all but the first) by op
type, per step: time, node count, µs per node, and the rest of the step (onnxruntime's own work
between kernels, and genai's outside the run: logits, search).

    python bench/profile_decode.py --model smollm2              # int4 of the bench's model cache
    python bench/profile_decode.py --model random --precision int8 --threads 1
    python bench/profile_decode.py --dir models/onnx            # any genai model folder

Profiling adds ~1 µs per node of its own: compare the step time with and without it (printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ortune.artifacts import write_json_atomic
from ortune_bench import NEW_TOKENS, PROMPT, cache_dir
from ortune_bench.machine import cpu_snapshot, other_cores, this_cpu_family
from ortune_bench.models import MODELS, QUICK, build_key, build_onnx_models


def model_dir(model: str, precision: str) -> Path:
    """The bench's cached build of `model` at `precision` with ortune's defaults (built if missing)."""
    spec = QUICK if model == "quick" else MODELS[model]
    hf_dir = spec.build(cache_dir() / f"hf-{spec.name}-{spec.key()}")
    out = cache_dir() / f"onnx-{spec.key()}-{precision}-{build_key(precision, (), spec.conf_model)}"
    build_onnx_models(hf_dir, {out: (precision, ())}, conf_model=spec.conf_model)
    return out


def load(folder: Path, threads: int | None, profile_prefix: str | None):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    session: dict = {}
    if threads:
        session["intra_op_num_threads"] = threads
    if profile_prefix:
        session["enable_profiling"] = profile_prefix
    if session:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    return og, model, og.Tokenizer(model)


def decode(og, model, tokenizer, prompt: str, new_tokens: int) -> tuple[list[float], list[float]]:
    """Seconds at each new token (as bench's token_times), wall clock and CPU time of this thread (with 1
    intra-op thread onnxruntime computes on it: CPU time leaves out the time a busy machine kept it
    descheduled)."""
    ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    length = len(ids) + new_tokens
    params.set_search_options(do_sample=False, max_length=length, min_length=length)
    generator = og.Generator(model, params)
    started, cpu_started = time.perf_counter(), time.thread_time()
    generator.append_tokens(ids)
    times, cpu_times = [], []
    while not generator.is_done():
        generator.generate_next_token()
        times.append(time.perf_counter() - started)
        cpu_times.append(time.thread_time() - cpu_started)
    del generator
    return times, cpu_times


def step_ms(times: list[float]) -> float:
    return 1000 * (times[-1] - times[0]) / (len(times) - 1)


def breakdown(events: list[dict], decodes: int = 2) -> dict:
    """Kernel µs by op type, node counts and the run's total, averaged per decode step, over the last of
    `decodes` equal decodes (each: one prompt run, then one run per step)."""
    runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    skip_runs = len(runs) - len(runs) // decodes + 1  # earlier decodes, and the last one's prompt run
    kernels = sorted(
        (e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
        key=lambda e: e["ts"],
    )
    decode_runs = runs[skip_runs:]
    per_op: dict[str, list[float]] = {}
    per_node: dict[str, tuple[str, list[float]]] = {}  # node -> (op type, its time in each step)
    counts: dict[str, int] = {}
    run_us, kernel_us = [], []
    index = 0
    for run in decode_runs:
        start, end = run["ts"], run["ts"] + run["dur"]
        while index < len(kernels) and kernels[index]["ts"] < start:
            index += 1
        step: dict[str, float] = {}
        step_counts: dict[str, int] = {}
        while index < len(kernels) and kernels[index]["ts"] <= end:
            op = kernels[index]["args"].get("op_name", "?")
            step[op] = step.get(op, 0.0) + kernels[index]["dur"]
            step_counts[op] = step_counts.get(op, 0) + 1
            per_node.setdefault(kernels[index]["name"], (op, []))[1].append(kernels[index]["dur"])
            index += 1
        for op, us in step.items():
            per_op.setdefault(op, []).append(us)
        counts = step_counts
        run_us.append(run["dur"])
        kernel_us.append(sum(step.values()))
    steps = len(decode_runs)
    # typical step: each node's median over the steps, summed per op type; on a busy machine the mean
    # also carries the few steps during which the thread was descheduled
    typical: dict[str, float] = {}
    for op, durations in per_node.values():
        typical[op] = typical.get(op, 0.0) + statistics.median(durations)
    return {
        "steps": steps,
        "run_us": statistics.fmean(run_us),
        "kernel_us": statistics.fmean(kernel_us),
        "run_us_median": statistics.median(run_us),
        "gap_us_median": statistics.median(r - k for r, k in zip(run_us, kernel_us)),
        "ops": {
            op: {"us": sum(v) / steps, "us_typical": typical[op], "nodes": counts.get(op, 0)}
            for op, v in sorted(per_op.items(), key=lambda kv: -sum(kv[1]))
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help=f"{', '.join(MODELS)} or quick (the bench's cache)")
    parser.add_argument("--precision", default="int4")
    parser.add_argument("--dir", type=Path, default=None, help="a genai model folder instead of --model")
    parser.add_argument("--threads", type=int, default=None, help="override intra_op_num_threads")
    parser.add_argument("--tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--rounds", type=int, default=3, help="unprofiled rounds timed before and after")
    parser.add_argument("--out", type=Path, default=None, help="write the breakdown as JSON here")
    args = parser.parse_args(argv)
    folder = args.dir or model_dir(args.model, args.precision)
    family = this_cpu_family()
    print(
        f"{folder} on {family['name']} ({', '.join(family['isa'])}), threads {args.threads or 'as genai_config.json'}",
        flush=True,
    )

    og, model, tokenizer = load(folder, args.threads, None)
    decode(og, model, tokenizer, PROMPT, args.tokens)  # warm-up
    plain = []
    for _ in range(args.rounds):
        before = cpu_snapshot()
        wall, cpu = decode(og, model, tokenizer, PROMPT, args.tokens)
        plain.append((step_ms(wall), other_cores(before, cpu_snapshot()), step_ms(cpu)))
    del model

    with tempfile.TemporaryDirectory(prefix="ortune-profile-") as tmp:
        og, model, tokenizer = load(folder, args.threads, str(Path(tmp) / "decode"))
        decode(og, model, tokenizer, PROMPT, args.tokens)  # warm-up (its runs are skipped below)
        before = cpu_snapshot()
        wall, cpu = decode(og, model, tokenizer, PROMPT, args.tokens)
        profiled, profiled_cpu = step_ms(wall), step_ms(cpu)
        busy = other_cores(before, cpu_snapshot())
        del model, tokenizer  # the session writes its profile when it ends
        files = sorted(Path(tmp).glob("decode*.json"))
        if not files:
            raise SystemExit("no profile written (enable_profiling not honoured by this onnxruntime-genai)")
        events = json.loads(files[-1].read_text())
    result = breakdown(events)  # the warm-up decode, then the profiled one
    step_us = 1000 * profiled
    print(
        f"\nms/token: {statistics.median(p for p, _, _ in plain):.2f} unprofiled (others' cores "
        f"{', '.join(f'{b:.1f}' for _, b, _ in plain)}), {profiled:.2f} profiled ({busy:.1f}); "
        f"{result['steps']} decode runs profiled"
    )
    if args.threads == 1:
        print(
            f"CPU ms/token of the decoding thread (1 intra-op thread): {statistics.median(c for _, _, c in plain):.2f} "
            f"unprofiled, {profiled_cpu:.2f} profiled"
        )
    print(
        f"per step: onnxruntime run {result['run_us']:.0f} µs, of which kernels {result['kernel_us']:.0f} µs; "
        f"outside the run (genai: logits, search) {step_us - result['run_us']:.0f} µs\n"
    )
    typical_step = sum(r["us_typical"] for r in result["ops"].values()) + result["gap_us_median"]
    print(
        "mean = over the decode steps; typical = each node's median over the steps, summed (robust to the "
        "steps a busy machine descheduled us in)\n"
    )
    print("| op type | nodes/step | mean µs/step | % of step | typical µs/step | % of typical run | typical µs/node |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for op, row in result["ops"].items():
        print(
            f"| {op} | {row['nodes']} | {row['us']:.0f} | {100 * row['us'] / step_us:.1f} % | "
            f"{row['us_typical']:.0f} | {100 * row['us_typical'] / typical_step:.1f} % | "
            f"{row['us_typical'] / max(row['nodes'], 1):.1f} |"
        )
    gap = result["run_us"] - result["kernel_us"]
    nodes = max(sum(r["nodes"] for r in result["ops"].values()), 1)
    print(
        f"| (onnxruntime between kernels) | | {gap:.0f} | {100 * gap / step_us:.1f} % | "
        f"{result['gap_us_median']:.0f} | {100 * result['gap_us_median'] / typical_step:.1f} % | "
        f"{result['gap_us_median'] / nodes:.1f} |"
    )
    print(
        f"| (genai outside the run) | | {step_us - result['run_us']:.0f} | "
        f"{100 * (step_us - result['run_us']) / step_us:.1f} % | | | |"
    )
    if args.out:
        write_json_atomic(
            args.out,
            {
                "folder": str(folder),
                "cpu_family": family,
                "threads": args.threads,
                "ms_per_token_plain": plain,
                "ms_per_token_profiled": profiled,
                "cpu_ms_per_token_profiled": profiled_cpu,
                "other_cores": busy,
                **result,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
