"""The build_onnx stage end to end on a tiny project: what it ships beside the model (ortune.json,
genai_config.json, the model card), parity with PyTorch after every build, and its gate."""

from __future__ import annotations

import json

import pytest

import build_onnx
from export_helpers import REPO, make_project, stage_cfg
from ortune import data, export, parity
from ortune.errors import OrtuneError
from ortune.model_card import sha256


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_texts):
    return make_project(tmp_path_factory.mktemp("export-stage"), tiny_texts)


pytestmark = pytest.mark.usefixtures("in_repo")  # conftest: from the repository root


def test_fp32_build_matches_pytorch_to_rounding(project):
    metrics = build_onnx.run(stage_cfg(project, "precision=fp32", onnx_dir="onnx-fp32"))
    result = metrics["parity"]
    assert result["prompts"] == 16 and result["passed"] is True
    assert result["max_rel_logit_diff"] <= parity.FP32_REL_TOLERANCE and result["label_agreement"] == 1.0
    assert result["target"] == "max_rel_logit_diff <= 0.001"


@pytest.mark.parametrize("adapter", [None, "adapter"])
def test_the_torch_reference_projects_only_the_last_position_with_the_full_forwards_logits(project, adapter):
    import numpy as np
    import torch

    folder = project / ("base_model" if adapter else "merged")
    reference = parity.TorchReference(folder, project / adapter if adapter else None)
    prompt = data.read_jsonl(project / "prepared" / "validation.jsonl")[0]["prompt"]
    ids = reference.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        every_position = reference.model(**ids).logits
    assert every_position.shape[1] == ids["input_ids"].shape[1] > 1
    assert reference._last_only == {"logits_to_keep": 1}  # Phi-3 in transformers takes it: the fast path is tested
    np.testing.assert_allclose(reference.last_logits(prompt), every_position[0, -1].numpy(), rtol=0, atol=1e-5)


def test_int4_build_ships_task_file_runtime_settings_and_model_card(project):
    cfg = stage_cfg(project, "onnx.require_parity=false", "onnx.parity_prompts=8", onnx_dir="onnx-int4")
    metrics = build_onnx.run(cfg)
    out = project / "onnx-int4"
    # parity measured on 8 prompts: label agreement for int4 (a random model has no target to meet here),
    # recounted here from both runtimes' own greedy answers (transformers, onnxruntime-genai)
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ortune.metrics import parse_label

    prompts = [row["prompt"] for row in data.read_jsonl(project / "prepared" / "validation.jsonl")][:8]
    answer_tokens = json.loads((out / "ortune.json").read_text())["max_new_tokens"]
    labels = json.loads((project / "prepared" / "labels.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(project / "merged", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(project / "merged")
    onnx_model = og.Model(str(out))
    onnx_tokenizer = og.Tokenizer(onnx_model)
    agree = 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            torch_ids = merged.generate(**ids, max_new_tokens=answer_tokens, do_sample=False)[
                0, ids["input_ids"].shape[1] :
            ]
        search = og.GeneratorParams(onnx_model)
        prompt_ids = onnx_tokenizer.encode(prompt)
        search.set_search_options(do_sample=False, max_length=len(prompt_ids) + answer_tokens)
        generator, onnx_ids = og.Generator(onnx_model, search), []
        generator.append_tokens(prompt_ids)
        while not generator.is_done():
            generator.generate_next_token()
            onnx_ids.append(int(generator.get_next_tokens()[0]))
        del generator
        agree += parse_label(tokenizer.decode(torch_ids, skip_special_tokens=True), labels) == parse_label(
            onnx_tokenizer.decode(onnx_ids), labels
        )
    assert metrics["parity"]["prompts"] == 8 and metrics["parity"]["label_agreement"] == agree / 8
    assert metrics["parity"]["target"] == "label_agreement >= 0.95"  # the tiny model's gate (conf/model/tiny-phi3.yaml)
    assert metrics["builder_options"]["algo_config"] == "default" and metrics["precision"] == "int4"
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0  # the running machine's cores
    assert genai["search"]["do_sample"] is False and genai["search"]["top_k"] == 1
    task = json.loads((out / "ortune.json").read_text())
    labels = json.loads((project / "prepared" / "labels.json").read_text())
    assert task["labels"] == labels and task["format"] == "text" and task["input_field"] == "phrase"
    assert task["prompt_template"] == "### Text: {phrase}\n### The tone is:\n"
    assert task["max_new_tokens"] == metrics["max_new_tokens"] >= 2 and task["adapters"] == {}
    card = (out / "README.md").read_text()
    assert "tiny-phi3" in card and sha256(REPO / "data/raw/tones.jsonl") in card
    assert "| precision | `int4` |" in card and "algo_config=default" in card and "| model | 8 |" in card
    assert not list(project.glob(".onnx-int4*"))  # no scratch or builder cache left beside the output


def test_an_int8_build_quantizes_the_embedding_lookup_too(project, monkeypatch):
    """The builder leaves an int8 model's embedding float32; build_onnx gives it 8-bit blocks of its own (the
    tiny Phi-3 is untied), and parity is measured on the graph it ships."""
    import onnx

    from ortune import modeling

    loaded, load = [], modeling.load_tokenizer
    monkeypatch.setattr(modeling, "load_tokenizer", lambda path, *a: loaded.append(str(path)) or load(path, *a))
    metrics = build_onnx.run(stage_cfg(project, "precision=int8", "onnx.parity_prompts=8", onnx_dir="onnx-int8"))
    assert loaded == [str(project / "merged")]  # once for the answer length and the parity reference (3 s on Gemma)
    assert metrics["int8_embedding"] == "own_blocks" and metrics["parity"]["passed"], metrics
    graph = onnx.load(str(project / "onnx-int8" / "model.onnx"), load_external_data=False).graph
    lookup = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    assert next(a.i for a in lookup.attribute if a.name == "bits") == 8
    float_table = 600 * 64 * 4 / 1e6  # the tiny Phi-3's vocabulary x hidden, float32
    assert 0 < export.size_by_part(project / "onnx-int8")["embedding_mb"] < 0.3 * float_table
    assert "int8 blocks of its own" in (project / "onnx-int8" / "README.md").read_text()  # the card says so


def test_max_new_tokens_fits_the_longest_label_plus_the_end_token(project):
    from ortune.modeling import load_tokenizer

    tokenizer = load_tokenizer(project / "merged")
    rows = data.read_jsonl(project / "prepared" / "validation.jsonl") + data.read_jsonl(
        project / "prepared" / "train.jsonl"
    )
    longest = max(
        len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) - len(tokenizer(r["prompt"])["input_ids"])
        for r in rows
    )
    task = json.loads((project / "onnx-int4" / "ortune.json").read_text())
    assert task["max_new_tokens"] == longest + 1


def test_a_missed_parity_target_fails_the_stage_and_ships_nothing(project, monkeypatch):
    monkeypatch.setattr(parity, "FP32_REL_TOLERANCE", 0.0)
    with pytest.raises(
        OrtuneError, match="parity with PyTorch: model: max_rel_logit_diff <= 0 missed.*require_parity=false"
    ):
        build_onnx.run(stage_cfg(project, "precision=fp32", "onnx.parity_prompts=2", onnx_dir="onnx-gated"))
    assert not (project / "onnx-gated").exists()


def test_the_advice_on_a_missed_target_fits_the_precision():
    # fp32 rounds nothing: a miss is an export bug to report, and no quantization setting can fix it
    fp32 = parity.advice("fp32", "models/onnx.build*.log")
    assert "export bug" in fp32 and "ORTUNE_DEBUG=1" in fp32 and "models/onnx.build*.log" in fp32
    assert "quantize" not in fp32 and "keep_float" not in fp32
    int4 = parity.advice("int4", "x")
    assert "quantize less" in int4 and "onnx.keep_float=[lm_head]" in int4 and "onnx.block_size" in int4
    assert "precision=int8" in int4 and "export bug" not in int4
    int8 = parity.advice("int8", "x")
    assert "precision=fp32" in int8 and "precision=int8" not in int8 and "last_matmul_int8" not in int8
    assert "precision=fp32" in parity.advice("fp16", "x") and "keep_float" not in parity.advice("fp16", "x")


@pytest.mark.parametrize(("precision", "provider"), [("int4", "cuda"), ("bf16", "cuda")])
def test_non_cpu_builds_are_checked_on_the_cpu_or_reported_unmeasured(project, precision, provider):
    name = f"onnx-{precision}-{provider}"
    metrics = build_onnx.run(
        stage_cfg(
            project,
            f"precision={precision}",
            f"onnx.execution_provider={provider}",
            "onnx.require_parity=false",
            "onnx.parity_prompts=4",
            onnx_dir=name,
        )
    )
    genai = json.loads((project / name / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["provider_options"][0].keys() == {provider}
    if precision == "bf16":
        assert metrics["parity"]["passed"] is None and "no CPU kernel" in metrics["parity"]["skipped"]
        assert "not run" in (project / name / "README.md").read_text()
    else:
        assert metrics["parity"]["prompts"] == 4 and metrics["logits_dtype"] == "float16"


def test_label_agreement_counts_equal_labels_and_judges_against_the_setting():
    import numpy as np

    from ortune.generation import Generation

    class Fake:
        def __init__(self, texts, logits):
            self.texts, self.logits = iter(texts), logits

        def last_logits(self, prompt):
            return self.logits

        def generate(self, prompt, max_new_tokens):
            return Generation(next(self.texts), 2, 0.0)

        def generations(self, prompts, max_new_tokens):
            return list(self.texts)

    labels = ["joy", "fear"]
    torch_side = Fake(["joy", "fear", "Fear!", "gibberish"], np.zeros(3))
    onnx_side = Fake(["joy", "joy", "fear", "more gibberish"], np.array([0.0, 0.5, -0.25]))
    result = parity.compare(torch_side, onnx_side, ["a", "b", "c", "d"], labels, 2, "int4", 0.75)
    assert result["label_agreement"] == 0.75 and result["passed"] is True  # unparsed == unparsed counts
    assert result["max_abs_logit_diff"] == 0.5 and result["onnx_unparsed"] == 1
    assert (
        parity.compare(Fake(["joy"], np.zeros(3)), Fake(["fear"], np.zeros(3)), ["a"], labels, 2, "int8", 0.98)[
            "passed"
        ]
        is False
    )
    logits = np.array([-2.0, 0.0, 2.0, 0.0])  # standard deviation sqrt(2)
    fp32 = parity.compare(
        Fake(["joy"], logits), Fake(["fear"], logits + [0, 0, 1e-4, 0]), ["a"], labels, 2, "fp32", 0.98
    )
    assert fp32["passed"] is True and fp32["target"] == "max_rel_logit_diff <= 0.001"  # fp32 is judged on logits
    assert fp32["max_abs_logit_diff"] == pytest.approx(1e-4) and fp32["max_rel_logit_diff"] == pytest.approx(
        1e-4 / 2**0.5
    )


@pytest.mark.parametrize(("scale", "passed"), [(1.0, True), (1000.0, True), (0.01, False)])
def test_fp32_logits_are_judged_relative_to_their_spread(scale, passed):
    """The same relative rounding error passes at any logit size (an absolute bound failed the large ones);
    a difference of 1e-4 on logits spread by only 0.014 is 0.007 of them: not rounding."""
    import numpy as np

    from ortune.generation import Generation

    class Fake:
        def __init__(self, logits):
            self.logits = logits

        def last_logits(self, prompt):
            return self.logits

        def generate(self, prompt, max_new_tokens):
            return Generation("joy", 1, 0.0)

        def generations(self, prompts, max_new_tokens):
            return ["joy"] * len(prompts)

    torch_logits = scale * np.array([-2.0, 0.0, 2.0, 0.0])
    onnx_logits = torch_logits + np.array([0.0, 0.0, 5e-5 * scale if scale >= 1 else 1e-4, 0.0])
    result = parity.compare(Fake(torch_logits), Fake(onnx_logits), ["a"], ["joy"], 2, "fp32", 0.98)
    assert result["passed"] is passed and result["label_agreement"] == 1.0


def _variant(project, name: str, config: dict | None = None, weights=None):
    """A copy of the merged model with its config or weights changed, and the fp32 graph built from it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ortune import export

    folder = project / f"merged-{name}"
    if not folder.exists():
        shutil.copytree(project / "merged", folder)
        if config:
            path = folder / "config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        if weights:
            tensors = load_file(folder / "model.safetensors")
            weights(tensors)
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (project / f"onnx-{name}").mkdir()
        export.run_builder(folder, project / f"onnx-{name}", "fp32", "cpu", {}, log_file=project / f"onnx-{name}.log")
    return folder, project / f"onnx-{name}"


def _nudge(name: str, size: float):
    """One weight tensor moved by `size` times its own spread, seeded: an export that misread one tensor."""

    def edit(tensors):
        import torch

        noise = torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(0))
        tensors[name] = tensors[name] + size * tensors[name].std() * noise

    return edit


def _fp32_parity(reference_dir, onnx_dir, project, prompts: int = 8) -> dict:
    from ortune.generation import OnnxGenerator

    rows = data.read_jsonl(project / "prepared" / "validation.jsonl")[:prompts]
    labels = json.loads((project / "prepared" / "labels.json").read_text())
    return parity.compare(
        parity.TorchReference(reference_dir),
        OnnxGenerator(onnx_dir),
        [r["prompt"] for r in rows],
        labels,
        4,
        "fp32",
        0.98,
    )


@pytest.mark.slow
def test_an_fp32_graph_with_wrong_weights_fails_the_stage_with_the_export_bug_advice(project, monkeypatch):
    """One attention tensor of the merged model off by 1e-4 of its spread in the graph: no label
    changes, and the relative logit check fails it."""
    from ortune import export

    wrong, _ = _variant(project, "nudged-attention", weights=_nudge("model.layers.0.self_attn.qkv_proj.weight", 1e-4))
    build = export.run_builder
    monkeypatch.setattr(export, "run_builder", lambda model_dir, *args, **kw: build(wrong, *args, **kw))
    with pytest.raises(
        OrtuneError,
        match=r"max_rel_logit_diff <= 0.001 missed \(1.000 agreement.*export bug.*"
        r"onnx-wrong.build\*.log.*ORTUNE_DEBUG=1",
    ) as caught:
        build_onnx.run(stage_cfg(project, "precision=fp32", "onnx.parity_prompts=8", onnx_dir="onnx-wrong"))
    assert "quantize" not in str(caught.value)
    assert not (project / "onnx-wrong").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("one-layer-short", {"num_hidden_layers": 1}),  # the graph drops the last layer
        (
            "wrong-rope",
            {"rope_parameters": {"partial_rotary_factor": 1.0, "rope_theta": 20000.0, "rope_type": "default"}},
        ),
    ],
)
def test_fp32_parity_fails_a_missing_layer_or_a_wrong_rope(project, name, config):
    _, graph = _variant(project, name, config=config)
    result = _fp32_parity(project / "merged", graph, project)
    assert result["passed"] is False and result["max_rel_logit_diff"] > 0.1, result


@pytest.mark.slow
def test_fp32_parity_passes_rounding_at_any_logit_size(project):
    """lm_head x 1000: logits and their float32 rounding 1000 times larger, past the old absolute 1e-4,
    and the same relative to the logits' spread."""

    def scale_head(tensors):
        tensors["lm_head.weight"] = tensors["lm_head.weight"] * 1000.0

    scaled, graph = _variant(project, "loud", weights=scale_head)
    result = _fp32_parity(scaled, graph, project, prompts=16)
    assert result["passed"] is True and result["max_abs_logit_diff"] > 1e-3, result
