"""The set-up files agree: environment.yml installs the same pins as `make setup`, CI runs `make test`."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_environment_yml_uses_the_pinned_requirements():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["-r requirements.txt"]


def test_requirements_are_exact_pins_with_cpu_torch():
    lines = [l.strip() for l in (REPO / "requirements.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    pinned = dict(l.split("==") for l in lines if "==" in l)
    assert pinned["torch"] == "2.13.0"  # any other torch pulls GBs of CUDA wheels
    assert "onnx-ir" in pinned  # the GenAI builder imports it without declaring it
    for name in ("transformers", "peft", "trl", "onnxruntime-genai", "dvc", "hydra-core", "wandb"):
        assert name in pinned, name


def test_ci_runs_the_readme_commands():
    ci = (REPO / ".ci/run").read_text()
    assert "make setup" in ci and "make test" in ci
    readme = (REPO / "README.md").read_text()
    assert "make setup" in readme and "make test" in readme
