"""`make import-data`: remote data under DVC, round-tripped through an HTTP server on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from conftest import REPO, clone_project, ran_stages
from ortune import import_url
from ortune.errors import OrtuneError
from ortune.records import read_records

MAKE = ["make", "-s", "-o", ".venv/.installed"]  # the clone links this repo's .venv: never reinstall


class Handler(http.server.SimpleHTTPRequestHandler):
    """A static server that sends an ETag, as object stores, the Hub and most web servers do."""

    def end_headers(self):
        path = Path(self.translate_path(self.path))
        if path.is_file():
            self.send_header("ETag", f'"{hashlib.md5(path.read_bytes()).hexdigest()}"')
        super().end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return clone_project(tmp_path_factory, "import")


def make(project, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    root, env = project
    return subprocess.run(
        [*MAKE, *args], cwd=root, env={**env, **extra_env}, capture_output=True, text=True, timeout=600
    )


def dvc(project, *args: str) -> subprocess.CompletedProcess:
    root, env = project
    done = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)}: {done.stderr[-3000:]}"
    return done


def test_import_and_update_round_trip_with_hostile_names(project, server):
    root, _ = project
    served, base = server
    source = served / "it's $HOME.jsonl"
    source.write_text('{"phrase": "a", "tone": "joy"}\n', encoding="utf-8")
    url = f"{base}/it's%20$HOME.jsonl"
    out = "data/raw/a 'quoted' $HOME; file.jsonl"
    done = make(project, "import-data", f"URL={url}", f"OUT={out}")
    assert done.returncode == 0, done.stderr
    assert (root / out).read_bytes() == source.read_bytes()
    record = yaml.safe_load((root / f"{out}.dvc").read_text())
    assert record["deps"][0]["path"] == url and record["frozen"] is True
    source.write_text('{"phrase": "a", "tone": "joy"}\n{"phrase": "b", "tone": "fear"}\n', encoding="utf-8")
    # the refresh command it prints, quoted for a shell, run as a user would paste it
    refresh = next(line for line in done.stdout.splitlines() if line.startswith("refresh it: "))
    command = refresh.removeprefix("refresh it: ").split("  (then", 1)[0]
    subprocess.run(["bash", "-c", command], cwd=root, env=project[1], check=True, capture_output=True, timeout=300)
    assert (root / out).read_bytes() == source.read_bytes()
    again = make(project, "import-data", f"URL={url}", f"OUT={out}")
    assert again.returncode == 2 and again.stderr.startswith(f"error: OUT={out}: already imported; fetch its newest")


def test_a_hugging_face_dataset_split_imports_from_the_hubs_parquet_conversion(project, server):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _ = project
    served, base = server
    rows = [{"text": "we won!", "label": "joy"}, {"text": "a spider!", "label": "fear"}]
    # the Hub serves /datasets/OWNER/NAME/resolve/refs%2Fconvert%2Fparquet/CONFIG/SPLIT/0000.parquet
    parquet = served / "datasets/someone/feelings/resolve/refs/convert/parquet/default/train/0000.parquet"
    parquet.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    done = make(project, "import-data", "URL=hf://datasets/someone/feelings", "HF_SPLIT=train", HF_ENDPOINT=base)
    assert done.returncode == 0, done.stderr
    out = root / "data/raw/feelings-default-train.parquet"
    assert read_records(out) == rows
    record = yaml.safe_load(out.with_name(out.name + ".dvc").read_text())
    assert (
        record["deps"][0]["path"]
        == f"{base}/datasets/someone/feelings/resolve/refs%2Fconvert%2Fparquet/default/train/0000.parquet"
    )


@pytest.mark.slow
def test_dvc_update_reruns_the_stages_that_read_the_data(project, server):
    """The imported file is data.path itself: after `dvc update`, repro reruns what reads it."""
    root, env = project
    served, base = server
    shutil.copy(REPO / "data/raw/tones.jsonl", served / "tones.jsonl")
    subprocess.run(["git", "rm", "-q", "data/raw/tones.jsonl"], cwd=root, env=env, check=True)
    done = make(project, "import-data", f"URL={base}/tones.jsonl")
    assert done.returncode == 0, done.stderr
    assert "data/raw/tones.jsonl.dvc" in done.stdout
    assert make(project, "params").returncode == 0  # params.yaml from this tree's conf/
    first = dvc(project, "repro", "prepare_data").stdout
    assert ran_stages(first) == {"fetch_model", "prepare_data"}
    rows_before = json.loads((root / "metrics/data.json").read_text())["rows_read"]
    with open(served / "tones.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"phrase": "My cat learned to open the fridge by herself!", "tone": "surprise"}\n')
    assert ran_stages(dvc(project, "repro", "prepare_data").stdout) == set()  # imports are frozen until updated
    dvc(project, "update", "data/raw/tones.jsonl.dvc")
    # the tiny base model's tokenizer is trained on the data, so it reruns too
    assert ran_stages(dvc(project, "repro", "prepare_data").stdout) == {"fetch_model", "prepare_data"}
    assert json.loads((root / "metrics/data.json").read_text())["rows_read"] == rows_before + 1


# ---- resolving URL and OUT, without a network ----------------------------------------------------------


def resolve(url: str, out: str = "", config: str = "", split: str = "", root: Path = REPO):
    return import_url.resolve(url, out, config, split, "https://huggingface.co", root)


def test_hf_addresses_resolve_to_the_hubs_files():
    assert resolve("hf://datasets/dair-ai/emotion", config="split", split="validation") == (
        "https://huggingface.co/datasets/dair-ai/emotion/resolve/refs%2Fconvert%2Fparquet/split/validation/0000.parquet",
        Path("data/raw/emotion-split-validation.parquet"),
    )
    assert resolve("hf://datasets/me/tones@v1.0/data/train.jsonl") == (
        "https://huggingface.co/datasets/me/tones/resolve/v1.0/data/train.jsonl",
        Path("data/raw/train.jsonl"),
    )
    with pytest.raises(OrtuneError, match="hf://datasets/OWNER/NAME"):
        resolve("hf://datasets/onlyowner")


@pytest.mark.parametrize(
    ("url", "out", "needle"),
    [
        ("azureml://subscriptions/x/datastores/d/paths/t.jsonl", "", "DVC cannot read Azure ML datastore URIs"),
        ("https://host/download?id=3", "", r"does not say the format; set OUT=data/raw/NAME"),
        ("https://host/t.jsonl", "data/raw/t.txt", r"OUT=data/raw/t.txt: data.path reads"),
        ("https://host/t.jsonl", "../outside.jsonl", "outside the repository"),
        ("https://host/t.jsonl", "data/raw/tones.jsonl", "already exists"),
        ("ftp://host/t.jsonl", "", "scheme 'ftp' unknown"),
        ("", "", "URL is empty"),
    ],
)
def test_bad_addresses_are_one_line(url, out, needle):
    with pytest.raises(OrtuneError, match=needle) as caught:
        resolve(url, out)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("scheme", "extra"), [("s3", "s3"), ("gs", "gs"), ("azure", "azure")])
def test_a_cloud_scheme_without_its_dvc_extra_says_which_to_install(monkeypatch, scheme, extra):
    import dvc

    monkeypatch.setattr(import_url.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OrtuneError, match=rf"install 'dvc\[{extra}\]=={dvc.__version__}'"):
        resolve(f"{scheme}://bucket/data/t.jsonl")
    monkeypatch.setattr(import_url.importlib.util, "find_spec", lambda name: object())
    assert resolve(f"{scheme}://bucket/data/t.jsonl") == (f"{scheme}://bucket/data/t.jsonl", Path("data/raw/t.jsonl"))
