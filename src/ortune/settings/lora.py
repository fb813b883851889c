"""lora.*: the LoRA adapter. Each key reaches PEFT's LoraConfig under PEFT's own name (ortune.training)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ortune.settings.fields import field_problems, setting


@dataclass
class LoraConfig:
    r: int = setting("adapter rank", range=">= 1", renamed_from=("lora.lora_r",))
    alpha: int = setting("scaling numerator (`lora_alpha`)", range="> 0", renamed_from=("lora.lora_alpha",))
    dropout: float = setting(
        "dropout on the adapter input (`lora_dropout`)", range="[0, 1)", renamed_from=("lora.lora_dropout",)
    )
    bias: str = setting("which biases train with the adapter", choices=("none", "all", "lora_only"))
    target_modules: list[str] = setting(
        "linear layers to adapt, per model in `conf/model/*.yaml`; checked against the model",
        renamed_from=("lora.lora_target_modules",),
    )
    modules_to_save: list[str] = setting(
        "modules trained in full and saved with the adapter; `[lm_head, embed_tokens]` for `tiny-phi3`"
    )


def problems(lora: DictConfig):
    yield from field_problems(LoraConfig, lora, "lora.")
    if not lora.target_modules:
        yield "lora.target_modules is empty; name the linear layers to adapt, e.g. [qkv_proj, o_proj]"
