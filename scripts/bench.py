"""`make bench` (QUICK=1: small model, few repeats, no pipeline timing): decode speed of ortune's
int4 model against int8, fp32, PyTorch fp32/bf16 and the memory-bandwidth floor, and the pipeline's
own overheads. Writes bench/results.json and bench/results.md and refreshes the README's table
(QUICK and partial runs write to the git-ignored bench/.cache/ instead). See src/ortune/bench.py.

    python scripts/bench.py --quick
    python scripts/bench.py --variant "onnx.block_size=64" --no-pipeline   # compare a setting side by side
"""

from __future__ import annotations

import logging
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    from ortune.bench import main

    sys.exit(main())
