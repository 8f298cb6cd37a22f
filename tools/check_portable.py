"""Re-execute the notebooks under other thread counts and floating-point kernels, and report every
checked output and glued value that moved beyond the tolerance the notebook tests allow.

The rule is the tests' own (``tests/nbcheck.py``): numbers may move by one unit in the last digit
the book shows them with; counts, names and text must be identical. A value this check flags is a
content problem, not a test problem: the chapter shows more digits than the computation supports on
other machines, or an equality that holds on one machine only.

Configurations (each on an empty cache, so cached artefacts are rebuilt under it):

- ``threads-1``: one thread everywhere (torch, OpenMP, MKL, OpenBLAS), as under ``pytest -n``;
- ``threads-all``: every core, as ``make book`` runs the large batched steps;
- ``avx2``: every core, with torch's vectorised kernels limited to AVX2 (``ATEN_CPU_CAPABILITY``),
  MKL's code path limited to AVX2 and OpenBLAS forced to its Haswell kernels: the floating-point
  code paths of an older or smaller CPU.

Usage::

    python tools/check_portable.py                      # every notebook, every configuration
    python tools/check_portable.py nbs/13_*.ipynb --config threads-1 avx2
    python tools/check_portable.py --compare-only       # re-compare what the last run executed

Writes the executed notebooks under ``_build/portability/<config>/`` and a summary to
``benchmarks/results/portability.json``; exits 1 when a value moved beyond its tolerance.
About 15 minutes per configuration on 2 cores (``make check-portable`` runs all three).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import nbcheck  # noqa: E402

CONFIGS = {
    "threads-1": {"BOOK_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    "threads-all": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell"},
}
OUT_DIR = ROOT / "_build" / "portability"
REPORT = ROOT / "benchmarks" / "results" / "portability.json"
SANITIZE = nbcheck.sanitizer()


def execute(notebook: Path, config: str, cache: Path) -> tuple[Path, float, str]:
    """Execute one notebook under one configuration; returns (executed copy, seconds, error text)."""
    target = OUT_DIR / config
    target.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("BOOK_THREADS", "PYTEST_XDIST_WORKER")}
    env.update(CONFIGS[config], BOOK_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(notebook),
         "--output-dir", str(target), "--ExecutePreprocessor.timeout=900"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    error = "" if proc.returncode == 0 else proc.stderr[-3000:]
    return target / notebook.name, time.perf_counter() - start, error


def compare(committed_path: Path, fresh_path: Path) -> dict:
    """Every checked cell and glued value of a fresh execution against the committed notebook."""
    committed, fresh = nbcheck.load(committed_path), nbcheck.load(fresh_path)
    formats = nbcheck.glue_formats(committed)
    old_cells = [c for c in committed["cells"] if c["cell_type"] == "code"]
    new_cells = [c for c in fresh["cells"] if c["cell_type"] == "code"]
    problems, moved = [], {}
    for index, (old, new) in enumerate(zip(old_cells, new_cells, strict=True)):
        if nbcheck.is_checked(old):
            old_texts, new_texts = nbcheck.output_texts(old["outputs"]), nbcheck.output_texts(new["outputs"])
            if len(old_texts) != len(new_texts):
                problems.append(f"cell {index}: {len(old_texts)} committed outputs, {len(new_texts)} fresh")
            tolerance = nbcheck.cell_tolerance("".join(old["source"]))
            for a, b in zip(map(SANITIZE, old_texts), map(SANITIZE, new_texts), strict=False):
                problems += [f"cell {index}: {p}" for p in nbcheck.compare_text(a, b, tolerance)]
        old_glue, new_glue = nbcheck.glued_values(old["outputs"]), nbcheck.glued_values(new["outputs"])
        problems += [f"cell {index}: {p}" for p in nbcheck.compare_glue(old_glue, new_glue, formats)]
        for name, value in old_glue.items():
            tol = nbcheck.glue_tolerance(name, value, formats.get(name, []))
            other = new_glue.get(name)
            if tol is None or not isinstance(value, float) or not isinstance(other, int | float):
                continue
            units = tol.units(value, float(other))
            if units > 0:
                moved[name] = {"committed": value, "fresh": other, "units_of_tolerance": round(units, 3)
                               if math.isfinite(units) else "inf", "shown": formats.get(name)}
    return {"problems": problems, "moved": moved}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook of nbs/")
    parser.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--compare-only", action="store_true", help="compare the last executions again")
    args = parser.parse_args(argv)
    notebooks = [p.resolve() for p in args.notebooks] or sorted((ROOT / "nbs").glob("*.ipynb"))
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report.setdefault("configs", {})
    report["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    failed = False
    for config in args.config:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            cache.mkdir()
            ask = "from helpers import common; print(common.cache_dir('system'))"
            system = subprocess.run([sys.executable, "-c", ask], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout.strip()
            (cache / "system").symlink_to(system)  # unpacked Debian data: an install, not an artefact
            results = report["configs"].setdefault(config, {"env": CONFIGS[config], "notebooks": {}})
            for nb in notebooks:
                name = nb.name
                if args.compare_only:
                    fresh, seconds, error = OUT_DIR / config / name, None, ""
                else:
                    print(f"[check-portable] {config}: executing {name}", flush=True)
                    fresh, seconds, error = execute(nb, config, cache)
                entry = {"seconds": round(seconds, 1) if seconds else results["notebooks"].get(name, {}).get("seconds")}
                if error:
                    entry.update(problems=[f"execution failed: {error}"], moved={})
                else:
                    entry.update(compare(nb, fresh))
                results["notebooks"][name] = entry
                failed |= bool(entry["problems"])
                worst = max((m["units_of_tolerance"] for m in entry["moved"].values()
                             if m["units_of_tolerance"] != "inf"), default=0)
                print(f"[check-portable] {config} {name}: {len(entry['problems'])} beyond tolerance, "
                      f"{len(entry['moved'])} glued floats moved (largest {worst} units of tolerance)", flush=True)
                for problem in entry["problems"]:
                    print(f"    {problem}", flush=True)
                REPORT.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print("[check-portable] " + ("FAILED: values moved beyond tolerance (see above)" if failed else "OK"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
