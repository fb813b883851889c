"""Shared fixtures: configs composed from the real conf/ with every path redirected into a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never touch the network or a real W&B server.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("DVC_STAGE", None)


def path_overrides(root: Path) -> list[str]:
    names = ("base_model", "prepared", "adapter", "merged", "onnx", "metrics", "plots")
    return [f"paths.{name}={root / name}" for name in names]


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(*overrides) -> the validated full config, as a stage would see it, outputs in tmp_path."""
    from ortune import config

    def _make(*overrides: str):
        composed = config.compose([*path_overrides(tmp_path), *overrides], config_dir=REPO / "conf")
        return config.validate(composed, "test")

    return _make


@pytest.fixture(scope="session")
def tiny_texts():
    from ortune import data

    rows = data.read_records(REPO / "data/raw/tones.jsonl")
    return [f"### Text: {r['phrase']}\n### The tone is:\n{r['tone']}" for r in rows]
