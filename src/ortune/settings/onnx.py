"""precision and onnx.*: what the builder makes, how it quantizes, and how the build is checked.

The builder's own checks (valid precision/provider pairs, option names) read its source, so they live in
ortune.export, which registers them here (add_onnx_check) when imported: the stages that build run them,
loading another stage's config neither imports nor reads the builder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ortune.settings.fields import field_problems, setting, value_problem

PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
# The int4 blocks the builder's quantizer packs: onnx.block_size and train.qat.block_size (the grid trained through).
BLOCK_SIZES = (16, 32, 64, 128, 256)


def precision():
    """The top-level `precision` setting (a function: a dataclass field belongs to one class)."""
    return setting(
        "the weights' type in the built model; valid pairs with onnx.execution_provider come from the builder",
        choices=PRECISIONS,
        message="{key}={value} is unknown; use one of {choices}",
    )


PRECISION = precision().metadata


@dataclass
class OnnxConfig:
    execution_provider: str = setting("the runtime the model is built for: cpu, cuda, dml or webgpu")
    block_size: int = setting("weights per int4/int8 quantization block (builder: `block_size`)", choices=BLOCK_SIZES)
    accuracy_level: int = setting(
        "activations' type in quantized MatMuls: 0 the provider's default, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
        "(builder: `accuracy_level`)",
        choices=(0, 1, 2, 3, 4),
    )
    algorithm: str = setting(
        "int4 rounding: `default` (MLAS round-to-nearest), `rtn`, `k_quant` (builder: `algo_config`)"
    )
    quantize_ops: list[str] | None = setting(
        "op types quantized: `MatMul`, `Gather` (embeddings: int4 by the builder with onnx.algorithm=default, int8 "
        "by ortune after the build); null: MatMul, and Gather where it is quantized (builder: `op_types_to_quantize`)"
    )
    keep_float: list[str] = setting(
        "nodes left float: `lm_head` (`/lm_head/MatMul`), `embeddings` (`/model/embed_tokens/Gather`) "
        "(builder: `nodes_to_exclude`)"
    )
    last_matmul_int8: bool = setting(
        "lm_head in int8 inside an int4 model (builder: `matmul_mixed_precision=last_matmul:int8`)"
    )
    int8_share: float = setting(
        "int4 only: share of the linear weights kept int8, most sensitive first (builder: per-node `--target_options`)",
        range="[0, 1]",
    )
    extra_options: dict[str, str] = setting(
        "any other builder option, e.g. `+onnx.extra_options.enable_cuda_graph=1`; unknown names are an error"
    )
    quantization: str = setting(
        "`fixed`: build `precision`; `auto`: try `onnx.candidates` in order, ship the first that meets parity",
        choices=("fixed", "auto"),
    )
    candidates: list[dict[str, Any]] = setting("each overrides precision and onnx.* settings (CANDIDATE_KEYS)")
    adapter: str = setting(
        "`merged`: build from the merged model; `separate`: base plus a run-time switchable adapter",
        choices=("merged", "separate"),
    )
    extra_adapters: dict[str, str] = setting("more adapters of the same base, shipped beside it: {name: path}")
    intra_op_num_threads: int = setting(
        "threads written into genai_config.json; 0 = every core of the machine that runs the model",
        range=">= 0",
        message="{key}={value} must be {range} (0 = all cores)",
    )
    parity_prompts: int = setting(
        "eval prompts the parity check decodes; 0 = every eval prompt",
        range=">= 0",
        message="{key}={value} must be {range} (0 = every eval prompt)",
    )
    min_label_agreement: float = setting("share of prompts on which ONNX and PyTorch must agree", range="[0, 1]")
    min_identical_outputs: float = setting(
        "data.task=generation: share of prompts whose greedy ONNX output must be the merged PyTorch model's, "
        "text for text",
        range="[0, 1]",
    )
    max_metric_loss: float = setting(
        "data.task=generation: most exact match (a share: 0.01 = 1 point) the ONNX model may lose against the "
        "merged PyTorch model on the parity prompts",
        range="[0, 1]",
    )
    require_parity: bool = setting("fail the stage when a parity target is missed")


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

# Checks of one build's export settings (precision, onnx settings) -> problems, that need a domain module.
OnnxCheck = Callable[[str, DictConfig], Iterable[str]]
ONNX_CHECKS: list[OnnxCheck] = []


def add_onnx_check(check: OnnxCheck) -> OnnxCheck:
    """Run `check` on the export settings of every validated config (and of each onnx.candidates entry)."""
    if check not in ONNX_CHECKS:
        ONNX_CHECKS.append(check)
    return check


def onnx_candidate(precision: str, o: DictConfig, overrides: dict) -> tuple[str, DictConfig]:
    """(precision, onnx settings) of one onnx.candidates entry."""
    settings = OmegaConf.to_container(o)
    settings.update({k: v for k, v in overrides.items() if k != "precision"})
    settings.update(quantization="fixed", candidates=[])
    return overrides.get("precision", precision), OmegaConf.create(settings)


def problems(precision: str, o: DictConfig):
    """The export settings and each onnx.candidates entry (and, through ONNX_CHECKS, what the builder accepts)."""
    yield from setting_problems(precision, o)
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
        if problem := value_problem("precision", entry.get("precision", precision), PRECISION):
            yield f"onnx.candidates[{index}]: {problem}"
            continue
        for problem in setting_problems(*onnx_candidate(precision, o, dict(entry))):
            yield f"onnx.candidates[{index}]: {problem}"


def setting_problems(precision: str, o: DictConfig):
    yield from field_problems(OnnxConfig, o, "onnx.")
    if o.int8_share and (precision != "int4" or o.adapter != "merged"):
        yield (
            f"onnx.int8_share={o.int8_share} mixes int8 into an int4 model built from the merged model: "
            "set precision=int4 and onnx.adapter=merged, or onnx.int8_share=0"
        )
    if o.quantize_ops is not None and not o.quantize_ops:
        yield "onnx.quantize_ops is empty; list MatMul (and Gather to quantize the embeddings too), or null"
    if o.extra_adapters and o.adapter != "separate":
        yield "onnx.extra_adapters needs onnx.adapter=separate (adapters switch at run time only on an unmerged base)"
    for check in ONNX_CHECKS:
        yield from check(precision, o)
