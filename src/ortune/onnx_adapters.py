"""LoRA adapters that onnxruntime-genai switches at run time (onnx.adapter=separate).

What the builder (onnxruntime-genai 0.18) does with `adapter_path`: it loads base + adapter with PEFT
(unmerged) and writes each adapted projection as MatMul(base) + MatMul(lora_B, MatMul(lora_A)),
with lora_B pre-scaled by alpha/r, and q/k/v unpacked. The LoRA weights are baked in as constant
initializers (`model.layers.0.attn.q_proj.lora_A.MatMul.weight` ...), and modules_to_save (the tiny
model's lm_head and embeddings) simply overwrite the base weights. The graph it emits is therefore
one fixed fine-tuned model, like a merged one, only slower; `og.Adapters` cannot switch it.

What ortune makes of it: every tensor an adapter changes becomes a graph input whose default (its
initializer) is the base model's value (an empty rank-0 LoRA pair, or the base lm_head/embedding),
and each adapter's own tensors go into `adapters/<name>.onnx_adapter` (onnxruntime's adapter
format). `og.Adapters.load` + `generator.set_active_adapter` then switch between adapters, ranks may
differ, and with none active the model is the bare base (tests/test_export_adapters.py checks each
against PyTorch).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ortune.errors import OrtuneError

ADAPTER_DIR = "adapters"
# Projection names the builder gives LoRA paths (builders/base.py make_matmul_lora); listing them all
# up front keeps them unquantized in one build. A name the graph lacks is simply not matched.
_ATTN = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2")


def lora_node_names(num_layers: int) -> list[str]:
    names = []
    for layer in range(num_layers):
        for block, projections in (("attn", _ATTN), ("mlp", _MLP)):
            for projection in projections:
                for part in ("lora_A", "lora_B"):
                    names.append(f"/model/layers.{layer}/{block}/{projection}/{part}/MatMul")
    return names


def is_lora_tensor(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise OrtuneError(f"{adapter_dir}: no adapter_config.json; point it at a PEFT LoRA adapter folder")
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise OrtuneError(f"{adapter_dir}: peft_type={config.get('peft_type')}; only LoRA adapters can be exported")
    return config


def check_targets(configs: dict[str, dict], main: str) -> None:
    """Every adapter must adapt modules the main adapter adapts: the shared graph only has LoRA paths there."""
    main_targets = configs[main].get("target_modules")
    for name, config in configs.items():
        targets = config.get("target_modules")
        if name == main or not isinstance(targets, list) or not isinstance(main_targets, list):
            continue  # PEFT also allows a regex here; the tensor check after the build covers that case
        # PEFT saves all-linear expanded to full module paths: compare the layer names
        extra = sorted(_leaf_names(targets) - _leaf_names(main_targets))
        if extra:
            raise OrtuneError(
                f"onnx.extra_adapters.{name}: adapts {', '.join(extra)}, which the pipeline's adapter does not "
                f"({', '.join(sorted(main_targets))}); adapters on one base model must target the same modules"
            )


def _leaf_names(targets: list[str]) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in targets}


def quantized_lora_nodes(model_path: Path) -> list[str]:
    """LoRA MatMuls the builder quantized anyway (their names as the builder's nodes_to_exclude wants them)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return sorted(
        n.name.rsplit("_Q", 1)[0]
        for n in graph.node
        if ("/lora_A/" in n.name or "/lora_B/" in n.name) and n.op_type != "MatMul"
    )


def _initializers(model_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


def adapter_tensors(adapter_graph: Path, base_graph: Path | None) -> dict[str, np.ndarray]:
    """The tensors one adapter contributes: its LoRA weights, plus every tensor whose value differs from
    the base build (modules_to_save). Without a base build only the LoRA weights count."""
    built = _initializers(adapter_graph)
    tensors = {name: value for name, value in built.items() if is_lora_tensor(name)}
    if base_graph is not None:
        base = _initializers(base_graph)
        for name, value in built.items():
            if (
                name in base
                and not is_lora_tensor(name)
                and (base[name].shape != value.shape or not np.array_equal(base[name], value))
            ):
                tensors[name] = value
    return tensors


def make_switchable(model_dir: Path, adapters: dict[str, dict[str, np.ndarray]], base_graph: Path | None) -> dict:
    """Turn the built graph in model_dir into a base model with adapter inputs, and write one
    .onnx_adapter per adapter. Returns {name: relative path} for ortune.json."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from ortune.export import model_file

    path = model_file(model_dir)
    model = onnx.load(str(path))
    inits = {init.name: init for init in model.graph.initializer}
    names = sorted({name for tensors in adapters.values() for name in tensors})
    for adapter, tensors in adapters.items():
        foreign = [name for name in tensors if name not in inits]
        if foreign:
            raise OrtuneError(
                f"adapter '{adapter}' changes {foreign[0]} (and {len(foreign) - 1} more), which the "
                "graph built from the pipeline's adapter lacks; adapters on one base model must "
                "target the same modules"
            )
    base = _initializers(base_graph) if base_graph is not None else {}
    for name in names:
        init = inits[name]
        dims = list(init.dims)
        if is_lora_tensor(name):
            # MatMul weights are [in, out]: lora_A is [hidden, r], lora_B is [r, out]; r may differ per adapter
            rank_axis = 1 if ".lora_A." in name else 0
            shape = [d if axis != rank_axis else "lora_rank" for axis, d in enumerate(dims)]
            dims[rank_axis] = 0
            default = np.zeros(dims, dtype=helper.tensor_dtype_to_np_dtype(init.data_type))
        else:
            if name not in base:
                raise OrtuneError(
                    f"{name}: changed by an adapter but missing from the base build; cannot restore "
                    "the base value for 'no adapter active'"
                )
            shape, default = dims, base[name]
        model.graph.input.append(helper.make_tensor_value_info(name, init.data_type, shape))
        init.CopyFrom(numpy_helper.from_array(default, name))
    data_name = f"{path.name}.data"
    (path.parent / data_name).unlink(missing_ok=True)  # onnx.save appends to an existing data file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)

    folder = Path(model_dir) / ADAPTER_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    files = {}
    for adapter, tensors in adapters.items():
        fmt = ort.AdapterFormat()
        fmt.set_adapter_version(1)
        fmt.set_model_version(1)
        fmt.set_parameters(
            {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in tensors.items()}
        )
        fmt.export_adapter(str(folder / f"{adapter}.onnx_adapter"))
        files[adapter] = f"{ADAPTER_DIR}/{adapter}.onnx_adapter"
    return files
