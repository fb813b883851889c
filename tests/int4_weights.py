"""The weights an int4 ONNX model holds, dequantized: MatMulNBits (every linear layer, the LM head) and
GatherBlockQuantized (a quantized embedding), each as the PyTorch weight it came from is shaped, so a test can
compare them with the merged model's to the bit (what onnxruntime's kernels read: contrib op specs, and
onnxruntime.quantization.matmul_nbits_quantizer, which packs them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _unpack(packed: np.ndarray, count: int) -> np.ndarray:
    """4-bit values, two per byte, low nibble first, along the last axis (cut to `count`)."""
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], -1)[..., :count].astype(np.float32)


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def dequantized(model_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    """{node name: (op, weight)}: each MatMulNBits weight as [N, K] (a Linear's [out, in]) and each
    GatherBlockQuantized table as [rows, hidden], in float32: (q - zero point) * scale per block."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(Path(model_dir) / "model.onnx"))
    tensors = {t.name: t for t in model.graph.initializer}

    # a tied embedding's table is the LM head's packed weight through a Reshape (shared_embeddings)
    reshaped = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Reshape" and n.input[0] in tensors}

    def array(name: str) -> np.ndarray | None:
        name = reshaped.get(name, name)
        return numpy_helper.to_array(tensors[name]) if name and name in tensors else None

    found = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            a = _attributes(node)
            assert a["bits"] == 4, (node.name, a["bits"])
            n, k, block = a["N"], a["K"], a["block_size"]
            blocks = -(-k // block)
            q = _unpack(array(node.input[1]).reshape(n, blocks, block // 2), block).reshape(n, blocks, block)
            scales = array(node.input[2]).astype(np.float32).reshape(n, blocks, 1)
            zp = array(node.input[3]) if len(node.input) > 3 else None
            if zp is None:
                zero = np.float32(8)  # symmetric: the midpoint of 0..15
            elif zp.dtype == np.uint8:
                zero = _unpack(zp.reshape(n, -1), blocks).reshape(n, blocks, 1)
            else:
                zero = zp.astype(np.float32).reshape(n, blocks, 1)
            found[node.name] = (node.op_type, ((q - zero) * scales).reshape(n, blocks * block)[:, :k])
        elif node.op_type == "GatherBlockQuantized":
            a = _attributes(node)
            assert a.get("bits", 4) == 4 and a.get("gather_axis", 0) == 0, (node.name, a)
            data, block = array(node.input[0]), a["block_size"]
            scales = array(node.input[2]).astype(np.float32)
            rows = scales.shape[0]
            data = data.reshape(rows, -1)
            hidden = data.shape[1] * 2 if data.dtype == np.uint8 else data.shape[1]
            q = _unpack(data, hidden) if data.dtype == np.uint8 else data.astype(np.float32)
            zp = array(node.input[3]) if len(node.input) > 3 else None
            zero = np.float32(8) if zp is None else _unpack(zp.reshape(rows, -1), scales.shape[1])[..., None]
            weight = (q.reshape(rows, -1, block) - zero) * scales.reshape(rows, -1, 1)
            found[node.name] = (node.op_type, weight.reshape(rows, hidden))
    return found


# the builder fuses some projections into one MatMul: its weight is theirs stacked, in this order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def reference(node: str, op: str, merged: dict[str, np.ndarray]) -> np.ndarray | None:
    """The merged PyTorch weight a node of the builder's graph holds, by the node's name (layers.<i>/attn|mlp/
    <proj>, lm_head), stacking the projections of a fused one; a tied LM head or a quantized embedding is the
    embedding matrix. None when the name says nothing the merged model has."""
    import re

    if op == "GatherBlockQuantized" or ("lm_head" in node and "lm_head.weight" not in merged):
        return merged.get("model.embed_tokens.weight")
    if "lm_head" in node:
        return merged["lm_head.weight"]
    found = re.search(r"layers\.(\d+)/(attn|mlp)/(\w+)/", node)
    if not found:
        return None
    layer, block, projection = found.groups()
    prefix = f"model.layers.{layer}.{'self_attn' if block == 'attn' else 'mlp'}."
    if f"{prefix}{projection}.weight" in merged:
        return merged[f"{prefix}{projection}.weight"]
    parts = [f"{prefix}{name}.weight" for name in FUSED.get(projection, ())]
    return np.concatenate([merged[p] for p in parts]) if parts and all(p in merged for p in parts) else None
