"""Quantization-aware LoRA (train.method=qat): the torch grid is the builder's int4 grid to the bit, the
adapter trains through it, merge writes weights the builder reproduces exactly, and settings that would
build another grid are refused before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from ortune import data, quantize
from ortune.errors import OrtuneError
from test_train import compose, train, untrained_loss


@pytest.mark.parametrize("block", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("shape", [(192, 576), (64, 100), (7, 33)])
def test_the_torch_grid_is_the_builders_int4_quantizer_to_the_bit(block, shape):
    """round_to_grid against MLAS's own C++ quantizer (what the builder runs), padding blocks included."""
    import torch

    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(block)) * 0.05
    weight[0, :3] = torch.tensor([0.5, -0.5, 0.25])  # a tie in magnitude: MLAS takes the minimum
    np.testing.assert_array_equal(
        quantize.round_to_grid(weight, block).numpy(), quantize.fake_quantize(weight.numpy(), 4, block)
    )


def test_weights_on_the_grid_round_to_themselves_in_the_builders_quantizer():
    """What merge writes is what the int4 model holds: quantizing a rounded weight again changes nothing."""
    import torch

    weight = torch.randn(96, 320, generator=torch.Generator().manual_seed(0))
    rounded = quantize.round_to_grid(weight, 32)
    assert not torch.equal(rounded, weight)
    np.testing.assert_array_equal(quantize.fake_quantize(rounded.numpy(), 4, 32), rounded.numpy())


def test_an_embedding_on_the_grid_is_what_the_builders_gather_quantizer_stores():
    """An untied embedding rounded by QAT holds its values through the int4 Gather (GatherBlockQuantized) the
    builder writes: its numpy quantizer (scale = peak / -8 per block of the hidden axis, a shorter last block)
    gives codes whose dequantized values are the rounded table itself."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    table = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))  # 40 = two blocks of 16 and one of 8
    rounded = quantize.round_to_grid(table, 16).numpy()
    blocks = []
    for start in range(0, 40, 16):  # quantize_ndarray's loop over the quantized axis, before it packs the codes
        codes, scale = DefaultWeightOnlyQuantizer.quant_slice_symmetric(rounded[:, start : start + 16, None])
        blocks.append(codes.astype(np.float32) * scale)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1)[:, :, 0], rounded)
    assert not np.array_equal(rounded, table.numpy())


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    import fetch_model
    import merge
    import prepare_data

    root = tmp_path_factory.mktemp("qat")
    fetch_model.run(compose(root, stage=None))
    prepare_data.run(compose(root, stage=None))
    settings = [
        "train.method=qat",
        "train.qat.block_size=16",
        "onnx.block_size=16",
        "lora.dropout=0",
        "train.max_steps=12",
        "train.eval_strategy=no",
        "train.save_steps=0",
    ]
    metrics, adapter = train(root, "qat", *settings)
    merged = root / "qat" / "merged"
    merge_metrics = merge.run(
        compose(root, f"paths.adapter={adapter}", f"paths.merged={merged}", *settings, stage="merge")
    )
    return root, metrics, adapter, merged, merge_metrics


def test_the_adapter_records_the_grid_it_was_trained_through(qat_run):
    _, metrics, adapter, _, _ = qat_run
    assert metrics["method"] == "qat" and metrics["steps"] == 12
    grid = json.loads((adapter / quantize.GRID_FILE).read_text())
    assert grid["bits"] == 4 and grid["block_size"] == 16


def test_training_through_the_rounding_moves_the_adapter_and_lowers_the_loss(qat_run):
    """Straight-through: the rounded forward still passes gradients to both LoRA matrices."""
    _, metrics, adapter, _, _ = qat_run
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any("lora_B" in name and tensors[name].abs().max() > 0 for name in tensors)  # B starts at zero
    root = adapter.parents[1]
    untrained = untrained_loss(root, data.read_jsonl(root / "prepared" / "train.jsonl")[:32])
    assert metrics["final_loss"] < untrained - 0.3, (metrics, untrained)


def test_merge_writes_every_linear_weight_on_the_grid(qat_run):
    """Each linear layer of the merged model is a fixed point of the builder's int4 quantizer, and the merged
    model computes what the quantization-aware adapter model computed."""
    _, _, _, merged, merge_metrics = qat_run
    tensors = load_file(merged / "model.safetensors")
    linears = [name for name in tensors if name.endswith("proj.weight") or name == "lm_head.weight"]
    assert len(linears) >= 4 and "lm_head.weight" in linears
    # the tiny Phi-3 is untied: its frozen embedding table is on the grid too, for the int4 Gather
    linears.append("model.embed_tokens.weight")
    for name in linears:
        weight = tensors[name].numpy()
        np.testing.assert_array_equal(quantize.fake_quantize(weight, 4, 16), weight, err_msg=name)
    assert json.loads((merged / quantize.GRID_FILE).read_text())["block_size"] == 16
    assert merge_metrics["max_abs_logit_diff"] < 1e-4 and merge_metrics["quantization_aware"]["block_size"] == 16


def test_eval_judges_the_adapter_as_it_trained_rounding_each_layer_once(qat_run, monkeypatch):
    """eval's adapter judge computes what the training forward computes (each LoRA layer through its rounded
    merged weight), with that weight rounded once at load, not again at every token."""
    import torch
    from peft import PeftModel

    from ortune import evaluation, modeling

    root, _, adapter, _, _ = qat_run
    judged = evaluation.load_generator("adapter", {"base": root / "base_model", "adapter": adapter}).model
    training = PeftModel.from_pretrained(modeling.load_causal_lm(root / "base_model"), str(adapter)).eval()
    quantize.make_quantization_aware(training, 16)
    rounded = quantize.round_to_grid
    calls = []
    monkeypatch.setattr(quantize, "round_to_grid", lambda *args, **kwargs: calls.append(1) or rounded(*args, **kwargs))
    ids = torch.tensor([[1, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        got = judged(ids).logits
        assert calls == []
        expected = training(ids).logits
    assert calls  # the training forward rounds at every call
    # w + (round(w) - w) against round(w): the straight-through sum's float error only
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.equal(
        got, PeftModel.from_pretrained(modeling.load_causal_lm(root / "base_model"), str(adapter))(ids).logits
    )


def test_rounding_in_slabs_of_rows_is_rounding_the_whole_weight():
    import torch

    weight = torch.randn(50, 40, generator=torch.Generator().manual_seed(2))
    expected = quantize.round_to_grid(weight, 16)
    quantize.round_in_place(weight, 16, rows=7)  # 7 slabs, the last one short
    assert torch.equal(weight, expected)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["onnx.block_size=256"], r"onnx builds int4 with block_size=256 \(train.qat.block_size=32\)"),
        (["onnx.block_size=32", "lora.dropout=0.1"], r"lora.dropout=0.1 cannot apply with train.method=qat"),
        (["onnx.block_size=32", "onnx.keep_float=[lm_head]"], r"onnx builds int4 with keep_float=\['lm_head'\]"),
        (
            [
                "onnx.block_size=32",
                "onnx.quantization=auto",
                "onnx.candidates=[{},{precision:int4,block_size:64},{precision:int8}]",
            ],
            r"onnx.candidates\[1\] builds int4 with block_size=64",
        ),
        (["onnx.block_size=32", "onnx.adapter=separate"], r"set onnx.adapter=merged"),
    ],
)
def test_settings_that_would_build_another_grid_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(OrtuneError, match=message) as caught:
        compose(tmp_path, "train.method=qat", "train.qat.block_size=32", "lora.dropout=0", *overrides, stage=None)
    assert "\n" not in str(caught.value)


def test_qat_with_int8_and_float_candidates_is_accepted(tmp_path):
    cfg = compose(
        tmp_path,
        "train.method=qat",
        "train.qat.block_size=32",
        "onnx.block_size=32",
        "lora.dropout=0",
        "onnx.quantization=auto",
        "onnx.candidates=[{},{precision:int8},{precision:fp32}]",
        stage=None,
    )
    assert cfg.train.method == "qat" and len(cfg.onnx.candidates) == 3


def test_a_merged_model_on_one_grid_is_not_built_on_another(tmp_path):
    """A merged model trained through block 16, built at block 32 by settings that do not say qat: refused."""
    (tmp_path / quantize.GRID_FILE).write_text(json.dumps(quantize.grid_record(16)))
    with pytest.raises(OrtuneError, match=r"trained through int4 block 16 .* set onnx.block_size=16"):
        quantize.check_grid(tmp_path, "int4", 32, "default", 0.0)
    quantize.check_grid(tmp_path, "int4", 16, "default", 0.0)
    quantize.check_grid(tmp_path, "int8", 32, "default", 0.0)  # int8 holds the rounded weights as they are


@pytest.mark.slow
def test_the_int4_build_computes_what_the_quantization_aware_model_computes(qat_run):
    """The builder's int4 model of a qat-merged model holds exactly its weights: with float activations
    (accuracy_level 1) its logits match PyTorch's within the fp32 target, as an fp32 export's do."""
    import build_onnx

    root, _, _, merged, _ = qat_run
    out = root / "qat" / "onnx"
    cfg = compose(
        root,
        f"paths.merged={merged}",
        f"paths.onnx={out}",
        f"paths.metrics={root / 'qat' / 'metrics'}",
        "train.method=qat",
        "train.qat.block_size=16",
        "onnx.block_size=16",
        "lora.dropout=0",
        "precision=int4",
        "onnx.accuracy_level=1",
        "onnx.parity_prompts=16",
        stage="build_onnx",
    )
    metrics = build_onnx.run(cfg)
    assert metrics["parity"]["label_agreement"] == 1.0
    assert metrics["parity"]["max_rel_logit_diff"] < 1e-3, metrics["parity"]
    assert "quantization-aware: the adapter trained through this int4 grid (block 16" in (out / "README.md").read_text()
