"""Eval pictures (confusion-matrix PNG, per-class F1 data for a DVC plot) and the offline HTML report.

`dvc plots show` writes an HTML page whose <script> tags load Vega from a CDN, so offline it is
blank. report_template() gives DVC a page with Vega, Vega-Lite and Vega-Embed inlined from
src/ortune/vendor/vega/ instead; its `{plot_divs}` placeholder is where DVC puts the plots.

DVC writes each plot's data (labels, revision and experiment names) into that page as it is: a label such as
`</script><script>...` would end the plot's <script> element and run its own. So DVC runs here through
`python -m ortune.plots`, its renderers escaping what they write (script_json, html.escape).
"""

from __future__ import annotations

import csv
import html
import io
import os
import re
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
        "<style>body { font-family: sans-serif; } table { border-spacing: 15px; }\n"
        f"{PREDICTIONS_CSS}</style>\n"
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n"
    )


def script_json(text: str) -> str:
    """JSON text that stays data inside an HTML <script> element: `<`, `>` and `&` (which JSON holds only
    inside strings) as \\u escapes, so no label can close the element or open a comment."""
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def html_id(name: str) -> str:
    """A plot's element id, also written inside a quoted JS string: letters, digits, - and _ only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)


def _image_html(renderer, html_path=None, **_) -> str:
    """dvc_render's ImageRenderer.partial_html with every data-derived string HTML-escaped."""
    parts = []
    for point in renderer.datapoints:
        src = point[renderer.SRC_FIELD]
        if not src.startswith("data:image;base64") and os.path.isabs(src) and html_path:
            src = os.path.relpath(src, os.path.dirname(html_path))
        parts.append(
            '<div style="border:1px dotted black;margin:2px;display:inline-block;overflow:hidden;margin-left:8px;">'
            f'<p>{html.escape(str(point[renderer.TITLE_FIELD]))}</p><img src="{html.escape(src)}"></div>'
        )
    return "\n".join([f"<p>{html.escape(renderer.name)}</p>", *parts]) if parts else ""


def escape_dvc_renderers() -> None:
    """Make dvc_render (DVC's HTML writer, pinned) escape what it writes: the Vega spec as script_json, the
    images' titles and paths with html.escape, element ids as html_id. Only in `python -m ortune.plots`."""
    from dvc_render.base import Renderer
    from dvc_render.image import ImageRenderer
    from dvc_render.vega import VegaRenderer

    vega_html = VegaRenderer.partial_html
    VegaRenderer.partial_html = lambda self, **kwargs: script_json(vega_html(self, **kwargs))
    ImageRenderer.partial_html = _image_html
    Renderer.remove_special_chars = staticmethod(html_id)


# the free-text rows the report lists, worst first (every row is in metrics/eval_predictions.jsonl)
PREDICTION_ROWS = 200
PREDICTIONS_CSS = (
    "table.predictions { border-collapse: collapse; border-spacing: 0; font-size: 13px; }\n"
    "table.predictions td, table.predictions th { border: 1px solid #ccc; padding: 4px; vertical-align: top; }\n"
    "table.predictions pre { white-space: pre-wrap; word-break: break-word; max-width: 28em; margin: 0; }\n"
)


def predictions_section(lines: list[dict], source: str) -> str:
    """The free-text predictions as an HTML table, the shipped model's worst rows first: the prompt, the
    reference, and each runtime's output with its per-row scores. Every string from the data or a model is
    HTML-escaped (a generation is whatever the model wrote). Empty for classification rows: their
    confusion matrix is on the page."""
    from ortune import freetext, textmetrics

    if not lines or "reference" not in lines[0]:
        return ""
    kinds = list(lines[0]["generations"])
    shown = freetext.worst_first(lines)[:PREDICTION_ROWS]

    def text(value) -> str:
        return f"<pre>{html.escape(str(value))}</pre>"

    def scored(scores: dict) -> str:
        return " · ".join(f"{html.escape(name)} {scores[name]:.3f}" for name in freetext.SHOWN_SCORES if name in scores)

    head = "".join(f"<th>{html.escape(kind)}</th>" for kind in ("#", "prompt", "reference", *kinds))
    body = [
        f"<tr><td>{rank}</td><td>{text(line['prompt'])}</td><td>{text(line['reference'])}</td>"
        + "".join(
            f"<td>{text(line['generations'][kind])}<small>{scored(line['scores'].get(kind, {}))}"
            f"{' · cut at the token limit' if kind in line.get('cut', ()) else ''}</small></td>"
            for kind in kinds
        )
        + "</tr>"
        for rank, line in enumerate(shown, 1)
    ]
    listed = f"the {len(shown)} worst of {len(lines)}" if len(shown) < len(lines) else f"all {len(lines)}"
    return (
        f'<h2 id="predictions">Per-row predictions (free text): {listed} rows, worst first</h2>\n'
        f"<p>Ordered by the shipped (onnx) model's {html.escape(textmetrics.HEADLINE)}, then chrF; every row is "
        f"in {html.escape(source)}.</p>\n"
        f'<table class="predictions"><thead><tr>{head}</tr></thead><tbody>\n' + "\n".join(body) + "\n</tbody></table>\n"
    )


def add_predictions(page: Path, root: Path) -> None:
    """Put the workspace's free-text predictions (paths.metrics in params.yaml) at the end of the page."""
    import json

    import yaml

    try:
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
        source = Path(params["paths"]["metrics"]) / "eval_predictions.jsonl"
        lines = [json.loads(line) for line in (root / source).read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return  # no eval yet, or a file from before: the plots alone
    section = predictions_section(lines, str(source))
    if section:
        before, end, after = page.read_text(encoding="utf-8").rpartition("</body>")
        write_bytes_atomic(page, (before + section + end + after).encode("utf-8"))


def write_report(
    out_dir: str | Path, revisions: list[str] | tuple[str, ...] = (), cwd: str | Path | None = None
) -> Path:
    """Run `dvc plots show` (or `dvc plots diff REV...`) into out_dir/index.html with the offline template;
    a report of the workspace ends with its free-text predictions, worst rows first (predictions_section)."""
    out_dir = Path(out_dir).resolve()
    if options := [rev for rev in revisions if rev.startswith("-")]:
        raise OrtuneError(
            f"REVS: {options[0]!r} is not a revision (it starts with '-'); name git revisions or experiments"
        )
    unknown = unknown_revisions(revisions, cwd)
    if unknown:
        raise OrtuneError(
            f"REVS: unknown revision {', '.join(map(repr, unknown))}; name a git revision (HEAD, a branch, a tag) "
            "or an experiment `make compare` lists"
        )
    with tempfile.TemporaryDirectory(prefix="ortune-report-") as scratch:
        template = Path(scratch) / "template.html"
        template.write_text(report_template(), encoding="utf-8")
        options = ["--html-template", str(template), "-o", str(out_dir)]
        # revisions after `--`: a value a user typed is an argument, never an option of DVC's
        command = ["diff", *options, "--", *revisions] if revisions else ["show", *options]
        done = subprocess.run(
            [sys.executable, "-m", "ortune.plots", "plots", *command],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=False,
        )
    page = out_dir / "index.html"
    if done.returncode != 0 or not page.is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OrtuneError(f"dvc plots {command[0]} failed ({last[0][:300]}); run the pipeline first (make all)")
    if not revisions:  # the predictions file is the workspace's: not shown beside other revisions' plots
        add_predictions(page, Path(cwd or Path.cwd()))
    return page


def unknown_revisions(revisions, cwd: str | Path | None = None) -> list[str]:
    """The revisions neither git nor DVC's experiments know (DVC draws nothing for them, and says nothing)."""
    if not revisions:
        return []
    from dvc.repo import Repo
    from dvc.scm import Git, RevError, resolve_rev

    unknown = []
    with Repo(str(cwd or Path.cwd())) as repo:
        for rev in revisions:
            if rev == "workspace":  # DVC's name for the files as they are
                continue
            if not isinstance(repo.scm, Git):  # a DVC project outside git has no revisions
                unknown.append(rev)
                continue
            try:
                resolve_rev(repo.scm, rev)
            except RevError:
                unknown.append(rev)
    return unknown


if __name__ == "__main__":  # `dvc ...` with the escaping renderers (write_report runs `dvc plots` so)
    from dvc.cli import main

    escape_dvc_renderers()
    sys.exit(main(sys.argv[1:]))
