"""train.*: how the adapter trains. Keys that TRL's SFTConfig has under the same name pass to it as they are
(ortune.training); the rest are translated or used before the trainer exists."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ortune.settings.fields import field_problems, group, setting
from ortune.settings.onnx import BLOCK_SIZES, onnx_candidate

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
DTYPES = ("float32", "bfloat16", "float16")
# train.seed and train.data_seed share one sentence
SEED_MESSAGE = "train.seed and train.data_seed must be {range} (or null)"


@dataclass
class QloraConfig:
    quant_type: str = setting(
        "4-bit type (`bnb_4bit_quant_type`)",
        choices=("nf4", "fp4"),
        renamed_from=("train.quant_type", "train.bnb_4bit_quant_type"),
    )
    double_quant: bool = setting(
        "quantize the quantization constants too (`bnb_4bit_use_double_quant`)",
        renamed_from=("train.double_quant", "train.bnb_4bit_use_double_quant"),
    )
    compute_dtype: str = setting(
        "dtype of the 4-bit layers' matmuls and of the adapter; `bfloat16` on GPUs",
        choices=DTYPES,
        renamed_from=("train.torch_dtype", "train.compute_dtype", "train.bnb_4bit_compute_dtype"),
    )
    quant_storage: str = setting(
        "storage dtype of the 4-bit weights; `bfloat16` lets FSDP shard them", choices=("uint8", *DTYPES)
    )


@dataclass
class QatConfig:
    block_size: int = setting(
        "`train.method=qat`: the int4 block size trained through; `onnx.block_size` must be the same",
        choices=BLOCK_SIZES,
    )


@dataclass
class TrainConfig:
    method: str = setting(
        "`lora`: on the full-precision base; `qlora`: on a 4-bit base; `qat`: LoRA trained through the export's "
        "int4 grid ([quantization-aware training](quantization.md); SmolLM2's default)",
        choices=("lora", "qlora", "qat"),
    )
    qlora: QloraConfig = group(QloraConfig, "the 4-bit base of train.method=qlora (bitsandbytes)")
    qat: QatConfig = group(QatConfig, "the int4 grid of train.method=qat")
    loss: str = setting(
        "`completion`: loss on the answer tokens only; `full`: on prompt and answer (`completion_only_loss`)",
        choices=("completion", "full"),
    )
    seed: int | None = setting(
        "trainer seed (LoRA init, dropout); `null` = top-level `seed` (42)", range=">= 0", message=SEED_MESSAGE
    )
    data_seed: int | None = setting("shuffling order; `null` = `train.seed`", range=">= 0", message=SEED_MESSAGE)
    learning_rate: float = setting("peak learning rate", range="> 0", renamed_from=("train.lr",))
    lr_scheduler_type: str = setting("learning-rate schedule", choices=LR_SCHEDULERS)
    warmup_ratio: float = setting(
        "warmup as a share of all steps (set this or `warmup_steps`)", range="[0, 1)", renamed_from=("train.warmup",)
    )
    warmup_steps: int = setting("warmup in steps", range=">= 0")
    num_train_epochs: float = setting("epochs (ignored when `max_steps` > 0)", renamed_from=("train.epochs",))
    max_steps: int = setting("optimizer steps; > 0 overrides the epochs, -1 = use the epochs")
    per_device_train_batch_size: int = setting(
        "rows per process per micro-batch", range=">= 1", renamed_from=("train.batch_size",)
    )
    per_device_eval_batch_size: int = setting("rows per process per eval batch", range=">= 1")
    gradient_accumulation_steps: int = setting("micro-batches per optimizer step", range=">= 1")
    gradient_checkpointing: bool = setting("recompute activations to save memory (non-reentrant)")
    max_length: int = setting(
        "tokens per row; longer rows are truncated",
        range=">= 8",
        renamed_from=("train.max_seq_length", "train.max_seq_len"),
    )
    group_by_length: bool = setting("batches of similar lengths: less padding (`train_sampling_strategy`)")
    logging_steps: int = setting("steps between loss logs (`plots/train_loss.csv`, W&B)", range=">= 1")
    eval_strategy: str = setting(
        "eval loss on the validation split (monitoring only, no checkpoint picking)",
        choices=("no", "steps", "epoch"),
        renamed_from=("train.evaluation_strategy",),
    )
    eval_steps: int = setting("steps between evals with `eval_strategy=steps`", range=">= 1")
    save_steps: int = setting("steps between resume checkpoints; `0` = none", range=">= 0")
    save_total_limit: int = setting("checkpoints kept", range=">= 1")
    adam_beta2: float = setting("AdamW beta2", range="(0, 1)")
    max_grad_norm: float = setting("gradient clipping", range="> 0")
    bf16: bool = setting("bf16 mixed precision (GPUs)")
    num_processes: int = setting(
        "processes per node; > 1 launches the stage through `train.launcher`",
        range=">= 1",
        renamed_from=("train.nproc_per_node",),
    )
    num_nodes: int = setting("nodes (each runs the stage with its own `train.node_rank`)", range=">= 1")
    node_rank: int = setting("this node's rank", range=">= 0")
    master_addr: str = setting("rendezvous host (multi-node; one node picks a free local port itself)")
    master_port: int = setting("rendezvous port (multi-node)", range=">= 1")
    launcher: str = setting(
        "how `num_processes` > 1 start; `accelerate` needs CUDA", choices=("torchrun", "accelerate")
    )
    accelerate_config: str | None = setting(
        "accelerate config file for `launcher=accelerate`, e.g. FSDP or DeepSpeed below"
    )


def problems(t: DictConfig):
    yield from field_problems(TrainConfig, t, "train.")
    if t.warmup_ratio and t.warmup_steps:
        yield "train.warmup_ratio and train.warmup_steps are both set; set one of them to 0"
    if t.max_steps <= 0 and not t.num_train_epochs > 0:
        yield "train.num_train_epochs must be > 0 unless train.max_steps is set (> 0)"
    if t.max_steps == 0 or t.max_steps < -1:
        yield f"train.max_steps={t.max_steps} must be -1 (use num_train_epochs) or > 0"
    if t.node_rank >= t.num_nodes:
        yield f"train.node_rank={t.node_rank} must be < train.num_nodes={t.num_nodes}"
    if t.accelerate_config and t.launcher != "accelerate":
        yield f"train.accelerate_config={t.accelerate_config} needs train.launcher=accelerate"


def qat_problems(cfg: DictConfig):
    """train.method=qat trains through one int4 grid: every int4 build must use exactly that grid."""
    if cfg.train.method != "qat":
        return
    block = cfg.train.qat.block_size
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
