"""Does the built ONNX model compute what the PyTorch model it came from computes?

Two measures on the eval prompts, written to metrics/onnx.json after every build:
- last-token logit difference, worst prompt: max |ONNX - PyTorch| over the vocabulary as is
  (max_abs_logit_diff), and divided by the spread of that prompt's PyTorch logits, their standard
  deviation over the vocabulary (max_rel_logit_diff). fp32 rounds nothing on purpose: its target is
  max_rel_logit_diff <= FP32_REL_TOLERANCE (reasons beside it);
- label agreement: the share of prompts where greedy decoding in onnxruntime-genai and in PyTorch
  yield the same label under ortune.metrics.parse_label (unparsed counts as a label of its own);
  target onnx.min_label_agreement (0.98) for every precision but fp32.
For free text (data.task=generation), greedy outputs are compared as text instead of labels
(compare_generations): the share of identical outputs, where differing ones part, and the exact-match
delta against the references; targets onnx.min_identical_outputs and onnx.max_metric_loss.
A graph built for cuda/dml/webgpu is run on the CPU provider here (its ops have CPU kernels, bf16
MatMul excepted), which checks the graph and its weights, not the provider's kernels.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from ortune.errors import OrtuneError

log = logging.getLogger("ortune")

# fp32 target on max_rel_logit_diff. float32 rounding error is relative to the size of the numbers
# rounded and compounds through the layers, so an absolute bound cannot fit every model: 1e-4 passed the
# 2-layer toy (logits ~1.5) and failed a correct 30-layer SmolLM2 export (logits ~30) at 1.1e-4. An error
# in the final hidden state reaches the logits scaled by the lm_head rows, as their spread over the
# vocabulary does (a shift shared by every logit changes no probability). Correct exports measured
# 1-3e-5 of that spread on an AMD EPYC, but onnxruntime's kernels differ per CPU family: on an Intel Xeon
# (AVX-512) the random two-adapter test model measured 1.9e-4, with every label and 3e-5 absolute
# (docs/export.md). Export bugs sit far above 1e-3: a missing layer or a wrong rope theta 3.5-6.3, one
# attention tensor of the tiny model off by 1e-4 of its own spread 1.6e-2 (tests/test_export_stage.py),
# one SmolLM2 v_proj off by 1e-3 of its spread 2.7e-3 (by 1e-4: 2.7e-4, no label changed).
FP32_REL_TOLERANCE = 1e-3


class TorchReference:
    """Last-token logits and greedy labels of a PyTorch model (merged, base, or base + an adapter)."""

    def __init__(
        self, model_dir: Path, adapter_dir: Path | None = None, trust_remote_code: bool = False, tokenizer=None
    ):
        """`tokenizer`: model_dir's, where the caller has it already (Gemma 3's 262k-word one takes 3 s to load)."""
        from ortune import modeling

        model = modeling.load_causal_lm(model_dir, trust_remote_code)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.eval()
        self.tokenizer = tokenizer if tokenizer is not None else modeling.load_tokenizer(model_dir, trust_remote_code)
        # only the last position through lm_head: the vocabulary projection of every other position was a
        # tenth of build_onnx's time on SmolLM2 (49k words); remote code may not know the argument
        forward = inspect.signature(model.get_base_model().forward if adapter_dir else model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}

    def last_logits(self, prompt: str):
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            return self.model(**ids, **self._last_only).logits[0, -1].float().numpy()

    def generations(self, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
        from ortune.generation import TorchGenerator

        generator = TorchGenerator(self.model, self.tokenizer)
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            texts += [g.text for g in generator.generate_batch(prompts[start : start + batch_size], max_new_tokens)]
        return texts


def compare(
    reference: TorchReference,
    onnx_generator,
    prompts: list[str],
    labels: list[str],
    max_new_tokens: int,
    precision: str,
    min_agreement: float,
) -> dict:

    from ortune.metrics import parse_label

    max_diff, max_relative = logit_diffs(reference, onnx_generator, prompts)
    torch_labels = [parse_label(t, labels) for t in reference.generations(prompts, max_new_tokens)]
    onnx_labels = [parse_label(onnx_generator.generate(p, max_new_tokens).text, labels) for p in prompts]
    agreement = sum(a == b for a, b in zip(torch_labels, onnx_labels)) / len(prompts)
    from ortune import intervals

    same = [a == b for a, b in zip(torch_labels, onnx_labels)]
    result = {
        "prompts": len(prompts),
        "max_abs_logit_diff": max_diff,
        "max_rel_logit_diff": max_relative,
        "label_agreement": agreement,
        # over these prompts: another draw of as many could agree this much less (or more)
        "label_agreement_ci95": intervals.mean_interval(same, intervals.resample_rows(len(same), 1000, seed=0)),
        "onnx_unparsed": sum(label is None for label in onnx_labels),
    }
    if precision == "fp32":
        result.update(
            target=f"max_rel_logit_diff <= {FP32_REL_TOLERANCE:g}",
            passed=result["max_rel_logit_diff"] <= FP32_REL_TOLERANCE,
        )
    else:
        result.update(target=f"label_agreement >= {min_agreement:g}", passed=agreement >= min_agreement)
    return result


def compare_task(cfg, reference: TorchReference, onnx_generator, prompts: list[str], labels: list[str], n: int) -> dict:
    """compare() for a classification task; compare_generations() for free text (data.task=generation), whose
    references are the answers of the prepared split the prompts came from (the first len(prompts) rows)."""
    from ortune import tasks

    if not tasks.is_generation(cfg.data):
        return compare(reference, onnx_generator, prompts, labels, n, cfg.precision, cfg.onnx.min_label_agreement)
    from ortune.data import read_jsonl

    prepared = Path(cfg.paths.prepared)
    split = next(prepared / name for name in ("validation.jsonl", "eval.jsonl") if (prepared / name).is_file())
    answers = [tasks.answer(row) for row in read_jsonl(split)][: len(prompts)]
    o = cfg.onnx
    return compare_generations(
        reference, onnx_generator, prompts, answers, n, cfg.precision, o.min_identical_outputs, o.max_metric_loss
    )


def logit_diffs(reference: TorchReference, onnx_generator, prompts: list[str]) -> tuple[float, float]:
    """(max |ONNX - PyTorch| last-token logit difference, the same relative to the logits' spread)."""
    import numpy as np

    diffs, relative = [], []
    for prompt in prompts:
        expected = reference.last_logits(prompt)
        diff = float(np.abs(onnx_generator.last_logits(prompt) - expected).max())
        scale = float(expected.std())
        diffs.append(diff)
        relative.append(diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return max(diffs), max(relative)


def compare_generations(
    reference: TorchReference,
    onnx_generator,
    prompts: list[str],
    answers: list[str],
    max_new_tokens: int,
    precision: str,
    min_identical: float,
    max_metric_loss: float,
) -> dict:
    """The gate for free text: greedy ONNX outputs against the merged PyTorch model's on the same prompts.
    identical_outputs: the share of prompts whose two generations are the same text; first_divergence: per
    differing prompt, the first token (PyTorch's tokenizer) where they part, its median and minimum; the
    metric delta: exact match against the references, ONNX minus PyTorch. Target (every precision but fp32,
    which keeps its logit target): identical_outputs >= onnx.min_identical_outputs and a loss of at most
    onnx.max_metric_loss. `label_agreement` repeats identical_outputs, so that auto quantization and the
    stage's messages read one key for either task."""
    import statistics

    from ortune import textmetrics

    max_abs, max_rel = logit_diffs(reference, onnx_generator, prompts)
    torch_texts = reference.generations(prompts, max_new_tokens)
    onnx_texts = [onnx_generator.generate(p, max_new_tokens).text for p in prompts]
    identical = textmetrics.identical_share(torch_texts, onnx_texts)
    encode = reference.tokenizer.encode
    positions = [
        textmetrics.first_divergence(
            encode(textmetrics.clean(a), add_special_tokens=False),
            encode(textmetrics.clean(b), add_special_tokens=False),
        )
        for a, b in zip(torch_texts, onnx_texts)
        if textmetrics.clean(a) != textmetrics.clean(b)
    ]
    positions = [p for p in positions if p is not None]
    torch_em = sum(textmetrics.exact_match(t, a) for t, a in zip(torch_texts, answers)) / len(prompts)
    onnx_em = sum(textmetrics.exact_match(t, a) for t, a in zip(onnx_texts, answers)) / len(prompts)
    result = {
        "prompts": len(prompts),
        "max_abs_logit_diff": max_abs,
        "max_rel_logit_diff": max_rel,
        "identical_outputs": identical,
        "label_agreement": identical,
        "first_divergence_median": statistics.median(positions) if positions else None,
        "first_divergence_min": min(positions) if positions else None,
        "exact_match_pytorch": torch_em,
        "exact_match_onnx": onnx_em,
        "exact_match_delta": onnx_em - torch_em,
    }
    if precision == "fp32":
        result.update(target=f"max_rel_logit_diff <= {FP32_REL_TOLERANCE:g}", passed=max_rel <= FP32_REL_TOLERANCE)
    else:
        result.update(
            target=f"identical_outputs >= {min_identical:g} and exact match loss <= {max_metric_loss:g}",
            passed=identical >= min_identical and torch_em - onnx_em <= max_metric_loss + 1e-12,
        )
    return result


def runnable_on_cpu(model_dir: Path) -> str | None:
    """None if onnxruntime can create a CPU session for the graph, else why not (one line)."""
    import onnxruntime as ort

    from ortune.export import model_file

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # adapter inputs with defaults are intended; their warning is noise
    try:
        ort.InferenceSession(str(model_file(model_dir)), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        return " ".join(str(exc).split())[:300]
    return None


def check_chat_template(onnx_generator, messages_list: list[list[dict]], model_dir: Path) -> None:
    """The apps render chat prompts with onnxruntime-genai's template engine, training used
    transformers': they must agree, or the shipped model sees prompts it was not trained on."""
    import json

    from ortune.data import prompt_text

    for messages in messages_list[:8]:
        genai = onnx_generator.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        expected = prompt_text(messages, model_dir)
        if genai != expected:
            raise OrtuneError(
                f"{model_dir}: onnxruntime-genai renders the chat template differently from transformers "
                f"({genai[:60]!r} vs {expected[:60]!r}); the apps would prompt the model wrongly"
            )


def summarize_failures(parities: dict[str, dict]) -> list[str]:
    return [
        f"{name}: {p['target']} missed ({p['label_agreement']:.3f} agreement, "
        f"{p['max_abs_logit_diff']:.2e} max logit diff, {p.get('max_rel_logit_diff', float('nan')):.2e} relative)"
        for name, p in parities.items()
        if p.get("passed") is False
    ]


def advice(precision: str, builder_logs: str) -> str:
    """What to do about a missed target, for the precision that missed it."""
    if precision == "fp32":
        # nothing was rounded on purpose: the graph computes something else than the model
        return (
            "fp32 rounds nothing, so this is an export bug (wrong or missing weights, a layer, rope or "
            f"attention setting the builder got wrong), not a setting to tune: check the builder log ({builder_logs}), "
            "rerun with ORTUNE_DEBUG=1 and report both"
        )
    if precision == "int4":
        return (
            "quantize less: onnx.keep_float=[lm_head], onnx.last_matmul_int8=true, a larger onnx.int8_share, "
            "a smaller onnx.block_size, precision=int8 (or onnx.quantization=auto), or train longer (decisive "
            "logits survive rounding)"
        )
    if precision == "int8":
        return (
            "quantize less: onnx.keep_float=[lm_head], a smaller onnx.block_size, precision=fp32, or train "
            "longer (decisive logits survive rounding)"
        )
    # fp16 / bf16: half-precision activations, not weight quantization
    return "half precision changes labels here: precision=fp32 (or bf16 instead of fp16, whose range is narrower)"
