"""The one way stages obtain their config, checked against the schema of every setting (ortune.settings).

Under DVC (``DVC_STAGE`` set) a stage reads params.yaml, which DVC composed from conf/ with the
``-S`` overrides; run by hand, the stage composes conf/ itself with the command-line overrides, the
same way DVC does. Either way the result is checked against the schema (unknown keys and wrong types
fail, naming the key) and narrowed to the params the stage declares in dvc.yaml, so reading an
undeclared setting fails instead of silently missing a rerun.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ortune.errors import OrtuneError
from ortune.settings import RENAMED, Config
from ortune.settings import problems as setting_problems
from ortune.settings.data import unescape_templates

# re-exported: the names the stages and tests read from here
from ortune.settings.eval import EVAL_COMPARABLE as EVAL_COMPARABLE
from ortune.settings.eval import default_baseline_prompt
from ortune.settings.onnx import PRECISIONS as PRECISIONS
from ortune.settings.train import TrainConfig as TrainConfig

# Settings that never change a stage's results, visible to every stage without being declared.
ALWAYS_VISIBLE = ("paths", "wandb")


def project_root() -> Path:
    """The checkout a stage runs in: the nearest folder, from the working directory up, holding dvc.yaml
    and conf/ (DVC runs stages in the folder of dvc.yaml; by hand a stage may run from a sub-folder).

    Never DVC_ROOT: for queued and temp experiments DVC runs the stages in a copy of the repo but points
    DVC_ROOT at the parent workspace on purpose, so reading params.yaml there would train the workspace's
    settings instead of the experiment's. What must reach the parent repo (W&B runs) asks for it by name
    (ortune.tracking.parent_workspace).
    """
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "conf").is_dir():
            return folder
    return cwd


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | None = None) -> dict:
    """Compose conf/ exactly as DVC's Hydra integration does (resolved), as a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    config_dir = Path(config_dir or project_root() / "conf").resolve()
    try:
        with initialize_config_dir(str(config_dir), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        hint = _renamed_hint(_one_line(exc)) or " (check the override's spelling against conf/, or `make help`)"
        raise OrtuneError(f"conf/: {_one_line(exc)}{hint}") from None
    return OmegaConf.to_container(cfg)


def params_yaml_text(composed: dict) -> str:
    """params.yaml's exact bytes for a composition (the same dump DVC writes)."""
    return OmegaConf.to_yaml(OmegaConf.create(composed))


def validate(raw: dict, source: str, workspace: bool = False) -> DictConfig:
    """Check a composed config against the schema and value ranges; return it typed and read-only.
    `workspace`: it is the config of the repository's own pipeline (params.yaml), whose outputs DVC tracks,
    so they must lie inside the repository (by hand, a stage may write anywhere: tests write to temp dirs)."""
    if problem := secret_problem(raw):  # first: later messages may quote values
        raise OrtuneError(f"{source}: {problem}")
    lora = raw.get("lora") if isinstance(raw, dict) else None
    if isinstance(lora, dict) and isinstance(lora.get("target_modules"), str):
        # PEFT's shorthand comes as a bare string (lora.target_modules=all-linear); the schema holds a list
        raw = {**raw, "lora": {**lora, "target_modules": [lora["target_modules"]]}}
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), raw)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" at '{key}'" if key else ""
        hint = _renamed_hint(str(key))
        raise OrtuneError(f"{source}: invalid setting{where}: {_one_line(exc)}{hint}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise OrtuneError(f"{source}: no value for {', '.join(missing)}; set it in conf/ (see conf/config.yaml)")
    if cfg.eval.baseline_prompt is None:  # null: the question that fits data.task
        cfg.eval.baseline_prompt = default_baseline_prompt(cfg.data)
    unescape_templates(cfg)
    problems = list(setting_problems(cfg, project_root(), workspace))
    if problems:
        raise OrtuneError(f"{source}: " + "; ".join(problems))
    OmegaConf.set_readonly(cfg, True)
    return cfg


# Settings are written to params.yaml and dvc.lock (git), metrics/*.json, the model card, builder logs and the
# W&B config: a secret in one would be published. Key words and token shapes that name or look like one.
SECRET_WORDS = {"token", "secret", "password", "passwd", "pwd", "key", "apikey", "credential", "credentials"}
SECRET_SHAPES = {
    "a Hugging Face token": r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{30,}",
    "a GitHub token": r"(?<![A-Za-z0-9])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})",
    "an OpenAI/Anthropic key": r"(?<![A-Za-z0-9])sk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}",
    "an AWS access key": r"(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])",
    "a Google API key": r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{35}",
    "a Slack token": r"(?<![A-Za-z0-9])xox[abprs]-[A-Za-z0-9-]{10,}",
    "a private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "a URL with a password": r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@",
}


def secret_problem(raw, prefix: str = "") -> str | None:
    """The first setting whose name says it holds a secret, or whose value looks like one (never echoed)."""
    import re

    items = raw.items() if isinstance(raw, dict) else enumerate(raw) if isinstance(raw, list) else ()
    for key, value in items:
        name = f"{prefix}{key}" if isinstance(raw, dict) else f"{prefix.rstrip('.')}[{key}]"
        words = set(re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()))
        what = None
        if isinstance(raw, dict) and words & SECRET_WORDS and value not in (None, "", False):
            what = f"its name says it holds a {sorted(words & SECRET_WORDS)[0]}"
        elif isinstance(value, str):
            what = next(
                (f"its value looks like {kind}" for kind, shape in SECRET_SHAPES.items() if re.search(shape, value)),
                None,
            )
        elif problem := secret_problem(value, f"{name}."):
            return problem
        if what:
            return (
                f"{name}: {what}; settings are written to params.yaml and dvc.lock (git), metrics, the model card "
                "and W&B, so a secret never goes in one: export it in the environment instead (HF_TOKEN, "
                "WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...) and drop the setting"
            )
    return None


def _renamed_hint(message: str) -> str:
    import re

    for old, new in RENAMED.items():
        if re.search(rf"(?<![\w.]){re.escape(old)}(?!\w)", message):
            return f" (ortune calls it {new})"
    return ""


def declared_params(stage: str, dvc_yaml: Path | None = None) -> list[str]:
    """The params a stage lists in dvc.yaml (keys of params.yaml, possibly dotted)."""
    dvc_yaml = Path(dvc_yaml or project_root() / "dvc.yaml")
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    if stage not in stages:
        raise OrtuneError(f"{dvc_yaml}: no stage named '{stage}'")
    keys: list[str] = []
    for entry in stages[stage].get("params", []):
        if isinstance(entry, str):
            keys.append(entry)
        else:  # `- other_params_file.yaml: [keys]`
            keys.extend(k for v in entry.values() for k in v)
    return keys


def stage_view(cfg: DictConfig, keys: list[str]) -> DictConfig:
    """A read-only copy holding only `keys` (plus ALWAYS_VISIBLE); anything else raises on access."""
    view: dict[str, Any] = {}
    for key in [*ALWAYS_VISIBLE, *keys]:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
        node = view
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    out = OmegaConf.create(view)
    OmegaConf.set_struct(out, True)
    OmegaConf.set_readonly(out, True)
    return out


def load(stage: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config a stage runs with: params.yaml under DVC, conf/ + overrides by hand."""
    if os.environ.get("DVC_STAGE"):
        if overrides:
            raise OrtuneError("overrides are not accepted under DVC: pass them as `dvc exp run -S key=value`")
        params_file = project_root() / "params.yaml"
        if not params_file.exists():
            raise OrtuneError(f"{params_file} is missing: run `make params` (or `dvc exp run`) to compose it")
        raw = yaml.safe_load(params_file.read_text(encoding="utf-8"))
        return stage_view(validate(raw, params_file.name, workspace=True), declared_params(stage))
    raw = compose(overrides)
    source = "conf/ + overrides" if overrides else "conf/"
    return stage_view(validate(raw, source), declared_params(stage))
