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


@pytest.mark.parametrize("method", attribution.METHODS)
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
        attribution.token_attributions(classifier, IDS, AM, method="lime", target=0)
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
