"""End to end on the tiny default, through `make all` exactly as a user runs it, in a fresh clone.

Slow (about two minutes on 2 cores); CI runs it in `make test-slow`.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import clone_project, ran_stages

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# made up at run time, so that not even this file contains them
PLANTED_HF_TOKEN = f"hf_{uuid.uuid4().hex}"
PLANTED_WANDB_KEY = uuid.uuid4().hex + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    # planted secrets: no output may ever contain them (see test_no_output_contains_a_secret)
    return clone_project(
        tmp_path_factory, "clone", WANDB_MODE="offline", HF_TOKEN=PLANTED_HF_TOKEN, WANDB_API_KEY=PLANTED_WANDB_KEY
    )


def make(project, *args: str) -> str:
    root, env = project
    # -o: the venv is the repo's own (symlinked), never reinstalled from the clone
    done = subprocess.run(
        ["make", "-o", ".venv/.installed", *args], cwd=root, env=env, capture_output=True, text=True, timeout=1500
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def read_metrics(root: Path, name: str) -> dict:
    return json.loads((root / "metrics" / name).read_text())


def test_make_all_runs_every_stage_and_beats_the_baseline(project):
    root, _ = project
    output = make(project, "all")
    assert ran_stages(output) == {"fetch_model", "prepare_data", "train_qlora", "merge", "build_onnx", "eval"}
    evaluation = read_metrics(root, "eval.json")
    data = read_metrics(root, "data.json")
    assert evaluation["majority_baseline"] == pytest.approx(data["majority_baseline"])
    assert evaluation["accuracy"] >= 0.7 > evaluation["majority_baseline"], evaluation
    assert evaluation["n"] == data["test_rows"] and evaluation["ms_per_token"] > 0
    # the headline is the test split's, with its interval; make best's figure is the validation split's
    assert evaluation["ci95"]["accuracy"]["low"] <= evaluation["accuracy"] <= evaluation["ci95"]["accuracy"]["high"]
    assert evaluation["validation"]["n"] == data["validation_rows"]
    assert f"test split, {data['test_rows']} rows): accuracy {evaluation['accuracy']:.3f} ± " in output
    assert "over the strongest baseline" in output and "log-likelihood 4-shot" in output
    assert read_metrics(root, "merge.json")["max_abs_logit_diff"] < 1e-4
    # each experiment records the environment it ran in (pinned packages' installed versions)
    assert evaluation["environment"]["torch"].startswith("2.13.0") and "onnxruntime-genai" in evaluation["environment"]
    assert read_metrics(root, "onnx.json")["precision"] == "int4"
    assert (root / "models/onnx/model.onnx").is_file() and (root / "plots/train_loss.csv").is_file()
    genai = json.loads((root / "models/onnx/genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 0  # the running machine's cores
    # one offline W&B run per stage, in the repo's git-ignored wandb/ folder
    assert len(list((root / "wandb").glob("offline-run-*"))) == 6
    assert (
        "wandb/"
        not in subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    )


def test_second_make_all_reruns_nothing(project):
    make(project, "all")
    assert ran_stages(make(project, "all")) == set()


def test_precision_change_reruns_only_export_and_eval(project):
    root, _ = project
    make(project, "all")
    output = make(project, "all", "ARGS=precision=fp32")
    assert ran_stages(output) == {"build_onnx", "eval"}
    assert read_metrics(root, "onnx.json")["precision"] == "fp32"
    assert read_metrics(root, "eval.json")["accuracy"] >= 0.7


TRAIN_ONWARD = {"train_qlora", "merge", "build_onnx", "eval"}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("eval.max_new_tokens=5", {"eval"}),
        ("onnx.block_size=64", {"build_onnx", "eval"}),
        ("lora.dropout=0.05", TRAIN_ONWARD),
    ],
)
def test_a_change_reruns_exactly_the_stages_that_depend_on_it(project, override, expected):
    make(project, "all")
    assert ran_stages(make(project, "all", f"ARGS={override}")) == expected


def test_going_back_restores_outputs_from_the_run_cache(project):
    root, _ = project
    make(project, "all", "ARGS=precision=fp32")
    output = make(project, "all")
    assert ran_stages(output) == set(), output
    assert read_metrics(root, "onnx.json")["precision"] == "int4"


def test_changing_a_shared_module_reruns_only_its_users(project):
    root, env = project
    make(project, "all")
    # generation.py: run by build_onnx and eval only (tests/test_dvc_deps.py lists who runs what; export.py is
    # run by every stage while config's checks import it)
    with open(root / "src/ortune/generation.py", "a") as handle:
        handle.write("\n# a harmless edit\n")
    ran = ran_stages(make(project, "all"))
    subprocess.run(["git", "checkout", "src/ortune/generation.py"], cwd=root, env=env, check=True)
    assert "build_onnx" in ran and ran <= {"build_onnx", "eval"}


def test_changing_the_data_reruns_everything_from_it(project):
    root, env = project
    make(project, "all")
    with open(root / "data/raw/tones.jsonl", "a") as handle:
        handle.write('{"phrase": "My cat learned to open the fridge by herself!", "tone": "surprise"}\n')
    ran = ran_stages(make(project, "all"))
    subprocess.run(["git", "checkout", "data/raw/tones.jsonl"], cwd=root, env=env, check=True)
    # the tiny base model's tokenizer is trained on the data, so it reruns too
    assert ran == {"fetch_model", "prepare_data", *TRAIN_ONWARD}


def experiments_by(root: Path, env: dict, key: str) -> dict:
    from ortune.experiments import load

    found: dict = {}
    for exp in load(cwd=str(root)):  # newest first: keep each setting's latest run
        found.setdefault(exp.params.get(key), exp)
    return found


def dvc(project, *args: str) -> str:
    root, env = project
    done = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout


def test_a_sweep_trains_and_builds_each_experiments_own_settings(project):
    """Queued experiments run in a copy of the repo while DVC_ROOT names the workspace: each must still
    read its own params.yaml (issue: every lora.r of a sweep trained the workspace's r = 64 adapter)."""
    root, env = project
    make(project, "all")
    workspace_loss = read_metrics(root, "train.json")["final_loss"]
    # fp32: the gate then checks the export alone; int4 on the random toy can miss 98 % by one near-tie (r=32: 0.965)
    make(project, "sweep", "SWEEP=lora.r=8,32 precision=fp32")
    by_rank = experiments_by(root, env, "lora.r")
    losses = {r: by_rank[r].metrics["train.final_loss"] for r in (8, 32)}
    assert len({workspace_loss, *losses.values()}) == 3, (workspace_loss, losses)
    for r in (8, 32):
        dvc(project, "exp", "apply", by_rank[r].name)
        assert json.loads((root / "models/adapter/adapter_config.json").read_text())["r"] == r
    make(project, "params")  # back to conf/'s settings: the applied ones are dropped on purpose

    # a precision sweep retrains nothing: the run cache restores every stage whose inputs are unchanged (one
    # value: the sweep above already built fp32 in its own experiments)
    output = make(project, "sweep", "SWEEP=precision=int8")
    assert ran_stages(output) == {"build_onnx", "eval"}, output[-3000:]
    dvc(project, "exp", "apply", experiments_by(root, env, "precision")["int8"].name)
    assert read_metrics(root, "onnx.json")["precision"] == "int8"
    assert b"MatMulNBits" in (root / "models/onnx/model.onnx").read_bytes()
    dvc(project, "exp", "apply", by_rank[8].name)
    assert b"MatMulNBits" not in (root / "models/onnx/model.onnx").read_bytes()  # that sweep's fp32 build
    make(project, "params")

    table = make(project, "compare")
    assert "| lora.r |" in table and "| precision |" in table
    picked = make(project, "best", "METRIC=accuracy", "MAX_MS_PER_TOKEN=1000")
    # chosen on the validation split, never on the test split the headline reports
    assert ": best eval.validation.accuracy=" in picked
    make(project, "params")


def readme_block(after: str) -> list[str]:
    """The commands of the first ```bash block after the line `after` in docs/experiments.md's sharing section."""
    text = (REPO / "docs/experiments.md").read_text(encoding="utf-8")
    section = text[text.index("## Share an experiment with a colleague") :]
    block = section[section.index(after) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def run_block(commands: list[str], cwd: Path, env: dict) -> dict[str, str]:
    """Run documented commands in one shell, in order, stopping at the first failure; output per command."""
    marker = f"--- {uuid.uuid4().hex} ---"
    script = "set -euo pipefail\n" + "".join(f"echo '{marker}'\n{command}\n" for command in commands)
    done = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return dict(zip(commands, done.stdout.split(marker + "\n")[1:]))


def test_the_readmes_sharing_flow_reproduces_a_colleagues_experiment(project, tmp_path):
    """docs/experiments.md's "Share an experiment" blocks, command by command, between two fresh clones, a bare
    git remote and a DVC remote both can reach (the "shared storage")."""
    root, env = project
    origin = tmp_path / "origin.git"
    # a hosted remote's HEAD is the branch pushed to it (main); a bare `git init` points at master unless
    # init.defaultBranch says otherwise, and the colleague's clone would then check out nothing
    subprocess.run(["git", "init", "-q", "--bare", "--initial-branch=main", str(origin)], check=True)
    subprocess.run(["git", "remote", "set-url", "origin", str(origin)], cwd=root, env=env, check=True)
    yours = readme_block("You:")
    assert any("lora.r=" in command for command in yours), "the shared experiment must differ from conf/'s settings"
    run_block(yours, root, env)

    machine = tmp_path / "colleague"
    machine.mkdir()
    # the shared storage: the repo's DVC remote (../../ortune-storage from .dvc/) seen from their checkout
    (machine / "ortune-storage").symlink_to(root.parent / "ortune-storage")
    # their `git clone` gets this venv linked in and `make setup` finds it installed (pip stays offline)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "post-checkout").write_text(
        f"#!/bin/sh\nln -sfn {REPO / '.venv'} .venv\ntouch -d @0 requirements*.txt pyproject.toml\n"
    )
    (hooks / "post-checkout").chmod(0o755)
    theirs_env = {
        **env,
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "core.hooksPath",
        "GIT_CONFIG_VALUE_0": str(hooks),
    }
    commands = [c.replace("<repo-url>", str(origin)) for c in readme_block("Your colleague")]
    outputs = run_block(commands, machine, theirs_env)
    colleague = machine / "ortune"
    repro = next(out for command, out in outputs.items() if command.startswith("make repro"))
    assert ran_stages(repro) == set(), repro
    assert "keeping the applied settings" in repro
    for name in ("data.json", "train.json", "onnx.json", "eval.json"):
        assert (colleague / "metrics" / name).read_bytes() == (root / "metrics" / name).read_bytes(), name
    assert (colleague / "params.yaml").read_bytes() == (root / "params.yaml").read_bytes()
    status = subprocess.run(["dvc", "status"], cwd=colleague, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    # and a deterministic stage recomputed there gives the very same bytes
    subprocess.run(
        ["dvc", "repro", "-f", "-s", "prepare_data"], cwd=colleague, env=env, check=True, capture_output=True
    )
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        assert (colleague / "data/prepared" / name).read_bytes() == (root / "data/prepared" / name).read_bytes()
    make(project, "params")


def test_hand_run_of_a_stage_uses_the_same_overrides_as_dvc(project):
    root, env = project
    done = subprocess.run(
        [str(root / ".venv/bin/python"), "scripts/prepare_data.py", "data.test_fraction=0.5"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert read_metrics(root, "data.json")["test_rows"] == 240


def test_no_output_contains_a_secret(project):
    root, _ = project
    make(project, "all")
    leaked = []
    for path in root.rglob("*"):
        if ".git" in path.parts or ".venv" in path.parts or not path.is_file():
            continue
        content = path.read_bytes()
        if PLANTED_HF_TOKEN.encode() in content or PLANTED_WANDB_KEY.encode() in content:
            leaked.append(str(path.relative_to(root)))
    assert not leaked, leaked
    assert list((root / "wandb").glob("offline-run-*")), "the scan must cover real W&B run files"


def test_make_seeds_runs_each_training_seed_on_the_same_test_rows_and_reports_the_spread(project):
    root, _ = project
    output = make(project, "seeds", "N=2")
    assert "== seed 1 of 2: train.seed=42" in output and "== seed 2 of 2: train.seed=43" in output
    assert "2 training seeds, the same" in output
    assert "test accuracy: mean " in output and "standard deviation" in output
    import yaml

    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["seed"] == 43  # the last run stays applied
