"""Eval on real (tiny, random) models: PyTorch generation batched like unbatched, latency timing of
both runtimes, and the eval stage run by hand writing its metrics, pictures and W&B media."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import EVAL_HEADLINE_METRICS
from ortune import data, export, modeling
from ortune.generation import OnnxGenerator, TorchGenerator
from ortune.records import read_records

REPO = Path(__file__).resolve().parents[1]
TINY = OmegaConf.create(
    {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 256,
        "vocab_size": 600,
    }
)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_texts):
    """base, adapter (taught the labels of the eval rows: base + adapter answers them, the bare random
    base does not), merged and an fp32 ONNX export of it, plus a prepared split of the real dataset:
    the folders the eval stage reads."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("eval-models")
    records = read_records(REPO / "data/raw/tones.jsonl")
    rendered = [data.render(r, "### Text: {phrase}\n### The tone is:\n", "{tone}", "tone") for r in records]
    modeling.build_tiny_phi3(TINY, tiny_texts, seed=5, out_dir=root / "base_model")
    tokenizer = modeling.load_tokenizer(root / "base_model")
    peft_model = get_peft_model(
        modeling.load_causal_lm(root / "base_model"),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM"
        ),
    )
    teach(peft_model, tokenizer, rendered[1::4][:24])
    peft_model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    peft_model.merge_and_unload().save_pretrained(root / "merged")
    tokenizer.save_pretrained(root / "merged")
    (root / "onnx").mkdir()
    export.run_builder(root / "merged", root / "onnx", "fp32", "cpu", {}, log_file=root / "onnx.build.log")

    (root / "prepared").mkdir()
    data.write_jsonl(rendered[::4][:100], root / "prepared" / "train.jsonl")
    data.write_jsonl(rendered[1::4][:24], root / "prepared" / "test.jsonl")
    data.write_jsonl(rendered[3::4][:8], root / "prepared" / "validation.jsonl")
    (root / "prepared" / "labels.json").write_text(json.dumps(sorted({r["label"] for r in rendered})))
    return root


def teach(model, tokenizer, rows: list[dict], steps: int = 120) -> None:
    """Train the adapter's weights until base + adapter answers these prompts with their labels."""
    import torch

    torch.manual_seed(5)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pairs = []
    for row in rows:
        prompt, answer = tokenizer(row["prompt"])["input_ids"], tokenizer(row["completion"])["input_ids"] + [end]
        pairs.append((prompt + answer, [-100] * len(prompt) + answer))
    width = max(len(ids) for ids, _ in pairs)
    ids = torch.tensor([i + [end] * (width - len(i)) for i, _ in pairs])
    labels = torch.tensor([t + [-100] * (width - len(t)) for _, t in pairs])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in pairs])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small: a second thread only waits, and on a busy machine 20x slower
    try:
        model.train()
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def prompts(root: Path, n: int) -> list[str]:
    return [r["prompt"] for r in data.read_jsonl(root / "prepared" / "test.jsonl")][:n]


def test_batched_left_padded_generation_matches_one_prompt_at_a_time(models):
    generator = TorchGenerator(
        modeling.load_causal_lm(models / "base_model"), modeling.load_tokenizer(models / "base_model")
    )
    batch = prompts(models, 10)
    assert len({len(generator.encode(p)) for p in batch}) > 1, "the test needs prompts of different lengths"
    batched = generator.generate_batch(batch, max_new_tokens=6)
    single = [generator.generate(p, max_new_tokens=6) for p in batch]
    assert [(g.text, g.new_tokens) for g in batched] == [(g.text, g.new_tokens) for g in single]
    assert all(1 <= g.new_tokens <= 6 for g in batched)


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_token_times_decode_exactly_the_requested_tokens(models, runtime):
    if runtime == "onnx":
        generator = OnnxGenerator(models / "onnx")
    else:
        generator = TorchGenerator(
            modeling.load_causal_lm(models / "merged"), modeling.load_tokenizer(models / "merged")
        )
    times = generator.token_times(prompts(models, 1)[0], 12)
    assert len(times) == 12
    assert 0 < times[0] and all(a < b for a, b in zip(times, times[1:]))


def test_judge_in_a_fresh_process_reports_its_own_memory(models):
    from ortune import evaluation

    spec = {
        "kind": "onnx",
        "dirs": {
            k: str(models / v)
            for k, v in {"onnx": "onnx", "base": "base_model", "adapter": "adapter", "merged": "merged"}.items()
        },
        "trust_remote_code": False,
        "prompts": prompts(models, 4),
        "max_new_tokens": 4,
        "batch_size": 2,
        "latency": {"new_tokens": 4, "warmup": 1, "repeats": 2},
    }
    result = evaluation.judge_in_fresh_process(spec)
    assert len(result["generations"]) == 4 and result["generated_tokens"] >= 4
    # the child only loaded onnxruntime-genai and a tiny model: its peak must not include this test
    # process's memory (torch and several models), which a spawned child briefly shares before exec
    here = evaluation.peak_memory_mb()
    assert here > 300 and 0 < result["peak_memory_mb"] < 200
    assert result["model_size_mb"] == pytest.approx(evaluation.model_megabytes("onnx", spec["dirs"]))
    assert evaluation.model_megabytes("adapter", spec["dirs"]) > evaluation.model_megabytes("base", spec["dirs"])


def test_a_pytorch_judge_counts_neither_this_process_nor_another_judges_memory(models):
    """PyTorch judges fork from a server that only imported PyTorch's stack: a model the parent (or an earlier
    judge) loaded must not show in their peak, and each must report the same figure as the first."""
    from ortune import evaluation

    spec = {
        "kind": "merged",
        "dirs": {"merged": str(models / "merged")},
        "trust_remote_code": False,
        "prompts": prompts(models, 2),
        "max_new_tokens": 4,
        "batch_size": 2,
        "latency": {"new_tokens": 4, "warmup": 1, "repeats": 2},
    }
    held = bytearray(1500 * 2**20)  # 1.5 GB touched here, in the parent, while the judges run
    held[::4096] = b"x" * len(held[::4096])
    first = evaluation.judge_in_fresh_process(spec)
    second = evaluation.judge_in_fresh_process(spec)
    assert evaluation.peak_memory_mb() > 1500
    assert 0 < first["peak_memory_mb"] < 1000 and first["generations"] == second["generations"]
    assert second["peak_memory_mb"] == pytest.approx(first["peak_memory_mb"], rel=0.1)
    del held


def test_missing_compared_model_says_how_to_fix_it(models, tmp_path):
    from ortune import evaluation
    from ortune.errors import OrtuneError

    with pytest.raises(OrtuneError, match="drop 'merged' from eval.compare"):
        evaluation.load_generator("merged", {"merged": str(tmp_path / "nothing")})


@pytest.mark.slow
def test_eval_stage_writes_metrics_pictures_and_wandb_media(models, tmp_path):
    overrides = ["model=tiny-phi3"] + [
        f"paths.{key}={models / key}" for key in ("base_model", "adapter", "merged", "onnx", "prepared")
    ]
    overrides += [
        f"paths.metrics={tmp_path / 'metrics'}",
        f"paths.plots={tmp_path / 'plots'}",
        f"wandb.dir={tmp_path}",
        "eval.latency.repeats=2",
        "eval.batch_size=5",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    env.pop("DVC_STAGE", None)
    env.pop("ORTUNE_WANDB_DIR", None)
    done = subprocess.run(
        [sys.executable, "scripts/eval.py", *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    metrics = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert metrics["n"] == 24 and set(metrics["runtimes"]) == {"onnx", "base", "prompted", "adapter", "merged"}
    # the untuned base asked through its (Phi-3) chat template: scored, and told apart from the plain base
    assert metrics["runtimes"]["prompted"]["prompt_format"] == "chat" and metrics["runtimes"]["prompted"]["shots"] == 0
    assert isinstance(metrics["prompted_baseline_accuracy"], float) and 0 <= metrics["prompted_baseline_unparsed"] <= 24
    assert "prompted baseline (chat, 0 shots), first prompt: '<|user|>\\nClassify the tone" in done.stderr
    for key in EVAL_HEADLINE_METRICS:
        assert isinstance(metrics[key], (int, float)), key
    assert metrics["ttft_ms"] > 0 and metrics["ms_per_token"] > 0 and metrics["tokens_per_second"] > 0
    assert set(metrics["per_class"]) == {"fear", "joy", "sadness", "surprise"}
    assert sum(s["support"] for s in metrics["per_class"].values()) == 24

    lines = data.read_jsonl(tmp_path / "metrics" / "eval_predictions.jsonl")
    assert len(lines) == 24
    # base + adapter and merged are one function (the ONNX model is merged's fp32 export) that was taught
    # these rows: their greedy answers agree everywhere and are mostly right; the bare random base's are not,
    # so an eval that dropped the adapter (or the merge) would show here
    assert all(line["predictions"]["adapter"] == line["predictions"]["merged"] == line["prediction"] for line in lines)
    assert (
        metrics["runtimes"]["adapter"]["accuracy"] == metrics["runtimes"]["merged"]["accuracy"] == metrics["accuracy"]
    )
    assert metrics["accuracy"] >= 0.75 and metrics["base_accuracy"] <= 0.5, metrics
    assert sum(line["predictions"]["base"] != line["predictions"]["adapter"] for line in lines) >= 6

    png = (tmp_path / "plots" / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 200_000
    csv_lines = (tmp_path / "plots" / "per_class_f1.csv").read_text().splitlines()
    assert csv_lines[0] == "label,precision,recall,f1,support" and len(csv_lines) == 5

    (run,) = list((tmp_path / "wandb").glob("offline-run-*"))
    media = {p.name.split("_")[0] for p in (run / "files" / "media").rglob("*") if p.is_file()}
    tables = [p for p in (run / "files" / "media" / "table").rglob("*.table.json")]
    predictions_table = next(json.loads(p.read_text()) for p in tables if "predictions" in p.name)
    assert predictions_table["columns"][:3] == ["text", "label", "prediction"]
    assert "prediction_prompted" in predictions_table["columns"]  # what the prompted base answered, row by row
    assert len(predictions_table["data"]) == 24
    assert any("confusion_matrix" in p.name for p in tables), media
    assert list((run / "files" / "media" / "images").rglob("*.png")), "the confusion-matrix picture"
