"""Cost of Chapter 6c's sparse dictionaries (helpers/dictionaries.py) on MiniLM-L6.

On 200 Wikipedia sentences (``assets.wikipedia_sentences(200)``, batches of 50, 1 torch thread):

- ``harvest_ratio``: ``dictionaries.harvest`` at ``blocks.2.hook_resid_post`` (capture, then stop the
  forward pass after block 2) over the bare full forward pass, median of ``--repeats`` alternating runs;
  a ratio below 1 means stopping early saves more than the hooks cost;
- ``train_tokens_per_s``: TopK SAE training throughput (1,536 latents, k = 32, batch 512, Adam) on the
  harvested tokens, one pass;
- ``encode_us_per_token``: encoding cost at inference (TopK, 1,536 latents), per token, batches of 4,096.

Writes ``benchmarks/results/dictionaries.json``.

Usage: ``python benchmarks/dictionaries.py [--repeats 5] [--threads 1]``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from report import bench_args, write_report

from helpers import dictionaries as D
from helpers.assets import minilm, wikipedia_sentences

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dictionaries.json"
N_SENTENCES, BATCH, SITE = 200, 50, "blocks.2.hook_resid_post"


def main() -> None:
    args = bench_args(__doc__, repeats=5)
    model, tokenizer = minilm()
    batches = D.batches_of(tokenizer, wikipedia_sentences(N_SENTENCES), batch_size=BATCH, max_length=64)

    def forward():
        with torch.inference_mode():
            for b in batches:
                model(**b)

    def harvest():
        return D.harvest(model, batches, site=SITE)

    forward(), harvest()                                   # warm-up
    runs = {"forward_s": [], "harvest_s": []}
    for _ in range(args.repeats):
        for name, fn in (("forward_s", forward), ("harvest_s", harvest)):
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    x = harvest()[SITE]                                    # [token, 384]
    t0 = time.perf_counter()
    sae, _ = D.train_sae(x, d_sae=1536, kind="topk", k=32, epochs=1, batch_size=512)
    train_s = time.perf_counter() - t0
    with torch.inference_mode():
        big = x.repeat(4, 1)[:4096 * 4]
        sae.encode(big[:4096])                             # warm-up
        t0 = time.perf_counter()
        for chunk in big.split(4096):
            sae.encode(chunk)
        encode_s = time.perf_counter() - t0
    result = {
        "corpus": f"{N_SENTENCES} Wikipedia sentences ({len(x)} tokens), MiniLM-L6, batches of {BATCH}",
        **{k: round(v, 4) for k, v in med.items()},
        "harvest_ratio": round(med["harvest_s"] / med["forward_s"], 3),
        "train_tokens_per_s": round(len(x) / train_s, 1),
        "encode_us_per_token": round(1e6 * encode_s / len(big), 2),
        "repeats": args.repeats,
        "runs": {k: [round(v, 4) for v in vs] for k, vs in runs.items()},
    }
    write_report(result, RESULTS, threads=args.threads)


if __name__ == "__main__":
    main()
