"""Tiny projects for the export and app tests: a base model, LoRA adapters with non-zero weights
(so an adapter really changes the model), the merged model and a prepared split, in a temp folder."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from ortune import config, data, modeling
from ortune.records import read_records

REPO = Path(__file__).resolve().parents[1]
# 2 * intermediate_size != vocab_size: clear of the builder's LM-head bug (tested on its own)
TINY = OmegaConf.create(
    {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 256,
        "vocab_size": 600,
    }
)
PROMPT = "### Text: {phrase}\n### The tone is:\n"


def make_adapter(base: Path, out: Path, *, r: int, seed: int, save_head: bool) -> None:
    """A LoRA adapter with random A and B (PEFT's default B = 0 would change nothing); with
    save_head, lm_head is a trained-in-full module (modules_to_save) that differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["qkv_proj", "o_proj"],
        init_lora_weights=False,
        modules_to_save=["lm_head"] if save_head else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(modeling.load_causal_lm(base), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(4.0)  # large enough to move the labels, so a wrong adapter shows
            if save_head and "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(out)
    modeling.load_tokenizer(base).save_pretrained(out)


def make_project(root: Path, tiny_texts: list[str], *, seed: int = 3, tiny=TINY, eval_rows: int = 16) -> Path:
    """root/{base_model, adapter, adapter_b, merged, prepared, metrics}: what build_onnx reads."""
    from peft import PeftModel

    modeling.build_tiny_phi3(tiny, tiny_texts, seed=seed, out_dir=root / "base_model")
    make_adapter(root / "base_model", root / "adapter", r=8, seed=seed, save_head=True)
    make_adapter(root / "base_model", root / "adapter_b", r=4, seed=seed + 1, save_head=False)
    merged = PeftModel.from_pretrained(
        modeling.load_causal_lm(root / "base_model"), str(root / "adapter")
    ).merge_and_unload()
    merged.save_pretrained(root / "merged")
    modeling.load_tokenizer(root / "base_model").save_pretrained(root / "merged")
    rows = read_records(REPO / "data/raw/tones.jsonl")
    rendered = [data.render(r, PROMPT, "{tone}", "tone") for r in rows]
    (root / "prepared").mkdir()
    data.write_jsonl(rendered[::5][:40], root / "prepared" / "train.jsonl")
    data.write_jsonl(rendered[2::5][:eval_rows], root / "prepared" / "validation.jsonl")
    # other rows than validation's: build_onnx (parity, auto) must never read them (test_auto_quantization)
    data.write_jsonl(rendered[3::5][:eval_rows], root / "prepared" / "test.jsonl")
    (root / "prepared" / "labels.json").write_text(json.dumps(sorted({r["label"] for r in rendered})))
    (root / "metrics").mkdir()
    (root / "metrics" / "base.json").write_text(json.dumps({"model": "tiny-phi3", "resolved_revision": None}))
    return root


def torch_logits(model_dir, prompt, adapter_dir=None):
    """PyTorch's next-token logits after prompt (base + adapter when given): what an ONNX export must match."""
    import torch
    from peft import PeftModel

    model = modeling.load_causal_lm(model_dir)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    ids = modeling.load_tokenizer(model_dir)(prompt, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**ids).logits[0, -1].numpy()


def stage_cfg(root: Path, *overrides: str, onnx_dir: str = "onnx"):
    """build_onnx's config view (only its declared params), every path in root."""
    names = ("base_model", "prepared", "adapter", "merged", "metrics", "plots")
    paths = [f"paths.{name}={root / name}" for name in names] + [f"paths.onnx={root / onnx_dir}"]
    full = config.validate(config.compose(["model=tiny-phi3", *paths, *overrides], config_dir=REPO / "conf"), "test")
    return config.stage_view(full, config.declared_params("build_onnx", REPO / "dvc.yaml"))
