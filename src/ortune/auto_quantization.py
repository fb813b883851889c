"""onnx.quantization=auto: build onnx.candidates in order (fastest first) and ship the first whose parity
with PyTorch meets the target, each candidate built by ortune.onnx_build."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from ortune import data
from ortune.artifacts import folder_megabytes
from ortune.onnx_build import build_checked

log = logging.getLogger("ortune")


# Decode speed of each auto candidate: a short, comparable measurement on the first validation prompt (eval
# measures the shipped model properly, with its eval.latency settings).
CANDIDATE_TIMING = dict(new_tokens=16, warmup=1, repeats=3)


def select_candidate(cfg: DictConfig, out: Path, scratch: Path, logs: Path) -> tuple[dict, dict, dict, DictConfig]:
    """onnx.quantization=auto: build onnx.candidates in order (fastest first) and ship the first that meets
    parity. Every candidate built is reported in metrics["candidates"], the shipped one by its index."""
    from ortune.evaluation import measure_latency
    from ortune.generation import OnnxGenerator

    tried = []
    for index, entry in enumerate(cfg.onnx.candidates):
        candidate = candidate_config(cfg, dict(entry))
        folder, own_scratch = scratch / f"candidate-{index}", scratch / f"candidate-{index}-scratch"
        folder.mkdir()
        own_scratch.mkdir()
        log.info("auto candidate %d: precision=%s %s", index, candidate.precision, dict(entry) or "(onnx.* as set)")
        metrics, options, task = build_checked(candidate, folder, own_scratch, Path(f"{logs}-candidate{index}"))
        prompt = data.prompt_text(
            data.read_jsonl(Path(cfg.paths.prepared) / "validation.jsonl")[0]["prompt"], cfg.paths.merged
        )
        speed = measure_latency(
            OnnxGenerator(folder, cpu=cfg.onnx.execution_provider != "cpu"), prompt, **CANDIDATE_TIMING
        )
        result = metrics.get("parity") or {}
        tried.append(
            {
                "candidate": index,
                "settings": dict(entry),
                "precision": candidate.precision,
                "label_agreement": result.get("label_agreement"),
                "passed": result.get("passed"),
                "ms_per_token": speed["ms_per_token"],
                "size_mb": folder_megabytes(folder),
                "int8_nodes": len(metrics.get("int8_nodes", [])),
            }
        )
        log.info(
            "auto candidate %d: label agreement %s, %.2f ms/token, %.0f MB: %s",
            index,
            result.get("label_agreement"),
            speed["ms_per_token"],
            tried[-1]["size_mb"],
            "ships" if result.get("passed") else "not enough",
        )
        last = index == len(cfg.onnx.candidates) - 1
        if result.get("passed") or last:
            for item in folder.iterdir():
                shutil.move(str(item), out / item.name)
            metrics.update(candidates=tried, shipped_candidate=index)
            return metrics, options, task, candidate
        shutil.rmtree(folder, ignore_errors=True)
    raise AssertionError("unreachable: the config requires at least one candidate")


def candidate_config(cfg: DictConfig, entry: dict) -> DictConfig:
    """The stage config with one candidate's precision and onnx.* settings in place."""
    from omegaconf import OmegaConf

    from ortune.settings.onnx import onnx_candidate

    precision, onnx_settings = onnx_candidate(cfg.precision, cfg.onnx, entry)
    view = OmegaConf.to_container(cfg)
    view.update(precision=precision, onnx=OmegaConf.to_container(onnx_settings))
    candidate = OmegaConf.create(view)
    OmegaConf.set_struct(candidate, True)
    OmegaConf.set_readonly(candidate, True)
    return candidate
