"""Stage 4: the merged model -> an ONNX model for onnxruntime-genai, at `precision`.

Reads: models/merged/, `precision` (int4 default), `onnx.*` (execution provider, int4 block
size and accuracy level, threads). Writes: models/onnx/ (model.onnx, weights, genai_config.json
with intra-op threads set to the machine's cores, tokenizer), metrics/onnx.json.
An invalid precision/provider pair fails before any work. The result is loaded and must generate.

    python scripts/build_onnx.py precision=fp32
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from ortune import data, export, stage
from ortune.artifacts import atomic_dir

log = logging.getLogger("ortune")


def run(cfg: DictConfig) -> dict:
    provider = cfg.onnx.execution_provider
    export.check_precision_provider(cfg.precision, provider)
    final = Path(cfg.paths.onnx)
    started = time.perf_counter()
    with atomic_dir(final) as out:
        export.run_builder(
            Path(cfg.paths.merged), out, cfg.precision, provider, export.builder_options(cfg),
            log_file=final.parent / f"{final.name}.build.log",
        )
        threads = export.tune_genai_config(out, cfg.onnx.intra_op_num_threads)
        smoke = _smoke_test(out, cfg) if provider == "cpu" else None
    metrics = {
        "precision": cfg.precision,
        "execution_provider": provider,
        "intra_op_num_threads": threads,
        "build_seconds": time.perf_counter() - started,
        "size_mb": export.folder_megabytes(final),
    }
    if smoke is not None:
        metrics["smoke_new_tokens"] = smoke
    return metrics


def _smoke_test(out: Path, cfg: DictConfig) -> int:
    """Load the fresh model and generate from one eval prompt: a build that cannot decode never ships."""
    from ortune.generation import OnnxGenerator

    prompt = data.read_jsonl(Path(cfg.paths.prepared) / "eval.jsonl")[0]["prompt"]
    result = OnnxGenerator(out).generate(prompt, max_new_tokens=4)
    log.info("smoke test: %r -> %r", prompt[-40:], result.text)
    return result.new_tokens


if __name__ == "__main__":
    stage.main("build_onnx", run, "onnx.json")
