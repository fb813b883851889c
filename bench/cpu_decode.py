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
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from matmulnbits import one_core_copy_bandwidth  # noqa: E402


def one_thread_copy(folder: Path, scratch: Path) -> Path:
    """The genai model folder with intra_op_num_threads = 1 (links to its files, its own genai_config.json)."""
    out = scratch / folder.name
    out.mkdir()
    for item in folder.iterdir():
        if item.name != "genai_config.json":
            (out / item.name).symlink_to(item.resolve())
    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = 1
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out


def cpu_seconds(runner, tokens: int) -> float:
    started = time.thread_time()
    times = runner.token_times(bench.PROMPT, tokens)
    if len(times) != tokens:
        raise RuntimeError(f"{len(times)} tokens instead of {tokens}")
    return time.thread_time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help=f"{', '.join(bench.MODELS)} or quick")
    parser.add_argument("--engines", default=None, help="comma-separated subset of the five engines")
    parser.add_argument("--short", type=int, default=8)
    parser.add_argument("--long", type=int, default=bench.NEW_TOKENS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    spec = bench.QUICK if args.model == "quick" else bench.MODELS[args.model]
    engines = bench.default_engines()
    if args.engines:
        wanted = {name.strip() for name in args.engines.split(",")}
        engines = [e for e in engines if e.name in wanted]
    hf_dir = spec.build(bench.cache_dir() / f"hf-{spec.name}-{spec.key()}")
    dirs = {e.name: bench.cache_dir() / f"onnx-{spec.key()}-{e.precision}-{bench.build_key(e.precision, ())}"
            for e in engines if e.runtime == "genai"}
    bench.build_onnx_models(hf_dir, {dirs[e.name]: (e.precision, ()) for e in engines if e.name in dirs})
    family = bench.this_cpu_family()
    print(f"{spec.name} on {family['name']} ({', '.join(family['isa'])}), one thread per engine", flush=True)
    with tempfile.TemporaryDirectory(prefix="ortune-cpu-decode-") as tmp:
        runners, bytes_per_token = {}, {}
        for engine in engines:
            if engine.runtime == "genai":
                runner = bench.GenaiRunner(one_thread_copy(dirs[engine.name], Path(tmp)))
            else:
                runner = bench.TorchRunner(hf_dir, engine.precision)
            kv = bench.kv_bytes_per_token(**runner.kv, prompt_tokens=runner.prompt_tokens(bench.PROMPT),
                                          new_tokens=args.long)
            runners[engine.name], bytes_per_token[engine.name] = runner, runner.weights["per_token"] + kv
        core = [one_core_copy_bandwidth()]
        steps: dict[str, list[float]] = {name: [] for name in runners}
        for round_index in range(args.repeats + 1):  # round 0: warm-up
            for name, runner in runners.items():
                long, short = cpu_seconds(runner, args.long), cpu_seconds(runner, args.short)
                if round_index:
                    steps[name].append(1000 * (long - short) / (args.long - args.short))
            core.append(one_core_copy_bandwidth())
            print(f"  round {round_index}: " + ", ".join(f"{n} {s[-1]:.2f}" for n, s in steps.items() if s)
                  + " CPU ms/token", flush=True)
    bandwidth = statistics.median(core)
    reference = statistics.median(steps["torch fp32"]) if "torch fp32" in steps else None
    rows = []
    for name, values in steps.items():
        ms = statistics.median(values)
        floor = 1000 * bytes_per_token[name] / bandwidth
        rows.append({"engine": name, "cpu_ms_per_token": ms, "spread": [min(values), max(values)],
                     "speedup_vs_torch_fp32": reference / ms if reference else None,
                     "bytes_per_token": bytes_per_token[name], "one_core_floor_ms": floor,
                     "percent_of_one_core_floor": 100 * floor / ms})
    print(f"\none core copies {bandwidth / 1e9:.1f} GB/s per CPU second (median of {len(core)}: "
          f"{', '.join(f'{b / 1e9:.0f}' for b in core)})\n")
    print("| engine (1 thread) | CPU ms/token | × PyTorch fp32 | MB read/token | one-core floor ms | % of floor |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        speedup = f"{row['speedup_vs_torch_fp32']:.2f}×" if row["speedup_vs_torch_fp32"] else "-"
        print(f"| {row['engine']} | {row['cpu_ms_per_token']:.2f} ({row['spread'][0]:.2f}-{row['spread'][1]:.2f}) | "
              f"{speedup} | {row['bytes_per_token'] / 1e6:.0f} | {row['one_core_floor_ms']:.2f} | "
              f"{row['percent_of_one_core_floor']:.0f} % |")
    if args.out:
        args.out.write_text(json.dumps({"model": spec.name, "cpu_family": family, "one_core_copy_gb_s": bandwidth / 1e9,
                                        "rows": rows, "steps": steps}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
