"""The offline tiny base model: deterministic, Phi-3 shaped, and tokenized identically by
transformers and onnxruntime-genai (the runtime the model ships in)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from export_helpers import TINY
from ortune import export, modeling
from ortune.errors import OrtuneError


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    out.mkdir()
    export.run_builder(tiny_model, out, "fp32", "cpu", {}, log_file=out.parent / "build.log")
    return out


def test_tiny_model_is_deterministic_from_the_seed(tiny_model, tiny_texts, tmp_path):
    modeling.build_tiny_phi3(TINY, tiny_texts, seed=3, out_dir=tmp_path)
    assert digest(tmp_path) == digest(tiny_model)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny_model / "tokenizer.json").read_bytes()


def test_tiny_model_carries_phi3_tokens_and_chat_template(tiny_model):
    tokenizer = modeling.load_tokenizer(tiny_model)
    for token in ("<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>\nhi<|end|>\n<|assistant|>\n"


def test_transformers_and_genai_give_identical_token_ids(tiny_model, tiny_onnx):
    from ortune.generation import OnnxGenerator

    tokenizer = modeling.load_tokenizer(tiny_model)
    genai = OnnxGenerator(tiny_onnx)
    prompts = [
        "### Text: I finally got the job I wanted!\n### The tone is:\n",
        "### Text: Wait, you're telling me she's been here the whole time?\n### The tone is:\n",
        "Ünïcödé, emoji 🎉 and  double  spaces\ttabs",
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Is it safe?"}], tokenize=False, add_generation_prompt=True
        ),
    ]
    for prompt in prompts:
        assert tokenizer(prompt)["input_ids"] == genai.encode(prompt), prompt


def test_fp32_onnx_matches_pytorch_logits(tiny_model, tiny_onnx):
    import numpy as np
    import onnxruntime as ort
    import torch

    tokenizer = modeling.load_tokenizer(tiny_model)
    model = modeling.load_causal_lm(tiny_model).eval()
    ids = tokenizer("### Text: I am scared of the dark\n### The tone is:\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits[0, -1].numpy()
    session = ort.InferenceSession(str(tiny_onnx / "model.onnx"))
    feeds = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones_like(ids.numpy(), dtype=np.int64)}
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            shape = [1, TINY.num_attention_heads, 0, TINY.hidden_size // TINY.num_attention_heads]
            feeds[inp.name] = np.zeros(shape, dtype=np.float32)
    logits = session.run(["logits"], feeds)[0][0, -1]
    assert np.abs(logits - expected).max() < 1e-4


def test_local_model_path_needs_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(OrtuneError, match="safetensors"):
        modeling.copy_local_model(str(tmp_path), tmp_path / "out")


def test_hub_model_offline_says_to_use_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = OmegaConf.create(
        {"hub_id": "microsoft/Phi-3-mini-4k-instruct", "revision": "0a67737cc96d2554230f90338b163bc6380a2a85"}
    )
    with pytest.raises(OrtuneError, match="model.path"):
        modeling.fetch_hub_model(cfg, tmp_path)


def test_hub_model_without_network_fails_at_once_or_uses_the_cache(tmp_path, monkeypatch):
    import socket

    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def no_dns(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    calls = []

    def cache_only(repo_id, **kwargs):
        calls.append(kwargs)
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    cfg = OmegaConf.create(
        {"hub_id": "microsoft/Phi-3-mini-4k-instruct", "revision": "0a67737cc96d2554230f90338b163bc6380a2a85"}
    )
    with pytest.raises(OrtuneError, match="no network and not in the Hugging Face cache.*model.path"):
        modeling.fetch_hub_model(cfg, tmp_path / "out")
    assert calls[0]["local_files_only"] is True  # no download attempt, so no retries

    cached = tmp_path / "hub" / "snapshots" / cfg.revision
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(cached))
    (tmp_path / "out").mkdir()
    assert modeling.fetch_hub_model(cfg, tmp_path / "out") == {"resolved_revision": cfg.revision}
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"weights"
