"""One schema for every setting, and the one way stages obtain their config.

Under DVC (``DVC_STAGE`` set) a stage reads params.yaml, which DVC composed from conf/ with the
``-S`` overrides; run by hand, the stage composes conf/ itself with the command-line overrides, the
same way DVC does. Either way the result is checked against the schema (unknown keys and wrong types
fail, naming the key) and narrowed to the params the stage declares in dvc.yaml, so reading an
undeclared setting fails instead of silently missing a rerun.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ortune.errors import OrtuneError

PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
# The int4 blocks the builder's quantizer packs: onnx.block_size and train.qat.block_size (the grid trained through).
BLOCK_SIZES = (16, 32, 64, 128, 256)
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
class GgufPackageConfig:
    name: str = MISSING  # the pip distribution, pinned in requirements-nodeps.txt
    file: str = MISSING  # the .gguf inside it, relative to site-packages


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = MISSING  # tiny | hub | gguf
    hub_id: str | None = MISSING
    revision: str | None = MISSING
    path: str | None = MISSING
    gguf_file: str | None = MISSING  # a local .gguf; like path, it overrides source
    gguf_package: GgufPackageConfig | None = MISSING
    trust_remote_code: bool = MISSING
    tiny: TinyModelConfig | None = None


@dataclass
class TemplateConfig:
    prompt: str = MISSING
    completion: str = MISSING


@dataclass
class DataConfig:
    path: str = MISSING
    format: str = MISSING  # text | chat
    input_column: str = MISSING
    output_column: str = MISSING
    template: TemplateConfig = field(default_factory=TemplateConfig)
    label_field: str = MISSING
    # the allowed labels; null accepts whatever labels the data holds
    labels: list[str] | None = MISSING
    eval_fraction: float = MISSING


@dataclass
class LoraConfig:
    r: int = MISSING
    alpha: int = MISSING
    dropout: float = MISSING
    bias: str = MISSING  # none | all | lora_only
    target_modules: list[str] = MISSING
    modules_to_save: list[str] = MISSING


@dataclass
class QloraConfig:
    quant_type: str = MISSING  # nf4 | fp4
    double_quant: bool = MISSING
    compute_dtype: str = MISSING  # float32 | bfloat16 | float16
    quant_storage: str = MISSING  # uint8 | bfloat16 | float16 | float32


@dataclass
class QatConfig:
    block_size: int = MISSING  # the int4 grid trained through; onnx.block_size must match


@dataclass
class TrainConfig:
    method: str = MISSING  # lora | qlora | qat
    qlora: QloraConfig = field(default_factory=QloraConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    loss: str = MISSING  # completion | full
    seed: int | None = MISSING
    data_seed: int | None = MISSING
    learning_rate: float = MISSING
    lr_scheduler_type: str = MISSING
    warmup_ratio: float = MISSING
    warmup_steps: int = MISSING
    num_train_epochs: float = MISSING
    max_steps: int = MISSING
    per_device_train_batch_size: int = MISSING
    per_device_eval_batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    gradient_checkpointing: bool = MISSING
    max_length: int = MISSING
    group_by_length: bool = MISSING
    logging_steps: int = MISSING
    eval_strategy: str = MISSING  # no | steps | epoch
    eval_steps: int = MISSING
    save_steps: int = MISSING
    save_total_limit: int = MISSING
    adam_beta2: float = MISSING
    max_grad_norm: float = MISSING
    bf16: bool = MISSING
    num_processes: int = MISSING
    num_nodes: int = MISSING
    node_rank: int = MISSING
    master_addr: str = MISSING
    master_port: int = MISSING
    launcher: str = MISSING  # torchrun | accelerate
    accelerate_config: str | None = MISSING


@dataclass
class OnnxConfig:
    execution_provider: str = MISSING  # cpu | cuda | dml | webgpu; valid pairs with precision: ortune.export
    # weight-only quantization (int4, int8), passed to the builder as its extra options
    block_size: int = MISSING
    accuracy_level: int = MISSING
    algorithm: str = MISSING  # default | rtn | k_quant
    quantize_ops: list[str] = MISSING  # MatMul, Gather
    keep_float: list[str] = MISSING  # lm_head, embeddings
    last_matmul_int8: bool = MISSING
    int8_share: float = MISSING  # int4 only: share of linear weights kept int8, most sensitive first
    extra_options: dict[str, str] = MISSING
    quantization: str = MISSING  # fixed | auto (try `candidates` in order, ship the first that meets parity)
    candidates: list[dict[str, Any]] = MISSING  # each overrides precision and onnx.* settings
    adapter: str = MISSING  # merged | separate
    extra_adapters: dict[str, str] = MISSING
    intra_op_num_threads: int = MISSING
    parity_prompts: int = MISSING
    min_label_agreement: float = MISSING
    require_parity: bool = MISSING


@dataclass
class EvalLatencyConfig:
    new_tokens: int = MISSING
    warmup: int = MISSING
    repeats: int = MISSING


@dataclass
class EvalConfig:
    path: str = MISSING
    max_new_tokens: int = MISSING
    limit: int = MISSING
    compare: list[str] = MISSING  # base | prompted | adapter | merged
    baseline_prompt: str = MISSING  # the prompted baseline's question: {labels} and {input}
    baseline_shots: int = MISSING
    batch_size: int = MISSING
    latency: EvalLatencyConfig = field(default_factory=EvalLatencyConfig)


@dataclass
class WandbConfig:
    mode: str = MISSING
    project: str = MISSING
    entity: str | None = MISSING
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
    """The checkout a stage runs in: the nearest folder, from the working directory up, holding dvc.yaml
    and conf/ (DVC runs stages in the folder of dvc.yaml; by hand a stage may run from a sub-folder).

    Never DVC_ROOT: for queued and temp experiments DVC runs the stages in a copy of the repo but points
    DVC_ROOT at the parent workspace on purpose, so reading params.yaml there would train the workspace's
    settings instead of the experiment's. What must reach the parent repo (W&B runs) asks for it by name
    (ortune.tracking.parent_workspace).
    """
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "conf").is_dir():
            return folder
    return cwd


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
        hint = _renamed_hint(_one_line(exc)) or " (check the override's spelling against conf/, or `make help`)"
        raise OrtuneError(f"conf/: {_one_line(exc)}{hint}") from None
    return OmegaConf.to_container(cfg)


def params_yaml_text(composed: dict) -> str:
    """params.yaml's exact bytes for a composition (the same dump DVC writes)."""
    return OmegaConf.to_yaml(OmegaConf.create(composed))


def validate(raw: dict, source: str) -> DictConfig:
    """Check a composed config against the schema and value ranges; return it typed and read-only."""
    if problem := secret_problem(raw):  # first: later messages may quote values
        raise OrtuneError(f"{source}: {problem}")
    lora = raw.get("lora") if isinstance(raw, dict) else None
    if isinstance(lora, dict) and isinstance(lora.get("target_modules"), str):
        # PEFT's shorthand comes as a bare string (lora.target_modules=all-linear); the schema holds a list
        raw = {**raw, "lora": {**lora, "target_modules": [lora["target_modules"]]}}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" at '{key}'" if key else ""
        hint = _renamed_hint(str(key))
        raise OrtuneError(f"{source}: invalid setting{where}: {_one_line(exc)}{hint}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise OrtuneError(f"{source}: no value for {', '.join(missing)}; set it in conf/ (see conf/config.yaml)")
    problems = list(_range_problems(cfg))
    if problems:
        raise OrtuneError(f"{source}: " + "; ".join(problems))
    OmegaConf.set_readonly(cfg, True)
    return cfg


# Settings are written to params.yaml and dvc.lock (git), metrics/*.json, the model card, builder logs and the
# W&B config: a secret in one would be published. Key words and token shapes that name or look like one.
SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "key", "apikey", "credential", "credentials"}
SECRET_SHAPES = {
    "a Hugging Face token": r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}",
    "a GitHub token": r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})",
    "an OpenAI/Anthropic key": r"(?<![A-Za-z0-9])sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}",
    "an AWS access key": r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])",
    "a Google API key": r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{35}",
    "a Slack token": r"(?<![A-Za-z0-9])xox[abprs]-[A-Za-z0-9-]{10,}",
    "a private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "a URL with a password": r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@",
}


def secret_problem(raw, prefix: str = "") -> str | None:
    """The first setting whose name says it holds a secret, or whose value looks like one (never echoed)."""
    import re

    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(raw, dict) else f"{prefix.rstrip('.')}[{key}]"
        words = set(re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()))
        what = None
        if isinstance(raw, dict) and words & SECRET_WORDS and value not in (None, "", False):
            what = f"its name says it holds a {sorted(words & SECRET_WORDS)[0]}"
        elif isinstance(value, str):
            what = next(
                (f"its value looks like {kind}" for kind, shape in SECRET_SHAPES.items() if re.search(shape, value)),
                None,
            )
        elif problem := secret_problem(value, f"{name}."):
            return problem
        if what:
            return (
                f"{name}: {what}; settings are written to params.yaml and dvc.lock (git), metrics, the model card "
                "and W&B, so a secret never goes in one: export it in the environment instead (HF_TOKEN, "
                "WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...) and drop the setting"
            )
    return None


def _range_problems(cfg: DictConfig):
    if cfg.precision not in PRECISIONS:
        yield f"precision={cfg.precision} is unknown; use one of {', '.join(PRECISIONS)}"
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        yield f"data.eval_fraction={cfg.data.eval_fraction} must be between 0 and 1 (exclusive)"
    if cfg.model.source not in ("tiny", "hub", "gguf"):
        yield f"model.source={cfg.model.source} must be 'tiny', 'hub' or 'gguf'"
    if cfg.model.source == "gguf" and not cfg.model.gguf_file and cfg.model.gguf_package is None:
        yield "model.source=gguf needs model.gguf_file=/path/to/model.gguf (or model.gguf_package)"
    if cfg.model.path and cfg.model.gguf_file:
        yield "model.path and model.gguf_file are both set; set one of them (the other to null)"
    if cfg.data.format not in ("text", "chat"):
        yield f"data.format={cfg.data.format} is not supported; use 'text' or 'chat'"
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        yield f"wandb.mode={cfg.wandb.mode} must be offline, online or disabled"
    yield from _lora_problems(cfg.lora)
    yield from _train_problems(cfg.train)
    yield from _eval_problems(cfg.eval)
    yield from _onnx_problems(cfg.precision, cfg.onnx)
    yield from _qat_problems(cfg)


def _qat_problems(cfg: DictConfig):
    """train.method=qat trains through one int4 grid: every int4 build must use exactly that grid."""
    if cfg.train.method != "qat":
        return
    block = cfg.train.qat.block_size
    if problem := choice_problem("train.qat.block_size", block, BLOCK_SIZES):
        yield problem
    if cfg.lora.dropout:
        yield (
            f"lora.dropout={cfg.lora.dropout} cannot apply with train.method=qat (the adapter trains through the "
            "merged, rounded weight): set lora.dropout=0"
        )
    o = cfg.onnx
    if o.adapter != "merged":
        yield (
            "train.method=qat ships its adapter merged into the rounded weights (an unmerged base would be "
            "float or another rounding): set onnx.adapter=merged"
        )
    builds = (
        [onnx_candidate(cfg.precision, o, dict(entry)) for entry in o.candidates]
        if o.quantization == "auto"
        else [(cfg.precision, o)]
    )
    for index, (precision, settings) in enumerate(builds):
        if precision != "int4":
            continue  # int8 and float builds hold the rounded weights as they are
        where = f"onnx.candidates[{index}]" if o.quantization == "auto" else "onnx"
        differs = (
            [f"block_size={settings.block_size} (train.qat.block_size={block})"] if settings.block_size != block else []
        )
        differs += [
            f"{key}={settings[key]}"
            for key, plain in (
                ("algorithm", "default"),
                ("int8_share", 0.0),
                ("keep_float", []),
                ("last_matmul_int8", False),
            )
            if settings[key] != plain
        ]
        if str(settings.extra_options.get("is_symmetric", "true")).lower() == "false":
            differs.append("extra_options.is_symmetric=false")
        if differs:
            yield (
                f"train.method=qat trains through int4 block {block}, symmetric, onnx.algorithm=default, every layer "
                f"int4, merged; {where} builds int4 with {', '.join(differs)}: make them agree"
            )


# Schedulers that need no extra arguments (the others of transformers' SchedulerType fail without them).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
# Names other tools use for our settings: the Olive/CookBook names are the likeliest typos.
RENAMED = {
    "lora.lora_alpha": "lora.alpha",
    "lora.lora_r": "lora.r",
    "lora.lora_dropout": "lora.dropout",
    "lora.lora_target_modules": "lora.target_modules",
    "train.evaluation_strategy": "train.eval_strategy",
    "train.max_seq_length": "train.max_length",
    "train.max_seq_len": "train.max_length",
    "train.torch_dtype": "train.qlora.compute_dtype",
    "train.compute_dtype": "train.qlora.compute_dtype",
    "train.double_quant": "train.qlora.double_quant",
    "train.quant_type": "train.qlora.quant_type",
    "train.bnb_4bit_compute_dtype": "train.qlora.compute_dtype",
    "train.bnb_4bit_quant_type": "train.qlora.quant_type",
    "train.bnb_4bit_use_double_quant": "train.qlora.double_quant",
    "train.lr": "train.learning_rate",
    "train.epochs": "train.num_train_epochs",
    "train.nproc_per_node": "train.num_processes",
    "train.warmup": "train.warmup_ratio",
    "train.batch_size": "train.per_device_train_batch_size",
}


def _renamed_hint(message: str) -> str:
    import re

    for old, new in RENAMED.items():
        if re.search(rf"(?<![\w.]){re.escape(old)}(?!\w)", message):
            return f" (ortune calls it {new})"
    return ""


def choice_problem(key: str, value, choices) -> str | None:
    if value not in choices:
        return f"{key}={value} must be one of {', '.join(map(str, choices))}"
    return None


def _lora_problems(lora: DictConfig):
    if lora.r < 1:
        yield f"lora.r={lora.r} must be >= 1"
    if lora.alpha <= 0:
        yield f"lora.alpha={lora.alpha} must be > 0"
    if not 0.0 <= lora.dropout < 1.0:
        yield f"lora.dropout={lora.dropout} must be in [0, 1)"
    if problem := choice_problem("lora.bias", lora.bias, ("none", "all", "lora_only")):
        yield problem
    if not lora.target_modules:
        yield "lora.target_modules is empty; name the linear layers to adapt, e.g. [qkv_proj, o_proj]"


def _train_problems(t: DictConfig):
    choices = {
        "method": ("lora", "qlora", "qat"),
        "loss": ("completion", "full"),
        "lr_scheduler_type": LR_SCHEDULERS,
        "eval_strategy": ("no", "steps", "epoch"),
        "launcher": ("torchrun", "accelerate"),
    }
    for key, allowed in choices.items():
        if problem := choice_problem(f"train.{key}", t[key], allowed):
            yield problem
    dtypes = ("float32", "bfloat16", "float16")
    for key, allowed in {
        "quant_type": ("nf4", "fp4"),
        "compute_dtype": dtypes,
        "quant_storage": ("uint8", *dtypes),
    }.items():
        if problem := choice_problem(f"train.qlora.{key}", t.qlora[key], allowed):
            yield problem
    minimum = {
        "per_device_train_batch_size": 1,
        "per_device_eval_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "max_length": 8,
        "logging_steps": 1,
        "eval_steps": 1,
        "save_steps": 0,
        "save_total_limit": 1,
        "warmup_steps": 0,
        "num_processes": 1,
        "num_nodes": 1,
        "node_rank": 0,
        "master_port": 1,
    }
    for key, low in minimum.items():
        if t[key] < low:
            yield f"train.{key}={t[key]} must be >= {low}"
    if not t.learning_rate > 0:
        yield f"train.learning_rate={t.learning_rate} must be > 0"
    if not 0.0 <= t.warmup_ratio < 1.0:
        yield f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1)"
    if t.warmup_ratio and t.warmup_steps:
        yield "train.warmup_ratio and train.warmup_steps are both set; set one of them to 0"
    if not 0.0 < t.adam_beta2 < 1.0:
        yield f"train.adam_beta2={t.adam_beta2} must be in (0, 1)"
    if not t.max_grad_norm > 0:
        yield f"train.max_grad_norm={t.max_grad_norm} must be > 0"
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        yield "train.num_train_epochs must be > 0 unless train.max_steps is set (> 0)"
    if t.max_steps == 0 or t.max_steps < -1:
        yield f"train.max_steps={t.max_steps} must be -1 (use num_train_epochs) or > 0"
    if t.node_rank >= t.num_nodes:
        yield f"train.node_rank={t.node_rank} must be < train.num_nodes={t.num_nodes}"
    if t.accelerate_config and t.launcher != "accelerate":
        yield f"train.accelerate_config={t.accelerate_config} needs train.launcher=accelerate"
    if t.seed is not None and t.seed < 0 or t.data_seed is not None and t.data_seed < 0:
        yield "train.seed and train.data_seed must be >= 0 (or null)"


EVAL_COMPARABLE = ("base", "prompted", "adapter", "merged")
BASELINE_FIELDS = ("labels", "input")  # eval.baseline_prompt's placeholders


def _eval_problems(e: DictConfig):
    unknown = [name for name in e.compare if name not in EVAL_COMPARABLE]
    if unknown:
        yield f"eval.compare: {', '.join(unknown)} unknown; list any of {', '.join(EVAL_COMPARABLE)} (or [])"
    if len(set(e.compare)) != len(e.compare):
        yield f"eval.compare={list(e.compare)} names a model twice"
    minimum = {
        "max_new_tokens": 1,
        "limit": 0,
        "batch_size": 1,
        "latency.new_tokens": 2,
        "latency.warmup": 0,
        "latency.repeats": 1,
        "baseline_shots": 0,
    }
    for key, low in minimum.items():
        value = OmegaConf.select(e, key)
        if value < low:
            yield f"eval.{key}={value} must be >= {low}"
    if not e.path.strip():
        yield "eval.path is empty; leave it at its default (the prepared eval split) or name a labelled file"
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(e.baseline_prompt) if name is not None}
    except ValueError as exc:
        yield f"eval.baseline_prompt is not a valid template ({exc}); write a literal brace as {{{{ or }}}}"
        return
    if unknown := sorted(fields - set(BASELINE_FIELDS)):
        named = ", ".join("{" + name + "}" for name in unknown)
        yield (
            f"eval.baseline_prompt: {named} unknown; its placeholders are {{labels}} (the label set) "
            "and {input} (the text)"
        )
    elif "input" not in fields:
        yield "eval.baseline_prompt has no {input}: the model would never see the text to classify; add it"


# What an onnx.candidates entry may set (the rest of the export settings is shared by every candidate).
CANDIDATE_KEYS = (
    "precision",
    "block_size",
    "accuracy_level",
    "algorithm",
    "keep_float",
    "last_matmul_int8",
    "int8_share",
)


def onnx_candidate(precision: str, o: DictConfig, overrides: dict) -> tuple[str, DictConfig]:
    """(precision, onnx settings) of one onnx.candidates entry."""
    settings = OmegaConf.to_container(o)
    settings.update({k: v for k, v in overrides.items() if k != "precision"})
    settings.update(quantization="fixed", candidates=[])
    return overrides.get("precision", precision), OmegaConf.create(settings)


def _onnx_problems(precision: str, o: DictConfig):
    """The export settings and each onnx.candidates entry (and, through ONNX_CHECKS, what the builder accepts)."""
    yield from _onnx_setting_problems(precision, o)
    if problem := choice_problem("onnx.quantization", o.quantization, ("fixed", "auto")):
        yield problem
    if o.quantization == "auto" and not o.candidates:
        yield "onnx.quantization=auto needs onnx.candidates (fastest first), e.g. [{}, {precision: int8}]"
    # candidates are inert unless quantization=auto builds them
    for index, entry in enumerate(o.candidates if o.quantization == "auto" else ()):
        unknown = sorted(set(entry) - set(CANDIDATE_KEYS))
        if unknown:
            yield (
                f"onnx.candidates[{index}]: {', '.join(unknown)} unknown; "
                f"a candidate sets any of {', '.join(CANDIDATE_KEYS)}"
            )
            continue
        if (wanted := entry.get("precision", precision)) not in PRECISIONS:
            yield f"onnx.candidates[{index}]: precision={wanted} is unknown; use one of {', '.join(PRECISIONS)}"
            continue
        for problem in _onnx_setting_problems(*onnx_candidate(precision, o, dict(entry))):
            yield f"onnx.candidates[{index}]: {problem}"


# Checks of one build's export settings (precision, onnx settings) -> problems, that need a domain module:
# the builder's valid precision/provider pairs and option names are read from its source. The export module
# registers them when imported (ortune.export.setting_problems), so the stages that build (build_onnx) and
# `make params` run them, while loading another stage's config neither imports nor reads the builder.
OnnxCheck = Callable[[str, DictConfig], Iterable[str]]
ONNX_CHECKS: list[OnnxCheck] = []


def add_onnx_check(check: OnnxCheck) -> OnnxCheck:
    """Run `check` on the export settings of every validated config (and of each onnx.candidates entry)."""
    if check not in ONNX_CHECKS:
        ONNX_CHECKS.append(check)
    return check


def _onnx_setting_problems(precision: str, o: DictConfig):
    if not 0.0 <= o.int8_share <= 1.0:
        yield f"onnx.int8_share={o.int8_share} must be in [0, 1]"
    if o.int8_share and (precision != "int4" or o.adapter != "merged"):
        yield (
            f"onnx.int8_share={o.int8_share} mixes int8 into an int4 model built from the merged model: "
            "set precision=int4 and onnx.adapter=merged, or onnx.int8_share=0"
        )
    allowed_values = {"block_size": BLOCK_SIZES, "accuracy_level": (0, 1, 2, 3, 4), "adapter": ("merged", "separate")}
    for key, allowed in allowed_values.items():
        if problem := choice_problem(f"onnx.{key}", o[key], allowed):
            yield problem
    if not o.quantize_ops:
        yield "onnx.quantize_ops is empty; list MatMul (and Gather to quantize the embeddings too)"
    if o.extra_adapters and o.adapter != "separate":
        yield "onnx.extra_adapters needs onnx.adapter=separate (adapters switch at run time only on an unmerged base)"
    if not 0.0 <= o.min_label_agreement <= 1.0:
        yield f"onnx.min_label_agreement={o.min_label_agreement} must be in [0, 1]"
    for key in ("intra_op_num_threads", "parity_prompts"):
        if o[key] < 0:
            meaning = "all cores" if key.startswith("intra") else "every eval prompt"
            yield f"onnx.{key}={o[key]} must be >= 0 (0 = {meaning})"
    for check in ONNX_CHECKS:
        yield from check(precision, o)


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
