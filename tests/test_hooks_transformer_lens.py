"""helpers.hooks and the causal chapter's lenses cross-checked against TransformerLens on SmolLM2-135M-Instruct.

TransformerLens 4.x has no ``HookedTransformer``; its ``TransformerBridge.boot_transformers`` wraps a loaded
HF model (``hf_model=``; config from that model, tokenizer passed in: no hub call, checked with sockets
disabled) and names the same sites. Two bridges:

- raw (default): the bridge runs the HF modules themselves, so every site must be *bitwise* equal to the
  book's. This checks the site definitions (which module, input or output, which reshape), not numerics.
- processed (``enable_compatibility_mode()``, HookedTransformer's load-time processing: RMSNorm weights
  folded into the next linear maps, unembedding centred): other weights and another float32 computation of
  the same activations, equal to rounding (measured: relative 2e-6 at most, abs up to 6e-3 where the residual
  stream reaches 2e4 at block 14).

Conventions compared like with like:
- token ids are passed to both (the book's tokenizer adds no BOS; TL's ``to_tokens`` would prepend one);
- ``attn.hook_z`` / ``hook_pattern`` / ``hook_q`` are per *query* head (9) in both; ``hook_k``/``hook_v`` have
  the 3 GQA key/value heads in both, before rotary embeddings (TL's ``hook_rot_q``/``hook_rot_k`` are after);
- the book's ``ln_final.hook_normalized`` is the output of the final RMSNorm (weight applied). TL's
  ``ln_final.hook_normalized`` is ``x / rms`` before the weight (HookedTransformer folds the weight into
  ``W_U``); the book's site equals TL's ``ln_final.hook_out`` = ``hook_normalized * w``;
- TL's ``logit_attrs`` uses ``W_U`` without the final norm's weight on an unprocessed bridge, so the stack
  is multiplied by that weight before it (the book's direct logit attribution includes it).
"""

import pytest
import torch
from transformer_lens import TransformerBridge
from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens

from helpers import assets, causal, common, hooks

pytestmark = pytest.mark.slow

NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # only a label here: weights, config and tokenizer are passed in
LAYERS = (0, 14, 29)
BLOCK_SITES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_q", "attn.hook_k", "attn.hook_v",
               "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "mlp.hook_post", "hook_mlp_out")
SITES = ["hook_embed", "ln_final.hook_normalized", *(f"blocks.{l}.{s}" for l in LAYERS for s in BLOCK_SITES)]
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
PROMPTS = (CLEAN, "The capital of France is")
HEAD = (23, 3)  # the head whose clean z moves the corrupted logit difference most (+6.4 of a 11.6 gap)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with common.torch_threads(1), torch.no_grad():
        yield


@pytest.fixture(scope="module")
def book():
    return assets.smollm2(attn_implementation="eager")


def _bridge(tokenizer, processed: bool):
    hf_model, _ = assets.smollm2(attn_implementation="eager")  # its own copy: the bridge wraps its modules
    bridge = TransformerBridge.boot_transformers(NAME, hf_model=hf_model, tokenizer=tokenizer, device="cpu")
    if processed:
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


@pytest.fixture(scope="module")
def raw(book):
    return _bridge(book[1], processed=False)


@pytest.fixture(scope="module")
def processed(book):
    return _bridge(book[1], processed=True)


def ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer([text], return_tensors="pt").input_ids


def test_sites_and_logits_equal_transformer_lens_bridge_bitwise(book, raw):
    model, tokenizer = book
    for text in PROMPTS:
        x = ids(tokenizer, text)
        assert x[0, 0] != tokenizer.bos_token_id  # same ids to both, no BOS
        out, cache = hooks.run_with_cache(model, x, sites=SITES)
        tl_logits, tl_cache = raw.run_with_cache(x)
        for site in SITES:
            tl_site = "ln_final.hook_out" if site == "ln_final.hook_normalized" else site
            torch.testing.assert_close(cache[site], tl_cache[tl_site], atol=0, rtol=0, msg=site)  # measured: 0
        torch.testing.assert_close(out.logits, tl_logits, atol=0, rtol=0)
        # TL's own ln_final.hook_normalized is x / rms before the RMSNorm weight
        weight = model.model.norm.weight
        torch.testing.assert_close(cache["ln_final.hook_normalized"], tl_cache["ln_final.hook_normalized"] * weight)


def test_sites_match_transformer_lens_processed_weights(book, processed):
    model, tokenizer = book
    for text in PROMPTS:
        x = ids(tokenizer, text)
        out, cache = hooks.run_with_cache(model, x, sites=SITES)
        tl_logits, tl_cache = processed.run_with_cache(x)
        for site in SITES[2:] + ["hook_embed"]:
            a, b = cache[site], tl_cache[site]
            assert a.shape == b.shape, site
            rel = ((a - b).abs().max() / a.abs().max()).item()
            assert rel < 2e-5, (site, rel)  # measured: at most 2e-6
        # centre_unembed shifts each position's logits by a constant: compare log-probabilities
        err = (out.logits.log_softmax(-1) - tl_logits.log_softmax(-1)).abs().max().item()
        assert err < 2e-4, err  # measured: 4e-5


@pytest.mark.parametrize("which", ["raw", "processed"])
def test_head_patch_matches_transformer_lens_run_with_hooks(book, which, request):
    model, tokenizer = book
    bridge = request.getfixturevalue(which)
    clean, corrupted = ids(tokenizer, CLEAN), ids(tokenizer, CORRUPTED)
    target, foil = tokenizer(" Mary").input_ids[0], tokenizer(" John").input_ids[0]
    layer, head = HEAD
    site = f"blocks.{layer}.attn.hook_z"

    def logit_diff(logits):
        return (logits[0, -1, target] - logits[0, -1, foil]).item()

    clean_z = hooks.run_with_cache(model, clean, sites=site)[1][site]
    with hooks.patch(model, site, clean_z, heads=head, positions=-1):
        book_diff = logit_diff(model(corrupted).logits)
    tl_clean_z = bridge.run_with_cache(clean)[1][site]

    def put_head(z, hook):  # TL: [batch, pos, head, d_head], like the book's hook_z
        z = z.clone()
        z[:, -1, head] = tl_clean_z[:, -1, head]
        return z

    tl_diff = logit_diff(bridge.run_with_hooks(corrupted, fwd_hooks=[(site, put_head)]))
    effect = book_diff - logit_diff(model(corrupted).logits)
    assert effect > 5  # measured: +6.40, so the comparison is not of two unpatched runs
    assert abs(book_diff - tl_diff) < (1e-6 if which == "raw" else 1e-3), (book_diff, tl_diff)  # measured 0, 2e-6


def test_logit_lens_and_direct_logit_attribution_match_transformer_lens(book, raw):
    model, tokenizer = book
    x = ids(tokenizer, CLEAN)
    target, foil = tokenizer(" Mary").input_ids[0], tokenizer(" John").input_ids[0]
    lens = causal.logit_lens(model, x)  # [layer, batch, pos, vocab], read after each block
    tl = tl_logit_lens(raw, x, positions=None)  # stack: 0_pre ... 29_pre, final_post
    assert tl.labels[0] == "0_pre" and tl.labels[-1] == "final_post"
    # measured 0 on the machine that wrote this test, 2.2e-5 on 88 of 20M logits on an AVX-512 one
    torch.testing.assert_close(lens, tl.readout.values[1:], atol=1e-4, rtol=1e-4)

    dla = causal.direct_logit_attribution(model, x, target=target, foil=foil)
    _, cache = raw.run_with_cache(x)
    weight = model.model.norm.weight  # not folded into W_U on a raw bridge (see the module docstring)
    tokens, foils = torch.tensor([target]), torch.tensor([foil])
    heads = cache.stack_head_results(layer=-1, pos_slice=-1)                            # [layer*head, batch, d]
    tl_heads = cache.logit_attrs(heads * weight, tokens=tokens, incorrect_tokens=foils, pos_slice=-1)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    torch.testing.assert_close(dla["heads"], tl_heads.reshape(n_layers, n_heads, 1).permute(2, 0, 1),
                               atol=1e-5, rtol=1e-4)  # measured: 5e-7
    parts, labels = cache.decompose_resid(layer=-1, mode="all", pos_slice=-1, return_labels=True)
    tl_parts = cache.logit_attrs(parts * weight, tokens=tokens, incorrect_tokens=foils, pos_slice=-1)
    mlps = torch.stack([tl_parts[labels.index(f"{l}_mlp_out")] for l in range(n_layers)], 1)
    torch.testing.assert_close(dla["mlps"], mlps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dla["embed"], tl_parts[labels.index("embed")], atol=1e-5, rtol=1e-4)
