"""Cost of Chapter 6b's causal interventions on SmolLM2-135M (helpers/causal.py), one torch thread.

On the chapter's IOI task (the selection prompts of the first template, ``causal.ioi_prompts``), times:

- ``forward_s``: the bare forward pass of the corrupted prompts (median of ``--repeats``);
- ``hooked_forward_s``: the same inside ``hooks.patch`` of one head's output (a patch that writes) — the
  hook overhead, goal ``hook_ratio <= 1.2``;
- ``sweep_resid_s`` / ``sweep_heads_s``: a full activation-patching sweep, every block x position of the
  residual stream and every head (``causal.patching_sweep``), once;
- ``attribution_s``: attribution patching of the same sites (``causal.attribution_patching``), once;

and the rank agreement (Spearman, ``helpers.stats.spearman``) of attribution and exact patching over all
sites. Writes ``benchmarks/results/causal.json``.

Usage: ``python benchmarks/causal.py [--repeats 7] [--threads 1]``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from report import bench_args, write_report

from helpers import causal, hooks, stats
from helpers.assets import smollm2

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "causal.json"


def main() -> None:
    args = bench_args(__doc__, repeats=7)
    model, tokenizer = smollm2(attn_implementation="eager")
    model = model.eval().requires_grad_(False)
    p = causal.ioi_prompts(tokenizer, n_per_template=causal.RECIPE["ioi_per_template"])[0]
    rows = torch.arange(0, len(p.io), 2)                     # half of the first template's prompts
    clean, corrupted = p.clean[rows], p.corrupted[rows]
    metric = causal.logit_diff_metric(p.io[rows], p.s[rows])
    _, cache = hooks.run_with_cache(model, clean, sites="blocks.14.attn.hook_z")

    def forward() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(corrupted)
        return time.perf_counter() - start

    def hooked() -> float:
        with hooks.patch(model, "blocks.14.attn.hook_z", cache["blocks.14.attn.hook_z"], heads=3):
            return forward()

    forward(), hooked()                                       # warm-up
    runs = {"forward_s": [], "hooked_forward_s": []}
    for _ in range(args.repeats):
        runs["forward_s"].append(forward())
        runs["hooked_forward_s"].append(hooked())
    med = {k: statistics.median(v) for k, v in runs.items()}

    resid_sites, _ = causal.site_grid(model, "resid", n_pos=clean.shape[1])
    head_sites, _ = causal.site_grid(model, "heads")
    with torch.no_grad():
        base = metric(model(corrupted).logits)
    timings, exact = {}, {}
    for name, sites in (("resid", resid_sites), ("heads", head_sites)):
        start = time.perf_counter()
        exact[name] = (causal.patching_sweep(model, clean, corrupted, sites=sites, metric=metric) - base).mean(-1)
        timings[f"sweep_{name}_s"] = time.perf_counter() - start
    sites = resid_sites + head_sites
    start = time.perf_counter()
    approx = causal.attribution_patching(model, clean, corrupted, sites=sites, metric=metric).mean(-1)
    timings["attribution_s"] = time.perf_counter() - start
    exact_all = torch.cat([exact["resid"], exact["heads"]])
    sweep_s = timings["sweep_resid_s"] + timings["sweep_heads_s"]
    result = {
        "workload": f"IOI, {len(rows)} prompt pairs of {clean.shape[1]} tokens, SmolLM2-135M-Instruct (eager), "
                    f"{len(resid_sites)} residual-stream sites + {len(head_sites)} heads",
        **{k: round(v, 4) for k, v in med.items()},
        "hook_ratio": round(med["hooked_forward_s"] / med["forward_s"], 3),
        "goal_hook_ratio": 1.2,
        **{k: round(v, 2) for k, v in timings.items()},
        "sweep_s": round(sweep_s, 2),
        "attribution_over_exact_time": round(timings["attribution_s"] / sweep_s, 5),
        "spearman_all_sites": round(stats.spearman(exact_all.numpy(), approx.numpy()), 3),
        "spearman_heads": round(stats.spearman(exact["heads"].numpy(), approx[len(resid_sites):].numpy()), 3),
        "spearman_resid": round(stats.spearman(exact["resid"].numpy(), approx[: len(resid_sites)].numpy()), 3),
        "repeats": args.repeats,
        "runs": {k: [round(x, 4) for x in v] for k, v in runs.items()},
    }
    write_report(result, RESULTS, threads=args.threads)


if __name__ == "__main__":
    main()
