"""Cost of Chapter 5's trigger mining relative to the bare forward pass.

On the chapter's corpus (500 windows of 64 tokens after an ``<|endoftext|>`` start token, 360 spread
over the Wikipedia subset and 140 over Austen's novels; SmolLM2-135M; batches of 20 windows), time
on the same batches:

- ``forward_s``: the bare decoder forward pass (``model.model``, no vocabulary head, no cache);
- ``mine_s``: ``ffn.mine_triggers`` — the same forward pass with a pre-hook on every ``down_proj``
  that feeds a streaming top-25 per (layer, memory) over all 30 x 1,536 memories.

``overhead_ratio = mine_s / forward_s`` (goal <= 1.5). Each is the median of ``--repeats``
alternating runs, since the CPU may be shared. Memory: the resident set is sampled every 10 ms
during mining, on all of the corpus (``--repeats`` runs, the largest growth kept) and then once on half
of it, and the growth above the level before each run is recorded. The goal is memory bounded by the
top-k buffers (``topk_buffers_gb``), not by the corpus: keeping every coefficient of the corpus would
take 30 x 1,536 x 32,000 x 4 bytes = 5.9 GB. In the committed result both growths are of the order of
the buffers and far below that, but they are not equal (the full-corpus one is about twice the
half-corpus one). The two figures are not a clean comparison (a maximum over runs against one run, and
RSS also counts the allocator's caches), so they do not show whether growth depends on corpus size; that
would take alternating half and full runs and comparing medians. Writes
``benchmarks/results/ffn.json``.

With ``--compare-threads``, also mining with 1 thread against ``common.free_cores()`` threads (what
the notebook uses under ``make book``), alternating, on the same windows: ``threads_speedup`` is the
ratio of the medians, and ``threads_identical`` says whether both give the same top-k buffers.

Usage: ``python benchmarks/ffn.py [--repeats 3] [--threads 1] [--compare-threads]``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from report import write_report

from helpers import common, ffn
from helpers.assets import austen_novels, smollm2, wikipedia_articles

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ffn.json"
N_WIKI, N_AUSTEN, LENGTH, BATCH, K = 360, 140, 64, 20, 25


def spread_passages(texts: list[str], n: int, chars: int = 600) -> list[str]:
    """n passages evenly spaced over the concatenated texts (as in nbs/05_ffn_memories.ipynb)."""
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in texts])])
    out = []
    for pos in np.linspace(0, offsets[-1] - 1, n, endpoint=False).astype(int):
        k = int(np.searchsorted(offsets, pos, side="right") - 1)
        text, at = texts[k], pos - offsets[k]
        at = min(at, max(0, len(text) - chars))
        at = text.find(" ", at) + 1 if at else 0
        out.append(text[at : at + chars])
    return out


def bare_forward(model, windows: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(windows), BATCH):
            model.model(input_ids=windows[s : s + BATCH], use_cache=False)
    return time.perf_counter() - start


def mine(model, windows: torch.Tensor) -> tuple[float, float]:
    """Seconds for mine_triggers, and the peak RSS growth (GB) above the level before it."""
    proc = psutil.Process()
    base, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    ffn.mine_triggers(model, windows, k=K, batch_size=BATCH)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return seconds, max(0, peak[0] - base) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the notebook's default)")
    parser.add_argument("--compare-threads", action="store_true", help="also 1 thread vs every free core")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = smollm2()
    wiki = [text for _, text in wikipedia_articles()]
    austen = list(austen_novels().values())
    windows = torch.cat(
        [
            ffn.token_windows(tokenizer, spread_passages(wiki, N_WIKI), length=LENGTH, per_text=1),
            ffn.token_windows(tokenizer, spread_passages(austen, N_AUSTEN), length=LENGTH, per_text=1),
        ]
    )
    n_tokens = windows.shape[0] * LENGTH  # scored positions (the start token is never a trigger)
    bare_forward(model, windows[:BATCH])  # warm-up
    runs = {"forward_s": [], "mine_s": []}
    growth_full = []
    for _ in range(args.repeats):
        runs["forward_s"].append(bare_forward(model, windows))
        seconds, growth = mine(model, windows)
        runs["mine_s"].append(seconds)
        growth_full.append(growth)
    _, growth_half = mine(model, windows[: len(windows) // 2])
    med = {k: statistics.median(v) for k, v in runs.items()}
    # working buffers of ffn.TopK: k + capacity columns of float32 coefficient + int32 window + int32 position
    capacity = ffn.TopK(1, 1, k=K).capacity
    buffers_gb = 30 * model.config.intermediate_size * (K + capacity) * (4 + 4 + 4) / 2**30
    result = {
        "corpus": f"{len(windows)} windows x {LENGTH} tokens ({N_WIKI} Wikipedia, {N_AUSTEN} Austen), SmolLM2-135M, "
        f"batches of {BATCH}, top-{K} per memory over 30 x {model.config.intermediate_size} memories",
        "tokens": n_tokens,
        **{k: round(v, 3) for k, v in med.items()},
        "overhead_ratio": round(med["mine_s"] / med["forward_s"], 3),
        "tokens_per_s_forward": round(n_tokens / med["forward_s"], 1),
        "tokens_per_s_mine": round(n_tokens / med["mine_s"], 1),
        "mining_rss_growth_gb_half_corpus": round(growth_half, 3),
        "mining_rss_growth_gb_full_corpus": round(max(growth_full), 3),
        "topk_buffers_gb": round(buffers_gb, 3),
        "goal_overhead_ratio": 1.5,
        "runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
    }
    if args.compare_threads:
        result.update(compare_threads(model, windows, args.repeats))
    write_report(result, RESULTS, threads=args.threads)


def compare_threads(model, windows: torch.Tensor, repeats: int) -> dict:
    """Mining with 1 thread vs ``common.free_cores()`` threads, alternating; same top-k buffers?"""
    many = common.free_cores()
    seconds, triggers = {1: [], many: []}, {}
    for _ in range(repeats):
        for n in (1, many):
            with common.torch_threads(n):
                start = time.perf_counter()
                triggers[n] = ffn.mine_triggers(model, windows, k=K, batch_size=BATCH)
                seconds[n].append(time.perf_counter() - start)
    same = all(torch.equal(getattr(triggers[1], f), getattr(triggers[many], f)) for f in ("coef", "doc", "pos"))
    return {
        "threads_compared": [1, many],
        "threads_mine_s": {str(n): round(statistics.median(v), 3) for n, v in seconds.items()},
        "threads_speedup": round(statistics.median(seconds[1]) / statistics.median(seconds[many]), 3),
        "threads_identical": same,
    }


if __name__ == "__main__":
    main()
