"""A base whose lm_head is its embedding matrix (tie_word_embeddings, as SmolLM2): LoRA merges and
exports with the tie kept, and adapters that save lm_head/embed_tokens in full switch correctly in an
onnx.adapter=separate build (the builder would otherwise share one matrix for both)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import build_onnx
import merge
from export_helpers import PROMPT, REPO, stage_cfg, torch_logits
from ortune import config, data, modeling
from ortune.generation import OnnxGenerator
from ortune.records import read_records


def tied_llama(out, texts, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = modeling.train_tiny_tokenizer(texts, 600)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def adapter(base, out, seed, modules_to_save=None):
    """Random non-zero LoRA on the attention projections; saved modules nudged away from the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(
        modeling.load_causal_lm(base),
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
            modules_to_save=modules_to_save,
            task_type="CAUSAL_LM",
        ),
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(out)
    modeling.load_tokenizer(base).save_pretrained(out)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_texts):
    root = tmp_path_factory.mktemp("tied")
    tied_llama(root / "base_model", tiny_texts)
    adapter(root / "base_model", root / "adapter", seed=1)
    adapter(root / "base_model", root / "adapter_saved", seed=2, modules_to_save=["lm_head", "embed_tokens"])
    rows = [data.render(r, PROMPT, "{tone}", "tone") for r in read_records(REPO / "data/raw/tones.jsonl")]
    (root / "prepared").mkdir()
    data.write_jsonl(rows[::5][:40], root / "prepared" / "train.jsonl")
    data.write_jsonl(rows[2::5][:8], root / "prepared" / "validation.jsonl")
    data.write_jsonl(rows[3::5][:8], root / "prepared" / "test.jsonl")
    (root / "prepared" / "labels.json").write_text(json.dumps(sorted({r["label"] for r in rows})))
    (root / "metrics").mkdir()
    (root / "metrics" / "base.json").write_text(json.dumps({"model": "tied-llama", "resolved_revision": None}))
    return root


pytestmark = pytest.mark.usefixtures("in_repo")  # conftest: from the repository root


@pytest.mark.slow
def test_lora_merge_keeps_the_tie_and_the_merged_export_matches(project):
    from safetensors import safe_open

    paths = [f"paths.{n}={project / n}" for n in ("base_model", "prepared", "adapter", "merged", "metrics", "plots")]
    full = config.validate(config.compose(paths, config_dir=REPO / "conf"), "test")
    metrics = merge.run(config.stage_view(full, config.declared_params("merge", REPO / "dvc.yaml")))
    assert metrics["max_abs_logit_diff"] < 1e-4
    assert json.loads((project / "merged" / "config.json").read_text())["tie_word_embeddings"] is True
    with safe_open(str(project / "merged" / "model.safetensors"), "np") as weights:
        assert "lm_head.weight" not in weights.keys()  # still one matrix
    built = build_onnx.run(stage_cfg(project, "precision=fp32", onnx_dir="onnx-merged"))
    assert built["parity"]["passed"] and built["parity"]["max_abs_logit_diff"] <= 1e-4


@pytest.mark.slow
def test_an_int8_build_looks_its_embeddings_up_in_the_heads_int8_weights(project):
    """The builder's int8 build keeps a tied model's embedding as a float32 copy beside the head's int8 matrix;
    build_onnx drops the copy and reads the head's weights (one matrix, as in the int4 build)."""
    from ortune import export

    built = build_onnx.run(
        stage_cfg(
            project,
            "precision=int8",
            "onnx.parity_prompts=8",
            f"paths.merged={project / 'base_model'}",
            onnx_dir="onnx-int8",
        )
    )
    assert built["int8_embedding"] == "shared_with_head" and built["parity"]["passed"], built
    parts = export.size_by_part(project / "onnx-int8")
    assert parts["embedding_shared_with_head"] and parts["embedding_mb"] == 0
    assert "reading the LM head's int8 weights" in (project / "onnx-int8" / "README.md").read_text()


@pytest.mark.slow
def test_adapters_saving_lm_head_and_embeddings_switch_on_a_tied_base(project):
    """The builder shares one matrix between a tied base's embeddings and lm_head; an adapter replacing
    one of them used to replace both (logits off by ~1-3 in fp32)."""
    built = build_onnx.run(
        stage_cfg(
            project,
            "precision=fp32",
            "onnx.adapter=separate",
            "onnx.parity_prompts=8",
            f"+onnx.extra_adapters.lora_only={project / 'adapter'}",
            f"paths.adapter={project / 'adapter_saved'}",
            f"paths.merged={project / 'base_model'}",  # only its tokenizer is read here
            onnx_dir="onnx-separate",
        )
    )
    assert built["builder_options"]["shared_embeddings"] == "false"
    generator = OnnxGenerator(project / "onnx-separate")
    base = project / "base_model"
    rows = data.read_jsonl(project / "prepared" / "validation.jsonl")[:3]
    for prompt in [data.prompt_text(r["prompt"], base) for r in rows]:
        for name, adapter_dir in (
            ("default", project / "adapter_saved"),
            ("lora_only", project / "adapter"),
            (None, None),
        ):
            generator.use_adapter(name)
            diff = np.abs(generator.last_logits(prompt) - torch_logits(base, prompt, adapter_dir)).max()
            assert diff < 1e-4, (name, diff)
