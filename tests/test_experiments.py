"""Choosing among experiments from `dvc exp show --json`, and recording what they ran on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ortune import experiments, provenance
from ortune.errors import OrtuneError

REPO = Path(__file__).resolve().parents[1]


def exp_entry(name, accuracy, ms, r=64, status="Success"):
    return {
        "rev": f"{name}-sha",
        "name": name,
        "error": None,
        "data": {
            "status": status,
            "params": {"params.yaml": {"data": {"lora": {"r": r}, "precision": "int4"}}},
            "metrics": {"metrics/eval.json": {"data": {"accuracy": accuracy, "ms_per_token": ms}}},
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
    assert reasons[0].startswith("mid: best eval.accuracy=0.8")
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
    parsed = experiments.parse_exp_show(payload(exp_entry("r8", 0.7, 1.0, r=8), exp_entry("r16", 0.8, 1.2, r=16)))
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
    assert (
        lines[0]
        == "eval (int8 ONNX, 144 rows): accuracy 0.785, macro-F1 0.780 (majority baseline 0.250, untuned base 0.000)"
    )
    assert "same label on 99.0 % of rows, accuracy delta -0.007" in lines[2]
    assert not any(line.startswith("training") for line in lines)  # no train.json: no training line
    assert "models/o/README.md" in lines[-2] and "m/*.json" in lines[-2]


def test_run_summary_says_what_fine_tuning_gained_over_the_prompted_base(tmp_path):
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"paths": {"metrics": "m", "onnx": "o", "plots": "p"}}))
    (tmp_path / "m").mkdir()
    scores = {
        "n": 144,
        "accuracy": 0.958,
        "macro_f1": 0.95,
        "majority_baseline": 0.25,
        "base_accuracy": 0.0,
        "prompted_baseline_accuracy": 0.41,
        "prompted_baseline_unparsed": 12,
        "ms_per_token": 8.2,
        "ttft_ms": 30.0,
        "model_size_mb": 200.0,
        "runtimes": {"prompted": {"prompt_format": "chat", "shots": 2}},
    }
    (tmp_path / "m" / "eval.json").write_text(json.dumps(scores))
    lines = experiments.run_summary(tmp_path).splitlines()
    assert lines[1] == (
        "vs the untuned base asked through its chat template, 2-shot: accuracy 0.410 (12 of 144 answers "
        "named no label); fine-tuning gained +0.548"
    )
    scores["runtimes"]["prompted"].update(prompt_format="text", shots=0)
    (tmp_path / "m" / "eval.json").write_text(json.dumps(scores))
    assert "asked in plain text (its tokenizer has no chat template), zero-shot" in experiments.run_summary(tmp_path)


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
