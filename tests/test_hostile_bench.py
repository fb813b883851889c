"""`make bench` in a workspace where an experiment was applied (issue 20): its throwaway clone measures the
configuration conf/ composes, not the applied params.yaml (which the clone's make all refused)."""

from __future__ import annotations

from conftest import clone_project
from ortune import config
from ortune.pipeline import Workspace
from ortune_bench import pipeline


def test_the_bench_clone_measures_conf_whatever_params_yaml_holds(tmp_path_factory, monkeypatch):
    root, _ = clone_project(tmp_path_factory, "applied", tiny=False)
    # as `make all ARGS="train.method=qlora"` or `make best` leave it: params.yaml holds what conf/ does not
    # compose, and ortune's record of composing it stays in the workspace's git-ignored .dvc/tmp
    applied = config.params_yaml_text(config.compose(["train.method=qlora", "lora.r=8"], config_dir=root / "conf"))
    (root / "params.yaml").write_text(applied)
    monkeypatch.setattr(pipeline, "ROOT", root)
    clone, _ = pipeline.throwaway_clone(tmp_path_factory.mktemp("bench"))
    plain = config.params_yaml_text(config.compose([], config_dir=clone / "conf"))
    assert applied != plain and (clone / "params.yaml").read_text() == plain
    monkeypatch.chdir(clone)
    assert Workspace(clone).prepare_experiment([]) == "", "what make all checks first, in the clone"
