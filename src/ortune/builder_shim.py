"""Run onnxruntime-genai's model builder (same arguments) with one bug fixed:
`python -m ortune.builder_shim -i ... -o ... -p ... -e ... [--extra_options ...]`.

The bug (onnxruntime-genai 0.18, builders/base.py `has_lm_head`): while walking the model's modules,
the builder takes ANY Linear layer with `out_features == vocab_size` for the LM head. A Phi-3 whose
fused gate_up_proj is as wide as the vocabulary (2 * intermediate_size == vocab_size, as in ortune's
tiny default: 2 * 512 == 1024) gets the MLP projection wired in as a second LM head, and the exported
logits are wrong by ~0.6 while the build succeeds. The fix accepts a Linear as the LM head only if it
is (or sits inside, for PEFT's modules_to_save wrapper) the model's output embedding.
tests/test_export.py checks that the unpatched builder still has the bug, so the patch is dropped
when an upgrade fixes it.
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


if __name__ == "__main__":
    patch()
    sys.argv[0] = "onnxruntime_genai.models.builder"
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
