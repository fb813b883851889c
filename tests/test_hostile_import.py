"""`make import-data` against hostile input (issue 20): a value a user types is never an option of DVC's, and
a server that accepts the connection and never answers is one line after TIMEOUT, not a wait forever."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import import_data
from conftest import REPO
from ortune import import_url
from ortune.errors import OrtuneError
from ortune.workspace_clone import isolated_env


@pytest.fixture
def repo(tmp_path):
    """A git + DVC project holding a file the user cares about, and the environment to run DVC there."""
    root = tmp_path / "repo"
    root.mkdir()
    env = isolated_env(tmp_path / "home")
    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, env=env, check=True)
    (root / "precious.jsonl").write_text('{"mine": 1}\n')
    return root, env


def import_(root: Path, env: dict, **settings: str) -> subprocess.CompletedProcess:
    names = {f"ORTUNE_IMPORT_{key.upper()}": value for key, value in settings.items()}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "import_data.py")],
        cwd=root,
        env={**env, **names},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_out_or_url_starting_with_a_dash_is_refused_and_nothing_is_overwritten(repo, tmp_path):
    root, env = repo
    source = tmp_path / "s" / "precious.jsonl"
    source.parent.mkdir()
    source.write_text('{"theirs": 1}\n')
    done = import_(root, env, url=str(source), out="-f")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: OUT=-f: starts with '-'")
    assert (root / "precious.jsonl").read_text() == '{"mine": 1}\n'
    with pytest.raises(OrtuneError, match="URL=--help: starts with '-'"):
        import_url.resolve("--help", "data/raw/x.jsonl", "", "", "", root)


def test_dvc_gets_the_url_and_out_after_double_dash(repo, tmp_path, monkeypatch):
    root, _ = repo
    calls = []
    monkeypatch.chdir(root)
    monkeypatch.setenv("ORTUNE_IMPORT_URL", str(tmp_path / "t.jsonl"))
    monkeypatch.setenv("ORTUNE_IMPORT_OUT", "data/raw/t.jsonl")
    monkeypatch.setattr(
        import_url.subprocess, "run", lambda argv, **kw: calls.append(argv) or subprocess.CompletedProcess(argv, 0)
    )
    assert import_data.main() == 0
    assert calls[0][-3:] == ["--", str(tmp_path / "t.jsonl"), "data/raw/t.jsonl"]


@pytest.fixture
def silent_server():
    """Accepts every connection and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_a_server_that_never_answers_is_one_line_after_the_timeout(repo, silent_server):
    root, env = repo
    started = time.monotonic()
    done = import_(root, env, url=f"{silent_server}/x.jsonl", timeout="1")
    took = time.monotonic() - started
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no answer within 1 s" in done.stderr and "TIMEOUT=" in done.stderr
    assert took < 30, f"{took:.1f} s"
    assert not (root / "x.jsonl.dvc").exists() and not (root / "data/raw/x.jsonl.dvc").exists()


@pytest.mark.parametrize("value", ["0", "-5", "abc", "inf", "nan"])
def test_a_bad_timeout_is_one_line(value):
    with pytest.raises(OrtuneError, match=f"TIMEOUT={value}: must be a number of seconds > 0"):
        import_url.timeout_seconds(value)
    assert import_url.timeout_seconds("") == import_url.DEFAULT_TIMEOUT == 60
