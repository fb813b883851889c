"""One int4 MatMulNBits node, timed against its memory-bandwidth floor: is onnxruntime's kernel the limit
of int4 decode on this CPU family?

A decode step multiplies one activation row [1, K] by each weight matrix [K, N]; at batch 1 every
weight byte is read once, so the kernel's floor is (its weight bytes) / (copy bandwidth), exactly as
in `make bench`. This times that product alone, outside the model and genai: a graph of C copies of
one MatMulNBits node (distinct weights, same input; C chosen so the weights total >= 4x the L3 cache,
so they stream from DRAM as in decode), in one onnxruntime session per setting, settings interleaved
round-robin. Beside each shape: the same product as a plain fp32 MatMul (MLAS SGEMV, memory-bound:
the practical floor) and a 64x64 MatMulNBits (the fixed cost of one node, which 30 narrow layers pay
~200 times a token).

    python bench/matmulnbits.py                        # bench model + SmolLM2 shapes, block 32/128/256,
                                                       # accuracy_level 0/1/4, 1 and 2 threads
    python bench/matmulnbits.py --shapes 1024x32064 --blocks 256 --levels 4 --threads 2 --repeats 30
    python bench/matmulnbits.py --weights-mb 130 ...   # the products' weights as large as the model's
    taskset -c 1 python bench/matmulnbits.py --cache   # one core's bandwidth by buffer size: the cache it gets

Prints a table and writes bench/.cache/matmulnbits-<cpu family>.json. Weights are random (the
timing does not depend on the values); session options are ortune's (spin_duration_us 20).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ortune.artifacts import write_json_atomic
from ortune_bench import cache_dir
from ortune_bench.machine import cpu_snapshot, l3_cache, other_cores, quiet_copy_bandwidth, this_cpu_family

# K x N of the bench model's MatMuls (hidden 1024, intermediate 2816, gate/up fused, vocab 32064) and of
# SmolLM2-135M's (hidden 576, 9+3+3 heads of 64: qkv N=960, intermediate 1536, vocab 49152, tied).
SHAPES = {
    "1024x32064": "bench lm_head",
    "1024x5632": "bench gate_up (fused)",
    "2816x1024": "bench down",
    "576x49152": "smollm2 lm_head (tied)",
    "576x3072": "smollm2 gate_up (fused)",
    "576x960": "smollm2 qkv",
    "1536x576": "smollm2 down",
}
TINY = (64, 64)  # fixed cost of one node


def int4_bytes(k: int, n: int, block: int) -> int:
    """Weight bytes one product reads: packed int4 (K rounded up to whole blocks) + one fp32 scale per block."""
    blocks = math.ceil(k / block)
    return n * blocks * block // 2 + n * blocks * 4


def nbits_graph(k: int, n: int, block: int, level: int, copies: int, seed: int = 0):
    """C MatMulNBits nodes on one input [1, K]: symmetric int4 (no zero points), as ortune ships."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    blocks = math.ceil(k / block)
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8), f"B{c}"))
        inits.append(numpy_helper.from_array((rng.random(n * blocks, dtype=np.float32) + 0.5) * 0.01, f"S{c}"))
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["A", f"B{c}", f"S{c}"],
                [f"Y{c}"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
                accuracy_level=level,
            )
        )
        outputs.append(helper.make_tensor_value_info(f"Y{c}", TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(
        nodes, "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])], outputs, initializer=inits
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


def fp32_graph(k: int, n: int, copies: int, seed: int = 0):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.random((k, n), dtype=np.float32), f"W{c}") for c in range(copies)]
    nodes = [helper.make_node("MatMul", ["A", f"W{c}"], [f"Y{c}"]) for c in range(copies)]
    outputs = [helper.make_tensor_value_info(f"Y{c}", TensorProto.FLOAT, [1, n]) for c in range(copies)]
    graph = helper.make_graph(
        nodes, "fp32", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])], outputs, initializer=inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def copies_for(weight_bytes: int, l3_bytes: int, total_bytes: int | None = None) -> int:
    """Enough copies that the weights total at least 4x the L3 cache (they come from DRAM each run), or
    `total_bytes` when given (e.g. a model's int4 weights, to time them as resident as the model's are)."""
    return max(1, math.ceil((total_bytes or 4 * l3_bytes) / weight_bytes))


def session(model, threads: int, scratch: Path, name: str):
    import onnx
    import onnxruntime as ort

    from ortune.export import SPIN_KEY, SPIN_US

    path = scratch / f"{name}.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location=f"{name}.data")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry(SPIN_KEY, SPIN_US)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def l3_bytes() -> int:
    text = l3_cache() or "32768K"
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * scale


def time_round_robin(runs: dict, repeats: int, warmup: int = 3) -> dict[str, dict]:
    """Every setting runs in turn, round after round; per setting: the median seconds of one run (wall
    clock, and CPU time of this thread: with 1 intra-op thread onnxruntime computes on the calling
    thread, so that one excludes the time a busy machine kept it descheduled) and the cores other
    processes used meanwhile."""
    import numpy as np

    feeds = {name: {"A": np.random.default_rng(1).random((1, k), dtype=np.float32)} for name, (_, k, _) in runs.items()}
    seconds: dict[str, list] = {name: [] for name in runs}
    cpu: dict[str, list] = {name: [] for name in runs}
    busy: dict[str, list] = {name: [] for name in runs}
    for round_index in range(warmup + repeats):
        for name, (sess, _, _) in runs.items():
            before = cpu_snapshot()
            started, cpu_started = time.perf_counter(), time.thread_time()
            sess.run(None, feeds[name])
            elapsed, cpu_elapsed = time.perf_counter() - started, time.thread_time() - cpu_started
            if round_index >= warmup:
                seconds[name].append(elapsed)
                cpu[name].append(cpu_elapsed)
                busy[name].append(other_cores(before, cpu_snapshot()))
    return {
        name: {
            "seconds": statistics.median(seconds[name]),
            "seconds_min": min(seconds[name]),
            "cpu_seconds": statistics.median(cpu[name]),
            "other_cores": statistics.median(busy[name]),
        }
        for name in runs
    }


def one_core_copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Copy bandwidth of one core (bytes read + written per CPU second of the copying thread): the
    ceiling of a 1-thread kernel, robust to descheduling (not to others' memory traffic)."""
    import numpy as np

    source = np.ones(megabytes * 2**20, dtype=np.uint8)
    target = np.zeros_like(source)
    seconds = []
    for _ in range(repeats):
        started = time.thread_time()
        np.copyto(target, source)
        seconds.append(time.thread_time() - started)
    return 2 * source.nbytes / statistics.median(seconds)


def bandwidth_by_size(sizes_mb=(1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048)) -> list[dict]:
    """One core's copy (read + written) and read-only bandwidth per CPU second by buffer size: where the
    cache this machine really gets ends (a VM may report its host's whole L3), so which floor applies."""
    import numpy as np

    rows = []
    for mb in sizes_mb:
        source = np.ones(mb * 2**20, dtype=np.uint8)
        target = np.zeros_like(source)
        words = source.view(np.uint64)
        np.copyto(target, source)
        repeats = max(5, min(200, 4096 // mb))
        copy, read = [], []
        for _ in range(repeats):
            started = time.thread_time()
            np.copyto(target, source)
            copy.append(time.thread_time() - started)
            started = time.thread_time()
            words.sum()
            read.append(time.thread_time() - started)
        rows.append(
            {
                "mb": mb,
                "copy_gb_s": 2 * source.nbytes / statistics.median(copy) / 1e9,
                "read_gb_s": source.nbytes / statistics.median(read) / 1e9,
            }
        )
        del source, target, words
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help="KxN,... (default: the bench and SmolLM2 shapes)")
    parser.add_argument("--blocks", default="32,128,256")
    parser.add_argument("--levels", default="0,1,4", help="accuracy_level values (4: int8 activations)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 MatMul reference")
    parser.add_argument(
        "--weights-mb",
        type=float,
        default=None,
        help="weights per setting, MB (default: 4x the L3 cache, so they stream from DRAM; a large "
        "L3 needs much memory: 4 x 480 MiB per setting)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--cache",
        action="store_true",
        help="only print one core's copy and read bandwidth by buffer size (does the model fit the cache?)",
    )
    args = parser.parse_args(argv)
    if args.cache:
        print("| MB | copy GB/s (read + written, per CPU second) | read GB/s |\n|---:|---:|---:|")
        for row in bandwidth_by_size():
            print(f"| {row['mb']} | {row['copy_gb_s']:.1f} | {row['read_gb_s']:.1f} |", flush=True)
        return 0
    total = int(args.weights_mb * 1e6) if args.weights_mb else None
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    blocks = [int(v) for v in args.blocks.split(",")]
    levels = [int(v) for v in args.levels.split(",")]
    threads_list = [int(v) for v in args.threads.split(",")]
    family = this_cpu_family()
    import onnxruntime

    print(
        f"CPU family: {family['name']} ({family['model_name']}; {', '.join(family['isa'])}), "
        f"{os.cpu_count()} cores, L3 {l3_cache()}; onnxruntime {onnxruntime.__version__}",
        flush=True,
    )
    l3 = l3_bytes()
    rows = []
    bandwidths, one_core = [], []
    with tempfile.TemporaryDirectory(prefix="ortune-matmulnbits-") as tmp:
        scratch = Path(tmp)
        for k, n in shapes:
            bandwidths.append(quiet_copy_bandwidth(wait_s=10.0))
            one_core.append(one_core_copy_bandwidth())
            for threads in threads_list:
                runs: dict = {}
                for block in blocks:
                    copies = copies_for(int4_bytes(k, n, block), l3, total)
                    for level in levels:
                        name = f"int4 b{block} acc{level}"
                        runs[name] = (
                            session(
                                nbits_graph(k, n, block, level, copies),
                                threads,
                                scratch,
                                f"{k}x{n}-{block}-{level}-{threads}",
                            ),
                            k,
                            copies,
                        )
                if not args.no_fp32:
                    # --weights-mb: as many products as int4 at the largest block (the fp32 model of the same weights)
                    copies = (
                        copies_for(int4_bytes(k, n, max(blocks)), l3, total) if total else copies_for(k * n * 4, l3)
                    )
                    runs["fp32 MatMul"] = (
                        session(fp32_graph(k, n, copies), threads, scratch, f"{k}x{n}-fp32-{threads}"),
                        k,
                        copies,
                    )
                runs["int4 64x64 (fixed cost)"] = (
                    session(nbits_graph(*TINY, 32, 4, 16), threads, scratch, f"tiny-{threads}"),
                    TINY[0],
                    16,
                )
                timed = time_round_robin(runs, args.repeats)
                for name, (_, _, copies) in runs.items():
                    per_node = timed[name]["seconds"] / copies
                    if name.startswith("fp32"):
                        weight = k * n * 4
                    elif name.startswith("int4 64x64"):
                        weight = int4_bytes(*TINY, 32)
                    else:
                        weight = int4_bytes(k, n, int(name.split()[1][1:]))
                    rows.append(
                        {
                            "shape": f"{k}x{n}",
                            "what": SHAPES.get(f"{k}x{n}", ""),
                            "setting": name,
                            "threads": threads,
                            "copies": copies,
                            "weight_bytes": weight,
                            "us_per_node": 1e6 * per_node,
                            "us_per_node_min": 1e6 * timed[name]["seconds_min"] / copies,
                            "cpu_us_per_node": 1e6 * timed[name]["cpu_seconds"] / copies if threads == 1 else None,
                            "gb_s": weight / per_node / 1e9,
                            "other_cores": timed[name]["other_cores"],
                        }
                    )
                del runs
            bandwidths.append(quiet_copy_bandwidth(wait_s=10.0))
    bandwidth = statistics.median(b for b, _ in bandwidths)
    core = statistics.median(one_core)
    for row in rows:
        row["floor_us"] = 1e6 * row["weight_bytes"] / bandwidth
        row["percent_of_floor"] = 100 * row["floor_us"] / row["us_per_node"]
        if row["cpu_us_per_node"]:
            # 1 thread, CPU time: against what one core copies per CPU second
            row["one_core_floor_us"] = 1e6 * row["weight_bytes"] / core
            row["percent_of_one_core_floor"] = 100 * row["one_core_floor_us"] / row["cpu_us_per_node"]
    print(
        f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s (all cores, wall clock; median of {len(bandwidths)}: "
        f"{', '.join(f'{b / 1e9:.0f}' for b, _ in bandwidths)}; others' cores during those: "
        f"{', '.join(f'{c:.1f}' for _, c in bandwidths)}); one core, per CPU second: {core / 1e9:.1f} GB/s "
        f"({', '.join(f'{b / 1e9:.0f}' for b in one_core)})\n"
    )
    print(
        "| K x N | what | setting | threads | µs/node | CPU µs/node | weight MB | GB/s | % of floor "
        "| % of one core's floor (CPU time) | others' cores |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cpu = f"{row['cpu_us_per_node']:.1f}" if row["cpu_us_per_node"] else "-"
        core_floor = f"{row['percent_of_one_core_floor']:.0f} %" if row["cpu_us_per_node"] else "-"
        print(
            f"| {row['shape']} | {row['what']} | {row['setting']} | {row['threads']} | {row['us_per_node']:.1f} | "
            f"{cpu} | {row['weight_bytes'] / 1e6:.2f} | {row['gb_s']:.1f} | {row['percent_of_floor']:.0f} % | "
            f"{core_floor} | {row['other_cores']:.1f} |"
        )
    out = args.out or cache_dir() / f"matmulnbits-{family['name'].replace(' ', '-')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out,
        {
            "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "cpu_family": family,
            "onnxruntime": onnxruntime.__version__,
            "copy_bandwidth_gb_s": bandwidth / 1e9,
            "one_core_copy_gb_s": core / 1e9,
            "bandwidth_samples": [[b / 1e9, c] for b, c in bandwidths],
            "rows": rows,
        },
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
