"""helpers.interpretable_classifier: exact decompositions, masking, determinism, CSV validation."""

import numpy as np
import pytest
import torch
from scipy import sparse

from helpers import interpretable_classifier as ic
from helpers import sinr

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
    dims = ic.task_vector_dimensions(model, emb, k=2, words=2)
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
