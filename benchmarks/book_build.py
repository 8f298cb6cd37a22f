"""Execute every notebook of the book and record its wall time and peak memory.

Two measurements, both in child processes while a sampler polls the resident memory of the child's
whole process tree (kernels included) every 50 ms:

* **Per notebook**, each alone in a fresh kernel: first with an empty cache (``BOOK_CACHE`` pointed
  at a new temporary directory that shares only the system data of ``make setup``, so every derived
  data set and trained artefact the notebook needs is rebuilt: what a reader who opens this chapter
  first waits), then with the cache that run filled (what a rerun costs).
* **The whole book** as ``make book`` builds it on a fresh machine: ``tools/execute_book.py`` runs the
  notebooks ``--jobs`` at a time (default 2, longest first) into an empty execution cache with an empty
  ``BOOK_CACHE`` (they share what they cache: the corpus tokenised for Chapter 2 is reused by Chapter 3),
  then ``jupyter-book build`` renders them. Its wall time is ``total_cold_s``; each notebook's execution
  time comes from jupyter-cache's records (with two at once they overlap, so they add up to more than the
  wall time). Then the
  cached rebuild: the site built again into an empty HTML folder from that execution cache
  (``cached_rebuild_s``: what a reader waits after editing prose) and once more with nothing changed
  (``noop_rebuild_s``).

Results go to ``benchmarks/results/book_build.json`` and a Markdown table between the ``bench``
markers of the README.

Budgets (developers' guide, issue 13): < 180 s and < 4 GB per notebook on 2 CPU cores, < 15 min for
the whole book cold, < 60 s for a cached rebuild.

Usage: ``python benchmarks/book_build.py [NOTEBOOK ...] [--no-book] [--only-book]``. Naming notebooks
re-measures only their rows (the rows of the other notebooks that still exist are kept, each with the
date it was measured); ``--no-book`` skips the whole-book build, ``--only-book`` does only it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
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
BUDGET_S, BUDGET_GB, BUDGET_BOOK_S, BUDGET_REBUILD_S = 180.0, 4.0, 900.0, 60.0

RUNNER = """
import sys, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": sys.argv[2]}}).execute()
"""


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    try:
        children = proc.children(recursive=True)
    except psutil.Error:  # the process has just exited
        children = []
    for p in [proc, *children]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_notebook(path: Path, cache: Path) -> dict:
    """Execute one notebook in a child process with ``BOOK_CACHE=cache``; return wall time and peak tree RSS."""
    run = measure([sys.executable, "-c", RUNNER, str(path), str(path.parent)], cache)
    run["within_budget"] = run["ok"] and run["wall_s"] < BUDGET_S and run["peak_rss_gb"] < BUDGET_GB
    return run


def measure(command: list[str], cache: Path) -> dict:
    """Run ``command`` with ``BOOK_CACHE=cache``; return its wall time, peak tree RSS and success."""
    start = time.perf_counter()
    env = dict(os.environ, BOOK_CACHE=str(cache))
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
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
        "error": None if child.returncode == 0 else err.decode()[-2000:],
    }


def new_cache(root: Path) -> Path:
    """An empty BOOK_CACHE that shares only the system data unpacked by `make setup` (an install)."""
    root.mkdir(parents=True)
    (root / "system").symlink_to(common.cache_dir("system"), target_is_directory=True)
    return root


def build_book(tmp: Path, jobs: int = 2) -> dict:
    """``make book`` on a fresh machine (``tools/execute_book.py`` then ``jupyter-book build``), then the
    cached and the no-op rebuilds (module docstring)."""
    from jupyter_cache import get_cache

    cache, out = new_cache(tmp / "book-cache"), tmp / "book"
    jb = str(Path(sys.executable).parent / "jupyter-book")
    execute = [sys.executable, str(ROOT / "tools" / "execute_book.py"), "--jobs", str(jobs), "--path-output", str(out)]
    build = [jb, "build", str(ROOT), "--path-output", str(out), "--warningiserror", "--keep-going"]
    command = ["bash", "-c", f"{shlex.join(execute)} && {shlex.join(build)}"]  # what `make book` runs
    cold = measure(command, cache)
    print(f"whole book (cold): {cold['wall_s']} s, {cold['peak_rss_gb']} GB, ok={cold['ok']}", flush=True)
    records = get_cache(out / "_build" / ".jupyter_cache").list_cache_records()
    executed = {
        Path(r.uri).relative_to(ROOT).as_posix(): round(r.data.get("execution_seconds", float("nan")), 1)
        for r in records
    }
    shutil.rmtree(out / "_build" / "html")
    cached = measure(command, cache)
    noop = measure(command, cache)
    print(f"cached rebuild: {cached['wall_s']} s; no-op rebuild: {noop['wall_s']} s", flush=True)
    return {
        "ok": cold["ok"] and cached["ok"] and noop["ok"],
        "error": cold["error"] or cached["error"] or noop["error"],
        "cold_s": cold["wall_s"],
        "peak_rss_gb": cold["peak_rss_gb"],
        "executed_s": executed,
        "cached_rebuild_s": cached["wall_s"],
        "noop_rebuild_s": noop["wall_s"],
    }


def render_table(rows: list[dict], book: dict | None, machine: dict) -> str:
    dates = sorted({r.get("date", machine["date"]) for r in rows} | ({book["date"]} if book else set()))
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    lines = [
        f"Measured {when} on {machine['cpus']} CPU cores ({machine['processor']}), "
        f"torch {machine['torch']}, `python benchmarks/book_build.py`. Alone: each notebook in a fresh kernel, "
        "cold (empty cache: derived data rebuilt, committed artefacts loaded after their hash check) "
        "then warm (rerun with that cache). "
        f"In the book: `make book` on an empty cache, as on a fresh machine: `tools/execute_book.py` runs the "
        f"notebooks {book['jobs'] if book and book.get('jobs') else 1} at a time (longest first; they share "
        "what they cache), then `jupyter-book build` renders them; execution times overlap.",
        "",
        "| notebook | alone, cold: wall (s) | alone, cold: peak RSS (GB) | alone, warm: wall (s) | "
        "alone, warm: peak RSS (GB) | in the book: execution (s) | within budget |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    executed = book["executed_s"] if book else {}
    for r in rows:
        cold, warm = r["cold"], r["warm"]
        ok = cold["within_budget"] and warm["within_budget"]
        mark = "yes" if ok else ("FAILED" if not (cold["ok"] and warm["ok"]) else "no")
        in_book = executed.get(r["notebook"])
        lines.append(
            f"| `{r['notebook']}` | {cold['wall_s']:.1f} | {cold['peak_rss_gb']:.2f} | "
            f"{warm['wall_s']:.1f} | {warm['peak_rss_gb']:.2f} | {'' if in_book is None else f'{in_book:.1f}'} "
            f"| {mark} |"
        )
    for name in sorted(set(executed) - {r["notebook"] for r in rows}):  # never measured alone
        lines.append(f"| `{name}` | | | | | {executed[name]:.1f} | |")
    peak = max(max(r["cold"]["peak_rss_gb"], r["warm"]["peak_rss_gb"]) for r in rows)
    if book:
        # the memory budget is per notebook; the whole book's peak holds JOBS kernels at once
        ok = book["ok"] and book["cold_s"] < BUDGET_BOOK_S
        lines.append(
            f"| **whole book**, `make book` cold (execution + HTML) | | | | | **{book['cold_s']:.1f}** "
            f"(peak {book['peak_rss_gb']:.2f} GB) | {'yes' if ok else 'no'} |"
        )
        ok = book["ok"] and book["cached_rebuild_s"] < BUDGET_REBUILD_S
        lines.append(
            f"| cached rebuild (new HTML from the execution cache) / nothing changed | | | | | "
            f"**{book['cached_rebuild_s']:.1f}** / {book['noop_rebuild_s']:.1f} | {'yes' if ok else 'no'} |"
        )
    lines.append(
        f"| sum of the notebooks alone | {sum(r['cold']['wall_s'] for r in rows):.1f} | {peak:.2f} | "
        f"{sum(r['warm']['wall_s'] for r in rows):.1f} | {peak:.2f} | | |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the README table")
    parser.add_argument("--no-book", action="store_true", help="skip the whole-book build")
    parser.add_argument("--only-book", action="store_true", help="only the whole-book build")
    parser.add_argument("--jobs", type=int, default=2, help="notebooks at once in the book build (make's JOBS)")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or sorted((ROOT / "nbs").glob("*.ipynb"))
    if args.only_book:
        paths = []
    elif not paths:
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
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else None
    rows, book = [], None
    with tempfile.TemporaryDirectory(prefix="book-bench-") as tmp:
        for p in paths:
            cache = new_cache(Path(tmp) / p.stem)
            runs = {"cold": run_notebook(p, cache), "warm": run_notebook(p, cache)}
            name = p.relative_to(ROOT).as_posix()
            for label, run in runs.items():
                print(f"{name} ({label}): {run['wall_s']} s, {run['peak_rss_gb']} GB, ok={run['ok']}", flush=True)
            rows.append({"notebook": name, "date": machine["date"], **runs})
        if not args.no_book:
            book = {"date": machine["date"], "jobs": args.jobs, **build_book(Path(tmp), args.jobs)}
    if old and (args.notebooks or args.only_book):
        measured = {r["notebook"] for r in rows}
        kept = [
            {"date": old["machine"]["date"], **r}
            for r in old["notebooks"]
            if r["notebook"] not in measured and (ROOT / r["notebook"]).is_file()
        ]
        rows = sorted(kept + rows, key=lambda r: r["notebook"])
    if book is None and old:
        book = old.get("book")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": machine,
                "budget": {
                    "wall_s": BUDGET_S,
                    "peak_rss_gb": BUDGET_GB,
                    "total_cold_s": BUDGET_BOOK_S,
                    "cached_rebuild_s": BUDGET_REBUILD_S,
                },
                "total_cold_s": book["cold_s"] if book else None,
                "cached_rebuild_s": book["cached_rebuild_s"] if book else None,
                "sum_alone_cold_s": round(sum(r["cold"]["wall_s"] for r in rows), 1),
                "sum_alone_warm_s": round(sum(r["warm"]["wall_s"] for r in rows), 1),
                "peak_rss_gb": max(
                    [max(r["cold"]["peak_rss_gb"], r["warm"]["peak_rss_gb"]) for r in rows]
                    + ([book["peak_rss_gb"]] if book else [])
                ),
                "book": book,
                "notebooks": rows,
            },
            indent=2,
        )
        + "\n"
    )
    if not args.no_readme:
        table = render_table(rows, book, machine)
        text = README.read_text()
        new = re.sub(
            r"(<!-- bench:start -->\n).*?(\n<!-- bench:end -->)", lambda m: m[1] + table + m[2], text, flags=re.S
        )
        README.write_text(new)
    ok = all(r["cold"]["ok"] and r["warm"]["ok"] for r in rows) and (book is None or book["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
