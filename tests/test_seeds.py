"""`make seeds`: the seeds it runs and the mean and spread it reports (the runs themselves: test_pipeline)."""

from __future__ import annotations

import pytest

from ortune import seeds
from ortune.errors import OrtuneError


def test_the_first_seed_is_the_configured_training_seed():
    assert seeds.first_seed("seed: 42\ntrain:\n  seed: null\n") == 42
    assert seeds.first_seed("seed: 42\ntrain:\n  seed: 7\n") == 7


def test_the_report_lists_each_seed_then_mean_spread_and_range():
    runs = {
        42: {"n": 144, "accuracy": 0.951, "macro_f1": 0.95, "validation": {"accuracy": 0.958}},
        43: {"n": 144, "accuracy": 0.958, "macro_f1": 0.957, "validation": {"accuracy": 0.944}},
        44: {"n": 144, "accuracy": 0.938, "macro_f1": 0.936, "validation": {"accuracy": 0.972}},
    }
    lines = seeds.report(runs).splitlines()
    assert lines[0] == "3 training seeds, the same 144 test rows:"
    assert lines[1] == "| train.seed | test accuracy | test macro-F1 | validation accuracy |"
    assert lines[3] == "| 42 | 0.951 | 0.950 | 0.958 |"
    # sample standard deviation of 0.951, 0.958, 0.938: 0.0101
    assert lines[6] == "test accuracy: mean 0.949, standard deviation 0.010 over 3 seeds (min 0.938, max 0.958)"
    assert lines[8].startswith("validation accuracy: mean 0.958, standard deviation 0.014")


def test_the_report_shows_each_seeds_interval_and_the_merged_control_where_eval_json_has_them():
    def run(accuracy, merged, agreement):
        return {
            "n": 144,
            "accuracy": accuracy,
            "ci95": {"accuracy": {"low": accuracy - 0.05, "high": accuracy + 0.04}},
            "quantization_agreement": agreement,
            "runtimes": {"merged": {"accuracy": merged, "ci95": {"accuracy": {"low": merged - 0.05, "high": 1.0}}}},
        }

    lines = seeds.report({1: run(0.9, 0.91, 0.993), 2: run(0.88, 0.9, 1.0)}).splitlines()
    assert lines[1] == "| train.seed | test accuracy | merged PyTorch test accuracy | agreement with merged |"
    assert lines[3] == "| 1 | 0.900 (0.850-0.940) | 0.910 (0.860-1.000) | 0.993 |"
    assert lines[6].startswith("merged PyTorch test accuracy: mean 0.905, standard deviation 0.007 over 2 seeds")


def test_seeds_refuses_a_seed_in_args_and_a_bad_count(capsys):
    with pytest.raises(OrtuneError, match="leave seed and train.seed out of ARGS"):
        seeds.run(2, ["train.seed=3"])
    with pytest.raises(OrtuneError, match="run at least one seed"):
        seeds.run(0, [])
    assert seeds.main(["three"]) == 2 and "a whole number of seeds" in capsys.readouterr().err


def test_each_seed_is_one_make_all_with_train_seed_set_and_its_eval_json_read(tmp_path, monkeypatch, capsys):
    import json

    from ortune import pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("paths:\n  metrics: m\n")
    (tmp_path / "m").mkdir()
    monkeypatch.setattr(pipeline, "composed_text", lambda overrides: "seed: 42\ntrain:\n  seed: null\n")
    calls = []

    def make_all(action, overrides):
        calls.append((action, overrides))
        accuracy = {"train.seed=42": 0.9, "train.seed=43": 0.8}[overrides[-1]]
        (tmp_path / "m" / "eval.json").write_text(json.dumps({"n": 10, "accuracy": accuracy, "macro_f1": accuracy}))
        return 0

    monkeypatch.setattr(pipeline, "run", make_all)
    assert seeds.run(2, ["lora.r=8"]) == 0
    assert calls == [("all", ["lora.r=8", "train.seed=42"]), ("all", ["lora.r=8", "train.seed=43"])]
    out = capsys.readouterr().out
    assert "| 42 | 0.900 | 0.900 |" in out and "test accuracy: mean 0.850, standard deviation 0.071" in out
    # a failed run stops the seeds, with its status
    monkeypatch.setattr(pipeline, "run", lambda action, overrides: 3)
    assert seeds.run(2, []) == 3
