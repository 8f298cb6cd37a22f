"""tools/execute_book.py: notebooks executed side by side land in the cache that jupyter-book build reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import execute_book  # noqa: E402


def _notebook(path: Path, code: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {path.stem}"), nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_toc_lists_every_notebook_in_the_books_order():
    listed = execute_book.toc_notebooks()
    assert set(listed) == set((ROOT / "nbs").glob("*.ipynb"))
    assert listed.index(ROOT / "nbs" / "02_sinr_embeddings.ipynb") < listed.index(
        ROOT / "nbs" / "03_interpretable_classifier.ipynb"
    )


def test_longest_first_orders_by_the_last_measured_times(tmp_path):
    timings = tmp_path / "book_build.json"
    timings.write_text(json.dumps({"book": {"executed_s": {"nbs/a.ipynb": 10.0, "nbs/b.ipynb": 90.0}}}))
    a, b, c = (ROOT / "nbs" / f"{n}.ipynb" for n in "abc")
    assert execute_book.longest_first([a, b, c], timings) == [c, b, a]  # never measured: first
    assert execute_book.longest_first([a, b], tmp_path / "missing.json") == [a, b]


def test_executed_notebooks_are_matched_by_the_cache_and_failures_are_not_cached(tmp_path, capsys):
    from jupyter_cache import get_cache

    code = "import os\nprint({}, os.environ['BOOK_THREADS'])"
    good = [_notebook(tmp_path / f"ok{i}.ipynb", code.format(i)) for i in range(2)]
    bad = _notebook(tmp_path / "bad.ipynb", "raise RuntimeError('this chapter is broken')")
    cache_path = tmp_path / "_build" / ".jupyter_cache"
    failed = execute_book.execute_into_cache([*good, bad], cache_path, jobs=2)
    assert failed == ["bad.ipynb"]
    assert "this chapter is broken" in capsys.readouterr().out
    cache = get_cache(cache_path)
    for i, path in enumerate(good):
        record = cache.match_cache_notebook(nbformat.read(path, as_version=4))  # what myst-nb's cache mode does
        _, merged = cache.merge_match_into_notebook(nbformat.read(path, as_version=4))
        assert merged.cells[1].outputs[0]["text"].split()[0] == str(i)
        assert record.data["execution_seconds"] > 0
    with pytest.raises(KeyError):
        cache.match_cache_notebook(nbformat.read(bad, as_version=4))
    assert execute_book.execute_into_cache(good, cache_path, jobs=2) == []  # nothing left to run


def test_bad_jobs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        execute_book.execute_into_cache([], tmp_path, jobs=0)
