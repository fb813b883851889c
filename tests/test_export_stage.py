"""The build_onnx stage end to end on a tiny project: what it ships beside the model (ortune.json,
genai_config.json, the model card), parity with PyTorch after every build, and its gate."""

from __future__ import annotations

import json
import os

import pytest

import build_onnx
from export_helpers import REPO, make_project, stage_cfg
from ortune import data, parity
from ortune.errors import OrtuneError
from ortune.model_card import sha256


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_texts):
    return make_project(tmp_path_factory.mktemp("export-stage"), tiny_texts)


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # data.path is relative to the repo, as under DVC


def test_fp32_build_matches_pytorch_within_1e_4(project):
    metrics = build_onnx.run(stage_cfg(project, "precision=fp32", onnx_dir="onnx-fp32"))
    result = metrics["parity"]
    assert result["prompts"] == 16 and result["passed"] is True
    assert result["max_abs_logit_diff"] <= 1e-4 and result["label_agreement"] == 1.0
    assert result["target"] == "max_abs_logit_diff <= 0.0001"


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

    prompts = [row["prompt"] for row in data.read_jsonl(project / "prepared" / "eval.jsonl")][:8]
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
            torch_ids = merged.generate(**ids, max_new_tokens=answer_tokens, do_sample=False)[0, ids["input_ids"].shape[1]:]
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
            onnx_tokenizer.decode(onnx_ids), labels)
    assert metrics["parity"]["prompts"] == 8 and metrics["parity"]["label_agreement"] == agree / 8
    assert metrics["parity"]["target"] == "label_agreement >= 0.98"
    assert metrics["builder_options"]["algo_config"] == "default" and metrics["precision"] == "int4"
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == os.cpu_count()
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


def test_max_new_tokens_fits_the_longest_label_plus_the_end_token(project):
    from ortune.modeling import load_tokenizer

    tokenizer = load_tokenizer(project / "merged")
    rows = data.read_jsonl(project / "prepared" / "eval.jsonl") + data.read_jsonl(project / "prepared" / "train.jsonl")
    longest = max(len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) - len(tokenizer(r["prompt"])["input_ids"])
                  for r in rows)
    task = json.loads((project / "onnx-int4" / "ortune.json").read_text())
    assert task["max_new_tokens"] == longest + 1


def test_a_missed_parity_target_fails_the_stage_and_ships_nothing(project, monkeypatch):
    monkeypatch.setattr(parity, "LOGIT_TOLERANCE", 0.0)
    with pytest.raises(OrtuneError, match="parity with PyTorch: model: max_abs_logit_diff <= 0 missed.*require_parity=false"):
        build_onnx.run(stage_cfg(project, "precision=fp32", "onnx.parity_prompts=2", onnx_dir="onnx-gated"))
    assert not (project / "onnx-gated").exists()


@pytest.mark.parametrize(("precision", "provider"), [("int4", "cuda"), ("bf16", "cuda")])
def test_non_cpu_builds_are_checked_on_the_cpu_or_reported_unmeasured(project, precision, provider):
    name = f"onnx-{precision}-{provider}"
    metrics = build_onnx.run(stage_cfg(project, f"precision={precision}", f"onnx.execution_provider={provider}",
                                       "onnx.require_parity=false", "onnx.parity_prompts=4", onnx_dir=name))
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
    assert parity.compare(Fake(["joy"], np.zeros(3)), Fake(["fear"], np.zeros(3)), ["a"], labels, 2, "int8", 0.98)["passed"] is False
    fp32 = parity.compare(Fake(["joy"], np.zeros(3)), Fake(["fear"], np.full(3, 5e-5)), ["a"], labels, 2, "fp32", 0.98)
    assert fp32["passed"] is True and fp32["target"] == "max_abs_logit_diff <= 0.0001"  # fp32 is judged on logits
