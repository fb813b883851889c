"""Decode cost in CPU time, one thread per engine: `make bench`'s comparison for a machine that is not quiet.

On a shared machine wall-clock decode times mostly measure how long other processes kept ours
descheduled (2-4x on a loaded 2-core VM). With ONE intra-op thread (genai) or one torch thread, all of
a decode step runs on the calling thread, so that thread's CPU time is the step's cost, whatever the
scheduler did; other processes' memory traffic still slows it (say so when reporting). The steady
decode step is measured by difference: CPU time of a long decode minus that of a short one, over the
extra tokens (prompt and first tokens cancel). Floor: bytes read per token (as `make bench`) over what
one core copies per CPU second.

    python bench/cpu_decode.py --model smollm2          # genai int4/int8/fp32, torch fp32/bf16
    python bench/cpu_decode.py --model random --engines "genai int4,torch fp32"
    python bench/cpu_decode.py --model random --engines "genai int4,torch fp32" --variant "onnx.block_size=32"
    python bench/cpu_decode.py --model random --record  # this CPU family's row set in results.json/.md, README

--record keeps the run as this CPU family's entry of bench/results.json (rendered in results.md and the
README, labelled "1 thread, CPU time"), for a family that has no quiet `make bench` run yet; it never
replaces a `make bench` entry, and a later `make bench` on the family replaces it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from matmulnbits import one_core_copy_bandwidth
from ortune.artifacts import write_json_atomic, write_text_atomic
from ortune_bench import NEW_TOKENS, PROMPT, ROOT, cache_dir
from ortune_bench.bytes_read import kv_bytes_per_token
from ortune_bench.decode import GenaiRunner, TorchRunner, model_shape
from ortune_bench.machine import cpu_snapshot, machine_info, other_cores, this_cpu_family
from ortune_bench.models import MODELS, QUICK, PackagedGguf, build_key, build_onnx_models, default_engines
from ortune_bench.results import (
    CPU_TIME_1_THREAD,
    decode_sections,
    family_of,
    load_results,
    merge_results,
    render_results,
    update_readme,
)


def one_thread_copy(folder: Path, scratch: Path) -> Path:
    """The genai model folder with intra_op_num_threads = 1 (links to its files, its own genai_config.json)."""
    out = Path(tempfile.mkdtemp(prefix=f"{folder.name}-", dir=scratch))
    for item in folder.iterdir():
        if item.name != "genai_config.json":
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 1
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out


def cpu_seconds(runner, tokens: int) -> float:
    started = time.thread_time()
    times = runner.token_times(PROMPT, tokens)
    if len(times) != tokens:
        raise RuntimeError(f"{len(times)} tokens instead of {tokens}")
    return time.thread_time() - started


TIMING = CPU_TIME_1_THREAD  # how results.decode_markdown tells these rows from `make bench`'s wall-clock ones


def bench_section(
    model: dict,
    rows: list[dict],
    steps: dict,
    settings: dict,
    core_samples: list[float],
    new_tokens: int,
    short: int,
    repeats: int,
) -> dict:
    """The run as a `make bench` decode section (the fields results.decode_markdown renders), flagged as
    1-thread CPU time: ms/token = CPU ms/token, floor = bytes over one core's copy bandwidth."""
    bandwidth = statistics.median(core_samples)
    engines = []
    for row in rows:
        ms = row["cpu_ms_per_token"]
        engines.append(
            {
                "engine": row["engine"],
                "tokens_per_s": 1000 / ms,
                "ms_per_token": ms,
                "ms_per_token_min": row["spread"][0],
                "ms_per_token_max": row["spread"][1],
                "speedup_vs_torch_fp32": row["speedup_vs_torch_fp32"],
                "bytes_per_token": row["bytes_per_token"],
                "floor_ms_per_token": row["one_core_floor_ms"],
                "percent_of_floor": row["percent_of_one_core_floor"],
                "contended_runs": 0,
                "settings": settings.get(row["engine"], {}),
            }
        )
    return {
        "timing": TIMING,
        "model": model,
        "new_tokens": new_tokens,
        "short_tokens": short,
        "warmup_rounds": 1,
        "repeats": repeats,
        "copy_bandwidth_gb_s": {"used": bandwidth / 1e9, "samples": [b / 1e9 for b in core_samples], "one_core": True},
        "engines": engines,
        "steps_cpu_ms": steps,
    }


def record(results_dir: Path, run: dict, readme: Path | None = None) -> Path:
    """Merge `run` into results_dir/results.json as its family's entry (beside the other models of an
    earlier 1-thread run there), unless that family has a `make bench` entry (which is worth more: all
    cores, wall clock, a quiet machine); re-render results.md and the README's benchmark block."""
    results = load_results(results_dir / "results.json")
    family = family_of(run)["name"]
    recorded = (results.get("families") or {}).get(family)
    if recorded and not all(section.get("timing") == TIMING for section in decode_sections(recorded)):
        raise SystemExit(
            f"results.json already holds a `make bench` run for {family}: not replaced by a 1-thread CPU-time run"
        )
    if recorded:  # an earlier 1-thread run on this family: keep its other models' sections
        models = {section["model"].get("name") for section in decode_sections(run)}
        kept = [section for section in decode_sections(recorded) if section["model"].get("name") not in models]
        run = {**run, "decode": kept + decode_sections(run)}
    results = merge_results(results, run)
    write_json_atomic(results_dir / "results.json", results)
    write_text_atomic(results_dir / "results.md", render_results(results))
    update_readme(render_results(results, compact=True), readme)
    return results_dir / "results.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help=f"{', '.join(MODELS)} or quick")
    parser.add_argument("--engines", default=None, help="comma-separated subset of the five engines")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help='an extra genai int4 engine built with these conf overrides ("k=v k2=v2"), repeatable',
    )
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=NEW_TOKENS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--record",
        action="store_true",
        help="keep the run (the five engines, no variants) as this CPU family's entry of "
        "bench/results.json, results.md and the README (never over a `make bench` entry)",
    )
    args = parser.parse_args(argv)
    if args.record and (args.variant or args.engines or args.model not in MODELS):
        parser.error("--record takes the five engines of a bench model (no --variant, --engines, quick)")
    import torch

    torch.set_num_threads(1)
    spec = QUICK if args.model == "quick" else MODELS[args.model]
    engines = default_engines(args.variant)
    if args.engines:
        wanted = {name.strip() for name in args.engines.split(",")}
        engines = [e for e in engines if e.name in wanted or e.overrides]
    hf_dir = spec.build(cache_dir() / f"hf-{spec.name}-{spec.key()}")
    dirs = {
        e.name: cache_dir() / f"onnx-{spec.key()}-{e.precision}-{build_key(e.precision, e.overrides, spec.conf_model)}"
        for e in engines
        if e.runtime == "genai"
    }
    build_onnx_models(
        hf_dir,
        {dirs[e.name]: (e.precision, e.overrides) for e in engines if e.name in dirs},
        conf_model=spec.conf_model,
    )
    family = this_cpu_family()
    print(f"{spec.name} on {family['name']} ({', '.join(family['isa'])}), one thread per engine", flush=True)
    with tempfile.TemporaryDirectory(prefix="ortune-cpu-decode-") as tmp:
        runners, bytes_per_token = {}, {}
        started_date = time.strftime("%Y-%m-%d %H:%M %Z")
        load_average = list(os.getloadavg())
        for engine in engines:
            if engine.runtime == "genai":
                runner = GenaiRunner(one_thread_copy(dirs[engine.name], Path(tmp)))
            else:
                runner = TorchRunner(hf_dir, engine.precision)
            kv = kv_bytes_per_token(**runner.kv, prompt_tokens=runner.prompt_tokens(PROMPT), new_tokens=args.long)
            runners[engine.name], bytes_per_token[engine.name] = runner, runner.weights["per_token"] + kv
        core = [one_core_copy_bandwidth()]
        steps: dict[str, list[float]] = {name: [] for name in runners}
        others: list[float] = []  # cores other processes used during each round
        round_started = cpu_snapshot()
        for round_index in range(args.repeats + 1):  # round 0: warm-up
            for name, runner in runners.items():
                long, short = cpu_seconds(runner, args.long), cpu_seconds(runner, args.short)
                if round_index:
                    steps[name].append(1000 * (long - short) / (args.long - args.short))
            core.append(one_core_copy_bandwidth())
            others.append(other_cores(round_started, cpu_snapshot()))
            round_started = cpu_snapshot()
            print(
                f"  round {round_index}: "
                + ", ".join(f"{n} {s[-1]:.2f}" for n, s in steps.items() if s)
                + " CPU ms/token",
                flush=True,
            )
    bandwidth = statistics.median(core)
    reference = statistics.median(steps["torch fp32"]) if "torch fp32" in steps else None
    rows = []
    for name, values in steps.items():
        ms = statistics.median(values)
        floor = 1000 * bytes_per_token[name] / bandwidth
        rows.append(
            {
                "engine": name,
                "cpu_ms_per_token": ms,
                "spread": [min(values), max(values)],
                "speedup_vs_torch_fp32": reference / ms if reference else None,
                "bytes_per_token": bytes_per_token[name],
                "one_core_floor_ms": floor,
                "percent_of_one_core_floor": 100 * floor / ms,
            }
        )
    print(
        f"\none core copies {bandwidth / 1e9:.1f} GB/s per CPU second (median of {len(core)}: "
        f"{', '.join(f'{b / 1e9:.0f}' for b in core)})\n"
    )
    print("| engine (1 thread) | CPU ms/token | × PyTorch fp32 | MB read/token | one-core floor ms | % of floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        speedup = f"{row['speedup_vs_torch_fp32']:.2f}×" if row["speedup_vs_torch_fp32"] else "-"
        print(
            f"| {row['engine']} | {row['cpu_ms_per_token']:.2f} ({row['spread'][0]:.2f}-{row['spread'][1]:.2f}) | "
            f"{speedup} | {row['bytes_per_token'] / 1e6:.0f} | {row['one_core_floor_ms']:.2f} | "
            f"{row['percent_of_one_core_floor']:.0f} % |"
        )
    print(
        f"other processes used {statistics.median(others):.1f} cores (median over the rounds; "
        f"{min(others):.1f}-{max(others):.1f})"
    )
    if args.record:
        model = {
            "name": spec.name,
            **model_shape(hf_dir),
            "prompt_tokens": runners["torch fp32"].prompt_tokens(PROMPT),
            "parameters": sum(p.numel() for p in runners["torch fp32"].generator.model.parameters()),
        }
        if isinstance(spec, PackagedGguf):
            from importlib import metadata

            model["package_version"] = metadata.version(spec.package)
        section = bench_section(
            model,
            rows,
            steps,
            {name: r.settings for name, r in runners.items()},
            core,
            args.long,
            args.short,
            args.repeats,
        )
        section["others_cores"] = others
        machine = machine_info()
        machine["load_average_at_start"] = load_average
        run = {
            "date": started_date,
            "quick": False,
            "machine": machine,
            "decode": [section],
            "pipeline": {"skipped": "skipped (1-thread CPU-time run, bench/cpu_decode.py --record)"},
        }
        print(f"wrote {record(ROOT / 'bench', run)}, results.md and the README's benchmark block")
    if args.out:
        write_json_atomic(
            args.out,
            {
                "model": spec.name,
                "cpu_family": family,
                "one_core_copy_gb_s": bandwidth / 1e9,
                "rows": rows,
                "steps": steps,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
