"""Known-answer tests for helpers.heads on a tiny BERT whose first two heads are set by hand.

Layer 0, head 0 attends to the previous token (rotary-style position codes in its query/key
weights); layer 0, head 1 attends to [SEP] (a key feature that only [SEP] carries). Every other
head has zero query/key weights, hence uniform attention. The detector must rank the two crafted
heads first for their patterns.
"""

import math

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from helpers import heads

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "ran", "##s", ".", ","]
SENTENCES = [
    "the cat sat on the mat .",
    "the dog ran .",
    "the cats sat , the dogs ran on the mat .",
    "cats ran",
]
N_LAYERS, N_HEADS, D = 2, 4, 64
THETA = math.pi / 32  # angle per position: no wrap-around within 32 positions


@pytest.fixture(scope="module")
def tokenizer():
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(VOCAB)}, do_lower_case=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=D,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        intermediate_size=D,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        emb = model.embeddings
        emb.word_embeddings.weight.zero_()
        emb.token_type_embeddings.weight.zero_()
        emb.word_embeddings.weight[VOCAB.index("[SEP]"), 4] = 1.0  # only [SEP] carries dims 4/5
        emb.word_embeddings.weight[VOCAB.index("[SEP]"), 5] = -1.0
        pos = torch.arange(32) * THETA
        code = torch.stack([pos.cos(), pos.sin()], 1)  # [position, 2]
        emb.position_embeddings.weight.zero_()
        emb.position_embeddings.weight[:, 0:2] = code
        emb.position_embeddings.weight[:, 2:4] = -code  # every embedding has mean 0, so LayerNorm only rescales
        emb.LayerNorm.weight.zero_()
        emb.LayerNorm.weight[:6] = 1.0
        emb.LayerNorm.bias.zero_()
        emb.LayerNorm.bias[10] = 1.0  # a constant feature for head 1's query
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.zero_()
            layer.attention.self.query.bias.zero_()
            layer.attention.self.key.weight.zero_()
            layer.attention.self.key.bias.zero_()
        sa = model.encoder.layer[0].attention.self
        c, s = math.cos(THETA), math.sin(THETA)
        # head 0 (output dims 0..15): query = rotation by -theta of the position code, key = the code
        sa.query.weight[0:2, 0:2] = 100.0 * torch.tensor([[c, s], [-s, c]])
        sa.key.weight[0:2, 0:2] = torch.eye(2)
        # head 1 (output dims 16..31): constant query, key = [SEP] feature
        sa.query.weight[16, 10] = 30.0
        sa.key.weight[16, 4] = 1.0
    return model


@pytest.fixture(scope="module")
def batches(model, tokenizer):
    return list(heads.iter_attention(model, tokenizer, SENTENCES, batch_size=3))


def test_iter_attention_covers_every_sentence_sorted_by_length(batches):
    seen = [i for idx, _ in batches for i in idx]
    assert sorted(seen) == list(range(len(SENTENCES)))
    widths = [maps.attn.shape[-1] for _, maps in batches]
    assert widths == sorted(widths)


def test_rows_sum_to_one_after_padding_masks(batches):
    for _, maps in batches:
        assert heads.row_sums_ok(maps.attn, maps.mask)
        pad = ~maps.mask
        assert (maps.attn * pad[None, :, None, :, None]).abs().sum() == 0  # padding query rows
        assert (maps.attn * pad[None, :, None, None, :]).abs().sum() == 0  # padding key columns


def test_crafted_heads_rank_first(batches):
    stats = heads.HeadStatistics()
    for _, maps in batches:
        stats.update(maps.attn, maps.tokens)
    result = stats.result()
    for pattern, (layer, head) in [("previous", (0, 0)), ("sep", (0, 1))]:
        scores = result[pattern]  # [layer, head]
        assert scores.shape == (N_LAYERS, N_HEADS)
        assert divmod(int(scores.argmax()), N_HEADS) == (layer, head), pattern
        # the [CLS] query has no previous token, so the best possible score is (n - 1) / n
        assert scores[layer, head] > 0.75
        others = scores.flatten()[torch.arange(N_LAYERS * N_HEADS) != layer * N_HEADS + head]
        assert others.max() < 0.5
    # uniform heads are the broadest
    assert result["broad"][1].min() > 0.99
    assert result["broad"][0, 0] < 0.2


def test_head_scores_agrees_with_a_pattern_matrix(batches):
    _, maps = batches[-1]
    width = maps.attn.shape[-1]
    for name in ["previous", "current", "next", "first", "cls", "sep", "punct"]:
        matrix = heads.pattern_matrix(maps.tokens, width, pattern=name)
        assert torch.allclose(
            heads.head_scores(maps.attn, maps.tokens, pattern=name),
            heads.head_scores(maps.attn, maps.tokens, pattern=matrix),
            atol=1e-6,
        )
    assert torch.allclose(
        heads.head_scores(maps.attn, maps.tokens, pattern="first"),
        heads.head_scores(maps.attn, maps.tokens, pattern="cls"),
    )


def test_js_divergence_is_a_symmetric_zero_diagonal_matrix(batches):
    _, maps = batches[-1]
    total, n = heads.js_divergence(maps.attn, maps.mask)
    js = total / n
    assert torch.allclose(js, js.T)
    assert js.diagonal().abs().max() == 0
    assert js.max() <= math.log(2) + 1e-6
    # layer-1 heads are all uniform, so identical: divergence 0 between them
    block = js[N_HEADS:, N_HEADS:]
    assert block.max() < 1e-6
    assert js[0, 1] > 0.3  # previous-token head vs [SEP] head


def test_word_attention_preserves_row_sums(model, tokenizer):
    words = [s.split() for s in SENTENCES]
    for idx, maps in heads.iter_attention(model, tokenizer, words, batch_size=4):
        index = heads.align_words(tokenizer, [words[i] for i in idx])
        assert index.shape == maps.mask.shape
        word_attn = heads.word_attention(maps.attn, index)  # [layer, batch, head, word, word]
        n_words = index.amax(1) + 1
        for b in range(len(idx)):
            sums = word_attn[:, b, :, : n_words[b]].sum(-1)
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
            assert word_attn[:, b, :, n_words[b] :].abs().sum() == 0


def test_align_words_maps_pieces_to_words(tokenizer):
    index = heads.align_words(tokenizer, [["the", "cats", "ran"], ["dogs"]])
    # [CLS] the cat ##s ran [SEP] / [CLS] dog ##s [SEP] [PAD] [PAD]
    assert index.tolist() == [[0, 1, 2, 2, 3, 4], [0, 1, 1, 2, -1, -1]]


def test_word_attention_sums_to_and_averages_from_pieces():
    attn = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.3, 0.6], [0.0, 0.2, 0.8]])[None, None, None]
    word = heads.word_attention(attn, torch.tensor([[0, 1, 1]]))[0, 0, 0]
    expected = torch.tensor([[0.5, 0.5], [(0.1 + 0.0) / 2, (0.9 + 1.0) / 2]])
    assert torch.allclose(word, expected)


def test_relation_probe_and_offset_baseline():
    # one sentence: [CLS] the cat sat [SEP]; det(the -> cat), nsubj(cat -> sat), sat is the root
    heads_ = [[1, 2, 2]]
    labels = [["det", "nsubj", "ROOT"]]
    n_words = torch.tensor([3])
    gold = heads.gold_heads(heads_, labels, n_words, 5)
    assert gold.tolist() == [[-1, 2, 3, -1, -1]]
    word_attn = torch.zeros(1, 1, 2, 5, 5)
    word_attn[0, 0, 0, 1, 2] = word_attn[0, 0, 0, 2, 3] = 1.0  # head 0: dependents attend to their heads
    word_attn[0, 0, 1, 1, 3] = word_attn[0, 0, 1, 2, 1] = 1.0  # head 1: wrong
    word_attn[0, 0, :, 3, 2] = 1.0
    probe = heads.RelationProbe(["det", "nsubj"])
    probe.update(word_attn, gold, labels, n_words)
    acc = probe.accuracy("dep->head")  # [layer, head, relation + all]
    assert acc[0, 0].tolist() == [1.0, 1.0, 1.0]
    assert acc[0, 1].tolist() == [0.0, 0.0, 0.0]
    table = probe.table()
    assert table.loc["det", "best head"] == "L1·H1"
    assert table.loc["det", "best offset"] == 1 and table.loc["det", "offset accuracy"] == 1.0


def test_head_mask_and_restarted_ablation_match_a_full_forward(model, tokenizer):
    texts = SENTENCES[:3]
    keep = torch.ones(3, N_LAYERS, N_HEADS)
    keep[1, 0, 0] = 0  # a crafted head
    keep[2, 1] = 0  # a whole layer
    restarted = heads.ablated_embeddings(model, tokenizer, texts, keep, batch_size=2)
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    weights = enc["attention_mask"][..., None].float()
    for c in range(3):
        with torch.no_grad(), heads.head_mask(model, keep[c]):
            hidden = model(**enc).last_hidden_state
        full = (hidden * weights).sum(1) / weights.sum(1)
        assert torch.allclose(restarted[c], full, atol=1e-5)
    assert not torch.allclose(restarted[0], restarted[1], atol=1e-4)
    assert not any(m.attention.output.dense._forward_pre_hooks for m in model.encoder.layer)


def test_bad_inputs_raise_clear_errors(batches, model, tokenizer):
    _, maps = batches[0]
    with pytest.raises(ValueError, match="one list of word pieces per sentence"):
        heads.head_scores(maps.attn, maps.tokens[:-1], pattern="previous")
    with pytest.raises(ValueError, match=r"\[layer, batch, head, query, key\]"):
        heads.head_scores(maps.attn[0], maps.tokens, pattern="previous")
    with pytest.raises(ValueError, match="empty batch"):
        heads.head_scores(maps.attn[:, :0], [], pattern="previous")
    with pytest.raises(ValueError, match="NaN"):
        heads.head_scores(torch.full_like(maps.attn, float("nan")), maps.tokens, pattern="previous")
    with pytest.raises(ValueError, match="unknown pattern"):
        heads.head_scores(maps.attn, maps.tokens, pattern="diagonal")
    with pytest.raises(ValueError, match="pattern matrix must be"):
        heads.head_scores(maps.attn, maps.tokens, pattern=torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="word pieces but attn has"):
        heads.head_scores(maps.attn, [t + ["x"] * 40 for t in maps.tokens], pattern="sep")
    with pytest.raises(ValueError, match="word_index must be"):
        heads.word_attention(maps.attn, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="direction"):
        heads.head_predictions(torch.zeros(1, 1, 1, 3, 3), torch.tensor([1]), direction="up")
    with pytest.raises(ValueError, match="keep must be"):
        heads.ablated_embeddings(model, tokenizer, SENTENCES, torch.ones(N_LAYERS, N_HEADS))
    with pytest.raises(ValueError, match="non-empty"):
        list(heads.iter_attention(model, tokenizer, []))
    with pytest.raises(ValueError, match="no batch"):
        heads.HeadStatistics().result()
    with pytest.raises(ValueError, match="at least one relation"):
        heads.RelationProbe([])
