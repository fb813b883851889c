"""Stage 4: the fine-tuned model -> an ONNX model for onnxruntime-genai, at `precision`.

Reads: models/merged/ (or, with onnx.adapter=separate, models/base/ + models/adapter/ and any
onnx.extra_adapters), data/prepared/, `precision`, `onnx.*`, `data.*` (prompt format, dataset hash),
`model.*` (provenance). Writes: models/onnx/ (model.onnx + weights, genai_config.json with threads
and greedy search, tokenizer, ortune.json for the apps, adapters/*.onnx_adapter, README.md model
card), metrics/onnx.json (settings, size, parity with PyTorch).

Invalid settings (precision/provider pair, unknown or deprecated builder option) fail before any
stage runs. After the build: the graph is checked structurally (every provider), then its last-token
logits and greedy labels are compared with the PyTorch model on the validation prompts (ortune.parity;
the test split is never read here: auto quantization chooses on validation);
a missed target fails the stage unless onnx.require_parity=false. The builds, mixed precision, parity and
the model card are ortune.onnx_build; onnx.quantization=auto's choice among candidates, ortune.auto_quantization.

    python scripts/build_onnx.py precision=fp32
    python scripts/build_onnx.py precision=int4 onnx.execution_provider=cuda onnx.block_size=128
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from omegaconf import DictConfig

from ortune import export, parity, stage
from ortune.artifacts import atomic_dir, folder_megabytes, owned_temp_dir
from ortune.auto_quantization import select_candidate
from ortune.errors import OrtuneError
from ortune.onnx_build import build_checked, card


def run(cfg: DictConfig) -> dict:
    o, final = cfg.onnx, Path(cfg.paths.onnx)
    started = time.perf_counter()
    logs = final.parent / f"{final.name}.build"
    with atomic_dir(final) as out:
        # other adapters' builds; owner-named, so a later run's leftover cleanup removes it only once this run is gone
        scratch = owned_temp_dir(final, "scratch-")
        try:
            if o.quantization == "auto":
                metrics, options, task, shipped_cfg = select_candidate(cfg, out, scratch, logs)
            else:
                metrics, options, task = build_checked(cfg, out, scratch, logs)
                shipped_cfg = cfg
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        metrics.update(build_seconds=time.perf_counter() - started, size_mb=folder_megabytes(out))
        # where the megabytes are (a tied 262k-word embedding, an untied float one: issue 23)
        metrics["size_by_part"] = export.size_by_part(out)
        (out / "README.md").write_text(card(shipped_cfg, metrics, task, options), encoding="utf-8")
        failures = parity.summarize_failures(
            {"model": metrics.get("parity") or {}, **metrics.get("adapter_parity", {})}
        )
        if failures and o.require_parity:
            advice = parity.advice(shipped_cfg.precision, f"{logs}*.log")
            tried = "".join(
                f"; candidate {c['candidate']} ({c['precision']}) kept {c['label_agreement']:.3f}"
                for c in metrics.get("candidates", [])[:-1]
            )
            raise OrtuneError(
                "parity with PyTorch: " + "; ".join(failures) + f"{tried}; {advice}; or set "
                "onnx.require_parity=false to ship it anyway"
            )
    return metrics


if __name__ == "__main__":
    # importing ortune.export registered its builder checks: the settings are refused before any work
    stage.main("build_onnx", run, "onnx.json")
