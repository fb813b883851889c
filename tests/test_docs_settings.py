"""The docs' settings tables agree with the schema and conf/: every row names a setting the schema has, its
documented default is conf/'s, and every setting of the data, lora, train, onnx and eval groups is either
a row of such a table or named on the page listed for it in DOCUMENTED_ELSEWHERE.

The tables are generated from the schema (`make docs`, scripts/settings_docs.py): the last test fails when
one is stale, so a setting's doc, values and default are spelled in src/ortune/settings/ and conf/ only.

A settings table is a docs/*.md table with a `default` column whose first column names `group.key`
settings in backticks (docs/training.md, docs/export.md). A default cell is read as YAML (`1e-3` as the
number it spells).

Which default: each group's own, as conf/config.yaml selects it (conf/train/cpu.yaml, conf/onnx/default.yaml,
...), composed without a model (`~model`), interpolations resolved (data.label_field reads `tone`). A model
file (conf/model/*.yaml) then overrides a few of them (SmolLM2 trains with train.method=qat and builds
onnx.block_size=32; tiny-phi3 trains lm_head and the embeddings); the pages say so in prose beside the
tables, which show what every model starts from.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from ortune import config

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GROUPS = ("data", "lora", "train", "onnx", "eval")

# Settings documented in a page's prose rather than a table: key (or section, covering the keys under it)
# -> the page that names it. The test checks that the page does name it, so the list cannot go stale.
DOCUMENTED_ELSEWHERE = {
    # docs/data.md: how rows are read, checked, labelled and split
    "data.path": "data.md",
    "data.template": "data.md",
    "data.labels": "data.md",
    "data.validation_fraction": "data.md",
    "data.test_fraction": "data.md",
    # docs/export.md: providers, auto quantization, adapters, runtime and parity settings
    "onnx.execution_provider": "export.md",
    "onnx.quantization": "export.md",
    "onnx.candidates": "export.md",
    "onnx.adapter": "export.md",
    "onnx.extra_adapters": "export.md",
    "onnx.intra_op_num_threads": "export.md",
    "onnx.parity_prompts": "export.md",
    "onnx.min_label_agreement": "export.md",
    "onnx.require_parity": "export.md",
    # docs/evaluation.md: every eval.* setting, where it is explained
    "eval.path": "evaluation.md",
    "eval.max_new_tokens": "evaluation.md",
    "eval.limit": "evaluation.md",
    "eval.compare": "evaluation.md",
    "eval.baseline_prompt": "evaluation.md",
    "eval.baseline_shots": "evaluation.md",
    "eval.baseline_new_tokens": "evaluation.md",
    "eval.bootstrap_resamples": "evaluation.md",
    "eval.bootstrap_seed": "evaluation.md",
    "eval.batch_size": "evaluation.md",
    "eval.latency": "evaluation.md",
}


def schema_keys(node: type = config.Config, prefix: str = "") -> list[str]:
    """Every leaf setting of the schema, dotted (a dict- or list-valued setting is one leaf)."""
    keys = []
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        hint = hints[f.name]
        sub = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
        keys += schema_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return keys


SCHEMA = schema_keys()


@pytest.fixture(scope="module")
def defaults() -> dict:
    return config.compose(["~model"], config_dir=REPO / "conf")


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def settings_rows() -> list[tuple[str, str, str]]:
    """(page, setting, default cell) of every row of every settings table in docs/."""
    rows = []
    for page in sorted(DOCS.glob("*.md")):
        tables, table = [], []
        for line in [*page.read_text(encoding="utf-8").splitlines(), ""]:
            if line.startswith("|"):
                table.append(cells(line))
            elif table:
                tables.append(table)
                table = []
        for header, _, *body in (t for t in tables if len(t) > 2):
            if "default" not in header:
                continue
            column = header.index("default")
            for row in body:
                if m := re.fullmatch(rf"`((?:{'|'.join(GROUPS)})\.[\w.]+)`", row[0]):
                    rows.append((page.name, m.group(1), row[column]))
    return rows


ROWS = settings_rows()


def documented_value(cell: str):
    text = cell.strip().strip("`")
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)  # PyYAML reads 1e-3 as text
        except ValueError:
            pass
    return value


def same(documented, actual) -> bool:
    if isinstance(documented, bool) or isinstance(actual, bool):
        return documented is actual
    if isinstance(documented, int | float) and isinstance(actual, int | float):
        return float(documented) == float(actual)
    return documented == actual


def test_the_docs_have_settings_tables():
    pages = {page for page, _, _ in ROWS}
    assert {"training.md", "export.md"} <= pages, pages


@pytest.mark.parametrize(("page", "key", "cell"), ROWS, ids=[f"{p}:{k}" for p, k, _ in ROWS])
def test_each_row_is_a_setting_with_its_conf_default(page, key, cell, defaults):
    assert key in SCHEMA, f"docs/{page}: {key} is not a setting of ortune.config.Config"
    node = defaults
    for part in key.split("."):
        node = node[part]
    assert same(documented_value(cell), node), f"docs/{page}: {key} documented {cell}, conf/ has {node!r}"


def test_no_setting_has_two_rows():
    keys = [key for _, key, _ in ROWS]
    assert sorted({k for k in keys if keys.count(k) > 1}) == []


def covered(key: str, names) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in names)


def test_every_setting_of_the_groups_is_documented():
    tabled = {key for _, key, _ in ROWS}
    missing = [
        key
        for key in SCHEMA
        if key.split(".")[0] in GROUPS and not covered(key, tabled) and not covered(key, DOCUMENTED_ELSEWHERE)
    ]
    assert missing == [], f"add a row to a settings table in docs/ (or a line to DOCUMENTED_ELSEWHERE): {missing}"


@pytest.mark.parametrize(("key", "page"), DOCUMENTED_ELSEWHERE.items())
def test_settings_documented_elsewhere_are_named_there_and_not_tabled(key, page):
    assert any(covered(setting, [key]) for setting in SCHEMA), f"{key} is not a setting"
    assert not covered(key, {k for _, k, _ in ROWS}), f"{key} has a table row: drop it from DOCUMENTED_ELSEWHERE"
    text = (DOCS / page).read_text(encoding="utf-8")
    assert re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", text), f"docs/{page} never names {key}"


def test_the_settings_tables_are_generated_from_the_schema():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "scripts/settings_docs.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
