"""Write the settings tables of docs/ from the schema (`make docs`); with --check, fail when one is stale.

A table sits between `<!-- settings: KEY ... -->` and `<!-- /settings -->`: a row per setting listed (a group
such as `lora` lists each of its settings), with its default as conf/ composes it without a model (a
conf/model file overrides a few; the pages say which), its allowed values or range and its one-line doc,
all declared once in src/ortune/settings/.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

from ortune import config
from ortune.settings import Config
from ortune.settings.fields import leaves

REPO = Path(__file__).resolve().parents[1]
TABLE = re.compile(r"(<!-- settings: ([\w. ]+) -->\n)(.*?)(<!-- /settings -->)", re.S)


def cell(value) -> str:
    """A default as YAML spells it (what a user writes in conf/ or an override)."""
    if value is None or isinstance(value, bool):
        text = yaml.safe_dump(value).split("\n")[0]
    elif isinstance(value, list | dict):
        text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    else:
        text = str(value)
    return f"`{text}`"


def allowed(meta) -> str:
    if meta["choices"] is not None:
        return ", ".join(f"`{choice}`" for choice in meta["choices"])
    return f"`{meta['range']}`" if meta["range"] else ""


def table(keys: str, defaults: dict) -> str:
    schema = leaves(Config)
    rows = ["| setting | default | values | meaning |", "|---|---|---|---|"]
    for name in keys.split():
        listed = [key for key in schema if key == name or key.startswith(f"{name}.")]
        if not listed:
            raise SystemExit(f"settings_docs: {name} is not a setting of ortune.settings.Config")
        for key in listed:
            default = defaults
            for part in key.split("."):
                default = default[part]
            meta = schema[key].metadata
            rows.append(f"| `{key}` | {cell(default)} | {allowed(meta)} | {meta['doc']} |")
    return "\n".join(rows) + "\n"


def render(text: str, defaults: dict) -> str:
    return TABLE.sub(lambda m: m[1] + table(m[2], defaults) + m[4], text)


def main(argv: list[str]) -> int:
    check = argv == ["--check"]
    defaults = config.compose(["~model"], config_dir=REPO / "conf")
    stale = []
    for page in sorted((REPO / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        if (fresh := render(text, defaults)) != text:
            stale.append(str(page.relative_to(REPO)))
            if not check:
                page.write_text(fresh, encoding="utf-8")
    if check and stale:
        print(f"settings tables out of date in {', '.join(stale)}: run `make docs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
