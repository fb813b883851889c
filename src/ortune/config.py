"""One schema for every setting, and the one way stages obtain their config.

Under DVC (``DVC_STAGE`` set) a stage reads params.yaml, which DVC composed from conf/ with the
``-S`` overrides; run by hand, the stage composes conf/ itself with the command-line overrides, the
same way DVC does. Either way the result is checked against the schema (unknown keys and wrong types
fail, naming the key) and narrowed to the params the stage declares in dvc.yaml, so reading an
undeclared setting fails instead of silently missing a rerun.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ortune.errors import OrtuneError

PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
# Settings that never change a stage's results, visible to every stage without being declared.
ALWAYS_VISIBLE = ("paths", "wandb")


# The schema gives types only: every default lives in conf/, so there is one place to read and edit them.
@dataclass
class TinyModelConfig:
    hidden_size: int = MISSING
    intermediate_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    max_position_embeddings: int = MISSING
    vocab_size: int = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING  # tiny | hub
    hub_id: Optional[str] = MISSING
    revision: Optional[str] = MISSING
    path: Optional[str] = MISSING
    trust_remote_code: bool = MISSING
    tiny: Optional[TinyModelConfig] = None


@dataclass
class TemplateConfig:
    prompt: str = MISSING
    completion: str = MISSING


@dataclass
class DataConfig:
    path: str = MISSING
    format: str = MISSING
    template: TemplateConfig = field(default_factory=TemplateConfig)
    label_field: str = MISSING
    eval_fraction: float = MISSING


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    bias: str = MISSING
    target_modules: list[str] = MISSING
    modules_to_save: list[str] = MISSING


@dataclass
class TrainConfig:
    method: str = MISSING  # lora | qlora
    loss: str = MISSING  # completion | full
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING
    warmup_ratio: float = MISSING
    num_train_epochs: float = MISSING
    max_steps: int = MISSING
    per_device_train_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    max_length: int = MISSING
    logging_steps: int = MISSING
    bf16: bool = MISSING
    gradient_checkpointing: bool = MISSING


@dataclass
class OnnxConfig:
    execution_provider: str = MISSING
    block_size: int = MISSING
    accuracy_level: int = MISSING
    intra_op_num_threads: int = MISSING


@dataclass
class EvalConfig:
    max_new_tokens: int = MISSING
    limit: int = MISSING


@dataclass
class WandbConfig:
    mode: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    dir: str = MISSING


@dataclass
class PathsConfig:
    base_model: str = MISSING
    prepared: str = MISSING
    adapter: str = MISSING
    merged: str = MISSING
    onnx: str = MISSING
    metrics: str = MISSING
    plots: str = MISSING


@dataclass
class Config:
    seed: int = MISSING
    precision: str = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    onnx: OnnxConfig = field(default_factory=OnnxConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


def project_root() -> Path:
    """Stages run from the repo root (DVC's wdir); DVC_ROOT also covers a run from a sub-folder."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | None = None) -> dict:
    """Compose conf/ exactly as DVC's Hydra integration does (resolved), as a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    config_dir = Path(config_dir or project_root() / "conf").resolve()
    try:
        with initialize_config_dir(str(config_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        raise OrtuneError(
            f"conf/: {_one_line(exc)} (check the override's spelling against conf/, or `make help`)"
        ) from None
    return OmegaConf.to_container(cfg)


def params_yaml_text(composed: dict) -> str:
    """params.yaml's exact bytes for a composition (the same dump DVC writes)."""
    return OmegaConf.to_yaml(OmegaConf.create(composed))


def validate(raw: dict, source: str) -> DictConfig:
    """Check a composed config against the schema and value ranges; return it typed and read-only."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" at '{key}'" if key else ""
        raise OrtuneError(f"{source}: invalid setting{where}: {_one_line(exc)}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise OrtuneError(f"{source}: no value for {', '.join(missing)}; set it in conf/ (see conf/config.yaml)")
    problems = list(_range_problems(cfg))
    if problems:
        raise OrtuneError(f"{source}: " + "; ".join(problems))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _range_problems(cfg: DictConfig):
    if cfg.precision not in PRECISIONS:
        yield f"precision={cfg.precision} is unknown; use one of {', '.join(PRECISIONS)}"
    if cfg.lora.r < 1:
        yield f"lora.r={cfg.lora.r} must be >= 1"
    if not 0.0 <= cfg.lora.dropout < 1.0:
        yield f"lora.dropout={cfg.lora.dropout} must be in [0, 1)"
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        yield f"data.eval_fraction={cfg.data.eval_fraction} must be between 0 and 1 (exclusive)"
    if cfg.model.source not in ("tiny", "hub"):
        yield f"model.source={cfg.model.source} must be 'tiny' or 'hub'"
    if cfg.train.method not in ("lora", "qlora"):
        yield f"train.method={cfg.train.method} must be 'lora' or 'qlora'"
    if cfg.train.loss not in ("completion", "full"):
        yield f"train.loss={cfg.train.loss} must be 'completion' or 'full'"
    if cfg.data.format not in ("text",):
        yield f"data.format={cfg.data.format} is not supported; use 'text'"
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        yield f"wandb.mode={cfg.wandb.mode} must be offline, online or disabled"
    if cfg.train.max_length < 8:
        yield f"train.max_length={cfg.train.max_length} must be >= 8"


def declared_params(stage: str, dvc_yaml: Path | None = None) -> list[str]:
    """The params a stage lists in dvc.yaml (keys of params.yaml, possibly dotted)."""
    dvc_yaml = Path(dvc_yaml or project_root() / "dvc.yaml")
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    if stage not in stages:
        raise OrtuneError(f"{dvc_yaml}: no stage named '{stage}'")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # `- other_params_file.yaml: [keys]`
            keys.extend(k for v in entry.values() for k in v)
    return keys


def stage_view(cfg: DictConfig, keys: list[str]) -> DictConfig:
    """A read-only copy holding only `keys` (plus ALWAYS_VISIBLE); anything else raises on access."""
    view: dict[str, Any] = {}
    for key in [*ALWAYS_VISIBLE, *keys]:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        node = view
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    out = OmegaConf.create(view)
    OmegaConf.set_struct(out, True)
    OmegaConf.set_readonly(out, True)
    return out


def load(stage: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config a stage runs with: params.yaml under DVC, conf/ + overrides by hand."""
    if os.environ.get("DVC_STAGE"):
        if overrides:
            raise OrtuneError("overrides are not accepted under DVC: pass them as `dvc exp run -S key=value`")
        params_file = project_root() / "params.yaml"
        if not params_file.exists():
            raise OrtuneError(f"{params_file} is missing: run `make params` (or `dvc exp run`) to compose it")
        raw = yaml.safe_load(params_file.read_text(encoding="utf-8"))
        source = str(params_file.name)
    else:
        raw = compose(overrides)
        source = "conf/ + overrides" if overrides else "conf/"
    return stage_view(validate(raw, source), declared_params(stage))


def write_params(overrides: list[str], path: Path | None = None) -> Path:
    """Compose conf/ + overrides into params.yaml (validated first, written atomically)."""
    from ortune.artifacts import write_text_atomic

    composed = compose(overrides)
    validate(composed, "conf/ + overrides" if overrides else "conf/")
    path = Path(path or project_root() / "params.yaml")
    write_text_atomic(path, params_yaml_text(composed))
    return path


if __name__ == "__main__":
    import sys

    try:
        print(f"wrote {write_params(sys.argv[1:])}")
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
