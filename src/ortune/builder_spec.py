"""What the installed onnxruntime-genai model builder accepts, read from its own source.

The builder validates neither its precision/provider pair (it emits fp16 graphs for the CPU
provider that nothing can run) nor its `--extra_options` names (an unknown or deprecated name such
as `int4_block_size=64` is accepted and silently ignored). ortune checks both before any work, and
takes the accepted sets from the builder's source (its help text and the list of valid pairs it
prints) rather than from a hand-kept copy, so an upgrade that renames an option fails loudly here.

Reads the source with `ast` only: importing the builder pulls in torch and transformers.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

from ortune.errors import OrtuneError

PROVIDERS = ("cpu", "cuda", "dml", "webgpu")
# How the builder's "valid combinations" line spells the providers ortune targets.
_PROVIDER_WORDS = {"CPU": "cpu", "CUDA": "cuda", "DML": "dml", "WEBGPU": "webgpu"}
_PAIRS_LINE = "Valid precision + execution provider combinations are:"


@dataclass(frozen=True)
class BuilderSpec:
    source: Path
    # precision -> providers, in the builder's order, restricted to PROVIDERS
    valid_pairs: dict[str, tuple[str, ...]]
    # option name -> first line of its help text
    options: dict[str, str]
    # deprecated option name -> what replaces it
    deprecated: dict[str, str]
    # prefix of the deprecated aliases of current names (`int4_` in 0.18): `int4_block_size` -> `block_size`
    alias_prefix: str | None

    def replacement(self, name: str) -> str | None:
        """The current name a deprecated one stands for, or None if `name` is not deprecated."""
        if name in self.deprecated:
            return self.deprecated[name]
        if self.alias_prefix and name.startswith(self.alias_prefix) and name[len(self.alias_prefix) :] in self.options:
            return name[len(self.alias_prefix) :]
        return None


def builder_source() -> Path:
    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.origin:
        raise OrtuneError("onnxruntime-genai is not installed; run `make setup`")
    path = Path(spec.origin).parent / "models" / "builder.py"
    if not path.is_file():
        raise OrtuneError(f"{path}: the onnxruntime-genai model builder is missing; reinstall with `make setup`")
    return path


@functools.lru_cache(maxsize=4)
def read_spec(path: Path | None = None) -> BuilderSpec:
    path = Path(path or builder_source())
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pairs_text = help_text = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(_PAIRS_LINE):
            pairs_text = node.value
        if (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "--extra_options"
        ):
            help_node = next((k.value for k in node.keywords if k.arg == "help"), None)
            # help=textwrap.dedent("""...""")
            if isinstance(help_node, ast.Call) and help_node.args and isinstance(help_node.args[0], ast.Constant):
                help_text = textwrap.dedent(help_node.args[0].value)
    if pairs_text is None or help_text is None:
        raise OrtuneError(
            f"{path}: cannot find the builder's valid pairs or --extra_options help; this onnxruntime-genai "
            "version is not one ortune knows (requirements.txt pins the supported one)"
        )
    options, deprecated = _parse_options(help_text)
    prefix = re.search(r"former `(\w+?)`-prefixed names", help_text)
    return BuilderSpec(path, _parse_pairs(pairs_text), options, deprecated, prefix.group(1) if prefix else None)


@functools.lru_cache(maxsize=4)
def exportable_architectures(path: Path | None = None) -> frozenset[str]:
    """The Hugging Face architectures (config.architectures[0]) the builder dispatches on: anything else
    it refuses only after loading the whole model."""
    path = Path(path or builder_source())
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        # config.architectures[0] == "LlamaForCausalLM"
        if (
            isinstance(node, ast.Compare)
            and len(node.comparators) == 1
            and isinstance(node.ops[0], ast.Eq)
            and isinstance(node.left, ast.Subscript)
            and ast.unparse(node.left.value).endswith(".architectures")
            and isinstance(node.comparators[0], ast.Constant)
            and isinstance(node.comparators[0].value, str)
        ):
            names.add(node.comparators[0].value)
    if not names:
        raise OrtuneError(
            f"{path}: cannot find the architectures the builder exports; this onnxruntime-genai version is not one "
            "ortune knows (requirements.txt pins the supported one)"
        )
    return frozenset(names)


def _parse_pairs(text: str) -> dict[str, tuple[str, ...]]:
    pairs: dict[str, list[str]] = {}
    for item in text.split(":", 1)[1].split(","):
        words = item.split()
        if len(words) != 2:
            continue
        precision, provider = words[0].lower(), _PROVIDER_WORDS.get(words[1].upper())
        if provider:
            pairs.setdefault(precision, []).append(provider)
    return {precision: tuple(providers) for precision, providers in pairs.items()}


def _parse_options(help_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Options are the lines `    name = description` at the first level of the help's option list."""
    options: dict[str, str] = {}
    deprecated: dict[str, str] = {}
    for line in help_text.splitlines():
        match = re.match(r"^ {4}([a-z][a-z0-9_]*) = (.*)$", line)
        if not match:
            continue
        name, description = match.groups()
        options[name] = description.strip()
        if "[DEPRECATED]" in description:
            instead = re.search(r"Use '([a-z0-9_]+)", description)
            deprecated[name] = instead.group(1) if instead else "(no replacement)"
    for name in deprecated:
        options.pop(name, None)
    return options, deprecated


def valid_pairs_text(spec: BuilderSpec | None = None) -> str:
    spec = spec or read_spec()
    return "; ".join(f"{precision}: {', '.join(eps)}" for precision, eps in spec.valid_pairs.items())


def option_name_problem(name: str, spec: BuilderSpec | None = None) -> str | None:
    """Why `name` is not a current builder option, or None if it is one."""
    spec = spec or read_spec()
    if name in spec.options:
        return None
    replacement = spec.replacement(name)
    if replacement:
        return f"'{name}' is a deprecated builder option (this builder ignores or rewrites it); use '{replacement}'"
    close = [known for known in spec.options if _similar(name, known)]
    hint = f"; did you mean {', '.join(close)}?" if close else "; `python -m ortune.builder_spec` lists the options"
    return f"'{name}' is not an option of the installed builder{hint}"


def _similar(a: str, b: str) -> bool:
    import difflib

    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.8 or (len(a) > 4 and (a in b or b in a))


if __name__ == "__main__":
    current = read_spec()
    print(f"builder: {current.source}")
    print(f"valid precision/provider pairs: {valid_pairs_text(current)}")
    print("extra options:")
    for option, text in sorted(current.options.items()):
        print(f"  {option} = {text[:100]}")
    print(
        "deprecated: "
        + ", ".join(f"{old} -> {new}" for old, new in current.deprecated.items())
        + (f", {current.alias_prefix}<name> -> <name>" if current.alias_prefix else "")
    )
