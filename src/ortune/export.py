"""ONNX export with onnxruntime-genai's model builder, and tuning of its genai_config.json."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from ortune.errors import OrtuneError

log = logging.getLogger("ortune")

# What the builder can emit for each precision (measured with onnxruntime-genai 0.18).
VALID_PROVIDERS = {
    "fp32": ("cpu", "cuda"),
    "fp16": ("cuda", "dml"),
    "bf16": ("cuda",),
    "int8": ("cpu", "cuda", "webgpu"),
    "int4": ("cpu", "cuda", "dml", "webgpu"),
}


def check_precision_provider(precision: str, provider: str) -> None:
    if provider not in VALID_PROVIDERS.get(precision, ()):
        pairs = "; ".join(f"{p}: {', '.join(eps)}" for p, eps in VALID_PROVIDERS.items())
        raise OrtuneError(
            f"precision={precision} with onnx.execution_provider={provider} is not a valid pair; valid pairs: {pairs}"
        )


def builder_options(cfg: DictConfig) -> dict[str, str]:
    """Extra options for the builder; only quantization settings apply, and only to int4."""
    if cfg.precision != "int4":
        return {}
    return {"block_size": str(cfg.onnx.block_size), "accuracy_level": str(cfg.onnx.accuracy_level)}


def run_builder(model_dir: Path, out_dir: Path, precision: str, provider: str, options: dict[str, str], log_file: Path) -> None:
    cache = out_dir.parent / f".{out_dir.name}.cache"
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(model_dir), "-o", str(out_dir), "-p", precision, "-e", provider, "-c", str(cache),
    ]
    if options:
        command += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    log.info("building %s/%s ONNX model (builder log: %s)", precision, provider, log_file)
    with open(log_file, "w", encoding="utf-8") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = Path(log_file).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise OrtuneError(f"onnxruntime-genai builder failed ({' '.join(tail)[:300]}); full log: {log_file}")


def tune_genai_config(out_dir: Path, threads: int) -> int:
    """Decode on every core (genai uses one by default) and search greedily, as classification wants."""
    path = out_dir / "genai_config.json"
    genai = json.loads(path.read_text(encoding="utf-8"))
    threads = threads or os.cpu_count() or 1
    session = genai["model"]["decoder"].setdefault("session_options", {})
    session["intra_op_num_threads"] = threads
    genai["search"].update({"do_sample": False, "num_beams": 1, "top_k": 1})
    genai["search"]["max_length"] = min(genai["model"]["context_length"], genai["search"]["max_length"])
    path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    return threads


def folder_megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20
