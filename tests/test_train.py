"""Training runs on a tiny Phi-3 (hidden 64, 1 layer), in process: QLoRA on CPU and its merge into
the full-precision base, the loss masks, chat data, padding, determinism and what reaches W&B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ortune import config, data

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model=tiny-phi3",
    "model.tiny.hidden_size=64",
    "model.tiny.intermediate_size=128",
    "model.tiny.num_attention_heads=2",
    "model.tiny.vocab_size=600",
    "model.tiny.max_position_embeddings=128",
]
# short runs that still cross epochs, checkpoints, evals and logging
SHORT = [
    "train.max_steps=10",
    "train.save_steps=4",
    "train.logging_steps=2",
    "train.eval_strategy=steps",
    "train.eval_steps=5",
    "train.per_device_eval_batch_size=72",
]


def compose(root: Path, *overrides: str, stage: str | None = "train_qlora"):
    paths = [
        f"paths.{name}={root / name}"
        for name in ("base_model", "prepared", "adapter", "merged", "onnx", "metrics", "plots")
    ]
    full = config.validate(config.compose([*paths, *TINY, *overrides], config_dir=REPO / "conf"), "test")
    return config.stage_view(full, config.declared_params(stage, REPO / "dvc.yaml")) if stage else full


def fetch_and_prepare(root: Path) -> Path:
    """root/base_model (the tiny base model) and root/prepared (the tones data prepared as text)."""
    import fetch_model
    import prepare_data

    fetch_model.run(compose(root, stage=None))
    prepare_data.run(compose(root, stage=None))
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny base model and prepared data, shared by every run of this module."""
    return fetch_and_prepare(tmp_path_factory.mktemp("train"))


def train(base: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    """Run the train_qlora stage into <base>/<name>/ (sharing the base model and data)."""
    import train_qlora

    out = base / name
    cfg = compose(base, f"paths.adapter={out / 'adapter'}", f"paths.plots={out / 'plots'}", *overrides)
    return train_qlora.run(cfg), out / "adapter"


def adapter_bytes(adapter: Path) -> bytes:
    return (adapter / "adapter_model.safetensors").read_bytes()


def test_same_seed_gives_bit_identical_adapter_weights(base):
    first, a = train(base, "det-a", *SHORT)
    _, b = train(base, "det-b", *SHORT)
    _, c = train(base, "det-c", *SHORT, "train.seed=7")
    assert adapter_bytes(a) == adapter_bytes(b)
    assert adapter_bytes(a) != adapter_bytes(c)  # the seed matters, so the equality above means something
    assert first["steps"] == 10 and first["resumed_from_step"] == 0
    assert not (base / "det-a" / ".checkpoints").exists()  # removed after a successful run
    assert 0.0 < first["padding_waste"] < 0.15 and first["tokens_per_second"] > 0
    curve = (base / "det-a" / "plots" / "train_loss.csv").read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 1 + 10 // 2
    # 10 steps learn something: the loss falls well below the untrained model's (~6.4; 5.8 after them)
    untrained = untrained_loss(base, data.read_jsonl(base / "prepared" / "train.jsonl")[:32])
    assert 5.5 < untrained < 7.5, untrained
    assert first["final_loss"] < untrained - 0.3 and first["eval_loss"] < untrained - 0.3, (first, untrained)
    assert float(curve[-1].split(",")[1]) < float(curve[1].split(",")[1])


def untrained_loss(base: Path, rows: list[dict]) -> float:
    """The base model's mean answer loss on rows, measured with transformers alone (not the trainer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base / "base_model", dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(base / "base_model")
    losses = []
    with torch.inference_mode():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            answer = tokenizer(row["completion"])["input_ids"] + [tokenizer.eos_token_id]
            ids, labels = torch.tensor([prompt + answer]), torch.tensor([[-100] * len(prompt) + answer])
            losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_qlora_trains_on_cpu_and_merges_into_the_full_precision_base(base):
    import torch

    import merge

    metrics, adapter = train(base, "qlora", "train.method=qlora", "train.max_steps=6", "train.eval_strategy=no")
    assert metrics["method"] == "qlora" and metrics["steps"] == 6
    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(t.dtype == torch.float32 for t in lora_b) and any(t.abs().sum() > 0 for t in lora_b)

    cfg = compose(base, f"paths.adapter={adapter}", f"paths.merged={base / 'qlora' / 'merged'}", stage="merge")
    checked = merge.run(cfg)
    assert checked["max_abs_logit_diff"] < 1e-4
    merged_config = json.loads((base / "qlora" / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_config  # full precision: the builder quantizes to int4 itself
    merged = load_file(base / "qlora" / "merged" / "model.safetensors")
    assert merged["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.float32


def _prepared_trainer(base: Path, rows: list[dict], *overrides: str):
    """The trainer as the stage builds it, without training: its dataset holds the labels the loss uses."""
    from ortune import modeling, training

    cfg = compose(base, *overrides)
    model = training.load_model(cfg, Path(cfg.paths.base_model))
    return training.Trainer(
        model=model,
        args=training.sft_config(cfg, base / "unused", has_eval=False),
        train_dataset=training.sft_dataset(rows),
        processing_class=modeling.load_tokenizer(cfg.paths.base_model),
        peft_config=training.peft_config(cfg.lora, model),
    )


@pytest.mark.parametrize("loss", ["completion", "full"])
def test_loss_covers_the_answer_only_or_the_whole_text(base, loss):
    rows = data.read_jsonl(base / "prepared" / "train.jsonl")[:4]
    trainer = _prepared_trainer(base, rows, f"train.loss={loss}")
    tokenizer = trainer.processing_class
    for row, example in zip(rows, trainer.train_dataset):
        trained = [t for t in example["labels"] if t != -100]
        if loss == "completion":
            assert tokenizer.decode(trained) == row["completion"] + tokenizer.eos_token
        else:
            assert trained == example["input_ids"]


def test_chat_rows_train_on_the_prompt_inference_uses(base, tmp_path):
    """A question/answer set in chat format: the training sequence starts with exactly the tokens
    eval and build_onnx prompt with (data.prompt_text), and only the answer turn is learned."""
    import prepare_data

    source = tmp_path / "qa.csv"
    pairs = [
        ("Is fire hot?", "yes"),
        ("Is ice hot?", "no"),
        ("Do fish swim?", "yes"),
        ("Do cats bark?", "no"),
        ("Is snow white?", "yes"),
        ("Can stones fly?", "no"),
    ]
    source.write_text("question,answer\n" + "".join(f"{q},{a}\n" for q, a in pairs))
    prepared = tmp_path / "prepared"
    chat = [
        "data.format=chat",
        "data.input_column=question",
        "data.output_column=answer",
        f"data.path={source}",
        f"paths.prepared={prepared}",
    ]
    prepare_data.run(compose(base, *chat, "data.test_fraction=0.34", stage=None))
    rows = data.read_jsonl(prepared / "train.jsonl")
    trainer = _prepared_trainer(base, rows)
    tokenizer = trainer.processing_class
    for row, example in zip(rows, trainer.train_dataset):
        prompt = data.prompt_text(row["prompt"], base / "base_model")
        assert prompt == f"<|user|>\n{row['prompt'][0]['content']}<|end|>\n<|assistant|>\n"
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert example["input_ids"][: len(prompt_ids)] == prompt_ids
        answer = tokenizer.decode([t for t in example["labels"] if t != -100])
        assert answer.startswith(row["label"] + "<|end|>")

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # train.json records the count the losses depend on, whatever the machine's
    try:
        metrics, adapter = train(
            base, "chat", *chat, "train.max_steps=4", "train.eval_strategy=epoch", "train.per_device_train_batch_size=2"
        )
    finally:
        torch.set_num_threads(threads)
    assert metrics["steps"] == 4 and "eval_loss" in metrics and (adapter / "adapter_model.safetensors").is_file()
    assert metrics["threads"] == 1


def _padding_waste(trainer) -> float:
    real = total = 0
    for batch in trainer.get_train_dataloader():
        real += int(batch["attention_mask"].sum())
        total += batch["attention_mask"].numel()
    return (total - real) / total


def test_length_grouping_keeps_padding_waste_low(base):
    rows = data.read_jsonl(base / "prepared" / "train.jsonl")
    grouped = _padding_waste(_prepared_trainer(base, rows))
    shuffled = _padding_waste(_prepared_trainer(base, rows, "train.group_by_length=false"))
    assert grouped < 0.1 < shuffled, (grouped, shuffled)


def test_loss_lr_grad_norm_and_tokens_per_second_reach_the_wandb_run(base, tmp_path, monkeypatch):
    import wandb

    import train_qlora
    from ortune import tracking

    logged: list[dict] = []
    original = wandb.Run.log

    def recording(self, data, *args, **kwargs):
        logged.append(dict(data))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", recording)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "fake-wandb-secret-0123")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_secret_4567")
    cfg = compose(base, f"paths.adapter={tmp_path / 'adapter'}", f"paths.plots={tmp_path / 'plots'}", *SHORT)
    with tracking.open_run("train_qlora", cfg):
        train_qlora.run(cfg)
    keys = {key for entry in logged for key in entry}
    for key in ("train/loss", "eval/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"):
        assert key in keys, sorted(keys)
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    for file in (p for p in run_dir.rglob("*") if p.is_file()):
        content = file.read_bytes()
        assert b"fake-wandb-secret-0123" not in content and b"hf_fake_secret_4567" not in content, file


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_cuda_trains_bfloat16_adapters_with_the_gpu_preset(base):
    import torch

    metrics, adapter = train(
        base, "cuda", "train=gpu", "train.max_steps=4", "train.eval_strategy=no", "train.max_length=128"
    )
    assert metrics["method"] == "qlora" and metrics["steps"] == 4
    weights = load_file(adapter / "adapter_model.safetensors")
    assert all(v.dtype == torch.bfloat16 for k, v in weights.items() if "lora_" in k)


def test_rows_longer_than_max_length_are_truncated_and_counted(base):
    metrics, adapter = train(base, "short-rows", "train.max_steps=2", "train.max_length=24")
    assert metrics["truncated_rows"] > 0 and (adapter / "adapter_model.safetensors").is_file()
    full, _ = train(base, "long-rows", "train.max_steps=2")
    assert full["truncated_rows"] == 0


def test_the_fused_lm_head_scores_only_labelled_positions_on_cpu_with_the_same_results(monkeypatch):
    # TRL scores every position on devices without Triton; ortune makes the CPU score only the labelled
    # ones (a third of SmolLM2's training step). Fails when TRL stops deciding through `_use_triton`.
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import kernels
    from trl.trainer import utils

    from ortune import training

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=300)
    )
    utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, 300, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]  # completion-only: the last 3 tokens of each row
    scored = []
    apply = utils._ChunkedLogProbFunction.apply

    def counting(hidden, *args):
        scored.append(hidden.shape[0])
        return apply(hidden, *args)

    monkeypatch.setattr(utils._ChunkedLogProbFunction, "apply", counting)
    monkeypatch.setattr(utils, "_use_triton", kernels.chunked_logprob._use_triton)  # TRL's own choice
    every = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert scored == [3 * 11]  # TRL on the CPU: every shifted position

    assert training.score_only_labelled_positions_on_cpu() and training.score_only_labelled_positions_on_cpu()
    labelled = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert scored[1:] == [3 * 3]
    for name in ("log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(labelled, name), getattr(every, name), atol=1e-6, rtol=1e-6)
    assert utils._use_triton(torch.device("meta")) is kernels.chunked_logprob._use_triton(torch.device("meta"))
