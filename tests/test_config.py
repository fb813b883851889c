"""The config wiring: one schema, same result by hand and under DVC, loud failures on typos."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf.errors import ConfigAttributeError

from ortune import config
from ortune.errors import OrtuneError

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = ["lora.r=8", "precision=fp32", "train.learning_rate=5e-4"]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)


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
        ("data.eval_fraction=1.2", "data.eval_fraction"),
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
    tiny = config.validate(config.compose([]), "t")
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
        (folder / "params.yaml").write_text(config.params_yaml_text(config.compose([f"lora.r={rank}"], config_dir=REPO / "conf")))
        (folder / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    (copy / "scripts").mkdir()
    monkeypatch.chdir(copy / "scripts")  # a stage run from a sub-folder finds its checkout too
    monkeypatch.setenv("DVC_STAGE", "train_qlora")
    monkeypatch.setenv("DVC_ROOT", str(parent))
    assert config.project_root() == copy
    assert config.load("train_qlora").lora.r == 8
