"""The set-up files agree: environment.yml installs the same pins as `make setup`, CI runs `make test`."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_environment_yml_uses_the_pinned_requirements():
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip_section == ["-r requirements.txt"]


def test_requirements_are_exact_pins_with_cpu_torch():
    lines = [
        line.strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    pinned = dict(line.split("==") for line in lines if "==" in line)
    assert pinned["torch"] == "2.13.0"  # any other torch pulls GBs of CUDA wheels
    assert "onnx-ir" in pinned  # the GenAI builder imports it without declaring it
    for name in ("transformers", "peft", "trl", "onnxruntime-genai", "dvc", "hydra-core", "wandb"):
        assert name in pinned, name


def commands(text: str) -> list[str]:
    """Shell lines, comments and surrounding space dropped (`make test-slow` is not `make test`)."""
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def test_ci_runs_the_readme_commands():
    ci = commands((REPO / ".ci/run").read_text())
    assert ci.index("make setup") < ci.index("make test") < ci.index("make test-slow")
    # make test leaves out the slow tests, make test-slow runs only them: together, every test once
    makefile = (REPO / "Makefile").read_text()
    assert '$(PY) -m pytest -q -m "not slow"' in makefile.split("\ntest:")[1].split("\n\n")[0]
    assert "$(PY) -m pytest -q -m slow" in makefile.split("\ntest-slow:")[1].split("\n\n")[0]
    readme = commands((REPO / "README.md").read_text())
    assert "make setup" in readme and "make test" in readme


def test_ci_runs_the_linter_pinned_in_the_requirements():
    ci = commands((REPO / ".ci/run").read_text())
    assert "make lint || lint=$?" in ci and ci[-1] == 'exit "$lint"'  # lint findings fail CI, after the tests ran
    assert "ruff==" in (REPO / "requirements.txt").read_text()


def test_ci_fails_rather_than_skips_the_checks_it_must_run():
    ci = commands((REPO / ".ci/run").read_text())
    assert ci.index("export ORTUNE_REQUIRE_CHROMIUM=1") < ci.index("make test")


def test_a_hung_test_fails_instead_of_hanging(pytestconfig, tmp_path):
    # long enough for the slowest end-to-end test on 2 busy cores, short of hanging CI for hours
    assert 900 <= float(pytestconfig.getini("timeout")) <= 3600
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hangs():\n    time.sleep(60)\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "timeout=2",
            str(tmp_path / "test_hang.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "Timeout" in done.stdout, done.stdout[-2000:]


def test_every_make_run_in_the_tests_has_a_timeout():
    """A make target that waits forever (a prompt, a lock) must fail its test, not hang CI."""
    missing = []
    for source in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func).startswith("subprocess.") and node.args):
                continue
            command = ast.unparse(node.args[0])
            runs_make = re.search(r"\[\s*(['\"]make['\"]|\*\w*make\w*)", command, re.IGNORECASE) or "bash" in command
            if runs_make and not any(k.arg == "timeout" for k in node.keywords):
                missing.append(f"{source.name}:{node.lineno}")
    assert not missing, missing
