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
    assert tracking.ONLINE_INIT_TIMEOUT_S <= 30  # bounded: a dead server never hangs a stage
