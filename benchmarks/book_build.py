"""Execute every notebook of the book and record its wall time and peak memory.

Each notebook runs twice in a fresh kernel: first with an empty cache (``BOOK_CACHE`` pointed at a
new temporary directory that shares only the system data of ``make setup``, so every derived data
set and trained artefact is rebuilt: what a new reader waits), then with the cache that run filled
(what a rerun costs). Each run goes through nbclient in a child process while a sampler polls the
resident memory of the child's whole process tree (kernel included) every 50 ms. Results go to
``benchmarks/results/book_build.json`` and a
Markdown table between the ``bench`` markers of the README.

Budgets (developers' guide): < 180 s and < 4 GB per notebook on 2 CPU cores, < 15 min in all.

Usage: ``python benchmarks/book_build.py [NOTEBOOK ...]`` (default: every notebook in ``nbs/``). Naming
notebooks re-measures only those: their rows replace the old ones, and the rows of the other
notebooks that still exist are kept (each row records the date it was measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from helpers import common

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "book_build.json"
README = ROOT / "README.md"
BUDGET_S, BUDGET_GB = 180.0, 4.0

RUNNER = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
"""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_notebook(path: Path, cache: Path) -> dict:
    """Execute one notebook in a child process with ``BOOK_CACHE=cache``; return wall time and peak tree RSS."""
    start = time.perf_counter()
    env = dict(os.environ, BOOK_CACHE=str(cache))
    child = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(path), str(path.parent)], stderr=subprocess.PIPE, env=env
    )
    proc, peak, done = psutil.Process(child.pid), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = child.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    return {
        "ok": child.returncode == 0,
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(peak / 2**30, 2),
        "within_budget": child.returncode == 0 and wall < BUDGET_S and peak / 2**30 < BUDGET_GB,
        "error": None if child.returncode == 0 else err.decode()[-2000:],
    }


def render_table(rows: list[dict], machine: dict) -> str:
    dates = sorted({r.get("date", machine["date"]) for r in rows})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    lines = [
        f"Measured {when} on {machine['cpus']} CPU cores ({machine['processor']}), "
        f"torch {machine['torch']}, `python benchmarks/book_build.py`. Cold: empty cache (first run "
        "for a new reader, derived data and trained artefacts rebuilt); warm: rerun with that cache.",
        "",
        "| notebook | cold: wall (s) | cold: peak RSS (GB) | warm: wall (s) | warm: peak RSS (GB) | within budget |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        cold, warm = r["cold"], r["warm"]
        ok = cold["within_budget"] and warm["within_budget"]
        mark = "yes" if ok else ("FAILED" if not (cold["ok"] and warm["ok"]) else "no")
        lines.append(
            f"| `{r['notebook']}` | {cold['wall_s']:.1f} | {cold['peak_rss_gb']:.2f} | "
            f"{warm['wall_s']:.1f} | {warm['peak_rss_gb']:.2f} | {mark} |"
        )
    total_cold = sum(r["cold"]["wall_s"] for r in rows)
    total_warm = sum(r["warm"]["wall_s"] for r in rows)
    peak = max(max(r["cold"]["peak_rss_gb"], r["warm"]["peak_rss_gb"]) for r in rows)
    lines.append(
        f"| **whole book** | **{total_cold:.1f}** | {peak:.2f} | **{total_warm:.1f}** | {peak:.2f} | "
        f"{'yes' if total_cold < 900 else 'no'} |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted((ROOT / "nbs").glob("*.ipynb"))
    if not paths:
        print("no notebooks found in nbs/", file=sys.stderr)
        return 1
    for p in paths:
        if not p.is_file() or p.suffix != ".ipynb":
            print(f"not a notebook: {p}", file=sys.stderr)
            return 1
    import torch

    machine = {
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="book-cache-") as tmp:
        for p in paths:
            cache = Path(tmp) / p.stem
            # System data unpacked by `make setup` (Austen's novels) is an install, not a cache entry.
            cache.mkdir()
            (cache / "system").symlink_to(common.cache_dir("system"), target_is_directory=True)
            runs = {"cold": run_notebook(p, cache), "warm": run_notebook(p, cache)}
            name = p.relative_to(ROOT).as_posix()
            for label, run in runs.items():
                print(f"{name} ({label}): {run['wall_s']} s, {run['peak_rss_gb']} GB, ok={run['ok']}", flush=True)
            rows.append({"notebook": name, "date": machine["date"], **runs})
    if args.notebooks and RESULTS.exists():
        measured = {r["notebook"] for r in rows}
        old = json.loads(RESULTS.read_text())
        kept = [{"date": old["machine"]["date"], **r} for r in old["notebooks"]
                if r["notebook"] not in measured and (ROOT / r["notebook"]).is_file()]
        rows = sorted(kept + rows, key=lambda r: r["notebook"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine,
                "budget": {"wall_s": BUDGET_S, "peak_rss_gb": BUDGET_GB, "total_cold_s": 900.0},
                "total_cold_s": round(sum(r["cold"]["wall_s"] for r in rows), 1),
                "total_warm_s": round(sum(r["warm"]["wall_s"] for r in rows), 1),
                "peak_rss_gb": max(max(r["cold"]["peak_rss_gb"], r["warm"]["peak_rss_gb"]) for r in rows),
                "notebooks": rows,
            },
            indent=2,
        )
        + "\n"
    )
    if not args.no_readme:
        table = render_table(rows, machine)
        text = README.read_text()
        new = re.sub(
            r"(<!-- bench:start -->\n).*?(\n<!-- bench:end -->)", lambda m: m[1] + table + m[2], text, flags=re.S
        )
        README.write_text(new)
    return 0 if all(r["cold"]["ok"] and r["warm"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
