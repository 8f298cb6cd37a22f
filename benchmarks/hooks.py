"""Cost of the book's hook layer (helpers/hooks.py) relative to the bare forward pass, and of TransformerLens.

On 100 Wikipedia sentences (``assets.wikipedia_sentences(100)``, batches of 25 padded to the longest
in the batch, 1 torch thread, ``torch.inference_mode``), time on the same batches:

- ``forward_s``: the bare ``BertModel`` forward pass;
- ``hidden_states_s``: the same with ``output_hidden_states=True`` (transformers' own recorder);
- ``capture_resid_post_s``: inside ``hooks.capture(model, "blocks.*.hook_resid_post")`` (6 sites);
- ``capture_all_s``: inside ``hooks.capture`` of every site (61 on MiniLM-L6, attention patterns and q/k/v included);
- ``patch_head_s``: inside ``hooks.patch`` of one head of ``blocks.3.attn.hook_z`` at the first position.

Each ratio is ``median(method) / median(forward)`` over ``--repeats`` alternating runs (the CPU may be
shared). The goal is ``resid_post_ratio <= 1.2``.

Then the same against TransformerLens 4.3 (``TransformerBridge``, no weight processing, on its own copy of
the weights) on SmolLM2-135M-Instruct (eager), on 4 windows of 64 tokens of the same Wikipedia sentences
(``smollm2`` block of the JSON): the bare ``LlamaForCausalLM`` forward, ``hooks.capture`` of the 30
``hook_resid_post`` sites, TL's ``run_with_cache`` of the same 30 sites (``names_filter``), and TL's
forward without hooks; ratios to the bare forward. Writes ``benchmarks/results/hooks.json``.

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
from helpers.assets import minilm, smollm2, wikipedia_sentences

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hooks.json"
N_SENTENCES, BATCH = 100, 25
SMOLLM2_WINDOWS, SMOLLM2_LEN = 4, 64


def timed(model, batches: list[dict], context, **kwargs) -> float:
    """Seconds to run every batch through ``model`` inside a fresh ``context()``."""
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            with context():
                model(**batch, **kwargs)
    return time.perf_counter() - start


def median_runs(methods: dict, repeats: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``{name: median seconds}`` and all runs of ``{name: fn}``, after one warm-up, in alternating order."""
    for fn in methods.values():
        fn()
    runs: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in runs.items()}, runs


def smollm2_vs_transformer_lens(repeats: int) -> dict:
    """The book's hooks and TransformerLens's bridge on SmolLM2-135M-Instruct, same token windows."""
    from transformer_lens import TransformerBridge

    model, tokenizer = smollm2(attn_implementation="eager")
    tl_model, _ = smollm2(attn_implementation="eager")  # the bridge wraps its modules: a copy of its own
    bridge = TransformerBridge.boot_transformers(
        "HuggingFaceTB/SmolLM2-135M-Instruct", hf_model=tl_model, tokenizer=tokenizer, device="cpu")
    ids = tokenizer(" ".join(wikipedia_sentences(N_SENTENCES)), return_tensors="pt").input_ids[0]
    x = ids[: SMOLLM2_WINDOWS * SMOLLM2_LEN].reshape(SMOLLM2_WINDOWS, SMOLLM2_LEN)  # same ids to both, no BOS
    resid_post = "blocks.*.hook_resid_post"

    def book_capture():
        with hooks.capture(model, resid_post) as cache:
            model(x)
        assert len(cache) == model.config.num_hidden_layers

    def tl_cache():
        _, cache = bridge.run_with_cache(x, names_filter=lambda name: name.endswith(".hook_resid_post"))
        assert len(cache) == model.config.num_hidden_layers

    with torch.inference_mode():
        med, runs = median_runs({
            "forward_s": lambda: model(x),
            "capture_resid_post_s": book_capture,
            "tl_run_with_cache_resid_post_s": tl_cache,
            "tl_forward_s": lambda: bridge(x),
        }, repeats)
    return {
        "corpus": f"{SMOLLM2_WINDOWS} windows of {SMOLLM2_LEN} tokens, SmolLM2-135M-Instruct (eager), one batch",
        "transformer_lens": "4.3.0, TransformerBridge.boot_transformers(hf_model=...), no weight processing",
        **{name: round(v, 4) for name, v in med.items()},
        "resid_post_ratio": round(med["capture_resid_post_s"] / med["forward_s"], 3),
        "tl_resid_post_ratio": round(med["tl_run_with_cache_resid_post_s"] / med["forward_s"], 3),
        "tl_forward_ratio": round(med["tl_forward_s"] / med["forward_s"], 3),
        "runs": {name: [round(x, 4) for x in v] for name, v in runs.items()},
    }


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
        "smollm2": smollm2_vs_transformer_lens(args.repeats),
    }
    write_report(result, RESULTS, threads=args.threads)


if __name__ == "__main__":
    main()
