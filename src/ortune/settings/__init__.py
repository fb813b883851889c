"""The schema of every setting: one module per group (data, lora, train, onnx, eval, model, and run for paths
and wandb), each field declaring its type, one-line doc and allowed values or range (ortune.settings.fields),
each module the checks across its fields. ortune.config composes and validates with it; conf/ holds the
defaults; docs/ tables are generated from it (scripts/settings_docs.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from ortune.settings import data, eval, lora, model, onnx, run, train
from ortune.settings.data import DataConfig
from ortune.settings.eval import EvalConfig
from ortune.settings.fields import group, renamed, setting, value_problem
from ortune.settings.lora import LoraConfig
from ortune.settings.model import ModelConfig
from ortune.settings.onnx import OnnxConfig
from ortune.settings.run import PathsConfig, WandbConfig
from ortune.settings.train import TrainConfig


@dataclass
class Config:
    seed: int = setting("the run's seed: data split, tiny model, trainer (unless train.seed)")
    precision: str = onnx.precision()
    paths: PathsConfig = group(PathsConfig, "every file and folder the stages read or write")
    model: ModelConfig = group(ModelConfig, "the base model")
    data: DataConfig = group(DataConfig, "the labelled rows")
    lora: LoraConfig = group(LoraConfig, "the LoRA adapter")
    train: TrainConfig = group(TrainConfig, "training")
    onnx: OnnxConfig = group(OnnxConfig, "the ONNX build")
    eval: EvalConfig = group(EvalConfig, "evaluation")
    wandb: WandbConfig = group(WandbConfig, "W&B logging")


# Names other tools use for our settings (the Olive/CookBook names are the likeliest typos) -> ours.
RENAMED = renamed(Config, "")


def problems(cfg: DictConfig, root: Path, workspace: bool = False):
    """Every problem of a typed config: each group's declared choices and ranges, then its cross-field checks,
    then the paths in `root` (the repository) it would read or write (ortune.settings.run)."""
    if problem := value_problem("precision", cfg.precision, onnx.PRECISION):
        yield problem
    yield from data.problems(cfg.data)
    yield from model.problems(cfg.model)
    yield from run.wandb_problems(cfg.wandb)
    yield from lora.problems(cfg.lora)
    yield from train.problems(cfg.train)
    yield from eval.problems(cfg.eval)
    yield from onnx.problems(cfg.precision, cfg.onnx)
    yield from train.qat_problems(cfg)
    yield from run.output_problems(cfg.paths, root, workspace)
    yield from run.input_problems(cfg, root)
