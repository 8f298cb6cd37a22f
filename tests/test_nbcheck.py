"""The notebook-checking rule (tests/nbcheck.py) and its use by nbval: numbers within one unit of their
last shown digit pass, anything else fails — on a generated notebook, through pytest itself."""

import json
import subprocess
import sys
from pathlib import Path

import nbcheck
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_printed_numbers_move_by_at_most_one_unit_of_their_last_digit():
    assert nbcheck.compare_text("acc 68.3 %", "acc 68.4 %") == []
    assert nbcheck.compare_text("acc 68.30", "acc 68.31") == []
    assert nbcheck.compare_text("acc 68.30", "acc 68.32")            # two units of 0.01
    assert nbcheck.compare_text("n = 25", "n = 26")                  # counts are exact
    assert nbcheck.compare_text("S+G  +0.0 [-1.1, +1.3]", "S+G  -0.0 [-1.1, +1.3]") == []
    assert nbcheck.compare_text("a  1.5\nbb 2.5", "a 1.5\nbb  2.5") == []   # columns may re-align
    assert nbcheck.compare_text("winner: SINr", "winner: SVD")       # words are exact


def test_glued_values_follow_the_format_the_prose_shows():
    formats = {"acc": [".3f"], "gain": ["+.1f", ".2f"], "n": [""], "head": [""], "err": [".1e"], "t_s": [".0f"]}
    old = {"acc": 0.8765, "gain": 1.23, "n": 25, "head": "L1·H3", "err": 3.7e-7, "t_s": 12.0, "hidden": 0.5}
    assert nbcheck.compare_glue(old, dict(old, acc=0.8774, gain=1.239, err=3.79e-7, t_s=99.0, hidden=9.0),
                                formats) == []
    assert nbcheck.compare_glue(old, dict(old, acc=0.8780), formats)   # 1.5 units of 0.001
    assert nbcheck.compare_glue(old, dict(old, gain=1.245), formats)   # the finer .2f counts
    assert nbcheck.compare_glue(old, dict(old, n=24), formats)
    assert nbcheck.compare_glue(old, dict(old, head="L1·H4"), formats)
    assert nbcheck.compare_glue(old, {k: v for k, v in old.items() if k != "acc"}, formats)
    assert nbcheck.UNCHECKED.search("ch1_runtime_s") and not nbcheck.UNCHECKED.search("ch9_cost")


def _notebook(path: Path, committed_value: float, fresh_value: float, printed: str) -> None:
    """A two-cell notebook whose committed outputs say ``committed_value`` / ``printed``."""
    glue_out = {"output_type": "display_data", "metadata": {"scrapbook": {"name": "x", "mime_prefix":
                "application/papermill.record/"}}, "data": {"application/papermill.record/text/plain":
                repr(committed_value)}}  # fmt: skip
    cells = [
        {"cell_type": "code", "execution_count": 1, "metadata": {}, "outputs": [glue_out],
         "source": f"from myst_nb import glue\nglue('x', {fresh_value!r}, display=False)"},
        {"cell_type": "code", "execution_count": 2, "metadata": {},
         "source": f"# NBVAL_CHECK_OUTPUT\nprint({fresh_value:.2f})",
         "outputs": [{"output_type": "stream", "name": "stdout", "text": printed + "\n"}]},
        {"cell_type": "markdown", "metadata": {}, "source": "The value is {glue:text}`x:.2f`."},
    ]  # fmt: skip
    nb = {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                      "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


@pytest.mark.parametrize("fresh, printed, passes", [(0.504, "0.51", True), (0.530, "0.51", False),
                                                    (0.51, "0.53", False)])
def test_nbval_uses_the_rule(tmp_path, fresh, printed, passes):
    notebook = tmp_path / "check.ipynb"
    _notebook(notebook, 0.51, fresh, printed)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", "--nbval-current-env",
         "--rootdir", str(ROOT), "-c", str(ROOT / "pyproject.toml"), "--confcutdir", str(ROOT / "tests"),
         "-p", "conftest", str(notebook)],
        capture_output=True, text=True, cwd=ROOT / "tests", timeout=300,
    )  # fmt: skip
    assert (proc.returncode == 0) == passes, proc.stdout[-3000:] + proc.stderr[-2000:]
