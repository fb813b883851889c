"""What would hang or read without end (issue 20): a FIFO, a device or a symlink loop as data.path is one line
before DVC runs (it hashes its dependencies first, and a FIFO blocks that forever); the apps read a bounded
amount from stdin and --file (`make predict < /dev/zero` read 1.7 GB in 12 s)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import REPO, clone_project
from ortune import app, config
from ortune.errors import OrtuneError
from test_hostile_output import FakeApp


@pytest.fixture
def specials(tmp_path):
    """A FIFO, a symlink loop and a folder of data holding a FIFO."""
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"phrase": "x", "tone": "joy"}\n')
    os.mkfifo(folder / "sub" / "b.jsonl")
    return SimpleNamespace(fifo=fifo, loop=loop, folder=folder)


@pytest.mark.parametrize(
    ("which", "needle"),
    [
        ("fifo", "not a regular file (a FIFO)"),
        ("device", "not a regular file (a character device)"),
        ("loop", "a symlink loop"),
        ("folder", "sub/b.jsonl is not a regular file (a FIFO)"),
    ],
)
def test_data_that_would_never_end_is_refused_when_settings_are_composed(specials, which, needle):
    path = "/dev/zero" if which == "device" else getattr(specials, which)
    for key in ("data.path", "eval.path"):
        with pytest.raises(OrtuneError, match=re.escape(f"{key}={path}: {needle}")) as caught:
            config.validate(config.compose(["model=tiny-phi3", f"{key}={path}"]), "conf/ + overrides")
        assert "\n" not in str(caught.value) and "no such file" not in str(caught.value)


def test_make_all_on_a_fifo_is_one_line_before_dvc_runs(tmp_path_factory, specials):
    root, env = clone_project(tmp_path_factory, "fifo")
    started = time.monotonic()
    done = subprocess.run(
        ["make", "-s", "--no-print-directory", "-o", ".venv/.installed", "all", f"ARGS=data.path={specials.fifo}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not a regular file (a FIFO)" in errors[0], done.stderr
    # "make[N]: ***" when the tests themselves run under make (make test sets MAKELEVEL)
    assert re.match(r"make(\[\d+\])?: \*\*\*", done.stderr.splitlines()[-1]), done.stderr
    assert len(done.stderr.splitlines()) == 2, done.stderr
    assert time.monotonic() - started < 60
    assert "Running stage" not in done.stdout


def test_predict_reads_a_bounded_amount_from_stdin_and_refuses_a_device(monkeypatch, capsys):
    import predict

    monkeypatch.setattr(predict, "App", FakeApp)
    with open("/dev/zero", "rb") as zero:
        monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=zero, isatty=lambda: False))
        started = time.monotonic()
        assert predict.main([]) == 2
    assert time.monotonic() - started < 20
    err = capsys.readouterr().err
    assert err == (
        f"error: stdin: more than {app.MAX_INPUT_BYTES >> 20} MB; classify it in parts (split -l 100000 FILE part.) "
        "or check that it is the file you meant\n"
    )
    assert predict.main(["--file", "/dev/zero"]) == 2
    assert capsys.readouterr().err == (
        "error: --file /dev/zero: not a regular file; pass a text file, or pipe it to stdin\n"
    )


def test_chat_reads_one_bounded_line(monkeypatch, capsys):
    import chat

    monkeypatch.setattr(chat, "App", FakeApp)
    with open("/dev/zero", "rb") as zero:
        monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=zero, isatty=lambda: False))
        assert chat.main([]) == 2
    assert capsys.readouterr().err == "error: stdin: a line longer than 1 MB; a chat turn is one short line\n"


def test_the_apps_on_dev_zero_end_in_one_line_with_little_memory():
    """As a user runs them: `predict.py < /dev/zero` ends with status 2, its peak memory near the bound."""
    # VmHWM is this process's own peak: ru_maxrss keeps the peak of the forked copy of a large parent (pytest
    # after the model tests) across exec, which failed this test inside the full suite only
    probe = (
        "import re, sys; sys.path.insert(0, 'scripts'); import predict; status = predict.main([]); "
        "status_text = open('/proc/self/status').read(); "
        "print(status, int(re.search(r'VmHWM:\\s+(\\d+)', status_text).group(1)) // 1024)"
    )
    with open("/dev/zero", "rb") as zero:
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=REPO, stdin=zero, capture_output=True, text=True, timeout=60
        )
    status, peak_mb = map(int, done.stdout.split())
    assert status == 2 and done.stderr.startswith("error: stdin: more than")
    assert peak_mb < 400, f"peak {peak_mb} MB"
