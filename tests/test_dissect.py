"""helpers.dissect: the additive decomposition e = i + h + f + c on tiny random BERTs (known answer: the sum)."""

import pytest
import torch
from transformers import BertConfig, BertModel

from helpers import dissect


def _random_bert(layers=3, seed=0, hidden_act="gelu"):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=32,
        max_position_embeddings=16,
        type_vocab_size=2,
        hidden_act=hidden_act,
    )
    cfg._attn_implementation = "eager"
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(torch.rand_like(p) * 1.5 + 0.25)  # gains != 1
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5)  # biases != 0
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def _batch():
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    types = torch.zeros_like(ids)
    types[0, 4:] = 1
    return ids, mask, types


@pytest.mark.parametrize("layers", [1, 3])
def test_terms_sum_to_every_hidden_state(layers):
    model = _random_bert(layers)
    ids, mask, types = _batch()
    dec = dissect.decompose(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert dec.terms.shape == (layers + 1, 4, 3, 7, 16)
    assert dec.hidden.shape == (layers + 1, 3, 7, 16)
    err = dissect.relative_error(dec)
    assert err.shape == (layers + 1,)
    assert float(err.max()) < 1e-5
    # the library's own last hidden state, computed independently of the hooks
    with torch.no_grad():
        last = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    torch.testing.assert_close(dec.terms[-1].sum(0)[dec.mask].float(), last[dec.mask], atol=1e-4, rtol=1e-4)


def test_known_structure_of_the_terms():
    model = _random_bert(2)
    ids, mask, types = _batch()
    dec = dissect.decompose(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    # the embedding output has no attention or feed-forward part; c there is exactly the LN shift β
    assert float(dec.terms[0, 1:3].abs().max()) == 0.0
    beta = model.embeddings.LayerNorm.bias.double()
    torch.testing.assert_close(dec.terms[0, 3], beta.expand_as(dec.terms[0, 3]))
    # after a block every term is generally non-zero
    assert all(float(dec.terms[1, k].abs().max()) > 0 for k in range(4))


def test_push_layer_norm_is_exact_and_moves_the_shift_to_c():
    ln = torch.nn.LayerNorm(6).double().requires_grad_(False)
    ln.weight.uniform_(0.5, 2.0)
    ln.bias.normal_()
    terms = torch.randn(4, 2, 3, 6, dtype=torch.float64)
    out = dissect.push_layer_norm(terms, ln)
    torch.testing.assert_close(out.sum(0), ln(terms.sum(0)))
    # a term that is zero stays zero (no shift leaks into i, h or f)
    terms[1] = 0
    assert float(dissect.push_layer_norm(terms, ln)[1].abs().max()) == 0.0


def test_importance_sums_to_one_per_token():
    model = _random_bert(3, seed=1)
    ids, mask, types = _batch()
    dec = dissect.decompose(model, input_ids=ids, attention_mask=mask)
    imp = dissect.importance(dec.terms)  # [layer + 1, term, batch, pos]
    assert imp.shape == (4, 4, 3, 7)
    torch.testing.assert_close(imp.sum(1), torch.ones(4, 3, 7, dtype=imp.dtype))
    # first hidden state: only i and c exist
    assert float(imp[0, 1:3].abs().max()) == 0.0


def test_importance_known_answer():
    terms = torch.tensor([[[[3.0, 0.0]]], [[[0.0, 4.0]]], [[[-1.0, 0.0]]]])  # e = (2, 4), |e|^2 = 20
    torch.testing.assert_close(dissect.importance(terms).flatten(), torch.tensor([6 / 20, 16 / 20, -2 / 20]))


def test_bad_inputs_raise_clear_errors():
    model = _random_bert(1)
    with pytest.raises(ValueError, match="input_ids must be"):
        dissect.decompose(model, input_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask must match"):
        dissect.decompose(model, input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="post-LayerNorm BERT"):
        dissect.decompose(torch.nn.Linear(2, 2), input_ids=torch.ones(1, 3, dtype=torch.long))
    model.train()
    with pytest.raises(ValueError, match="eval"):
        dissect.decompose(model, input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="terms must be"):
        dissect.importance(torch.ones(3, 4))
    with pytest.raises(ValueError, match="zero"):
        dissect.importance(torch.zeros(2, 1, 1, 3))


def _layer_norm_inputs(model, ids, mask, types):
    """Inputs of every LayerNorm in forward order (embeddings, then attention/output LN of each block)."""
    lns = [model.embeddings.LayerNorm]
    for layer in model.encoder.layer:
        lns += [layer.attention.output.LayerNorm, layer.output.LayerNorm]
    seen = []
    handles = [ln.register_forward_pre_hook(lambda _m, args: seen.append(args[0].double())) for ln in lns]
    record = {}
    last = model.encoder.layer[-1]
    handles.append(last.attention.output.dense.register_forward_pre_hook(
        lambda _m, args: record.__setitem__("context", args[0].double())))
    handles.append(last.output.dense.register_forward_hook(
        lambda _m, _a, out: record.__setitem__("ffn", out.double())))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    for h in handles:
        h.remove()
    return lns, seen, record


@pytest.mark.parametrize("layers", [1, 3])
def test_mickus_convention_sums_exactly_and_matches_the_papers_factors(layers):
    model = _random_bert(layers, seed=2)
    ids, mask, types = _batch()
    dec = dissect.decompose(model, input_ids=ids, attention_mask=mask, token_type_ids=types, convention="mickus")
    assert float(dissect.relative_error(dec).max()) < 1e-5
    lns, seen, record = _layer_norm_inputs(model, ids, mask, types)
    sig = [torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + ln.eps) for ln, z in zip(lns, seen, strict=True)]
    gam = [ln.weight.double() for ln in lns]
    m = dec.mask
    # closed form of the reference code: the raw input embedding times every gain over every sigma
    i_ref = seen[0] * torch.stack(gam).prod(0) / torch.stack(sig).prod(0)
    torch.testing.assert_close(dec.terms[-1, 0][m], i_ref[m])
    # the last block's FFN output (bias removed) times the last gain over the last sigma
    b_2 = model.encoder.layer[-1].output.dense.bias.double()
    f_last = gam[-1] * (record["ffn"] - b_2) / sig[-1]
    f_before = dec.terms[-2, 2] * gam[-2] * gam[-1] / (sig[-2] * sig[-1])  # earlier FFN outputs, two LNs later
    torch.testing.assert_close(dec.terms[-1, 2][m], (f_before + f_last)[m])
    # the embedding output: i = γ (w + p + s) / σ uncentred, c = β - γ μ / σ
    ln0 = lns[0]
    torch.testing.assert_close(dec.terms[0, 0][m], (gam[0] * seen[0] / sig[0])[m])
    c0 = ln0.bias.double() - gam[0] * seen[0].mean(-1, keepdim=True) / sig[0]
    torch.testing.assert_close(dec.terms[0, 3][m], c0[m])


def test_conventions_differ_only_in_how_the_centring_is_shared():
    model = _random_bert(2, seed=3)
    ids, mask, types = _batch()
    a = dissect.decompose(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    b = dissect.decompose(model, input_ids=ids, attention_mask=mask, token_type_ids=types, convention="mickus")
    m = a.mask
    torch.testing.assert_close(a.terms.sum(1)[:, m], b.terms.sum(1)[:, m])
    # at the embedding output the conventions differ by the centring of i, moved into c
    emb = {}
    h = model.embeddings.LayerNorm.register_forward_pre_hook(lambda _m, args: emb.__setitem__("z", args[0].double()))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    h.remove()
    ln = model.embeddings.LayerNorm
    z = emb["z"]
    shift = ln.weight.double() * z.mean(-1, keepdim=True) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + ln.eps)
    torch.testing.assert_close((b.terms[0, 0] - a.terms[0, 0])[m], shift.expand_as(z)[m])
    torch.testing.assert_close((a.terms[0, 3] - b.terms[0, 3])[m], shift.expand_as(z)[m])
    # after a block the split really differs (not a relabelling of the same vectors)
    assert float((a.terms[1:, :3] - b.terms[1:, :3])[:, :, m].abs().max()) > 1e-3


def test_unknown_convention_raises():
    model = _random_bert(1)
    with pytest.raises(ValueError, match="convention must be one of"):
        dissect.decompose(model, input_ids=torch.ones(1, 3, dtype=torch.long), convention="paper")
    with pytest.raises(ValueError, match="convention must be one of"):
        dissect.push_layer_norm(torch.ones(4, 1, 1, 3), torch.nn.LayerNorm(3), convention="x")


def test_decompose_conventions_equals_separate_calls():
    model = _random_bert(2, seed=4)
    ids, mask, types = _batch()
    both = dissect.decompose_conventions(model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    for cv in dissect.CONVENTIONS:
        one = dissect.decompose(model, input_ids=ids, attention_mask=mask, token_type_ids=types, convention=cv)
        torch.testing.assert_close(both[cv].terms, one.terms)
        torch.testing.assert_close(both[cv].hidden, one.hidden)
    with pytest.raises(ValueError, match="conventions must be"):
        dissect.decompose_conventions(model, input_ids=ids, conventions=("paper",))
