"""data/raw/extract.jsonl is what scripts/make_extract_data.py writes, and reads as English."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "data" / "raw" / "extract.jsonl"


def test_the_committed_extraction_file_is_what_the_script_writes_byte_for_byte(tmp_path):
    """docs/tasks.md promises the same file for the same seed: a change to the script that is not
    followed by writing the file again would leave the docs' figures measured on data nobody can make."""
    out = tmp_path / "extract.jsonl"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_extract_data.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == COMMITTED.read_bytes()


def test_no_sentence_puts_a_before_a_vowel():
    """ "bought a electric toothbrush" taught the model bad English along with the fields."""
    wrong = re.findall(r"\b[Aa] [aeiou]\w*", COMMITTED.read_text(encoding="utf-8"))
    assert not wrong, wrong[:5]
