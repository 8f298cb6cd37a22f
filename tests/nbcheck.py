"""Compare a notebook's fresh outputs with its committed ones, the same way in tests and in the
portability check (``tools/check_portable.py``).

Two kinds of output are checked:

- **Checked cells** (``# NBVAL_CHECK_OUTPUT``): the text must be identical once numbers are taken
  out; each number may differ from the committed one by at most **one unit in its last printed
  digit** (``68.3`` vs ``68.4`` passes, ``68.3`` vs ``68.5`` fails). Integers (counts, sizes) must be
  identical. Text is compared with runs of spaces folded, since a table's column can widen by one
  character when a number changes width. A cell may state a wider tolerance for its numbers with a
  ``# check-tolerance: X`` line, where the spread measured across machines calls for one.
- **Glued values** (``myst_nb.glue``): the numbers readers read in the prose. A glued number may move
  by at most one unit in the last digit the prose shows it with (``{glue:text}`name:.1f``` → 0.1;
  ``:.1%`` → 0.001; ``:.2e`` → one unit of the second decimal of the mantissa); when the prose shows
  it with several formats the finest counts. Integers must be identical; strings (head names, an
  interval glued as ``"0.59 [0.55, 0.63]"``) follow the checked-cell rule. Wall times, memory,
  speed ratios and hardware descriptions are not checked (:data:`UNCHECKED`), and neither are values
  the prose never shows.

The tolerances are not chosen by taste: ``tools/check_portable.py`` re-executes the notebooks under
other thread counts and floating-point kernels and reports every value that moves by more than this
rule allows; where one does, the chapter prints fewer digits or says the difference is noise.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

SCRAPBOOK = "scrapbook"
GLUE_MIME = "application/papermill.record/text/plain"

UNCHECKED = re.compile(
    r"(_s|_seconds|_tps|_gb|_speedup|_cost_ratio|_peer_ratio|_js_ratio|_cpu|_torch|_threads|_faith_cost)$"
    r"|_(ms|cost)_"
)
"""Glue names that hold wall times, memory, speed ratios or the hardware (Chapter 14's ``ms``/``cost``
axis and its correlation with faithfulness are timings too): machine-dependent by nature."""

_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w])")
_GLUE_REF = re.compile(r"\{glue(?::\w+)?\}`([^`:]+)(?::([^`]*))?`")
_SPEC = re.compile(r"^[<>^=]?[+\- ]?#?0?\d*[,_]?(?:\.(\d+))?([eEfFgG%])?$")


@dataclass(frozen=True)
class Tolerance:
    """How far a fresh number may move from the committed one: one unit ``abs`` of the shown digit (0 = exact)."""

    abs: float = 0.0
    shown: str = ""

    def allows(self, committed: float, fresh: float) -> bool:
        if math.isnan(committed) or math.isnan(fresh):
            return math.isnan(committed) and math.isnan(fresh)
        return self.units(committed, fresh) <= 1 + 1e-6

    def units(self, committed: float, fresh: float) -> float:
        """How many units of the last shown digit apart the two values are *as shown* (≤ 1 passes).

        Both values are rounded to the unit first, so 0.9100000262 and 0.9089999795 shown with ``.3f``
        (0.910 and 0.909) are one unit apart, not a hair more. inf for an exact check that moved.
        """
        bound = self.abs
        if not bound:
            return 0.0 if fresh == committed else math.inf
        return abs(round(fresh / bound) - round(committed / bound))


def spec_tolerance(spec: str, value: float) -> Tolerance:
    """One unit in the last digit a format spec prints ``value`` with.

    >>> spec_tolerance(".1f", 68.35).abs, spec_tolerance(".1%", 0.5).abs, spec_tolerance("+.2f", 1).abs
    (0.1, 0.001, 0.01)
    >>> round(spec_tolerance(".1e", 3.7e-7).abs, 12)
    1e-08
    """
    match = _SPEC.match(spec.strip())
    if not match:
        return Tolerance(shown=spec)
    digits, kind = match.group(1), (match.group(2) or "").lower()
    if kind in ("f", "") and digits is not None:
        return Tolerance(abs=10.0 ** -int(digits), shown=spec)
    if kind == "%":
        return Tolerance(abs=10.0 ** -(int(digits or 6) + 2), shown=spec)
    if kind in ("e", "g"):
        precision = int(digits if digits is not None else 6)
        exponent = math.floor(math.log10(abs(value))) if value else 0
        significant = precision if kind == "e" else max(precision - 1, 0)
        return Tolerance(abs=10.0 ** (exponent - significant), shown=spec)
    return Tolerance(shown=spec)  # no precision given: an integer-like display, compared exactly


def printed_tolerance(token: str) -> Tolerance:
    """One unit in the last printed digit of a number as it appears in text; integers are exact.

    >>> printed_tolerance("68.3").abs, printed_tolerance("-0.125").abs, printed_tolerance("25").abs
    (0.1, 0.001, 0.0)
    """
    mantissa, _, exponent = token.lower().partition("e")
    if "." not in mantissa and not exponent:
        return Tolerance(shown=token)
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return Tolerance(abs=10.0 ** (int(exponent or 0) - decimals), shown=token)


def cell_tolerance(source: str) -> float | None:
    r"""The tolerance a checked cell states for its printed numbers (``# check-tolerance: 1``), if any.

    A chapter states one when the spread it measured across machines (``tools/check_portable.py``)
    is larger than the last printed digit, e.g. accuracies printed in whole points that may move by one.

    >>> cell_tolerance("# NBVAL_CHECK_OUTPUT\n# check-tolerance: 1\nprint(table)")
    1.0
    """
    match = re.search(r"^\s*#\s*check-tolerance:\s*([0-9.]+)", source, re.M)
    return float(match.group(1)) if match else None


def compare_text(committed: str, fresh: str, tolerance: float | None = None) -> list[str]:
    """Differences between two printed texts under the rule above; [] when they match.

    ``tolerance`` (from :func:`cell_tolerance`) lets every number, integers included, move by that much.

    >>> compare_text("acc  68.3 %  n=25", "acc  68.4 %  n=25")
    []
    >>> compare_text("acc 68.3", "acc 68.5")
    ['68.3 -> 68.5 (allowed ±0.1)']
    >>> compare_text("n=25", "n=24")
    ['25 -> 24 (allowed ±0)']
    """
    if committed == fresh:
        return []
    ref_numbers, new_numbers = _NUMBER.findall(committed), _NUMBER.findall(fresh)
    ref_rest = " ".join(_NUMBER.sub("#", committed).split())
    new_rest = " ".join(_NUMBER.sub("#", fresh).split())
    if ref_rest != new_rest or len(ref_numbers) != len(new_numbers):
        return [f"text differs beyond its numbers:\n--- committed\n{committed}\n--- fresh\n{fresh}"]
    problems = []
    for ref, new in zip(ref_numbers, new_numbers, strict=True):
        tol = printed_tolerance(ref)
        if tolerance is not None:
            tol = Tolerance(abs=max(tol.abs, tolerance), shown=f"±{tolerance:g} stated by the cell")
            if abs(float(new) - float(ref)) <= tol.abs * (1 + 1e-6):
                continue
        elif tol.allows(float(ref), float(new)):
            continue
        problems.append(f"{ref} -> {new} (allowed ±{tol.abs:g})")
    return problems


def glue_formats(notebook: dict) -> dict[str, list[str]]:
    """Every format spec the notebook's prose shows each glued name with ('' for no spec)."""
    formats: dict[str, list[str]] = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        for name, spec in _GLUE_REF.findall("".join(cell["source"])):
            formats.setdefault(name, []).append(spec or "")
    return formats


def glued_values(outputs: list) -> dict[str, object]:
    """The values glued by one cell's outputs: name -> Python value (number or string)."""
    values = {}
    for out in outputs:
        meta = out.get("metadata", {}).get(SCRAPBOOK)
        text = out.get("data", {}).get(GLUE_MIME)
        if meta is None or text is None:
            continue
        values[meta["name"]] = parse_glued("".join(text) if isinstance(text, list) else text)
    return values


def parse_glued(text: str) -> object:
    """A glued value's ``text/plain`` repr as a Python value (``np.float64(1.5)`` -> 1.5)."""
    text = re.sub(r"^np\.\w+\((.*)\)$", r"\1", text.strip())
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def glue_tolerance(name: str, committed: object, specs: list[str]) -> Tolerance | None:
    """The tolerance of one glued value, or None when it is not checked (not shown, or machine-bound)."""
    if UNCHECKED.search(name) or not specs:
        return None
    if not isinstance(committed, float):
        return Tolerance(shown="exact")  # counts, sizes, names: identical on every machine
    shown = [t for t in (spec_tolerance(spec, committed) for spec in specs) if t.abs]
    return min(shown, key=lambda t: t.abs) if shown else Tolerance(shown="exact")


def compare_glue(committed: dict, fresh: dict, formats: dict[str, list[str]]) -> list[str]:
    """Differences between the committed and fresh glued values of one cell; [] when they match."""
    problems = []
    for name, old in committed.items():
        tol = glue_tolerance(name, old, formats.get(name, []))
        if tol is None:
            continue
        if name not in fresh:
            problems.append(f"{name}: glued in the committed notebook but not any more")
            continue
        new = fresh[name]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (old, new))
        if numeric and not tol.allows(float(old), float(new)):
            problems.append(f"{name}: {old!r} -> {new!r} (allowed ±{tol.abs:g}, "
                            f"shown as {', '.join(formats[name]) or 'is'})")
        elif isinstance(old, str) and isinstance(new, str):  # e.g. an Estimate as "0.59 [0.55, 0.63]"
            problems += [f"{name}: {p}" for p in compare_text(old, new)]
        elif not numeric and old != new:
            problems.append(f"{name}: {old!r} -> {new!r} (must be identical)")
    return problems


def is_checked(cell: dict) -> bool:
    """Whether nbval compares this cell's output (the ``# NBVAL_CHECK_OUTPUT`` marker)."""
    return bool(re.search(r"^\s*#\s*NBVAL_CHECK_OUTPUT", "".join(cell["source"]), re.M))


def output_texts(outputs: list) -> list[str]:
    """The printed text of a cell's outputs (streams joined, text/plain of results), glue left out."""
    texts, stream = [], {}
    for out in outputs:
        if out.get("output_type") == "stream":
            name = out.get("name", "stdout")
            stream[name] = stream.get(name, "") + ("".join(out["text"]) if isinstance(out["text"], list)
                                                   else out["text"])
        elif SCRAPBOOK not in out.get("metadata", {}) and "text/plain" in out.get("data", {}):
            text = out["data"]["text/plain"]
            texts.append("".join(text) if isinstance(text, list) else text)
    return [stream[k] for k in sorted(stream)] + texts


def sanitizer(path: str | Path = Path(__file__).with_name("nbval_sanitize.cfg")):  # noqa: B008
    """The nbval sanitisers of ``path`` as one function ``str -> str`` (applied to both sides)."""
    rules = re.findall(r"^regex: (.*)\nreplace: (.*)$", Path(path).read_text(), re.M)

    def sanitize(text: str) -> str:
        for pattern, replacement in rules:
            text = re.sub(pattern, replacement, text)
        return text

    return sanitize


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
