"""Run onnxruntime-genai's model builder (same arguments) with two bugs fixed:
`python -m ortune.builder_shim -i ... -o ... -p ... -e ... [--extra_options ...]`.

The first bug (onnxruntime-genai 0.18, builders/base.py `has_lm_head`): while walking the model's modules,
the builder takes ANY Linear layer with `out_features == vocab_size` for the LM head. A Phi-3 whose
fused gate_up_proj is as wide as the vocabulary (2 * intermediate_size == vocab_size, as in a tiny
Phi-3 of intermediate 512 and vocabulary 1024) gets the MLP projection wired in as a second LM head, and the exported
logits are wrong by ~0.6 while the build succeeds. The fix accepts a Linear as the LM head only if it
is (or sits inside, for PEFT's modules_to_save wrapper) the model's output embedding.
tests/test_export.py checks that the unpatched builder still has the bug, so the patch is dropped
when an upgrade fixes it.

The second (builders/gemma.py, Gemma3Model): transformers 5 writes Gemma 3's RoPE per layer type,
`rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}`, and no top-level
`rope_theta` / `rope_local_base_freq`. The builder reads `rope_parameters["rope_type"]` (KeyError) and,
without `rope_theta`, would build the global layers' cos/sin caches with its default theta 10000
instead of 1e6. The fix hands the builder the flat form it reads: the full-attention parameters as
`rope_parameters`/`rope_theta`, the sliding layers' theta as `rope_local_base_freq`, and keeps a
full-attention-only scaling (linear, on larger Gemma 3s) off the sliding layers' caches. It also
scales the embedding by sqrt(hidden) exactly, as transformers does, not rounded to two decimals
(25.3 for 25.2982 on a 640-wide model: 7e-5 relative on every embedding).
tests/test_gemma_export.py checks the builder still needs it.

One default changes: `windowed_kv_cache` (the sliding-window layers' KV cache sized to the window)
is off unless --extra_options sets it. onnxruntime-genai 0.18 then refuses every generator whose
max_length is below the window ("KV cache capacity (6) must be at least local_window_size (512)"),
and ortune's parity check, eval and apps size max_length to the prompt plus the answer. With it off,
those layers keep a max_length-sized cache and GroupQueryAttention still attends within the window.
"""

from __future__ import annotations

import runpy
import sys


def patch() -> None:
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's folder on sys.path, as its imports expect)
    import torch
    from builders import base

    if getattr(base.Model.has_lm_head, "_ortune_patched", False):
        return
    builder_has_lm_head = base.Model.has_lm_head

    def has_lm_head(self, module):
        if not builder_has_lm_head(self, module):
            return False
        get_head = getattr(self.weights, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if not isinstance(head, torch.nn.Module):
            return True  # a loader without the HF API (GGUF, pre-quantized): keep the builder's rule
        return any(module is candidate for candidate in head.modules())

    has_lm_head._ortune_patched = True
    base.Model.has_lm_head = has_lm_head
    builder_context_init = base.Model.make_context_length_init

    def make_context_length_init(self, config):
        builder_context_init(self, config)
        if "windowed_kv_cache" not in self.extra_options:
            self.context_length_attrs["window_kv_cache"] = False

    base.Model.make_context_length_init = make_context_length_init
    _patch_gemma3()


def _patch_gemma3() -> None:
    import numpy as np
    from builders import gemma

    model = gemma.Gemma3Model
    builder_config_init = model.make_config_init
    builder_init = model.__init__

    # Gemma 4 subclasses Gemma3Model and reads the per-layer-type form itself: Gemma 3 only
    def make_config_init(self, config):
        builder_config_init(self, config)
        if type(self) is model:
            flatten_rope_parameters(config)

    def init(self, config, io_dtype, onnx_dtype, ep, cache_dir, extra_options):
        builder_init(self, config, io_dtype, onnx_dtype, ep, cache_dir, extra_options)
        if type(self) is model:
            self.embed_attrs["scale"] = float(np.sqrt(self.hidden_size))

    def make_rotary_embedding_multi_cache(self):
        # the builder's own, except that the sliding layers' caches drop the full layers' scaling
        self.cos_cache_global_name, self.sin_cache_global_name = "cos_cache_global", "sin_cache_global"
        super(model, self).make_rotary_embedding_caches(
            cos_cache_name=self.cos_cache_global_name, sin_cache_name=self.sin_cache_global_name
        )
        self.rope_attrs.update(create_caches=True, theta=self.rope_local_theta, rescale_factors=1)
        self.cos_cache_local_name, self.sin_cache_local_name = "cos_cache_local", "sin_cache_local"
        super(model, self).make_rotary_embedding_caches(
            cos_cache_name=self.cos_cache_local_name, sin_cache_name=self.sin_cache_local_name
        )

    model.make_config_init = make_config_init
    model.__init__ = init
    model.make_rotary_embedding_multi_cache = make_rotary_embedding_multi_cache


def flatten_rope_parameters(config) -> None:
    """Per-layer-type RoPE (transformers 5's Gemma 3) in the flat form the builder reads."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or not isinstance(rope.get("full_attention"), dict):
        return
    full, sliding = rope["full_attention"], rope.get("sliding_attention") or {}
    if sliding.get("rope_type", "default") != "default":
        raise NotImplementedError(
            f"sliding-attention RoPE type {sliding['rope_type']!r}: ortune's builder shim exports only the default"
        )
    config.rope_parameters = dict(full)
    config.rope_theta = full["rope_theta"]
    config.rope_local_base_freq = sliding.get("rope_theta", full["rope_theta"])


if __name__ == "__main__":
    patch()
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
