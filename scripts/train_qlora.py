"""Stage 2: (Q)LoRA fine-tuning with TRL's SFTTrainer on the prepared prompt/completion pairs.

Reads: models/base/, data/prepared/{train,eval}.jsonl, `lora.*`, `train.*`, `seed`,
`model.trust_remote_code`. Writes: models/adapter/ (PEFT adapter + tokenizer), metrics/train.json
(losses, steps, tokens/s, padding waste), plots/train_loss.csv (the loss curve, a dvc plot).

- `train.method=qlora` trains against the base loaded in 4-bit (bitsandbytes nf4, double
  quantization; CPU and CUDA); merge later folds the adapter into the full-precision base.
- `train.loss=completion` (default) trains on the answer tokens only, `full` on the whole text.
- Checkpoints every `train.save_steps` go to models/.checkpoints/adapter-<fingerprint>/, outside the
  outs DVC deletes: a run killed mid-training (SIGTERM: checkpoint at the next step; SIGKILL: the
  last one) resumes on the next run with the same settings and inputs, and ends with the same adapter.
- `train.num_processes=N` runs N processes (DDP) through torchrun or accelerate (ortune.launch).

    python scripts/train_qlora.py lora.r=8 train.method=qlora
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from ortune import data, launch, modeling, tracking
from ortune.artifacts import write_text_atomic
from ortune.stage import Terminated

log = logging.getLogger("ortune")


def run(cfg: DictConfig) -> dict:
    from transformers import set_seed

    from ortune import training

    world_size = launch.check_world_size(cfg.train)
    base, prepared, adapter = Path(cfg.paths.base_model), Path(cfg.paths.prepared), Path(cfg.paths.adapter)
    train_rows = data.read_jsonl(prepared / "train.jsonl")
    eval_rows = data.read_jsonl(prepared / "eval.jsonl") if cfg.train.eval_strategy != "no" else []
    code = [Path(__file__), Path(training.__file__), Path(modeling.__file__)]
    checkpoints = training.checkpoint_dir(
        adapter, training.fingerprint(cfg, [base, prepared / "train.jsonl", prepared / "eval.jsonl", *code])
    )
    resume = training.resumable_checkpoint(checkpoints, world_size, tidy=launch.rank() == 0)

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
    metrics = training.summary(trainer, result, seconds, resumed_from=training.checkpoint_step(resume) if resume else 0)
    metrics["method"] = cfg.train.method
    metrics["truncated_rows"] = training.rows_longer_than(train_rows, tokenizer, cfg.train.max_length)
    if metrics["truncated_rows"]:
        log.warning("%d training rows are longer than train.max_length=%d: truncated (rows that lost their "
                    "whole answer are dropped)", metrics["truncated_rows"], cfg.train.max_length)

    training.save_adapter(trainer, checkpoints / "final", adapter)
    if trainer.is_world_process_zero():
        write_text_atomic(Path(cfg.paths.plots) / "train_loss.csv", _csv([("step", "loss"), *training.loss_history(trainer)]))
        training.remove_checkpoints(checkpoints)
    log.info("trained %d steps in %.1f s; padding waste %.1f%%", metrics["steps"], seconds, 100 * metrics["padding_waste"])
    return metrics


def _csv(rows) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


if __name__ == "__main__":
    launch.main("train_qlora", run, "train.json", script=__file__)
