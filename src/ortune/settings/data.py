"""data.*: where the labelled rows come from and how each becomes a prompt and a completion."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from ortune.settings.fields import field_problems, group, setting


@dataclass
class TemplateConfig:
    prompt: str = setting("the prompt of a `text` row: `{field}` is that field of the row")
    completion: str = setting("the completion of a `text` row (the answer the model learns)")


@dataclass
class DataConfig:
    path: str = setting("the labelled rows: a JSON Lines, JSON, CSV, Parquet or Arrow file, or a folder of them")
    format: str = setting(
        "`text`: `data.template`; `chat`: a user and an assistant turn through the model's chat template",
        choices=("text", "chat"),
        message="{key}={value} is not supported; use {quoted}",
    )
    input_column: str = setting("the input field (user turn; `{...}` in the default prompt template)")
    output_column: str = setting("the answer field (assistant turn; the default completion and `data.label_field`)")
    template: TemplateConfig = group(TemplateConfig, "how a `text` row becomes a prompt and a completion")
    label_field: str = setting("the label field (stratified split, label set); defaults to `data.output_column`")
    labels: list[str] | None = setting("the allowed labels; null accepts whatever labels the data holds")
    validation_fraction: float = setting(
        "share of the rows held out for validation: what anything that chooses reads (auto quantization, "
        "`make best`, training's eval loss); stratified by label",
        range="(0, 1)",
        message="{key}={value} must be between 0 and 1 (exclusive)",
    )
    test_fraction: float = setting(
        "share of the rows held out for test: only the eval stage's headline reads them (stratified by label)",
        range="(0, 1)",
        message="{key}={value} must be between 0 and 1 (exclusive)",
        renamed_from=("data.eval_fraction",),
    )


def problems(data: DictConfig):
    yield from field_problems(DataConfig, data, "data.")
    if data.validation_fraction + data.test_fraction >= 1:
        yield (
            f"data.validation_fraction={data.validation_fraction} + data.test_fraction={data.test_fraction} "
            "leave no rows to train on; their sum must be below 1"
        )
