"""What a schema entry declares, and the checks derived from it.

A setting is declared once, on its dataclass field: `setting(doc, choices=..., range=..., ...)` gives its
one-line doc, its allowed values or range, the names other tools use for it (`renamed_from`, for the
"ortune calls it ..." hint) and, where the generic sentence would not do, its own `message`. The default is
not here: Hydra composes params.yaml from conf/, so conf/ holds every default, once.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Iterator

from omegaconf import MISSING, OmegaConf

# `>= 1`, `> 0`, or an interval such as `[0, 1)`
_BOUND = re.compile(r"(>=?) (-?[\d.]+)")
_INTERVAL = re.compile(r"([\[(])(-?[\d.]+), (-?[\d.]+)([\])])")


def setting(doc: str, *, choices=None, range=None, message=None, renamed_from=(), default=MISSING):
    """A field of the schema. `message` is a str.format template over key, value, range, choices, either
    ("a, b or c") and quoted ("'a', 'b' or 'c'")."""
    meta = {"doc": doc, "choices": choices, "range": range, "message": message, "renamed_from": renamed_from}
    return dataclasses.field(default=default, metadata=meta)


def group(schema: type, doc: str):
    """A nested group of settings (train.qlora, eval.latency, ...)."""
    return dataclasses.field(default_factory=schema, metadata={"doc": doc})


def choice_problem(key: str, value, choices) -> str | None:
    if value not in choices:
        return f"{key}={value} must be one of {', '.join(map(str, choices))}"
    return None


def in_range(value, spec: str) -> bool:
    if bound := _BOUND.fullmatch(spec):
        low = float(bound[2])
        return value >= low if bound[1] == ">=" else value > low
    opening, low, high, closing = _INTERVAL.fullmatch(spec).groups()
    above = float(low) <= value if opening == "[" else float(low) < value
    below = value <= float(high) if closing == "]" else value < float(high)
    return above and below


def value_problem(key: str, value, meta) -> str | None:
    """The one problem of `value` for the setting `key` declared with `meta`, or None."""
    if isinstance(value, float) and not math.isfinite(value):  # every number of a setting is finite (nan, inf)
        return f"{key}={value} must be a finite number"
    choices, spec = meta.get("choices"), meta.get("range")
    listed = OmegaConf.is_list(value) or isinstance(value, list)
    if choices is not None and listed:
        if unknown := [str(item) for item in value if item not in choices]:
            return f"{key}: {', '.join(unknown)} unknown; list any of {', '.join(choices)} (or [])"
        return None
    bad = (choices is not None and value not in choices) or (
        spec is not None and value is not None and not in_range(value, spec)
    )
    if not bad:
        return None
    if meta.get("message"):
        names = list(map(str, choices or ()))
        either = f"{', '.join(names[:-1])} or {names[-1]}" if names else ""
        quoted = f"{', '.join(repr(n) for n in names[:-1])} or {names[-1]!r}" if names else ""
        return meta["message"].format(
            key=key, value=value, range=spec, choices=", ".join(names), either=either, quoted=quoted
        )
    if choices is not None:
        return choice_problem(key, value, choices)
    return f"{key}={value} must be {'' if spec.startswith('>') else 'in '}{spec}"


def subgroup(schema: type, name: str) -> type | None:
    """The dataclass a field of `schema` holds (also when it may be null), or None for a leaf setting."""
    hint = typing.get_type_hints(schema)[name]
    return next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)


def field_problems(schema: type, node, prefix: str) -> Iterator[str]:
    """Every declared choice and range of `schema`, checked on `node` (a validated group), in field order."""
    seen = set()
    for f in dataclasses.fields(schema):
        value = node[f.name]
        if sub := subgroup(schema, f.name):
            problems = field_problems(sub, value, f"{prefix}{f.name}.") if value is not None else ()
        else:
            problems = [value_problem(f"{prefix}{f.name}", value, f.metadata)]
        for problem in problems:
            if problem and problem not in seen:  # a message shared by two fields (train.seed) is said once
                seen.add(problem)
                yield problem


def renamed(schema: type, prefix: str) -> dict[str, str]:
    """Other tools' names for the settings of `schema` -> ortune's (dotted)."""
    names = {}
    for f in dataclasses.fields(schema):
        if sub := subgroup(schema, f.name):
            names.update(renamed(sub, f"{prefix}{f.name}."))
        names.update({old: f"{prefix}{f.name}" for old in f.metadata.get("renamed_from", ())})
    return names


def leaves(schema: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every leaf setting of `schema`, dotted, with its field (a dict- or list-valued setting is one leaf)."""
    found = {}
    for f in dataclasses.fields(schema):
        sub = subgroup(schema, f.name)
        found.update(leaves(sub, f"{prefix}{f.name}.") if sub else {f"{prefix}{f.name}": f})
    return found
