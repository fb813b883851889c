"""Bad models, bad labels, a full disk and remote code: each fails (or warns) with one clear line."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ortune import artifacts, modeling, stage
from ortune.errors import OrtuneError

REPO = Path(__file__).resolve().parents[1]
TINY = OmegaConf.create(
    {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "vocab_size": 400,
    }
)


def test_label_outside_the_configured_set_names_row_and_label(make_cfg, tmp_path):
    import prepare_data

    source = tmp_path / "rows.jsonl"
    rows = [{"phrase": f"phrase {i}", "tone": "joy" if i % 2 else "fear"} for i in range(14)]
    rows[6]["tone"] = "joyy"
    rows[8]["tone"] = "Joy"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(OrtuneError, match=r"row 7 has tone='joyy', not one of data.labels"):
        prepare_data.run(make_cfg(f"data.path={source}", "data.labels=[fear,joy]"))
    # null (the default) accepts the labels found; "Joy" is "joy" (the answer parser ignores case)
    rows[6]["tone"] = rows[0]["tone"] = rows[10]["tone"] = "surprise"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prepare_data.run(make_cfg(f"data.path={source}"))["rows_per_label"] == {
        "fear": {"train": 1, "validation": 1, "test": 1},
        "joy": {"train": 5, "validation": 1, "test": 2},
        "surprise": {"train": 1, "validation": 1, "test": 1},
    }


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


def test_trust_remote_code_reaches_the_onnx_builder(tmp_path, monkeypatch):
    """The builder loads the model's config and tokenizer itself: model.trust_remote_code must reach it
    (its own hf_remote option is refused in favour of the setting)."""
    from export_helpers import stage_cfg
    from ortune import export, onnx_build

    given = []

    def builder(model_dir, out_dir, precision, provider, options, log_file, **kwargs):
        given.append(options)
        raise RuntimeError("not built here")

    monkeypatch.setattr(export, "run_builder", builder)
    for trust in ("true", "false"):
        cfg = stage_cfg(tmp_path, f"model.trust_remote_code={trust}")
        with pytest.raises(RuntimeError, match="not built here"):
            onnx_build.build(cfg, tmp_path / "out", tmp_path / "scratch", tmp_path / "build")
    assert [options.get("hf_remote") for options in given] == ["true", None]


def small_file_system_command(folder: Path, size_kb: int, setup: str = "") -> list[str] | None:
    """A command prefix running the rest inside a new mount namespace where `folder` is a tmpfs of
    size_kb: a real disk that fills up. Needs root or unprivileged user namespaces; None if neither."""
    script = (
        f'mount -t tmpfs -o size={size_kb}k tmpfs "$0" && cd "$0" && {setup or "true"} && cd - >/dev/null '
        '&& "$@"; status=$?; cd "$0" && find . -print | sort && cat prepared/train.jsonl; exit $status'
    )
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        if (
            shutil.which("unshare")
            and subprocess.run(
                [*prefix, "--", "sh", "-c", 'mount -t tmpfs tmpfs "$0"', str(folder)], capture_output=True
            ).returncode
            == 0
        ):
            return [*prefix, "--", "sh", "-c", script, str(folder)]
    return None


@pytest.mark.slow
def test_disk_full_in_a_real_stage_is_one_line_and_keeps_the_previous_output(tmp_path, tiny_texts):
    """prepare_data writing its splits onto a 16 kB file system (its train split alone is larger)."""
    full = tmp_path / "full"
    full.mkdir()
    command = small_file_system_command(full, 16, setup="mkdir prepared && echo previous > prepared/train.jsonl")
    if command is None:
        pytest.skip("neither root nor user namespaces: cannot mount a small tmpfs here")
    base = tmp_path / "base"
    modeling.build_tiny_phi3(OmegaConf.merge(TINY, {"max_position_embeddings": 256}), tiny_texts, seed=0, out_dir=base)
    paths = [f"paths.base_model={base}", f"paths.prepared={full / 'prepared'}", f"paths.metrics={full / 'metrics'}"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DVC_STAGE", None)
    done = subprocess.run(
        [*command, sys.executable, "scripts/prepare_data.py", *paths],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: disk full while stage prepare_data was writing"), (
        done.stderr[-2000:]
    )
    assert "Traceback" not in done.stderr
    # what the full file system holds afterwards: the previous split, whole; no temp file, no metrics
    assert done.stdout.splitlines()[-4:] == [".", "./prepared", "./prepared/train.jsonl", "previous"], done.stdout


def test_disk_full_inside_a_native_writer_is_still_disk_full(tmp_path, monkeypatch, capsys):
    """safetensors (Rust) reports a full disk as its own SafetensorError, with the OS message inside
    (seen filling a tmpfs with fetch_model): that is a full disk, not an unexpected failure."""

    class SafetensorError(Exception):
        pass

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "fetch_model.py",
            *(
                f"paths.{k}={tmp_path / k}"
                for k in ("base_model", "prepared", "adapter", "merged", "onnx", "metrics", "plots")
            ),
        ],
    )

    def run(cfg):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(SystemExit) as exited:
        stage.main("fetch_model", run, "base.json")
    assert exited.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: disk full while stage fetch_model was writing its outputs; free space (or move the DVC cache) and rerun"
    ]


def test_adapter_for_another_base_explains_the_shape_mismatch(tiny_model, tiny_texts, make_cfg, tmp_path):
    from peft import LoraConfig, get_peft_model

    import merge

    other = tmp_path / "other-base"  # wider than conftest's tiny_model (hidden 64)
    modeling.build_tiny_phi3(OmegaConf.merge(TINY, {"hidden_size": 128}), tiny_texts, seed=0, out_dir=other)
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
