"""`make compare` and `make best` against hostile or careless input (issue 20)."""

from __future__ import annotations

import subprocess

import pytest

import best
from ortune import experiments

EXPERIMENTS = [
    experiments.Experiment(rev="a" * 40, name="exp-a", params={"lora.r": 8}, metrics={"eval.accuracy": 0.8}),
    experiments.Experiment(rev="b" * 40, name="exp-b", params={"lora.r": 16}, metrics={"eval.accuracy": 0.9}),
]


@pytest.fixture
def dvc_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(best.experiments, "load", lambda: list(EXPERIMENTS))
    monkeypatch.setattr(
        best.subprocess, "run", lambda argv, **kw: calls.append(argv) or subprocess.CompletedProcess(argv, 0)
    )
    return calls


def test_a_branch_name_is_never_an_option_of_dvcs(dvc_calls):
    assert best.main(["--metric=accuracy", "--branch=-f"]) == 0
    assert dvc_calls == [["dvc", "exp", "branch", "--", "exp-b", "-f"]]
