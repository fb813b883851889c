"""Stage 2: (Q)LoRA fine-tuning with TRL's SFTTrainer on the prepared prompt/completion pairs.

Reads: models/base/, data/prepared/train.jsonl, `lora.*`, `train.*`, `seed`.
Writes: models/adapter/ (PEFT adapter + tokenizer), metrics/train.json (final loss, steps,
tokens/s), plots/train_loss.csv (the loss curve, a dvc plot).

`train.method=qlora` loads the base in 4-bit nf4 (double quantization; runs on CPU too);
`train.loss=completion` (default) trains on the label tokens only, `full` on the whole text.

    python scripts/train_qlora.py lora.r=8
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig

from ortune import data, modeling, stage, tracking
from ortune.artifacts import atomic_dir, write_text_atomic
from ortune.errors import OrtuneError

log = logging.getLogger("ortune")


def lora_config(cfg: DictConfig, model):
    from peft import LoraConfig

    linear = modeling.linear_module_names(model)
    missing = [name for name in cfg.lora.target_modules if name not in linear]
    if missing:
        raise OrtuneError(
            f"lora.target_modules: {', '.join(missing)} not in this model; its linear modules are: {', '.join(sorted(linear))}"
        )
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        bias=cfg.lora.bias,
        target_modules=list(cfg.lora.target_modules),
        modules_to_save=list(cfg.lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )


def sft_config(cfg: DictConfig, output_dir: str):
    import torch
    from trl import SFTConfig

    t = cfg.train
    return SFTConfig(
        output_dir=output_dir,
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        max_length=t.max_length,
        logging_steps=t.logging_steps,
        bf16=t.bf16,
        use_cpu=not torch.cuda.is_available(),
        completion_only_loss=t.loss == "completion",
        save_strategy="no",
        report_to=["wandb"] if tracking.wandb_run_active() else "none",
        dataloader_num_workers=0,
    )


def run(cfg: DictConfig) -> dict:
    from datasets import Dataset
    from trl import SFTTrainer

    base = Path(cfg.paths.base_model)
    train_rows = data.read_jsonl(Path(cfg.paths.prepared) / "train.jsonl")
    if cfg.train.loss == "completion":
        dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train_rows])
    else:
        dataset = Dataset.from_list([{"text": r["prompt"] + r["completion"]} for r in train_rows])
    tokenizer = modeling.load_tokenizer(base, cfg.model.trust_remote_code)
    model = modeling.load_causal_lm(base, cfg.model.trust_remote_code, quantize_4bit=cfg.train.method == "qlora")
    if cfg.train.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)

    with tempfile.TemporaryDirectory(prefix="ortune-train-") as scratch:
        trainer = SFTTrainer(
            model=model,
            args=sft_config(cfg, scratch),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(cfg, model),
        )
        started = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - started
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    epochs = trainer.state.epoch or 0.0
    tokens = sum(lengths) * epochs
    history = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]

    with atomic_dir(cfg.paths.adapter) as out:
        trainer.model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    write_text_atomic(Path(cfg.paths.plots) / "train_loss.csv", _csv([("step", "loss"), *history]))
    return {
        "final_loss": history[-1][1] if history else result.training_loss,
        "mean_train_loss": result.training_loss,
        "steps": trainer.state.global_step,
        "epochs": epochs,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "method": cfg.train.method,
    }


def _csv(rows) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


if __name__ == "__main__":
    stage.main("train_qlora", run, "train.json")
