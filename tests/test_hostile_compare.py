"""`make compare` and `make best` against hostile or careless input (issue 20)."""

from __future__ import annotations

import re
import subprocess

import pytest

import best
from ortune import experiments

# eval.json's test accuracy and its validation split's, which make best ranks on
EXPERIMENTS = [
    experiments.Experiment(
        rev="a" * 40,
        name="exp-a",
        params={"lora.r": 8},
        metrics={"eval.accuracy": 0.8, "eval.validation.accuracy": 0.8},
    ),
    experiments.Experiment(
        rev="b" * 40,
        name="exp-b",
        params={"lora.r": 16},
        metrics={"eval.accuracy": 0.9, "eval.validation.accuracy": 0.9},
    ),
]


@pytest.fixture
def dvc_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(best.experiments, "load", lambda **_: list(EXPERIMENTS))
    monkeypatch.setattr(
        best.subprocess, "run", lambda argv, **kw: calls.append(argv) or subprocess.CompletedProcess(argv, 0)
    )
    return calls


def test_a_branch_name_is_never_an_option_of_dvcs(dvc_calls):
    assert best.main(["--metric=accuracy", "--branch=-f"]) == 0
    assert dvc_calls == [["dvc", "exp", "branch", "--", "exp-b", "-f"]]


def rev(name, accuracy, r):
    return {
        "rev": f"{name}-sha" if name != "workspace" else "workspace",
        "name": name if name != "workspace" else None,
        "error": None,
        "data": {
            "rev": name,
            "params": {"params.yaml": {"data": {"lora": {"r": r}}}},
            "metrics": {
                "metrics/eval.json": {
                    "data": {"accuracy": accuracy, "ms_per_token": 1.0, "validation": {"accuracy": accuracy}}
                }
            },
        },
    }


# `dvc exp show --json` (DVC 3) while `make all NAME=exp-new` runs in the workspace: DVC lists the running
# experiment with the workspace's metrics files, which the run before it wrote
PAYLOAD = [
    {"rev": "workspace", "name": None, "data": {}, "experiments": None},
    {
        "rev": "base-sha",
        "name": "main",
        "data": {},
        "experiments": [
            {"revs": [rev("exp-old", 0.7, 8)], "executor": None, "name": "exp-old"},
            {
                "revs": [rev("workspace", 0.99, 16)],
                "executor": {"state": "running", "name": "workspace", "local": {"pid": 1}},
                "name": "exp-new",
            },
            {"revs": [rev("exp-q", 0.98, 32)], "executor": {"state": "queued", "name": None}, "name": "exp-q"},
        ],
    },
]


def test_a_running_experiment_shows_its_state_and_not_the_previous_runs_metrics():
    found = experiments.parse_exp_show(PAYLOAD, unfinished=True)
    table = experiments.compare_table(found, "eval.accuracy").splitlines()
    assert table[0].startswith("| experiment | state | lora.r | eval.accuracy |")
    assert table[2].startswith("| exp-old | success | 8 | 0.7 |")
    rows = {line.split(" | ")[0].strip("| "): line for line in table[3:]}
    assert rows["exp-new"].startswith("| exp-new | running | 16 | - |"), rows
    assert rows["exp-q"].startswith("| exp-q | queued | 32 | - |"), rows
    assert "0.99" not in "\n".join(table) and "0.98" not in "\n".join(table)
    best_found, _ = experiments.pick_best(found, "eval.accuracy")
    assert best_found.name == "exp-old", "only a finished experiment can win"
    assert [e.name for e in experiments.parse_exp_show(PAYLOAD)] == ["exp-old"]
    only_queued = experiments.parse_exp_show([{**PAYLOAD[1], "experiments": PAYLOAD[1]["experiments"][2:]}], True)
    assert experiments.compare_table(only_queued, "eval.accuracy").splitlines() == [
        "| experiment | state |",  # one experiment: no setting differs, no metric yet
        "|---|---|",
        "| exp-q | queued |",
    ]


@pytest.mark.parametrize("args", [["--table", "--metric=foo.bar"], ["--metric=foo.bar", "--apply"], ["--max=foo=1"]])
def test_an_unknown_metric_is_one_line_listing_the_valid_ones(dvc_calls, capsys, args):
    assert best.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"no experiment has the metric (eval\.)?foo", err), err
    assert "valid: eval.accuracy" in err
    assert dvc_calls == []


def test_a_name_with_a_control_character_or_a_pipe_stays_in_its_cell():
    found = [experiments.Experiment(rev="c" * 40, name="a|b\x1b[2J", metrics={"eval.accuracy": 0.5})]
    assert experiments.compare_table(found, "eval.accuracy").splitlines()[2] == "| a\\|b\\x1b[2J | success | 0.5 |"


@pytest.mark.parametrize(
    ("sweep", "needle"),
    [
        ("lora.r=8,,16", "SWEEP: Error parsing override 'lora.r=8,,16' extraneous input ','; write each"),
        ("lora.r=8,0", "SWEEP: the run lora.r=0: conf/ + overrides: lora.r=0 must be >= 1"),
        (
            "lora.r=8 paths.onnx=models/x,src",
            "SWEEP: the run lora.r=8 paths.onnx=src: conf/ + overrides: paths.onnx=src",
        ),
        ("lora.rr=8,16", "SWEEP: the run lora.rr=8: conf/: Could not override 'lora.rr'"),
    ],
)
def test_a_bad_sweep_is_one_line_before_anything_is_queued(monkeypatch, capsys, sweep, needle):
    from ortune import pipeline

    monkeypatch.setattr(pipeline, "run_command", lambda argv: pytest.fail(f"ran {argv}"))
    monkeypatch.setenv("ORTUNE_SWEEP", sweep)
    monkeypatch.delenv("ORTUNE_ARGS", raising=False)
    assert pipeline.main(["sweep"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {needle}"), err


def test_the_run_summary_prints_labels_and_answers_escaped(monkeypatch, tmp_path):
    said = 'accuracy 0.9\nthe prompted baseline answered, e.g.: "joy\x9b2J" (truth \x1b]0;pwned\x07joy, read as joy)'
    monkeypatch.setattr(experiments, "run_summary", lambda root: said)
    assert experiments.terminal_summary(tmp_path) == (
        'accuracy 0.9\nthe prompted baseline answered, e.g.: "joy\\x9b2J" (truth \\x1b]0;pwned\\x07joy, read as joy)'
    )
