"""Fine-tuning with TRL's SFTTrainer: `train.*` and `lora.*` -> trainer arguments, a SIGTERM that stops at
a checkpoint (where the checkpoints live and which one resumes: ortune.checkpoints), and the accounting
(padding waste, tokens/s) behind metrics/train.json."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import signal
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from ortune import modeling
from ortune.errors import OrtuneError
from ortune.settings.train import TrainConfig

log = logging.getLogger("ortune")

# Every train.* key reaches the trainer: translated in sft_config, used before the trainer exists (model
# loading, launching), or, for every other key SFTConfig has a field of that name, passed as it is
# (SAME_NAME): TRL's own names and validation are the authority for those, with no copy kept here. A key
# in none of them (one TRL renamed or dropped) stops sft_config naming it, and a test keeps the three
# equal to the schema, so a key cannot be accepted and then silently ignored.
TRANSLATED = (
    "seed",
    "data_seed",
    "warmup_ratio",
    "warmup_steps",
    "group_by_length",
    "eval_strategy",
    "save_steps",
    "loss",
    "gradient_checkpointing",
)
BEFORE_TRAINER = (
    "method",
    "qlora",
    "qat",
    "num_processes",
    "num_nodes",
    "node_rank",
    "master_addr",
    "master_port",
    "launcher",
    "accelerate_config",
)
SAME_NAME = tuple(
    name
    for name in (f.name for f in dataclasses.fields(TrainConfig))
    if name in {f.name for f in dataclasses.fields(SFTConfig)} and name not in {*TRANSLATED, *BEFORE_TRAINER}
)


def train_seed(cfg: DictConfig) -> int:
    return cfg.seed if cfg.train.seed is None else cfg.train.seed


def sft_config(cfg: DictConfig, output_dir: Path, *, has_eval: bool) -> SFTConfig:
    import torch

    t = cfg.train
    routed = {*SAME_NAME, *TRANSLATED, *BEFORE_TRAINER}
    if unrouted := [f"train.{f.name}" for f in dataclasses.fields(TrainConfig) if f.name not in routed]:
        raise OrtuneError(
            f"{', '.join(unrouted)}: trl {metadata.version('trl')}'s SFTConfig has no argument of that name and "
            "ortune.training does not translate it (TRANSLATED, BEFORE_TRAINER)"
        )
    seed = train_seed(cfg)
    return SFTConfig(
        output_dir=str(output_dir),
        **{key: t[key] for key in SAME_NAME},
        seed=seed,
        data_seed=seed if t.data_seed is None else t.data_seed,
        # transformers 5 reads a float below 1 in warmup_steps as a ratio of all steps
        warmup_steps=t.warmup_steps or t.warmup_ratio,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        eval_strategy=t.eval_strategy if has_eval else "no",
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 1,  # unused without a save strategy, but must be positive
        completion_only_loss=t.loss == "completion",
        use_cpu=not torch.cuda.is_available(),
        # transformers 5's name for gradient checkpointing; non-reentrant works with frozen embeddings and DDP
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        ddp_find_unused_parameters=False,
        # W&B gets the logs through TrackerCallback, into the stage's own run
        report_to="none",
        dataloader_num_workers=0,
    )


# PEFT's shorthand for "every linear layer except the output head"
ALL_LINEAR = "all-linear"


def peft_config(lora: DictConfig, model):
    from peft import LoraConfig

    targets = list(lora.target_modules)
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise OrtuneError(
                f"lora.target_modules={targets}: {ALL_LINEAR} already names every linear layer; list it alone"
            )
        # PEFT expands its shorthand itself, only as a string: every Linear but the output layer
        targets = ALL_LINEAR
    else:
        linear = modeling.linear_module_names(model)
        missing = [name for name in targets if name not in linear]
        if missing:
            raise OrtuneError(
                f"lora.target_modules: {', '.join(missing)} not in this model; its linear modules are: "
                f"{', '.join(sorted(linear))} (or {ALL_LINEAR})"
            )
    modules = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [name for name in lora.modules_to_save if name not in modules]
    if unknown:
        raise OrtuneError(
            f"lora.modules_to_save: {', '.join(unknown)} not in this model; name modules it has (e.g. lm_head)"
        )
    values = {
        **OmegaConf.to_container(lora),
        "target_modules": targets,
        "modules_to_save": list(lora.modules_to_save) or None,
    }
    return LoraConfig(**{peft_name(key): value for key, value in values.items()}, task_type="CAUSAL_LM")


def peft_name(key: str) -> str:
    """PEFT's name for lora.<key>: its own field of that name, or its `lora_`-prefixed one (alpha -> lora_alpha).
    PEFT's names and validation are the authority: no table of ours to keep in step with it."""
    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig)}
    for name in (key, f"lora_{key}"):
        if name in names:
            return name
    raise OrtuneError(
        f"lora.{key}: peft {metadata.version('peft')}'s LoraConfig has no field {key} or lora_{key}, "
        "so ortune.training cannot pass it on"
    )


def load_model(cfg: DictConfig, base: Path):
    """The base to train: full precision for LoRA, 4-bit (train.qlora.*) for QLoRA."""
    qlora = cfg.train.method == "qlora"
    model = modeling.load_causal_lm(base, cfg.model.trust_remote_code, quantization=cfg.train.qlora if qlora else None)
    if qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model


def keep_adapter_dtype(cfg: DictConfig, trainer: Trainer) -> None:
    """QLoRA: TRL casts every trainable weight to bfloat16 (the QLoRA paper's choice for GPUs), whatever
    the compute dtype. Ortune keeps them in train.qlora.compute_dtype instead, so float32 on CPU trains
    the adapter (and modules_to_save) at full precision, and bfloat16 on GPUs stays as TRL does it."""
    import torch

    if cfg.train.method != "qlora":
        return
    dtype = getattr(torch, cfg.train.qlora.compute_dtype)
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def sft_dataset(rows: list[dict]):
    """Prompt/completion pairs; chat rows hold message lists, which TRL renders with the chat template."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])


def rows_longer_than(rows: list[dict], tokenizer, max_length: int) -> int:
    """Rows whose full training sequence exceeds max_length (TRL truncates them silently)."""
    count = 0
    for row in rows:
        if isinstance(row["prompt"], str):
            text = row["prompt"] + row["completion"] + (tokenizer.eos_token or "")
        else:
            text = tokenizer.apply_chat_template([*row["prompt"], *row["completion"]], tokenize=False)
        count += len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_length
    return count


def score_only_labelled_positions_on_cpu() -> bool:
    """Make TRL's fused LM head score only the labelled positions on the CPU, as it does on CUDA.

    SFTTrainer's loss projects hidden states onto the vocabulary in chunks (trl.trainer.utils's fused LM
    head). On a device without Triton it scores every position, so that XLA/Neuron see one tile shape
    per batch and do not recompile; eager CPU compiles nothing. With the completion-only loss about 7 %
    of the positions carry a label, and projecting the rest onto 49k words was a third of SmolLM2's step:
    scoring only the labelled ones made a training step 1.49x faster on one core (Intel, measured side by
    side), with the same loss to 1e-5 (per-position results do not depend on which other rows are scored).
    Returns False, changing nothing, when TRL no longer decides this through `_use_triton` (a test fails then).
    """
    from trl.trainer import utils

    decide = getattr(utils, "_use_triton", None)
    if decide is None:
        return False
    if getattr(decide, "ortune_cpu_compact", False):
        return True

    def compact(device) -> bool:
        return device.type == "cpu" or decide(device)

    compact.ortune_cpu_compact = True
    utils._use_triton = compact  # rebinds trl.trainer.utils's name only: TRL's kernel choice stays its own
    return True


class Trainer(SFTTrainer):
    """SFTTrainer that counts the tokens of every training batch, real and padded, so that tokens/s
    and padding waste are measured on what was actually computed, and scores only labelled positions."""

    def __init__(self, *args, **kwargs):
        score_only_labelled_positions_on_cpu()
        super().__init__(*args, **kwargs)
        self.real_tokens = 0
        self.batch_tokens = 0
        self.first_step_at: float | None = None

    def training_step(self, model, inputs, *args, **kwargs):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        self.batch_tokens += ids.numel()
        self.real_tokens += int(mask.sum()) if mask is not None else ids.numel()
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs and self.first_step_at is not None:
            elapsed = time.perf_counter() - self.first_step_at
            logs["tokens_per_second"] = self.real_tokens * self.args.world_size / elapsed if elapsed else 0.0
        super().log(logs, start_time)

    def token_totals(self) -> tuple[int, int]:
        """(real, padded) tokens over all processes; every process must call it."""
        import torch
        import torch.distributed as dist

        totals = torch.tensor([self.real_tokens, self.batch_tokens], dtype=torch.long)
        if dist.is_available() and dist.is_initialized():
            totals = totals.to(self.args.device)
            dist.all_reduce(totals)
        real, batch = (int(v) for v in totals.tolist())
        return real, batch


class TrackerCallback(TrainerCallback):
    """The trainer's logs (loss, eval loss, learning rate, grad norm, tokens/s) into the stage's W&B
    run. transformers' own WandbCallback looks only at wandb.run, which the stage's run
    (reinit="create_new") leaves unset, so it would open a second run."""

    def __init__(self, tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            named = {f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}": v for k, v in logs.items()}
            self.tracker.log(named, step=state.global_step)


class StopOnSigterm(TrainerCallback):
    """SIGTERM (`kill`, a scheduler's preemption) ends training at the end of the current step with a
    checkpoint, so the rerun resumes there; a second SIGTERM kills at once. All processes agree on the
    step to stop at (a process that stopped alone would hang the others)."""

    def __init__(self, can_save: bool):
        self.requested = False
        self.stopped_at: int | None = None
        self.can_save = can_save
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGTERM, self._previous)

    def on_step_end(self, args, state, control, **kwargs):
        if _any_process(self.requested):
            self.requested = True
            self.stopped_at = state.global_step
            control.should_training_stop = True
            control.should_save = self.can_save
        return control

    def close(self) -> None:
        if signal.getsignal(signal.SIGTERM) == self._handle:
            signal.signal(signal.SIGTERM, self._previous)


def _any_process(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def save_adapter(trainer: Trainer, staging: Path, adapter: Path, extra_files: dict[str, str] | None = None) -> None:
    """Every process calls this: under FSDP or DeepSpeed the adapter's shards are gathered first.
    Process 0 then moves it (the tokenizer, and `extra_files`: name -> text) into place atomically."""
    from ortune.artifacts import atomic_dir

    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        with atomic_dir(adapter) as out:
            for item in staging.iterdir():
                # the pickled trainer arguments hold this run's paths: not part of the adapter
                if item.name != "training_args.bin":
                    shutil.move(str(item), out / item.name)
        shutil.rmtree(staging, ignore_errors=True)


def summary(trainer: Trainer, result, seconds: float, resumed_from: int) -> dict:
    """metrics/train.json: losses, steps, speed and padding waste (padding tokens / tokens processed)."""
    import torch

    history = trainer.state.log_history
    losses = [e["loss"] for e in history if "loss" in e]
    eval_losses = [e["eval_loss"] for e in history if "eval_loss" in e]
    real, batch = trainer.token_totals()
    metrics = {
        "final_loss": losses[-1] if losses else result.training_loss,
        "mean_train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch or 0.0,
        "train_seconds": seconds,
        "tokens_per_second": real / seconds if seconds else 0.0,
        "padding_waste": (batch - real) / batch if batch else 0.0,
        "world_size": trainer.args.world_size,
        # float sums round differently with the thread count: the same seed on another count gives other
        # losses (SmolLM2's default: accuracy 0.958 on one thread, 0.951 on two)
        "threads": torch.get_num_threads(),
        "resumed_from_step": resumed_from,
    }
    if eval_losses:
        metrics["eval_loss"] = eval_losses[-1]
    return metrics


def loss_history(trainer: Trainer) -> list[tuple]:
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
