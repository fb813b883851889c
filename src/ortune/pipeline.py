"""What `make params`, `make all`, `make repro` and `make sweep` run: compose params.yaml from conf/ without
silently dropping an applied experiment's settings, then run the pipeline through DVC.

The workspace's params.yaml is composed from conf/, or holds an applied experiment's settings.

`dvc exp apply` (behind `make pull EXP=...` and `make best`) writes an experiment's settings into
params.yaml, and DVC's own Hydra step (behind `make all`) recomposes params.yaml from conf/ with only
the `-S` overrides given. Recomposing after an apply would silently train other settings than the ones
applied, so every make target that composes goes through here first:

- `params`: compose conf/ + ARGS and write it (an explicit reset);
- `repro`: with no ARGS, conf/'s current composition if params.yaml is still what ortune last composed
  (conf/ may have been edited since), else params.yaml as it is, saying which settings it keeps;
  with ARGS, compose conf/ + ARGS unless that would discard settings conf/ does not hold;
- `all`: refuse when DVC's recomposition would discard such settings; else remember what it composes.

"What ortune last composed" is a copy kept in .dvc/tmp (git-ignored, per checkout), so an apply is told
apart from an edit of conf/ without guessing.

`all`, `repro` and `sweep` then run DVC themselves (`dvc exp run -S ...`, `dvc repro`, the queue), with
an argument list: the Makefile hands ARGS, SWEEP and NAME over in the environment (ORTUNE_ARGS,
ORTUNE_SWEEP, ORTUNE_NAME), never spliced into shell text, so quotes, `$`, backslashes and non-ASCII
arrive as typed. ARGS splits at spaces outside quotes and brackets; quotes stay for Hydra to read
(`ARGS="data.template.prompt='Tone of: {phrase}' lora.target_modules=[q_proj, v_proj]"`). Each action
holds the write locks of params.yaml and of every stage's outputs while it runs (ortune.locks), so
`make params` or a stage run by hand cannot change them under a running pipeline.

    python -m ortune.pipeline repro lora.r=16
    ORTUNE_ARGS="lora.r=16" ORTUNE_NAME=r16 python -m ortune.pipeline all
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

import ortune.export  # noqa: F401 - registers the builder's checks, so a bad export setting fails here too
from ortune import config, lastgood, locks
from ortune.artifacts import write_text_atomic
from ortune.errors import OrtuneError

STAMP = Path(".dvc/tmp/ortune/params.composed.yaml")


def composed_text(overrides: list[str]) -> str:
    composed = config.compose(overrides)
    config.validate(composed, "conf/ + overrides" if overrides else "conf/", workspace=True)
    return config.params_yaml_text(composed)


def _flatten(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return flat


def differences(current: str, composed: str, limit: int = 4) -> str:
    """'lora.r=16 (conf/: 64), ...': the settings params.yaml holds that the composition does not."""
    ours, theirs = _flatten(yaml.safe_load(current) or {}), _flatten(yaml.safe_load(composed) or {})
    changed = [
        f"{key}={ours.get(key)} (conf/: {theirs.get(key)})"
        for key in sorted(set(ours) | set(theirs))
        if ours.get(key) != theirs.get(key)
    ]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more


def as_overrides(current: str, composed: str) -> str:
    """The ARGS that would compose params.yaml's differing scalar settings again."""
    ours, theirs = _flatten(yaml.safe_load(current) or {}), _flatten(yaml.safe_load(composed) or {})
    keys = [key for key in sorted(ours) if ours[key] != theirs.get(key)]
    return " ".join(
        f"{key}={yaml.safe_dump(ours[key], default_flow_style=True).strip().removesuffix('...').strip()}"
        for key in keys
    )


class Workspace:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or config.project_root())
        self.params = self.root / "params.yaml"
        self.stamp = self.root / STAMP

    def current(self) -> str | None:
        return self.params.read_text(encoding="utf-8") if self.params.is_file() else None

    def last_composed(self) -> str | None:
        return self.stamp.read_text(encoding="utf-8") if self.stamp.is_file() else None

    def remember(self, text: str) -> None:
        self.stamp.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.stamp, text)

    def write(self, text: str) -> None:
        write_text_atomic(self.params, text)
        self.remember(text)

    def holds_applied_settings(self, plain: str) -> bool:
        """params.yaml differs from conf/ and was not written by ortune's last composition."""
        current = self.current()
        return current is not None and current != plain and current != self.last_composed()

    def compose(self, overrides: list[str]) -> str:
        """`make params`: conf/ + overrides, written."""
        text = composed_text(overrides)
        self.write(text)
        return f"wrote {self.params}"

    def prepare_repro(self, overrides: list[str]) -> str:
        """`make repro`: the params.yaml that `dvc repro` then runs on (see the module docstring)."""
        plain = composed_text([])
        if self.holds_applied_settings(plain):
            kept = differences(self.current(), plain)
            if overrides:
                raise OrtuneError(
                    f"params.yaml holds settings conf/ does not compose ({kept}), e.g. from `make pull EXP=...` or "
                    f"`make best`; ARGS would discard them: run `make repro` without ARGS to keep them, or "
                    f"`make params` first to drop them"
                )
            return f"params.yaml: keeping the applied settings {kept}; `make params` drops them"
        return self.compose(overrides)

    def prepare_experiment(self, overrides: list[str]) -> str:
        """`make all`: DVC recomposes conf/ + ARGS itself; refuse where that discards applied settings."""
        target = composed_text(overrides)
        plain = composed_text([])
        current = self.current()
        if self.holds_applied_settings(plain) and current != target:
            raise OrtuneError(
                f"params.yaml holds settings conf/ does not compose ({differences(current, plain)}), e.g. from "
                f"`make pull EXP=...` or `make best`; `make all` would discard them (DVC composes conf/ + ARGS): "
                f'`make repro` reruns on them, ARGS="{as_overrides(current, plain)}" keeps them in a new '
                f"experiment, `make params` drops them"
            )
        self.remember(target)
        return ""


ACTIONS = {
    "params": Workspace.compose,
    "repro": Workspace.prepare_repro,
    "all": Workspace.prepare_experiment,
    "sweep": None,
}
_BLANKS = " \t\n\r\f\v"


def split_overrides(text: str, name: str = "ARGS") -> list[str]:
    """Overrides as typed in ARGS/SWEEP: split at ASCII whitespace outside quotes and brackets. Quotes
    and backslashes are kept: Hydra's override grammar reads them (key='a b', [a, b], it\\'s)."""
    found: list[str] = []
    current: list[str] = []
    quote, depth, escaped = None, 0, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
            if depth < 0:
                raise OrtuneError(f"{name}: a '{char}' closes nothing in {text.strip()!r}")
        elif char in _BLANKS and depth == 0:
            if current:
                found.append("".join(current))
                current = []
            continue
        current.append(char)
    if quote:
        raise OrtuneError(
            f"{name}: a {quote} is never closed in {text.strip()!r}; quote a value with spaces as "
            "key='a b' and write a quote inside it as \\'"
        )
    if depth:
        raise OrtuneError(f"{name}: a bracket is never closed in {text.strip()!r}")
    if current:
        found.append("".join(current))
    return found


def run_command(argv: list[str]) -> int:
    """Run DVC in the foreground and return its status. Ctrl-C reaches it too (one process group), so
    this waits for it to clean up; a SIGTERM sent here is passed on, so the locks outlive the run."""
    try:
        process = subprocess.Popen(argv)
    except FileNotFoundError:
        raise OrtuneError(f"{argv[0]}: not found; run `make setup` (it installs DVC into .venv)") from None
    forward = lambda signum, frame: process.send_signal(signum)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def forget_killed_dvc_runs(space: Workspace) -> None:
    """What a killed DVC left that DVC itself takes for a live run (a zombie's pid): its locks and its record."""
    locks.forget_dead_workspace_run(space.root)
    if freed := locks.release_dead_dvc_locks(space.root):
        # repr's escapes: a path is printed, never obeyed by the terminal
        shown = ", ".join(repr(os.path.relpath(path, space.root))[1:-1] for path in freed)
        print(f"released DVC's locks on {shown}: the run that held them was killed", file=sys.stderr)


def failed_experiments() -> set[str]:
    """The queued experiments DVC records as failed (names, or stash revisions for unnamed ones)."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        return {done.entry.name or done.entry.stash_rev[:7] for done in repo.experiments.celery_queue.iter_failed()}


def _pipeline_paths(space: Workspace, texts: list[str]) -> list[str]:
    """params.yaml and every stage's outputs under each of these params.yaml texts."""
    outputs = {
        path for text in texts for path in locks.pipeline_outputs(yaml.safe_load(text) or {}, space.root / "dvc.yaml")
    }
    return [str(space.params), *sorted(outputs)]


def run(action: str, overrides: list[str], name: str = "", sweep: list[str] = ()) -> int:
    space = Workspace()
    what = f"make {action}"
    if action == "params":
        lastgood.recover(space.root)
        with locks.hold([space.params], what, space.root):
            print(space.compose(overrides))
        return 0
    if action == "sweep":
        if not sweep:
            raise OrtuneError('set SWEEP, e.g. make sweep SWEEP="lora.r=8,16,32 precision=int4,int8"')
        from ortune.experiments import sweep_combinations

        for combination in sweep_combinations(sweep):  # each checked as ARGS is, before any is queued
            try:
                composed_text(combination)
            except OrtuneError as exc:
                raise OrtuneError(f"SWEEP: the run {' '.join(combination)}: {exc}") from None
        lastgood.recover(space.root)
        forget_killed_dvc_runs(space)
        # queuing composes params.yaml in this checkout; the queued runs happen in copies of it
        with locks.hold([space.params], what, space.root):
            status = run_command(["dvc", "exp", "run", "--queue", *(f"-S{o}" for o in sweep)])
        if status:
            return status
        failed_before = failed_experiments()
        status = run_command(["dvc", "exp", "run", "--run-all", "--jobs", "1"])
        # `--run-all` exits 0 when queued experiments fail: their failure must still fail `make sweep`
        if failed := sorted(failed_experiments() - failed_before):
            print(
                f"error: {len(failed)} experiment(s) of the sweep failed: {', '.join(failed)}; "
                f"`dvc queue logs {failed[0]}` shows why",
                file=sys.stderr,
            )
            return status or 1
        return status
    target = composed_text(overrides)
    paths = _pipeline_paths(space, [target, space.current() or ""])
    with locks.hold(paths, what, space.root):
        kept = lastgood.Snapshot(space.root)
        if recovered := kept.recover_if_killed():
            print(recovered, file=sys.stderr, flush=True)
            paths = _pipeline_paths(space, [target, space.current() or ""])
        forget_killed_dvc_runs(space)
        # kept before anything is written (the action writes params.yaml or ortune's compose record)
        kept.save(paths, what)
        try:
            message = ACTIONS[action](space, overrides)
        except BaseException:
            kept.restore()  # refused before DVC ran: only what the action wrote goes back
            raise
        if message:
            print(message, flush=True)
        if action == "repro":
            status = run_command(["dvc", "repro"])
        else:
            status = run_command(
                ["dvc", "exp", "run", *([f"--name={name}"] if name else []), *(f"-S{o}" for o in overrides)]
            )
        if status == 0:
            kept.drop()
        else:
            print(lastgood.failed_message(what, status, kept.restore()), file=sys.stderr, flush=True)
        return status


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ACTIONS:
        print(
            f"usage: python -m ortune.pipeline {{{'|'.join(ACTIONS)}}} [key=value ...]  (or ORTUNE_ARGS=...)",
            file=sys.stderr,
        )
        return 2
    try:
        overrides = argv[1:] + split_overrides(os.environ.get("ORTUNE_ARGS", ""))
        sweep = split_overrides(os.environ.get("ORTUNE_SWEEP", ""), "SWEEP")
        return run(argv[0], overrides, os.environ.get("ORTUNE_NAME", ""), sweep)
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
