"""onnx.adapter=separate: what the builder makes of a LoRA adapter, and the runtime-switchable
adapters ortune ships instead (several on one base, each checked against PyTorch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import build_onnx
from export_helpers import REPO, make_project, stage_cfg, torch_logits
from ortune import export, modeling, onnx_adapters
from ortune.errors import OrtuneError
from ortune.generation import OnnxGenerator

PROMPTS = [
    "### Text: I finally got the job I wanted!\n### The tone is:\n",
    "### Text: There is a strange noise in the attic.\n### The tone is:\n",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_texts):
    return make_project(tmp_path_factory.mktemp("export-adapters"), tiny_texts, seed=7)


pytestmark = pytest.mark.usefixtures("in_repo")  # conftest: from the repository root


def test_the_builder_bakes_the_adapter_into_a_fixed_graph(project, tmp_path):
    """Finding (onnxruntime-genai 0.18): adapter_path yields base + LoRA paths as constants, equal to the
    merged model, and nothing og.Adapters can switch."""
    import onnx
    import onnxruntime as ort
    import onnxruntime_genai as og

    out = tmp_path / "baked"
    export.run_builder(
        project / "base_model", out, "fp32", "cpu", {}, log_file=tmp_path / "baked.log", adapter_dir=project / "adapter"
    )
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    lora = [i.name for i in graph.initializer if onnx_adapters.is_lora_tensor(i.name)]
    assert "model.layers.0.attn.q_proj.lora_A.MatMul.weight" in lora  # q/k/v unpacked, LoRA per projection
    assert not {i.name for i in graph.input} & set(lora)  # constants, not inputs
    for prompt in PROMPTS:
        assert np.abs(OnnxGenerator(out).last_logits(prompt) - torch_logits(project / "merged", prompt)).max() < 1e-4
    # an adapter file cannot override constants: genai rejects the parameter names at run time
    fmt = ort.AdapterFormat()
    fmt.set_parameters({lora[0]: ort.OrtValue.ortvalue_from_numpy(np.zeros((64, 8), np.float32))})
    fmt.export_adapter(str(tmp_path / "x.onnx_adapter"))
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    adapters.load(str(tmp_path / "x.onnx_adapter"), "x")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=32)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "x")
    with pytest.raises(Exception, match="Invalid input name"):
        generator.append_tokens(og.Tokenizer(model).encode("hello"))


@pytest.fixture(scope="module")
def separate_fp32(project):
    """Two adapters (r=8 with lm_head saved in full, r=4) on one fp32 base: three builds and parity x3 (~35 s)."""
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        metrics = build_onnx.run(
            stage_cfg(
                project,
                "precision=fp32",
                "onnx.adapter=separate",
                f"+onnx.extra_adapters.small={project / 'adapter_b'}",
                onnx_dir="onnx-separate",
            )
        )
    finally:
        os.chdir(cwd)
    return project / "onnx-separate", metrics


@pytest.mark.slow
def test_separate_build_ships_switchable_adapters_that_match_pytorch(project, separate_fp32):
    out, metrics = separate_fp32
    assert metrics["adapters"] == ["default", "small"]
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["default.onnx_adapter", "small.onnx_adapter"]
    task = json.loads((out / "ortune.json").read_text())
    assert task["active_adapter"] == "default" and set(task["adapters"]) == {"default", "small"}
    # parity after the build: each adapter against PyTorch base + that adapter, none against the bare base
    assert metrics["parity"]["passed"] and metrics["parity"]["max_abs_logit_diff"] <= 1e-4
    assert (
        metrics["adapter_parity"]["small"]["passed"]
        and metrics["adapter_parity"]["small"]["max_abs_logit_diff"] <= 1e-4
    )
    assert metrics["adapter_parity"]["(no adapter)"]["max_abs_logit_diff"] <= 1e-4

    generator = OnnxGenerator(out)  # activates ortune.json's adapter by default, as eval and the apps do
    assert generator.adapter == "default"
    base, a, b = project / "base_model", project / "adapter", project / "adapter_b"
    for prompt in PROMPTS:
        seen = {}
        for name, adapter_dir in (("default", a), ("small", b), (None, None)):
            generator.use_adapter(name)
            seen[name] = generator.last_logits(prompt)
            assert np.abs(seen[name] - torch_logits(base, prompt, adapter_dir)).max() < 1e-4, name
        assert (
            np.abs(seen["default"] - seen["small"]).max() > 1e-2 and np.abs(seen["default"] - seen[None]).max() > 1e-2
        )


@pytest.mark.slow
def test_lm_head_saved_in_full_is_an_adapter_tensor_with_the_base_as_default(separate_fp32):
    import onnx
    from onnx import numpy_helper

    out, _ = separate_fp32
    graph = onnx.load(str(out / "model.onnx")).graph
    inputs = {i.name for i in graph.input}
    assert "lm_head.MatMul.weight" in inputs  # modules_to_save=[lm_head] in the pipeline's adapter
    ranks = {i.name: numpy_helper.to_array(i).shape for i in graph.initializer if onnx_adapters.is_lora_tensor(i.name)}
    assert ranks and all(0 in shape for shape in ranks.values())  # empty LoRA pairs: no adapter = the base


@pytest.mark.slow
def test_quantized_separate_build_keeps_adapter_tensors_float(project):
    import onnx

    build_onnx.run(
        stage_cfg(
            project,
            "onnx.adapter=separate",
            "onnx.require_parity=false",
            "onnx.parity_prompts=4",
            onnx_dir="onnx-separate-int4",
        )
    )
    graph = onnx.load(str(project / "onnx-separate-int4" / "model.onnx"), load_external_data=False).graph
    ops = {n.name: n.op_type for n in graph.node}
    lora_ops = {op for name, op in ops.items() if "/lora_" in name and "MatMul" in name}
    assert lora_ops == {"MatMul"} and ops["/lm_head/MatMul"] == "MatMul"
    assert "MatMulNBits" in ops.values()  # the base projections are int4


@pytest.mark.slow
def test_an_int8_separate_build_quantizes_the_embedding_after_the_adapters_are_made_switchable(project):
    """The int8 embedding rewrite runs on the switchable graph: the lm_head the adapter saves stays an adapter
    input, and every adapter (and none) still matches PyTorch."""
    import onnx

    metrics = build_onnx.run(
        stage_cfg(
            project,
            "precision=int8",
            "onnx.adapter=separate",
            f"+onnx.extra_adapters.small={project / 'adapter_b'}",
            "onnx.parity_prompts=8",
            onnx_dir="onnx-separate-int8",
        )
    )
    assert metrics["int8_embedding"] == "own_blocks" and metrics["parity"]["passed"], metrics
    assert all(r["label_agreement"] == 1.0 for r in metrics["adapter_parity"].values()), metrics["adapter_parity"]
    graph = onnx.load(str(project / "onnx-separate-int8" / "model.onnx"), load_external_data=False).graph
    assert "lm_head.MatMul.weight" in {i.name for i in graph.input}
    assert {n.op_type for n in graph.node if n.name.startswith("/model/embed_tokens/")} == {"GatherBlockQuantized"}


def test_an_adapter_on_other_modules_cannot_share_the_base(project, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        modeling.load_causal_lm(project / "base_model"),
        LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    model.save_pretrained(tmp_path / "mlp_adapter")
    with pytest.raises(OrtuneError, match="must target the same modules"):
        build_onnx.run(
            stage_cfg(
                project,
                "precision=fp32",
                "onnx.adapter=separate",
                f"+onnx.extra_adapters.mlp={tmp_path / 'mlp_adapter'}",
                onnx_dir="onnx-mismatch",
            )
        )
    assert not (project / "onnx-mismatch").exists()


def test_extra_adapters_need_separate_mode_and_identifier_names():
    from ortune import config

    for overrides, needle in (
        (["+onnx.extra_adapters.x=/tmp"], "onnx.adapter=separate"),
        (["onnx.adapter=separate", "+onnx.extra_adapters.default=/tmp"], "identifiers other than"),
    ):
        with pytest.raises(OrtuneError, match=needle):
            config.validate(config.compose(overrides, config_dir=REPO / "conf"), "t")
