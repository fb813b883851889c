"""Eval pictures (confusion-matrix PNG, per-class F1 data for a DVC plot) and the offline HTML report.

`dvc plots show` writes an HTML page whose <script> tags load Vega from a CDN, so offline it is
blank. report_template() gives DVC a page with Vega, Vega-Lite and Vega-Embed inlined from
src/ortune/vendor/vega/ instead; its `{plot_divs}` placeholder is where DVC puts the plots.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import tempfile
from pathlib import Path

from ortune.artifacts import write_bytes_atomic
from ortune.errors import OrtuneError
from ortune.metrics import UNPARSED

VENDOR = Path(__file__).resolve().parent / "vendor" / "vega"
# Load order matters: vega-lite needs vega, vega-embed needs both.
VEGA_SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")


def write_confusion_png(matrix: list[list[int]], labels: list[str], path: str | Path, title: str) -> None:
    """Rows: true label; columns: predicted label, then unparsed. Cells show counts, shaded by the
    share of their row, so a class's recall reads as the darkness of its diagonal cell."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    columns = [*labels, UNPARSED]
    shares = [[count / (sum(row) or 1) for count in row] for row in matrix]
    size = 1.2 + 0.75 * len(columns)
    figure, axes = plt.subplots(figsize=(size + 1.2, size), dpi=100)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=10)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            axes.text(j, i, str(count), ha="center", va="center", color="white" if shares[i][j] > 0.5 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true label")
    figure.tight_layout()
    buffer = io.BytesIO()
    # no timestamp in the metadata: the same eval gives the same bytes, so DVC sees no change
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    write_bytes_atomic(Path(path), buffer.getvalue())


def write_per_class_csv(per_class: dict[str, dict], path: str | Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "precision", "recall", "f1", "support"])
    for label, s in per_class.items():
        writer.writerow([label, round(s["precision"], 6), round(s["recall"], 6), round(s["f1"], 6), s["support"]])
    write_bytes_atomic(Path(path), buffer.getvalue().encode("utf-8"))


def report_template() -> str:
    scripts = "\n".join(f"<script>{(VENDOR / name).read_text(encoding='utf-8')}</script>" for name in VEGA_SCRIPTS)
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n<meta charset="utf-8">\n{refresh_tag}\n<title>ortune plots</title>\n'
        f"{scripts}\n"
        "<style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def write_report(
    out_dir: str | Path, revisions: list[str] | tuple[str, ...] = (), cwd: str | Path | None = None
) -> Path:
    """Run `dvc plots show` (or `dvc plots diff REV...`) into out_dir/index.html with the offline template."""
    out_dir = Path(out_dir).resolve()
    command = ["diff", *revisions] if revisions else ["show"]
    with tempfile.TemporaryDirectory(prefix="ortune-report-") as scratch:
        template = Path(scratch) / "template.html"
        template.write_text(report_template(), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "plots", *command, "--html-template", str(template), "-o", str(out_dir)],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
    page = out_dir / "index.html"
    if done.returncode != 0 or not page.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OrtuneError(f"dvc plots {command[0]} failed ({last[0][:300]}); run the pipeline first (make all)")
    return page
