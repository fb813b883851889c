"""Shared fixtures: configs composed from the real conf/ with every path redirected into a temp dir."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests never touch the network or a real W&B server.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("DVC_STAGE", None)
# set by the Makefile for queued experiments; tests choose their own W&B folders
os.environ.pop("ORTUNE_WANDB_DIR", None)


# The fast tests run on the tiny random model; the default of `make all` (conf/config.yaml) is the real
# SmolLM2-135M, which tests/test_real_model.py runs end to end.
TINY_MODEL = "model=tiny-phi3"


def path_overrides(root: Path) -> list[str]:
    """Every output in root, on the tiny model."""
    names = ("base_model", "prepared", "adapter", "merged", "onnx", "metrics", "plots")
    return [TINY_MODEL] + [f"paths.{name}={root / name}" for name in names]


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


# The numbers eval.json reports at its top level on the default eval.compare (what `dvc exp show` and
# `dvc metrics diff` show): the eval stage run by hand and in a fresh clone's pipeline must write each.
EVAL_HEADLINE_METRICS = (
    "accuracy",
    "macro_f1",
    "unparsed",
    "majority_baseline",
    "base_accuracy",
    "quantization_accuracy_delta",
    "quantization_agreement",
    "ttft_ms",
    "ms_per_token",
    "tokens_per_second",
    "peak_memory_mb",
    "model_size_mb",
)


def ran_stages(output: str) -> set[str]:
    """The stages DVC actually executed (`dvc status`/`--dry` list only the directly changed ones)."""
    import re

    return set(re.findall(r"Running stage '([^']+)'", output))


def clone_project(
    tmp_path_factory, name: str, tiny: bool = True, params: tuple[str, ...] = (), **extra_env: str
) -> tuple[Path, dict]:
    """A fresh git clone holding this working tree as it is (new files included, run outputs left out),
    committed, with the repo's .venv linked in and DVC/git isolated from the user's config. `tiny`: the
    clone's conf/ defaults to the tiny model (and its params.yaml follows), so `make all` there is fast.
    `params`: overrides its params.yaml is written with (as `python -m ortune.params params ...` takes them),
    for a test that runs `dvc repro` on settings of its own."""
    import shutil
    import subprocess

    root = tmp_path_factory.mktemp(name) / "ortune"
    subprocess.run(["git", "clone", "-q", str(REPO), str(root)], check=True)
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for rel in listed:
        if (REPO / rel).is_file() and not rel.startswith(("metrics/", "plots/", "dvc_plots/")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    (root / ".venv").symlink_to(REPO / ".venv")
    # The linked venv is this repo's: a `make setup` in the clone (the README's flow) must find it installed,
    # never reinstall into it (that would point its editable ortune at the clone's src, deleted later)
    for pin in [*root.glob("requirements*.txt"), root / "pyproject.toml"]:
        os.utime(pin, (0, 0))
    home = tmp_path_factory.mktemp(f"{name}-home")
    env = {
        **os.environ,
        "HOME": str(home),
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(home / "dvc-site"),
        "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "PATH": f"{root / '.venv/bin'}:{os.environ['PATH']}",
        **extra_env,
    }
    for key in ("DVC_STAGE", "DVC_ROOT", "ORTUNE_WANDB_DIR"):
        env.pop(key, None)
    if tiny:
        conf = root / "conf/config.yaml"
        conf.write_text(re.sub(r"(?m)^  - model: .*$", "  - model: tiny-phi3", conf.read_text()))
    if tiny or params:
        subprocess.run(
            [str(REPO / ".venv/bin/python"), "-m", "ortune.params", "params", *params],
            cwd=root,
            env=env,
            check=True,
            capture_output=True,
        )
    subprocess.run(["git", "add", "-A"], cwd=root, env=env, check=True)
    subprocess.run(["git", "commit", "-qm", "test state", "--allow-empty"], cwd=root, env=env, check=True)
    return root, env
