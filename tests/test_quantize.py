"""Accuracy-aware quantization: the fake-quantized weights are the ones onnxruntime computes with, the
sensitivity measure ranks a damaged layer first, and int8 picks respect their budget."""

from __future__ import annotations

import numpy as np
import pytest

from ortune import quantize


def run_matmul_nbits(weight: np.ndarray, x: np.ndarray, bits: int, block: int) -> np.ndarray:
    """x @ weight.T through a real MatMulNBits node, made by onnxruntime's own quantizer from a MatMul."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n = weight.shape[1], weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    # accuracy_level 0 with fp32 activations: the node dequantizes and computes in float
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True, accuracy_level=0)
    quantizer.process()
    quantized = quantizer.model.model
    assert [node.op_type for node in quantized.graph.node] == ["MatMulNBits"]
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize(("bits", "block", "k"), [(4, 32, 96), (4, 128, 200), (8, 32, 64)])
def test_fake_quantized_weights_are_the_ones_onnxruntime_computes_with(bits, block, k):
    rng = np.random.default_rng(bits + block)
    weight = rng.normal(size=(24, k)).astype(np.float32)
    x = rng.normal(size=(5, k)).astype(np.float32)
    expected = run_matmul_nbits(weight, x, bits, block)
    rounded = quantize.fake_quantize(weight, bits, block)
    assert np.abs(x @ rounded.T - expected).max() < 1e-4
    # and it really is the rounded grid, not the float weights
    assert np.abs(x @ weight.T - expected).max() > 1e-2
    assert len(np.unique(np.round(rounded[0, :block] / np.abs(rounded[0, :block]).max(), 5))) <= 2**bits


def test_output_error_ranks_a_layer_with_outlier_weights_first():
    """A layer whose blocks each hold one huge weight loses the precision of all the others in the block:
    with that weight's input always zero, the outliers add nothing to the output but all of the error."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[::32, :] = 0.0  # down_proj's inputs 0, 32, 64, 96 are zero
        model.model.layers[1].mlp.down_proj.weight[:, ::32] *= 60.0

    class Tokenizer:
        def __call__(self, texts, return_tensors, padding):
            ids = torch.tensor([[ord(c) % 64 for c in t[:12].ljust(12)] for t in texts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    errors = quantize.output_errors(model, Tokenizer(), ["hello world", "quantize me"], block_size=32)
    assert max(errors, key=errors.get) == "model.layers.1.mlp.down_proj"
    assert all(0 < e < 1 for e in errors.values())


def test_int8_picks_take_the_worst_units_within_the_budget():
    errors = {
        "model.layers.0.self_attn.q_proj": 0.01,
        "model.layers.0.self_attn.v_proj": 0.30,
        "model.layers.0.mlp.gate_proj": 0.02,
        "model.layers.0.mlp.up_proj": 0.25,
        "model.layers.0.mlp.down_proj": 0.20,
        "model.layers.1.mlp.down_proj": 0.10,
    }
    sizes = {
        "model.layers.0.self_attn.q_proj": 40,
        "model.layers.0.self_attn.v_proj": 10,
        "model.layers.0.mlp.gate_proj": 50,
        "model.layers.0.mlp.up_proj": 50,
        "model.layers.0.mlp.down_proj": 100,
        "model.layers.1.mlp.down_proj": 50,
    }
    # 300 elements in all. 25 % = 75: v (10, 0.30); gate/up together (100, 0.25 from up) does not fit,
    # down of layer 0 (100) neither, down of layer 1 (50, 0.10) does
    assert quantize.pick_int8(errors, sizes, 0.25) == [(0, "v"), (1, "down")]
    # 40 % = 120: v (10) + gate/up (100); nothing else fits in the 10 left
    assert quantize.pick_int8(errors, sizes, 0.40) == [(0, "v"), (0, "gate_up")]
    assert quantize.pick_int8(errors, sizes, 0.0) == []


def test_int8_overrides_name_the_nodes_the_builder_emits():
    options = quantize.int8_overrides(
        [(2, "v"), (5, "gate_up"), (7, "down")], fused_gate_up=True, excluded=["/lm_head/MatMul"]
    )
    overrides = options["quant_config"]["weights"]["overrides"]
    assert overrides[0] == {"match": {"name": "/lm_head/MatMul"}, "exclude": True}
    assert [o["match"]["name"] for o in overrides[1:]] == [
        "/model/layers.2/attn/v_proj/MatMul",
        "/model/layers.5/mlp/gate_up_proj/MatMul",
        "/model/layers.7/mlp/down_proj/MatMul",
    ]
    assert all(o["type"] == "int8" for o in overrides[1:])
    unfused = quantize.int8_overrides([(5, "gate_up")], fused_gate_up=False, excluded=[])
    assert [o["match"]["name"] for o in unfused["quant_config"]["weights"]["overrides"]] == [
        "/model/layers.5/mlp/gate_proj/MatMul",
        "/model/layers.5/mlp/up_proj/MatMul",
    ]
