"""paths.* and wandb.*: where the stages read and write, and where their logs go (no stage's results
depend on them, so every stage sees them: ortune.config.ALWAYS_VISIBLE)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ortune.settings.fields import field_problems, setting


@dataclass
class WandbConfig:
    mode: str = setting(
        "W&B logging; the WANDB_MODE environment variable wins when set",
        choices=("offline", "online", "disabled"),
        message="{key}={value} must be {either}",
    )
    project: str = setting("the W&B project")
    entity: str | None = setting("the W&B team or user; null: your default")
    dir: str = setting("W&B writes its runs under <dir>/wandb/, relative to the repo root")


@dataclass
class PathsConfig:
    base_model: str = setting("the fetched base model")
    prepared: str = setting("the prepared train and eval splits")
    adapter: str = setting("the trained LoRA adapter")
    merged: str = setting("the base with the adapter merged in")
    onnx: str = setting("the built ONNX model")
    metrics: str = setting("every stage's metrics")
    plots: str = setting("the plots' data")


def wandb_problems(wandb: DictConfig):
    yield from field_problems(WandbConfig, wandb, "wandb.")
