"""The export settings against the real builder: valid pairs, option names, the options' effect on
the graph, every pair built here, the LM-head fix, and the runtime settings written beside the model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from export_helpers import REPO, TINY, stage_cfg
from ortune import builder_spec, config, export, modeling
from ortune.errors import OrtuneError


def onnx_graph(model_dir: Path):
    import onnx

    return onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph


def nodes(model_dir: Path) -> dict[str, str]:
    return {node.name: node.op_type for node in onnx_graph(model_dir).node}


def attribute(model_dir: Path, node_name: str, attr: str):
    import onnx

    node = next(n for n in onnx_graph(model_dir).node if n.name == node_name)
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == attr)


def build(model_dir: Path, out: Path, precision: str, provider: str = "cpu", *overrides: str, options=None) -> Path:
    if options is None:
        onnx_cfg = config.validate(
            config.compose(
                ["model=tiny-phi3", f"precision={precision}", f"onnx.execution_provider={provider}", *overrides],
                config_dir=REPO / "conf",
            ),
            "t",
        ).onnx
        options = export.builder_options(precision, onnx_cfg)
    opts = options
    export.run_builder(model_dir, out, precision, provider, opts, log_file=out.parent / f"{out.name}.log")
    return out


# ---------------------------------------------------------------- valid pairs


def readme_pairs() -> dict[str, dict[str, str]]:
    """docs/export.md's precision x provider table: {precision: {provider: cell}}."""
    text = (REPO / "docs/export.md").read_text(encoding="utf-8")
    header = "| precision | cpu | cuda | dml | webgpu |"
    assert header in text
    rows = {}
    for line in text.split(header, 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(builder_spec.PROVIDERS, cells[1:]))
    return rows


def test_valid_pairs_come_from_the_builder_and_match_the_readme_table():
    spec = builder_spec.read_spec()
    # what onnxruntime-genai 0.18 prints as valid, restricted to the providers ortune targets
    assert spec.valid_pairs == {
        "fp32": ("cpu", "cuda"),
        "fp16": ("cuda", "dml"),
        "bf16": ("cuda",),
        "int8": ("cpu", "cuda", "webgpu"),
        "int4": ("cpu", "cuda", "dml", "webgpu"),
    }
    table = readme_pairs()
    assert set(table) == set(config.PRECISIONS)
    for precision, cells in table.items():
        for provider, cell in cells.items():
            valid = provider in spec.valid_pairs.get(precision, ())
            assert (cell != "–") == valid, (precision, provider, cell)
            assert cell.startswith("refused") == ((precision, provider) in export.BROKEN_PAIRS), (precision, provider)


@pytest.mark.parametrize("pair", [("fp16", "cpu"), ("bf16", "dml"), ("int8", "dml"), ("fp32", "webgpu")])
def test_invalid_pair_fails_at_config_load_listing_the_valid_pairs(pair):
    precision, provider = pair
    with pytest.raises(OrtuneError) as caught:
        config.validate(
            config.compose(
                ["model=tiny-phi3", f"precision={precision}", f"onnx.execution_provider={provider}"],
                config_dir=REPO / "conf",
            ),
            "t",
        )
    message = str(caught.value)
    assert f"precision={precision} with onnx.execution_provider={provider}" in message and "\n" not in message
    assert (
        "valid pairs: fp32: cpu, cuda; fp16: cuda, dml; bf16: cuda; "
        "int8: cpu, cuda, webgpu; int4: cpu, cuda, dml, webgpu" in message
    )


def test_invalid_pair_stops_the_stage_before_any_work(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DVC_STAGE", None)
    paths = [
        f"paths.{name}={tmp_path / name}"
        for name in ("base_model", "prepared", "adapter", "merged", "onnx", "metrics", "plots")
    ]
    done = subprocess.run(
        [sys.executable, "scripts/build_onnx.py", "precision=fp16", *paths],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and "valid pairs:" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing built, nothing written


def test_fp32_cuda_is_refused_up_front():
    with pytest.raises(OrtuneError, match="fp16 or bf16"):
        config.validate(
            config.compose(
                ["model=tiny-phi3", "precision=fp32", "onnx.execution_provider=cuda"], config_dir=REPO / "conf"
            ),
            "t",
        )


@pytest.mark.slow
def test_fp32_cuda_is_refused_because_the_builder_still_emits_a_broken_graph(tiny_model, tmp_path):
    # the reason still holds: drop the BROKEN_PAIRS entry when this test starts failing
    out = build(tiny_model, tmp_path / "fp32-cuda", "fp32", "cuda", options={})
    with pytest.raises(OrtuneError, match="invalid graph.*present"):
        export.check_graph(out)


# ---------------------------------------------------------------- option names


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("int4_block_size", "deprecated builder option.*use 'block_size'"),
        ("int4_algo_config", "deprecated builder option.*use 'algo_config'"),
        ("use_8bits_moe", "deprecated builder option.*use 'moe_quant_type'"),
        ("blocksize", "not an option of the installed builder; did you mean block_size"),
        ("no_such_option", "not an option of the installed builder"),
        ("block_size", "set through onnx.block_size"),
        ("exclude_lm_head", "deletes lm_head.*onnx.keep_float"),
    ],
)
def test_unknown_deprecated_or_managed_builder_options_are_errors(name, needle):
    with pytest.raises(OrtuneError) as caught:
        config.validate(
            config.compose(["model=tiny-phi3", f"+onnx.extra_options.{name}=64"], config_dir=REPO / "conf"), "t"
        )
    message = str(caught.value)
    assert f"onnx.extra_options.{name}" in message and re.search(needle, message) and "\n" not in message


def test_real_builder_options_pass_through():
    cfg = config.validate(
        config.compose(
            [
                "model=tiny-phi3",
                "precision=int4",
                "onnx.execution_provider=cuda",
                "+onnx.extra_options.enable_cuda_graph=1",
            ],
            config_dir=REPO / "conf",
        ),
        "t",
    )
    assert export.builder_options("int4", cfg.onnx)["enable_cuda_graph"] == "1"


def test_option_names_are_read_from_the_builders_help_text():
    spec = builder_spec.read_spec()
    for name in (
        "block_size",
        "accuracy_level",
        "algo_config",
        "op_types_to_quantize",
        "nodes_to_exclude",
        "matmul_mixed_precision",
        "adapter_path",
    ):
        assert name in spec.options, name
    assert spec.replacement("int4_block_size") == "block_size" and spec.replacement("block_size") is None
    assert spec.deprecated["disable_qkv_fusion"] == "fuse_qkv"


@pytest.mark.slow
def test_the_builder_silently_ignores_the_deprecated_alias(tiny_model, tmp_path):
    """Why ortune rejects `int4_block_size`: the builder builds without complaint and uses block 32."""
    out = build(tiny_model, tmp_path / "alias", "int4", options={"int4_block_size": "128"})
    assert attribute(out, "/model/layers.0/attn/qkv_proj/MatMul_Q4", "block_size") == 32


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            (),
            {
                "block_size": "256",
                "accuracy_level": "4",
                "algo_config": "default",
                "op_types_to_quantize": "MatMul/Gather",
                "fuse_mlp_gate_up": "true",
            },
        ),
        (
            ("onnx.quantize_ops=[MatMul]",),
            {
                "block_size": "256",
                "accuracy_level": "4",
                "algo_config": "default",
                "op_types_to_quantize": "MatMul",
                "fuse_mlp_gate_up": "true",
            },
        ),
        (
            (
                "onnx.block_size=128",
                "onnx.accuracy_level=0",
                "onnx.algorithm=default",
                "onnx.quantize_ops=[MatMul,Gather]",
                "onnx.keep_float=[lm_head,embeddings]",
            ),
            {
                "block_size": "128",
                "algo_config": "default",
                "op_types_to_quantize": "MatMul/Gather",
                "nodes_to_exclude": "/lm_head/MatMul,/model/embed_tokens/Gather",
                "fuse_mlp_gate_up": "true",
            },
        ),
        (
            ("onnx.last_matmul_int8=true",),
            {
                "block_size": "256",
                "accuracy_level": "4",
                "algo_config": "default",
                "op_types_to_quantize": "MatMul/Gather",
                "matmul_mixed_precision": "last_matmul:int8",
                "fuse_mlp_gate_up": "true",
            },
        ),
    ],
)
def test_quantization_settings_map_to_builder_options(overrides, expected):
    cfg = config.validate(config.compose(["model=tiny-phi3", *overrides], config_dir=REPO / "conf"), "t")
    assert export.builder_options("int4", cfg.onnx) == expected
    # float precisions take no quantization options, only onnx.extra_options (default: fuse_mlp_gate_up)
    assert export.builder_options("fp32", cfg.onnx) == {"fuse_mlp_gate_up": "true"}


# ---------------------------------------------------------------- the options reach the graph


def test_block_size_algorithm_and_quantized_ops_reach_the_graph(tiny_model, tmp_path):
    out = build(
        tiny_model,
        tmp_path / "b64",
        "int4",
        "cpu",
        "onnx.block_size=64",
        "onnx.algorithm=default",
        "onnx.quantize_ops=[MatMul,Gather]",
    )
    ops = nodes(out)
    matmuls = [name for name, op in ops.items() if op == "MatMulNBits"]
    assert matmuls and all(attribute(out, name, "block_size") == 64 for name in matmuls)
    assert any(op == "GatherBlockQuantized" for op in ops.values())  # embeddings quantized (Gather)
    assert "/lm_head/MatMul_Q4" in ops or any("lm_head" in n and op == "MatMulNBits" for n, op in ops.items())


def test_keep_float_leaves_lm_head_and_embeddings_unquantized(tiny_model, tmp_path):
    out = build(
        tiny_model,
        tmp_path / "keep",
        "int4",
        "cpu",
        "onnx.quantize_ops=[MatMul,Gather]",
        "onnx.keep_float=[lm_head,embeddings]",
        "onnx.algorithm=default",
    )
    ops = nodes(out)
    assert ops["/lm_head/MatMul"] == "MatMul" and ops["/model/embed_tokens/Gather"] == "Gather"
    assert "GatherBlockQuantized" not in ops.values() and "MatMulNBits" in ops.values()


@pytest.mark.slow
def test_algorithm_changes_the_quantized_weights(tiny_model, tmp_path):
    import onnx
    from onnx import numpy_helper

    def weights(out):
        model = onnx.load(str(out / "model.onnx"))
        return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if "lm_head" in i.name}

    rtn = weights(build(tiny_model, tmp_path / "rtn", "int4", "cpu", "onnx.algorithm=rtn", "onnx.block_size=32"))
    k_quant = weights(build(tiny_model, tmp_path / "kq", "int4", "cpu", "onnx.algorithm=k_quant", "onnx.block_size=32"))
    common = rtn.keys() & k_quant.keys()
    assert common and any(name.endswith("_Q4G32") for name in common)  # both are algorithm-config quantizations
    assert any(not (rtn[name] == k_quant[name]).all() for name in common)  # that round differently


def test_null_quantize_ops_quantize_the_embeddings_wherever_they_can_be():
    """The default (null) adds Gather where it is quantized: by the builder at int4 with algorithm default, by
    ortune after the build at int8 (the builder's quantizer takes Gather at 4 bits only, so it is not asked);
    an auto candidate list with an int8 fallback, or a k_quant build, is not refused for a setting nobody made."""
    conf = REPO / "conf"
    for precision, algorithm, ops, ortune_int8 in (
        ("int4", "default", "MatMul/Gather", False),
        ("int4", "k_quant", "MatMul", False),
        ("int8", "default", "MatMul", True),
        ("int8", "rtn", "MatMul", True),
    ):
        overrides = ["model=tiny-phi3", f"precision={precision}", f"onnx.algorithm={algorithm}"]
        cfg = config.validate(config.compose(overrides, config_dir=conf), "t")
        assert cfg.onnx.quantize_ops is None
        assert export.builder_options(precision, cfg.onnx)["op_types_to_quantize"] == ops, (precision, algorithm)
        assert export.quantizes_int8_embedding(precision, cfg.onnx) is ortune_int8
    # an auto candidate list whose fallback is int8 (SmolLM2's, Gemma's) validates with the default
    config.validate(config.compose(["model=smollm2-135m", "onnx.quantization=auto"], config_dir=conf), "t")
    # int8 embeddings kept float on request, by leaving Gather out, or on a provider whose kernel is unchecked
    for keep in (["onnx.keep_float=[embeddings]"], ["onnx.quantize_ops=[MatMul]"], ["onnx.execution_provider=cuda"]):
        cfg = config.validate(config.compose(["model=tiny-phi3", "precision=int8", *keep], config_dir=conf), "t")
        assert not export.quantizes_int8_embedding("int8", cfg.onnx), keep
    with pytest.raises(OrtuneError, match="onnx.keep_float lists embeddings"):
        overrides = ["model=tiny-phi3", "onnx.algorithm=k_quant", "onnx.keep_float=[embeddings]"]
        config.validate(config.compose(overrides, config_dir=conf), "t")


def test_gather_needs_the_default_algorithm():
    with pytest.raises(OrtuneError, match="onnx.algorithm=default"):
        config.validate(
            config.compose(
                ["model=tiny-phi3", "onnx.quantize_ops=[MatMul,Gather]", "onnx.algorithm=k_quant"],
                config_dir=REPO / "conf",
            ),
            "t",
        )
    # at int8 ortune quantizes the embeddings itself, whatever the algorithm
    cfg = config.validate(
        config.compose(
            ["model=tiny-phi3", "precision=int8", "onnx.quantize_ops=[MatMul,Gather]", "onnx.algorithm=k_quant"],
            config_dir=REPO / "conf",
        ),
        "t",
    )
    assert export.quantizes_int8_embedding("int8", cfg.onnx)


@pytest.mark.slow
def test_gather_needs_the_default_algorithm_because_the_builder_ignores_it_otherwise(tiny_model, tmp_path):
    out = build(
        tiny_model,
        tmp_path / "kq-gather",
        "int4",
        options={"algo_config": "k_quant", "op_types_to_quantize": "MatMul/Gather"},
    )
    assert "GatherBlockQuantized" not in nodes(out).values()  # the reason: drop the check when this fails


def onnx_settings(*overrides: str):
    return config.validate(config.compose(["model=tiny-phi3", *overrides], config_dir=REPO / "conf"), "t").onnx


def test_k_quant_with_an_odd_block_count_is_refused_before_building(tiny_model):
    # this tiny model: hidden 64 (qkv, gate/up, lm_head inputs) -> one 64-block, odd; down_proj 128 -> two
    with pytest.raises(OrtuneError, match=r"onnx.block_size=64: .* input width 64, 1 blocks .* one of \[16, 32\]"):
        export.check_k_quant_blocks(tiny_model, "int4", onnx_settings("onnx.algorithm=k_quant", "onnx.block_size=64"))
    export.check_k_quant_blocks(tiny_model, "int4", onnx_settings("onnx.algorithm=k_quant", "onnx.block_size=32"))
    export.check_k_quant_blocks(tiny_model, "int8", onnx_settings("onnx.algorithm=k_quant", "onnx.block_size=64"))
    export.check_k_quant_blocks(tiny_model, "int4", onnx_settings("onnx.algorithm=default", "onnx.block_size=64"))
    assert export.linear_input_widths(tiny_model)["model.layers.0.mlp.down_proj.weight"] == 128


@pytest.mark.slow
def test_k_quant_check_matches_what_the_builder_really_does(tiny_model, tmp_path):
    # the reason for check_k_quant_blocks: drop the check when the first build stops failing
    options = export.builder_options("int4", onnx_settings("onnx.algorithm=k_quant", "onnx.block_size=64"))
    with pytest.raises(OrtuneError, match="builder failed"):
        export.run_builder(tiny_model, tmp_path / "kq64", "int4", "cpu", options, log_file=tmp_path / "kq64.log")
    assert "cannot reshape" in (tmp_path / "kq64.log").read_text()
    out = build(tiny_model, tmp_path / "kq32", "int4", "cpu", "onnx.algorithm=k_quant", "onnx.block_size=32")
    assert "MatMulNBits" in nodes(out).values()


def test_last_matmul_int8_quantizes_lm_head_to_8_bits(tiny_model, tmp_path):
    out = build(tiny_model, tmp_path / "last8", "int4", "cpu", "onnx.last_matmul_int8=true")
    bits = {name: attribute(out, name, "bits") for name, op in nodes(out).items() if op == "MatMulNBits"}
    assert {b for n, b in bits.items() if "lm_head" in n} == {8}
    assert {b for n, b in bits.items() if "lm_head" not in n} == {4}


# ---------------------------------------------------------------- every pair, and the LM-head fix


@pytest.mark.slow
@pytest.mark.parametrize(
    "pair",
    [
        (p, e)
        for p, eps in builder_spec.read_spec().valid_pairs.items()
        for e in eps
        if (p, e) not in export.BROKEN_PAIRS
    ],
)
def test_every_valid_pair_builds_on_this_cpu_machine(pair, tiny_model, tmp_path):
    from ortune import parity
    from ortune.generation import OnnxGenerator

    precision, provider = pair
    out = build(tiny_model, tmp_path / f"{precision}-{provider}", precision, provider)
    export.check_graph(out)
    genai = json.loads((out / "genai_config.json").read_text())
    providers = [next(iter(p)) for p in genai["model"]["decoder"]["session_options"]["provider_options"]]
    assert providers == ([] if provider == "cpu" else [provider])
    if pair == ("bf16", "cuda"):
        assert "MatMul" in parity.runnable_on_cpu(out)  # no CPU kernel: parity is reported as not measured
        return
    result = OnnxGenerator(out, cpu=True).generate("### Text: I won!\n### The tone is:\n", 3)
    assert result.new_tokens >= 1


def test_builder_lm_head_bug_and_the_shims_fix(tmp_path, tiny_texts):
    """A Phi-3 whose fused gate_up_proj is as wide as the vocabulary (2 * 300 == 600): the plain builder
    wires the MLP in as the LM head; through ortune.builder_shim the logits match PyTorch."""
    import numpy as np
    import torch

    from ortune.generation import OnnxGenerator

    tiny = OmegaConf.merge(TINY, {"intermediate_size": 300, "vocab_size": 600})
    modeling.build_tiny_phi3(tiny, tiny_texts, seed=3, out_dir=tmp_path / "hf")
    tokenizer = modeling.load_tokenizer(tmp_path / "hf")
    assert len(tokenizer) == 2 * tiny.intermediate_size
    prompt = "### Text: The dog ran away\n### The tone is:\n"
    with torch.no_grad():
        expected = (
            modeling.load_causal_lm(tmp_path / "hf")(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].numpy()
        )
    plain = tmp_path / "plain"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(tmp_path / "hf"),
            "-o",
            str(plain),
            "-p",
            "fp32",
            "-e",
            "cpu",
            "-c",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    # the bug: drop ortune.builder_shim when this assertion starts failing
    assert np.abs(OnnxGenerator(plain).last_logits(prompt) - expected).max() > 1e-2
    fixed = build(tmp_path / "hf", tmp_path / "fixed", "fp32", options={})
    assert np.abs(OnnxGenerator(fixed).last_logits(prompt) - expected).max() < 1e-4


# ---------------------------------------------------------------- runtime settings


def test_genai_config_gets_all_cores_and_greedy_search(tiny_model, tmp_path):
    out = build(tiny_model, tmp_path / "fp32", "fp32", options={})
    from ortune.generation import OnnxGenerator

    # 0: every core of the machine that runs the model (onnxruntime's default), not the builder's count
    assert export.tune_genai_config(out, 0) == 0
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0
    assert OnnxGenerator(out).generate("hello", 2).new_tokens >= 1  # genai accepts it
    assert genai["model"]["decoder"]["session_options"][export.SPIN_KEY] == export.SPIN_US  # read by onnxruntime
    assert genai["search"]["do_sample"] is False and genai["search"]["num_beams"] == 1 and genai["search"]["top_k"] == 1
    export.tune_genai_config(out, 1)
    assert (
        json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["session_options"][
            "intra_op_num_threads"
        ]
        == 1
    )


def test_max_new_tokens_is_the_longest_label_plus_the_end_token():
    def encode(text):
        return text.split()  # one token per word

    rows = [
        {"prompt_text": "text is: ", "completion_text": "joy"},
        {"prompt_text": "text is: ", "completion_text": "very sad indeed"},
    ]
    assert export.max_new_tokens(rows, encode) == 4


def test_stage_reads_only_declared_params():
    cfg = stage_cfg(Path("/tmp/unused"))
    assert cfg.onnx.algorithm and cfg.data.template.prompt and cfg.model.name
    with pytest.raises(AttributeError):
        _ = cfg.lora
