"""Tests for helpers.hooks on tiny seeded BERT and Llama models built from a config (no weights loaded)."""

import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from helpers import common, hooks

N_LAYERS, N_HEADS, D_HEAD = 2, 4, 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second torch thread only spins (100x slower per call on a busy 2-core machine)."""
    with common.torch_threads(1):
        yield


def tiny_bert(attn: str = "eager") -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        num_hidden_layers=N_LAYERS,
        hidden_size=32,
        num_attention_heads=N_HEADS,
        intermediate_size=64,
        vocab_size=100,
        initializer_range=0.2,  # larger than BERT's 0.02 so that patches move the outputs visibly
        attn_implementation=attn,
    )
    return BertModel(config).eval()


def tiny_llama(attn: str = "eager") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=N_LAYERS,
        hidden_size=32,
        num_attention_heads=N_HEADS,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=100,
        tie_word_embeddings=True,
        initializer_range=0.2,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    """(clean, corrupted) token ids [batch=2, pos=6] that differ at positions 1 and 4."""
    torch.manual_seed(1)
    clean = torch.randint(0, 100, (2, 6))
    corrupted = clean.clone()
    corrupted[:, [1, 4]] = (clean[:, [1, 4]] + 7) % 100
    return clean, corrupted


def out_of(model, inputs):
    """The output tensor the tests compare: logits (Llama) or last hidden state (BERT)."""
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def all_hooks(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def test_site_names(bert, llama):
    b, l = hooks.site_names(bert), hooks.site_names(llama)
    assert len(b) == 1 + 10 * N_LAYERS and len(l) == 1 + 11 * N_LAYERS + 1
    assert b[:3] == ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_q"]
    assert "blocks.1.hook_resid_mid" in l and not any("resid_mid" in s for s in b)
    assert l[-2:] == ["blocks.1.hook_resid_post", "ln_final.hook_normalized"]


@torch.no_grad()
def test_resid_and_pattern_match_hidden_states_and_attentions(bert, llama, ids):
    for model in (bert, llama):
        out, cache = hooks.run_with_cache(model, ids[0], output_hidden_states=True, output_attentions=True)
        hidden = out.hidden_states  # [embed, after block 0, ..., last] (Llama: the last one after the final norm)
        assert torch.equal(cache["hook_embed"], hidden[0])
        for l in range(N_LAYERS):
            assert torch.equal(cache[f"blocks.{l}.hook_resid_pre"], hidden[l])
            assert torch.equal(cache[f"blocks.{l}.attn.hook_pattern"], out.attentions[l])
        for l in range(N_LAYERS - (model is llama)):
            assert torch.equal(cache[f"blocks.{l}.hook_resid_post"], hidden[l + 1])
    last = cache[f"blocks.{N_LAYERS - 1}.hook_resid_post"]
    assert not torch.allclose(last, hidden[-1])
    assert torch.equal(cache["ln_final.hook_normalized"], hidden[-1])
    assert torch.equal(llama.model.norm(last), hidden[-1])


@torch.no_grad()
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_hook_z_heads_sum_to_attn_out(arch, bert, llama, ids):
    model = bert if arch == "bert" else llama
    o_proj = model.encoder.layer[1].attention.output.dense if arch == "bert" else model.model.layers[1].self_attn.o_proj
    _, cache = hooks.run_with_cache(model, ids[0], sites=["blocks.1.attn.hook_z", "blocks.1.hook_attn_out"])
    z = cache["blocks.1.attn.hook_z"]  # [batch, pos, head, d_head]
    assert z.shape == (2, 6, N_HEADS, D_HEAD)
    attn_out = cache["blocks.1.hook_attn_out"]
    torch.testing.assert_close(o_proj(z.flatten(-2)), attn_out, rtol=0, atol=1e-6)
    # each head writes z[h] @ W_O[:, h]: a slice of o_proj's input (with grouped-query attention too)
    w_o = o_proj.weight.unflatten(1, (N_HEADS, D_HEAD))  # [d_model, head, d_head]
    per_head = torch.einsum("bphk,dhk->bphd", z, w_o)
    bias = 0 if o_proj.bias is None else o_proj.bias
    torch.testing.assert_close(per_head.sum(2) + bias, attn_out, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_q_k_v_are_the_projections_per_head(arch, bert, llama, ids):
    model = bert if arch == "bert" else llama
    layer = model.encoder.layer[1].attention.self if arch == "bert" else model.model.layers[1].self_attn
    projections = ((layer.query, layer.key, layer.value) if arch == "bert"
                   else (layer.q_proj, layer.k_proj, layer.v_proj))
    _, cache = hooks.run_with_cache(model, ids[0], sites=["blocks.1.hook_resid_pre", "blocks.1.attn.hook_*"])
    x = cache["blocks.1.hook_resid_pre"] if arch == "bert" else model.model.layers[1].input_layernorm(
        cache["blocks.1.hook_resid_pre"])
    n_kv = N_HEADS if arch == "bert" else 2  # the tiny Llama has grouped-query attention: 2 key/value heads
    for name, proj, heads in zip("qkv", projections, (N_HEADS, n_kv, n_kv), strict=True):
        got = cache[f"blocks.1.attn.hook_{name}"]
        assert got.shape == (2, 6, heads, D_HEAD), name
        torch.testing.assert_close(got, proj(x).unflatten(-1, (heads, D_HEAD)), rtol=0, atol=1e-6)
    # patching one query head changes only that head's pattern
    with hooks.patch(model, "blocks.1.attn.hook_q", 0.0, heads=[2]):
        with hooks.capture(model, "blocks.1.attn.hook_pattern") as c:
            model(ids[0])
    new, old = c["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_pattern"]
    others = [h for h in range(N_HEADS) if h != 2]
    torch.testing.assert_close(new[:, others], old[:, others], rtol=0, atol=1e-6)
    assert not torch.allclose(new[:, 2], old[:, 2])
    with pytest.raises(ValueError, match=rf"hook_v has heads 0\.\.{n_kv - 1}"):
        hooks.patch(model, "blocks.1.attn.hook_v", 0.0, heads=[n_kv])


@torch.no_grad()
def test_llama_residual_stream_adds_up(llama, ids):
    _, cache = hooks.run_with_cache(llama, ids[0])
    for l in range(N_LAYERS):
        c = lambda s, l=l: cache[f"blocks.{l}.{s}"]  # noqa: E731
        assert torch.equal(c("hook_resid_mid"), c("hook_resid_pre") + c("hook_attn_out"))
        assert torch.equal(c("hook_resid_post"), c("hook_resid_mid") + c("hook_mlp_out"))
        layer = llama.model.layers[l]
        x = layer.post_attention_layernorm(c("hook_resid_mid"))
        torch.testing.assert_close(c("mlp.hook_post"), layer.mlp.act_fn(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))


@torch.no_grad()
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_patching_own_activation_changes_nothing(arch, bert, llama, ids):
    model = bert if arch == "bert" else llama
    reference, cache = hooks.run_with_cache(model, ids[0])
    reference = reference.logits if arch == "llama" else reference.last_hidden_state
    for site in hooks.site_names(model):
        if site.endswith("hook_pattern"):
            continue
        heads = [1, 3] if site.endswith(("hook_z", "hook_q")) else [0] if site.endswith(("hook_k", "hook_v")) else None
        with hooks.patch(model, site, cache[site], positions=[0, -1], heads=heads):
            torch.testing.assert_close(out_of(model, ids[0]), reference, rtol=0, atol=1e-6, msg=site)


@torch.no_grad()
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_patching_the_residual_stream_reproduces_corrupted_run(arch, bert, llama, ids):
    model = bert if arch == "bert" else llama
    clean, corrupted = ids
    sites = ["hook_embed", "blocks.*.hook_resid_pre", "blocks.*.hook_resid_mid", "blocks.*.hook_resid_post"]
    sites = [s for s in sites if arch == "llama" or "mid" not in s]
    _, cache = hooks.run_with_cache(model, corrupted, sites=sites)
    assert len(cache) == 1 + N_LAYERS * (2 + (arch == "llama"))
    for site, value in cache.items():  # every position of one residual-stream site carries the whole run
        with hooks.patch(model, site, value):
            patched = out_of(model, clean)
        torch.testing.assert_close(patched, out_of(model, corrupted), rtol=0, atol=1e-6, msg=site)
    assert not torch.allclose(patched, out_of(model, clean))


@torch.no_grad()
def test_patching_one_head_changes_only_its_contribution(llama, ids):
    clean, corrupted = ids
    site, head = "blocks.1.attn.hook_z", 2
    clean_out, clean_cache = hooks.run_with_cache(llama, clean, sites=[site, "blocks.1.hook_attn_out"])
    _, corrupt_cache = hooks.run_with_cache(llama, corrupted, sites=site)
    with hooks.patch(llama, site, corrupt_cache[site], heads=[head], positions=[-1]):
        with hooks.capture(llama, "blocks.1.hook_attn_out") as cache:
            patched = llama(clean).logits
    # attn_out moves at the last position only, by exactly that head's change through its slice of W_O
    w_o = llama.model.layers[1].self_attn.o_proj.weight[:, head * D_HEAD : (head + 1) * D_HEAD]
    delta = (corrupt_cache[site][:, -1, head] - clean_cache[site][:, -1, head]) @ w_o.T
    diff = cache["blocks.1.hook_attn_out"] - clean_cache["blocks.1.hook_attn_out"]
    assert torch.equal(diff[:, :-1], torch.zeros_like(diff[:, :-1]))
    torch.testing.assert_close(diff[:, -1], delta, rtol=0, atol=1e-5)
    assert delta.abs().max() > 1e-3
    # causal model: earlier positions' logits are untouched, the last one changes
    assert torch.equal(patched[:, :-1], clean_out.logits[:, :-1])
    assert not torch.allclose(patched[:, -1], clean_out.logits[:, -1])


@torch.no_grad()
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_zero_ablating_a_head_equals_zeroing_its_slice_by_hand(arch, bert, llama, ids):
    model = bert if arch == "bert" else llama
    o_proj = model.encoder.layer[0].attention.output.dense if arch == "bert" else model.model.layers[0].self_attn.o_proj

    def zero_head(_module, args):
        x = args[0].clone()
        x[..., 1 * D_HEAD : 2 * D_HEAD] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(zero_head)
    try:
        by_hand = out_of(model, ids[0])
    finally:
        handle.remove()
    with hooks.ablate(model, "blocks.0.attn.hook_z", heads=1):
        ablated = out_of(model, ids[0])
    assert torch.equal(ablated, by_hand)
    assert not torch.allclose(ablated, out_of(model, ids[0]))


@torch.no_grad()
def test_mean_ablation_and_stacked_patches(llama, ids):
    clean, corrupted = ids
    before = all_hooks(llama)
    _, ref = hooks.run_with_cache(llama, corrupted, sites=["blocks.0.attn.hook_z", "blocks.*.hook_resid_post"])
    z = ref["blocks.0.attn.hook_z"]
    mean = z.mean(dim=(0, 1))  # [head, d_head]
    with hooks.ablate(llama, "blocks.0.attn.hook_z", heads=[0, 3], value="mean", reference=z):
        by_ablate = llama(clean).logits
    with hooks.patch(llama, "blocks.0.attn.hook_z", mean[[0, 3]], heads=[0, 3]):
        by_patch = llama(clean).logits
    assert torch.equal(by_ablate, by_patch)
    # two patches stack: nested `with` and patches([...]) agree, and both patches act
    first = hooks.patch(llama, "blocks.0.hook_resid_post", ref["blocks.0.hook_resid_post"], positions=1)
    second = hooks.patch(llama, "blocks.1.hook_resid_post", ref["blocks.1.hook_resid_post"], positions=[4, 5])
    with first, second:
        nested = llama(clean).logits
    with hooks.patches([first, second]):
        stacked = llama(clean).logits
    assert torch.equal(nested, stacked)
    with second:
        only_second = llama(clean).logits
    assert not torch.equal(nested[:, 1], only_second[:, 1])
    torch.testing.assert_close(nested[:, 4:], llama(corrupted).logits[:, 4:], rtol=0, atol=1e-6)
    # a slice of a run of another length: the last position of a 4-token run written at position -1
    _, short = hooks.run_with_cache(llama, corrupted[:, :4], sites="blocks.1.hook_resid_post")
    last = short["blocks.1.hook_resid_post"][:, [-1]]  # [batch, 1, d_model]
    with hooks.patch(llama, "blocks.1.hook_resid_post", last, positions=-1):
        torch.testing.assert_close(llama(clean).logits[:, -1], llama(corrupted[:, :4]).logits[:, -1], rtol=0, atol=1e-6)
    assert all_hooks(llama) == before


def test_fn_patch_and_capture_with_grad(llama, ids):
    with hooks.patch(llama, "blocks.1.mlp.hook_post", fn=lambda m: 2 * m, positions=-1):
        with hooks.capture(llama, "blocks.1.mlp.hook_post", detach=False) as cache:
            llama(ids[0]).logits.sum().backward()
    post = cache["blocks.1.mlp.hook_post"]
    assert post.requires_grad
    with torch.no_grad(), hooks.capture(llama, "blocks.1.mlp.hook_post") as plain:
        llama(ids[0])
    torch.testing.assert_close(post[:, -1], 2 * plain["blocks.1.mlp.hook_post"][:, -1])
    assert torch.equal(post[:, :-1], plain["blocks.1.mlp.hook_post"][:, :-1])
    llama.zero_grad(set_to_none=True)


def test_hooks_removed_after_exception():
    model = tiny_llama()
    assert all_hooks(model) == 0
    sites = hooks.site_names(model)
    with pytest.raises(RuntimeError, match="boom"):
        with hooks.capture(model, sites), hooks.patch(model, "blocks.1.hook_resid_mid", 0.0, positions=0):
            model(torch.tensor([[1, 2, 3]]))
            raise RuntimeError("boom")
    assert all_hooks(model) == 0
    # an error raised by a hook during the forward pass (position 5 of 3 tokens) also leaves no hook behind
    with pytest.raises(ValueError, match="out of range"):
        with hooks.capture(model, sites), hooks.patch(model, "hook_embed", 0.0, positions=[5]):
            model(torch.tensor([[1, 2, 3]]))
    assert all_hooks(model) == 0


def test_bad_input(bert, llama, ids):
    clean = ids[0]
    cases = [
        (lambda: hooks.capture(llama, "blocks.0.hook_resid"), "unknown site"),
        (lambda: hooks.capture(bert, "blocks.0.hook_resid_mid"), "post-LN"),
        (lambda: hooks.capture(llama, ["blocks.2.hook_resid_post"]), "layer 2 is out of range"),
        (lambda: hooks.capture(llama, "blocks.*.hook_nothing"), "matches no site"),
        (lambda: hooks.patch(llama, "blocks.0.attn.hook_z", 0.0, heads=[4]), r"heads \[4\] out of range"),
        (lambda: hooks.patch(llama, "blocks.0.hook_attn_out", 0.0, heads=[0]), "only to sites with a head axis"),
        (lambda: hooks.patch(llama, "blocks.0.hook_attn_out", torch.zeros(2, 6, 31)), "does not fit"),
        (lambda: hooks.patch(llama, "blocks.0.attn.hook_z", torch.zeros(4, 8), heads=[1]), "does not fit"),
        (lambda: hooks.patch(llama, "blocks.0.hook_attn_out", torch.full((32,), float("nan"))), "non-finite"),
        (lambda: hooks.patch(llama, "blocks.0.attn.hook_pattern", 0.0), "not patched"),
        (lambda: hooks.patch(llama, "hook_embed", 0.0, fn=lambda x: x), "exactly one"),
        (lambda: hooks.patch(llama, "hook_embed", 0.0, positions=[]), "positions must be"),
        (lambda: hooks.ablate(llama, "hook_embed", value="median"), "'zero', 'mean'"),
        (lambda: hooks.ablate(llama, "hook_embed", value="mean"), "needs reference"),
        (lambda: hooks.capture(tiny_llama("sdpa"), "blocks.0.attn.hook_pattern"), "eager"),
        (lambda: hooks.site_names(torch.nn.Linear(2, 2)), "supports BERT-style"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    # checked during the forward pass, where the sequence length is known
    forward_cases = [
        (hooks.patch(llama, "hook_embed", 0.0, positions=[6]), "positions \\[6\\] out of range"),
        (hooks.patch(llama, "hook_embed", torch.zeros(1, 5, 32)), "has 5 positions but this run has 6"),
        (hooks.patch(llama, "hook_embed", torch.zeros(3, 1, 32)), "does not fit"),
        (hooks.patch(llama, "hook_embed", fn=lambda x: x[:, :2]), "fn must return"),
        (hooks.patch(llama, "hook_embed", fn=lambda x: x / 0), "non-finite"),
    ]
    for patch, message in forward_cases:
        with pytest.raises(ValueError, match=message), torch.no_grad(), patch:
            llama(clean)
    with pytest.raises(KeyError, match="was not captured"), hooks.capture(llama, "hook_embed") as cache:
        cache["hook_embed"]


def test_mean_pool_known_answer_and_errors():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(hooks.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))
    with pytest.raises(ValueError, match=r"rows \[1\] are all zero"):
        hooks.mean_pool(hidden, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="attention_mask must be"):
        hooks.mean_pool(hidden, mask[:, :2])
    with pytest.raises(ValueError, match=r"hidden must be \[batch, pos, d\]"):
        hooks.mean_pool(hidden[0], mask)


def test_mean_pool_matches_sentence_transformers():
    pooling = pytest.importorskip("sentence_transformers.sentence_transformer.modules").Pooling
    torch.manual_seed(0)
    hidden = torch.randn(4, 7, 16)
    mask = (torch.rand(4, 7) < 0.6).long()
    mask[:, 0] = 1
    expected = pooling(16, pooling_mode="mean")({"token_embeddings": hidden, "attention_mask": mask})
    torch.testing.assert_close(hooks.mean_pool(hidden, mask), expected["sentence_embedding"], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_observe_sees_what_capture_stores(arch, bert, llama, ids):
    model = bert if arch == "bert" else llama
    sites = ["blocks.0.mlp.hook_post", "blocks.1.attn.hook_z"]
    seen, before = {}, all_hooks(model)  # transformers may keep hooks of its own (output_attentions)
    with hooks.capture(model, sites) as cache, hooks.observe(model, sites, lambda s, x: seen.__setitem__(s, x.clone())):
        model(ids[0])
    assert sorted(seen) == sorted(sites)
    assert all(torch.equal(seen[s], cache[s]) for s in sites)
    assert all_hooks(model) == before
    with pytest.raises(ValueError, match="callable"):
        hooks.observe(model, sites, "not a function")


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_run_until_stops_after_the_block_and_keeps_its_activations(arch, bert, llama, ids):
    model = bert if arch == "bert" else llama
    ran, before = [], all_hooks(model)
    blocks = model.encoder.layer if arch == "bert" else model.model.layers
    watch = [(block, "output", lambda _m, _a, _o, n=n: ran.append(n)) for n, block in enumerate(blocks)]
    with hooks.capture(model, "blocks.0.hook_resid_post") as early, hooks.on_modules(watch):
        assert hooks.run_until(model, 0, ids[0]) is None
    assert ran == [0]  # block 1 never ran
    with hooks.capture(model, "blocks.0.hook_resid_post") as full:
        model(ids[0])
    assert torch.equal(early["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])
    ran.clear()
    with hooks.on_modules(watch):
        hooks.run_until(model, -1, ids[0])  # the last block: a full pass
    assert ran == [0, 1] and all_hooks(model) == before
    with pytest.raises(ValueError, match="out of range"):
        hooks.run_until(model, N_LAYERS, ids[0])


def test_on_modules_and_capture_modules_remove_their_hooks():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError), hooks.capture_modules({"lin": lin}) as cache:
        lin(torch.zeros(1, 3))  # wrong width: the forward pass raises
    assert not lin._forward_hooks and cache == {}
    doubled = (lin, "output", lambda _m, _a, out: 2 * out)
    shifted = (lin, "input", lambda _m, args: (args[0] + 1,))
    x = torch.randn(4, 2)
    with hooks.on_modules([doubled, shifted]):
        assert torch.allclose(lin(x), 2 * lin.forward(x + 1))
    kwargs_seen = {}
    with hooks.on_modules([(lin, "input_kwargs", lambda _m, args, kw: kwargs_seen.update(n=len(args)))]):
        lin(x)
    assert kwargs_seen == {"n": 1} and all_hooks(lin) == 0
    with pytest.raises(ValueError, match="when must be"):
        hooks.on_modules([(lin, "after", print)])
    with pytest.raises(ValueError, match="each item"):
        hooks.on_modules([(lin, print)])
    with pytest.raises(ValueError, match="mapping"):
        hooks.capture_modules([lin])


def test_no_bare_hook_registration_outside_the_hook_layer():
    """Every torch hook goes through helpers.hooks (always removed); one teaching cell shows a bare one."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bare = re.compile(r"\.register_(full_)?(forward|backward)(_pre)?_hook\(")
    teaching = {"06b_causal_interventions.ipynb": 1}  # a raw hook, shown equal to hooks.patch
    found = {}
    for path in sorted((root / "helpers").glob("*.py")) + sorted((root / "benchmarks").glob("*.py")):
        if path.name != "hooks.py" and bare.search(path.read_text()):
            found[path.name] = len(bare.findall(path.read_text()))
    for path in sorted((root / "nbs").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        n = sum(len(bare.findall("".join(c["source"]))) for c in cells)
        if n != teaching.get(path.name, 0):
            found[path.name] = n
    assert not found, f"bare torch hook registrations outside helpers/hooks.py: {found}"
