"""ortune.embedding_int8: an int8 build's float embedding lookup replaced by an 8-bit GatherBlockQuantized,
reading the head's int8 weights where the model is tied and its own blocks otherwise. Checked on small graphs
written here (onnxruntime runs them before and after), then through build_onnx on the tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ortune import embedding_int8

VOCAB, HIDDEN, BLOCK = 40, 48, 32  # 48 = one and a half blocks: the lookup pads and slices
BLOCKS = 2
IDS = np.array([0, 7, 39, 7], dtype=np.int64)


def ort_int8(head: np.ndarray, symmetric: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """onnxruntime's own 8-bit MatMulNBits quantizer (the builder's) on an LM head [vocab, hidden]: codes
    [vocab, blocks, block], scales [vocab, blocks], zero points [vocab, blocks]."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    weight = np.zeros((BLOCKS * BLOCK, VOCAB), np.float32)  # MatMul's [K, N], padded to whole blocks
    weight[:HIDDEN] = head.T
    codes = np.zeros((VOCAB, BLOCKS, BLOCK), np.uint8)
    scales = np.zeros((VOCAB, BLOCKS), np.float32)
    zero_points = np.zeros((VOCAB, BLOCKS), np.uint8)
    quantize_matmul_8bits(codes, weight, scales, zero_points, BLOCK, VOCAB, BLOCKS * BLOCK, symmetric)
    return codes, scales, zero_points


def dequantized(codes, scales, zero_points=None) -> np.ndarray:
    zero = np.float32(128) if zero_points is None else np.repeat(zero_points, BLOCK, axis=1).astype(np.float32)
    return ((codes.reshape(VOCAB, -1).astype(np.float32) - zero) * np.repeat(scales, BLOCK, axis=1))[:, :HIDDEN]


def write_graph(
    folder: Path, table: np.ndarray, head: np.ndarray, table_as_input: bool = False, symmetric: bool = True
) -> Path:
    """input_ids -> Gather(table) -> embeddings; hidden -> 8-bit MatMulNBits(head) -> logits, named and
    quantized as the builder does; a genai_config.json naming model.onnx."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    codes, scales, zero_points = ort_int8(head, symmetric)
    head_inputs = ["hidden", "lm_head.MatMul.weight_Q8", "lm_head.MatMul.weight_scales"]
    inits = [
        numpy_helper.from_array(codes, "lm_head.MatMul.weight_Q8"),
        numpy_helper.from_array(scales, "lm_head.MatMul.weight_scales"),
    ]
    if not symmetric:
        head_inputs.append("lm_head.MatMul.weight_zero_points")
        inits.append(numpy_helper.from_array(zero_points.reshape(-1), "lm_head.MatMul.weight_zero_points"))
    nodes = [
        helper.make_node(
            "Gather", ["model.embed_tokens.weight", "input_ids"], ["embeddings"], name=embedding_int8.GATHER
        ),
        helper.make_node(
            "MatMulNBits",
            head_inputs,
            ["logits"],
            name="/lm_head/MatMul_Q8",
            domain="com.microsoft",
            K=HIDDEN,
            N=VOCAB,
            bits=8,
            block_size=BLOCK,
        ),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n"]),
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, HIDDEN]),
    ]
    if table_as_input:
        inputs.append(helper.make_tensor_value_info("model.embed_tokens.weight", TensorProto.FLOAT, [VOCAB, HIDDEN]))
    else:
        inits.append(numpy_helper.from_array(table, "model.embed_tokens.weight"))
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("embeddings", "logits")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    folder.mkdir()
    # a data file named otherwise than the rewrite's model.onnx.data: none may be left behind
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (folder / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"filename": "model.onnx"}}}))
    return folder


def run(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    hidden = np.linspace(-1, 1, HIDDEN, dtype=np.float32)[None]
    embeddings, logits = session.run(["embeddings", "logits"], {"input_ids": IDS, "hidden": hidden})
    return embeddings, logits


def initializers(folder: Path) -> dict[str, tuple]:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return {t.name: tuple(t.dims) for t in graph.initializer}


def half_step(table: np.ndarray) -> np.ndarray:
    """Half of each element's int8 step when its block is rounded symmetrically (max |w| / 127 a step)."""
    padded = np.zeros((VOCAB, BLOCKS * BLOCK), np.float32)
    padded[:, :HIDDEN] = np.abs(table)
    return np.repeat(padded.reshape(VOCAB, BLOCKS, BLOCK).max(axis=2) / 127, BLOCK, axis=1)[:, :HIDDEN] / 2


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_tied_lookup_reads_the_heads_int8_weights_and_drops_the_float_table(tmp_path, symmetric):
    table = np.random.default_rng(0).normal(size=(VOCAB, HIDDEN)).astype(np.float32)
    folder = write_graph(tmp_path / "tied", table, head=table, symmetric=symmetric)
    _, logits_before = run(folder)
    assert embedding_int8.quantize_embedding(folder, BLOCK) == "shared_with_head"
    embeddings, logits = run(folder)
    codes, scales, zero_points = ort_int8(table, symmetric)
    head_rows = dequantized(codes, scales, None if symmetric else zero_points)
    np.testing.assert_array_equal(embeddings, head_rows[IDS])  # exactly the head's rows: one matrix, one rounding
    assert not np.array_equal(embeddings, table[IDS])
    np.testing.assert_array_equal(logits, logits_before)  # the head untouched
    names = initializers(folder)
    assert "model.embed_tokens.weight" not in names and not any("embed_tokens.weight_Q8" in n for n in names)
    assert (folder / "model.onnx.data").stat().st_size < 2 * codes.nbytes  # no float copy of the table left
    assert sorted(f.name for f in folder.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data"]


def test_an_untied_table_is_quantized_in_its_own_blocks(tmp_path):
    rng = np.random.default_rng(1)
    table = rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32)
    table[7, :BLOCK] = 0  # an all-zero block stays zero
    folder = write_graph(tmp_path / "untied", table, head=rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32))
    assert embedding_int8.quantize_embedding(folder, BLOCK) == "own_blocks"
    embeddings, _ = run(folder)
    assert embeddings.shape == (len(IDS), HIDDEN)
    assert np.all(np.abs(embeddings - table[IDS]) <= half_step(table)[IDS] * 1.001)
    assert not np.array_equal(embeddings, table[IDS])  # rounded, not the float table
    assert np.all(embeddings[1, :BLOCK] == 0)
    names = initializers(folder)
    assert "model.embed_tokens.weight" not in names
    assert names["model.embed_tokens.weight_Q8"] == (VOCAB, BLOCKS * BLOCK)  # padded to whole blocks, sliced back


def test_own_blocks_quantized_a_slab_of_rows_at_a_time_equal_the_whole_table_at_once(tmp_path, monkeypatch):
    """Bounded memory must not change a code: slabs of 7 rows end mid-vocabulary (40 rows) and tie-check too."""
    rng = np.random.default_rng(3)
    table = rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32)
    head = rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32)
    whole = write_graph(tmp_path / "whole", table, head)
    assert embedding_int8.quantize_embedding(whole, BLOCK) == "own_blocks"
    monkeypatch.setattr(embedding_int8, "SLAB_ROWS", 7)
    slabs = write_graph(tmp_path / "slabs", table, head)
    assert embedding_int8.quantize_embedding(slabs, BLOCK) == "own_blocks"
    np.testing.assert_array_equal(run(slabs)[0], run(whole)[0])
    assert (slabs / "model.onnx.data").read_bytes() == (whole / "model.onnx.data").read_bytes()


def test_a_table_that_is_a_graph_input_is_left_as_it_is(tmp_path):
    """An adapter=separate build whose adapter saves the embeddings feeds them as an input: nothing to quantize."""
    table = np.ones((VOCAB, HIDDEN), np.float32)
    folder = write_graph(tmp_path / "input", table, head=table, table_as_input=True)
    before = (folder / "model.onnx").read_bytes()
    assert embedding_int8.quantize_embedding(folder, BLOCK) is None
    assert (folder / "model.onnx").read_bytes() == before


def test_a_head_that_misses_the_table_by_more_than_a_step_is_not_shared(tmp_path):
    """The tie is read from the weights: a head three steps off on one element is another matrix."""
    table = np.random.default_rng(2).normal(size=(VOCAB, HIDDEN)).astype(np.float32)
    head = table.copy()
    head[5, 9] += 6 * half_step(table)[5, 9]
    folder = write_graph(tmp_path / "near", table, head=head)
    assert embedding_int8.quantize_embedding(folder, BLOCK) == "own_blocks"
