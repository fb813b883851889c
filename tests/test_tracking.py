"""W&B: which mode wins, and `disabled` costs nothing."""

from __future__ import annotations

import subprocess
import sys

from ortune import tracking


def test_environment_wins_over_config(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("offline") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.resolve_mode("offline") == "offline"


def test_online_without_credentials_falls_back_to_offline(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert tracking.resolve_mode("online") == "offline"


def test_disabled_never_imports_wandb(tmp_path):
    code = (
        "import sys\n"
        "from omegaconf import OmegaConf\n"
        "from ortune import tracking\n"
        "cfg = OmegaConf.create({'wandb': {'mode': 'disabled', 'project': 'p', 'entity': None, 'dir': 'w'}})\n"
        "with tracking.open_run('eval', cfg) as t:\n"
        "    t.log({'accuracy': 1.0})\n"
        "assert 'wandb' not in sys.modules\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_offline_run_is_grouped_by_experiment_and_holds_no_secret(tmp_path, monkeypatch):
    import wandb
    from omegaconf import OmegaConf

    calls = []
    real_init = wandb.init

    def recording_init(**kwargs):
        calls.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", recording_init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "exp-a")
    monkeypatch.setenv("WANDB_API_KEY", "fake-secret-token-123")
    cfg = OmegaConf.create({"lora": {"r": 8}, "wandb": {"mode": "offline", "project": "p", "entity": None, "dir": "."}})
    with tracking.open_run("train_qlora", cfg) as tracker:
        assert tracker.active
        tracker.log({"loss": 0.5, "label": "text is skipped"})
    (call,) = calls
    assert call["group"] == "exp-a" and call["job_type"] == "train_qlora" and call["mode"] == "offline"
    assert [t.split(":")[0] for t in call["tags"]] == ["git", "dvc.lock"]  # the commit and dvc.lock digest
    assert "python" in call["config"]["environment"]  # pinned versions too, from the repo's requirements.txt
    assert call["config"]["lora"] == {"r": 8}
    assert "fake-secret-token-123" not in repr(call)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the offline run must land in <repo>/wandb/"
    assert not any(b"fake-secret-token-123" in p.read_bytes() for p in runs[0].rglob("*") if p.is_file())


def test_online_with_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch):
    import wandb
    from omegaconf import OmegaConf

    modes = []
    real_init = wandb.init

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("no route to api.wandb.ai")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    cfg = OmegaConf.create({"wandb": {"mode": "online", "project": "p", "entity": None, "dir": "."}})
    with tracking.open_run("eval", cfg) as tracker:
        assert tracker.active
    assert modes == ["online", "offline"]


def test_a_server_that_never_answers_costs_the_configured_timeout_not_more(tmp_path):
    """The real wandb.init against a server on 127.0.0.1 that accepts connections and never replies:
    the stage goes on offline after ONLINE_INIT_TIMEOUT_S (wandb's own default wait is 90 s). A fresh
    process: wandb keeps its first settings (the server's address among them) for the whole process."""
    import json
    import os
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []

    def swallow():
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=swallow, daemon=True).start()
    code = (
        "import json, time\n"
        "from omegaconf import OmegaConf\n"
        "from ortune import tracking\n"
        "tracking.ONLINE_INIT_TIMEOUT_S = 3\n"
        "cfg = OmegaConf.create({'wandb': {'mode': 'online', 'project': 'p', 'entity': None, 'dir': '.'}})\n"
        "started = time.monotonic()\n"
        "with tracking.open_run('eval', cfg) as tracker:\n"
        "    print(json.dumps({'waited': time.monotonic() - started, 'mode': tracker._run.settings.mode}))\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "DVC_"))},
        "WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_ERROR_REPORTING": "false",
        "DVC_ROOT": str(tmp_path),
        "HOME": str(tmp_path),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
    finally:
        server.close()
        for connection in accepted:
            connection.close()
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert accepted, "the online attempt must have reached the (silent) server"
    assert result["mode"] == "offline" and result["waited"] < 3 + 25, result
