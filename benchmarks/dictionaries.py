"""Cost of Chapter 6c's sparse dictionaries (helpers/dictionaries.py) on MiniLM-L6 and SmolLM2-135M.

For each model, on a fixed slice of the book's corpora (MiniLM: 200 Wikipedia sentences, batches of 50, site
``blocks.2.hook_resid_post``; SmolLM2: 16 of the chapter's 128-token windows, batches of 8, site
``blocks.14.hook_resid_post``), under ``--threads`` torch threads:

- ``harvest_ratio``: ``dictionaries.harvest`` at the site (capture, then stop the forward pass after that
  block) over the bare full forward pass, median of ``--repeats`` alternating runs; below 1 means stopping
  early saves more than the hooks cost;
- ``train_tokens_per_s``: TopK SAE training throughput (the chapter's width: 1,536 latents for MiniLM, 2,304
  for SmolLM2; k = 32; batch 512; Adam) over 16,384 of the harvested tokens (repeated as needed), one pass;
- ``encode_us_per_token``: encoding cost at inference (TopK), per token, batches of 4,096.

Writes ``benchmarks/results/dictionaries.json``.

Usage: ``python benchmarks/dictionaries.py [--repeats 5] [--threads 2]``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from report import bench_args, write_report

from helpers import dictionaries as D
from helpers.assets import minilm, smollm2, wikipedia_sentences

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dictionaries.json"


def measure(model, batches, site: str, d_sae: int, repeats: int) -> dict:
    """Forward vs harvest (median of alternating runs), SAE training and encoding throughput on ``batches``."""
    def forward():
        with torch.inference_mode():
            for b in batches:
                model(**b)

    def harvest():
        return D.harvest(model, batches, site=site)

    forward(), harvest()                                   # warm-up
    runs = {"forward_s": [], "harvest_s": []}
    for _ in range(repeats):
        for name, fn in (("forward_s", forward), ("harvest_s", harvest)):
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    x = harvest()[site]                                    # [token, d]
    x_train = x.repeat(-(-16384 // len(x)), 1)[:16384]     # 32 Adam steps, whatever the slice's size
    t0 = time.perf_counter()
    sae, _ = D.train_sae(x_train, d_sae=d_sae, kind="topk", k=32, epochs=1, batch_size=512)
    train_s = time.perf_counter() - t0
    with torch.inference_mode():
        big = x.repeat(-(-4 * 4096 // len(x)), 1)[:4096 * 4]
        sae.encode(big[:4096])                             # warm-up
        t0 = time.perf_counter()
        for chunk in big.split(4096):
            sae.encode(chunk)
        encode_s = time.perf_counter() - t0
    return {"tokens": len(x), "site": site, "d_sae": d_sae, **{k: round(v, 4) for k, v in med.items()},
            "harvest_ratio": round(med["harvest_s"] / med["forward_s"], 3),
            "train_tokens_per_s": round(len(x_train) / train_s, 1),
            "encode_us_per_token": round(1e6 * encode_s / len(big), 2),
            "runs": {k: [round(v, 4) for v in vs] for k, vs in runs.items()}}


def main() -> None:
    args = bench_args(__doc__, repeats=5)
    result = {}
    model, tokenizer = minilm()
    batches = D.batches_of(tokenizer, wikipedia_sentences(200), batch_size=50, max_length=64)
    result["MiniLM-L6"] = {"corpus": "200 Wikipedia sentences, batches of 50",
                           **measure(model, batches, "blocks.2.hook_resid_post", 1536, args.repeats)}
    del model
    lm, lm_tok = smollm2()
    lm.requires_grad_(False)
    windows = D.smollm2_windows(lm_tok)[0][:16]
    batches = [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(8)]
    result["SmolLM2-135M"] = {"corpus": "16 of Chapter 6c's 128-token windows, batches of 8",
                              **measure(lm, batches, "blocks.14.hook_resid_post", 2304, args.repeats)}
    result["repeats"] = args.repeats
    write_report(result, RESULTS, threads=args.threads)


if __name__ == "__main__":
    main()
