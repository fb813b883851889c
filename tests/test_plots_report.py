"""Eval pictures, and the HTML plots report rendering offline in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ortune import config, plots

REPO = Path(__file__).resolve().parents[1]
LABELS = ["fear", "joy", "sadness"]
MATRIX = [[5, 1, 0, 0], [0, 6, 0, 1], [2, 0, 3, 0]]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_confusion_png_is_a_small_deterministic_png(tmp_path):
    from PIL import Image

    plots.write_confusion_png(MATRIX, LABELS, tmp_path / "a.png", "title")
    plots.write_confusion_png(MATRIX, LABELS, tmp_path / "b.png", "title")
    first = (tmp_path / "a.png").read_bytes()
    assert first == (tmp_path / "b.png").read_bytes(), "same eval, same bytes: DVC must see no change"
    assert first.startswith(b"\x89PNG") and len(first) < 200_000
    with Image.open(tmp_path / "a.png") as image:
        width, height = image.size
        assert width > 300 and height > 300
        assert len(set(image.convert("L").getdata())) > 10, "a blank picture"
    assert not list(tmp_path.glob(".*tmp*")), "no temp file left behind"


def test_per_class_csv_lists_each_label(tmp_path):
    per_class = {
        "fear": {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 2},
        "joy": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
    }
    plots.write_per_class_csv(per_class, tmp_path / "f1.csv")
    assert (tmp_path / "f1.csv").read_text().splitlines() == [
        "label,precision,recall,f1,support",
        "fear,0.5,1.0,0.666667,2",
        "joy,0.0,0.0,0.0,1",
    ]


def test_report_template_inlines_vega_and_loads_nothing_remote():
    template = plots.report_template()
    assert "{plot_divs}" in template and "{scripts}" not in template  # {scripts} is where DVC puts CDN tags
    assert not re.search(r"<script[^>]+src=", template)
    # in dependency order: vega, then vega-lite, then vega-embed
    positions = [template.index((plots.VENDOR / name).read_text(encoding="utf-8")) for name in plots.VEGA_SCRIPTS]
    assert positions == sorted(positions)


def dvc_env(home: Path) -> dict:
    from ortune.workspace_clone import isolated_env

    return isolated_env(home)


@pytest.fixture
def plots_project(tmp_path):
    """This repo's dvc.yaml and plot templates, with plot files as the pipeline writes them."""
    root = tmp_path / "project"
    root.mkdir()
    env = dvc_env(tmp_path / "home")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / ".dvc" / "plots", root / ".dvc" / "plots")
    (root / "params.yaml").write_text(config.params_yaml_text(config.compose([], config_dir=REPO / "conf")))
    out = root / "plots"
    out.mkdir()
    (out / "train_loss.csv").write_text("step,loss\n" + "".join(f"{s},{3 / s:.4f}\n" for s in range(5, 130, 5)))
    plots.write_per_class_csv(
        {
            label: {"precision": 0.8, "recall": 0.7, "f1": 0.75 - i / 10, "support": 36}
            for i, label in enumerate(LABELS)
        },
        out / "per_class_f1.csv",
    )
    plots.write_confusion_png(MATRIX, LABELS, out / "confusion_matrix.png", "ONNX model")
    return root, env


def render_dom(page: Path, scratch: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran, in headless Chromium with everything networked turned off."""
    profile = scratch / "chromium-profile"
    profile.mkdir(exist_ok=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
    ]
    if screenshot is not None:
        subprocess.run(
            [CHROMIUM, *flags, f"--screenshot={screenshot}", "--window-size=1200,1600", page.as_uri()],
            capture_output=True,
            timeout=120,
            check=True,
        )
    done = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout


def require_chromium() -> None:
    """Skip on a machine without Chromium, but fail where it is required: CI (.ci/run) sets
    ORTUNE_REQUIRE_CHROMIUM=1, and a skip there would let a report that renders nothing pass."""
    if CHROMIUM is None:
        if os.environ.get("ORTUNE_REQUIRE_CHROMIUM") == "1":
            pytest.fail(
                "chromium is not installed but ORTUNE_REQUIRE_CHROMIUM=1: install it (apt-get install -y chromium)"
            )
        pytest.skip("chromium is not installed (apt-get install -y chromium): rendering not checked")


def test_without_chromium_ci_fails_where_a_developer_machine_skips(monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", None)
    monkeypatch.setenv("ORTUNE_REQUIRE_CHROMIUM", "1")
    with pytest.raises(pytest.fail.Exception, match="ORTUNE_REQUIRE_CHROMIUM=1"):
        require_chromium()
    monkeypatch.delenv("ORTUNE_REQUIRE_CHROMIUM")
    with pytest.raises(pytest.skip.Exception):
        require_chromium()


def check_report_renders(page: Path, scratch: Path) -> None:
    """Every Vega plot on the page drew its marks, every image is there, and nothing came from a network."""
    html = page.read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in html and not re.search(r"<script[^>]+src=\"?https?:", html)
    vega_divs = re.findall(r"vegaEmbed\('#([^']+)'", html)
    assert len(vega_divs) >= 2, "training loss and per-class F1"
    body = html[html.index("</head>") :]  # vega-embed's own code holds an <img> template
    images = re.findall(r"<img src=\"([^\"]+)\"", body)
    assert any("confusion_matrix" in src for src in images)
    for src in images:
        assert (page.parent / src).is_file(), src
    require_chromium()
    dom = render_dom(page, scratch)
    for div in vega_divs:
        start = dom.index(f'id="{div}"')
        following = dom[start : start + 20_000]
        assert re.search(r"<(canvas|svg)[^>]*class=\"marks\"", following), f"plot {div} did not render"


def test_report_renders_offline_in_headless_chromium(plots_project, tmp_path):
    root, env = plots_project
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    page = root / "dvc_plots" / "index.html"
    assert "Per-class F1" in page.read_text(encoding="utf-8")
    check_report_renders(page, tmp_path)


def test_report_without_plots_fails_with_one_line(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    env = dvc_env(tmp_path / "home")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: dvc plots show failed")
    assert done.stderr.count("\n") == 1
