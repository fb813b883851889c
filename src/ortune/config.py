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
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ortune.errors import OrtuneError

PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
# Settings that never change a stage's results, visible to every stage without being declared.
ALWAYS_VISIBLE = ("paths", "wandb")


@dataclass
class TinyModelConfig:
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 512
    vocab_size: int = 1024


@dataclass
class ModelConfig:
    name: str = "tiny-phi3"
    source: str = "tiny"  # tiny | hub
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    path: Optional[str] = None
    trust_remote_code: bool = False
    tiny: Optional[TinyModelConfig] = None


@dataclass
class TemplateConfig:
    prompt: str = "### Text: {phrase}\n### The tone is:\n"
    completion: str = "{tone}"


@dataclass
class DataConfig:
    path: str = "data/raw/tones.jsonl"
    format: str = "text"
    template: TemplateConfig = field(default_factory=TemplateConfig)
    label_field: str = "tone"
    eval_fraction: float = 0.3


@dataclass
class LoraConfig:
    r: int = 64
    alpha: int = 64
    dropout: float = 0.1
    bias: str = "none"
    target_modules: list[str] = field(default_factory=lambda: ["qkv_proj", "o_proj"])
    modules_to_save: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    method: str = "lora"  # lora | qlora
    loss: str = "completion"  # completion | full
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.05
    num_train_epochs: float = 12
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_length: int = 128
    logging_steps: int = 5
    bf16: bool = False
    gradient_checkpointing: bool = False


@dataclass
class OnnxConfig:
    execution_provider: str = "cpu"
    block_size: int = 32
    accuracy_level: int = 4
    intra_op_num_threads: int = 0


@dataclass
class EvalConfig:
    max_new_tokens: int = 6
    limit: int = 0


@dataclass
class WandbConfig:
    mode: str = "offline"
    project: str = "ortune"
    entity: Optional[str] = None
    dir: str = "."


@dataclass
class PathsConfig:
    base_model: str = "models/base"
    prepared: str = "data/prepared"
    adapter: str = "models/adapter"
    merged: str = "models/merged"
    onnx: str = "models/onnx"
    metrics: str = "metrics"
    plots: str = "plots"


@dataclass
class Config:
    seed: int = 42
    precision: str = "int4"
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
