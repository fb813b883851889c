"""Outputs appear complete or not at all."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from ortune import artifacts
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


def test_a_second_writer_of_the_same_output_leaves_the_first_ones_temp_folder_alone(tmp_path):
    """Each writer's temp folder is its own: B cleaning up leftovers beside the output must not delete
    A's live one (A then died with FileNotFoundError); both finish and the last rename wins."""
    out = tmp_path / "model"
    second = (
        "import sys; from ortune.artifacts import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as tmp:\n    (tmp / 'weights').write_text('B')\n"
    )
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("A, part 1")
        done = subprocess.run([sys.executable, "-c", second, str(out)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert (out / "weights").read_text() == "B"
        (tmp / "more").write_text("A, part 2")
    assert sorted(p.name for p in out.iterdir()) == ["more", "weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_only_leftovers_whose_owner_is_gone_are_removed(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = tmp_path / f".model.tmp-{artifacts.HOST}-{dead_pid()}-x1"
        alive = tmp_path / f".model.tmp-{artifacts.HOST}-{live.pid}-x2"
        elsewhere = tmp_path / f".model.tmp-{'0' * 8 if artifacts.HOST != '0' * 8 else '1' * 8}-1-x3"
        old_trash = tmp_path / f".model.old-{artifacts.HOST}-{dead_pid()}-x4"
        for folder in (dead, alive, elsewhere, old_trash):
            folder.mkdir()
            (folder / "half").write_text("x")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("v1")
        # a live process's temp folder, and one of another machine (its pid means nothing here), stay
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", alive.name, elsewhere.name])
    finally:
        live.kill()
        live.wait()


def test_outputs_are_readable_by_others_under_the_usual_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("v1")
        write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o644


def test_read_json_and_folder_megabytes(tmp_path):
    from ortune.artifacts import folder_megabytes, read_json

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text('{"k": 1}')
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.bin").write_bytes(b"\0" * 2**20)
    assert read_json(tmp_path / "a" / "x.json") == {"k": 1} and read_json(tmp_path / "none.json") is None
    assert read_json(tmp_path / "none.json", {}) == {}
    assert folder_megabytes(tmp_path / "b") == 1.0
    assert folder_megabytes(tmp_path / "a", tmp_path / "b") == 1.0 + 8 / 2**20
