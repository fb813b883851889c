"""Hostile input in `make plots` (issue 20): data-derived text stays data in the HTML report, a revision is
never an option of DVC's, and an unknown revision is named as one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

from ortune import plots
from test_plots_report import LABELS, REPO, plots_project  # noqa: F401 - plots_project is a fixture

HOSTILE = "</script><script>alert(1)</script><!--"


class Scripts(HTMLParser):
    """The text of every <script> element as a browser parses the page (and any element named in `tags`)."""

    def __init__(self):
        super().__init__()
        self.scripts: list[str] = []
        self.tags: list[str] = []
        self._inside = False

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "script":
            self._inside = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self._inside = False

    def handle_data(self, data):
        if self._inside:
            self.scripts[-1] += data


def report(root: Path, env: dict, *revs: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), "--", *revs],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_label_holding_html_stays_data_in_the_report(plots_project):  # noqa: F811
    root, env = plots_project
    labels = [*LABELS[:2], HOSTILE]
    plots.write_per_class_csv(
        {label: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 3} for label in labels},
        root / "plots" / "per_class_f1.csv",
    )
    plots.write_confusion_png([[1, 0, 0, 0]] * 3, labels, root / "plots" / "confusion_matrix.png", "t")
    done = report(root, env)
    assert done.returncode == 0, done.stderr
    page = (root / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert "alert(1)</script>" not in page and "<!--" not in page.split("</head>")[1]
    parser = Scripts()
    parser.feed(page)
    # the three vendored libraries, then one element per Vega plot: nothing the data opened
    specs = [s for s in parser.scripts if "vegaEmbed(" in s]
    assert len(parser.scripts) == len(plots.VEGA_SCRIPTS) + len(specs) and len(specs) >= 2
    found = []
    for script in specs:
        spec = json.loads(re.search(r"var spec = (.*);\s*vegaEmbed", script, re.S)[1])
        found += [row.get("label") for row in spec["data"]["values"]]
    assert HOSTILE in found, "the label reaches the plot as it is, only escaped"


def test_script_json_and_ids_escape_what_closes_an_element():
    text = json.dumps({"label": HOSTILE + "&amp;"})
    assert json.loads(plots.script_json(text)) == json.loads(text)
    assert not set("<>&") & set(plots.script_json(text))
    assert plots.html_id("plots/a'b\"<c>.csv") == "plots_a_b__c__csv"


def git_plots_project(root: Path, env: dict) -> None:
    subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "-f"], cwd=root, env=env, check=True)
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")  # the init dropped the plot templates
    ids = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", "add", "-A"], cwd=root, env={**env, **ids}, check=True)
    subprocess.run(["git", "commit", "-qm", "plots"], cwd=root, env={**env, **ids}, check=True)


def test_a_revision_is_never_an_option_and_an_unknown_one_is_named(plots_project, tmp_path):  # noqa: F811
    root, env = plots_project
    git_plots_project(root, env)
    elsewhere = tmp_path / "elsewhere"
    done = report(root, env, "HEAD", f"--out={elsewhere}")
    assert done.returncode == 2 and not elsewhere.exists()
    assert done.stderr.startswith("error: REVS: '--out=") and "starts with '-'" in done.stderr
    assert done.stderr.count("\n") == 1
    done = report(root, env, "HEAD", "unknown-rev")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "unknown revision 'unknown-rev'" in done.stderr and "run the pipeline first" not in done.stderr
    done = report(root, env, "HEAD")
    assert done.returncode == 0, done.stderr
    assert (root / "dvc_plots" / "index.html").is_file()
