"""Shared plumbing for every chapter: seeds, device, cache directory with hash checks, plot style.

Kept deliberately thin: a chapter imports what it needs with ``from helpers import common``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

CACHE_ENV = "BOOK_CACHE"
"""Environment variable that overrides where downloaded/derived assets and trained models live."""

ARTEFACT_LOG_ENV = "BOOK_ARTEFACT_LOG"
"""When set, :func:`cached_file` appends every cache path it resolves with ``committed=True`` to this
file: ``tools/refresh_artefacts.sh`` commits exactly those."""

_DEFAULT_CACHE = Path.home() / ".cache" / "interpretable-transformers"


def set_seed(seed: int = 0) -> None:
    """Seed Python's ``random``, NumPy and PyTorch (CPU and CUDA) in one call.

    Args:
        seed: a non-negative integer.

    >>> set_seed(0); a = np.random.rand(); set_seed(0); a == np.random.rand()
    True
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device():
    """The device a chapter runs on (a ``torch.device``): CUDA when a GPU is visible, else CPU.

    Set ``BOOK_DEVICE=cpu`` to force the CPU even on a GPU machine (useful for exact reproductions).
    """
    import torch

    wanted = os.environ.get("BOOK_DEVICE", "").strip().lower()
    if wanted:
        if wanted.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"BOOK_DEVICE={wanted!r} but no CUDA device is visible; unset it or use 'cpu'")
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir(*parts: str) -> Path:
    """Root of the book's cache (``$BOOK_CACHE`` or ``~/.cache/interpretable-transformers``), created on use.

    Args:
        parts: optional sub-directories, e.g. ``cache_dir("models", "vit")``.

    Returns:
        the directory path (it exists on return).
    """
    root = Path(os.environ.get(CACHE_ENV) or _DEFAULT_CACHE).expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_hash(obj: object, length: int = 16) -> str:
    """Stable hex digest of a JSON-serialisable recipe (dict keys sorted), used to key caches.

    >>> content_hash({"b": 1, "a": [1, 2]}) == content_hash({"a": [1, 2], "b": 1})
    True
    """
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, timeout: float = 1800) -> Iterator[None]:
    """Hold an inter-process lock on ``path + '.lock'`` (several notebooks may build one artefact)."""
    from filelock import FileLock

    with FileLock(str(path) + ".lock", timeout=timeout):
        yield


def free_cores() -> int:
    """CPU cores a large batched computation may use: 1 when several notebooks or tests run at once.

    ``pytest -n`` (``make test``) runs notebooks side by side, and there a second torch thread per
    kernel only adds contention; ``make book`` runs them one at a time, so a big matrix product
    (Chapter 5's trigger mining) can use every core. Set ``BOOK_THREADS`` to override.
    """
    if os.environ.get("BOOK_THREADS"):
        value = os.environ["BOOK_THREADS"]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"BOOK_THREADS must be a positive integer, got {value!r}")
        return int(value)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch threads, then restore the previous number."""
    import torch

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tensor_digest(tensors) -> str:
    """SHA-256 (16 hex digits) of tensors' shapes and bytes, in order: names an artefact made from them."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cached_file(path: str | os.PathLike, build: Callable[[Path], None], *, committed: bool = False) -> Path:
    """Return ``path``, building it with ``build(path)`` unless a verified copy already exists.

    A sidecar ``<path>.sha256`` records the digest written at build time; on load the file is
    re-hashed and rebuilt when it is missing, truncated or altered. Concurrent callers are
    serialised with a file lock, so two notebooks never train the same artefact twice.

    Args:
        path: where the artefact lives (usually under :func:`cache_dir`, named by a content hash).
        build: a function that writes the artefact to the path it is given.
        committed: first look for a verified copy committed with the book (:func:`commit_cached`),
            at the same place under :data:`WEIGHTS_DIR` as ``path`` under :func:`cache_dir`; an
            altered or missing one is ignored, never trusted.

    Returns:
        the verified path.
    """
    path = Path(path)
    if committed and os.environ.get(ARTEFACT_LOG_ENV):  # tools/refresh_artefacts.sh: what to commit
        with open(os.environ[ARTEFACT_LOG_ENV], "a") as fh:
            fh.write(f"{path}\n")
    if committed and verified(copy := _committed_path(path)):
        return copy
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_name(path.name + ".sha256")
    with file_lock(path):
        if path.exists() and sidecar.exists() and sidecar.read_text().strip() == file_sha256(path):
            return path
        tmp = path.with_name(path.name + ".partial")
        build(tmp)
        if not tmp.exists():
            raise FileNotFoundError(f"build function did not write {tmp}; it must write to the path it is given")
        os.replace(tmp, path)
        sidecar.write_text(file_sha256(path) + "\n")
    return path


WEIGHTS_DIR = Path(__file__).with_name("weights")
"""Small trained artefacts committed beside the recipes that made them (ARCHITECTURE.md, "Artefacts"), each with a
``.sha256`` sidecar, at the same place as their rebuilt copy under :func:`cache_dir`; see :func:`cached_file`."""


def verified(path: str | os.PathLike) -> bool:
    """True when ``path`` exists and matches the SHA-256 recorded in its ``<path>.sha256`` sidecar."""
    path = Path(path)
    sidecar = path.with_name(path.name + ".sha256")
    return path.is_file() and sidecar.is_file() and sidecar.read_text().strip() == file_sha256(path)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``.

    >>> [round(warmup_cosine(s, 10, 2), 2) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    import math

    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _committed_path(path: Path) -> Path:
    """Where the committed copy of cache file ``path`` lives: its place under the cache, in WEIGHTS_DIR."""
    try:
        return WEIGHTS_DIR / Path(path).resolve().relative_to(cache_dir().resolve())
    except ValueError:  # not under the cache: by name only
        return WEIGHTS_DIR / Path(path).name


def commit_cached(path: str | os.PathLike) -> Path:
    """Copy a verified cache file (from :func:`cached_file`) and its sidecar into :data:`WEIGHTS_DIR`.

    The copy keeps the file's place under the cache (``models/ch9/sasrec-<hash>.pt``), whose name
    carries the content hash of the recipe that built it: a changed recipe looks for another name and
    rebuilds. ``python -m helpers.common commit PATH ...`` does the same from a shell.
    """
    import shutil

    path = Path(path)
    if not verified(path):
        raise ValueError(f"{path} is missing or does not match its .sha256 sidecar: rebuild it first")
    target = _committed_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for source in (path, path.with_name(path.name + ".sha256")):
        shutil.copyfile(source, target.with_name(source.name))
    return target


def power_of_ten_above(x: float) -> float:
    """The smallest power of ten at or above ``|x|`` (``1e-06`` for ``3.7e-07``; ``0.0`` for 0).

    How to quote a float32 rounding error, which moves with the CPU's kernels (``2.8e-07`` on one machine,
    ``4.0e-07`` on another), as a bound that does not.

    >>> power_of_ten_above(3.7e-07), power_of_ten_above(4.5e-07), power_of_ten_above(0.01)
    (1e-06, 1e-06, 0.01)
    """
    import math

    x = abs(float(x))
    if not math.isfinite(x):
        raise ValueError(f"need a finite number, got {x}")
    if x == 0:
        return 0.0
    exponent = math.ceil(math.log10(x))
    return float(f"1e{exponent - 1}") if x <= float(f"1e{exponent - 1}") else float(f"1e{exponent}")


def check_rerun(live, committed, *, what: str, atol: float = 0.1, min_same: float = 0.995) -> str:
    """Compare the logits ``[N, C]`` of a model retrained live with its committed copy's; say how close they are.

    Training for several epochs amplifies the last bits of the CPU's arithmetic (thread count, AVX2 or AVX-512
    kernels): a rerun on another machine moves logits by up to a few hundredths while a different recipe or
    input moves them by whole units and changes many predictions. So the check asks for both a small largest
    gap (``atol``) and the same predicted class on at least ``min_same`` of the rows.

    Raises:
        AssertionError: naming ``what``, when the rerun is further from the committed copy than that.
        ValueError: on tensors of different shapes, not 2-D, or with NaN.
    """
    import torch

    live, committed = torch.as_tensor(live).detach().float(), torch.as_tensor(committed).detach().float()
    if live.shape != committed.shape or live.ndim != 2 or len(live) == 0:
        raise ValueError(f"need two [N, C] logit tensors of the same shape, got {tuple(live.shape)} and "
                         f"{tuple(committed.shape)}")
    if torch.isnan(live).any() or torch.isnan(committed).any():
        raise ValueError("the logits hold NaN")
    gap = float((live - committed).abs().max())
    same = float((live.argmax(1) == committed.argmax(1)).float().mean())
    if not (gap < atol and same >= min_same):
        raise AssertionError(f"the committed {what} does not match a live run: logits differ by up to {gap:.2e} "
                             f"(allowed {atol}), {100 * same:.2f} % of the predictions agree (need {100 * min_same} %)")
    return (f"{what}: retrained live; its logits differ from the committed ones by at most {gap:.2f} and "
            f"{100 * same:.1f} % of its predicted classes are the same")


def print_table(rows, *, max_colwidth: int = 110, width: int = 300, index: bool = False) -> None:
    """Print a whole table, long cells cut at ``max_colwidth`` characters: the chapters' paper-vs-here tables.

    Args:
        rows: a ``pandas.DataFrame`` or a non-empty list of dicts (one per row, same keys).
        max_colwidth, width: pandas' ``display.max_colwidth`` and ``display.width`` while printing.
        index: print the index column too.

    >>> print_table([{"claim": "a", "here": "0.50 [0.40, 0.60]"}])
    claim              here
        a 0.50 [0.40, 0.60]
    """
    import pandas as pd

    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if table.empty:
        raise ValueError("rows is empty: nothing to print")
    with pd.option_context("display.max_colwidth", max_colwidth, "display.width", width):
        print(table.to_string(index=index))


def glue_figure(name: str, fig, *, dpi: int = 110) -> None:
    """Show a matplotlib figure in the notebook and glue it as a PNG under ``name``.

    The book then places it with ``{glue:figure}`name``` as a numbered, captioned figure. The figure
    is closed, so it is not drawn a second time.
    """
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image
    from myst_nb import glue

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    glue(name, Image(buffer.getvalue()))


def report_runtime(chapter: str, start: float) -> tuple[float, float]:
    """Glue a notebook's wall time since ``start`` and its peak memory, and print both.

    Glues ``{chapter}_runtime_s`` (seconds) and ``{chapter}_peak_gb`` (peak resident memory of the
    kernel, GB); the last cell of every chapter calls it with the ``time.perf_counter()`` taken in its
    first cell. Returns ``(seconds, gigabytes)``.
    """
    import resource
    import time

    from myst_nb import glue

    if not chapter or not isinstance(chapter, str):
        raise ValueError(f"chapter must be a glue prefix such as 'ch1', got {chapter!r}")
    elapsed = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    glue(f"{chapter}_runtime_s", elapsed, display=False)
    glue(f"{chapter}_peak_gb", peak_gb, display=False)
    print(f"notebook body: {elapsed:.0f} s, peak memory {peak_gb:.2f} GB")
    return elapsed, peak_gb


def use_book_style() -> None:
    """Apply the one matplotlib/seaborn style used by every figure in the book."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    mpl.rcParams.update(
        {
            "figure.figsize": (7.0, 4.0),
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "axes.titlesize": 12,
            "axes.titleweight": "bold",
            "image.cmap": "viridis",
        }
    )


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "commit":
        sys.exit("usage: python -m helpers.common commit CACHED_FILE [...]")
    for name in sys.argv[2:]:
        print(commit_cached(name))
