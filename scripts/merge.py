"""Stage 3: merge the LoRA adapter into the full-precision base (also after QLoRA).

An adapter trained with train.method=qat (models/adapter/quantization_aware.json) is merged as it was
trained: every linear weight of the merged model is written on that int4 grid, which the builder's
quantizer then reproduces exactly.

Reads: models/base/, models/adapter/, data/prepared/validation.jsonl (a few prompts for the check).
Writes: models/merged/ (safetensors + tokenizer), metrics/merge.json (max |logit difference|
between the merged model and base+adapter on those prompts).

    python scripts/merge.py model.trust_remote_code=false
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from ortune import data, modeling, quantize, stage
from ortune.artifacts import atomic_dir
from ortune.errors import OrtuneError

log = logging.getLogger("ortune")
CHECK_PROMPTS = 8


def run(cfg: DictConfig) -> dict:
    import torch
    from peft import PeftModel

    trust = cfg.model.trust_remote_code
    tokenizer = modeling.load_tokenizer(cfg.paths.adapter, trust)
    # QLoRA trains against a 4-bit base, but the merge goes into full precision so nothing is lost twice.
    base = modeling.load_causal_lm(cfg.paths.base_model, trust)
    try:
        model = PeftModel.from_pretrained(base, cfg.paths.adapter)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # torch lists every mismatching tensor: the first one says enough (which weight, both shapes)
        shapes = next((line for line in lines if "size mismatch" in line), lines[0] if lines else "")
        raise OrtuneError(
            f"{cfg.paths.adapter}: adapter does not fit {cfg.paths.base_model} ({shapes[:300]}); "
            "it was trained on another base: retrain it on this one (dvc repro train_qlora)"
        ) from None
    model.eval()
    grid = quantize.read_grid(cfg.paths.adapter)
    if grid:
        quantize.make_quantization_aware(model, grid["block_size"])
    rows = data.read_jsonl(Path(cfg.paths.prepared) / "validation.jsonl")[:CHECK_PROMPTS]
    prompts = [data.prompt_text(r["prompt"], cfg.paths.adapter) for r in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        adapter_logits = model(**batch).logits
        merged = model.merge_and_unload()
        if grid:
            quantize.round_merged(merged, grid["block_size"])
        merged_logits = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    max_diff = (adapter_logits - merged_logits).abs()[mask].max().item()
    with atomic_dir(cfg.paths.merged) as out:
        merged.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if grid:
            (out / quantize.GRID_FILE).write_text(json.dumps(grid, indent=2) + "\n", encoding="utf-8")
    log.info(
        "merged%s; max |logit diff| vs adapter model = %.2e",
        f" on the int4 grid (block {grid['block_size']})" if grid else "",
        max_diff,
    )
    return {"max_abs_logit_diff": max_diff, "check_prompts": len(prompts), "quantization_aware": grid}


if __name__ == "__main__":
    stage.main("merge", run, "merge.json")
