"""Cost of the book's hook layer (helpers/hooks.py) relative to the bare forward pass on MiniLM-L6.

On 100 Wikipedia sentences (``assets.wikipedia_sentences(100)``, batches of 25 padded to the longest
in the batch, 1 torch thread, ``torch.inference_mode``), time on the same batches:

- ``forward_s``: the bare ``BertModel`` forward pass;
- ``hidden_states_s``: the same with ``output_hidden_states=True`` (transformers' own recorder);
- ``capture_resid_post_s``: inside ``hooks.capture(model, "blocks.*.hook_resid_post")`` (6 sites);
- ``capture_all_s``: inside ``hooks.capture`` of every site (43 sites, attention patterns included);
- ``patch_head_s``: inside ``hooks.patch`` of one head of ``blocks.3.attn.hook_z`` at the first position.

Each ratio is ``median(method) / median(forward)`` over ``--repeats`` alternating runs (the CPU may be
shared). The goal is ``resid_post_ratio <= 1.2``. Writes ``benchmarks/results/hooks.json``.

Usage: ``python benchmarks/hooks.py [--repeats 7] [--threads 1]``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch
from report import bench_args, write_report

from helpers import hooks
from helpers.assets import minilm, wikipedia_sentences

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hooks.json"
N_SENTENCES, BATCH = 100, 25


def timed(model, batches: list[dict], context, **kwargs) -> float:
    """Seconds to run every batch through ``model`` inside a fresh ``context()``."""
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            with context():
                model(**batch, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    args = bench_args(__doc__, repeats=7)
    model, tokenizer = minilm()
    sentences = wikipedia_sentences(N_SENTENCES)
    batches = [
        dict(tokenizer(sentences[s : s + BATCH], padding=True, return_tensors="pt"))
        for s in range(0, N_SENTENCES, BATCH)
    ]
    z = hooks.run_with_cache(model, **batches[0], sites="blocks.3.attn.hook_z")[1]["blocks.3.attn.hook_z"]
    head_5 = z[:1, [0]][:, :, [5]]  # [1, 1, 1, d_head]: head 5 at the [CLS] position of one sentence
    methods = {
        "forward_s": (contextlib.nullcontext, {}),
        "hidden_states_s": (contextlib.nullcontext, {"output_hidden_states": True}),
        "capture_resid_post_s": (lambda: hooks.capture(model, "blocks.*.hook_resid_post"), {}),
        "capture_all_s": (lambda: hooks.capture(model, hooks.site_names(model)), {}),
        "patch_head_s": (lambda: hooks.patch(model, "blocks.3.attn.hook_z", head_5, heads=5, positions=0), {}),
    }
    for context, kwargs in methods.values():  # warm-up
        timed(model, batches[:1], context, **kwargs)
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, (context, kwargs) in methods.items():
            runs[name].append(timed(model, batches, context, **kwargs))
    med = {name: statistics.median(v) for name, v in runs.items()}
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    result = {
        "corpus": f"{N_SENTENCES} Wikipedia sentences ({tokens} tokens), MiniLM-L6 (eager), batches of {BATCH}",
        **{name: round(v, 4) for name, v in med.items()},
        "resid_post_ratio": round(med["capture_resid_post_s"] / med["forward_s"], 3),
        "hidden_states_ratio": round(med["hidden_states_s"] / med["forward_s"], 3),
        "capture_all_ratio": round(med["capture_all_s"] / med["forward_s"], 3),
        "patch_head_ratio": round(med["patch_head_s"] / med["forward_s"], 3),
        "goal_resid_post_ratio": 1.2,
        "sites_all": len(hooks.site_names(model)),
        "repeats": args.repeats,
        "runs": {name: [round(x, 4) for x in v] for name, v in runs.items()},
    }
    write_report(result, RESULTS, threads=args.threads)


if __name__ == "__main__":
    main()
