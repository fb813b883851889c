"""The Makefile hands every value a user types to its program unchanged, and fails when the program fails.

`make` runs here with PY pointing at a recorder that notes its arguments and the ORTUNE_* environment,
then exits with a chosen status: what the recipe's shell passed on is compared with what was typed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD"], "a", encoding="utf-8") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items() if k.startswith("ORTUNE_")
                          and k not in ("ORTUNE_WANDB_DIR", "ORTUNE_REQUIRE_CHROMIUM")}}}}) + "\\n")
sys.exit(int(os.environ.get("STATUS", "0")))
"""


@pytest.fixture
def recorder(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(RECORDER.format(python=sys.executable))
    fake.chmod(0o755)
    return fake


def hostile(tmp_path: Path) -> str:
    """Quotes, `$`, backslashes, command substitutions of both shells and make, non-ASCII, a newline."""
    traps = " ".join(
        f"{trap.replace('X', str(tmp_path / f'pwned{i}'))}"
        for i, trap in enumerate(
            [
                "`touch X`",
                "$(touch X)",
                "$(shell touch X)",
                "'; touch X; echo '",
                '"; touch X; echo "',
                "${shell touch X}",
            ]
        )
    )
    return f'it\'s "fine" $HOME $$ $5 \\ back\\\\slash é 日本 -x {traps}\nsecond line'


def make(recorder: Path, tmp_path: Path, target: str, *assignments: str, status: int = 0) -> tuple[int, list[dict]]:
    record = tmp_path / "record.jsonl"
    record.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORTUNE_") and k not in ("MAKEFLAGS", "MFLAGS")}
    env.update(RECORD=str(record), STATUS=str(status))
    done = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", target, f"PY={recorder}", *assignments],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()] if record.exists() else []
    assert not list(tmp_path.glob("pwned*")), f"a value ran as a command: {done.stderr[-2000:]}"
    return done.returncode, calls


def test_apps_get_text_file_and_model_exactly_as_typed(recorder, tmp_path):
    value = hostile(tmp_path)
    status, calls = make(recorder, tmp_path, "predict", f"TEXT={value}", f"FILE={value}", f"MODEL={value}")
    assert status == 0
    assert calls == [
        {
            "argv": ["scripts/predict.py", f"--model={value}", f"--file={value}", "--", value],
            "env": {"ORTUNE_MODEL": value, "ORTUNE_FILE": value, "ORTUNE_TEXT": value},
        }
    ]
    status, calls = make(recorder, tmp_path, "chat", f"MODEL={value}")
    assert status == 0 and calls[0]["argv"] == ["scripts/chat.py", f"--model={value}"]
    # nothing typed: no empty arguments (stdin is read, the default model used)
    status, calls = make(recorder, tmp_path, "predict")
    assert calls[0]["argv"] == ["scripts/predict.py"]


@pytest.mark.parametrize(
    "target",
    ["predict", "chat", "params", "repro", "all", "sweep", "compare", "best", "plots", "push", "pull", "bench"],
)
def test_a_failing_program_fails_its_target(recorder, tmp_path, target):
    status, calls = make(recorder, tmp_path, target, f"TEXT={hostile(tmp_path)}", status=3)
    assert status != 0 and len(calls) == 1  # and nothing after it ran


def test_pipeline_targets_pass_args_name_and_sweep_in_the_environment(recorder, tmp_path):
    value = hostile(tmp_path)
    args = "data.template.prompt='it\\'s $HOME: {phrase}' lora.target_modules=[qkv_proj, o_proj] `touch x`"
    for target in ("params", "repro"):
        status, calls = make(recorder, tmp_path, target, f"ARGS={args}", f"NAME={value}")
        assert status == 0 and calls == [{"argv": ["-m", "ortune.pipeline", target], "env": {"ORTUNE_ARGS": args}}]
    status, calls = make(recorder, tmp_path, "all", f"ARGS={args}", f"NAME={value}")
    assert status == 0 and calls[0] == {
        "argv": ["-m", "ortune.pipeline", "all"],
        "env": {"ORTUNE_ARGS": args, "ORTUNE_NAME": value},
    }
    assert calls[1]["argv"] == ["-m", "ortune.experiments"]  # the summary, once the run succeeded
    status, calls = make(recorder, tmp_path, "sweep", f"SWEEP={value}")
    assert status == 0 and calls == [{"argv": ["-m", "ortune.pipeline", "sweep"], "env": {"ORTUNE_SWEEP": value}}]


def test_experiment_targets_get_metric_limit_branch_revisions_and_name_as_typed(recorder, tmp_path):
    value = hostile(tmp_path)
    status, calls = make(recorder, tmp_path, "compare", f"METRIC={value}")
    assert status == 0 and calls[0]["argv"] == ["scripts/best.py", "--table", f"--metric={value}"]
    status, calls = make(recorder, tmp_path, "best", f"METRIC={value}", f"MAX_MS_PER_TOKEN={value}", f"BRANCH={value}")
    assert calls[0]["argv"] == [
        "scripts/best.py",
        f"--metric={value}",
        f"--max=eval.ms_per_token={value}",
        f"--branch={value}",
    ]
    status, calls = make(recorder, tmp_path, "best")
    assert calls[0]["argv"] == ["scripts/best.py", "--metric=accuracy", "--apply"]
    # revisions are names without spaces: split at whitespace, never globbed or evaluated
    status, calls = make(recorder, tmp_path, "plots", "REVS=HEAD exp-1 $HOME * $(shell touch pwned)")
    assert calls[0]["argv"] == ["scripts/report.py", "--", "HEAD", "exp-1", "$HOME", "*", "$(shell", "touch", "pwned)"]
    status, calls = make(recorder, tmp_path, "push", f"EXP={value}")
    assert [c["argv"] for c in calls] == [["-m", "dvc", "push"], ["-m", "dvc", "exp", "push", "origin", "--", value]]
    status, calls = make(recorder, tmp_path, "pull", f"EXP={value}")
    # a killed run's outputs are put back first (ortune.lastgood), then the apply runs under the locks
    assert calls[0]["argv"] == ["-m", "ortune.lastgood", "recover"]
    assert calls[1]["argv"][:3] == ["-m", "ortune.locks", "bash"] and calls[1]["env"] == {"ORTUNE_EXP": value}
    status, calls = make(recorder, tmp_path, "bench", f"QUICK=$(shell touch {tmp_path / 'pwned'})")
    assert calls[0]["argv"] == ["bench/bench.py", "--quick"]
