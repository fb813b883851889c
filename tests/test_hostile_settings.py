"""Settings that were accepted and went wrong without a word (issue 20): output paths outside the repository or
onto its sources and tools, and numbers that are not finite."""

from __future__ import annotations

import re

import pytest

from conftest import REPO
from ortune import config
from ortune.errors import OrtuneError
from ortune.records import read_records
from ortune.settings import fields


def compose(*overrides: str, workspace: bool = True):
    return config.validate(config.compose(["model=tiny-phi3", *overrides], config_dir=REPO / "conf"), "t", workspace)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("paths.onnx=/", f"paths.onnx=/: holds the repository ({REPO})"),
        ("paths.metrics=/tmp/x", f"paths.metrics=/tmp/x: outside the repository ({REPO})"),
        ("paths.prepared=src", "paths.prepared=src: is src, which the pipeline must not overwrite"),
        ("paths.merged=wandb", "paths.merged=wandb: is wandb, which"),
        ("paths.adapter=conf/lora", "paths.adapter=conf/lora: is inside conf, which"),
        ("paths.onnx=bench/x", "paths.onnx=bench/x: is inside bench, which"),  # its git-ignored .cache only is not
        ("paths.plots=data", "paths.plots=data: holds data/raw, which"),
        ("paths.base_model=.", "paths.base_model=.: holds the repository"),
        ("paths.onnx=models/../.git", "paths.onnx=models/../.git: is .git, which"),
        ("paths.metrics=dvc.yaml", "paths.metrics=dvc.yaml: is dvc.yaml, which"),
        ("paths.onnx=-rf", "paths.onnx=-rf: starts with '-'"),
    ],
)
def test_an_output_path_that_would_overwrite_the_project_is_one_line(override, needle):
    with pytest.raises(OrtuneError, match=re.escape(needle)) as caught:
        compose(override)
    assert "\n" not in str(caught.value) and "e.g. models/NAME" in str(caught.value)


def test_outside_the_repository_is_for_stages_run_by_hand_only():
    """Tests and users running a stage by hand write anywhere but onto the project; the pipeline DVC tracks
    (params.yaml, make all/params/repro/sweep) keeps its outputs inside the repository."""
    assert compose("paths.metrics=/tmp/x", workspace=False).paths.metrics == "/tmp/x"
    with pytest.raises(OrtuneError, match="holds the repository"):
        compose("paths.metrics=/", workspace=False)
    compose()  # conf/'s own paths pass


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key", ["train.learning_rate", "train.num_train_epochs", "lora.dropout", "onnx.int8_share"])
def test_a_number_that_is_not_finite_is_refused_like_nan(key, value):
    with pytest.raises(OrtuneError, match=re.escape(f"{key}={value} must be a finite number")):
        compose(f"{key}={value}", workspace=False)


def test_every_float_setting_refuses_inf():
    assert fields.value_problem("x", float("inf"), {}) == "x=inf must be a finite number"
    assert fields.value_problem("x", 1e308, {}) is None


@pytest.mark.parametrize("separator", [";", "\t", "|"])
def test_a_csv_with_another_separator_gets_a_delimiter_hint(tmp_path, separator):

    path = tmp_path / "rows.csv"
    path.write_text(f"phrase{separator}tone\nhello there{separator}joy\nsad day{separator}sadness\n")
    with pytest.raises(OrtuneError, match=re.escape(f"the file looks {separator!r}-separated")) as caught:
        read_records(path)
    assert "\n" not in str(caught.value) and "re-save it with commas" in str(caught.value)
