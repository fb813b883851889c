"""Bad models, bad labels, a full disk and remote code: each fails (or warns) with one clear line."""

from __future__ import annotations

import errno
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ortune import artifacts, modeling, stage
from ortune.errors import OrtuneError

REPO = Path(__file__).resolve().parents[1]
TINY = OmegaConf.create({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "max_position_embeddings": 64, "vocab_size": 400})


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_texts):
    out = tmp_path_factory.mktemp("tiny-rel")
    modeling.build_tiny_phi3(TINY, tiny_texts, seed=0, out_dir=out)
    return out


def test_label_outside_the_configured_set_names_row_and_label(make_cfg, tmp_path):
    import prepare_data

    source = tmp_path / "rows.jsonl"
    rows = [{"phrase": f"phrase {i}", "tone": "joy" if i % 2 else "fear"} for i in range(10)]
    rows[6]["tone"] = "joyy"
    rows[8]["tone"] = "Joy"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(OrtuneError, match=r"row 7 has tone='joyy', not one of data.labels"):
        prepare_data.run(make_cfg(f"data.path={source}", "data.labels=[fear,joy]"))
    # null (the default) accepts the labels found; "Joy" is "joy" (the answer parser ignores case)
    rows[6]["tone"] = "surprise"
    rows[0]["tone"] = "surprise"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prepare_data.run(make_cfg(f"data.path={source}"))["rows_per_label"] == {
        "fear": {"train": 1, "eval": 1}, "joy": {"train": 4, "eval": 2}, "surprise": {"train": 1, "eval": 1}}


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(OrtuneError, match="model.path=/no/such/model: no such folder"):
        modeling.copy_local_model("/no/such/model", tmp_path)


def test_truncated_safetensors_is_reported_not_a_traceback(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OrtuneError, match="corrupt or truncated"):
        modeling.load_causal_lm(broken)


def test_missing_tokenizer_is_reported(tiny_model, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_model / "config.json", bare / "config.json")
    with pytest.raises(OrtuneError, match="no tokenizer"):
        modeling.load_tokenizer(bare)


def test_only_safetensors_weights_are_loaded(tiny_model, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, pickled / name)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded: pickles can run code")
    with pytest.raises(OrtuneError, match="safetensors only"):
        modeling.load_causal_lm(pickled)


def test_trust_remote_code_warns_only_when_set(tiny_model, caplog):
    with caplog.at_level(logging.WARNING, logger="ortune"):
        modeling.load_tokenizer(tiny_model)
        assert "trust_remote_code" not in caplog.text
        modeling.load_tokenizer(tiny_model, trust_remote_code=True)
    assert "model.trust_remote_code=true" in caplog.text


def test_disk_full_keeps_the_previous_output(tmp_path, monkeypatch):
    target = tmp_path / "metrics" / "eval.json"
    artifacts.write_json_atomic(target, {"accuracy": 0.8})
    real_fsync = artifacts.os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", full_disk)
    with pytest.raises(OSError):
        artifacts.write_json_atomic(target, {"accuracy": 0.9})
    monkeypatch.setattr(artifacts.os, "fsync", real_fsync)
    assert json.loads(target.read_text()) == {"accuracy": 0.8}
    assert [p.name for p in target.parent.iterdir()] == ["eval.json"]


def test_disk_full_in_a_stage_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", f"paths.metrics={tmp_path}"])

    def run(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "data.json"))

    with pytest.raises(SystemExit) as exited:
        stage.main("prepare_data", run, "data.json")
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: disk full while stage prepare_data was writing")


def test_adapter_for_another_base_explains_the_shape_mismatch(tiny_model, tiny_texts, make_cfg, tmp_path):
    import merge
    from peft import LoraConfig, get_peft_model

    other = tmp_path / "other-base"
    modeling.build_tiny_phi3(OmegaConf.merge(TINY, {"hidden_size": 64}), tiny_texts, seed=0, out_dir=other)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(modeling.load_causal_lm(other), LoraConfig(r=4, target_modules=["qkv_proj"]))
    peft_model.save_pretrained(adapter)
    modeling.load_tokenizer(other).save_pretrained(adapter)
    cfg = make_cfg(f"paths.base_model={tiny_model}", f"paths.adapter={adapter}")
    with pytest.raises(OrtuneError) as caught:
        merge.run(cfg)
    message = str(caught.value)
    assert "adapter does not fit" in message and "size mismatch" in message and "torch.Size" in message
    assert "\n" not in message
