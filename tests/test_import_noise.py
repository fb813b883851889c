"""Library noise a stage must not print: bitsandbytes' hint to install `kernels`, which PEFT's import
of bitsandbytes triggers on CPUs with AVX512-BF16 even in a plain LoRA run."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Makes this machine look like one with AVX512-BF16 and without `kernels` (whatever it really has), so
# bitsandbytes' import takes the path that warns; then imports bitsandbytes as PEFT's import does
# (peft/helpers.py, whenever bitsandbytes is installed) in merge, eval and build_onnx.
SIMULATE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, logging, sys

    sys.modules["kernels"] = None  # not installed: an ImportError, never a hub download

    class AVX512BF16(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, AVX512BF16())
    {first}
    import bitsandbytes.backends.cpu.ops as ops
    assert ops.has_avx512bf16(), "the simulated CPU path was not taken"
    ops.logger.warning("another bitsandbytes warning")
""")


def _stderr(first: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", SIMULATE.format(first=first)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_without_ortune_bitsandbytes_tells_to_install_kernels():
    # the baseline the filter is for: if this stops warning, bitsandbytes changed and the filter may be dead
    assert "kernels-community" in _stderr("")


def test_importing_ortune_drops_only_the_kernels_hint():
    stderr = _stderr("import ortune.modeling")
    assert "kernels" not in stderr
    assert "another bitsandbytes warning" in stderr  # other bitsandbytes warnings still show
