"""Execute the book's notebooks into Jupyter Book's execution cache, several at a time.

``jupyter-book build`` (myst-nb's ``cache`` mode) executes a notebook whose code is not in
``<output>/_build/.jupyter_cache`` and stores it there, one notebook after another. Much of a chapter is
single-threaded Python (tokenising, small fits, plotting, loading models), so on a multi-core machine two
kernels side by side finish the book sooner than one kernel with every core. This script fills the same
cache the same way myst-nb does (same hash, same record: ``execution_seconds``), with ``--jobs`` kernels
at once, longest notebooks first; the ``jupyter-book build`` that follows finds every notebook cached.

Each kernel gets ``cores // jobs`` threads (``BOOK_THREADS`` and ``OMP_NUM_THREADS``, unless already set),
so two kernels on two cores do not fight over them. A notebook that fails is left out of the cache and
reported; ``jupyter-book build`` then executes it again and fails the build with its traceback. Peak memory
is that of ``--jobs`` chapters at once (about 7 GB with two; ``make book JOBS=1`` for a small machine).

Usage: ``python tools/execute_book.py [--jobs N] [--path-output DIR]`` (``make book`` runs it first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = ROOT / "benchmarks" / "results" / "book_build.json"  # last measured execution times: the order
TIMEOUT_S = 300  # _config.yml, execute.timeout


def _name(path: str | Path) -> str:
    path = Path(path)
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    """The notebooks listed in ``_toc.yml``, in the book's order."""
    files = re.findall(r"^\s*-\s*file:\s*(\S+)", (root / "_toc.yml").read_text(), flags=re.M)
    return [root / f"{f}.ipynb" for f in files if (root / f"{f}.ipynb").is_file()]


def longest_first(paths: list[Path], timings: Path = TIMINGS) -> list[Path]:
    """``paths`` ordered by their last measured execution time, longest first (unknown ones first of all)."""
    try:
        seconds = json.loads(timings.read_text())["book"]["executed_s"]
    except (OSError, KeyError, TypeError, ValueError):
        seconds = {}
    return sorted(paths, key=lambda p: -seconds.get(_name(p), float("inf")))


def _set_threads(threads: str) -> None:
    """In a worker: the thread count its kernels inherit (unless the caller set one)."""
    for name in ("BOOK_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, threads)


def _execute(path: str) -> tuple[str, object, float, str | None]:
    """Run one notebook in its folder (``run_in_temp: false``); return it executed, its time, an error."""
    import nbformat
    from jupyter_cache.executors.utils import single_nb_execution

    nb = nbformat.read(path, as_version=4)
    result = single_nb_execution(nb, cwd=str(Path(path).parent), timeout=TIMEOUT_S, allow_errors=False,
                                 meta_override=True)  # fmt: skip
    return path, nb, result.time, None if result.err is None else result.exc_string


def execute_into_cache(paths: list[Path], cache_path: Path, *, jobs: int = 2) -> list[str]:
    """Execute the notebooks of ``paths`` not yet in the jupyter-cache at ``cache_path``, ``jobs`` at a
    time in the given order, and store each one that succeeds as myst-nb would; return those that failed."""
    import nbformat
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    cache = get_cache(cache_path)
    todo = []
    for path in paths:
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError:
            todo.append(path)
    if not todo:
        print("[execute-book] every notebook is cached")
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = os.environ.get("BOOK_THREADS", str(max(1, cores // jobs)))
    print(f"[execute-book] {len(todo)} notebook(s), {jobs} at a time, {threads} thread(s) each")
    start, failed = time.perf_counter(), []
    with ProcessPoolExecutor(max_workers=jobs, initializer=_set_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(_execute, str(p)) for p in todo]
        for future in as_completed(futures):
            path, nb, seconds, error = future.result()
            if error is not None:
                failed.append(_name(path))
                print(f"[execute-book] {_name(path)} FAILED after {seconds:.0f} s:\n{error[-3000:]}", flush=True)
                continue
            stage = cache.add_nb_to_project(path)
            bundle = CacheBundleIn(nb, stage.uri, data={"execution_seconds": seconds})
            cache.cache_notebook_bundle(bundle, check_validity=False, overwrite=True)
            print(f"[execute-book] {_name(path)}: {seconds:.0f} s", flush=True)
    print(f"[execute-book] done in {time.perf_counter() - start:.0f} s" + (f"; failed: {failed}" if failed else ""))
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="kernels at once (default 2)")
    parser.add_argument("--path-output", type=Path, default=ROOT, help="as jupyter-book build's --path-output")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    cache_path = args.path_output / "_build" / ".jupyter_cache"
    return 1 if execute_into_cache(longest_first(toc_notebooks()), cache_path, jobs=args.jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
