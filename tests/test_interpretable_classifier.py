"""helpers.interpretable_classifier: exact decompositions, masking, determinism, CSV validation."""

import numpy as np
import pytest
import torch
from scipy import sparse

from helpers import evaluation, sinr, stats
from helpers import interpretable_classifier as ic

WORDS = ("good", "great", "bad", "awful", "film", "plot")


def _embedding(seed=0):
    rng = np.random.default_rng(seed)
    vectors = sparse.csr_matrix(rng.random((len(WORDS), 4)) * (rng.random((len(WORDS), 4)) < 0.7))
    return sinr.SinrEmbedding(WORDS, vectors, np.arange(len(WORDS)) % 4)


def _model(seed=0, n_classes=3):
    torch.manual_seed(seed)
    model = ic.TaskAttentionClassifier(_embedding().vectors, n_classes, tau=0.5)
    with torch.no_grad():
        model.query.normal_()
        model.linear.weight.normal_()
        model.linear.bias.normal_()
    return model


def test_attention_sums_to_one_and_z_is_a_convex_mixture_of_the_inputs():
    model = _model()
    enc = ic.encode(_embedding(), ["good film", "awful awful plot, bad", "great"])
    ex = model.explain(enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(ex.attention.sum(1), torch.ones(3))
    assert (ex.attention[~enc.attention_mask] == 0).all()
    x = model.embeddings[enc.input_ids]                                  # [batch, pos, dim]
    for b in range(3):
        # z = x^T alpha with alpha >= 0 summing to 1: inside the convex hull of the document's vectors
        torch.testing.assert_close(ex.z[b], (ex.attention[b, :, None] * x[b]).sum(0))
        assert (ex.z[b] <= x[b][enc.attention_mask[b]].max(0).values + 1e-6).all()


def test_contributions_sum_to_the_logits_up_to_the_bias():
    model = _model()
    enc = ic.encode(_embedding(), ["good film", "bad plot", "great great film"])
    ex = model.explain(enc.input_ids, enc.attention_mask)
    torch.testing.assert_close(ex.contributions.sum(-1) + ex.bias, ex.logits)
    torch.testing.assert_close(model(enc.input_ids, enc.attention_mask), ex.logits)


def test_out_of_vocabulary_only_input_falls_back_on_the_bias_not_nan():
    model = _model()
    enc = ic.encode(_embedding(), ["nothing we know here", "good"])
    assert not enc.attention_mask[0].any()
    ex = model.explain(enc.input_ids, enc.attention_mask)
    assert torch.isfinite(ex.logits).all()
    assert (ex.attention[0] == 0).all() and (ex.z[0] == 0).all()
    torch.testing.assert_close(ex.logits[0], model.linear.bias)


def test_masked_softmax_matches_softmax_on_the_kept_entries():
    scores = torch.randn(4, 7)
    mask = torch.rand(4, 7) > 0.4
    mask[0] = True
    out = ic.masked_softmax(scores, mask)
    for b in range(4):
        if mask[b].any():
            torch.testing.assert_close(out[b, mask[b]], scores[b, mask[b]].softmax(0))
        assert (out[b, ~mask[b]] == 0).all()


def _toy_data():
    texts = ["good film", "great plot", "good great", "bad film", "awful plot", "bad awful"] * 5
    labels = torch.tensor([1, 1, 1, 0, 0, 0] * 5)
    return ic.encode(_embedding(), texts), labels


def test_training_is_deterministic_under_a_seed_and_learns_the_toy_task():
    enc, y = _toy_data()
    runs = []
    for _ in range(2):
        model = ic.TaskAttentionClassifier(_embedding().vectors, 2, tau=0.5)
        losses = ic.fit(model, enc.input_ids, enc.attention_mask, y, epochs=40, lr=0.1, batch_size=8, seed=3)
        runs.append((losses, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k in runs[0][1]:
        assert torch.equal(runs[0][1][k], runs[1][1][k])
    assert runs[0][0][-1] < runs[0][0][0]


def test_nonnegative_readout_stays_nonnegative():
    enc, y = _toy_data()
    model = ic.TaskAttentionClassifier(_embedding().vectors, 2)
    ic.fit(model, enc.input_ids, enc.attention_mask, y, epochs=5, nonnegative=True)
    assert (model.linear.weight >= 0).all()


def test_context_tagger_decomposes_and_ignores_the_token_itself_in_its_context():
    emb = _embedding()
    torch.manual_seed(0)
    tagger = ic.ContextTagger(emb.vectors, 3, window=1, tau=0.5)
    with torch.no_grad():
        for p in tagger.parameters():
            p.normal_()
    enc = ic.encode_words(emb, [["Good", "film", ",", "bad", "plot"], ["awful"]])
    assert enc.input_ids[0, 2] == ic.PAD and enc.attention_mask[0, 2]
    ex = tagger.explain(enc.input_ids, enc.attention_mask)
    total = ex["self_contributions"].sum(-1) + ex["context_contributions"].sum(-1) + tagger.self_linear.bias
    torch.testing.assert_close(total, ex["logits"])
    torch.testing.assert_close(tagger(enc.input_ids, enc.attention_mask), ex["logits"])
    assert (ex["attention"][..., 1] == 0).all()                       # offset 0 = the token itself
    # "film" (position 1) attends to "Good" and the padding-id comma is skipped: all mass on offset -1
    torch.testing.assert_close(ex["attention"][0, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert (ex["attention"][1, 0] == 0).all()                         # a lone word has no context


def test_task_vector_and_class_dimensions_name_dimensions_by_words():
    emb = _embedding()
    model = _model()
    dims = ic.task_vector_dimensions(model, emb, k=2, words=2, sign="positive")
    assert len(dims) == 2 and dims[0][1] >= dims[1][1]
    enc = ic.encode(emb, ["good film"])
    ex = model.explain(enc.input_ids, enc.attention_mask)
    for _, value, words in ic.class_dimensions(ex, emb, 0, 1, k=3):
        assert value > 0 and set(words) <= set(WORDS)


def test_csv_loader_reads_valid_files(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('text,label\n"a kind, gentle remark",ok\nsome hateful insult,hate\nanother remark,ok\n')
    texts, y, names = ic.load_labelled_csv(path)
    assert texts[0] == "a kind, gentle remark" and names == ["hate", "ok"] and y.tolist() == [1, 0, 1]
    _, y2, names2 = ic.load_labelled_csv(path, labels=["ok", "hate"])
    assert names2 == ["ok", "hate"] and y2.tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ("", {}, "empty"),
        ("text,label\n", {}, "no data rows"),
        ("sentence,label\nhello,ok\nbye,bad\n", {}, "lacks"),
        ("text,label\nhello,ok\nbye,weird\n", {"labels": ["ok", "bad"]}, "unknown label"),
        ("text,label\nhello,ok\n,bad\n", {}, "empty text or label"),
        ("text,label\nhello,ok\nbye,ok\n", {}, "at least two labels"),
    ],
)
def test_csv_loader_rejects_bad_files_with_clear_messages(tmp_path, content, kwargs, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        ic.load_labelled_csv(path, **kwargs)


def test_bad_input_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ic.load_labelled_csv(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="non-empty"):
        ic.encode(_embedding(), [])
    model = _model()
    with pytest.raises(ValueError, match="input_ids must lie"):
        model(torch.tensor([[99]]), torch.tensor([[True]]))
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model(torch.tensor([1, 2]), torch.tensor([True, True]))
    with pytest.raises(ValueError, match="n_classes"):
        ic.TaskAttentionClassifier(_embedding().vectors, 1)
    with pytest.raises(ValueError, match="window"):
        ic.ContextTagger(_embedding().vectors, 3, window=0)


# ---- the task vector: its negative coordinates are shown, the simplex variant is a point of SINr space ----


def test_task_vector_dimensions_shows_the_negative_coordinates_of_a_free_task_vector():
    emb = _embedding()
    model = ic.TaskAttentionClassifier(emb.vectors, 2)
    with torch.no_grad():
        model.query.copy_(torch.tensor([3.0, -5.0, 1.0, -0.5]))
    both = ic.task_vector_dimensions(model, emb, k=2)
    assert [(d, v) for d, v, _ in both] == [(0, 3.0), (2, 1.0), (1, -5.0), (3, -0.5)]
    assert [d for d, _, _ in ic.task_vector_dimensions(model, emb, k=1, sign="negative")] == [1]
    with pytest.raises(ValueError, match="sign"):
        ic.task_vector_dimensions(model, emb, sign="largest")


def test_simplex_task_vector_is_nonnegative_sums_to_one_and_trains():
    enc, y = _toy_data()
    model = ic.TaskAttentionClassifier(_embedding().vectors, 2, tau=0.1, query="simplex")
    torch.testing.assert_close(model.task_vector, torch.full((4,), 0.25))       # starts uniform: plain mean
    losses = ic.fit(model, enc.input_ids, enc.attention_mask, y, epochs=30, lr=0.1, batch_size=8)
    u = model.task_vector.detach()
    assert (u >= 0).all() and torch.isclose(u.sum(), torch.tensor(1.0)) and losses[-1] < losses[0]
    assert [v >= 0 for _, v, _ in ic.task_vector_dimensions(model, _embedding(), k=4)] == [True] * 4
    with pytest.raises(ValueError, match="query"):
        ic.TaskAttentionClassifier(_embedding().vectors, 2, query="positive")


def test_vector_logits_match_the_forward_pass():
    model = _model()
    enc = ic.encode(_embedding(), ["good film", "awful plot bad", "great"])
    x = model.embeddings[enc.input_ids]
    torch.testing.assert_close(model.vector_logits(x, enc.attention_mask), model(enc.input_ids, enc.attention_mask))
    with pytest.raises(ValueError, match="vectors must be"):
        model.vector_logits(x[..., :2], enc.attention_mask)


def test_training_ignores_padding_columns():
    """fit cuts each batch to its longest real sequence: extra padding must not change the trained model."""
    enc, y = _toy_data()
    pad = torch.zeros(enc.input_ids.shape[0], 5, dtype=torch.long)
    runs = []
    for ids, mask in [(enc.input_ids, enc.attention_mask),
                      (torch.cat([enc.input_ids, pad], 1), torch.cat([enc.attention_mask, pad.bool()], 1))]:
        model = ic.TaskAttentionClassifier(_embedding().vectors, 2, tau=0.5)
        ic.fit(model, ids, mask, y, epochs=10, lr=0.1, batch_size=8, seed=1)
        runs.append(model.state_dict())
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k])


# ---- SINr without the held-out text ----

NOVEL = "TITLE\n\nCHAPTER 1\n\none two three four\n\nfive six\n\nCHAPTER 2\n\nseven eight nine ten\n\nCHAPTER 3\n\nx y"


def test_chapter_of_tokens_counts_headings_and_gives_the_title_page_to_the_first_chapter():
    assert ic.chapter_of_tokens(NOVEL).tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]
    assert ic.chapter_of_tokens("Chapter XIV\nword").tolist() == [0, 0, 0]
    assert ic.chapter_of_tokens("a chapter of my life\nword").tolist() == [0] * 6      # not a heading


def test_austen_chapter_folds_assigns_passages_to_the_fold_of_their_chapter_and_drops_straddlers():
    novels = {"A": NOVEL}
    tokens = NOVEL.split()
    cut = [" ".join(tokens[i:i + 3]) for i in range(0, len(tokens) - 2, 3)]      # 6 passages of 3 words
    folds = ic.austen_chapter_folds(novels, [(c, 0) for c in cut], ["A"], words=3, k=2)
    # passages: [TITLE CHAPTER 1] ch0, [one two three] ch0, [four five six] ch0, [CHAPTER 2 seven] ch1,
    # [eight nine ten] ch1, [CHAPTER 3 x] ch2 -- none straddles
    assert folds.chapters.tolist() == [0, 0, 0, 1, 1, 2] and folds.folds.tolist() == [0, 0, 0, 1, 1, 0]
    assert folds.rows.tolist() == list(range(6)) and folds.dropped == 0
    with pytest.raises(ValueError, match="not a 3-word passage"):                 # not cut at a multiple of 3
        ic.austen_chapter_folds(novels, [(" ".join(tokens[7:10]), 0)], ["A"], words=3, k=2)
    four = [" ".join(tokens[i:i + 4]) for i in range(0, len(tokens) - 3, 4)]   # 4-word cuts: some straddle
    f4 = ic.austen_chapter_folds(novels, [(c, 0) for c in four], ["A"], words=4, k=2)
    assert f4.dropped == 2 and f4.rows.tolist() == [0, 1]              # "six CHAPTER 2 seven", "eight nine ten CHAPTER"


def test_document_folds_follow_the_paragraphs_through_the_chapters():
    docs = [("wikipedia", "an article")] + [("A", p) for p in NOVEL.split("\n\n") if p.strip()]
    assert ic.document_folds(docs, {"A": NOVEL}, k=2).tolist() == [-1, 0, 0, 0, 0, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="cover"):
        ic.document_folds(docs[:-1], {"A": NOVEL}, k=2)
    assert ic.documents_containing(docs, ["seven eight", "an art"]).tolist() == [True] + [False] * 5 + [True, False,
                                                                                                         False]
    with pytest.raises(ValueError, match="occurs in no document"):
        ic.documents_containing(docs, ["eleven"])


def _toy_documents(n=60, seed=0):
    rng = np.random.default_rng(seed)
    topics = [["cat", "dog", "pet", "fur", "paw"], ["sun", "moon", "star", "sky", "orbit"],
              ["tea", "cake", "cup", "sugar", "milk"]]
    return [" ".join(rng.choice(topics[i % 3], 12)) for i in range(n)]


def test_sinr_embedding_equals_sinr_train_and_reads_its_cached_partition(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))
    config = {"min_count": 2, "window": 2, "gamma": 1.0, "seed": 0, "topk": 3, "min_nnz": 1}
    docs = _toy_documents()
    ours = ic.sinr_embedding(docs, config=config, name="toy")
    ref = sinr.train(sinr.corpus_from_documents(docs, min_count=2), window=2, gamma=1.0, seed=0)
    ref = ref.sparsified(3).filtered(min_nnz=1)
    assert ours.words == ref.words and (ours.vectors != ref.vectors).nnz == 0
    assert np.array_equal(ours.membership, ref.membership)
    cached = list((tmp_path / "models" / "ch3").glob("toy-*.npz"))
    assert len(cached) == 1
    words = [sinr.tokenize(d) for d in docs]
    assert ic._corpus_from_words(words, min_count=2).fingerprint() == sinr.corpus_from_documents(
        docs, min_count=2).fingerprint()
    tokenised = ic.sinr_embedding(words, config=config, name="toy")                               # same corpus
    assert (tokenised.vectors != ours.vectors).nnz == 0
    assert len(list((tmp_path / "models" / "ch3").glob("toy-*.npz"))) == 1                     # no new partition


# ---- intervals over clusters ----


def test_ratio_estimate_matches_the_stats_layer_on_singleton_clusters_and_resamples_clusters():
    rng = np.random.default_rng(1)
    a, b = (rng.random(60) < 0.6).astype(float), (rng.random(60) < 0.5).astype(float)
    ones = np.ones(60)
    e, ref = ic.ratio_estimate(a, ones), stats.bootstrap_ci(a)
    assert (e.value, e.lo, e.hi) == pytest.approx((ref.value, ref.lo, ref.hi))
    d, ref_d = ic.ratio_estimate(a, ones, versus=(b, ones)), stats.paired_difference(a, b)
    assert (d.value, d.lo, d.hi, d.p) == pytest.approx((ref_d.value, ref_d.lo, ref_d.hi, ref_d.p))
    # the ratio of sums, not the mean of ratios; groups of examples resampled whole
    groups = np.repeat(np.arange(20), 3)
    num, den = ic.cluster_sums(a, groups), ic.cluster_sums(ones, groups)
    g = ic.ratio_estimate(num, den, unit="chapters")
    assert g.value == pytest.approx(a.mean()) and g.n == 20 and "20 chapters" in g.method
    assert ic.ratio_estimate([1, 1], [1, 1]).lo == 1.0                                  # all equal: no spread
    with pytest.raises(ValueError, match="same clusters"):
        ic.ratio_estimate(num, den, versus=(num[:5], den[:5]))
    with pytest.raises(ValueError, match="one length"):
        ic.cluster_sums([1, 2], [0])



def test_grouped_accuracy_is_the_ratio_estimate_of_group_sums_and_austen_task_checks_its_corpus():
    rng = np.random.default_rng(2)
    a, b, groups = (rng.random(60) < 0.6).astype(float), (rng.random(60) < 0.5).astype(float), np.repeat(
        np.arange(12), 5)
    e = ic.grouped_accuracy(a, groups, unit="chapters")
    ref = ic.ratio_estimate(ic.cluster_sums(a, groups), ic.cluster_sums(np.ones(60), groups), unit="chapters")
    assert (e.value, e.lo, e.hi, e.n) == (ref.value, ref.lo, ref.hi, 12)
    d = ic.grouped_accuracy(a, groups, versus=b)
    assert d.value == pytest.approx(a.mean() - b.mean())
    assert ic.grouped_accuracy(2 * a, groups, trials=2).value == pytest.approx(a.mean())   # correct of 2 trials each
    with pytest.raises(ValueError, match="same non-empty corpus"):
        ic.austen_task([("Emma", "a b c")], [], None, None)


# ---- entity-level scores ----


def test_entity_spans_read_io_tags_as_seqeval_does():
    assert ic.entity_spans([0, 1, 1, 0, 2, 1, 1]) == {(1, 3, 1), (4, 5, 2), (5, 7, 1)}
    assert ic.entity_spans([]) == set() and ic.entity_spans([0, 0]) == set()
    assert ic.entity_spans([3]) == {(0, 1, 3)}


SEQEVAL_CASES = [   # (gold, pred, seqeval's micro F1, computed with seqeval 1.2.2 on the I-/O form of the tags)
    ([[0, 1, 1, 0, 2, 1, 1]], [[0, 1, 0, 0, 2, 1, 1]], 2 / 3),
    ([[1, 1, 2, 2, 0], [0, 3, 0]], [[1, 2, 2, 2, 0], [0, 3, 3]], 0.0),
    ([[0, 4, 4, 4], [5, 0, 5]], [[0, 4, 4, 4], [5, 0, 0]], 0.8),
]


@pytest.mark.parametrize("gold, pred, expected", SEQEVAL_CASES)
def test_entity_f1_matches_seqeval_on_known_cases(gold, pred, expected):
    assert ic.entity_f1(ic.entity_counts(gold, pred)) == pytest.approx(expected)


def test_entity_f1_matches_seqeval_on_random_sequences():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(0)
    tags = [f"I-{t}" for t in ic.TAGS[1:]]
    for _ in range(5):
        gold = [rng.choice(6, rng.integers(1, 15), p=[0.6, 0.1, 0.1, 0.1, 0.05, 0.05]).tolist() for _ in range(40)]
        pred = [[t if rng.random() < 0.7 else int(rng.integers(6)) for t in g] for g in gold]
        named = [[["O", *tags][t] for t in s] for s in gold], [[["O", *tags][t] for t in s] for s in pred]
        assert ic.entity_f1(ic.entity_counts(gold, pred)) == pytest.approx(seqeval.f1_score(*named))
        per_type = seqeval.classification_report(*named, output_dict=True)
        for t in range(1, 6):
            if ic.TAGS[t] in per_type:
                expected = per_type[ic.TAGS[t]]["f1-score"]
                assert ic.entity_f1(ic.entity_counts(gold, pred, tag=t)) == pytest.approx(expected)


def test_entity_counts_give_tp_fp_fn_per_sentence_and_check_lengths():
    counts = ic.entity_counts([[0, 1, 1], [2, 0]], [[0, 1, 1], [0, 2]])
    assert counts.tolist() == [[1, 0, 0], [0, 1, 1]]
    assert ic.entity_counts([[0, 1, 2]], [[0, 1, 1]], tag=2).tolist() == [[0, 0, 1]]
    assert ic.entity_f1(np.zeros((3, 3))) == 0.0
    with pytest.raises(ValueError, match="gold tags"):
        ic.entity_counts([[0, 1]], [[0]])


# ---- explanations of the same model: leave-one-out, integrated gradients, randomisation ----


def test_leave_one_out_equals_deleting_each_word_and_rescoring():
    model = _model()
    enc = ic.encode(_embedding(), ["good film awful", "bad plot", "great great film plot"])
    target = torch.tensor([0, 1, 2])
    loo = ic.leave_one_out(model, enc.input_ids, enc.attention_mask, target)
    p = model.predict_proba(enc.input_ids, enc.attention_mask)
    for b in range(3):
        for t in range(enc.input_ids.shape[1]):
            if not enc.attention_mask[b, t]:
                assert loo[b, t] == 0
                continue
            drop = torch.zeros_like(enc.attention_mask)
            drop[b, t] = True
            ids, am = evaluation.delete_tokens(enc.input_ids[b:b + 1], enc.attention_mask[b:b + 1], drop[b:b + 1])
            expected = p[b, target[b]] - model.predict_proba(ids, am.bool())[0, target[b]]
            torch.testing.assert_close(loo[b, t], expected)


def test_integrated_gradients_are_complete_from_the_class_prior():
    model = _model()
    enc = ic.encode(_embedding(), ["good film awful", "bad plot", "great great film plot"])
    target = torch.tensor([0, 1, 2])
    scores, delta = ic.integrated_gradients(model, enc.input_ids, enc.attention_mask, target, n_steps=64,
                                            return_delta=True, batch_size=2)
    p = model.predict_proba(enc.input_ids, enc.attention_mask).gather(1, target[:, None]).squeeze(1)
    prior = model.linear.bias.detach().softmax(0)[target]          # zero word vectors: z = 0, logits = bias
    torch.testing.assert_close(scores.sum(1), p - prior, atol=1e-4, rtol=0)
    assert delta.abs().max() < 1e-4 and (scores[~enc.attention_mask] == 0).all()


def test_randomised_copy_redraws_only_the_named_parts():
    model = _model()
    enc = ic.encode(_embedding(), ["good film awful", "bad plot"])
    readout = ic.randomised_copy(model, ("readout",), seed=0)
    both = ic.randomised_copy(model, ("readout", "task_vector"), seed=0)
    with torch.no_grad():
        ex, ex_r, ex_b = (m.explain(enc.input_ids, enc.attention_mask) for m in (model, readout, both))
    torch.testing.assert_close(ex_r.attention, ex.attention)                 # attention cannot see the readout
    assert not torch.allclose(ex_r.logits, ex.logits) and not torch.allclose(ex_b.attention, ex.attention)
    assert torch.equal(both.linear.weight, readout.linear.weight) and (readout.linear.bias == 0).all()
    assert not torch.equal(model.linear.bias, readout.linear.bias)          # the original is untouched
    with pytest.raises(ValueError, match="parts"):
        ic.randomised_copy(model, ("encoder",))


class _Token:
    def __init__(self, text, ent):
        self.text, self.ent_type_ = text, ent


class _FakeNlp:
    """A stand-in for spaCy: capitalised words are PERSON, numbers CARDINAL; counts its calls."""

    calls = 0

    def pipe(self, sentences, batch_size, disable):
        _FakeNlp.calls += 1
        for s in sentences:
            yield [_Token(w, "PERSON" if w[0].isupper() else "CARDINAL" if w.isdigit() else "") for w in s.split()]


def test_cached_silver_entities_builds_once_then_reads_the_cache(tmp_path, monkeypatch):
    from helpers import assets

    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "spacy_pipeline", lambda: _FakeNlp())
    _FakeNlp.calls = 0
    sentences = ["Anne met Frederick in 1814", "they walked"]
    words, tags = ic.cached_silver_entities(sentences, name="toy")
    assert words[0] == ["Anne", "met", "Frederick", "in", "1814"]
    assert [[ic.TAGS[t] for t in s] for s in tags] == [["PER", "O", "PER", "O", "NUM"], ["O", "O"]]
    assert ic.cached_silver_entities(sentences, name="toy") == (words, tags) and _FakeNlp.calls == 1
    ic.cached_silver_entities(sentences[:1], name="toy")                       # other sentences: built anew
    assert _FakeNlp.calls == 2
    with pytest.raises(ValueError, match="non-empty"):
        ic.cached_silver_entities([], name="toy")


def _two_level_documents(mix, seed=0):
    """Six topics of six words in two super-topics of three: each text mixes one sibling topic in."""
    rng = np.random.default_rng(seed)
    topics = [["q" + "abcdef"[t] + "klmnop"[i] + "z" for i in range(6)] for t in range(6)]
    docs = []
    for n in range(300):
        t = n % 6
        sibling = [s for s in range(t // 3 * 3, t // 3 * 3 + 3) if s != t][rng.integers(2)]
        docs.append(" ".join(rng.permutation([*rng.choice(topics[t], 10), *rng.choice(topics[sibling], mix)])))
    return docs


def test_sinr_hierarchy_nests_the_fine_dimensions_in_coarse_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))
    config = {"min_count": 2, "window": 3, "gamma": 3.0, "seed": 0, "topk": 10, "min_nnz": 1}
    docs = _two_level_documents(mix=5)
    h = ic.sinr_hierarchy(docs, config=config, coarse_gamma=0.5, name="toy")
    flat = ic.sinr_embedding(docs, config=config, name="toy")
    assert h.fine.words == flat.words and (h.fine.vectors != flat.vectors).nnz == 0     # the same flat embedding
    assert h.coarse.words == h.fine.words and h.coarse.n_dims < h.fine.n_dims
    assert (h.parent >= 0).all()
    for d in range(h.fine.n_dims):                      # every word of a fine community is in its parent
        assert (h.coarse.membership[h.fine.membership == d] == h.parent[d]).all()
    topic_of = {w: w[1] for w in h.fine.words}          # the letter after "q" names the topic
    for k in range(h.coarse.n_dims):                    # a coarse community never mixes the two super-topics
        assert len({topic_of[w] in "abc" for w in np.array(h.fine.words)[h.coarse.membership == k]}) == 1
    assert np.allclose(np.asarray(h.coarse.vectors.sum(1)).ravel(), 1.0)                  # node recall, not cut
    assert len(list((tmp_path / "models" / "ch3").glob("toy-coarse-*.npz"))) == 1
    with pytest.raises(ValueError, match="does not merge"):
        ic.sinr_hierarchy(_two_level_documents(mix=3), config=config, coarse_gamma=0.5, name="toy")


def test_fingerprint_tells_embeddings_and_arrays_apart():
    assert ic.fingerprint(_embedding(0)) == ic.fingerprint(_embedding(0))
    assert ic.fingerprint(_embedding(0)) != ic.fingerprint(_embedding(1))
    assert ic.fingerprint(np.arange(3)) == ic.fingerprint(torch.arange(3))
    assert ic.fingerprint(np.arange(3)) != ic.fingerprint(np.arange(3).astype(np.int32))


def _passages(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    vocab = (("good", "great", "film"), ("bad", "awful", "plot"))
    texts = [" ".join(rng.choice(vocab[y], 4)) for y in labels]
    return texts, labels


def test_austen_study_tests_every_passage_once_and_records_the_run_checked_live():
    texts, labels = _passages()
    folds = np.arange(len(texts)) % 3
    features = np.eye(2)[labels] + np.random.default_rng(0).normal(0, 0.1, (len(texts), 2))
    embs = [_embedding(k) for k in range(3)]
    hparams = {"tau": 0.5, "query": "free", "epochs": 3, "lr": 0.1, "l1": 0.0, "batch_size": 8}
    calls = []
    out = ic.austen_study(embs, lambda: calls.append(1) or _embedding(9), texts, labels, folds, features,
                          n_classes=2, seeds=(0, 1), hparams=hparams)
    assert calls == [1]                                                    # the leaky embedding, built once
    assert out["sinr"].shape == (2, len(texts)) and out["bow"].shape == out["minilm"].shape == (len(texts),)
    assert out["leaky"].shape == ((folds == 0).sum(),)
    tr, te = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
    np.testing.assert_array_equal(out["bow"][te], ic.bow_predict([texts[i] for i in tr], labels[tr],
                                                                 [texts[i] for i in te]) == labels[te])
    e_tr, e_te = ic.encode(embs[0], [texts[i] for i in tr]), ic.encode(embs[0], [texts[i] for i in te])
    model = ic.train_task_attention(embs[0].vectors, e_tr.input_ids, e_tr.attention_mask, labels[tr], 2,
                                    **hparams, seed=0)
    with torch.no_grad():
        logits = model(e_te.input_ids, e_te.attention_mask)
    np.testing.assert_allclose(out["check_logits"], logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out["sinr"][0, te], logits.argmax(1).numpy() == labels[te])


class _FakeTokens(dict):
    def __init__(self, ids, mask, word_ids):
        super().__init__(input_ids=ids, attention_mask=mask)
        self._word_ids = word_ids

    def word_ids(self, b):
        return self._word_ids[b]


def _fake_tokenizer(batch, *, is_split_into_words, truncation, max_length, padding, return_tensors):
    width = min(max_length, max(len(s) for s in batch) + 2)
    ids, mask = torch.zeros(len(batch), width, dtype=torch.long), torch.zeros(len(batch), width, dtype=torch.long)
    word_ids = []
    for b, sent in enumerate(batch):
        pieces = [None, *range(min(len(sent), width - 2)), None]
        ids[b, : len(pieces)] = torch.tensor([1] + [2 + sum(map(ord, sent[w])) % 30 for w in pieces[1:-1]] + [1])
        mask[b, : len(pieces)] = 1
        word_ids.append(pieces + [None] * (width - len(pieces)))
    return _FakeTokens(ids, mask, word_ids)


class _FakeEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(40, 5)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"last_hidden_state": self.table(input_ids) * attention_mask[..., None]})()


def test_ner_study_predictions_match_its_committed_models():
    rng = np.random.default_rng(0)
    words = [[str(w) for w in rng.choice(WORDS, rng.integers(2, 6))] for _ in range(40)]
    tags = [[WORDS.index(w) for w in s] for s in words]                  # one tag per word: all six present
    options = {"epochs": 3, "lr": 0.05, "l1": 0.0, "batch_size": 8, "seed": 0}
    emb = _embedding()
    feats = ic.token_features(_FakeEncoder(), _fake_tokenizer, words, batch_size=16)
    assert feats.shape == (sum(map(len, words)), 5)
    out = ic.ner_study(emb, words, tags, 30, _FakeEncoder(), _fake_tokenizer, fit_options=options, check_epochs=1,
                       check_sentences=4)
    n_test = sum(map(len, words[30:]))
    assert out["bow"].shape == out["minilm"].shape == out["sinr"].shape == (n_test,)
    enc = ic.encode_words(emb, words)
    tagger = ic.load_tagger(emb.vectors, out)
    with torch.no_grad():
        pred = tagger(enc.input_ids[30:], enc.attention_mask[30:]).argmax(-1)[enc.attention_mask[30:]].numpy()
    np.testing.assert_array_equal(pred, out["sinr"])
    m_check = feats[sum(map(len, words[:30])):][: sum(map(len, words[30:34]))].numpy()
    live = m_check @ out["minilm_coef"].T + out["minilm_intercept"]
    np.testing.assert_allclose(live, out["minilm_check_logits"], rtol=1e-4, atol=1e-5)
    assert not np.array_equal(out["check/query"], out["tagger/query"])   # one epoch is not three
    assert ic.window_features(["The", "Cobb", "at", "Lyme"], 1) == {"w=cobb": 1.0, "c-1=the": 1.0, "c1=at": 1.0,
                                                                     "c2=lyme": 1.0}


def test_committed_studies_of_chapter_3_match_their_sidecars_and_shapes():
    from helpers import common

    folder = common.WEIGHTS_DIR / "results" / "ch3"
    austen, ner = sorted(folder.glob("austen-study-*.npz")), sorted(folder.glob("ner-study-*.npz"))
    assert austen and ner, "Chapter 3's studies are not committed under helpers/weights/results/ch3"
    for path in austen + ner:
        assert common.verified(path) and path.stat().st_size < 2 << 20
    for path in austen:
        study = dict(np.load(path))
        n = len(study["bow"])
        assert study["minilm"].shape == (n,) and study["sinr"].shape[1] == n and study["sinr"].dtype == bool
        assert study["check_logits"].shape == (len(study["leaky"]), 6)
    for path in ner:
        study = dict(np.load(path))
        n = len(study["bow"])
        assert study["minilm"].shape == study["sinr"].shape == (n,)
        assert all(0 <= study[k].min() and study[k].max() < len(ic.TAGS) for k in ("bow", "minilm", "sinr"))
        tagger = ic.load_tagger(sparse.random(5, study["tagger/query"].shape[0], density=0.5, random_state=0), study)
        torch.testing.assert_close(tagger.query.detach(), torch.from_numpy(study["tagger/query"]))
