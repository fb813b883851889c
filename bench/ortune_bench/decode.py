"""Decode timing: each engine (genai or PyTorch) generates the same tokens in turn, round after round;
the median step per engine, against PyTorch fp32 and the bandwidth floor."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from ortune_bench import NEW_TOKENS, PROMPT, cache_dir, machine
from ortune_bench.bytes_read import floor_ms, kv_bytes_per_token, onnx_weight_bytes, torch_weight_bytes
from ortune_bench.machine import CONTENDED_CORES, MAX_TRIES
from ortune_bench.models import Engine, PackagedGguf, build_key, build_onnx_models

REFERENCE = "torch fp32"  # the engine every speed-up is measured against


class GenaiRunner:
    def __init__(self, model_dir: Path):
        from ortune.generation import OnnxGenerator

        self.dir = model_dir
        self.generator = OnnxGenerator(model_dir)
        genai = json.loads((model_dir / "genai_config.json").read_text())
        decoder = genai["model"]["decoder"]
        self.settings = {
            "session_options": {
                k: v for k, v in decoder.get("session_options", {}).items() if k not in ("log_id", "provider_options")
            }
        }
        self.settings.update(_quantization_attributes(model_dir / decoder.get("filename", "model.onnx")))
        self.weights = onnx_weight_bytes(model_dir / decoder.get("filename", "model.onnx"))
        self.kv = dict(
            layers=decoder["num_hidden_layers"],
            kv_heads=decoder["num_key_value_heads"],
            head_size=decoder["head_size"],
            dtype_bytes=4,
        )  # CPU genai models keep an fp32 KV cache

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.generator.encode(prompt))

    def token_times(self, prompt: str, new_tokens: int) -> list[float]:
        return self.generator.token_times(prompt, new_tokens)


class TorchRunner:
    def __init__(self, hf_dir: Path, precision: str):
        import torch
        from transformers import AutoModelForCausalLM

        from ortune.generation import TorchGenerator
        from ortune.modeling import load_tokenizer

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, use_safetensors=True)
        self.generator = TorchGenerator(model, load_tokenizer(hf_dir))
        self.settings = {"dtype": str(dtype), "threads": torch.get_num_threads()}
        self.weights = torch_weight_bytes(model)
        config = model.config
        self.kv = dict(
            layers=config.num_hidden_layers,
            kv_heads=config.num_key_value_heads,
            head_size=config.hidden_size // config.num_attention_heads,
            dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
        )

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.generator.encode(prompt))

    def token_times(self, prompt: str, new_tokens: int) -> list[float]:
        return self.generator.token_times(prompt, new_tokens)


def _quantization_attributes(model_path: Path) -> dict:
    """How the graph is quantized (MatMulNBits block_size, accuracy_level, bits, zero points, fused
    gate/up), and its op counts."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    ops: dict[str, int] = {}
    attributes: dict = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        if node.op_type == "MatMulNBits" and not attributes:
            attributes = {
                a.name: onnx.helper.get_attribute_value(a)
                for a in node.attribute
                if a.name in ("block_size", "accuracy_level", "bits")
            }
            attributes["zero_points"] = len(node.input) > 3 and bool(node.input[3])
    fused = any("gate_up_proj" in node.name for node in graph.node)
    return {"quantization": attributes, "fused_gate_up": fused, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def decode_round_robin(
    runners: dict,
    prompt: str,
    new_tokens: int,
    warmup: int,
    repeats: int,
    log=print,
    retry_budget_s: float = 300.0,
    after_round=None,
) -> dict[str, list[dict]]:
    """Every engine decodes `new_tokens` in turn, round after round: slow drifts of a shared machine hit
    all engines alike. The first `warmup` rounds are dropped. A timed run during which other processes
    took more than CONTENDED_CORES is retried, after waiting for the machine to quiet down, up to
    MAX_TRIES times and while the waits and retries fit in retry_budget_s; the least contended try is
    kept. Each run records the cores others used. `after_round()` is called after every timed round."""
    runs: dict[str, list[dict]] = {name: [] for name in runners}
    deadline = time.perf_counter() + retry_budget_s
    for round_index in range(warmup + repeats):
        last = {}
        for name, runner in runners.items():
            tries = []
            while True:
                before = machine.cpu_snapshot()
                times = runner.token_times(prompt, new_tokens)
                if len(times) != new_tokens:
                    raise RuntimeError(f"{name} produced {len(times)} tokens instead of {new_tokens}")
                tries.append(
                    {**summarize_run(times), "other_cores": machine.other_cores(before, machine.cpu_snapshot())}
                )
                if (
                    tries[-1]["other_cores"] <= CONTENDED_CORES
                    or round_index < warmup
                    or len(tries) >= MAX_TRIES
                    or not machine.wait_for_quiet(deadline)
                ):
                    break
            last[name] = min(tries, key=lambda run: run["other_cores"])
            last[name]["tries"] = len(tries)
            if round_index >= warmup:
                runs[name].append(last[name])
        if after_round and round_index >= warmup:
            after_round()
        log(
            f"  round {round_index + 1}/{warmup + repeats}{' (warm-up)' if round_index < warmup else ''}: "
            + ", ".join(
                f"{name} {run['ms_per_token']:.2f}"
                + (f" ({run['other_cores']:.1f} cores busy elsewhere)" if run["other_cores"] > CONTENDED_CORES else "")
                for name, run in last.items()
            )
            + " ms/token"
        )
    return runs


def summarize_run(times: list[float]) -> dict:
    """One run's per-token clock -> first-token latency and the steady decode step."""
    steps = len(times) - 1
    return {
        "first_token_ms": 1000 * times[0],
        "total_ms": 1000 * times[-1],
        "ms_per_token": 1000 * (times[-1] - times[0]) / steps,
    }


def decode_table(runs: dict[str, list[dict]], info: dict[str, dict], bandwidth: float) -> list[dict]:
    """Median over repeats per engine, with its floor and the ratio to PyTorch fp32."""
    rows = []
    for name, engine_runs in runs.items():
        ms = statistics.median(r["ms_per_token"] for r in engine_runs)
        bytes_per_token = info[name]["bytes_per_token"]
        floor = floor_ms(bytes_per_token, bandwidth)
        rows.append(
            {
                "engine": name,
                "tokens_per_s": 1000 / ms,
                "ms_per_token": ms,
                "ms_per_token_min": min(r["ms_per_token"] for r in engine_runs),
                "first_token_ms": statistics.median(r["first_token_ms"] for r in engine_runs),
                "contended_runs": sum(r.get("other_cores", 0.0) > CONTENDED_CORES for r in engine_runs),
                "bytes_per_token": bytes_per_token,
                "floor_ms_per_token": floor,
                "percent_of_floor": 100 * floor / ms,
                **{k: v for k, v in info[name].items() if k != "bytes_per_token"},
            }
        )
    reference = next((r["ms_per_token"] for r in rows if r["engine"] == REFERENCE), None)
    for row in rows:
        row["speedup_vs_torch_fp32"] = reference / row["ms_per_token"] if reference else None
    return rows


# The config fields each result records of the model it decoded.
SHAPE_KEYS = (
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "tie_word_embeddings",
)


def model_shape(hf_dir: Path) -> dict:
    """The model's shape as its config.json states it (SHAPE_KEYS)."""
    hf_config = json.loads((hf_dir / "config.json").read_text())
    return {k: hf_config.get(k) for k in SHAPE_KEYS}


def run_decode(
    spec,
    engines: list[Engine],
    warmup: int,
    repeats: int,
    new_tokens: int = NEW_TOKENS,
    log=print,
    retry_budget_s: float = 600.0,
    bandwidth_samples: int = 3,
) -> dict:
    """Build (or load from the cache) `spec`'s model and its engines, and time them side by side."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    hf_dir = spec.build(cache_dir() / f"hf-{spec.name}-{spec.key()}")
    onnx_dirs = {
        e.name: cache_dir() / f"onnx-{spec.key()}-{e.precision}-{build_key(e.precision, e.overrides, spec.conf_model)}"
        for e in engines
        if e.runtime == "genai"
    }
    builds = {onnx_dirs[e.name]: (e.precision, e.overrides) for e in engines if e.name in onnx_dirs}
    build_onnx_models(hf_dir, builds, log, spec.conf_model)
    seconds["build_models"] = time.perf_counter() - started
    runners: dict = {}
    info: dict[str, dict] = {}
    for engine in engines:
        if engine.runtime == "genai":
            runner = GenaiRunner(onnx_dirs[engine.name])
        else:
            runner = TorchRunner(hf_dir, engine.precision)
        prompt_tokens = runner.prompt_tokens(PROMPT)
        kv = kv_bytes_per_token(**runner.kv, prompt_tokens=prompt_tokens, new_tokens=new_tokens)
        info[engine.name] = {
            "weight_bytes": runner.weights,
            "kv_bytes_per_token": kv,
            "bytes_per_token": runner.weights["per_token"] + kv,
            "settings": runner.settings,
        }
        runners[engine.name] = runner
        log(f"  {spec.name} {engine.name}: {runner.weights['per_token'] / 1e6:.0f} MB of weights read per token")
    seconds["load_models"] = time.perf_counter() - started - seconds["build_models"]
    prompt_tokens = next(iter(runners.values())).prompt_tokens(PROMPT)
    wait_s = min(30.0, retry_budget_s / 10)
    samples = [machine.quiet_copy_bandwidth(wait_s) for _ in range(bandwidth_samples)]
    decode_started = time.perf_counter()
    runs = decode_round_robin(
        runners,
        PROMPT,
        new_tokens,
        warmup,
        repeats,
        log,
        retry_budget_s,
        after_round=lambda: samples.append(machine.quiet_copy_bandwidth(wait_s)),
    )
    seconds["decode"] = time.perf_counter() - decode_started
    samples += [machine.quiet_copy_bandwidth(wait_s) for _ in range(bandwidth_samples)]
    bandwidth = statistics.median(b for b, _ in samples)
    model = {
        "name": spec.name,
        **dataclasses.asdict(spec),
        **model_shape(hf_dir),
        "prompt_tokens": prompt_tokens,
        "parameters": sum(p.numel() for p in runners[REFERENCE].generator.model.parameters())
        if REFERENCE in runners
        else None,
    }
    if isinstance(spec, PackagedGguf):
        from importlib import metadata

        model["package_version"] = metadata.version(spec.package)
    return {
        "model": model,
        "new_tokens": new_tokens,
        "warmup_rounds": warmup,
        "repeats": repeats,
        "copy_bandwidth_gb_s": {
            "used": bandwidth / 1e9,
            "samples": [b / 1e9 for b, _ in samples],
            "others_cores": [busy for _, busy in samples],
        },
        "engines": decode_table(runs, info, bandwidth),
        "runs": runs,
        "seconds": seconds,
    }
