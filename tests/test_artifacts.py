"""Outputs appear complete or not at all."""

from __future__ import annotations

import json

import pytest

from ortune.artifacts import atomic_dir, write_json_atomic


def test_failed_write_keeps_the_previous_output_and_leaves_no_temp(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-write")
    assert (out / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_success_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "old").write_text("x")
    with atomic_dir(out) as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in out.iterdir()] == ["new"]


def test_json_is_written_whole(tmp_path):
    write_json_atomic(tmp_path / "m" / "eval.json", {"accuracy": 0.5})
    assert json.loads((tmp_path / "m" / "eval.json").read_text()) == {"accuracy": 0.5}
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["eval.json"]


def test_leftovers_of_a_killed_run_are_cleared_by_the_next(tmp_path):
    (tmp_path / ".model.tmp-dead").mkdir()
    (tmp_path / ".model.tmp-dead" / "half").write_text("x")
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
