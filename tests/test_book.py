"""The book's structure: table of contents, configuration, notebook hygiene, and an offline build."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))
SETUP_CELL = "from helpers import common\ncommon.set_seed(0)\ndevice = common.device()\ncommon.use_book_style()"
SECTIONS = ["Overview", "Setup", "Paper vs here", "Summary", "Exercises", "References"]


def _toc_files() -> list[str]:
    files = [TOC["root"]]
    for part in TOC.get("parts", []):
        for chapter in part["chapters"]:
            files.append(chapter["file"])
            files += [s["file"] for s in chapter.get("sections", [])]
    return files


def _resolve(entry: str) -> Path | None:
    for suffix in ("", ".md", ".ipynb"):
        if (ROOT / (entry + suffix)).is_file():
            return ROOT / (entry + suffix)
    return None


def test_every_toc_entry_exists():
    missing = [f for f in _toc_files() if _resolve(f) is None]
    assert not missing, f"_toc.yml names files that do not exist: {missing}"


def test_every_notebook_is_in_the_toc():
    listed = {f.removesuffix(".ipynb") for f in _toc_files()}
    orphans = [nb.relative_to(ROOT).with_suffix("").as_posix() for nb in NOTEBOOKS]
    orphans = [nb for nb in orphans if nb not in listed]
    assert not orphans, f"add these notebooks to _toc.yml: {orphans}"


def test_config_promises():
    assert CONFIG["only_build_toc_files"] is True
    assert CONFIG["execute"]["execute_notebooks"] == "cache"
    assert 0 < CONFIG["execute"]["timeout"] <= 600
    assert "sphinx_exercise" in CONFIG["sphinx"]["extra_extensions"]
    assert CONFIG["bibtex_bibfiles"] == ["book/references.bib"]
    mathjax = CONFIG["sphinx"]["config"]["mathjax_path"]
    assert not mathjax.startswith(("http:", "https:", "//")), "MathJax must be served from the book"
    assert all(Path(p).name != "_static" for p in CONFIG["sphinx"]["config"]["html_static_path"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_hygiene(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code and all(c.get("outputs") is not None for c in code)
    assert any(c["outputs"] for c in code), "execute the notebook and commit its outputs"
    errors = [o for c in code for o in c["outputs"] if o.get("output_type") == "error"]
    assert not errors, "committed outputs contain an error"
    counts = [c["execution_count"] for c in code if c.get("execution_count")]
    assert counts == sorted(counts) and len(counts) == len(code), "run the notebook top to bottom, clean kernel"
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"
    assert not any("execution" in c.get("metadata", {}) for c in nb["cells"]), "strip timing metadata"
    text = "".join("".join(c["source"]) for c in nb["cells"])
    assert not re.search(r"/(root|home|Users|work)/\w", text), "machine-specific path in a notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cached_files_are_read_from_the_path_returned(path):
    """cached_file may return a committed copy instead of the cache path: its result must be used."""
    nb = json.loads(path.read_text())
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    dropped = re.findall(r"^\s*common\.cached_file\(.*$", code, re.M)
    assert not dropped, f"use the path common.cached_file returns: {dropped}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_skeleton(path):
    nb = json.loads(path.read_text())
    markdown = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    headings = re.findall(r"^#{1,3} (.+)$", markdown, re.M)
    for section in SECTIONS:
        assert any(h.strip().lower().startswith(section.lower()) for h in headings), f"missing section {section}"
    assert re.match(r"\(ch:[\w-]+\)=", markdown), "first markdown cell must open with a (ch:...)= label"
    assert markdown.count("{exercise}") >= 3 and markdown.count("{solution}") >= 3
    first_code = next("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert first_code.strip().startswith(SETUP_CELL), "the first code cell is the book's Setup cell"


EXERCISE_LABEL = re.compile(r"^\*\((Easy|Medium|Hard|Open) · importance [123]/3 · \d+ min( · checked)?\.\)\*", re.M)
FENCED = re.compile(r"^(`{3,}).*?^\1\s*$", re.M | re.S)


def _blocks(markdown: str, kind: str) -> list[str]:
    """The bodies of the ````{kind} ... ```` directives (exercise or solution) of a chapter's markdown."""
    return re.findall(r"^````\{" + kind + r"\}[^\n]*\n(.*?)^````\s*$", markdown, re.M | re.S)


def _typed_numbers(text: str) -> list[str]:
    """Decimals and percentages in prose: the numbers that must come from a cell (glue), not be typed."""
    prose = re.sub(r"\{glue:[a-z]+\}`[^`]*`", "", FENCED.sub("", text))  # code and glued numbers are fine
    prose = re.sub(r"`[^`]*`", "", prose)  # so are inline code (parameters such as `quantile=0.95`)
    prose = re.sub(r"\$[^$]*\$", "", prose)  # and maths
    return re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])|\d+(?:\.\d+)? ?%", prose)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_exercises_are_labelled_checked_and_solutions_compute_their_numbers(path):
    """Every exercise opens with difficulty, importance and minutes; >= 2 are auto-checked (``check.``);
    no solution's prose types a number (decimals and percentages must be glued or computed by the reader)."""
    nb = json.loads(path.read_text())
    markdown = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    exercises, solutions = _blocks(markdown, "exercise"), _blocks(markdown, "solution")
    assert len(exercises) >= 3 and len(solutions) >= 3
    unlabelled = [e.split("\n")[2][:60] for e in exercises if not EXERCISE_LABEL.search(e)]
    assert not unlabelled, f"exercises without '*(Easy · importance 2/3 · 15 min[ · checked].)*': {unlabelled}"
    checked = [e for e in exercises if re.search(r"· checked\.\)\*", e)]
    assert len(checked) >= 2, f"{len(checked)} auto-checked exercises; the book asks for at least 2 per chapter"
    assert all("check." in e for e in checked), "a 'checked' exercise must call its check (check.<name>(...))"
    typed = {n for s in solutions for n in _typed_numbers(s)}
    assert not typed, f"numbers typed into solutions (glue them or let the reader compute them): {sorted(typed)}"


def test_typed_number_finder():
    text = ("It rises to 0.43 (12 % more) but `quantile=0.95` and $0.5$ and {glue:text}`x:.2f` and 3 seeds.\n"
            "```python\nx = 0.7\n```")
    assert _typed_numbers(text) == ["0.43", "12 %"]


def test_exercise_checks_exist():
    from helpers import check

    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        for name in set(re.findall(r"\bcheck\.([a-z_]+)\(", markdown)):
            assert callable(getattr(check, name, None)), f"{path.name} calls check.{name}, which helpers/check.py lacks"


def _build(out: Path, *, student: bool = False) -> Path:
    """Build the book from the committed outputs (no execution) into ``out``; return its HTML folder."""
    if not (ROOT / "book" / "static" / "mathjax" / "tex-chtml.js").exists():
        pytest.fail("local MathJax missing: run `make setup`")
    sys.path.insert(0, str(ROOT / "tools"))
    from book_config import write_config

    cfg = write_config(out, student=student, execute=False)
    jb = shutil.which("jupyter-book", path=str(Path(sys.executable).parent))
    proc = subprocess.run(
        [jb, "build", str(ROOT), "--config", str(cfg), "--path-output", str(out), "--warningiserror", "--keep-going"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:] + proc.stdout[-2000:]
    return out / "_build" / "html"


@pytest.fixture(scope="module")
def built_book(tmp_path_factory):
    """The book built from the committed outputs into a temporary folder."""
    return _build(tmp_path_factory.mktemp("book"))


@pytest.fixture(scope="module")
def student_book(tmp_path_factory):
    """The student edition (`make student`): the same build with every solution hidden."""
    return _build(tmp_path_factory.mktemp("student"), student=True)


def test_student_edition_hides_solutions_and_keeps_exercises_and_checks(built_book, student_book):
    for nb in NOTEBOOKS:
        full = (built_book / "nbs" / (nb.stem + ".html")).read_text()
        student = (student_book / "nbs" / (nb.stem + ".html")).read_text()
        assert 'class="solution' in full, f"{nb.name}: the full book shows no solution"
        assert 'class="solution' not in student, f"{nb.name}: the student edition shows a solution"
        assert student.count('class="exercise') == full.count('class="exercise'), f"{nb.name}: exercises lost"
        text = re.sub(r"<[^>]+>", "", student)  # code is highlighted token by token
        assert re.search(r"check\.[a-z_]+\(", text), f"{nb.name}: the checked exercises lost their check call"


def test_book_builds_with_local_mathjax_and_every_page(built_book):
    assert (built_book / "index.html").is_file()
    for entry in _toc_files():
        assert (built_book / (entry + ".html")).is_file(), f"page for {entry} missing"
    assert (built_book / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for page in built_book.rglob("*.html"):
        html = page.read_text()
        remote = re.findall(r"<script[^>]+src=\"(https?:)?//[^\"]+\"", html)
        assert not remote, f"{page.name} loads a script from the network: {remote}"


def test_chapter_pages_have_math_and_figures(built_book):
    for nb in NOTEBOOKS:
        html = (built_book / "nbs" / (nb.stem + ".html")).read_text()
        assert "mathjax/tex-chtml.js" in html
        assert re.search(r"\\\[|\\\(|class=\"math", html), f"{nb.name}: no math on the page"
        assert "<img" in html, f"{nb.name}: no figure on the page"


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _widget_view_ids(nb: dict) -> list[str]:
    """The model ids of the widgets a notebook's committed outputs display."""
    hidden = {"remove-output", "remove-cell"}  # the book drops these cells' outputs from the page
    return [
        o["data"][WIDGET_VIEW]["model_id"]
        for c in nb["cells"]
        if not hidden & set(c.get("metadata", {}).get("tags", []))
        for o in c.get("outputs", [])
        if WIDGET_VIEW in o.get("data", {})
    ]


def _widget_views(page: Path) -> int:
    """How many widget views a built page should show: those its notebook displayed."""
    nb = ROOT / "nbs" / (page.stem + ".ipynb")
    return len(_widget_view_ids(json.loads(nb.read_text()))) if page.parent.name == "nbs" and nb.exists() else 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_displayed_widgets_have_their_state_stored(path):
    """The book draws widgets from the state execution stored (tools/strip_notebook.py keeps it)."""
    nb = json.loads(path.read_text())
    state = nb["metadata"].get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    missing = [m for m in _widget_view_ids(nb) if m not in state]
    assert not missing, f"widget state missing for {missing}: execute with nbconvert and keep metadata.widgets"


def test_widget_javascript_is_served_by_the_book():
    scripts = CONFIG["sphinx"]["config"]["nb_ipywidgets_js"]
    assert scripts and not any(s.startswith(("http:", "https:", "//")) for s in scripts), scripts
    static = ROOT / CONFIG["sphinx"]["config"]["html_static_path"][0]
    missing = [s for s in scripts if not (static / s).is_file()]
    assert not missing, f"{missing} not in {static}: run `make setup`"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _offline_prefix() -> list[str]:
    """Only loopback inside a fresh network namespace (ARCHITECTURE.md), when the kernel lets us make one."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install chromium)")
@pytest.mark.parametrize("edition", ["built_book", "student_book"])
def test_every_page_renders_offline_in_a_browser(edition, request, tmp_path):
    """Open every page of the book in headless Chromium with no network.

    Fails on a console error or uncaught exception, a failed request, untypeset math, a broken image
    or a stored widget the widget manager did not draw; chapter pages must show typeset math, and
    every widget a notebook displayed must be on its page. A screenshot of each page is saved
    under _build/screenshots/ for a human look.
    """
    from cdp import Chromium

    built_book = request.getfixturevalue(edition)
    pages = sorted(p for p in built_book.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)
    # a bare redirect (index.html -> book/intro.html) has nothing to check; its target is checked itself
    pages = [p for p in pages if 'http-equiv="refresh"' not in p.read_text().lower()]
    assert len(pages) >= len(_toc_files())
    shots = ROOT / "_build" / ("screenshots" if edition == "built_book" else "screenshots-student")
    problems = {}
    with Chromium(_chromium(), tmp_path / "profile", prefix=_offline_prefix()) as browser:
        for page in pages:
            name = page.relative_to(built_book).as_posix()
            report = browser.open(page, screenshot=shots / name.replace("/", "__").replace(".html", ".png"))
            bad = {k: v for k, v in report.items() if v and k not in ("typeset_math", "widgets")}
            if name.startswith("nbs/") and not report["typeset_math"]:
                bad["typeset_math"] = 0
            if report["widgets"] != _widget_views(page):
                bad["widgets"] = f"{report['widgets']} of {_widget_views(page)} stored widget views on the page"
            if bad:
                problems[name] = bad
    assert not problems, f"pages with problems in a browser: {json.dumps(problems, indent=1)[:4000]}"


def _lab_port() -> int:
    return int(re.search(r"^LAB_PORT \?= (\d+)", (ROOT / "Makefile").read_text(), re.M).group(1))


def test_chapter_pages_launch_in_local_jupyterlab(built_book, tmp_path):
    """Each chapter's launch button opens its notebook in the JupyterLab that `make lab` starts.

    The links point at ``make lab``'s port; a JupyterLab started here the way ``make lab`` starts it
    (on a free port instead) must serve every one of them.
    """
    import socket
    import urllib.request

    base = CONFIG["sphinx"]["config"]["book_launch_url"]
    assert base == f"http://localhost:{_lab_port()}/lab/tree/", "the launch URL and `make lab` disagree"
    links = {}
    for nb in NOTEBOOKS:
        html = (built_book / "nbs" / (nb.stem + ".html")).read_text()
        found = re.findall(r'href="(http://localhost:\d+/lab/tree/[^"]+)"', html)
        assert found == [base + f"nbs/{nb.name}"], f"{nb.name}: launch links {found}"
        links[nb.name] = found[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "book-test"
    lab = shutil.which("jupyter-lab", path=str(Path(sys.executable).parent))
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    proc = subprocess.Popen(
        [lab, "--no-browser", f"--ServerApp.root_dir={ROOT}", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", "--allow-root"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        for name, link in links.items():
            url = link.replace(f"localhost:{_lab_port()}", f"127.0.0.1:{port}")
            with urllib.request.urlopen(f"{url}?token={token}", timeout=20) as page:
                assert page.status == 200 and "jupyter" in page.read().decode().lower(), name
            path = link.removeprefix(base)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents/{path}?content=0&token={token}") as r:
                assert json.load(r)["type"] == "notebook", name
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_course_has_one_week_per_chapter_and_real_exercises():
    """book/course.md: one row per chapter of _toc.yml, in its order, citing exercises that exist."""
    course = (ROOT / "book" / "course.md").read_text()
    table = course[course.index("## Syllabus") : course.index("### A twelve-week variant")]
    weeks = re.findall(r"^\| (\d+) \| \{ref\}`(ch:[\w-]+)`", table, re.M)
    labels, exercises = {}, set()
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        labels[f"nbs/{path.stem}"] = re.match(r"\((ch:[\w-]+)\)=", markdown).group(1)
        exercises |= set(re.findall(r"^:label: (ex-[\w-]+)", markdown, re.M))
    toc_chapters = [labels[f] for f in _toc_files() if f in labels]
    assert [c for _, c in weeks] == toc_chapters, "one week per chapter, in the order of _toc.yml"
    assert [int(w) for w, _ in weeks] == list(range(1, len(toc_chapters) + 1))
    cited = set(re.findall(r"\{ref\}`(ex-[\w-]+)`", course))
    assert cited <= exercises, f"course.md cites exercises that do not exist: {sorted(cited - exercises)}"
