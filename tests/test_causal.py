"""Known-answer tests for helpers/causal.py on tiny Llama models and a hand-wired induction circuit."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import causal, hooks


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=100, tie_word_embeddings=True, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 100, (3, 7), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 100, (3,), generator=g)
    return clean, corrupted


METRIC = causal.logit_diff_metric(torch.tensor(5), torch.tensor(7))


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_patching_with_own_activation_changes_nothing(tiny, pair):
    clean, _ = pair
    sites = causal.site_grid(tiny, "heads")[0] + causal.site_grid(tiny, "resid", n_pos=7)[0][::5]
    out = causal.patching_sweep(tiny, clean, clean, sites=sites, metric=METRIC)
    with torch.no_grad():
        base = METRIC(tiny(clean).logits)
    torch.testing.assert_close(out, base.expand_as(out), rtol=0, atol=1e-5)


def test_patching_everything_reproduces_clean_run(tiny, pair):
    clean, corrupted = pair
    # the residual stream entering the last block, at every position, carries all of the clean run
    site = causal.Site("blocks.1.hook_resid_pre")
    out = causal.patching_sweep(tiny, clean, corrupted, sites=[site], metric=METRIC)[0]
    with torch.no_grad():
        torch.testing.assert_close(out, METRIC(tiny(clean).logits), atol=1e-5, rtol=0)
    # and patching the corrupted activation into the corrupted run reproduces the corrupted run
    same = causal.patching_sweep(tiny, corrupted, corrupted, sites=[site], metric=METRIC)[0]
    with torch.no_grad():
        torch.testing.assert_close(same, METRIC(tiny(corrupted).logits), atol=1e-5, rtol=0)


def test_dla_parts_sum_to_logit_difference(tiny, pair):
    clean, _ = pair
    parts = causal.direct_logit_attribution(tiny, clean, target=5, foil=7)
    total = parts["embed"] + parts["heads"].sum((1, 2)) + parts["mlps"].sum(1)
    assert parts["heads"].shape == (3, 2, 4) and parts["mlps"].shape == (3, 2)
    torch.testing.assert_close(total, parts["logit_diff"], atol=1e-5, rtol=1e-5)


def test_lens_at_last_layer_equals_logits(tiny, pair):
    clean, _ = pair
    lens = causal.logit_lens(tiny, clean)
    assert lens.shape == (2, 3, 7, 100)
    with torch.no_grad():
        torch.testing.assert_close(lens[-1], tiny(clean).logits, atol=1e-5, rtol=1e-5)
    stats = causal.lens_stats(tiny, clean)
    assert stats["kl"][-1].abs().max() < 1e-5 and (stats["rank"][-1] == 0).all()


def test_untrained_tuned_lens_is_logit_lens_and_training_lowers_kl(tiny, pair):
    clean, _ = pair
    lens = causal.TunedLens(2, 32, rank=4)
    with torch.no_grad():
        torch.testing.assert_close(lens(torch.ones(3, 32), 0), torch.ones(3, 32))
    ids = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(2))
    trained, losses = causal.train_tuned_lens(tiny, ids, rank=4, steps=30, batch_tokens=32, top_k=20, lr=1e-2)
    with torch.no_grad():
        before = causal.lens_stats(tiny, ids)["kl"][0].mean()
        after = causal.lens_stats(tiny, ids, lens=trained)["kl"][0].mean()
    assert after < before and losses[-1] < losses[0]


def test_attribution_patching_matches_exact_patching_for_linear_sites(tiny, pair):
    clean, corrupted = pair
    sites, _ = causal.site_grid(tiny, "heads")
    exact = causal.patching_sweep(tiny, clean, corrupted, sites=sites, metric=METRIC)
    approx = causal.attribution_patching(tiny, clean, corrupted, sites=sites, metric=METRIC)
    with torch.no_grad():
        base = METRIC(tiny(corrupted).logits)
    assert approx.shape == exact.shape
    # a random tiny model is close to linear at this scale: the two agree closely
    assert torch.corrcoef(torch.stack([approx.flatten(), (exact - base).flatten()]))[0, 1] > 0.9


def _toy_induction_patterns(tokens: torch.Tensor) -> torch.Tensor:
    """A two-layer attention-only model with hand-set weights: a previous-token head, then an induction head.

    Residual stream = [token one-hot (V) | position one-hot (P) | previous-token one-hot (V)]. Layer 0's head
    queries position p - 1 and copies that token into the third slot; layer 1's head queries keys whose
    previous token equals its own token (K-composition). Returns [layer, batch, head=1, q, k].
    """
    batch, n = tokens.shape
    vocab, scale = int(tokens.max()) + 1, 50.0
    causal_mask = torch.ones(n, n).tril().bool()
    tok = torch.nn.functional.one_hot(tokens, vocab).float()            # [batch, pos, V]
    pos = torch.eye(n).expand(batch, n, n)                              # [batch, pos, P]
    shift = torch.diag(torch.ones(n - 1), -1)                           # query p matches key p - 1
    scores0 = scale * pos @ shift @ pos.transpose(1, 2)
    scores0[:, 0, 0] = scale                                            # position 0 has no predecessor
    attn0 = scores0.masked_fill(~causal_mask, -1e9).softmax(-1)         # [batch, q, k]
    prev_tok = attn0 @ tok                                              # the copied slot
    scores1 = scale * tok @ prev_tok.transpose(1, 2)
    attn1 = scores1.masked_fill(~causal_mask, -1e9).softmax(-1)
    return torch.stack([attn0, attn1])[:, :, None]


def test_induction_score_is_one_on_hand_wired_induction_head():
    period = 10
    block = 1 + torch.randperm(40, generator=torch.Generator().manual_seed(0))[:period]
    bos = torch.tensor([0])  # a start token, so that no key's "previous token" is the first block token itself
    tokens = torch.stack([torch.cat([bos, block, block]), torch.cat([bos, block.flip(0), block.flip(0)])])
    scores = causal.induction_scores(_toy_induction_patterns(tokens), period=period, start=1)
    assert scores["previous"][0, 0] > 0.99 and scores["induction"][1, 0] > 0.99
    assert scores["induction"][0, 0] < 0.01 and scores["previous"][1, 0] < 0.2


def test_hooks_removed_after_an_exception(tiny, pair):
    clean, corrupted = pair

    def broken(logits):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        causal.patching_sweep(tiny, clean, corrupted, sites=causal.site_grid(tiny, "mlp")[0], metric=broken)
    assert _no_hooks(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        causal.attribution_patching(tiny, clean, corrupted, sites=causal.site_grid(tiny, "mlp")[0], metric=broken)
    assert _no_hooks(tiny)


def test_circuit_with_every_head_is_the_model(tiny, pair):
    clean, _ = pair
    every = [(l, h) for l in range(2) for h in range(4)]
    _, cache = hooks.run_with_cache(tiny, clean, sites="blocks.*.attn.hook_z")
    mean_z = torch.stack([cache[f"blocks.{l}.attn.hook_z"].mean(0) for l in range(2)])
    out = causal.circuit_logit_diff(tiny, clean, circuit=every, mean_z=mean_z, metric=METRIC)
    with torch.no_grad():
        torch.testing.assert_close(out, METRIC(tiny(clean).logits), atol=1e-5, rtol=0)
    empty = causal.circuit_logit_diff(tiny, clean, circuit=[], mean_z=mean_z, metric=METRIC)
    assert not torch.allclose(empty, out)


def test_expand_kv_heads_is_the_same_function(tiny, pair):
    clean, _ = pair
    wide = causal.expand_kv_heads(tiny)
    assert tiny.model.layers[0].self_attn.k_proj.out_features == 2 * 8 and wide.config.num_key_value_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(wide(clean).logits, tiny(clean).logits, rtol=0, atol=1e-5)
    _, narrow_v = hooks.run_with_cache(tiny, clean, sites="blocks.1.attn.hook_v")
    _, wide_v = hooks.run_with_cache(wide, clean, sites="blocks.1.attn.hook_v")
    # query heads 0 and 1 share key/value head 0; in the wide copy each has its own copy of it
    assert wide_v["blocks.1.attn.hook_v"].shape[2] == 4 and narrow_v["blocks.1.attn.hook_v"].shape[2] == 2
    torch.testing.assert_close(wide_v["blocks.1.attn.hook_v"][:, :, 1], narrow_v["blocks.1.attn.hook_v"][:, :, 0])


@pytest.fixture(scope="module")
def no_mlp(tiny):
    """The tiny model with every MLP switched off (down_proj = 0) and one key/value head per query head:
    then a head's paths are short enough to compute by hand."""
    model = causal.expand_kv_heads(tiny)
    torch.manual_seed(2)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1)             # tied to the unembedding: visible logit moves
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
            a = layer.self_attn
            for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
                proj.weight.normal_(0, 0.3)         # larger than the 0.02 init, so that paths differ visibly
    return model


def _head_write(model, layer: int, head: int, z: Tensor) -> Tensor:
    """What head ``head`` of block ``layer`` adds to the residual stream, from its z ``[batch, pos, d_head]``."""
    w_o = model.model.layers[layer].self_attn.o_proj.weight                     # [d_model, head * d_head]
    d_head = z.shape[-1]
    return z @ w_o[:, head * d_head : (head + 1) * d_head].T


def test_path_patching_known_answers(no_mlp, pair):
    orig, new = pair
    metric = METRIC
    sites = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post",
             "blocks.1.attn.hook_pattern"]
    _, o = hooks.run_with_cache(no_mlp, orig, sites=sites)
    _, n = hooks.run_with_cache(no_mlp, new, sites=sites)
    with torch.no_grad():
        base = metric(no_mlp(orig).logits)
    every = [(l, h) for l in range(2) for h in range(4)]
    # the same run as the source changes nothing, on every path
    for receivers in (None, [(1, 2)]):
        same = causal.path_patching(no_mlp, orig, orig, senders=every, metric=metric, receivers=receivers,
                                    receiver_input="v")
        torch.testing.assert_close(same, base.expand_as(same), rtol=0, atol=1e-5)
    # sender -> logits: with the later heads frozen and no MLPs, the final residual stream moves by exactly
    # what the sender writes differently
    h = 3
    delta = _head_write(no_mlp, 0, h, n["blocks.0.attn.hook_z"][:, :, h] - o["blocks.0.attn.hook_z"][:, :, h])
    want = metric(causal.unembed(no_mlp, o["blocks.1.hook_resid_post"] + delta))
    got = causal.path_patching(no_mlp, orig, new, senders=[(0, h)], metric=metric)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-2)
    # a head of the last block: path patching to the logits is activation patching of that head
    with torch.no_grad(), hooks.patch(no_mlp, "blocks.1.attn.hook_z", n["blocks.1.attn.hook_z"], heads=[2]):
        torch.testing.assert_close(causal.path_patching(no_mlp, orig, new, senders=[(1, 2)], metric=metric)[0],
                                   metric(no_mlp(orig).logits), rtol=0, atol=1e-5)
    # sender (0, h) -> the values of receiver (1, r): the receiver keeps its clean attention pattern and reads
    # values computed from the residual stream that the sender changed
    r = 1
    layer = no_mlp.model.layers[1]
    v = layer.self_attn.v_proj(layer.input_layernorm(o["blocks.1.hook_resid_pre"] + delta)).unflatten(-1, (4, 8))
    z_r = o["blocks.1.attn.hook_pattern"][:, r] @ v[:, :, r]                      # [batch, pos, d_head]
    moved = _head_write(no_mlp, 1, r, z_r - o["blocks.1.attn.hook_z"][:, :, r])
    want = metric(causal.unembed(no_mlp, o["blocks.1.hook_resid_post"] + moved))
    got = causal.path_patching(no_mlp, orig, new, senders=[(0, h), (1, 0)], metric=metric, receivers=[(1, r)],
                               receiver_input="v")
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], base, atol=1e-2)
    assert torch.equal(got[1], base)                           # a sender in the receiver's block cannot reach it
    assert _no_hooks(no_mlp)


def test_pick_heads():
    effect = torch.tensor([[0.0, -0.3, 0.1], [-0.06, 0.02, -0.04]])
    assert causal.pick_heads(effect, threshold=0.05, sign=-1) == [(0, 1), (1, 0)]
    assert causal.pick_heads(effect, threshold=0.05, sign=1) == [(0, 2)]
    with pytest.raises(ValueError, match="sign"):
        causal.pick_heads(effect, threshold=0.05, sign=0)


def test_bad_input_raises_clear_errors(tiny, pair):
    clean, corrupted = pair
    sites, _ = causal.site_grid(tiny, "mlp")
    with pytest.raises(ValueError, match="same"):
        causal.patching_sweep(tiny, clean, corrupted[:, :-1], sites=sites, metric=METRIC)
    with pytest.raises(ValueError, match="unknown site"):
        causal.patching_sweep(tiny, clean, corrupted, sites=[causal.Site("blocks.0.hook_nothing")], metric=METRIC)
    with pytest.raises(ValueError, match="out of range"):
        causal.patching_sweep(tiny, clean, corrupted, sites=[causal.Site("blocks.0.hook_resid_pre", 9)], metric=METRIC)
    with pytest.raises(ValueError, match="head"):
        causal.patching_sweep(tiny, clean, corrupted, sites=[causal.Site("blocks.0.hook_mlp_out", None, 1)],
                              metric=METRIC)
    with pytest.raises(ValueError, match="out of range"):
        causal.direct_logit_attribution(tiny, clean, target=1, foil=2, position=7)
    with pytest.raises(ValueError, match="vocabulary"):
        causal.logit_lens(tiny, torch.tensor([[1, 200]]))
    with pytest.raises(ValueError, match="period"):
        causal.induction_scores(torch.zeros(1, 1, 1, 5, 5), period=3)
    with pytest.raises(ValueError, match="resid"):
        causal.site_grid(tiny, "resid")
    with pytest.raises(ValueError, match="equal"):
        causal.normalised(1.0, clean=2.0, corrupted=2.0)
    with pytest.raises(ValueError, match="same"):
        causal.path_patching(tiny, clean, corrupted[:, :-1], senders=[(0, 0)], metric=METRIC)
    with pytest.raises(ValueError, match="out of range"):
        causal.path_patching(tiny, clean, corrupted, senders=[(2, 0)], metric=METRIC)
    with pytest.raises(ValueError, match="empty"):
        causal.path_patching(tiny, clean, corrupted, senders=[], metric=METRIC)
    with pytest.raises(ValueError, match="receiver_input"):
        causal.path_patching(tiny, clean, corrupted, senders=[(0, 0)], metric=METRIC, receivers=[(1, 0)],
                             receiver_input="z")
    with pytest.raises(ValueError, match="expand_kv_heads"):
        causal.path_patching(tiny, clean, corrupted, senders=[(0, 0)], metric=METRIC, receivers=[(1, 0)],
                             receiver_input="v")
    assert _no_hooks(tiny)


@pytest.mark.slow
def test_chapter_recipe_runs_short_on_a_tiny_model_with_the_real_tokenizer():
    """A short version of the recipe behind the committed artefact (helpers/weights/results/ch6b)."""
    from transformers import AutoTokenizer

    from helpers import assets

    tokenizer = AutoTokenizer.from_pretrained(assets._smollm2_dir())
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=32, vocab_size=len(tokenizer), tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    recipe = {**causal.RECIPE, "ioi_per_template": 4, "circuit_sizes": [2, 26], "random_circuits": 2,
              "lens_train_sentences": 8, "lens_eval_sentences": 2, "lens_eval_austen": 2, "lens_steps": 3}
    out = causal.chapter_results(model, tokenizer, recipe=recipe, progress=False)
    assert out["ioi_select_heads"].shape == (8, 6) and out["resid"].shape[0] == 2 * out["resid_shape"][1]
    assert out["tuned_wikipedia_kl"].shape[0] == 2 and out["report_random26"].shape == (2, 6)
    assert out["lens_losses"].shape == (3,) and torch.isfinite(out["heads_attr_s"] * out["report_full"]).all()


@pytest.mark.slow
def test_path_recipe_runs_short_on_a_tiny_model_with_the_real_tokenizer():
    """A short version of the path-patching search behind the committed artefact (helpers/weights/results/ch6b)."""
    from transformers import AutoTokenizer

    from helpers import assets

    tokenizer = AutoTokenizer.from_pretrained(assets._smollm2_dir())
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=3, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=32, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         initializer_range=0.5, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    recipe = {**causal.PATH_RECIPE, "ioi_per_template": 4, "random_circuits": 2, "threshold": 0.01}
    out = causal.path_results(model, tokenizer, recipe=recipe, progress=False)
    assert out["direct"].shape == (3, 4, 12) and out["to_sinh_v"].shape == (3, 4, 12)
    assert len(out["name_movers"]) + len(out["negative"]) > 0              # a random model has heads that matter
    assert out["report_random"].shape == (2, 6) and out["circuit"].shape[1] == 2
    assert torch.isfinite(out["report_circuit"]).all()


def test_causal_trace_known_answers(tiny, pair):
    ids = pair[0][:1]                                                    # [1, 7]
    target, subject, last = 11, [1, 2], ids.shape[1] - 1
    g = torch.Generator().manual_seed(0)
    noise = 3.0 * torch.randn(4, 2, 32, generator=g)
    out = causal.causal_trace(tiny, ids, subject=subject, target=target, noise=noise, positions=[2, last])
    with torch.no_grad():
        clean = float(tiny(ids).logits[0, -1].softmax(-1)[target])
    assert out["clean"] == pytest.approx(clean, abs=1e-6) and out["resid"].shape == (2, 2, 4)
    assert not torch.allclose(out["corrupted"], torch.full((4,), clean), atol=1e-4)
    # the residual stream after the last block at the last position carries the whole prediction
    torch.testing.assert_close(out["resid"][1, -1], torch.full((4,), clean), atol=1e-5, rtol=0)
    # one (kind, layer, position) by hand: noise the subject, restore the window's MLP outputs at position 2
    _, cache = hooks.run_with_cache(tiny, ids, sites="blocks.*.hook_mlp_out")
    layer, window = 1, 2
    blocks = range(max(0, layer - window // 2), min(2, layer + window - window // 2))

    def add(x):
        x = x.clone()
        x[:, subject] = x[:, subject] + noise
        return x

    patches = [hooks.patch(tiny, "hook_embed", fn=add)] + [
        hooks.patch(tiny, f"blocks.{j}.hook_mlp_out", cache[f"blocks.{j}.hook_mlp_out"], positions=[2]) for j in blocks]
    with torch.no_grad(), hooks.patches(patches):
        want = tiny(ids.expand(4, -1)).logits[:, -1].softmax(-1)[:, target]
    got = causal.causal_trace(tiny, ids, subject=subject, target=target, noise=noise, positions=[2], kinds=["mlp"],
                              window=window)["mlp"][0, layer]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # no noise: every run is the clean run
    calm = causal.causal_trace(tiny, ids, subject=subject, target=target, noise=torch.zeros(2, 2, 32), positions=[0])
    for kind in ("resid", "mlp", "attn"):
        torch.testing.assert_close(calm[kind], torch.full_like(calm[kind], clean), atol=1e-6, rtol=0)
    assert _no_hooks(tiny)
    with pytest.raises(ValueError, match="one prompt"):
        causal.causal_trace(tiny, pair[0], subject=subject, target=target, noise=noise, positions=[2])
    with pytest.raises(ValueError, match="noise must be"):
        causal.causal_trace(tiny, ids, subject=[1], target=target, noise=noise, positions=[2])
    with pytest.raises(ValueError, match="positions"):
        causal.causal_trace(tiny, ids, subject=subject, target=target, noise=noise, positions=[9])
    with pytest.raises(ValueError, match="kinds"):
        causal.causal_trace(tiny, ids, subject=subject, target=target, noise=noise, positions=[2], kinds=["z"])


def test_fact_prompts_mark_their_subject():
    from transformers import AutoTokenizer

    from helpers import assets

    tokenizer = AutoTokenizer.from_pretrained(assets._smollm2_dir())
    for prompt, answer in causal.FACTS:
        ids, subject = causal.fact_prompt(tokenizer, prompt)
        name = prompt.split("{")[1].split("}")[0]
        assert tokenizer.decode(ids[0, subject]).strip() == name, prompt
        assert subject == list(range(subject[0], subject[-1] + 1)) and subject[-1] < ids.shape[1] - 1
        assert answer.startswith(" ") and len(tokenizer(answer, add_special_tokens=False).input_ids) >= 1
