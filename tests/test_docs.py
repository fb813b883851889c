"""README.md and docs/*.md stay true to the tree: every relative link reaches a file (and heading), every
`make <target>` they show is one `make help` lists, and every repo path they name in code exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text with code blocks and inline code blanked out (a `[x](y)` in code is not a link)."""
    return INLINE.sub("``", FENCE.sub("", text))


def code(text: str) -> list[str]:
    """Every fenced block and inline code span."""
    return [m.group(0) for m in FENCE.finditer(text)] + [m.group(0) for m in INLINE.finditer(FENCE.sub("", text))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lowercased, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
            if seen[slug]:
                seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_the_pages_exist():
    assert (REPO / "docs").is_dir() and len(PAGES) > 1


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_reaches_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(REPO)}")
    assert not broken, broken


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


@pytest.fixture(scope="module")
def make_targets() -> set[str]:
    done = subprocess.run(
        ["make", "--no-print-directory", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    return set(re.findall(r"^\s*make (\S+)", done.stdout, re.M))


def test_make_help_lists_the_targets(make_targets):
    assert {"setup", "test", "all", "help"} <= make_targets


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_make_target_shown_exists(page, make_targets):
    shown = {
        target
        for span in code(page.read_text(encoding="utf-8"))
        for target in re.findall(r"\bmake\s+([a-z][\w-]*)(?![\w=-])", span)
    }
    assert shown - make_targets == set(), f"{page_id(page)} shows targets `make help` does not list"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_repo_path_named_in_code_exists(page):
    """`scripts/x.py`, `conf/model/y.yaml`, `python bench/z.py`: the files and folders a reader is sent to."""
    named = set()
    for span in code(page.read_text(encoding="utf-8")):
        for path in re.findall(r"(?<![\w/.])((?:scripts|src|conf|tests|bench)/[\w./-]*\w/?)", span):
            named.add(path)
    # what runs create (bench/.cache/) is git-ignored and absent from a fresh clone: not checked
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *sorted(named)], cwd=REPO, capture_output=True, text=True, timeout=60
    ).stdout.split()
    missing = sorted(p for p in named - set(ignored) if not (REPO / p).exists())
    assert not missing, f"{page_id(page)} names paths that do not exist: {missing}"


# Where comments and notes send a reader: README "Section", or a page path (docs/x.md, bench/NOTES.md).
SECTION_POINTER = re.compile(r'README(?:\.md)?\s+"([^"\n]+)"')
PAGE_POINTER = re.compile(r"(?<![\w/.])((?:docs|bench)/[\w-]+\.md)")
POINTING = [
    *sorted((REPO / "conf").rglob("*.yaml")),
    *sorted((REPO / "src").rglob("*.py")),
    *sorted((REPO / "scripts").glob("*.py")),
    *sorted((REPO / "bench").rglob("*.py")),
    REPO / "Makefile",
    REPO / "dvc.yaml",
]


def test_every_section_and_page_a_comment_points_at_exists():
    """A conf/, code or Makefile comment naming README "Some section" or docs/page.md sends the reader
    somewhere that exists (conf/train/cpu.yaml once pointed at README sections that had moved)."""
    headings = {
        re.sub(r"\s*#*\s*$", "", m.group(1)).strip().lower()
        for m in re.finditer(r"(?m)^#{1,6}\s+(.*)$", FENCE.sub("", (REPO / "README.md").read_text(encoding="utf-8")))
    }
    broken = []
    for file in POINTING:
        text = file.read_text(encoding="utf-8")
        rel = file.relative_to(REPO)
        broken += [f'{rel}: README "{s}"' for s in SECTION_POINTER.findall(text) if s.strip().lower() not in headings]
        broken += [f"{rel}: {page}" for page in PAGE_POINTER.findall(text) if not (REPO / page).is_file()]
    assert not broken, f"comments point at sections or pages that do not exist: {broken}"


# `make bench`'s figures have one home, bench/results.json; bench/results.md and the README's block are
# rendered from it, and prose elsewhere may quote a figure only as results.md shows it (rounded).
BENCH_CLAUSE = re.compile(r"make bench|bench/results\.md")
TIMED = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s?(?:s|ms/token)\b")


def test_results_md_and_the_readme_block_are_what_results_json_renders():
    from ortune_bench import results as report  # bench/ortune_bench/ (pyproject's pytest pythonpath)

    recorded = report.load_results(REPO / "bench" / "results.json")
    assert (REPO / "bench" / "results.md").read_text(encoding="utf-8") == report.render_results(recorded)
    start, end = report.README_MARKERS
    block = (REPO / "README.md").read_text(encoding="utf-8").split(start, 1)[1].split(end, 1)[0]
    assert block == "\n" + report.render_results(recorded, compact=True)


def quoted_bench_figures(text: str) -> list[str]:
    """Times quoted in a clause (split at '. ', ';' and paragraph ends) that names `make bench` or
    bench/results.md as their source."""
    clauses = re.split(r"(?<=[.;])\s+|\n\s*\n", FENCE.sub("", text))
    return [figure for clause in clauses if BENCH_CLAUSE.search(clause) for figure in TIMED.findall(clause)]


def holds(source: str, figure: str) -> bool:
    """The source shows the figure at the quoted precision (353 s quotes results.md's 352.9 s)."""
    places = len(figure.partition(".")[2])
    return any(
        round(float(number), places) == float(figure) for number in re.findall(r"(?<![\w.])\d+(?:\.\d+)?", source)
    )


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_figures_quoted_from_make_bench_are_what_bench_results_md_shows(page):
    """docs/real-models.md once said 353 s where bench/NOTES.md had measured 340 s: a page that cites
    `make bench` for a time quotes the time the latest results hold, or links instead of quoting."""
    source = (REPO / "bench" / "results.md").read_text(encoding="utf-8")
    text = page.read_text(encoding="utf-8")
    if page.name == "README.md":  # the block between the markers is results.json's own rendering
        start, end = "<!-- bench:results:start -->", "<!-- bench:results:end -->"
        text = text.split(start, 1)[0] + text.split(end, 1)[1]
    stale = [figure for figure in quoted_bench_figures(text) if not holds(source, figure)]
    assert not stale, f"{page_id(page)} quotes make bench figures that bench/results.md does not show: {stale}"


def test_a_stale_bench_figure_is_caught():
    """The check itself: a time bench/results.md holds passes, one it does not hold is reported."""
    assert holds("| make all | 352.9 s |", "353") and holds("| make all | 352.9 s |", "352.9")
    assert not holds("| make all | 352.9 s |", "340")
    text = "Timed by `make bench`'s pipeline table: 340 s, eval 66 s. It was 386 s before."
    assert quoted_bench_figures(text) == ["340", "66"]


def library_modules() -> set[str]:
    """src/ortune's modules and packages, as docs name them (`settings/`, `data`)."""
    root = REPO / "src" / "ortune"
    modules = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    return modules | {f"{p.name}/" for p in root.iterdir() if p.is_dir() and not p.name.startswith("__")}


def test_the_stages_page_names_every_library_module():
    """docs/stages.md once said `config` held the schema after it moved to settings/, and listed `bench`
    as a library module: the list of modules is checked against src/ortune itself."""
    text = (REPO / "docs" / "stages.md").read_text(encoding="utf-8")
    listed = text.split("Shared code lives in `src/ortune/`", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([\w/]+)`", listed))
    missing = sorted(library_modules() - named)
    assert not missing, f"docs/stages.md does not say what these modules do: {missing}"
    unknown = sorted(n for n in named - library_modules() if re.fullmatch(r"[a-z_]+/?", n) and "/" not in n)
    assert not unknown, f"docs/stages.md names modules src/ortune does not have: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_ortune_module_a_page_names_exists(page):
    # ortune.json is the file build_onnx writes beside the model, not a module
    named = set(re.findall(r"\bortune\.(?!json\b)([a-z_]+)", page.read_text(encoding="utf-8")))
    missing = sorted(n for n in named if n not in library_modules() and f"{n}/" not in library_modules())
    assert not missing, f"{page_id(page)} names ortune modules that do not exist: {missing}"
