"""The int8 build's embedding lookup, quantized by ortune after the builder has written the graph.

onnxruntime-genai 0.18's builder quantizes the embedding Gather to int4 only ("INT8 embedding export is not
supported"): an int8 build keeps the embedding table float32, and a tied model keeps it beside the head's int8
copy of the same matrix (Gemma 3 270M: 671 of its 1024 MB). onnxruntime's GatherBlockQuantized reads 8-bit
blocks (uint8, zero point 128 unless given), so the float Gather is replaced:

- tied (the head's MatMulNBits weights are a rounding of this very table: every element within one step of
  it, checked here rather than assumed from the config; one, not half, because onnxruntime's symmetric int8
  maps a block's largest magnitude to -128 and clips its opposite at +127): the lookup reads the head's int8
  weights and scales, as the builder's own int4 tied build does; the float table is dropped;
- otherwise (an untied model, or a head kept float): the table is quantized on its own, symmetric blocks of
  onnx.block_size along the hidden axis, rounded to nearest.

Only the ONNX file is rewritten, in the build's temporary folder (build_onnx ships that folder atomically).
Measured sizes and agreement: docs/export.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("ortune")

GATHER = "/model/embed_tokens/Gather"
PREFIX = "/model/embed_tokens/"
# the rows of the table dequantized (tie check) or quantized (own blocks) at once: bounded memory
SLAB_ROWS = 8192


def quantize_embedding(model_dir: Path, block_size: int) -> str | None:
    """Replace the graph's float embedding Gather by an 8-bit GatherBlockQuantized. Returns "shared_with_head"
    or "own_blocks" for what it did, None where there is no float table to quantize (already quantized, or an
    adapter input of a separate build)."""
    import onnx
    from onnx import external_data_helper, numpy_helper

    from ortune.export import model_file

    path = model_file(model_dir)
    model = onnx.load(str(path), load_external_data=False)
    data_files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    gather = next((n for n in graph.node if n.name == GATHER and n.op_type == "Gather"), None)
    if gather is None or gather.input[0] not in inits:
        return None
    table_name = gather.input[0]
    external_data_helper.load_external_data_for_model(model, str(path.parent))
    table = numpy_helper.to_array(inits[table_name])
    if table.dtype != np.float32 or table.ndim != 2:
        return None
    head = _head_int8(graph, inits, table)
    nodes, new_inits = _shared_lookup(gather, head) if head else _own_lookup(gather, table, block_size)
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    if not any(table_name in n.input for n in graph.node):
        graph.initializer.remove(inits[table_name])
    graph.initializer.extend(new_inits)
    data_name = f"{path.name}.data"
    for name in data_files | {data_name}:  # onnx.save appends to an existing data file; the old one is all in memory
        (path.parent / name).unlink(missing_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
    how = "shared_with_head" if head else "own_blocks"
    log.info("embedding %s: int8, %s", "x".join(map(str, table.shape)), "the head's weights" if head else "own blocks")
    return how


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _head_int8(graph, inits: dict, table: np.ndarray) -> dict | None:
    """The LM head's 8-bit MatMulNBits weights when they round `table` (tied), else None."""
    from onnx import numpy_helper

    vocab, hidden = table.shape
    for node in graph.node:
        if node.op_type != "MatMulNBits" or not node.name.startswith("/lm_head/"):
            continue
        attrs = _attributes(node)
        inputs = list(node.input) + [""] * (4 - len(node.input))
        weight, scales, zero_points = inputs[1:4]
        if (
            attrs.get("bits") != 8
            or (attrs.get("K"), attrs.get("N")) != (hidden, vocab)
            or any(inputs[4:])  # g_idx / bias: not a plain blockwise table
            or not all(name in inits for name in (weight, scales))
            or (zero_points and zero_points not in inits)
        ):
            return None
        block = attrs["block_size"]
        blocks = -(-hidden // block)
        codes = numpy_helper.to_array(inits[weight]).reshape(vocab, blocks * block)
        step = numpy_helper.to_array(inits[scales]).reshape(vocab, blocks)
        zero = (
            numpy_helper.to_array(inits[zero_points]).reshape(vocab, -1)[:, :blocks].astype(np.float32)
            if zero_points
            else np.float32(128)
        )
        for start in range(0, vocab, SLAB_ROWS):
            rows = slice(start, start + SLAB_ROWS)
            z = zero if np.ndim(zero) == 0 else np.repeat(zero[rows], block, axis=1)[:, :hidden]
            s = np.repeat(step[rows], block, axis=1)[:, :hidden]
            values = (codes[rows, :hidden].astype(np.float32) - z) * s
            if np.any(np.abs(values - table[rows]) > np.abs(s) * (1 + 1e-3) + 1e-7):
                return None  # an untied head: its weights are another matrix
        return {
            "weight": weight,
            "scales": scales,
            "zero_points": zero_points,
            "block": block,
            "shape": (vocab, blocks * block),
            "scales_2d": tuple(inits[scales].dims) == (vocab, blocks),
            "hidden": hidden,
        }
    return None


def _shared_lookup(gather, head: dict) -> tuple[list, list]:
    """Reshape the head's [vocab, blocks, block] codes to [vocab, blocks * block] and gather rows of it."""
    from onnx import helper, numpy_helper

    inits, nodes = [], []

    def reshaped(name: str, shape: tuple[int, int], tag: str) -> str:
        shape_name = f"{PREFIX}{tag}/shape"
        inits.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), shape_name))
        out = f"{PREFIX}{tag}/output_0"
        nodes.append(helper.make_node("Reshape", [name, shape_name], [out], name=f"{PREFIX}{tag}"))
        return out

    vocab, width = head["shape"]
    blocks = width // head["block"]
    inputs = [reshaped(head["weight"], head["shape"], "Reshape"), gather.input[1]]
    inputs.append(head["scales"] if head["scales_2d"] else reshaped(head["scales"], (vocab, blocks), "ReshapeScales"))
    if head["zero_points"]:
        inputs.append(reshaped(head["zero_points"], (vocab, blocks), "ReshapeZeroPoints"))
    nodes += _lookup(inputs, gather.output[0], head["block"], width, head["hidden"], inits)
    return nodes, inits


def _own_lookup(gather, table: np.ndarray, block: int) -> tuple[list, list]:
    """Symmetric int8 blocks of the table itself: code = round(w / scale) + 128, scale = max |w| / 127 per block
    of `block` (halved while wider than a row)."""
    from onnx import numpy_helper

    vocab, hidden = table.shape
    while block > hidden and block > 16:  # a block wider than a row would only quantize padding
        block //= 2
    blocks = -(-hidden // block)
    codes = np.empty((vocab, blocks * block), dtype=np.uint8)
    scales = np.empty((vocab, blocks), dtype=np.float32)
    # a slab of rows at a time: whole-table temporaries were ~4 float copies of it (2 GB for a 545 MB table)
    for start in range(0, vocab, SLAB_ROWS):
        rows = slice(start, start + SLAB_ROWS)
        padded = np.zeros((len(table[rows]), blocks * block), dtype=np.float32)
        padded[:, :hidden] = table[rows]
        padded = padded.reshape(-1, blocks, block)
        step = np.abs(padded).max(axis=2) / 127
        step[step == 0] = 1  # an all-zero block: any scale reproduces it
        codes[rows] = (np.clip(np.rint(padded / step[..., None]), -127, 127) + 128).reshape(-1, blocks * block)
        scales[rows] = step
    weight, scale_name = f"{gather.input[0]}_Q8", f"{gather.input[0]}_scales"
    inits = [
        numpy_helper.from_array(codes, weight),
        numpy_helper.from_array(scales, scale_name),
    ]
    nodes = _lookup([weight, gather.input[1], scale_name], gather.output[0], block, blocks * block, hidden, inits)
    return nodes, inits


def _lookup(inputs: list[str], output: str, block: int, width: int, hidden: int, inits: list) -> list:
    """GatherBlockQuantized into `output` (the replaced Gather's, so its readers are untouched), sliced back to
    `hidden` where the table was padded to whole blocks."""
    from onnx import helper, numpy_helper

    name = f"{PREFIX}GatherBlockQuantized"
    gathered = output if width == hidden else f"{name}/output_0"
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            inputs,
            [gathered],
            name=name,
            domain="com.microsoft",
            bits=8,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        )
    ]
    if width != hidden:
        bounds = {"starts": [0], "ends": [hidden], "axes": [-1]}
        for key, value in bounds.items():
            inits.append(numpy_helper.from_array(np.array(value, dtype=np.int64), f"{PREFIX}Slice/{key}"))
        nodes.append(
            helper.make_node(
                "Slice", [gathered, *(f"{PREFIX}Slice/{k}" for k in bounds)], [output], name=f"{PREFIX}Slice"
            )
        )
    return nodes
