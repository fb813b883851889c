"""Eval through DVC on the tiny default, in a fresh clone: eval.json beside its baselines, numeric
columns in `dvc exp show` and `dvc metrics diff`, a held-out file via eval.path, and `make plots`.

Slow (the whole pipeline once, then eval alone a few times: about four minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import EVAL_HEADLINE_METRICS, clone_project, ran_stages

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# Phrases that are not in data/raw/tones.jsonl: a held-out test set the pipeline never prepared.
HELD_OUT = [
    ("My sister just told me she's getting married, I'm over the moon!", "joy"),
    ("We won the final in the last minute!", "joy"),
    ("I keep hearing footsteps behind me in the parking garage.", "fear"),
    ("What if the bridge collapses while we're on it?", "fear"),
    ("Grandpa's chair has been empty since the funeral.", "sadness"),
    ("Nobody came to my birthday party this year.", "sadness"),
    ("No way, you built this whole house by yourself?", "surprise"),
    ("I opened the door and the whole team was there with a cake!", "surprise"),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root, env = clone_project(tmp_path_factory, "eval-clone", WANDB_MODE="disabled")
    output = run(root, env, "make", "-o", ".venv/.installed", "all")
    assert "eval" in ran_stages(output)
    # the first results are committed: `dvc metrics diff` compares the workspace with them
    git(root, env, "add", "-A")
    git(root, env, "commit", "-qm", "first results")
    return root, env


def git(root, env, *args):
    subprocess.run(["git", *args], cwd=root, env=env, check=True)


def run(root, env, *command) -> str:
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def dvc(root, env, *args) -> str:
    return run(root, env, str(root / ".venv/bin/dvc"), *args)


def eval_json(root: Path) -> dict:
    return json.loads((root / "metrics" / "eval.json").read_text())


def test_eval_json_has_the_shipped_model_beside_its_baselines(project):
    root, _ = project
    metrics = eval_json(root)
    for key in EVAL_HEADLINE_METRICS:
        assert isinstance(metrics[key], (int, float)) and not isinstance(metrics[key], bool), key
    assert metrics["accuracy"] >= 0.7 > metrics["majority_baseline"]
    assert metrics["accuracy"] > metrics["base_accuracy"], "fine-tuning must beat the untuned base"
    assert metrics["n"] == 144 and sum(s["support"] for s in metrics["per_class"].values()) == 144
    # int4 vs the merged model it was exported from: the quantization loss is small and measured
    assert metrics["quantization_agreement"] >= 0.9 and abs(metrics["quantization_accuracy_delta"]) <= 0.1
    runtimes = metrics["runtimes"]
    assert set(runtimes) == {"onnx", "base", "prompted", "adapter", "merged"}
    assert 0.0 <= metrics["prompted_baseline_accuracy"] <= 1.0 and runtimes["prompted"]["prompt_format"] == "chat"
    assert runtimes["adapter"]["accuracy"] == pytest.approx(runtimes["merged"]["accuracy"], abs=0.02)
    assert runtimes["onnx"]["model_size_mb"] < runtimes["merged"]["model_size_mb"]
    for name in ("onnx", "adapter", "merged"):
        scores = runtimes[name]
        assert scores["ttft_ms"] > 0 and scores["ms_per_token"] > 0 and scores["peak_memory_mb"] > 0, name
    # the baselines run the merged model's network: judged on their answers, their speed is not timed again
    for name in ("base", "prompted"):
        assert not {"ttft_ms", "ms_per_token", "peak_memory_mb"} & set(runtimes[name]), name
    assert (root / "plots" / "confusion_matrix.png").is_file() and (root / "plots" / "per_class_f1.csv").is_file()


def test_dvc_exp_show_lists_the_headline_metrics_as_numbers(project):
    root, env = project
    table = json.loads(dvc(root, env, "exp", "show", "--json"))
    workspace = next(entry for entry in table if entry.get("rev") == "workspace")
    shown = workspace["data"]["metrics"]["metrics/eval.json"]["data"]
    for key in EVAL_HEADLINE_METRICS:
        assert isinstance(shown[key], (int, float)), key
    header = dvc(root, env, "exp", "show", "--csv").splitlines()[0].split(",")
    assert {"accuracy", "macro_f1", "base_accuracy", "quantization_agreement", "ms_per_token"} <= set(header)


def test_eval_setting_reruns_only_eval_and_dvc_metrics_diff_shows_numbers(project):
    root, env = project
    before = eval_json(root)
    output = dvc(root, env, "exp", "run", "-S", "eval.limit=72", "-S", "eval.compare=[merged]")
    assert ran_stages(output) == {"eval"}
    diff = json.loads(dvc(root, env, "metrics", "diff", "--all", "--json"))["metrics/eval.json"]
    assert diff["n"] == {"old": 144, "new": 72, "diff": -72}
    after = eval_json(root)
    for key in ("accuracy", "macro_f1", "quantization_agreement", "ms_per_token"):
        assert diff[key]["old"] == pytest.approx(before[key]) and diff[key]["new"] == pytest.approx(after[key]), key
        assert diff[key]["diff"] == pytest.approx(after[key] - before[key]), key
    assert "base_accuracy" not in after, "base was not compared this time"


def test_eval_runs_on_a_held_out_file_the_pipeline_did_not_prepare(project):
    root, env = project
    held_out = root / "heldout.csv"
    held_out.write_text("phrase,tone\n" + "".join(f'"{text}",{tone}\n' for text, tone in HELD_OUT))
    output = dvc(root, env, "exp", "run", "-S", "eval.path=heldout.csv", "-S", "eval.compare=[]")
    assert ran_stages(output) == {"eval"}
    metrics = eval_json(root)
    assert metrics["n"] == len(HELD_OUT) and metrics["train_overlap"] == 0
    assert {
        line["prompt"] for line in map(json.loads, (root / "metrics/eval_predictions.jsonl").read_text().splitlines())
    } == {f"### Text: {text}\n### The tone is:\n" for text, _ in HELD_OUT}
    lock = (root / "dvc.lock").read_text()
    assert "path: heldout.csv" in lock, "the held-out file is a dependency: editing it reruns eval"
    with held_out.open("a") as handle:
        handle.write('"The lights went out and something moved in the hall.",fear\n')
    output = dvc(root, env, "exp", "run", "-S", "eval.path=heldout.csv", "-S", "eval.compare=[]")
    assert ran_stages(output) == {"eval"} and eval_json(root)["n"] == len(HELD_OUT) + 1


def test_make_plots_writes_a_report_that_renders_offline(project, tmp_path):
    from test_plots_report import check_report_renders

    root, env = project
    run(root, env, "make", "-o", ".venv/.installed", "plots")
    page = root / "dvc_plots" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert "train_loss" in html and "Per-class F1" in html and "confusion_matrix" in html
    check_report_renders(page, tmp_path)
