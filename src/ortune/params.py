"""The workspace's params.yaml: composed from conf/, or holding an applied experiment's settings.

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

    python -m ortune.params repro lora.r=16
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from ortune import config
from ortune.artifacts import write_text_atomic
from ortune.errors import OrtuneError

STAMP = Path(".dvc/tmp/ortune/params.composed.yaml")


def composed_text(overrides: list[str]) -> str:
    composed = config.compose(overrides)
    config.validate(composed, "conf/ + overrides" if overrides else "conf/")
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
    changed = [f"{key}={ours.get(key)} (conf/: {theirs.get(key)})"
               for key in sorted(set(ours) | set(theirs)) if ours.get(key) != theirs.get(key)]
    more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more


def as_overrides(current: str, composed: str) -> str:
    """The ARGS that would compose params.yaml's differing scalar settings again."""
    ours, theirs = _flatten(yaml.safe_load(current) or {}), _flatten(yaml.safe_load(composed) or {})
    keys = [key for key in sorted(ours) if ours[key] != theirs.get(key)]
    return " ".join(f"{key}={yaml.safe_dump(ours[key], default_flow_style=True).strip().removesuffix('...').strip()}"
                     for key in keys)


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
                    f"`make params` first to drop them")
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
                f"`make repro` reruns on them, ARGS=\"{as_overrides(current, plain)}\" keeps them in a new "
                f"experiment, `make params` drops them")
        self.remember(target)
        return ""


ACTIONS = {"params": Workspace.compose, "repro": Workspace.prepare_repro, "all": Workspace.prepare_experiment}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ACTIONS:
        print(f"usage: python -m ortune.params {{{'|'.join(ACTIONS)}}} [key=value ...]", file=sys.stderr)
        return 2
    try:
        message = ACTIONS[argv[0]](Workspace(), argv[1:])
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if message:
        print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
