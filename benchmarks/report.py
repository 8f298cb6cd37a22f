"""The shared tail of the method benchmarks: add the run's metadata, write the JSON, print it."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path


def bench_args(doc: str, *, repeats: int) -> argparse.Namespace:
    """The method benchmarks' common command line (``--repeats``, ``--threads``); sets torch's threads."""
    import torch

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def write_report(result: dict, path: Path, *, threads: int) -> None:
    """Add peak RSS, thread count, machine and date to ``result``; write it to ``path`` as JSON and print it."""
    import torch

    result.update(
        peak_rss_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),   # Linux reports KiB
        threads=threads,
        machine=f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        date=time.strftime("%Y-%m-%d"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
