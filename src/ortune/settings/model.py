"""model.*: which base model, from where (conf/model/*.yaml, one file per model)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ortune.settings.fields import field_problems, setting


@dataclass
class TinyModelConfig:
    hidden_size: int = setting("width of the random toy model")
    intermediate_size: int = setting("MLP width")
    num_hidden_layers: int = setting("layers")
    num_attention_heads: int = setting("attention heads")
    max_position_embeddings: int = setting("longest sequence")
    vocab_size: int = setting("tokens of the BPE tokenizer trained on the dataset text")


@dataclass
class GgufPackageConfig:
    name: str = setting("the pip distribution, pinned in requirements-nodeps.txt")
    file: str = setting("the .gguf inside it, relative to site-packages (or, with assemble, the joined file's name)")
    assemble: bool = setting(
        "the .gguf ships in chunk packages (the distribution's requirements) that its module's assemble() joins",
        default=False,
    )
    sha256: str | None = setting("the .gguf's sha256, checked before conversion (null: recorded only)", default=None)
    setup: str = setting("the command that installs the package, named when it is missing", default="make setup")


@dataclass
class ModelConfig:
    name: str = setting("the model's name (its conf/model file)")
    source: str = setting(
        "where the weights come from", choices=("tiny", "hub", "gguf"), message="{key}={value} must be {quoted}"
    )
    hub_id: str | None = setting("the Hugging Face Hub repository")
    revision: str | None = setting("the Hub commit, pinned")
    path: str | None = setting("a local folder with config.json, weights and a tokenizer; overrides hub_id")
    gguf_file: str | None = setting("a local .gguf file to convert; like path, it overrides source")
    gguf_package: GgufPackageConfig | None = setting("a pinned pip package that ships the .gguf")
    trust_remote_code: bool = setting("run the model repository's own code (only for models that need it)")
    license: str | None = setting(
        "the weights' license (a Hugging Face license id) for metrics/base.json and the model card; null: the "
        "GGUF's own general.license",
        default=None,
    )
    base_model: str | None = setting(
        "the Hub model the weights derive from, for the model card's base_model (null: hub_id)", default=None
    )
    tiny: TinyModelConfig | None = setting("the shape of the random toy model (source=tiny)", default=None)


def problems(model: DictConfig):
    yield from field_problems(ModelConfig, model, "model.")
    if model.source == "gguf" and not model.gguf_file and model.gguf_package is None:
        yield "model.source=gguf needs model.gguf_file=/path/to/model.gguf (or model.gguf_package)"
    if model.path and model.gguf_file:
        yield "model.path and model.gguf_file are both set; set one of them (the other to null)"
