"""ONNX export with onnxruntime-genai's model builder: its options, running it, checking what it
emitted, and the runtime settings written beside the model (genai_config.json, ortune.json)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from ortune import builder_spec
from ortune.errors import OrtuneError
from ortune.settings.fields import choice_problem
from ortune.settings.onnx import BLOCK_SIZES, PRECISIONS, add_onnx_check

log = logging.getLogger("ortune")

ALGORITHMS = ("default", "rtn", "k_quant")
# The builder's compound algo_config aliases, deprecated in favour of a method + matmul_mixed_precision.
LEGACY_ALGORITHMS = {
    "rtn_last": "onnx.algorithm=rtn onnx.last_matmul_int8=true",
    "k_quant_last": "onnx.algorithm=k_quant onnx.last_matmul_int8=true",
}
QUANTIZABLE_OPS = ("MatMul", "Gather")
# onnx.keep_float names -> the builder's node names for them (builders/base.py: nodes_to_exclude checks)
KEEP_FLOAT_NODES = {"lm_head": "/lm_head/MatMul", "embeddings": "/model/embed_tokens/Gather"}
# PEFT modules_to_save names -> the same nodes (an adapter that saves them in full must keep them float)
SAVED_MODULE_NODES = {"lm_head": KEEP_FLOAT_NODES["lm_head"], "embed_tokens": KEEP_FLOAT_NODES["embeddings"]}
QUANTIZED = ("int4", "int8")
# The name the pipeline's own adapter gets beside an adapter=separate model.
PIPELINE_ADAPTER = "default"
TASK_FILE = "ortune.json"
# onnxruntime session config entry written into genai_config.json (see tune_genai_config)
SPIN_KEY, SPIN_US = "session.intra_op.spin_duration_us", "20"

# Pairs the builder lists as valid but whose output is broken (found by building them here).
BROKEN_PAIRS = {
    ("fp32", "cuda"): "the builder (onnxruntime-genai 0.18) emits an invalid graph for this pair (packed Attention "
    "with its present.* outputs left unconnected); use precision=fp16 or bf16 for cuda",
}
# Builder options ortune sets from typed settings: setting them again through extra_options would
# leave two places that disagree.
MANAGED_OPTIONS = {
    "block_size": "onnx.block_size",
    "accuracy_level": "onnx.accuracy_level",
    "algo_config": "onnx.algorithm",
    "op_types_to_quantize": "onnx.quantize_ops",
    "nodes_to_exclude": "onnx.keep_float",
    "matmul_mixed_precision": "onnx.last_matmul_int8",
    "adapter_path": "onnx.adapter",
}
# Real builder options that break what ortune ships (a model genai decodes in model.onnx).
REFUSED_OPTIONS = {
    "exclude_lm_head": "it deletes lm_head from the graph (no logits to decode); "
    "onnx.keep_float=[lm_head] keeps it unquantized",
    "exclude_embeds": "it deletes the embeddings from the graph (inputs_embeds instead of input_ids); "
    "onnx.keep_float=[embeddings] keeps them unquantized",
    "filename": "ortune ships the model as model.onnx",
    "config_only": "ortune ships a built model, not a config",
    "hf_remote": "set model.trust_remote_code instead",
}


def extra_option_problem(name: str) -> str | None:
    """Why `name` cannot go into onnx.extra_options, or None."""
    if name in MANAGED_OPTIONS:
        return f"set through {MANAGED_OPTIONS[name]}, not extra_options"
    if name in REFUSED_OPTIONS:
        return f"not allowed: {REFUSED_OPTIONS[name]}"
    return builder_spec.option_name_problem(name)


@add_onnx_check
def setting_problems(precision: str, o: DictConfig):
    """The export settings of one build, checked against what the installed builder accepts: registered with
    ortune.settings.onnx on import, so build_onnx and `make params` refuse them in one line before any work."""
    if problem := choice_problem("onnx.execution_provider", o.execution_provider, builder_spec.PROVIDERS):
        yield problem
    elif precision in PRECISIONS:
        spec = builder_spec.read_spec()
        if o.execution_provider not in spec.valid_pairs.get(precision, ()):
            yield (
                f"precision={precision} with onnx.execution_provider={o.execution_provider} is not a pair the "
                f"builder supports; valid pairs: {builder_spec.valid_pairs_text(spec)}"
            )
        elif reason := BROKEN_PAIRS.get((precision, o.execution_provider)):
            yield f"precision={precision} with onnx.execution_provider={o.execution_provider}: {reason}"
    if problem := choice_problem("onnx.algorithm", o.algorithm, ALGORITHMS):
        legacy = LEGACY_ALGORITHMS.get(o.algorithm)
        yield f"{problem} ({o.algorithm} is a deprecated builder alias; use {legacy})" if legacy else problem
    for key, allowed in {"quantize_ops": QUANTIZABLE_OPS, "keep_float": tuple(KEEP_FLOAT_NODES)}.items():
        unknown = [item for item in o[key] or () if item not in allowed]
        if unknown:
            yield f"onnx.{key}: {', '.join(unknown)} unknown; list any of {', '.join(allowed)}"
    # an explicit Gather the builder would ignore is refused; null asks for it only where it is quantized
    listed = o.quantize_ops or ()
    if "Gather" in listed and o.algorithm != "default" and precision == "int4":
        yield (
            f"onnx.quantize_ops: Gather (the embeddings) is quantized to int4 only by onnx.algorithm=default; the "
            f"builder leaves it float with {o.algorithm}: set onnx.algorithm=default, drop Gather or set null"
        )
    if "embeddings" in o.keep_float and "Gather" not in quantized_ops(precision, o):
        yield (
            "onnx.keep_float lists embeddings, which are only quantized with Gather in onnx.quantize_ops (at int8, "
            "or int4 with onnx.algorithm=default); drop it"
        )
    if o.last_matmul_int8 and "lm_head" in o.keep_float:
        yield "onnx.last_matmul_int8=true quantizes lm_head to int8 but onnx.keep_float keeps it float; choose one"
    for name in o.extra_options:
        if problem := extra_option_problem(name):
            yield f"onnx.extra_options.{name}: {problem}"
    for name in o.extra_adapters:
        if not name.isidentifier() or name == PIPELINE_ADAPTER:
            yield f"onnx.extra_adapters.{name}: adapter names are identifiers other than '{PIPELINE_ADAPTER}'"


def quantized_ops(precision: str, onnx: DictConfig) -> list[str]:
    """The op types quantized: onnx.quantize_ops, or for null MatMul and, where it can be, Gather (int4 by the
    builder with algorithm default; int8 by ortune.embedding_int8 after the build): an untied model's embedding
    is otherwise its largest float part (a SmolLM2 untied by copying its embedding into lm_head: 57 % of its
    int4 model, docs/real-models.md), and a tied int8 model keeps a float copy of its head."""
    if onnx.quantize_ops is not None:
        return list(onnx.quantize_ops)
    gather = precision == "int8" or (precision == "int4" and onnx.algorithm == "default")
    return ["MatMul", "Gather"] if gather else ["MatMul"]


def builder_ops(precision: str, onnx: DictConfig) -> list[str]:
    """The op types the builder is asked to quantize: at int8 its quantizer cannot take Gather (ortune does)."""
    return [op for op in quantized_ops(precision, onnx) if not (op == "Gather" and precision == "int8")]


def quantizes_int8_embedding(precision: str, onnx: DictConfig) -> bool:
    """Whether build_onnx replaces the builder's float embedding lookup by an int8 one (ortune.embedding_int8):
    for the CPU provider, whose 8-bit GatherBlockQuantized kernel ortune has run; another provider's graph
    keeps the builder's float table (no GPU here to check its kernels)."""
    return (
        precision == "int8"
        and onnx.execution_provider == "cpu"
        and "Gather" in quantized_ops(precision, onnx)
        and "embeddings" not in onnx.keep_float
    )


def builder_options(
    precision: str,
    onnx: DictConfig,
    keep_float_nodes: list[str] | tuple[str, ...] = (),
    trust_remote_code: bool = False,
) -> dict[str, str]:
    """The builder's --extra_options for these settings. Quantization options only apply to int4/int8;
    `keep_float_nodes` are more node names to leave unquantized (the LoRA paths of a separate adapter)."""
    # the builder loads the model's config and tokenizer itself: a model that needs its own code
    # (model.trust_remote_code) cannot be exported without it
    options: dict[str, str] = {"hf_remote": "true"} if trust_remote_code else {}
    if precision in QUANTIZED:
        options["block_size"] = str(onnx.block_size)
        if onnx.accuracy_level:
            options["accuracy_level"] = str(onnx.accuracy_level)
        options["algo_config"] = onnx.algorithm
        options["op_types_to_quantize"] = "/".join(builder_ops(precision, onnx))
        excluded = [KEEP_FLOAT_NODES[name] for name in onnx.keep_float] + list(keep_float_nodes)
        if excluded:
            options["nodes_to_exclude"] = ",".join(excluded)
        if onnx.last_matmul_int8:
            options["matmul_mixed_precision"] = "last_matmul:int8"
    options.update({str(k): str(v) for k, v in onnx.extra_options.items()})
    spec = builder_spec.read_spec()
    for name in options:
        if name not in spec.options:
            setting = MANAGED_OPTIONS.get(name, f"onnx.extra_options.{name}")
            raise OrtuneError(
                f"{setting}: the installed builder ({spec.source}) has no option '{name}'; "
                "check the onnxruntime-genai version against requirements.txt"
            )
    return options


def linear_input_widths(model_dir: Path) -> dict[str, int]:
    """{weight name: input width K} of every linear layer in the model's safetensors (headers only)."""
    from safetensors import safe_open

    widths = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as tensors:
            for name in tensors.keys():
                shape = tensors.get_slice(name).get_shape()
                if name.endswith(".weight") and len(shape) == 2 and "embed" not in name and "norm" not in name:
                    widths[name] = int(shape[1])
    return widths


def check_k_quant_blocks(model_dir: Path, precision: str, onnx: DictConfig) -> None:
    """int4 k_quant stores two 4-bit zero points per byte and reshapes them per output row; the quantizer
    (onnxruntime 1.32, neural_compressor/weight_only.py) crashes with "cannot reshape array" when a MatMul's
    input width splits into an odd number of blocks. Refuse that before the (slow) build, naming what works."""
    if precision != "int4" or onnx.algorithm != "k_quant":
        return
    widths = linear_input_widths(model_dir)
    if "lm_head" in onnx.keep_float or onnx.last_matmul_int8:  # lm_head then is float or int8: no packed zero points
        widths = {name: k for name, k in widths.items() if not name.startswith("lm_head")}

    def odd(block: int) -> dict[str, int]:
        return {name: k for name, k in widths.items() if -(-k // block) % 2}

    if bad := odd(onnx.block_size):
        name, k = next(iter(bad.items()))
        working = [b for b in BLOCK_SIZES if not odd(b)]
        fix = f"set onnx.block_size to one of {working}" if working else "no block size works for this model"
        raise OrtuneError(
            f"onnx.algorithm=k_quant with onnx.block_size={onnx.block_size}: {name} has input width {k}, "
            f"{-(-k // onnx.block_size)} blocks (odd), which the int4 k_quant quantizer cannot pack; "
            f"{fix}, or use onnx.algorithm=default"
        )


def check_tied_asymmetric(model_dir: Path, precision: str, onnx: DictConfig) -> None:
    """onnxruntime-genai 0.18 builds a tied model's shared int4 embedding with asymmetric weights as a Gather
    whose output is uint8 where float is expected: onnxruntime refuses to load that graph. Refuse it up front."""
    symmetric = str(onnx.extra_options.get("is_symmetric", "true")).lower() != "false"
    shared = str(onnx.extra_options.get("shared_embeddings", "true")).lower() != "false"
    if precision != "int4" or symmetric or not shared:
        return
    config_file = Path(model_dir) / "config.json"
    tied = config_file.is_file() and json.loads(config_file.read_text(encoding="utf-8")).get(
        "tie_word_embeddings", False
    )
    if tied:
        raise OrtuneError(
            "onnx.extra_options.is_symmetric=false with a model that ties its embeddings to lm_head: the "
            "builder (onnxruntime-genai 0.18) writes an int4 graph onnxruntime cannot load (uint8 "
            "embedding output); keep int4 symmetric, or add onnx.extra_options.shared_embeddings=false"
        )


def describe_options(options: dict[str, str]) -> dict[str, str]:
    """The options for metrics and the model card: a long node list (LoRA paths) shortened to a count."""
    described = dict(options)
    nodes = options.get("nodes_to_exclude", "").split(",")
    if len(nodes) > 4:
        described["nodes_to_exclude"] = f"{len(nodes)} nodes: {', '.join(nodes[:2])}, ..., {nodes[-1]}"
    return described


def run_builder(
    model_dir: Path,
    out_dir: Path,
    precision: str,
    provider: str,
    options: dict[str, str],
    log_file: Path,
    adapter_dir: Path | None = None,
    target_options: dict | None = None,
) -> None:
    """Run the builder (through ortune.builder_shim, which fixes its LM-head detection) into out_dir.
    `target_options`: the builder's structured options (per-node quantization overrides, ortune.quantize)."""
    import shutil

    out_dir, log_file = Path(out_dir), Path(log_file)
    # the builder's scratch space for external-data files: inside the (temporary) output folder, so a
    # killed build leaves nothing behind that the stage's leftover cleanup does not remove
    cache = out_dir / ".builder-cache"
    if adapter_dir is not None:
        options = {**options, "adapter_path": str(adapter_dir)}
    command = [
        sys.executable,
        "-m",
        "ortune.builder_shim",
        "-i",
        str(model_dir),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        provider,
        "-c",
        str(cache),
    ]
    if options:
        command += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    if target_options:
        command += ["--target_options", json.dumps(target_options)]
    log.info("building %s/%s ONNX model from %s (builder log: %s)", precision, provider, model_dir, log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_file, "w", encoding="utf-8") as handle:
            handle.write(" ".join(command) + "\n")
            handle.flush()
            done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0:
        tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise OrtuneError(f"onnxruntime-genai builder failed ({' '.join(tail)[:300]}); full log: {log_file}")


def model_file(model_dir: Path) -> Path:
    genai = json.loads((Path(model_dir) / "genai_config.json").read_text(encoding="utf-8"))
    return Path(model_dir) / genai["model"]["decoder"].get("filename", "model.onnx")


def check_graph(model_dir: Path) -> dict:
    """Structural check of the emitted graph, for every provider (no hardware needed): every node input
    and graph output must be produced by something. Returns op counts and I/O element types."""
    import onnx

    path = model_file(model_dir)
    graph = onnx.load(str(path), load_external_data=False).graph
    produced = {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
        produced.update(node.output)
    dangling = [f"{node.name} input {name}" for node in graph.node for name in node.input if name not in produced]
    dangling += [f"graph output {o.name}" for o in graph.output if o.name not in produced]
    if dangling:
        raise OrtuneError(
            f"{path}: the builder emitted an invalid graph ({len(dangling)} unconnected, first: "
            f"{dangling[0]}); this precision/provider pair does not build correctly"
        )
    types = {o.name: onnx.TensorProto.DataType.Name(o.type.tensor_type.elem_type).lower() for o in graph.output}
    return {"ops": dict(sorted(ops.items())), "logits_dtype": types.get("logits")}


def size_by_part(model_dir: Path) -> dict:
    """MB and share of the model's weights per part: the embedding, the decoder layers, the LM head and the
    rest (RoPE caches, final norm), from the graph's initializers (headers only). A tied model's embedding
    Gather reads the head's matrix: it counts once, as the head, and `embedding_shared_with_head` says so."""
    import onnx

    path = model_file(model_dir)
    graph = onnx.load(str(path), load_external_data=False).graph
    parts = dict.fromkeys(("embedding", "layers", "head", "other"), 0)
    for tensor in graph.initializer:
        external = {entry.key: entry.value for entry in tensor.external_data}
        size = int(external["length"]) if "length" in external else len(tensor.raw_data)
        size = size or onnx.numpy_helper.to_array(tensor).nbytes  # typed fields (small constants)
        part = (
            "embedding"
            if "embed_tokens" in tensor.name
            else "head"
            if "lm_head" in tensor.name
            else "layers"
            if tensor.name.startswith(("model.layers.", "/model/layers."))
            else "other"
        )
        parts[part] += size
    total = sum(parts.values()) or 1
    # the builder's embedding nodes (/model/embed_tokens/...) reading the head's initializer
    lookup = [node for node in graph.node if node.name.startswith("/model/embed_tokens/")]
    shared = any("lm_head" in name for node in lookup for name in node.input)
    result: dict = {f"{part}_mb": round(size / 1e6, 3) for part, size in parts.items()}
    result.update({f"{part}_share": round(size / total, 4) for part, size in parts.items()})
    result["embedding_shared_with_head"] = shared
    return result


def tune_genai_config(out_dir: Path, threads: int) -> int:
    """Decode on every core (genai uses one when the key is absent) and search greedily, as classification
    wants. 0 stays 0: onnxruntime then takes every core of the machine that *runs* the model, not the
    count of the one that built it (measured equal to an explicit 2 on 2 cores: bench/NOTES.md)."""
    path = Path(out_dir) / "genai_config.json"
    genai = json.loads(path.read_text(encoding="utf-8"))
    session = genai["model"]["decoder"].setdefault("session_options", {})
    session["intra_op_num_threads"] = threads
    # intra-op threads spin at most 20 us before sleeping: as fast as ORT's default spinning on an idle
    # machine, ~1.8x faster when other processes compete for the cores (bench/NOTES.md)
    session[SPIN_KEY] = SPIN_US
    # greedy: the label is the single most likely continuation; top_k=1 keeps it greedy even for an app
    # that turns sampling on without choosing its own top_k
    genai["search"].update({"do_sample": False, "num_beams": 1, "top_k": 1, "top_p": 1.0})
    genai["search"]["max_length"] = min(genai["model"]["context_length"], genai["search"]["max_length"])
    path.write_text(json.dumps(genai, indent=4) + "\n", encoding="utf-8")
    return threads


def max_new_tokens(rows: list[dict], encode) -> int:
    """Tokens the longest completion takes right after its prompt, plus the end token.

    genai_config.json has no "new tokens" field (search.max_length counts the prompt too), so this
    goes into ortune.json and the apps add it to each prompt's length."""
    longest = 0
    for row in rows:
        prompt, completion = row["prompt_text"], row["completion_text"]
        longest = max(longest, len(encode(prompt + completion)) - len(encode(prompt)))
    return longest + 1


def task_spec(data_cfg: DictConfig, labels: list[str], new_tokens: int, adapters: dict[str, str]) -> dict:
    """What an app needs to classify with the built model exactly as it was trained (ortune.json)."""
    from ortune import data

    spec: dict = {
        # generation: the apps print the generated text; classification: the label parse_label reads
        "task": data_cfg.task,
        "format": "chat" if data_cfg.format == "messages" else data_cfg.format,
        "labels": labels,
        "max_new_tokens": new_tokens,
        "label_rule": "first non-empty line, stripped, lowercased; exact label, else the label it "
        "starts with (ortune.metrics.parse_label)",
        "adapters": adapters,
        "active_adapter": PIPELINE_ADAPTER if adapters else None,
    }
    if data_cfg.format == "text":
        fields = data.template_fields(data_cfg.template.prompt)
        spec["prompt_template"] = data_cfg.template.prompt
        spec["input_field"] = fields[0] if len(fields) == 1 else None
        no_input = data_cfg.template.get("prompt_no_input")
        if spec["input_field"] is None and no_input and len(set(data.template_fields(no_input))) == 1:
            # the apps fill one field: an Alpaca-style model is asked with its template without the input
            spec.update(prompt_template=no_input, input_field=data.template_fields(no_input)[0])
    return spec
