"""Accuracy-aware weight-only quantization: the exact int4/int8 grid the builder will use, how much each
linear layer's quantization moves its outputs, and which layers therefore stay int8 in an int4 model.

The builder's default int4/int8 quantizer is MLAS's blockwise round-to-nearest (onnxruntime's
MatMulNBitsQuantizer without algo_config). `fake_quantize` calls that same C++ kernel and dequantizes
its output, so PyTorch sees exactly the weights the ONNX model will hold, to the bit.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

log = logging.getLogger("ortune")


def fake_quantize(weight: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> np.ndarray:
    """A Linear weight (out, in) rounded to the builder's blockwise grid and back to float32.

    Blocks run along the input dimension, one scale per block and output column, as MatMulNBits stores
    them; symmetric grids have an implicit zero point (8 for int4, 128 for int8)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    matrix = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).T)  # MatMul's B: (in, out)
    rows, cols = matrix.shape
    blocks = -(-rows // block_size)
    if blocks * block_size != rows:
        matrix = np.pad(matrix, ((0, blocks * block_size - rows), (0, 0)))
    per_byte = 8 // bits
    packed = np.zeros((cols, blocks, block_size // per_byte), dtype=np.uint8)
    zero_points = np.zeros((cols, -(-blocks // per_byte)), dtype=np.uint8)
    scales = np.zeros((cols, blocks), dtype=np.float32)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, matrix, scales, zero_points, block_size, cols, blocks * block_size, symmetric)
    if bits == 4:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(cols, blocks, block_size)
        zeros = (
            np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(cols, -1)[:, :blocks]
            if not symmetric
            else np.full((cols, blocks), 8)
        )
    else:
        codes = packed.reshape(cols, blocks, block_size)
        zeros = zero_points[:, :blocks] if not symmetric else np.full((cols, blocks), 128)
    values = (codes.astype(np.float32) - zeros[..., None].astype(np.float32)) * scales[..., None]
    return values.reshape(cols, blocks * block_size)[:, :rows]


def output_errors(model, tokenizer, texts: list[str], block_size: int, batch_size: int = 16) -> dict[str, float]:
    """{Linear name: ||X (W - Q4(W))^T|| / ||X W^T||}: the relative output error each linear layer's int4
    grid causes on its real inputs X (every token of `texts`), the objective GPTQ minimises per layer.
    One forward pass for the inputs; then a matrix product per layer. Tied LM heads count once."""
    import torch

    inputs: dict[str, list] = {}
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    masks: list = []

    def keep(name):
        def hook(module, args, output):
            inputs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in linears.items()]
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
                masks.append(batch["attention_mask"].reshape(-1).bool())
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    errors = {}
    with torch.inference_mode():
        for name, module in linears.items():
            # padding tokens are not real inputs: drop their rows
            x = torch.cat([chunk[mask] for chunk, mask in zip(inputs[name], masks)]).float()
            weight = module.weight.detach().float()
            rounded = torch.from_numpy(fake_quantize(weight.numpy(), 4, block_size))
            errors[name] = float((x @ (weight - rounded).T).norm() / (x @ weight.T).norm().clamp_min(1e-12))
    return errors


# A unit is what ortune upgrades to int8 as a whole: each attention projection on its own (an override naming
# q, k or v makes the builder emit that layer's q/k/v as three MatMuls instead of one packed qkv_proj, so v,
# by far the most sensitive on SmolLM2 and the smallest, is upgraded alone), and gate/up together when
# onnx.extra_options.fuse_mlp_gate_up fuses them into one gate_up_proj MatMul.
_LINEAR = re.compile(r"^(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj$")
# Phi-3 stores q/k/v and gate/up fused (qkv_proj, gate_up_proj Linear layers): those are units of their own.
_UNIT_OF = {
    "q": "q",
    "k": "k",
    "v": "v",
    "o": "o",
    "gate": "gate_up",
    "up": "gate_up",
    "down": "down",
    "qkv": "qkv",
    "gate_up": "gate_up",
}


def unit_errors(errors: dict[str, float]) -> dict[tuple[int, str], float]:
    """{(layer, unit): error}: a unit takes its worst member's error (it is upgraded as a whole)."""
    units: dict[tuple[int, str], float] = {}
    for linear, error in errors.items():
        if (match := _LINEAR.match(linear)) and match.group(3) in _UNIT_OF:
            key = (int(match.group(1)), _UNIT_OF[match.group(3)])
            units[key] = max(units.get(key, 0.0), error)
    return units


def unit_nodes(layer: int, unit: str, fused_gate_up: bool) -> list[str]:
    """The builder node names an int8 override of this unit must name."""
    prefix = f"/model/layers.{layer}"
    if unit in ("q", "k", "v", "o"):
        return [f"{prefix}/attn/{unit}_proj/MatMul"]
    if unit == "qkv":  # the builder unpacks a fused qkv_proj; naming the parts keeps them apart
        return [f"{prefix}/attn/{p}_proj/MatMul" for p in ("q", "k", "v")]
    if unit == "gate_up":
        return (
            [f"{prefix}/mlp/gate_up_proj/MatMul"]
            if fused_gate_up
            else [f"{prefix}/mlp/{p}_proj/MatMul" for p in ("gate", "up")]
        )
    return [f"{prefix}/mlp/down_proj/MatMul"]


def pick_int8(errors: dict[str, float], sizes: dict[str, int], share: float) -> list[tuple[int, str]]:
    """The units with the largest errors, worst first, whose weights (`sizes`: Linear name -> elements)
    together stay within `share` of all the units' weights."""
    units = unit_errors(errors)
    unit_size: dict[tuple[int, str], int] = {}
    for linear, size in sizes.items():
        if (match := _LINEAR.match(linear)) and match.group(3) in _UNIT_OF:
            key = (int(match.group(1)), _UNIT_OF[match.group(3)])
            unit_size[key] = unit_size.get(key, 0) + size
    budget, used, picked = share * sum(unit_size.values()), 0, []
    for unit in sorted(units, key=units.get, reverse=True):
        if used + unit_size[unit] <= budget:
            picked.append(unit)
            used += unit_size[unit]
    return picked


def int8_overrides(units: list[tuple[int, str]], fused_gate_up: bool, excluded: list[str]) -> dict:
    """The builder's --target_options for an int4 model with these units in int8. Structured overrides
    replace the legacy nodes_to_exclude list, so the float nodes (onnx.keep_float, LoRA paths) go in too."""
    overrides = [{"match": {"name": node}, "exclude": True} for node in excluded]
    overrides += [
        {"match": {"name": node}, "type": "int8"}
        for layer, unit in units
        for node in unit_nodes(layer, unit, fused_gate_up)
    ]
    return {"quant_config": {"weights": {"overrides": overrides}}}


# Quantization-aware LoRA (train.method=qat). The adapter trains through the weight the export will hold:
# each adapted layer computes with round(W + scale * B @ A) on the builder's int4 grid, the rounding passed
# over by the gradient (straight-through); every other linear layer holds its rounded weight from the start.
# merge then writes that rounded merged weight, which the builder's quantizer reproduces exactly (a value on
# the grid rounds to itself), so the int4 model computes what training optimised instead of a rounding of it.
GRID_FILE = "quantization_aware.json"


def round_to_grid(weight, block_size: int, bits: int = 4):
    """A Linear weight (out, in) on MLAS's symmetric blockwise grid (`fake_quantize` in torch, bit-exact for
    int4: the builder's default quantizer). Per block of `block_size` inputs (zero-padded), the value of largest
    magnitude (the block's minimum on a tie) maps to the most negative code (scale = value / -2^(bits-1));
    the rest round half away from zero."""
    import torch

    rows, cols = weight.shape
    blocks = -(-cols // block_size)
    padded = torch.nn.functional.pad(weight, (0, blocks * block_size - cols)).reshape(rows, blocks, block_size)
    low, high = padded.amin(-1, keepdim=True), padded.amax(-1, keepdim=True)
    peak = torch.where(high.abs() > low.abs(), high, low)  # MLAS: the minimum wins a tie in magnitude
    half = 2 ** (bits - 1)
    scale = peak / -half
    reciprocal = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    # MLAS adds the zero point before rounding, in float32 (-0.50000006 + 8 is 7.5, which rounds to 8), and
    # rounds half away from zero (C's roundf; floor(y + 0.5) would round 0.49999997 up in float32)
    shifted = padded * reciprocal + half
    whole = torch.trunc(shifted)
    codes = (whole + torch.sign(shifted) * ((shifted - whole).abs() >= 0.5)).clamp(0, 2 * half - 1)
    return ((codes - half) * scale).reshape(rows, blocks * block_size)[:, :cols]


def _straight_through(weight, block_size: int):
    return weight + (round_to_grid(weight.detach(), block_size) - weight).detach()


def round_in_place(weight, block_size: int, rows: int = 8192) -> None:
    """Put a frozen weight on the grid in place, a slab of rows at a time: rows round independently, and a
    262k-row tied embedding rounded whole held ~6 float32 copies of itself at once (docs/quantization.md)."""
    import torch

    with torch.no_grad():
        for start in range(0, weight.shape[0], rows):
            part = weight[start : start + rows]
            part.copy_(round_to_grid(part, block_size))


def make_quantization_aware(model, block_size: int, frozen: bool = False) -> int:
    """Make a PEFT LoRA model compute as its int4 export will: frozen linear layers rounded in place (once),
    LoRA layers through their rounded merged weight, trainable full layers (modules_to_save) through their
    rounded weight. `frozen` (a model that only infers: eval's adapter judge): each LoRA layer's rounded
    merged weight is computed once, not at every forward: rounding per token made the judge far slower than
    the merged model it computes the same as (docs/quantization.md). Returns how many linear layers are now
    on the grid."""
    import types

    import torch
    from peft.tuners.lora import LoraLayer

    def merged_weight(self):
        weight = self.get_base_layer().weight
        for name in self.active_adapters:
            if name in self.lora_A:
                weight = weight + self.get_delta_weight(name)
        return weight

    def lora_forward(self, x, *args, **kwargs):
        weight = _straight_through(merged_weight(self), block_size)
        return torch.nn.functional.linear(x, weight, self.get_base_layer().bias)

    def frozen_forward(self, x, *args, **kwargs):
        return torch.nn.functional.linear(x, self.ortune_grid_weight, self.get_base_layer().bias)

    def trainable_forward(self, x):
        return torch.nn.functional.linear(x, _straight_through(self.weight, block_size), self.bias)

    adapted = [
        m for m in model.modules() if isinstance(m, LoraLayer) and isinstance(m.get_base_layer(), torch.nn.Linear)
    ]
    inside = {id(p) for layer in adapted for m in (layer.lora_A, layer.lora_B) for p in m.parameters()}
    inside |= {id(layer.get_base_layer().weight) for layer in adapted}
    rounded: set[int] = set()
    trainable = 0
    for layer in adapted:
        if frozen:
            with torch.no_grad():
                layer.ortune_grid_weight = round_to_grid(merged_weight(layer), block_size)
        layer.forward = types.MethodType(frozen_forward if frozen else lora_forward, layer)
    for module in model.modules():
        if type(module) is not torch.nn.Linear or id(module.weight) in inside:
            continue
        if module.weight.requires_grad:
            module.forward = types.MethodType(trainable_forward, module)
            trainable += 1
        elif id(module.weight) not in rounded:  # a tied lm_head rounds the embeddings too: the builder shares them
            round_in_place(module.weight, block_size)
            rounded.add(id(module.weight))
    # an untied model's frozen embedding table too: the int4 build quantizes its Gather on the same grid
    # (onnx.quantize_ops null), so the lookup computes what training saw instead of a rounding of it
    embedding = _frozen_untied_embedding(model, rounded)
    if embedding is not None:
        round_in_place(embedding, block_size)
        rounded.add(id(embedding))
    return len(adapted) + trainable + len(rounded)


def _frozen_untied_embedding(model, rounded: set[int]):
    """The input embedding's weight when it is frozen and not already rounded as a tied lm_head, else None."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.requires_grad or id(weight) in rounded or weight.dim() != 2:
        return None
    return weight


def round_merged(model, block_size: int) -> None:
    """After merge_and_unload: every linear layer's weight on the grid, as the adapter was trained."""
    import torch

    seen: set[int] = set()
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__dict__.pop("forward", None)  # a trainable copy's straight-through forward
            if id(module.weight) not in seen:
                round_in_place(module.weight, block_size)
                seen.add(id(module.weight))


def read_grid(folder) -> dict | None:
    """The grid an adapter (or a merged model) was trained on, or None for plain LoRA."""
    from ortune.artifacts import read_json

    return read_json(Path(folder) / GRID_FILE)


def check_grid(merged, precision: str, block_size: int, algorithm: str, int8_share: float) -> None:
    """A merged model trained through an int4 grid builds int4 on that grid only (one line otherwise)."""
    from ortune.errors import OrtuneError

    grid = read_grid(merged)
    if grid and precision == "int4" and (block_size, algorithm, int8_share) != (grid["block_size"], "default", 0.0):
        raise OrtuneError(
            f"{merged}: trained through int4 block {grid['block_size']} (train.method=qat), built as int4 "
            f"block {block_size}, onnx.algorithm={algorithm}, onnx.int8_share={int8_share}: set "
            f"onnx.block_size={grid['block_size']} onnx.algorithm=default onnx.int8_share=0, or retrain"
        )


def grid_record(block_size: int) -> dict:
    return {
        "bits": 4,
        "block_size": block_size,
        "symmetric": True,
        "algorithm": "default",
        "what": "trained through the builder's int4 grid (ortune.quantize.round_to_grid); build it as int4 "
        "with this block_size, onnx.algorithm=default",
    }
