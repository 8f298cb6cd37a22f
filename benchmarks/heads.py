"""Cost of Chapter 4's per-head statistics relative to the bare forward pass.

On the chapter's corpus (1,000 Wikipedia sentences, MiniLM-L6, length-sorted batches of 64, at most
64 word pieces), time three things on the same batches:

- ``forward_s``: the bare forward pass (no attention returned), what any use of the model costs;
- ``stats_s``: ``heads.iter_attention`` (forward pass returning attention, padding masked) plus
  ``heads.HeadStatistics.update`` on every batch — the chapter's statistics over the corpus;
- ``stats_js_s``: the same with Jensen–Shannon divergences on 10 % of the query tokens (as in the
  notebook).

``overhead_ratio = stats_s / forward_s`` (goal <= 1.3). Each measurement is the median of
``--repeats`` alternating runs, since the CPU may be shared. Writes
``benchmarks/results/heads.json``.

Usage: ``python benchmarks/heads.py [--sentences 1000] [--repeats 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from report import write_report

from helpers import heads
from helpers.assets import minilm, wikipedia_sentences

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "heads.json"
BATCH, MAX_LENGTH = 64, 64


def bare_forward(model, tokenizer, sentences) -> float:
    """Seconds for the forward passes alone, on the same length-sorted batches as iter_attention."""
    enc = tokenizer(sentences, truncation=True, max_length=MAX_LENGTH)
    order = sorted(range(len(sentences)), key=lambda i: len(enc["input_ids"][i]))
    start = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), BATCH):
            ids = [enc["input_ids"][i] for i in order[s : s + BATCH]]
            batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return time.perf_counter() - start


def with_statistics(model, tokenizer, sentences, js_fraction: float) -> tuple[float, int]:
    """Seconds for attention extraction + streaming statistics; also the number of real tokens."""
    start = time.perf_counter()
    stats, n_tokens = heads.HeadStatistics(js_fraction=js_fraction), 0
    for _, maps in heads.iter_attention(model, tokenizer, sentences, batch_size=BATCH, max_length=MAX_LENGTH):
        stats.update(maps.attn, maps.tokens)
        n_tokens += int(maps.mask.sum())
    stats.result()
    return time.perf_counter() - start, n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the notebook uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = minilm()
    pool = wikipedia_sentences()
    sentences = pool[:: len(pool) // args.sentences][: args.sentences]
    bare_forward(model, tokenizer, sentences[:64])  # warm-up
    runs = {"forward_s": [], "stats_s": [], "stats_js_s": []}
    n_tokens = 0
    for _ in range(args.repeats):
        runs["forward_s"].append(bare_forward(model, tokenizer, sentences))
        t, n_tokens = with_statistics(model, tokenizer, sentences, 0.0)
        runs["stats_s"].append(t)
        runs["stats_js_s"].append(with_statistics(model, tokenizer, sentences, 0.1)[0])
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "corpus": f"{len(sentences)} Wikipedia sentences, MiniLM-L6, batches of {BATCH}, max {MAX_LENGTH} pieces",
        "tokens": n_tokens,
        **{k: round(v, 3) for k, v in med.items()},
        "overhead_ratio": round(med["stats_s"] / med["forward_s"], 3),
        "overhead_ratio_with_js": round(med["stats_js_s"] / med["forward_s"], 3),
        "tokens_per_s_forward": round(n_tokens / med["forward_s"], 1),
        "tokens_per_s_stats": round(n_tokens / med["stats_s"], 1),
        "goal_overhead_ratio": 1.3,
        "runs": {k: [round(x, 3) for x in v] for k, v in runs.items()},
    }
    write_report(result, RESULTS, threads=args.threads)


if __name__ == "__main__":
    main()
