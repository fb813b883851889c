"""Choosing among experiments from `dvc exp show --json`, and recording what they ran on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortune import experiments, provenance
from ortune.errors import OrtuneError

REPO = Path(__file__).resolve().parents[1]


def exp_entry(name, accuracy, ms, r=64, status="Success", validation=None):
    """An experiment's `dvc exp show` entry: test accuracy and, as eval.json's `validation`, the validation
    split's (`validation`, default the same figure; False: an eval from before the validation split)."""
    scores = {"accuracy": accuracy, "ms_per_token": ms}
    if validation is not False:
        scores["validation"] = {"accuracy": accuracy if validation is None else validation}
    return {
        "rev": f"{name}-sha",
        "name": name,
        "error": None,
        "data": {
            "status": status,
            "params": {"params.yaml": {"data": {"lora": {"r": r}, "precision": "int4"}}},
            "metrics": {"metrics/eval.json": {"data": scores}},
        },
    }


def payload(*entries):
    return [
        {"rev": "workspace", "name": None, "data": {}, "experiments": []},
        {"rev": "abc", "name": "main", "data": {}, "experiments": [{"revs": [e]} for e in entries]},
    ]


def test_parse_flattens_params_and_metrics_and_skips_unfinished():
    parsed = experiments.parse_exp_show(
        payload(exp_entry("a", 0.8, 1.0, r=8), exp_entry("q", 0.0, 0.0, status="Queued"))
    )
    assert [e.name for e in parsed] == ["a"]
    assert parsed[0].params["lora.r"] == 8 and parsed[0].metrics["eval.accuracy"] == 0.8


def test_best_respects_the_latency_limit_and_explains_itself():
    parsed = experiments.parse_exp_show(
        payload(exp_entry("fast", 0.75, 0.5), exp_entry("slow-but-best", 0.9, 3.0), exp_entry("mid", 0.8, 0.9))
    )
    best, reasons = experiments.pick_best(parsed, "eval.accuracy", limits={"eval.ms_per_token": 1.0})
    assert best.name == "mid"
    assert reasons[0].startswith("mid: best eval.validation.accuracy=0.8")
    assert any(r.startswith("slow-but-best: excluded, eval.ms_per_token=3.0 > 1.0") for r in reasons)
    unconstrained, _ = experiments.pick_best(parsed, "eval.accuracy")
    assert unconstrained.name == "slow-but-best"


def test_no_eligible_experiment_is_a_clear_error():
    parsed = experiments.parse_exp_show(payload(exp_entry("slow", 0.9, 3.0)))
    with pytest.raises(OrtuneError, match="no experiment meets the constraints"):
        experiments.pick_best(parsed, "eval.accuracy", limits={"eval.ms_per_token": 1.0})


def test_environment_records_every_pinned_package():
    versions = provenance.package_versions(REPO)
    pinned = provenance.pinned_names(REPO / "requirements.txt")
    assert set(pinned) <= set(versions) and versions["torch"].startswith("2.13.0")
    assert "not installed" not in versions.values()


def test_compare_table_shows_changed_params_and_metrics_best_first():
    # evals from before the validation split: the table (which chooses nothing) still ranks them
    entries = exp_entry("r8", 0.7, 1.0, r=8, validation=False), exp_entry("r16", 0.8, 1.2, r=16, validation=False)
    parsed = experiments.parse_exp_show(payload(*entries))
    table = experiments.compare_table(parsed, "eval.accuracy").splitlines()
    assert table[0] == "| experiment | state | lora.r | eval.accuracy | eval.ms_per_token |"
    assert table[2].startswith("| r16 | success | 16 | 0.8 |") and table[3].startswith("| r8 | success | 8 | 0.7 |")
    assert "precision" not in table[0]  # unchanged params are left out


def test_run_summary_reads_the_metrics_params_yaml_names(tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"metrics": "m", "onnx": "models/o", "plots": "p"}}))
    summary = experiments.run_summary(tmp_path)
    assert "no " in summary and "eval.json" in summary and "eval stage" in summary
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "eval.json").write_text(
        json.dumps(
            {
                "n": 144,
                "accuracy": 0.785,
                "macro_f1": 0.78,
                "majority_baseline": 0.25,
                "base_accuracy": 0.0,
                "ms_per_token": 0.08,
                "ttft_ms": 0.9,
                "model_size_mb": 1.6,
                "quantization_agreement": 0.99,
                "quantization_accuracy_delta": -0.007,
            }
        )
    )
    (tmp_path / "m" / "onnx.json").write_text(json.dumps({"precision": "int8"}))
    lines = experiments.run_summary(tmp_path).splitlines()
    # an eval.json from before the intervals still reads
    assert (
        lines[0]
        == "eval (int8 ONNX, 144 rows): accuracy 0.785, macro-F1 0.780 (majority baseline 0.250, untuned base 0.000)"
    )
    assert "same label on 99.0 % of rows, accuracy delta -0.007" in lines[2]
    assert not any(line.startswith("training") for line in lines)  # no train.json: no training line
    assert "models/o/README.md" in lines[-2] and "m/*.json" in lines[-2]


def interval(low, high):
    return {"low": low, "high": high}


def test_run_summary_reports_the_test_split_with_intervals_and_the_gain_over_the_strongest_baseline(tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"metrics": "m", "onnx": "o", "plots": "p"}}))
    (tmp_path / "m").mkdir()

    def baseline(accuracy, half, **extra):
        return {"accuracy": accuracy, "ci95": {"accuracy": interval(accuracy - half, accuracy + half)}, **extra}

    found = {
        "majority": baseline(0.25, 0.07),
        "base": baseline(0.0, 0.0),
        "prompted": baseline(
            0.292,
            0.075,
            unparsed=3,
            samples=[
                {"answer": "The tone of the text is fear.", "label": "joy", "read_as": "fear"},
                {"answer": "The tone of the text is", "label": "fear", "read_as": None},
            ],
        ),
        "loglik_zero_shot": baseline(0.25, 0.07),
        "loglik_k_shot": baseline(0.264, 0.072, shots=4),
    }
    scores = {
        "n": 144,
        "accuracy": 0.951,
        "macro_f1": 0.95,
        "majority_baseline": 0.25,
        "ci95": {
            "accuracy": interval(0.916, 0.986),
            "macro_f1": interval(0.91, 0.98),
            "gain_over_strongest_baseline": interval(0.58, 0.74),
            "quantization_agreement": interval(0.979, 1.0),
        },
        "judged": {"split": "test split"},
        "baselines": found,
        "strongest_baseline": {"name": "prompted", **found["prompted"]},
        "gain_over_strongest_baseline": 0.659,
        "validation": {"n": 72, "accuracy": 0.958, "ci95": {"accuracy": interval(0.91, 1.0)}},
        "quantization_agreement": 0.993,
        "quantization_accuracy_delta": -0.007,
        "ms_per_token": 8.2,
        "ttft_ms": 30.0,
        "model_size_mb": 200.0,
        "runtimes": {"prompted": {"prompt_format": "chat", "shots": 0}},
    }
    (tmp_path / "m" / "eval.json").write_text(json.dumps(scores))
    lines = experiments.run_summary(tmp_path).splitlines()
    assert lines[0] == "eval (ONNX, test split, 144 rows): accuracy 0.951 ± 0.035, macro-F1 0.950 ± 0.035"
    assert lines[1] == (
        "baselines (the untuned base through its chat template, same rows): majority class 0.250 ± 0.070, "
        "fine-tuning prompt 0.000 ± 0.000, answer in a sentence 0.292 ± 0.075, log-likelihood zero-shot "
        "0.250 ± 0.070, log-likelihood 4-shot 0.264 ± 0.072"
    )
    assert lines[2] == (
        "fine-tuning gained +0.659 ± 0.080 accuracy over the strongest baseline (answer in a sentence, 0.292)"
    )
    assert lines[3] == (
        'the prompted baseline answered, e.g.: "The tone of the text is fear." (truth joy, read as fear); '
        '"The tone of the text is" (truth fear, read as no label); 3 of 144 answers named no single label'
    )
    assert lines[4] == (
        "validation split (72 rows; what onnx.quantization=auto and `make best` choose on): accuracy 0.958 ± 0.045"
    )
    assert "same label on 99.3 % of rows (95 % interval 97.9-100.0 %), accuracy delta -0.007" in lines[6]


def test_make_best_and_compare_rank_on_validation_and_mark_differences_within_noise():
    def entry(name, test, validation, half):
        item = exp_entry(name, test, 1.0)
        item["data"]["metrics"]["metrics/eval.json"]["data"].update(
            ci95={"accuracy": interval(test - half, test + half)},
            validation={"accuracy": validation, "ci95": {"accuracy": interval(validation - half, validation + half)}},
        )
        return item

    # "lucky-on-test" has the best test accuracy, "best-on-validation" the best validation accuracy
    parsed = experiments.parse_exp_show(
        payload(entry("lucky-on-test", 0.97, 0.90, 0.03), entry("best-on-validation", 0.93, 0.95, 0.03))
    )
    best, reasons = experiments.pick_best(parsed, "eval.accuracy")
    assert best.name == "best-on-validation"
    assert reasons[0].startswith("best-on-validation: best eval.validation.accuracy=0.95")
    table = experiments.compare_table(parsed, "eval.accuracy").splitlines()
    assert table[0].endswith("| eval.validation.accuracy | vs best (eval.validation.accuracy) |")
    assert table[2].startswith("| best-on-validation |") and table[2].endswith("| best |")
    assert table[3].endswith("| -0.050 |")  # wider apart than the intervals' half-width 0.03
    close = experiments.parse_exp_show(payload(entry("a", 0.9, 0.95, 0.03), entry("b", 0.9, 0.94, 0.03)))
    assert experiments.compare_table(close, "eval.accuracy").splitlines()[3].endswith("| -0.010 (within noise) |")


def free_text_entry(name, test, validation, test_cut, validation_cut):
    item = exp_entry(name, 0.0, 1.0)
    item["data"]["metrics"]["metrics/eval.json"]["data"] = {
        "exact_match": test,
        "hit_token_limit": test_cut,
        "ms_per_token": 1.0,
        "validation": {"exact_match": validation, "hit_token_limit": validation_cut},
    }
    return item


def test_make_best_never_chooses_on_the_test_split_for_free_text_either():
    parsed = experiments.parse_exp_show(
        payload(
            free_text_entry("lucky-on-test", 0.60, 0.30, 0, 0),
            free_text_entry("best-on-validation", 0.40, 0.50, 0, 0),
            free_text_entry("cut-on-validation", 0.40, 0.70, 0, 9),
        )
    )
    # METRIC=exact_match, MAX hit_token_limit=2: both read on the validation split
    best, reasons = experiments.pick_best(parsed, "eval.exact_match", limits={"eval.hit_token_limit": 2})
    assert best.name == "best-on-validation", reasons
    assert reasons[0].startswith("best-on-validation: best eval.validation.exact_match=0.5")
    assert any(r.startswith("cut-on-validation: excluded, eval.validation.hit_token_limit=9 > 2") for r in reasons)
    table = experiments.compare_table(parsed, "eval.exact_match").splitlines()
    assert table[0] == (
        "| experiment | state | eval.exact_match | eval.ms_per_token | eval.validation.exact_match |"
    ), table[0]
    assert table[2].startswith("| cut-on-validation | success | 0.4 | 1 | 0.7 |")


def test_make_best_refuses_a_test_split_figure_no_experiment_has_on_validation():
    old = experiments.parse_exp_show(payload(exp_entry("a", 0.9, 2.0, validation=False), exp_entry("b", 0.8, 1.0)))
    with pytest.raises(OrtuneError, match=r"^METRIC=accuracy: eval.accuracy is measured on the test split") as error:
        experiments.pick_best(old[:1], "eval.accuracy")
    assert "run the experiments again" in str(error.value)
    # a figure the validation split has is offered instead
    with pytest.raises(OrtuneError, match=r"rank on a figure the validation split has \(eval.validation.accuracy\)"):
        experiments.pick_best(old, "eval.macro_f1")
    # speed and size are no split's figures: ranked as they are
    fastest, _ = experiments.pick_best(old, "eval.ms_per_token", maximize=False)
    assert fastest.name == "b"


def test_run_summary_says_what_auto_quantization_tried_before_what_it_shipped(tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"metrics": "m", "onnx": "o", "plots": "p"}}))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "eval.json").write_text(
        json.dumps(
            {
                "n": 144,
                "accuracy": 0.958,
                "macro_f1": 0.95,
                "majority_baseline": 0.25,
                "ms_per_token": 8.0,
                "ttft_ms": 20.0,
                "model_size_mb": 279.0,
            }
        )
    )
    (tmp_path / "m" / "onnx.json").write_text(
        json.dumps(
            {
                "precision": "int8",
                "shipped_candidate": 1,
                "candidates": [
                    {
                        "precision": "int4",
                        "settings": {"precision": "int4", "int8_share": 0.3},
                        "label_agreement": 0.903,
                        "passed": False,
                        "ms_per_token": 6.1,
                        "size_mb": 110.0,
                    },
                    {
                        "precision": "int8",
                        "settings": {"precision": "int8"},
                        "label_agreement": 1.0,
                        "passed": True,
                        "ms_per_token": 8.2,
                        "size_mb": 279.4,
                    },
                ],
            }
        )
    )
    lines = experiments.run_summary(tmp_path).splitlines()
    assert (
        "quantization (auto): shipped int8, 8.20 ms/token, 279 MB; not enough: int4 (int8_share 0.3) kept 90.3 % "
        "of labels"
    ) in lines
