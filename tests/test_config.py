"""The config wiring: one schema, same result by hand and under DVC, loud failures on typos."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf.errors import ConfigAttributeError

from ortune import config
from ortune.errors import OrtuneError

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["lora.r=8", "precision=fp32", "train.learning_rate=5e-4"]


def test_params_yaml_is_byte_identical_to_dvcs_own_composition(in_repo, tmp_path):
    from dvc.utils.hydra import compose_and_dump

    dvc_file = tmp_path / "params.yaml"
    compose_and_dump(dvc_file, str(REPO / "conf"), None, "config", "", OVERRIDES)
    assert config.params_yaml_text(config.compose(OVERRIDES)) == dvc_file.read_text(encoding="utf-8")


def test_hand_run_and_dvc_run_see_the_same_config(in_repo, tmp_path, monkeypatch):
    from dvc.utils.hydra import compose_and_dump

    by_hand = config.load("train_qlora", OVERRIDES)
    compose_and_dump(tmp_path / "params.yaml", str(REPO / "conf"), None, "config", "", OVERRIDES)
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    monkeypatch.setenv("DVC_STAGE", "train_qlora")
    monkeypatch.chdir(tmp_path)
    under_dvc = config.load("train_qlora")
    assert by_hand == under_dvc
    assert under_dvc.lora.r == 8 and under_dvc.train.learning_rate == 5e-4


def test_stage_sees_only_its_declared_params(in_repo):
    cfg = config.load("build_onnx", ["precision=fp32"])
    assert cfg.precision == "fp32" and cfg.onnx.execution_provider == "cpu"
    with pytest.raises(ConfigAttributeError):
        _ = cfg.lora  # build_onnx does not declare lora: reading it must fail, not silently miss reruns
    train = config.load("train_qlora")
    assert train.model.trust_remote_code is False
    with pytest.raises(ConfigAttributeError):
        _ = train.model.hub_id  # only model.trust_remote_code is declared for training


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("lora.rr=3", "lora.rr"),
        ("model=no-such-model", "no-such-model"),
        ("lora.r=abc", "lora.r"),
        ("lora.r=0", "lora.r=0"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("data.test_fraction=1.2", "data.test_fraction"),
        ("data.validation_fraction=0.7", "leave no rows to train on"),
        ("precision=int3", "precision=int3"),
    ],
)
def test_bad_settings_fail_with_one_line_naming_the_setting(in_repo, override, needle):
    with pytest.raises(OrtuneError) as caught:
        config.load("train_qlora", [override])
    message = str(caught.value)
    assert needle in message and "\n" not in message


def test_typo_in_params_yaml_fails_under_dvc(tmp_path, monkeypatch):
    text = config.params_yaml_text(config.compose([], config_dir=REPO / "conf"))
    (tmp_path / "params.yaml").write_text(text.replace("  alpha: 64", "  lora_alpha: 64"))
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    monkeypatch.setenv("DVC_STAGE", "train_qlora")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OrtuneError, match="lora.lora_alpha"):
        config.load("train_qlora")


def test_model_choice_sets_its_own_lora_targets(in_repo):
    tiny = config.validate(config.compose(["model=tiny-phi3"]), "t")
    hub = config.validate(config.compose(["model=phi3-mini-4k"]), "t")
    assert hub.model.hub_id == "microsoft/Phi-3-mini-4k-instruct" and len(hub.model.revision) == 40
    assert list(hub.lora.target_modules) == ["qkv_proj", "o_proj"]
    assert "embed_tokens" in tiny.lora.modules_to_save and not hub.lora.modules_to_save
    # an explicit override still beats the model's default
    mine = config.validate(config.compose(["lora.target_modules=[o_proj]"]), "t")
    assert list(mine.lora.target_modules) == ["o_proj"]


def test_every_stage_declares_params_that_exist(in_repo):
    full = config.validate(config.compose([]), "t")
    for stage in ("fetch_model", "prepare_data", "train_qlora", "merge", "build_onnx", "eval"):
        config.stage_view(full, config.declared_params(stage))


def test_a_queued_experiment_reads_its_own_copy_not_the_parent_named_by_dvc_root(tmp_path, monkeypatch):
    # DVC runs a queued experiment's stages in a copy of the repo and points DVC_ROOT at the parent
    # workspace on purpose (dvc/repo/experiments/queue/base.py): the copy's params.yaml must win.
    parent, copy = tmp_path / "workspace", tmp_path / "exp-copy"
    for folder, rank in ((parent, 64), (copy, 8)):
        (folder / "conf").mkdir(parents=True)
        (folder / "params.yaml").write_text(
            config.params_yaml_text(config.compose([f"lora.r={rank}"], config_dir=REPO / "conf"))
        )
        (folder / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (copy / "scripts").mkdir()
    monkeypatch.chdir(copy / "scripts")  # a stage run from a sub-folder finds its checkout too
    monkeypatch.setenv("DVC_STAGE", "train_qlora")
    monkeypatch.setenv("DVC_ROOT", str(parent))
    assert config.project_root() == copy
    assert config.load("train_qlora").lora.r == 8


# made up at run time in a known token's shape, so that not even this file holds a token-like string
FAKE_HF_TOKEN = "hf_" + "Ab1" * 12


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            f"+onnx.extra_options.hf_token={FAKE_HF_TOKEN}",
            "onnx.extra_options.hf_token: its name says it holds a token",
        ),
        ("+onnx.extra_options.hf_token=Qz9v7Wq", "onnx.extra_options.hf_token: its name says it holds a token"),
        ("+onnx.extra_options.apiKey=Qz9v7Wq", "onnx.extra_options.apiKey: its name says it holds a key"),
        (
            "+onnx.extra_adapters.db_password=Qz9v7Wq",
            "onnx.extra_adapters.db_password: its name says it holds a password",
        ),
        (f"wandb.project={FAKE_HF_TOKEN}", "wandb.project: its value looks like a Hugging Face token"),
        (
            "data.path=https://me:hunter2@example.com/tones.jsonl",
            "data.path: its value looks like a URL with a password",
        ),
        ("wandb.entity=AKIA" + "ABCDEFGHIJKLMNOP", "wandb.entity: its value looks like an AWS access key"),
    ],
)
def test_a_secret_in_the_settings_is_refused_in_one_line_without_echoing_it(override, needle):
    """A secret in a setting would land in git-tracked params.yaml, metrics, the model card and W&B."""
    with pytest.raises(OrtuneError) as refused:
        config.validate(config.compose([override], config_dir=REPO / "conf"), "conf/ + overrides")
    message = str(refused.value)
    assert message.startswith(f"conf/ + overrides: {needle}") and "export it in the environment" in message
    assert override.split("=", 1)[1] not in message and "\n" not in message


def test_secret_words_inside_other_words_are_no_secret():
    # every shipped model and the defaults pass; max_new_tokens, tokenizer, a commit hash are not secrets
    for model in sorted(p.stem for p in (REPO / "conf/model").glob("*.yaml")):
        config.validate(config.compose([f"model={model}"], config_dir=REPO / "conf"), model)
    composed = config.compose(
        ["model.revision=0123456789abcdef0123456789abcdef01234567", "+onnx.extra_options.keywords_x=1"],
        config_dir=REPO / "conf",
    )
    assert config.secret_problem(composed) is None


def test_the_default_is_the_real_model_with_its_measured_training_settings(in_repo):
    default = config.validate(config.compose([]), "t")
    assert default.model.name == "smollm2-135m" and default.model.source == "gguf"
    assert (
        list(default.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj"]
        and not default.lora.modules_to_save
    )
    assert default.train.learning_rate == 1e-3 and default.train.num_train_epochs == 5
    # trained through the int4 grid it ships on (docs/quantization.md)
    assert default.train.method == "qat" and default.train.qat.block_size == default.onnx.block_size == 32
    assert default.lora.dropout == 0 and default.onnx.quantization == "auto"
    # the tiny model keeps the generic defaults: its conf entry changes no training setting
    tiny = config.validate(config.compose(["model=tiny-phi3"]), "t")
    assert tiny.train.learning_rate == 1e-3 and tiny.onnx.quantization == "fixed" and tiny.train.method == "lora"


def test_auto_quantization_candidates_are_checked_like_the_settings_they_override(in_repo):
    with pytest.raises(OrtuneError) as caught:
        config.validate(
            config.compose(
                ["onnx.quantization=auto", "onnx.candidates=[{precision: int3}, {blok: 3}, {int8_share: 2}, {}]"]
            ),
            "t",
        )
    message = str(caught.value)
    assert "onnx.candidates[0]: precision=int3 is unknown" in message and "onnx.candidates[1]: blok unknown" in message
    assert "onnx.candidates[2]: onnx.int8_share=2 must be in [0, 1]" in message and "candidates[3]" not in message
    with pytest.raises(OrtuneError, match="onnx.int8_share=0.3 mixes int8 into an int4 model"):
        config.validate(config.compose(["precision=int8", "onnx.int8_share=0.3"]), "t")


def test_config_imports_no_domain_module_and_a_stage_config_loads_without_the_builder(in_repo):
    """Dependencies point one way: config composes and checks shapes; the builder's checks (pairs, option
    names) live in ortune.export, run where it is imported (build_onnx, `make params`), never for other stages."""
    import ast
    import subprocess
    import sys

    tree = ast.parse((REPO / "src/ortune/config.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    # the schema (ortune.settings, one module per group) is no domain module: it imports none either
    schema = {name for name in imported if name.startswith("ortune.settings")}
    assert {name for name in imported if name.startswith("ortune")} - schema == {"ortune.errors"}
    probe = (
        "import sys; from ortune import config; "
        "config.load('prepare_data', ['model=tiny-phi3']); config.load('train_qlora', ['model=tiny-phi3']); "
        "print(sorted(m for m in sys.modules if m.startswith('ortune.') and not m.startswith('ortune.settings')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['ortune.config', 'ortune.errors']"
