"""Known-answer tests for helpers.heads on a tiny BERT whose first two heads are set by hand.

Layer 0, head 0 attends to the previous token (rotary-style position codes in its query/key
weights); layer 0, head 1 attends to [SEP] (a key feature that only [SEP] carries). Every other
head has zero query/key weights, hence uniform attention. The detector must rank the two crafted
heads first for their patterns.
"""

import math

import numpy as np
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


# --- held-out selection, Clark's possessive rule and offsets, attention parser, ablation probes ---


def _four_sentence_records():
    """Four copies of "[CLS] the cat sat [SEP]" (det the->cat, nsubj cat->sat): in sentences 10 and 12
    head 0 is right and head 1 wrong, in sentences 11 and 13 the reverse."""
    heads_ = [[1, 2, 2]] * 4
    labels = [["det", "nsubj", "ROOT"]] * 4
    words = [["the", "cat", "sat"]] * 4
    n_words = torch.tensor([3] * 4)
    gold = heads.gold_heads(heads_, labels, n_words, 5)
    word_attn = torch.zeros(1, 4, 2, 5, 5)
    right, wrong = {1: 2, 2: 3, 3: 2}, {1: 3, 2: 1, 3: 1}
    for b in range(4):
        h0, h1 = (right, wrong) if b % 2 == 0 else (wrong, right)
        for d, g in h0.items():
            word_attn[0, b, 0, d, g] = 1.0
        for d, g in h1.items():
            word_attn[0, b, 1, d, g] = 1.0
    records = heads.ArcRecords(["det", "nsubj"])
    records.update(word_attn, gold, words, labels, n_words, [10, 11, 12, 13])
    return records


def test_arc_records_select_on_one_half_report_on_the_other():
    records = _four_sentence_records()
    out = records.outcomes()
    assert out["sentence"].tolist() == [10, 10, 11, 11, 12, 12, 13, 13] and out["word"].tolist()[:2] == [1, 2]
    assert out["dep->head"][:4, 0].tolist() == [True, True, False, False]
    assert records.offsets == [-3, -2, -1, 0, 1, 2]  # Clark's range(-3, 3)
    # chosen on sentences 10 and 12, where head 0 is perfect; reported on 11 and 13, where it always fails
    table = records.table([10, 12], [11, 13], n_resamples=200)
    assert table.loc["det", "best head"] == "L1·H1" and table.loc["det", "selection accuracy"] == 1.0
    assert table.loc["det", "accuracy"].value == 0.0
    assert table.loc["det", "in-sample best"] == 1.0  # choosing on the report half would have hidden it
    assert table.loc["det", "best offset"] == 1 and table.loc["det", "offset accuracy"].value == 1.0
    assert table.loc["det", "gain"].value == -1.0
    # swapping the halves swaps the chosen head: the report half never influences the choice
    swapped = heads.ArcRecords.from_state(records.state()).table([11, 13], [10, 12], n_resamples=200)
    assert swapped.loc["det", "best head"] == "L1·H2"
    with pytest.raises(ValueError, match="overlap"):
        records.table([10, 11], [11, 13])


def test_possessive_rule_scores_the_prediction_of_s():
    # [CLS] John 's car [SEP]: poss(John -> car), case('s -> John), car is the root
    words = [["John", "'s", "car"]]
    labels = [["poss", "case", "ROOT"]]
    n_words = torch.tensor([3])
    gold = heads.gold_heads([[2, 0, 2]], labels, n_words, 5)
    word_attn = torch.zeros(1, 1, 1, 5, 5)
    word_attn[0, 0, 0, 1, 2] = 1.0  # John attends to 's (wrong on its own)
    word_attn[0, 0, 0, 2, 3] = 1.0  # 's attends to car (right for Clark's rule)
    word_attn[0, 0, 0, 3, 1] = 1.0
    hits = {}
    for possessive in (True, False):
        records = heads.ArcRecords(["poss"], possessive=possessive)
        records.update(word_attn, gold, words, labels, n_words, [0])
        out = records.outcomes()
        poss = out["rel"] == 0
        hits[possessive] = (bool(out["dep->head"][poss, 0][0]), out["offset"][poss][0].tolist())
    assert hits[True][0] and not hits[False][0]
    # offsets -3..+2 from 's (rule) or from John: +1 from 's and +2 from John reach "car"
    assert hits[True][1] == [False, False, False, False, True, True]  # +2 is clipped to the last word
    assert hits[False][1] == [False, False, False, False, False, True]


def test_attention_parser_learns_the_informative_map():
    # two maps: map 0 is 1 exactly on the gold head (or on [CLS] for the root), map 1 is noise
    gen = torch.Generator().manual_seed(0)
    feats, targets = [], []
    for _ in range(30):
        n = 5
        target = torch.randint(0, n + 1, (n,), generator=gen)
        f = torch.zeros(n, n + 2, 2)
        f[..., 1] = torch.rand(n, n + 2, generator=gen)
        for d, t in enumerate(target.tolist()):
            f[d, t if t > 0 else 0, 0] = 1.0
        feats.append(f)
        targets.append(target)
    parser = heads.AttentionParser(2)
    history = parser.fit(feats[:20], targets[:20], epochs=20, lr=0.05)
    assert history[-1] < history[0]
    uas = torch.cat([parser.predict(f) == t for f, t in zip(feats[20:], targets[20:], strict=True)]).float().mean()
    assert uas == 1.0
    assert parser.weight[0] > abs(parser.weight[1])
    with pytest.raises(ValueError, match="same length"):
        parser.fit(feats, targets[:3])


def test_arc_features_layout_and_targets():
    word_attn = torch.rand(2, 1, 3, 6, 6)  # 2 layers x 3 heads, 4 words
    feats = heads.arc_features(word_attn, torch.tensor([4]))[0]
    assert feats.shape == (4, 6, 12)
    assert feats[1, 3, 4] == word_attn[1, 0, 1, 2, 3]  # dependent word 2 -> candidate 3, layer 1 head 1
    assert feats[1, 3, 6 + 4] == word_attn[1, 0, 1, 3, 2]  # the transposed map
    assert heads.parser_targets([1, 1, 5], ["det", "ROOT", "dobj"], 3).tolist() == [2, 0, -1]


def test_bigram_shift_swaps_one_adjacent_pair_in_every_second_sentence():
    sentences = [f"w{i} a b c d e ." for i in range(6)]
    texts, y = heads.bigram_shift(sentences, seed=1)
    assert y.tolist() == [0, 1, 0, 1, 0, 1]
    for s, t, label in zip(sentences, texts, y, strict=True):
        a, b = s.split(), t.split()
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        assert sorted(a) == sorted(b) and a[-1] == b[-1]
        assert diff == [] if label == 0 else (len(diff) == 2 and diff[1] == diff[0] + 1)
    with pytest.raises(ValueError, match="at least 3"):
        heads.bigram_shift(["a b", "c d"])


def test_head_positions_classes():
    # "the cat sat on mats ." : det(+1), nsubj(+1), ROOT, prep(-1), pobj(-1), punct
    assert heads.head_positions([1, 2, 2, 2, 3, 2], ["det", "nsubj", "ROOT", "prep", "pobj", "punct"], 6) == [
        4, 4, 0, 3, 3, -1]
    assert heads.head_positions([3, 3, 3, 0], ["det", "amod", "ROOT", "dep"], 4) == [6, 5, 0, 1]


def test_probes_under_ablation_match_the_unablated_model(model, tokenizer):
    keep = torch.ones(2, N_LAYERS, N_HEADS)
    keep[1, 0, 0] = 0  # the previous-token head
    out = heads.probe_under_ablation(model, tokenizer, SENTENCES * 2, [0, 1, 0, 1] * 2, SENTENCES, [0, 1, 0, 1], keep)
    assert out["correct"].shape == out["loss"].shape == out["cos"].shape == (2, 4)
    assert np.allclose(out["cos"][0], 1.0, atol=1e-5) and (out["correct"][0] == out["base_correct"]).all()
    assert np.allclose(out["loss"][0], out["base_loss"], atol=1e-5)
    assert (out["cos"][1] < 1 - 1e-5).all()  # masking a crafted head moves every embedding
    words = [s.split() for s in SENTENCES]
    labels = [[i % 2 for i in range(len(w))] for w in words]
    vecs = heads.ablated_word_vectors(model, tokenizer, words, keep)
    assert vecs.shape == (2, sum(map(len, words)), D)
    wout = heads.word_probe_under_ablation(model, tokenizer, words, labels, words, labels, keep)
    assert wout["correct"].shape == (2, sum(map(len, words)))
    assert (wout["correct"][0] == wout["base_correct"]).all()
    with pytest.raises(ValueError, match="labels for"):
        heads.word_probe_under_ablation(model, tokenizer, words, labels[:-1], words, labels, keep)
    with pytest.raises(ValueError, match="keep must be"):
        heads.probe_under_ablation(model, tokenizer, SENTENCES, [0, 1, 0, 1], SENTENCES, [0, 1, 0, 1],
                                   torch.ones(N_LAYERS, N_HEADS))


def test_neighbour_classes_reads_the_neighbours_label_and_skips_what_it_cannot_score():
    labels = ["det", "amod", "nsubj", "ROOT", "punct", "dobj"]
    prev = heads.neighbour_classes(labels, 6, offset=-1, classes=["det", "nsubj"])
    assert prev == [-1, 0, 2, 1, -1, 2]  # amod and punct are "other" (class 2); punct itself is not scored
    nxt = heads.neighbour_classes(labels, 4, offset=1, classes=["det", "nsubj"])
    assert nxt == [2, 1, 2, -1]  # truncated to 4 words: the last word's neighbour was cut
    assert heads.neighbour_classes(labels, 6, offset=-2, classes=[]) == [-1, -1, 0, 0, -1, 0]
    with pytest.raises(ValueError, match="non-zero"):
        heads.neighbour_classes(labels, 6, offset=0, classes=[])
    with pytest.raises(ValueError, match="n must lie"):
        heads.neighbour_classes(labels, 7, offset=1, classes=[])
