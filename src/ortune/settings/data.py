"""data.*: where the labelled rows come from and how each becomes a prompt and a completion."""

from __future__ import annotations

import re
from dataclasses import dataclass

from omegaconf import DictConfig

from ortune.settings.fields import field_problems, group, setting

# `\n`, `\t` and `\\` in a template: what the command line can type (Hydra keeps a backslash as it is, so
# `ARGS="data.template.prompt='Q: {q}\nA: '"` would otherwise reach the prompt as a backslash and an n)
_ESCAPE = re.compile(r"\\([\\nt])")
_ESCAPED = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """`\\n` -> a newline, `\\t` -> a tab, `\\\\` -> one backslash; any other backslash stays."""
    return _ESCAPE.sub(lambda m: _ESCAPED[m[1]], text)


def unescape_templates(cfg: DictConfig) -> None:
    """Decode the escapes of every template a user may type on the command line, in place (params.yaml
    keeps them as typed; every stage sees the decoded text)."""
    for node, key in (
        (cfg.data.template, "prompt"),
        (cfg.data.template, "completion"),
        (cfg.data.template, "prompt_no_input"),
        (cfg.eval, "baseline_prompt"),
    ):
        if isinstance(node.get(key), str):
            node[key] = unescape(node[key])


@dataclass
class TemplateConfig:
    prompt: str = setting("the prompt of a `text` row: `{field}` is that field of the row")
    completion: str = setting("the completion of a `text` row (the answer the model learns)")
    prompt_no_input: str | None = setting(
        "the prompt of a row whose optional fields are empty or missing (Alpaca's two templates): the fields "
        "`prompt` names and this one does not are optional; null = every field of `prompt` is required"
    )


@dataclass
class DataConfig:
    path: str = setting("the labelled rows: a JSON Lines, JSON, CSV, Parquet or Arrow file, or a folder of them")
    task: str = setting(
        "`classification`: the answer is a label from a small set (stratified split, label checks, accuracy); "
        "`generation`: any answer text (random split, free-text metrics: exact match, chrF, ROUGE-L, JSON)",
        choices=("classification", "generation"),
        message="{key}={value} is not a task; use {quoted}",
    )
    format: str = setting(
        "`text`: `data.template`; `chat`: a user and an assistant turn through the model's chat template; "
        "`messages`: a list of {role, content} turns (`data.messages_field`), one example per assistant turn",
        choices=("text", "chat", "messages"),
        message="{key}={value} is not supported; use {quoted}",
    )
    messages_field: str = setting("`messages` rows: the field holding the list of {role, content} turns")
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
    if data.format == "messages" and data.task != "generation":
        yield "data.format=messages trains every assistant turn as free text: set data.task=generation"
    if data.validation_fraction + data.test_fraction >= 1:
        yield (
            f"data.validation_fraction={data.validation_fraction} + data.test_fraction={data.test_fraction} "
            "leave no rows to train on; their sum must be below 1"
        )
