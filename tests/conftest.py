"""Shared test set-up.

- No test may reach a model hub, so go offline before anything imports huggingface_hub (it reads
  these variables once, at import).
- Notebook tests (nbval, lax) compare checked cells and glued values with the rule of
  ``tests/nbcheck.py``: text identical, numbers within one unit of their last shown digit, counts and
  names identical. The same rule serves ``tools/check_portable.py``.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nbcheck  # noqa: E402

try:
    from nbval import plugin as _nbval
except ImportError:  # nbval missing: no notebook tests to adapt
    _nbval = None


def _flatten(cell, outputs, skip) -> dict[str, list]:
    """nbval's view of outputs: one list of sanitised values per key (MIME types flattened)."""
    flat: dict[str, list] = {}
    for out in _nbval.transform_streams_for_comparison(outputs):
        if nbcheck.SCRAPBOOK in out.get("metadata", {}):
            continue  # glued values are compared by _runtest with their own tolerance
        for key, value in out.items():
            if key in skip:
                continue
            items = value.items() if key == "data" else [(key, value)]
            for sub, val in items:
                if sub not in skip:
                    flat.setdefault(sub, []).append(cell.sanitize(val))
    return flat


def _compare_outputs(self, test, ref, skip_compare=None):
    """nbval's comparison, with numbers compared to one unit of their last printed digit."""
    skip = skip_compare or self.parent.skip_compare
    fresh, committed = _flatten(self, test, skip), _flatten(self, ref, skip)
    self.comparison_traceback = []
    if set(fresh) != set(committed):
        self.comparison_traceback.append(f"output kinds differ: committed {sorted(committed)}, fresh {sorted(fresh)}")
        return False
    for key, old_values in committed.items():
        new_values = fresh[key]
        if len(old_values) != len(new_values):
            self.comparison_traceback.append(f"{key}: {len(old_values)} committed outputs, {len(new_values)} fresh")
            return False
        for old, new in zip(old_values, new_values, strict=True):
            problems = (nbcheck.compare_text(old, new, nbcheck.cell_tolerance(self.cell.source))
                        if isinstance(old, str) and isinstance(new, str)
                        else ([] if old == new else [f"{old!r} -> {new!r}"]))
            if problems:
                self.comparison_traceback += [f"{key}: numbers allowed to move one unit in their last digit"]
                self.comparison_traceback += problems
                return False
    return True


_FORMATS: dict[str, dict] = {}


def _runtest(self):
    """Run the cell as nbval does, then compare its glued values with the committed ones."""
    _original_runtest(self)
    if self.cell.execution_count is None:
        return
    path = str(self.parent.path)
    if path not in _FORMATS:
        _FORMATS[path] = nbcheck.glue_formats(nbcheck.load(path))
    problems = nbcheck.compare_glue(nbcheck.glued_values(self.cell.outputs), nbcheck.glued_values(self.test_outputs),
                                    _FORMATS[path])
    if problems:
        self.raise_cell_error("Glued values moved beyond one unit of their last shown digit",
                              "\n".join(problems))


if _nbval is not None:
    _original_runtest = _nbval.IPyNbCell.runtest
    _nbval.IPyNbCell.compare_outputs = _compare_outputs
    _nbval.IPyNbCell.runtest = _runtest
