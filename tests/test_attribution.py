"""helpers.attribution: token attributions on a tiny random BERT classifier (shapes, completeness, occlusion)."""

import pytest
import torch
from transformers import BertConfig, BertModel

from helpers import attribution


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    cfg._attn_implementation = "eager"
    encoder = BertModel(cfg, add_pooling_layer=False)
    clf = attribution.PooledClassifier(encoder, 3).eval().requires_grad_(False)
    with torch.no_grad():
        clf.head.weight.normal_(0, 3.0)  # make the classes depend strongly on the input
    return clf


IDS = torch.tensor([[1, 7, 8, 9, 10, 2], [1, 11, 12, 2, 0, 0]])
AM = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
CAND = AM.bool() & (IDS != 1) & (IDS != 2)  # [CLS] = 1 and [SEP] = 2 are never explained


@pytest.mark.parametrize("method", attribution.STUDY_METHODS)
def test_every_method_returns_one_score_per_token(classifier, method):
    scores = attribution.token_attributions(classifier, IDS, AM, method=method, target=1, candidates=CAND)
    assert scores.shape == IDS.shape
    assert torch.isfinite(scores).all()
    assert float(scores[~CAND].abs().max()) == 0.0  # nothing outside the candidates
    assert float(scores[CAND].abs().max()) > 0.0


def test_integrated_gradients_completeness(classifier):
    target = torch.tensor([0, 2])
    scores, delta = attribution.token_attributions(
        classifier,
        IDS,
        AM,
        method="integrated_gradients",
        target=target,
        candidates=CAND,
        n_steps=64,
        return_delta=True,
    )
    probs = classifier.predict_proba(IDS, AM)[torch.arange(2), target]
    base = classifier.predict_proba(IDS.masked_fill(CAND, 0), AM)[torch.arange(2), target]
    torch.testing.assert_close(scores.sum(1), probs - base, atol=1e-3, rtol=0)
    assert float(delta.abs().max()) < 1e-3


def test_occlusion_is_the_probability_drop(classifier):
    scores = attribution.token_attributions(classifier, IDS, AM, method="occlusion", target=1, candidates=CAND)
    p = classifier.predict_proba(IDS, AM)[:, 1]
    ids = IDS.clone()
    ids[0, 3] = 0  # replace one token by [PAD] (baseline_id 0), keeping positions
    torch.testing.assert_close(
        scores[0, 3], (p[0] - classifier.predict_proba(ids, AM)[0, 1]).float(), atol=1e-5, rtol=0
    )


def test_attention_ignores_the_target_and_random_is_seeded(classifier):
    a1 = attribution.token_attributions(classifier, IDS, AM, method="rollout", target=0)
    a2 = attribution.token_attributions(classifier, IDS, AM, method="rollout", target=2)
    torch.testing.assert_close(a1, a2)
    r1 = attribution.token_attributions(classifier, IDS, AM, method="random", target=0, seed=3)
    r2 = attribution.token_attributions(classifier, IDS, AM, method="random", target=0, seed=3)
    torch.testing.assert_close(r1, r2)


def test_pooled_features_match_the_classifier(classifier):
    class Tok:
        def __call__(self, texts, **_):
            return {"input_ids": IDS[: len(texts)], "attention_mask": AM[: len(texts)]}

    class Enc(dict):
        def to(self, _device):
            return self

    tok = Tok()
    feats = attribution.pooled_features(classifier.encoder, lambda t, **k: Enc(tok(t)), ["a", "b"])
    torch.testing.assert_close(classifier.head(feats), classifier(input_ids=IDS, attention_mask=AM))


def test_bad_inputs_raise_clear_errors(classifier):
    with pytest.raises(ValueError, match="unknown method"):
        attribution.token_attributions(classifier, IDS, AM, method="shap", target=0)
    with pytest.raises(ValueError, match="lime_samples"):
        attribution.token_attributions(classifier, IDS, AM, method="lime", target=0, lime_samples=1)
    with pytest.raises(ValueError, match="batch, pos"):
        attribution.token_attributions(classifier, IDS, AM[:, :3], method="saliency", target=0)
    with pytest.raises(ValueError, match="return_delta"):
        attribution.token_attributions(classifier, IDS, AM, method="saliency", target=0, return_delta=True)
    with pytest.raises(ValueError, match="target"):
        attribution.token_attributions(classifier, IDS, AM, method="saliency", target=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="non-empty"):
        attribution.pooled_features(classifier.encoder, None, [])
    with pytest.raises(ValueError, match="at least 2"):
        attribution.PooledClassifier(classifier.encoder, 1)


def test_lime_recovers_an_additive_model():
    # f(x) = sum_t c_t * (embedding of token t)[0], with the absent token embedded as 0: the effect of
    # keeping token t is exactly c_t * id_t, which LIME's (nearly unregularised) surrogate must find
    embedding = torch.nn.Embedding(20, 2)
    with torch.no_grad():
        embedding.weight.zero_()
        embedding.weight[:, 0] = torch.arange(20.0) / 10
    c = torch.tensor([0.0, 1.0, -2.0, 3.0, 0.5, 0.0])

    def prob(embeds, am):
        score = (embeds[..., 0] * c[: embeds.shape[1]]).sum(1)  # [batch]
        return torch.stack([-score, score], 1)

    ids = torch.tensor([[1, 5, 6, 7, 8, 2]])
    cand = torch.tensor([[False, True, True, True, True, False]])
    scores = attribution._lime(prob, embedding, ids, torch.ones_like(ids), cand, torch.tensor([1]), baseline_id=0,
                               n_samples=400, seed=0)
    expected = c * ids[0] / 10
    torch.testing.assert_close(scores[0, 1:5], expected[1:5], atol=0.05, rtol=0.05)
    assert float(scores[0, [0, 5]].abs().max()) == 0.0


def test_faithfulness_study_protocol(classifier):
    protocol = dict(attribution.STUDY, random_seeds=2, lime_samples=20, sanity_per_class=1, sanity_seeds=1,
                    sanity_models=["m"], convergence_models=["m"],
                    convergence_passages=2, convergence_steps=[2, 8])
    labels = torch.tensor([0, 1])
    out = attribution.faithfulness_study({"m": classifier}, IDS, AM, CAND, labels, protocol=protocol)
    target = classifier.predict_proba(IDS, AM).argmax(1)
    # the study's integrated gradients are the verb's, on the model's own predicted class
    ig = attribution.token_attributions(classifier, IDS, AM, method="integrated_gradients", target=target,
                                        candidates=CAND)
    torch.testing.assert_close(out["m/scores/integrated_gradients"], ig, atol=1e-6, rtol=0)
    from helpers import evaluation

    assert out["m/aopc/neg_input_x_gradient/comprehensiveness"].shape == (len(evaluation.BINS), 2)
    assert {"m/sanity/head/1/saliency", "m/sanity/model/1/lime", "m/convergence/riemann_trapezoid/8",
            "m/scores/random/1", "m/scores/one_step"} <= set(out)
    # one right-Riemann step: the gradient at the input times (x - x'), token by token
    emb = classifier.encoder.get_input_embeddings()
    x = emb(IDS).detach().requires_grad_(True)
    p = classifier(inputs_embeds=x, attention_mask=AM).softmax(-1).gather(1, target[:, None]).sum()
    (grad,) = torch.autograd.grad(p, x)
    one_step = ((x - emb(IDS.masked_fill(CAND, 0))) * grad).sum(-1).detach() * CAND
    torch.testing.assert_close(out["m/scores/one_step"], one_step, atol=1e-6, rtol=1e-4)
    # with a random head, attention does not change at all: it never reads the head
    torch.testing.assert_close(out["m/sanity/head/1/attention"], torch.ones(2))
    # Gauss-Legendre with 8 points is closer to completeness than a 2-point trapezoid
    assert float(out["m/convergence/gausslegendre/8"].mean()) < float(out["m/convergence/riemann_trapezoid/2"].mean())
    with pytest.raises(ValueError, match="labels"):
        attribution.faithfulness_study({"m": classifier}, IDS, AM, CAND, labels[:1], protocol=protocol)


def test_randomised_copy_keeps_the_original():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16)
    clf = attribution.PooledClassifier(BertModel(cfg, add_pooling_layer=False), 3).eval()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    head = attribution.randomised_copy(clf, "head", seed=1)
    full = attribution.randomised_copy(clf, "model", seed=1)
    for k, v in clf.state_dict().items():
        assert torch.equal(v, before[k])                                   # the original is untouched
    assert torch.equal(head.encoder.embeddings.word_embeddings.weight, clf.encoder.embeddings.word_embeddings.weight)
    assert not torch.equal(head.head.weight, clf.head.weight)
    assert abs(float(full.encoder.embeddings.word_embeddings.weight.std()) - 0.02) < 0.005
    with pytest.raises(ValueError, match="kind"):
        attribution.randomised_copy(clf, "layer", seed=1)


def test_austen_finetuned_trains_the_last_attention_layer_only(tmp_path, monkeypatch):
    # a short version of the recipe on a tiny BERT: the last-block shortcut must equal the whole
    # encoder (asserted inside), only the last attention layer and the head may change, and the kept
    # epoch is the best on the validation passages
    from transformers import BertTokenizerFast

    from helpers import common

    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "cache"))
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    encoder = BertModel(cfg, add_pooling_layer=False).eval().requires_grad_(False)
    # class 0 passages use the first three words, class 1 the last three: learnable
    gen = torch.Generator().manual_seed(0)
    train = [(" ".join(words[3 * c + int(i)] for i in torch.randint(0, 3, (6,), generator=gen)), c)
             for c in (0, 1) for _ in range(20)]
    split = attribution.AustenSplit(train=train, test=train[:2], n_passages={"a": 20, "b": 20})
    model = attribution.austen_finetuned(encoder, tokenizer, split, titles=["a", "b"], max_epochs=5, batch_size=8,
                                         lr=3e-3, head_lr=3e-2, val_fraction=0.2)
    before, after = encoder.state_dict(), model.encoder.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("encoder.layer.1.attention.") for k in changed)
    assert len(model.history["val_accuracy"]) == 6
    assert model.history["val_accuracy"][model.selected_epoch] == max(model.history["val_accuracy"])
    assert max(model.history["val_accuracy"]) > 0.5
