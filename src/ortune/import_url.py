"""`make import-data` (scripts/import_data.py): a remote dataset -> `dvc import-url` into the repository.

What the user typed (URL, OUT, HF_CONFIG, HF_SPLIT, TIMEOUT) becomes the address DVC downloads and the
path it writes (resolve), or one line saying what to change; an http(s) address is asked once first, with a
timeout (probe), so a server that never answers cannot hold DVC's lock; then DVC imports it (import_url).
Values reach DVC after `--`: a value a user typed is an argument, never an option (OUT=-f would force).
"""

from __future__ import annotations

import importlib.util
import math
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from ortune.errors import OrtuneError
from ortune.records import FORMATS

# scheme -> the `dvc[...]` extra (and its module) that lets DVC read it; http(s) ships with dvc
PLUGINS = {
    "s3": "s3",
    "gs": "gs",
    "azure": "azure",
    "ssh": "ssh",
    "gdrive": "gdrive",
    "oss": "oss",
    "webdav": "webdav",
    "webdavs": "webdav",
    "hdfs": "hdfs",
    "webhdfs": "webhdfs",
}
BUILT_IN = ("http", "https")
DEFAULT_TIMEOUT = 60.0  # seconds without an answer: a slow server answers well within it, a dead one never


def hf_url(url: str, config: str, split: str, endpoint: str) -> tuple[str, str]:
    """(the https URL DVC downloads, a default file name) for an hf://datasets/... address."""
    parts = url.removeprefix("hf://datasets/").strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise OrtuneError(
            f"URL={url}: a Hugging Face dataset is hf://datasets/OWNER/NAME (one config and split, "
            "HF_CONFIG/HF_SPLIT) or hf://datasets/OWNER/NAME[@REV]/PATH (one file of the repo)"
        )
    owner, name = parts[0], parts[1]
    name, _, revision = name.partition("@")
    base = f"{endpoint.rstrip('/')}/datasets/{owner}/{name}/resolve"
    if len(parts) == 2:
        if revision:
            raise OrtuneError(
                f"URL={url}: the Parquet conversion of a dataset has no revisions; drop @{revision}, "
                "or import a file of that revision: hf://datasets/OWNER/NAME@REV/PATH"
            )
        # the Hub's Parquet conversion holds every config and split of a dataset, whatever its own format
        path = f"{quote(config, safe='')}/{quote(split, safe='')}/0000.parquet"
        return f"{base}/{quote('refs/convert/parquet', safe='')}/{path}", f"{name}-{config}-{split}.parquet"
    path = "/".join(parts[2:])
    return f"{base}/{quote(revision or 'main', safe='')}/{quote(path)}", parts[-1]


def resolve(url: str, out: str, config: str, split: str, endpoint: str, root: Path) -> tuple[str, Path]:
    """(what `dvc import-url` is given, the output path inside the repo), or a one-line error."""
    if not url.strip():
        raise OrtuneError("URL is empty: make import-data URL=https://host/path/data.jsonl [OUT=data/raw/name.jsonl]")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "azureml":
        raise OrtuneError(
            f"URL={url}: DVC cannot read Azure ML datastore URIs; use the storage behind the datastore, "
            "azure://CONTAINER/PATH (needs dvc[azure]), or an https URL with a SAS token"
        )
    if scheme == "hf":
        url, name = hf_url(url, config or "default", split or "train", endpoint)
    elif scheme in PLUGINS:
        extra = PLUGINS[scheme]
        if importlib.util.find_spec(f"dvc_{extra}") is None:
            import dvc

            raise OrtuneError(
                f"URL={url}: DVC reads {scheme}:// with its '{extra}' extra, not installed here: "
                f".venv/bin/pip install 'dvc[{extra}]=={dvc.__version__}'"
            )
        name = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    elif scheme in BUILT_IN:
        name = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    elif scheme in ("", "file") or len(scheme) == 1:  # a local path (a Windows drive letter looks like a scheme)
        name = Path(unquote(urlsplit(url).path) if scheme == "file" else url).name
    else:
        raise OrtuneError(
            f"URL={url}: scheme '{scheme}' unknown; use http(s)://, hf://datasets/, "
            f"{'://, '.join(PLUGINS)}:// or a local path"
        )
    if out.startswith("-") or url.startswith("-"):
        name, value = ("OUT", out) if out.startswith("-") else ("URL", url)
        raise OrtuneError(f"{name}={value}: starts with '-'; name a path (data/raw/NAME, or ./{value} if you mean it)")
    if out:
        target = Path(out)
    elif Path(name).suffix.lower() in FORMATS:
        target = Path("data/raw") / name
    else:
        raise OrtuneError(
            f"URL={url}: its name ({name or 'none'}) does not say the format; "
            f"set OUT=data/raw/NAME with one of {', '.join(FORMATS)} (or a folder name)"
        )
    if target.suffix and target.suffix.lower() not in FORMATS:
        raise OrtuneError(
            f"OUT={target}: data.path reads {', '.join(FORMATS)} files or folders of them; "
            "name OUT with its format's suffix"
        )
    absolute = (root / target).resolve()
    if not absolute.is_relative_to(root.resolve()):
        raise OrtuneError(f"OUT={target}: outside the repository; DVC tracks files inside it, e.g. data/raw/NAME")
    if absolute.with_name(absolute.name + ".dvc").exists():
        raise OrtuneError(
            f"OUT={target}: already imported; fetch its newest version with: dvc update {shlex.quote(str(target))}.dvc"
        )
    if absolute.exists():
        raise OrtuneError(f"OUT={target}: already exists; choose another OUT or remove it first")
    return url, target


def timeout_seconds(text: str) -> float:
    if not text.strip():
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise OrtuneError(f"TIMEOUT={text}: must be a number of seconds > 0 (default {DEFAULT_TIMEOUT:g})")
    return seconds


def probe(url: str, seconds: float) -> None:
    """Ask an http(s) address for its first byte, so a server that never answers is one line after
    `seconds` instead of DVC's retries under its lock. What the answer says is left to DVC."""
    if urlsplit(url).scheme.lower() not in BUILT_IN:
        return
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0", "User-Agent": "ortune import-data"})
    try:
        with urllib.request.urlopen(request, timeout=seconds) as answer:
            answer.read(1)
    except urllib.error.HTTPError:  # an answer: DVC reports it in its own words
        return
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            raise OrtuneError(
                f"URL={url}: no answer within {seconds:g} s; check the address, or wait longer with TIMEOUT=SECONDS"
            ) from None
        raise OrtuneError(f"URL={url}: cannot be reached ({getattr(reason, 'strerror', None) or reason})") from None


def import_url(url: str, out: Path, seconds: float, root: Path) -> None:
    """`dvc import-url` of `url` into `out` (inside `root`), reading with the same timeout as the probe; a
    failure is one line with DVC's own reason."""
    out.parent.mkdir(parents=True, exist_ok=True)
    timeouts = (
        # DVC reads whole seconds here (and keeps them in OUT.dvc for `dvc update`)
        ["--fs-config", f"read_timeout={math.ceil(seconds)}", f"connect_timeout={math.ceil(seconds)}"]
        if urlsplit(url).scheme.lower() in BUILT_IN
        else []
    )
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "import-url", *timeouts, "--", url, str(out)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = next(
            (line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR")),
            lines[-1] if lines else f"exit status {done.returncode}",
        )
        raise OrtuneError(f"dvc import-url {url}: {reason}")
