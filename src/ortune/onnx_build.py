"""What build_onnx does to one model folder: run the builder (merged, or base + switchable adapters), keep
the onnx.int8_share most sensitive units int8 (mixed precision), write the runtime files beside the model,
compare it with PyTorch (parity) and write its model card. scripts/build_onnx.py ships the folder
atomically and gates on parity; ortune.auto_quantization builds each onnx.candidates entry through here."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from ortune import data, embedding_int8, export, model_card, modeling, onnx_adapters, parity, quantize
from ortune.artifacts import read_json
from ortune.errors import OrtuneError

log = logging.getLogger("ortune")


def build_checked(cfg: DictConfig, out: Path, scratch: Path, logs: Path) -> tuple[dict, dict, dict]:
    """Build into `out`, write the runtime files beside the model and measure parity: (metrics, builder
    options, task spec)."""
    o, prepared = cfg.onnx, Path(cfg.paths.prepared)
    rows = data.read_jsonl(prepared / "validation.jsonl")
    labels = json.loads((prepared / "labels.json").read_text(encoding="utf-8"))
    options, adapter_files, target = build(cfg, out, scratch, logs)
    embedding = None
    if export.quantizes_int8_embedding(cfg.precision, o):
        embedding = embedding_int8.quantize_embedding(out, o.block_size)
    graph = export.check_graph(out)
    threads = export.tune_genai_config(out, o.intra_op_num_threads)
    texts = [
        dict(prompt_text=data.prompt_text(r["prompt"], cfg.paths.merged), completion_text=_content(r["completion"]))
        for r in rows + _rows_if_any(prepared / "train.jsonl")
    ]
    tokenizer = modeling.load_tokenizer(cfg.paths.merged, cfg.model.trust_remote_code)
    answer_tokens = export.max_new_tokens(texts, lambda s: tokenizer(s, add_special_tokens=False)["input_ids"])
    task = export.task_spec(cfg.data, labels, answer_tokens, adapter_files)
    (out / export.TASK_FILE).write_text(json.dumps(task, indent=2) + "\n", encoding="utf-8")
    metrics = {
        "precision": cfg.precision,
        "execution_provider": o.execution_provider,
        "adapter": o.adapter,
        "adapters": sorted(adapter_files),
        "intra_op_num_threads": threads,
        "max_new_tokens": task["max_new_tokens"],
        "builder_options": export.describe_options(options),
        "logits_dtype": graph["logits_dtype"],
    }
    if embedding:
        metrics["int8_embedding"] = embedding
    if target:
        metrics["int8_nodes"] = [
            o["match"]["name"] for o in target["quant_config"]["weights"]["overrides"] if o.get("type") == "int8"
        ]
    prompts = [t["prompt_text"] for t in texts[: len(rows)]]
    metrics.update(check_parity(cfg, out, prompts, labels, task, adapter_files, tokenizer))
    return metrics, options, task


def build(cfg: DictConfig, out: Path, scratch: Path, logs: Path) -> tuple[dict, dict, dict | None]:
    """Run the builder; returns the builder options used, {adapter name: file} (adapter=separate) and the
    structured target options (onnx.int8_share) or None."""
    o, precision, provider = cfg.onnx, cfg.precision, cfg.onnx.execution_provider
    source = Path(cfg.paths.merged if o.adapter == "merged" else cfg.paths.base_model)
    export.check_k_quant_blocks(source, precision, o)
    export.check_tied_asymmetric(source, precision, o)
    quantize.check_grid(source, precision, o.block_size, o.algorithm, o.int8_share)
    if o.adapter == "merged":
        options = export.builder_options(precision, o, trust_remote_code=cfg.model.trust_remote_code)
        target = mixed_precision(cfg, options) if o.int8_share else None
        export.run_builder(
            Path(cfg.paths.merged),
            out,
            precision,
            provider,
            options,
            log_file=Path(f"{logs}.log"),
            target_options=target,
        )
        return options, {}, target
    adapters = {export.PIPELINE_ADAPTER: Path(cfg.paths.adapter), **{k: Path(v) for k, v in o.extra_adapters.items()}}
    configs = {name: onnx_adapters.adapter_config(d) for name, d in adapters.items()}
    onnx_adapters.check_targets(
        configs, export.PIPELINE_ADAPTER
    )  # before any build: the graph has LoRA paths for these only
    saved = {m for c in configs.values() for m in c.get("modules_to_save") or []}
    base = Path(cfg.paths.base_model)
    layers = json.loads((base / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    # adapter tensors must stay float to be graph inputs: the LoRA paths, and whatever modules_to_save replaces
    keep = onnx_adapters.lora_node_names(layers)
    keep += [node for module, node in export.SAVED_MODULE_NODES.items() if module in saved]
    options = export.builder_options(precision, o, keep, trust_remote_code=cfg.model.trust_remote_code)
    if saved & set(export.SAVED_MODULE_NODES) and json.loads((base / "config.json").read_text(encoding="utf-8")).get(
        "tie_word_embeddings"
    ):
        # the builder shares one matrix between the embeddings and lm_head of a tied base; an adapter that
        # replaces either one would then replace both (wrong logits): keep them apart, each an adapter input
        if options.get("shared_embeddings", "false").lower() == "true":
            raise OrtuneError(
                f"onnx.extra_options.shared_embeddings=true: the adapters save {', '.join(sorted(saved))} "
                "in full, which a shared embedding/lm_head matrix cannot hold; drop the option"
            )
        options["shared_embeddings"] = "false"
    graphs = {}
    for name, adapter_dir in adapters.items():
        target = out if name == export.PIPELINE_ADAPTER else scratch / name
        export.run_builder(
            base, target, precision, provider, options, log_file=Path(f"{logs}-{name}.log"), adapter_dir=adapter_dir
        )
        graphs[name] = export.model_file(target)
        if quantized := onnx_adapters.quantized_lora_nodes(graphs[name]):
            raise OrtuneError(
                f"the builder quantized LoRA node {quantized[0]}, which ortune could not name up front; "
                "use onnx.adapter=merged for this model"
            )
    base_graph = None
    if saved:  # restoring the base lm_head/embeddings for "no adapter" needs them as the base build has them
        export.run_builder(base, scratch / "base", precision, provider, options, log_file=Path(f"{logs}-base.log"))
        base_graph = export.model_file(scratch / "base")
    tensors = {name: onnx_adapters.adapter_tensors(graph, base_graph) for name, graph in graphs.items()}
    return options, onnx_adapters.make_switchable(out, tensors, base_graph), None


# Training rows whose inputs to every linear layer measure its sensitivity: more adds little to the
# ranking (the errors are averages over thousands of tokens) and costs a forward pass each.
CALIBRATION_ROWS = 64


def mixed_precision(cfg: DictConfig, options: dict) -> dict:
    """Builder target options keeping the onnx.int8_share most sensitive units of the merged model int8."""
    import torch

    o, merged = cfg.onnx, Path(cfg.paths.merged)
    model = modeling.load_causal_lm(merged, cfg.model.trust_remote_code).eval()
    tokenizer = modeling.load_tokenizer(merged, cfg.model.trust_remote_code)
    rows = data.read_jsonl(Path(cfg.paths.prepared) / "train.jsonl")[:CALIBRATION_ROWS]
    texts = [data.prompt_text(r["prompt"], merged) + _content(r["completion"]) for r in rows]
    errors = quantize.output_errors(model, tokenizer, texts, o.block_size)
    sizes = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    units = quantize.pick_int8(errors, sizes, o.int8_share)
    log.info(
        "int8 for %d of %d units (onnx.int8_share=%g), worst int4 output error first: %s",
        len(units),
        len(quantize.unit_errors(errors)),
        o.int8_share,
        ", ".join(f"layer {i} {u}" for i, u in units[:6]),
    )
    excluded = [node for node in options.get("nodes_to_exclude", "").split(",") if node]
    target = quantize.int8_overrides(units, options.get("fuse_mlp_gate_up", "").lower() == "true", excluded)
    # structured options replace the legacy op types, and with them the builder's own addition of Gather for
    # a tied model's shared int4 embedding/lm_head matrix: state them (measured: 201 vs 90 MB otherwise)
    shared = (
        bool(getattr(model.config, "tie_word_embeddings", False))
        and options.get("shared_embeddings", "true") != "false"
    )
    target["quant_config"]["weights"]["op_types"] = sorted(
        set(export.builder_ops(cfg.precision, o)) | ({"MatMul", "Gather"} if shared else set())
    )
    if o.last_matmul_int8:
        target["quant_config"]["weights"]["overrides"].append({"match": {"name": "/lm_head/MatMul"}, "type": "int8"})
    return target


def check_parity(
    cfg: DictConfig, out: Path, prompts: list[str], labels: list[str], task: dict, adapter_files: dict, tokenizer
) -> dict:
    """The built model against PyTorch on `prompts`: the merged model (`tokenizer` is its), or for separate
    adapters the base with each adapter and without one."""
    if cfg.onnx.parity_prompts:
        prompts = prompts[: cfg.onnx.parity_prompts]
    if why := parity.runnable_on_cpu(out):
        if cfg.onnx.execution_provider == "cpu":
            # a CPU graph the CPU provider cannot load is a broken build, never something to ship unjudged
            raise OrtuneError(
                f"the {cfg.precision}/cpu graph the builder wrote does not load in onnxruntime ({why[:200]}); "
                f"it cannot be shipped: change the quantization settings (onnx.extra_options, onnx.*) or the precision"
            )
        log.warning("parity not measured: the %s graph does not run on the CPU provider here (%s)", cfg.precision, why)
        return {"parity": {"skipped": f"no CPU kernel for this graph ({why[:160]})", "passed": None}}
    from ortune.generation import OnnxGenerator

    generator = OnnxGenerator(out, cpu=cfg.onnx.execution_provider != "cpu")
    if cfg.data.format in ("chat", "messages"):
        messages = [r["prompt"] for r in data.read_jsonl(Path(cfg.paths.prepared) / "validation.jsonl")]
        parity.check_chat_template(generator, messages, Path(cfg.paths.merged))
    trust, n = cfg.model.trust_remote_code, task["max_new_tokens"]
    references = {None: (Path(cfg.paths.merged), None)}
    if adapter_files:  # each adapter against PyTorch base + that adapter, and no adapter against the bare base
        references = {
            name: (
                Path(cfg.paths.base_model),
                Path(cfg.paths.adapter) if name == export.PIPELINE_ADAPTER else Path(cfg.onnx.extra_adapters[name]),
            )
            for name in adapter_files
        }
        references[""] = (Path(cfg.paths.base_model), None)
    results = {}
    for name, (model_dir, adapter_dir) in references.items():
        if name is not None:
            generator.use_adapter(name or None)
        merged = model_dir == Path(cfg.paths.merged)
        reference = parity.TorchReference(model_dir, adapter_dir, trust, tokenizer if merged else None)
        result = parity.compare_task(cfg, reference, generator, prompts, labels, n)
        log.info(
            "parity %s: max |logit diff| %.2e (%.2e of the logits' spread), label agreement %.3f (%s: %s)",
            "model" if name is None else name or "no adapter",
            result["max_abs_logit_diff"],
            result["max_rel_logit_diff"],
            result["label_agreement"],
            result["target"],
            "ok" if result["passed"] else "MISSED",
        )
        results[name] = result
    if not adapter_files:
        return {"parity": results[None]}
    base_result = results.pop("")
    base_result["passed"] = None  # the bare base is reported, not judged: it was never trained for the task
    return {"parity": results.pop(export.PIPELINE_ADAPTER), "adapter_parity": {**results, "(no adapter)": base_result}}


def _rows_if_any(path: Path) -> list[dict]:
    """The training split, when there is one (ortune's bench builds from an eval-only folder)."""
    return data.read_jsonl(path) if path.is_file() else []


def _content(completion) -> str:
    return completion if isinstance(completion, str) else completion[0]["content"]


# metrics["int8_embedding"] (ortune.embedding_int8) -> the model card's words for it
EMBEDDING_LOOKUPS = {
    "shared_with_head": "int8, reading the LM head's int8 weights (GatherBlockQuantized; quantized by ortune)",
    "own_blocks": "int8 blocks of its own (GatherBlockQuantized; quantized by ortune)",
}


def card(cfg: DictConfig, metrics: dict, task: dict, options: dict) -> str:
    prepared = Path(cfg.paths.prepared)
    base_info = read_json(Path(cfg.paths.metrics) / "base.json", {})
    o = cfg.onnx
    settings = {
        "precision": cfg.precision,
        "execution provider": o.execution_provider,
        "adapter": o.adapter,
        "builder extra options": "; ".join(f"{k}={v}" for k, v in export.describe_options(options).items()) or "none",
        "kept float": (", ".join(o.keep_float) or "none")
        if cfg.precision in export.QUANTIZED
        else "n/a (not quantized)",
        "intra_op_num_threads": metrics["intra_op_num_threads"] or "0 (every core of the machine that runs it)",
        "search": "greedy (do_sample=false, num_beams=1, top_k=1)",
        "max new tokens": task["max_new_tokens"],
        "adapters": ", ".join(metrics["adapters"]) or "none (merged)",
    }
    if embedding := metrics.get("int8_embedding"):
        settings["embedding lookup"] = EMBEDDING_LOOKUPS[embedding]
    if grid := quantize.read_grid(cfg.paths.merged if o.adapter == "merged" else cfg.paths.adapter):
        settings["training"] = (
            f"quantization-aware: the adapter trained through this int4 grid (block "
            f"{grid['block_size']}, symmetric); the merged weights are on it"
        )
    return model_card.render(
        model={
            **dict(name=cfg.model.name, hub_id=cfg.model.hub_id, revision=cfg.model.revision, path=cfg.model.path),
            # what fetch_model loaded (a model.gguf_file is named after its file, not the conf entry it overrode)
            **{key: base_info[key] for key in ("architecture", "license", "base_model") if base_info.get(key)},
            "name": base_info.get("model") or cfg.model.name,
            "resolved_revision": base_info.get("resolved_revision"),
            **{key: value for key, value in base_info.items() if key.startswith("gguf_")},
        },
        dataset={
            "path": cfg.data.path,
            "sha256": model_card.sha256(Path(cfg.data.path)),
            "train_sha256": model_card.sha256(prepared / "train.jsonl")
            if (prepared / "train.jsonl").is_file()
            else "none",
            "validation_sha256": model_card.sha256(prepared / "validation.jsonl"),
            "test_sha256": (
                model_card.sha256(prepared / "test.jsonl") if (prepared / "test.jsonl").is_file() else "none"
            ),
            "train_rows": len(_rows_if_any(prepared / "train.jsonl")),
            "validation_rows": len(data.read_jsonl(prepared / "validation.jsonl")),
            "test_rows": len(_rows_if_any(prepared / "test.jsonl")),
        },
        settings=settings,
        lora=read_json(Path(cfg.paths.adapter) / "adapter_config.json"),
        metrics=metrics,
        task=task,
    )
