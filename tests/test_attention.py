"""Known-answer tests for helpers.attention (Chapter 1): the BERT block by hand, rollout, flow, graphs."""

import copy

import networkx as nx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from helpers import attention, common, hooks
from helpers.assets import minilm, minilm_path, wikipedia_sentences

SENTENCES = ["The cat sat on the mat.", "Attention is a graph over tokens, read one head at a time."]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """A randomly initialised 2-layer BERT (d=32, 4 heads) that shares MiniLM's vocabulary."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel._from_config(config, attn_implementation="eager").eval()


def _rows(x):
    x = x.pow(4)  # peaky rows, so flow and rollout differ
    return x / x.sum(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# One layer by hand
# ---------------------------------------------------------------------------------------------


def _check_layers(model, enc):
    with torch.inference_mode():
        out = model(**enc, output_attentions=True, output_hidden_states=True)
    for i, layer in enumerate(model.encoder.layer):
        mine = attention.manual_bert_layer(layer, out.hidden_states[i], enc["attention_mask"])
        assert torch.allclose(mine["probs"], out.attentions[i], atol=1e-5), f"layer {i}: attention probabilities"
        assert torch.allclose(mine["out"], out.hidden_states[i + 1], atol=1e-5), f"layer {i}: block output"


def test_manual_layer_matches_tiny_bert_with_padding(tiny, tokenizer):
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not enc["attention_mask"].all(), "the test needs a padded sentence"
    _check_layers(tiny, enc)


@pytest.mark.slow
def test_manual_layer_matches_minilm():
    model, tok = minilm()
    enc = tok(wikipedia_sentences(3), padding=True, return_tensors="pt")
    _check_layers(model, enc)


def test_manual_layer_intermediates_match_hooks(tiny, tokenizer):
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    layer = tiny.encoder.layer[1]
    modules = {"ffn_act": layer.intermediate, "resid_mid": layer.attention.output, "in": layer.attention.self.query}
    with hooks.capture_modules(modules) as cache, torch.inference_mode():
        out = tiny(**enc, output_hidden_states=True)
    mine = attention.manual_bert_layer(layer, out.hidden_states[1], enc["attention_mask"])
    assert torch.allclose(mine["ffn_act"], cache["ffn_act"], atol=1e-5)
    assert torch.allclose(mine["resid_mid"], cache["resid_mid"], atol=1e-5)
    assert all(not m._forward_hooks for m in modules.values())


def test_capture_removes_hooks_on_error():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError), hooks.capture_modules({"lin": lin}):
        lin(torch.zeros(1, 3))  # wrong width: the forward pass raises
    assert not lin._forward_hooks


def test_manual_layer_rejects_bad_inputs(tiny):
    layer = tiny.encoder.layer[0]
    with pytest.raises(ValueError, match=r"\[batch, pos, d\]"):
        attention.manual_bert_layer(layer, torch.zeros(5, 32), torch.ones(5))
    with pytest.raises(ValueError, match="mask must be"):
        attention.manual_bert_layer(layer, torch.zeros(1, 5, 32), torch.ones(1, 4))
    with pytest.raises(ValueError, match="BertLayer"):
        attention.manual_bert_layer(torch.nn.Linear(32, 32), torch.zeros(1, 5, 32), torch.ones(1, 5))


# ---------------------------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------------------------


def test_attention_maps_shapes_padding_and_values(tiny, tokenizer):
    maps = attention.attention_maps(tiny, tokenizer, SENTENCES, batch_size=1)
    n_max = maps.mask.shape[1]
    assert maps.attn.shape == (2, 2, 4, n_max, n_max)
    assert [t[0] for t in maps.tokens] == ["[CLS]", "[CLS]"] and maps.tokens[0][-1] == "[SEP]"
    assert [len(t) for t in maps.tokens] == maps.mask.sum(1).tolist()
    short = len(maps.tokens[0])
    assert maps.attn[:, 0, :, short:].abs().sum() == 0 and maps.attn[:, 0, :, :, short:].abs().sum() == 0
    sums = maps.attn.sum(-1)  # [layer, batch, head, query]
    assert torch.allclose(sums[:, 0, :, :short], torch.ones(()), atol=1e-5)
    enc = tokenizer(SENTENCES[1:], return_tensors="pt")
    with torch.inference_mode():
        ref = torch.stack(tiny(**enc, output_attentions=True).attentions)[:, 0]
    assert torch.allclose(maps.attn[:, 1], ref, atol=1e-5)


def test_attention_maps_can_return_the_last_hidden_states_of_the_same_passes(tiny, tokenizer):
    maps, last = attention.attention_maps(tiny, tokenizer, SENTENCES, batch_size=1, return_last_hidden=True)
    plain = attention.attention_maps(tiny, tokenizer, SENTENCES, batch_size=1)
    assert torch.equal(maps.attn, plain.attn) and maps.tokens == plain.tokens and torch.equal(maps.mask, plain.mask)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = tiny(**enc).last_hidden_state
    assert last.shape == (2, maps.mask.shape[1], 32)
    assert torch.allclose(last[maps.mask], ref[maps.mask], atol=1e-5)


def test_attention_maps_rejects_bad_inputs(tiny, tokenizer):
    with pytest.raises(ValueError, match="list of strings"):
        attention.attention_maps(tiny, tokenizer, "one sentence")
    with pytest.raises(ValueError, match="non-empty"):
        attention.attention_maps(tiny, tokenizer, ["fine", "  "])
    sdpa = BertModel._from_config(copy.deepcopy(tiny.config), attn_implementation="sdpa").eval()
    with pytest.raises(ValueError, match="eager"):
        attention.attention_maps(sdpa, tokenizer, SENTENCES)


# ---------------------------------------------------------------------------------------------
# Rollout
# ---------------------------------------------------------------------------------------------

# Two layers, two tokens, one head: layer 1 sends everything to token 0, layer 2 to token 1.
A1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
A2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
TWO_LAYERS = torch.stack([A1, A2])[:, None, None]  # [layer, batch, head, query, key]


def test_rollout_identity_attention_is_identity():
    attn = torch.eye(4).expand(3, 2, 5, 4, 4)
    assert torch.equal(attention.rollout(attn), torch.eye(4).expand(2, 4, 4))


def test_rollout_two_layers_by_hand():
    # with residual 0.5: Â1 = [[1, 0], [.5, .5]], Â2 = [[.5, .5], [0, 1]], rollout = Â2 Â1
    expected = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    assert torch.allclose(attention.rollout(TWO_LAYERS)[0], expected)
    every = attention.rollout(TWO_LAYERS, all_layers=True)
    assert every.shape == (2, 1, 2, 2)
    assert torch.allclose(every[0, 0], torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    assert torch.allclose(every[-1], attention.rollout(TWO_LAYERS))
    # without the residual the product is plain matrix multiplication: A2 A1 sends all to token 0
    assert torch.allclose(attention.rollout(TWO_LAYERS, residual=0.0)[0], A2 @ A1)


def test_rollout_rows_stochastic_and_padding_invariant():
    attn = _rows(torch.rand(3, 1, 4, 5, 5, generator=torch.Generator().manual_seed(1)))
    padded = torch.zeros(3, 1, 4, 7, 7)
    padded[..., :5, :5] = attn
    full, cut = attention.rollout(padded)[0], attention.rollout(attn)[0]
    assert torch.allclose(full[:5, :5], cut, atol=1e-6)
    assert full[5:].abs().sum() == 0 and full[:, 5:].abs().sum() == 0
    assert torch.allclose(cut.sum(-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(attention.rollout(attn, head_reduce="max").sum(-1), torch.ones(1, 5), atol=1e-6)


def test_rollout_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"\[layer, batch, head, query, key\]"):
        attention.rollout(torch.eye(3).expand(2, 2, 3, 3))
    with pytest.raises(ValueError, match="sum to 1"):
        attention.rollout(torch.randn(2, 1, 1, 3, 3).abs() + 1)  # scores, not probabilities
    with pytest.raises(ValueError, match="negative"):
        attention.rollout(-torch.eye(3).expand(1, 1, 1, 3, 3))
    with pytest.raises(ValueError, match="residual"):
        attention.rollout(TWO_LAYERS, residual=1.5)
    with pytest.raises(ValueError, match="head_reduce"):
        attention.rollout(TWO_LAYERS, head_reduce="median")
    with pytest.raises(ValueError, match="floating-point"):
        attention.rollout(torch.eye(2, dtype=torch.long).expand(1, 1, 1, 2, 2))


def test_read_out_mean_and_position():
    mask = torch.tensor([[True, True, True, False]])
    matrix = torch.zeros(1, 4, 4)
    matrix[0, :3, :3] = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0]])
    assert torch.allclose(attention.read_out(matrix, mask), torch.tensor([[1 / 3, 2 / 3, 0, 0]]))
    assert torch.allclose(attention.read_out(matrix, mask, output=2), torch.tensor([[0.0, 1, 0, 0]]))
    with pytest.raises(ValueError, match="padding"):
        attention.output_weights(mask, output=3)
    with pytest.raises(ValueError, match="'mean'"):
        attention.output_weights(mask, output="cls")


# ---------------------------------------------------------------------------------------------
# Flow
# ---------------------------------------------------------------------------------------------


def test_flow_one_layer_equals_residual_attention():
    attn = _rows(torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(2)))
    hat = 0.5 * attn.mean(1)[0] + 0.5 * torch.eye(4)
    for t in range(4):
        assert torch.allclose(attention.attention_flow(attn, output=t), hat[t].double(), atol=1e-6)


def test_flow_two_layers_by_hand_differs_from_rollout():
    # paths from the top [CLS]: via (1,0) and (1,1) to input 0 carry 0.5 each; only (1,1) reaches input 1
    one = TWO_LAYERS[:, 0]
    assert torch.allclose(attention.attention_flow(one, output=0), torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert torch.allclose(attention.rollout(TWO_LAYERS)[0, 0], torch.tensor([0.75, 0.25]))


@pytest.mark.parametrize("output", [0, 3, "mean"])
def test_flow_scipy_matches_networkx(output):
    attn = _rows(torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(3)))
    fast = attention.attention_flow(attn, output=output)
    exact = attention.attention_flow(attn, output=output, solver="networkx")
    assert torch.allclose(fast, exact, atol=1e-5)
    graph = attention.flow_network(attn, output=output)
    direct = nx.maximum_flow_value(graph, "output", (0, 2))  # networkx's default solver
    assert abs(direct - float(exact[2])) < 1e-9


def test_flow_batch_with_mask_matches_single_sentences():
    attn = torch.zeros(2, 2, 3, 5, 5)
    a = _rows(torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(4)))
    b = _rows(torch.rand(2, 3, 3, 3, generator=torch.Generator().manual_seed(5)))
    attn[:, 0], attn[:, 1, :, :3, :3] = a, b
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    flows = attention.attention_flow(attn, mask=mask, output="mean")
    assert torch.allclose(flows[0], attention.attention_flow(a, output="mean"))
    assert torch.allclose(flows[1, :3], attention.attention_flow(b, output="mean"))
    assert flows[1, 3:].abs().sum() == 0


def test_flow_rejects_bad_inputs():
    good = TWO_LAYERS[:, 0]
    with pytest.raises(ValueError, match=r"\[layer, head, query, key\]"):
        attention.attention_flow(torch.eye(3))
    with pytest.raises(ValueError, match="needs mask"):
        attention.attention_flow(TWO_LAYERS)
    with pytest.raises(ValueError, match="solver"):
        attention.attention_flow(good, solver="magic")
    with pytest.raises(ValueError, match="sum to 1"):
        attention.attention_flow(torch.ones(1, 1, 3, 3))
    with pytest.raises(ValueError, match="padding rows|sum to 1"):
        attention.attention_flow(torch.zeros(1, 1, 2, 2))  # one sentence must not contain padding
    with pytest.raises(ValueError, match="shape"):
        attention.attention_flow(good, output=torch.ones(3))


# ---------------------------------------------------------------------------------------------
# One head as a graph
# ---------------------------------------------------------------------------------------------


def test_attention_graph_edges_and_nodes():
    attn = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.5, 0.5], [0.96, 0.02, 0.02]])
    g = attention.attention_graph(attn, ["[CLS]", "a", "[SEP]"], threshold=0.15)
    assert set(g.nodes) == {0, 1, 2} and g.nodes[2]["token"] == "[SEP]"
    assert sorted(g.edges) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0)]
    assert g.edges[2, 0]["weight"] == pytest.approx(0.96)
    assert g.nodes[0]["received"] == pytest.approx(1.66)
    assert attention.attention_graph(attn, ["x"] * 3, threshold=0.0).number_of_edges() == 8  # no zero-weight edge


def test_attention_graph_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"one \[query, key\] matrix"):
        attention.attention_graph(torch.eye(3)[None], ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 tokens"):
        attention.attention_graph(torch.eye(2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="sum to 1"):
        attention.attention_graph(torch.eye(2) * 3, ["a", "b"])
    with pytest.raises(ValueError, match="threshold"):
        attention.attention_graph(torch.eye(2), ["a", "b"], threshold=1.0)


def test_draw_attention_graph_runs():
    import matplotlib

    matplotlib.use("Agg")
    g = attention.attention_graph(torch.tensor([[0.2, 0.8], [0.6, 0.4]]), ["[CLS]", "hi"])
    ax = attention.draw_attention_graph(g, title="toy")
    assert ax.get_title() == "toy" and len(ax.lines) == 2  # the self-loops are rings, not arcs
    with pytest.raises(ValueError, match="attention_graph"):
        attention.draw_attention_graph(nx.path_graph(3, create_using=nx.DiGraph))


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def test_blank_out_known_answer_and_zeros(tiny, tokenizer):
    scores = attention.blank_out(tiny, tokenizer, SENTENCES, batch_size=7)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    content = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
    assert scores.shape == content.shape and (scores[~content] == 0).all() and (scores[content] >= -1e-6).all()
    ids = tokenizer(SENTENCES[:1], return_tensors="pt")["input_ids"]
    blanked = ids.clone()
    blanked[0, 2] = tokenizer.unk_token_id
    with torch.inference_mode():
        e, e2 = (
            attention.sentence_embedding(tiny, input_ids=x, attention_mask=torch.ones_like(x)) for x in (ids, blanked)
        )
    expected = 1 - torch.nn.functional.cosine_similarity(e, e2)[0]
    assert scores[0, 2] == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(ValueError, match="not a token"):
        attention.blank_out(tiny, tokenizer, SENTENCES, replacement="<nope>")


def test_input_x_gradient_shapes(tiny, tokenizer):
    scores = attention.input_x_gradient(tiny, tokenizer, SENTENCES, batch_size=1)
    mask = tokenizer(SENTENCES, padding=True, return_tensors="pt")["attention_mask"].bool()
    assert scores.shape == mask.shape and (scores[~mask] == 0).all() and (scores[mask] > 0).all()


def test_show_head_draws_both_views_and_rejects_bad_heads():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attn = torch.softmax(torch.randn(2, 1, 3, 4, 4), -1)  # [layer, batch, head, query, key]
    maps = attention.AttentionMaps(attn, [["[CLS]", "a", "b", "[SEP]"]], torch.ones(1, 4, dtype=torch.bool))
    for view in ("heat map", "graph"):
        attention.show_head(maps, 0, 2, 3, view, label="test")
    plt.close("all")
    with pytest.raises(ValueError, match="1 <= head <= 3"):
        attention.show_head(maps, 0, 1, 4)
    with pytest.raises(ValueError, match="view"):
        attention.show_head(maps, 0, 1, 1, "bars")


def test_blank_out_outputs_with_a_readout_and_mask_skipped(tiny, tokenizer):
    sentences = ["The cats [MASK] on the mat.", SENTENCES[1]]
    enc = tokenizer(sentences, padding=True, return_tensors="pt", return_special_tokens_mask=True)

    def first(hidden, attention_mask):  # the [CLS] vector
        return hidden[:, 0]

    base, blanked = attention.blank_out_outputs(tiny, tokenizer, sentences, readout=first, batch_size=5)
    assert base.shape == (2, 32) and blanked.shape == (2, enc["input_ids"].shape[1], 32)
    changed = (blanked != base[:, None]).any(-1)
    content = enc["attention_mask"].bool() & ~enc["special_tokens_mask"].bool()
    content &= enc["input_ids"] != tokenizer.mask_token_id
    assert torch.equal(changed, content), "exactly the content word pieces (not [MASK]) are blanked"
    ids = enc["input_ids"][:1, : int(enc["attention_mask"][0].sum())].clone()
    ids[0, 1] = tokenizer.unk_token_id
    with torch.inference_mode():
        expected = tiny(input_ids=ids).last_hidden_state[0, 0]
    assert torch.allclose(blanked[0, 1], expected, atol=1e-5)
    # the default readout keeps blank_out's cosine
    base, blanked = attention.blank_out_outputs(tiny, tokenizer, SENTENCES)
    cos = 1 - torch.nn.functional.cosine_similarity(blanked, base[:, None].expand_as(blanked), dim=-1)
    assert torch.allclose(cos, attention.blank_out(tiny, tokenizer, SENTENCES), atol=1e-6)
    with pytest.raises(ValueError, match="readout"):
        attention.blank_out_outputs(tiny, tokenizer, SENTENCES, readout="cls")


def test_value_norms_match_a_loop_over_heads_and_keys(tiny, tokenizer):
    norms = attention.value_norms(tiny, tokenizer, SENTENCES, batch_size=1)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    n_layers, n_heads, d = 2, 4, 32
    assert norms.shape == (n_layers, 2, *[enc["input_ids"].shape[1]] * 2)
    with torch.no_grad():
        out = tiny(**enc, output_attentions=True, output_hidden_states=True)
    b, layer = 1, 1  # the longer sentence, second layer
    lay = tiny.encoder.layer[layer]
    x = out.hidden_states[layer][b]  # [pos, d]
    with torch.no_grad():  # the tiny model's weights require grad
        for t, s in [(0, 0), (3, 5), (7, 2)]:
            total = torch.zeros(d)
            for h in range(n_heads):
                sl = slice(h * 8, (h + 1) * 8)
                v = x[s] @ lay.attention.self.value.weight[sl].T + lay.attention.self.value.bias[sl]  # [d_head]
                total += out.attentions[layer][b, h, t, s] * (v @ lay.attention.output.dense.weight[:, sl].T)
            assert norms[layer, b, t, s] == pytest.approx(float(total.norm()), rel=1e-4)
    mask = enc["attention_mask"].bool()
    assert (norms[:, 0][:, ~mask[0]] == 0).all() and (norms[:, 0][:, :, ~mask[0]] == 0).all()


def test_value_norms_single_identity_head_is_weight_times_input_norm():
    config = BertConfig(vocab_size=20, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8, max_position_embeddings=8)
    model = BertModel._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for lin in (model.encoder.layer[0].attention.self.value, model.encoder.layer[0].attention.output.dense):
            lin.weight.copy_(torch.eye(4))
            lin.bias.zero_()

    class Tok:  # a tokenizer returning fixed ids
        def __call__(self, texts, **kw):
            return {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}

    norms = attention.value_norms(model, Tok(), ["x"])
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), output_attentions=True, output_hidden_states=True)
    expected = out.attentions[0][0, 0] * out.hidden_states[0][0].norm(dim=-1)[None, :]  # a_ts ||x_s||
    assert torch.allclose(norms[0, 0], expected, atol=1e-5)


def test_grad_rollout_by_hand_and_negative_parts_dropped():
    a1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    a2 = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    attn = torch.stack([a1, a2])[:, None, None]  # [layer, batch, head, query, key]
    grad = torch.ones_like(attn)
    eye = torch.eye(2)
    r1 = eye + a1
    expected = r1 + a2 @ r1
    assert torch.allclose(attention.grad_rollout(attn, grad)[0], expected)
    steps = attention.grad_rollout(attn, grad, all_layers=True)
    assert torch.allclose(steps[0, 0], r1) and torch.allclose(steps[1, 0], expected)
    # a negative gradient everywhere: every layer counts for nothing, the identity remains
    assert torch.allclose(attention.grad_rollout(attn, -grad)[0], eye)
    # two heads, one with a negative gradient: only the positive one counts, averaged over both heads
    attn2 = torch.stack([a1, a1])[None, None]  # [1, 1, 2, 2, 2]
    grad2 = torch.stack([torch.ones(2, 2), -torch.ones(2, 2)])[None, None]
    assert torch.allclose(attention.grad_rollout(attn2, grad2)[0], eye + a1 / 2)


def test_grad_rollout_padding_and_bad_inputs():
    attn = torch.softmax(torch.randn(2, 1, 3, 3, 3), -1)
    attn[:, :, :, 2] = 0
    attn[:, :, :, :, 2] = 0
    attn = attn / attn.sum(-1, keepdim=True).clamp_min(1e-12)
    out = attention.grad_rollout(attn, torch.randn_like(attn))
    assert (out[0, 2] == 0).all() and (out[0, :, 2] == 0).all()
    with pytest.raises(ValueError, match="shape of attn"):
        attention.grad_rollout(attn, torch.randn(2, 1, 3, 3, 2))
    with pytest.raises(ValueError, match="layer, batch, head"):
        attention.grad_rollout(attn[0], attn[0])


def test_attention_gradients_match_autograd(tiny, tokenizer):
    def target(hidden, attention_mask, index):
        return hidden[:, 0].sum(-1) * (index + 1)  # depends on the sentence's index, to check it is passed

    maps = attention.attention_gradients(tiny, tokenizer, SENTENCES, target=target, batch_size=1)
    plain = attention.attention_maps(tiny, tokenizer, SENTENCES)
    assert torch.allclose(maps.attn, plain.attn, atol=1e-6) and torch.equal(maps.mask, plain.mask)
    enc = tokenizer(SENTENCES[1:], return_tensors="pt")
    x = tiny.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
    out = tiny(inputs_embeds=x, attention_mask=enc["attention_mask"], output_attentions=True)
    out.attentions[1].retain_grad()
    (2 * out.last_hidden_state[:, 0].sum()).backward()
    n = enc["input_ids"].shape[1]
    assert torch.allclose(maps.grad[1, 1, :, :n, :n], out.attentions[1].grad[0], atol=1e-5)
    assert torch.allclose(maps.input_x_grad[1, :n], (x * x.grad).norm(dim=-1)[0], atol=1e-5)
    assert (maps.grad[:, 0][..., ~maps.mask[0], :] == 0).all()
    with pytest.raises(ValueError, match="one scalar per sentence"):
        attention.attention_gradients(tiny, tokenizer, SENTENCES, target=lambda h, m, i: h[:, 0])


def test_verb_candidates_and_masking(tokenizer):
    pool = ["The dogs are in the garden.", "The dog barks at night.", "I am here today.",
            "The dog barked and the cat slept."]
    found = attention._verb_candidates(pool, tokenizer, 64)
    assert [(i, label) for i, _, _, label in found] == [(0, 1), (1, 0)], "plural are, singular barks, nothing else"
    i, a, b, _ = found[1]
    assert attention._mask_verb(pool[i], a, b, "[MASK]") == "The dog [MASK] at night."
    assert attention._verb_candidates(pool, tokenizer, 5) == [], "max_tokens drops long sentences"


def test_probe_logits_and_setting_targets(tiny, tokenizer):
    weight, bias = torch.randn(2, 32), torch.randn(2)
    probes = {"cls": (weight, bias), "mean": (weight, bias)}
    task = attention.VerbNumber([], np.zeros(0), SENTENCES, np.array([0, 1]), probes)
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    hidden = torch.randn(2, enc["input_ids"].shape[1], 32)
    logits = hidden[:, 0] @ weight.T + bias
    assert torch.allclose(attention.probe_logits(task, hidden, enc["attention_mask"], "cls"), logits)
    target = attention.setting_target(task, "probe on [CLS]", torch.tensor([0, 1]))
    assert torch.allclose(target(hidden, enc["attention_mask"], torch.tensor([0, 1])), logits[[0, 1], [0, 1]])
    norm = attention.setting_target(task, "sentence vector", torch.tensor([0, 1]))(hidden, enc["attention_mask"], None)
    m = enc["attention_mask"][0].bool()
    assert norm[0] == pytest.approx(float(hidden[0, m].mean(0).norm()), rel=1e-5)
    with pytest.raises(ValueError, match="setting"):
        attention.setting_target(task, "probe on max", torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="readout"):
        attention.probe_logits(task, hidden, enc["attention_mask"], "max")
    imp = attention.setting_importance(tiny, tokenizer, task, SENTENCES, [0, 1])
    n_pos = enc["input_ids"].shape[1]
    assert imp["blank"].shape == (3, 2, n_pos) and imp["grad_rollout"].shape == (3, 2, 2, n_pos)
    # blank-out for the [CLS] probe is the drop in the correct class's probability
    base, blanked = attention.blank_out_outputs(
        tiny, tokenizer, SENTENCES, readout=lambda h, am: attention.probe_logits(task, h, am, "cls").softmax(-1)
    )
    assert torch.allclose(imp["blank"][1, 1], base[1, 1] - blanked[1, :, 1], atol=1e-6)


@pytest.mark.slow
def test_committed_verb_number_probes_are_what_the_fitting_code_gives():
    """Re-run the probe fitting of Chapter 1 from scratch on the committed split (about a minute on one
    thread): the refitted probes give the committed probes' probabilities on the held-out sentences."""
    from sklearn.linear_model import LogisticRegression

    model, tok = minilm()
    task = attention.verb_number_task(model, tok)
    with common.torch_threads(common.free_cores()):
        train = attention._readout_features(model, tok, task.train, 64)
        test = attention._readout_features(model, tok, task.test, 64)
    for readout in ("cls", "mean"):
        refit = LogisticRegression(C=1.0, max_iter=2000).fit(train[readout].numpy(), task.train_labels)
        weight, bias = task.probes[readout]
        committed = (test[readout] @ weight.T + bias).softmax(-1)[:, 1].numpy()
        refit_p = refit.predict_proba(test[readout].numpy())[:, 1]
        # 3e-7 on the machine that fitted them, 8e-3 on an AVX-512 one (lbfgs amplifies the features' last bits)
        assert np.abs(refit_p - committed).max() < 3e-2
        assert ((refit_p > 0.5) == (committed > 0.5)).mean() >= 0.99      # the same predicted number


def test_linear_layer_norm_parts_add_up_to_the_layer_norm():
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(6)
    ln.weight.data.uniform_(0.5, 1.5)
    ln.bias.data.normal_()
    parts, bias = torch.randn(3, 4, 6), torch.randn(6)  # [query, part, d]
    states = parts.sum(1) + bias
    pushed = attention._linear_layer_norm(parts, ln, states)  # [query, part, d]
    bias_part = attention._linear_layer_norm(bias.expand(3, 1, 6), ln, states)[:, 0]
    assert torch.allclose(pushed.sum(1) + bias_part + ln.bias, ln(states), atol=1e-5)


def test_contribution_maps_rows_and_a_block_that_only_keeps_the_residual(tiny, tokenizer):
    alti = attention.contribution_maps(tiny, tokenizer, SENTENCES, method="alti")
    globenc = attention.contribution_maps(tiny, tokenizer, SENTENCES, method="globenc")
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool()
    assert alti.shape == globenc.shape == (2, len(SENTENCES), *real.shape[1:], real.shape[1])
    assert (alti >= 0).all() and (globenc >= 0).all()
    assert torch.allclose(alti.sum(-1)[:, real], torch.ones(2, int(real.sum())), atol=1e-5)
    assert (alti[:, ~real] == 0).all() and (globenc[:, ~real] == 0).all()
    rolled = attention.contribution_rollout(alti)
    assert torch.allclose(rolled.sum(-1)[:, real], torch.ones(2, int(real.sum())), atol=1e-4)
    # values that write nothing: every token keeps only its own residual stream
    silent = copy.deepcopy(tiny)
    for layer in silent.encoder.layer:
        layer.attention.self.value.weight.data.zero_()
        layer.attention.self.value.bias.data.zero_()
    for method in ("alti", "globenc"):
        maps = attention.contribution_maps(silent, tokenizer, SENTENCES, method=method)
        off_diagonal = maps * ~torch.eye(maps.shape[-1], dtype=torch.bool)
        assert off_diagonal.abs().max() < 1e-6 and (maps.diagonal(dim1=-2, dim2=-1)[:, real] > 0).all()
    with pytest.raises(ValueError, match="method"):
        attention.contribution_maps(tiny, tokenizer, SENTENCES, method="flow")
    with pytest.raises(ValueError, match="non-negative"):
        attention.contribution_rollout(-alti)


def test_norm_readings_are_the_read_out_maps(tiny, tokenizer):
    readings = attention.norm_readings(tiny, tokenizer, SENTENCES)
    mask = tokenizer(SENTENCES, padding=True, return_tensors="pt")["attention_mask"].bool()
    maps = {"value norms": attention.value_norms(tiny, tokenizer, SENTENCES),
            **{m: attention.contribution_rollout(attention.contribution_maps(tiny, tokenizer, SENTENCES,
                                                                             method=m.lower()))
               for m in ("GlobEnc", "ALTI")}}
    assert list(readings) == list(attention.NORM_READINGS)
    for m, x in maps.items():
        for out in (0, "mean"):
            assert readings[m][out].dtype == torch.float32 and readings[m][out].shape == (2, *mask.shape)
            assert torch.allclose(readings[m][out], attention.read_out(x, mask, output=out), rtol=1e-5, atol=1e-6)


def test_verb_number_readings_store_and_unpack_the_real_tokens(tiny, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(common.ARTEFACT_LOG_ENV, raising=False)
    task = attention.VerbNumber([], np.zeros(0), SENTENCES, np.array([0, 1]), {})
    stored = attention.verb_number_readings(tiny, tokenizer, task)
    assert len(list(tmp_path.glob("results/ch1/norm-readings-*.pt"))) == 1
    again = attention.verb_number_readings(tiny, tokenizer, task)  # loaded from the cache
    direct = attention.norm_readings(tiny, tokenizer, SENTENCES)
    for m in attention.NORM_READINGS:
        for out in (0, "mean"):
            assert torch.equal(again[m][out], stored[m][out])
            assert torch.allclose(stored[m][out], direct[m][out], rtol=1e-6, atol=0)
