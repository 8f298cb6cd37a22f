"""Known-answer tests for helpers.attention (Chapter 1): the BERT block by hand, rollout, flow, graphs."""

import networkx as nx
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from helpers import attention
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
    with attention.capture(modules) as cache, torch.inference_mode():
        out = tiny(**enc, output_hidden_states=True)
    mine = attention.manual_bert_layer(layer, out.hidden_states[1], enc["attention_mask"])
    assert torch.allclose(mine["ffn_act"], cache["ffn_act"], atol=1e-5)
    assert torch.allclose(mine["resid_mid"], cache["resid_mid"], atol=1e-5)
    assert all(not m._forward_hooks for m in modules.values())


def test_capture_removes_hooks_on_error():
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError), attention.capture({"lin": lin}):
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


def test_attention_maps_rejects_bad_inputs(tiny, tokenizer):
    with pytest.raises(ValueError, match="list of strings"):
        attention.attention_maps(tiny, tokenizer, "one sentence")
    with pytest.raises(ValueError, match="non-empty"):
        attention.attention_maps(tiny, tokenizer, ["fine", "  "])
    sdpa = BertModel._from_config(tiny.config, attn_implementation="sdpa").eval()
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
