"""dvc.yaml lists, for every stage, each module of src/ortune/ its script can run: the ones it imports and,
transitively, the ones those import (lazy imports inside functions too). A module missing from a stage's deps
would let an edit to it change results without DVC rerunning the stage."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "ortune"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def imported_modules(path: Path) -> set[Path]:
    """The src/ortune/*.py files that importing or running `path` imports directly, or runs with `python -m`
    (importing any of them also runs the package's __init__.py). A sub-package (src/ortune/settings/) is one
    dependency, its folder: its __init__.py imports every module of it."""
    if path.is_dir():
        return set().union(*(imported_modules(module) for module in sorted(path.glob("*.py")))) - {path}
    in_package = path.parent == PACKAGE
    found: set[Path] = set()

    def module(name: str) -> Path:
        return PACKAGE / name if (PACKAGE / name).is_dir() else PACKAGE / f"{name}.py"

    def add(dotted: str | None, names: list[str]) -> None:
        parts = dotted.split(".") if dotted else []
        if parts:
            found.add(module(parts[0]))
        else:  # `from ortune import data` / `from . import data`: each name a module, or a name in __init__.py
            found.update(module(name) for name in names if module(name).exists())
        found.add(PACKAGE / "__init__.py")

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        # a module run in a child process: [sys.executable, "-m", "ortune.builder_shim", ...]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"ortune\.\w+", node.value):
            add(node.value.partition(".")[2], [])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                if top == "ortune":
                    add(rest or None, [])
        elif isinstance(node, ast.ImportFrom):
            if node.level and in_package:
                add(node.module, [alias.name for alias in node.names])
            elif node.module and node.module.partition(".")[0] == "ortune":
                add(node.module.partition(".")[2] or None, [alias.name for alias in node.names])
    return {module for module in found if module.exists()}


def modules_run_by(script: Path) -> set[Path]:
    """imported_modules, followed through the package."""
    seen: set[Path] = set()
    todo = imported_modules(script)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= imported_modules(module)
    return seen


def script_of(stage: dict) -> Path:
    match = re.fullmatch(r"python (scripts/\w+\.py)", stage["cmd"].strip())
    assert match, f"a stage's cmd is `python scripts/<name>.py`, not {stage['cmd']!r}"
    return REPO / match.group(1)


def test_the_import_scan_sees_direct_lazy_and_transitive_imports():
    direct = imported_modules(REPO / "scripts" / "build_onnx.py")
    assert {PACKAGE / "export.py", PACKAGE / "artifacts.py", PACKAGE / "__init__.py"} <= direct
    assert PACKAGE / "evaluation.py" in imported_modules(PACKAGE / "auto_quantization.py")  # inside a function
    assert PACKAGE / "builder_shim.py" in imported_modules(PACKAGE / "export.py")  # run with python -m
    # stage.py is reached through the package's other modules
    assert PACKAGE / "stage.py" in modules_run_by(REPO / "scripts" / "prepare_data.py")


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(name):
    stage = STAGES[name]
    script = script_of(stage)
    deps = {REPO / dep for dep in stage["deps"] if isinstance(dep, str) and "${" not in dep}
    assert script in deps, f"dvc.yaml: {name} lacks its script {script.relative_to(REPO)}"
    missing = sorted(str(m.relative_to(REPO)) for m in modules_run_by(script) - deps)
    assert not missing, f"dvc.yaml: add to {name}'s deps: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_no_stage_depends_on_a_module_it_does_not_run(name):
    """The other direction: a module listed but never run reruns the stage for nothing."""
    stage = STAGES[name]
    listed = {REPO / dep for dep in stage["deps"] if isinstance(dep, str) and dep.startswith("src/ortune/")}
    extra = sorted(str(m.relative_to(REPO)) for m in listed - modules_run_by(script_of(stage)))
    assert not extra, f"dvc.yaml: {name} no longer runs {extra}: drop them from its deps"
