"""Bring a remote dataset under DVC as a versioned local copy: `make import-data URL=... [OUT=...]`.

    make import-data URL=https://example.com/tones.jsonl                  # -> data/raw/tones.jsonl
    make import-data URL=s3://bucket/path/tones.csv OUT=data/raw/tones.csv  # needs dvc[s3]
    make import-data URL=hf://datasets/dair-ai/emotion HF_CONFIG=split HF_SPLIT=train

It runs `dvc import-url`, which records where the file came from and its ETag/checksum in
OUT.dvc: the pipeline depends on the local copy, `dvc update OUT.dvc` fetches a newer version, and
`make all` then reruns the stages that read it. A Hugging Face dataset id is read from the Hub's
Parquet conversion of one config and split (refs/convert/parquet/CONFIG/SPLIT/0000.parquet);
`hf://datasets/OWNER/NAME[@REV]/PATH` imports one file of the dataset repo as it is.

Settings arrive through the environment (the Makefile exports them), never through a shell command
line, so quotes, spaces and `$` in them reach this program as typed: ORTUNE_IMPORT_URL,
ORTUNE_IMPORT_OUT, ORTUNE_IMPORT_HF_CONFIG, ORTUNE_IMPORT_HF_SPLIT; HF_ENDPOINT as huggingface_hub reads it.
They reach DVC after `--`: a value a user typed is an argument, never an option (OUT=-f would force).

An http(s) server that accepts the connection and never answers would hold DVC's lock (and make compare,
best, pull behind it) for as long as DVC retries: the address is asked once first, with a timeout
(TIMEOUT=seconds, ORTUNE_IMPORT_TIMEOUT; default 60), and DVC reads with the same timeout.
The address checks, the probe and the import itself: ortune.import_url.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from ortune.errors import OrtuneError
from ortune.import_url import import_url, probe, resolve, timeout_seconds


def main() -> int:
    env = os.environ
    root = Path.cwd()
    try:
        url, out = resolve(
            env.get("ORTUNE_IMPORT_URL", ""),
            env.get("ORTUNE_IMPORT_OUT", ""),
            env.get("ORTUNE_IMPORT_HF_CONFIG", ""),
            env.get("ORTUNE_IMPORT_HF_SPLIT", ""),
            env.get("HF_ENDPOINT") or "https://huggingface.co",
            root,
        )
        seconds = timeout_seconds(env.get("ORTUNE_IMPORT_TIMEOUT", ""))
        probe(url, seconds)
        print(f"importing {url} -> {out}", flush=True)
        import_url(url, out, seconds, root)
    except OrtuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    quoted = shlex.quote(str(out))
    print(
        f"imported into {out} (tracked by {out}.dvc: git add {shlex.quote(str(out) + '.dvc')} "
        f"{shlex.quote(str(out.parent / '.gitignore'))})\n"
        f'use it:     make all ARGS="data.path={out}"  (or data.path in conf/data/)\n'
        f"refresh it: dvc update {quoted}.dvc  (then make all reruns the stages that read it)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
