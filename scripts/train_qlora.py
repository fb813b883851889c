"""Stage 2: (Q)LoRA fine-tuning with TRL's SFTTrainer on the prepared prompt/completion pairs.

Reads: models/base/, data/prepared/{train,eval}.jsonl, `lora.*`, `train.*`, `seed`,
`model.trust_remote_code`. Writes: models/adapter/ (PEFT adapter + tokenizer), metrics/train.json
(losses, steps, tokens/s, padding waste), plots/train_loss.csv (the loss curve, a dvc plot).

- `train.method=qlora` trains against the base loaded in 4-bit (bitsandbytes nf4, double
  quantization; CPU and CUDA); merge later folds the adapter into the full-precision base.
- `train.method=qat` trains the LoRA through the int4 grid the export will use (`train.qat.block_size`,
  the builder's symmetric round-to-nearest): frozen layers hold their rounded weights, adapted layers
  compute with their rounded merged weight (straight-through gradient), so the int4 model ships what
  was trained (ortune.quantize; merge writes the rounded weights, models/adapter/quantization_aware.json
  records the grid).
- `train.loss=completion` (default) trains on the answer tokens only, `full` on the whole text.
- Checkpoints every `train.save_steps` go to models/.checkpoints/adapter-<fingerprint>/, outside the
  outs DVC deletes: a run killed mid-training (SIGTERM: checkpoint at the next step; SIGKILL: the
  last one) resumes on the next run with the same settings and inputs, and ends with the same adapter.
- `train.num_processes=N` runs N processes (DDP) through torchrun or accelerate (ortune.launch).

    python scripts/train_qlora.py lora.r=8 train.method=qlora
    python scripts/train_qlora.py train.method=qat train.qat.block_size=32 onnx.block_size=32 lora.dropout=0
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from ortune import data, launch, modeling, quantize, tracking
from ortune.artifacts import write_text_atomic
from ortune.checkpoints import checkpoint_dir, checkpoint_step, fingerprint, remove_checkpoints, resumable_checkpoint
from ortune.stage import Terminated

log = logging.getLogger("ortune")


def run(cfg: DictConfig) -> dict:
    from transformers import set_seed

    from ortune import training

    world_size = launch.check_world_size(cfg.train)
    base, prepared, adapter = Path(cfg.paths.base_model), Path(cfg.paths.prepared), Path(cfg.paths.adapter)
    train_rows = data.read_jsonl(prepared / "train.jsonl")
    eval_rows = data.read_jsonl(prepared / "validation.jsonl") if cfg.train.eval_strategy != "no" else []
    code = [Path(__file__), Path(training.__file__), Path(modeling.__file__), Path(quantize.__file__)]
    checkpoints = checkpoint_dir(
        adapter, fingerprint(cfg, [base, prepared / "train.jsonl", prepared / "validation.jsonl", *code])
    )
    resume = resumable_checkpoint(checkpoints, world_size, tidy=launch.rank() == 0)

    # seeded before the LoRA weights are initialised (inside the trainer, before it seeds itself)
    set_seed(training.train_seed(cfg))
    tokenizer = modeling.load_tokenizer(base, cfg.model.trust_remote_code)
    model = training.load_model(cfg, base)
    trainer = training.Trainer(
        model=model,
        args=training.sft_config(cfg, checkpoints, has_eval=bool(eval_rows)),
        train_dataset=training.sft_dataset(train_rows),
        eval_dataset=training.sft_dataset(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
        peft_config=training.peft_config(cfg.lora, model),
    )
    training.keep_adapter_dtype(cfg, trainer)
    grid = quantize.grid_record(cfg.train.qat.block_size) if cfg.train.method == "qat" else None
    if grid:
        layers = quantize.make_quantization_aware(trainer.model, grid["block_size"])
        log.info("quantization-aware: %d linear layers compute on the int4 grid (block %d)", layers, grid["block_size"])
    stopper = training.StopOnSigterm(can_save=cfg.train.save_steps > 0)
    trainer.add_callback(stopper)
    if tracking.current().active:
        trainer.add_callback(training.TrackerCallback(tracking.current()))
    if resume:
        log.info("resuming from %s", resume)
    started = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stopper.close()
    seconds = time.perf_counter() - started
    if stopper.stopped_at is not None:
        saved = f"checkpoint saved in {checkpoints}" if cfg.train.save_steps else "no checkpoint (train.save_steps=0)"
        log.warning("stopped by SIGTERM at step %d; %s; the next run resumes there", stopper.stopped_at, saved)
        raise Terminated()
    metrics = training.summary(trainer, result, seconds, resumed_from=checkpoint_step(resume) if resume else 0)
    metrics["method"] = cfg.train.method
    metrics["truncated_rows"] = training.rows_longer_than(train_rows, tokenizer, cfg.train.max_length)
    if metrics["truncated_rows"]:
        log.warning(
            "%d training rows are longer than train.max_length=%d: truncated (rows that lost their "
            "whole answer are dropped)",
            metrics["truncated_rows"],
            cfg.train.max_length,
        )

    extra = {quantize.GRID_FILE: json.dumps(grid, indent=2) + "\n"} if grid else None
    training.save_adapter(trainer, checkpoints / "final", adapter, extra_files=extra)
    if trainer.is_world_process_zero():
        write_text_atomic(
            Path(cfg.paths.plots) / "train_loss.csv", _csv([("step", "loss"), *training.loss_history(trainer)])
        )
        remove_checkpoints(checkpoints)
    log.info(
        "trained %d steps in %.1f s; padding waste %.1f%%", metrics["steps"], seconds, 100 * metrics["padding_waste"]
    )
    return metrics


def _csv(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


if __name__ == "__main__":
    launch.main("train_qlora", run, "train.json", script=__file__)
