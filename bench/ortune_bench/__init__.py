"""`make bench`'s harness (bench/bench.py is its command line), one module per job:

- machine: the CPU family, its memory bandwidth, and how busy other processes keep the cores;
- bytes_read: bytes a decode step reads per token, and the bandwidth floor they set;
- models: the bench models (random Phi-3-shaped, SmolLM2), their engines and ortune-built ONNX exports;
- decode: timing the engines side by side;
- pipeline: `make all` timed in throwaway clones;
- results: results.json per CPU family, results.md and the README's table.
"""

from __future__ import annotations

from pathlib import Path

PROMPT = "### Text: I finally got the job offer I was hoping for!\n### The tone is:\n"
NEW_TOKENS = 64
ROOT = Path(__file__).resolve().parents[2]  # the checkout this harness lives in and benchmarks


def cache_dir() -> Path:
    return ROOT / "bench" / ".cache"
