"""helpers.evaluation: ERASER metrics on a linear bag-of-words model whose answers are known by hand."""

import math

import pytest
import torch

from helpers import evaluation

W = torch.tensor([0.0, 0.5, 1.0, 2.0, -1.0, 3.0])  # weight of each token id; id 0 is padding


def predict(ids, am):
    """Two classes; logit of class 1 is the sum of the token weights (a bag of words)."""
    score = (W[ids] * am).sum(1)
    return torch.stack([1 - score.sigmoid(), score.sigmoid()], 1)


def sig(x):
    return 1 / (1 + math.exp(-x))


IDS = torch.tensor([[5, 1, 3, 4, 2], [3, 2, 1, 0, 0]])  # second sequence padded
AM = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
EXACT = W[IDS] * AM  # each token's exact contribution to the logit


def test_comprehensiveness_known_answer():
    # 20 % of 5 tokens -> 1 token (id 5, weight 3); ceil(0.2 * 3) = 1 token (id 3, weight 2)
    c = evaluation.comprehensiveness(predict, IDS, AM, EXACT, target=1, fraction=0.2)
    expected = [sig(5.5) - sig(2.5), sig(3.5) - sig(1.5)]
    torch.testing.assert_close(c, torch.tensor(expected, dtype=torch.float64))


def test_sufficiency_known_answer():
    # keep only the top 40 %: 2 of 5 tokens (5, 3) and ceil(1.2) = 2 of 3 tokens (3, 2)
    s = evaluation.sufficiency(predict, IDS, AM, EXACT, target=1, fraction=0.4)
    expected = [sig(5.5) - sig(5.0), sig(3.5) - sig(3.0)]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64))


def test_whole_text_rationale():
    # fraction 1: deleting everything leaves p(empty) = 0.5; keeping everything changes nothing
    c = evaluation.comprehensiveness(predict, IDS, AM, EXACT, target=1, fraction=1.0)
    s = evaluation.sufficiency(predict, IDS, AM, EXACT, target=1, fraction=1.0)
    torch.testing.assert_close(c, torch.tensor([sig(5.5) - 0.5, sig(3.5) - 0.5], dtype=torch.float64))
    torch.testing.assert_close(s, torch.zeros(2, dtype=torch.float64))


def test_aopc_is_the_mean_over_bins_and_exact_beats_reversed():
    bins = (0.2, 0.4, 0.6)
    out = evaluation.aopc(predict, IDS, AM, EXACT, target=1, bins=bins)
    assert out["comprehensiveness"].shape == (3, 2) and out["sufficiency"].shape == (3, 2)
    for kind in ("comprehensiveness", "sufficiency"):
        torch.testing.assert_close(out[f"aopc_{kind}"], out[kind].mean(0))
    worst = evaluation.aopc(predict, IDS, AM, -EXACT, target=1, bins=bins)
    assert bool((out["aopc_comprehensiveness"] > worst["aopc_comprehensiveness"]).all())
    assert bool((out["aopc_sufficiency"] < worst["aopc_sufficiency"]).all())


def test_candidates_protect_special_tokens_and_target_per_row():
    cand = AM.bool().clone()
    cand[:, 0] = False  # protect the first token, as one would [CLS]
    c = evaluation.comprehensiveness(
        predict, IDS, AM, EXACT, target=torch.tensor([1, 1]), fraction=0.25, candidates=cand
    )
    # row 0: 4 candidates -> delete the top one among ids 1, 3, 4, 2 -> id 3 (weight 2)
    assert math.isclose(float(c[0]), sig(5.5) - sig(3.5), abs_tol=1e-6)
    # explaining class 0 flips the sign of the change
    c0 = evaluation.comprehensiveness(predict, IDS, AM, EXACT, target=0, fraction=0.25, candidates=cand)
    assert math.isclose(float(c0[0]), -float(c[0]), abs_tol=1e-6)


def test_delete_tokens_and_rationale_mask():
    ids, am = evaluation.delete_tokens(IDS, AM, torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0]]).bool())
    assert ids.tolist() == [[5, 3, 4], [2, 1, 0]] and am.tolist() == [[1, 1, 1], [1, 1, 0]]
    r = evaluation.rationale_mask(EXACT, AM.bool(), 0.4)
    assert r.tolist() == [[True, False, True, False, False], [True, True, False, False, False]]


def test_rank_agreement():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cand = torch.ones(1, 4).bool()
    assert float(evaluation.rank_agreement(a, a * 10, cand)) == pytest.approx(1.0)
    assert float(evaluation.rank_agreement(a, -a, cand, method="kendall")) == pytest.approx(-1.0)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="shape of input_ids"):
        evaluation.comprehensiveness(predict, IDS, AM, EXACT[:, :3], target=1, fraction=0.2)
    with pytest.raises(ValueError, match="empty mask"):
        evaluation.sufficiency(predict, IDS, AM, EXACT, target=1, fraction=0.2, candidates=torch.zeros_like(AM).bool())
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            evaluation.comprehensiveness(predict, IDS, AM, EXACT, target=1, fraction=bad)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        evaluation.aopc(predict, IDS, AM, EXACT, target=1, bins=(0.1, 2.0))
    with pytest.raises(ValueError, match="non-empty"):
        evaluation.aopc(predict, IDS, AM, EXACT, target=1, bins=())
    with pytest.raises(ValueError, match="target"):
        evaluation.comprehensiveness(predict, IDS, AM, EXACT, target=torch.tensor([1, 1, 1]), fraction=0.2)
    with pytest.raises(ValueError, match="NaN"):
        evaluation.comprehensiveness(predict, IDS, AM, EXACT * float("nan"), target=1, fraction=0.2)
    with pytest.raises(ValueError, match="attention_mask"):
        evaluation.comprehensiveness(predict, IDS, AM[:, :2], EXACT, target=1, fraction=0.2)
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.rank_agreement(EXACT, EXACT, torch.eye(2, 5).bool())


# --- chapter 14: rank correlation, plausibility, stability, scoreboard normalisation -------------

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def test_rank_correlation_known_answers_and_mask():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[2.0, 4.0, 6.0, 8.0], [4.0, 3.0, 2.0, 1.0]])
    torch.testing.assert_close(evaluation.rank_correlation(a, b), torch.tensor([1.0, -1.0], dtype=torch.float64))
    # d = (0, 0, 1, -1): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    rho = evaluation.rank_correlation(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([[1.0, 2, 4, 3]]))
    assert float(rho) == pytest.approx(0.8)
    # the masked-out entry would reverse the order; on the mask the order is the same
    mask = torch.tensor([[True, True, True, False]])
    rho = evaluation.rank_correlation(torch.tensor([[1.0, 2, 3, 9]]), torch.tensor([[1.0, 2, 3, -9]]), mask=mask)
    assert float(rho) == pytest.approx(1.0)
    # images: [batch, H, W] works the same as [batch, pos]; constant maps on both sides agree
    maps = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(evaluation.rank_correlation(maps, maps.exp()), torch.ones(3, dtype=torch.float64))
    assert float(evaluation.rank_correlation(torch.ones(1, 3), torch.ones(1, 3))) == 1.0
    assert math.isnan(float(evaluation.rank_correlation(torch.ones(1, 3), torch.tensor([[1.0, 2, 3]]))))


def test_ground_truth_auc_known_answers():
    truth = torch.tensor([[True, True, False, False, False]])
    perfect = evaluation.ground_truth_auc(torch.tensor([[5.0, 4, 3, 2, 1]]), truth)
    worst = evaluation.ground_truth_auc(torch.tensor([[1.0, 2, 3, 4, 5]]), truth)
    flat = evaluation.ground_truth_auc(torch.ones(1, 5), truth)
    assert (float(perfect), float(worst), float(flat)) == (1.0, 0.0, 0.5)
    # positives score 3 and 1 against negatives 2, 0, 2: pairs won 3 + 1 of 6 -> 4 / 6
    auc = evaluation.ground_truth_auc(torch.tensor([[3.0, 1, 2, 0, 2]]), truth)
    assert float(auc) == pytest.approx(4 / 6)
    # no positive on the mask: undefined, not zero
    mask = torch.tensor([[False, False, True, True, True]])
    assert math.isnan(float(evaluation.ground_truth_auc(torch.rand(1, 5), truth, mask=mask)))
    # equals sklearn's ROC AUC
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(1, 40, generator=g), torch.rand(1, 40, generator=g) < 0.3
    assert float(evaluation.ground_truth_auc(s, t)) == pytest.approx(roc_auc_score(t[0].numpy(), s[0].numpy()))


def test_stability_deterministic_is_one_and_random_is_near_zero():
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(0))

    def deterministic(inputs, seed):
        return inputs**2

    def random_ranking(inputs, seed):
        return torch.rand(inputs.shape, generator=torch.Generator().manual_seed(seed))

    same = evaluation.stability(deterministic, x, repeats=3)
    torch.testing.assert_close(same, torch.ones(6, dtype=torch.float64))
    noisy = evaluation.stability(random_ranking, x, repeats=4)
    assert abs(float(noisy.mean())) < 0.2
    # a small perturbation barely moves x**2; a large one scrambles it
    small = evaluation.stability(deterministic, x, perturb=lambda v, g: v + 1e-3 * torch.randn(v.shape, generator=g))
    large = evaluation.stability(deterministic, x, perturb=lambda v, g: v + 10 * torch.randn(v.shape, generator=g))
    assert float(small.mean()) > 0.99 > 0.5 > float(large.mean())


def test_stability_reuses_a_given_reference_run():
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    calls = []

    def explain(inputs, seed):
        calls.append(seed)
        return inputs + 0.1 * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(seed))

    noise = lambda v, g: v + 0.05 * torch.randn(v.shape, generator=g)  # noqa: E731
    full = evaluation.stability(explain, x, perturb=noise, repeats=2, seed=3)
    assert calls == [3, 4, 5]
    calls.clear()
    reused = evaluation.stability(explain, x, perturb=noise, repeats=2, seed=3, reference=explain(x, 3))
    assert calls == [3, 4, 5]  # the reference run above, then only the two re-runs
    torch.testing.assert_close(reused, full)


def test_normalise_columns_hand_computed_table():
    table = pd.DataFrame(
        {"deletion": [0.1, 0.3, 0.5, np.nan], "aopc": [np.nan, 0.2, 0.6, 0.4], "same": [2.0, 2.0, np.nan, 2.0]},
        index=["ig", "saliency", "random", "text-ig"],
    )
    out = evaluation.normalise_columns(table, higher_is_better={"deletion": False, "aopc": True, "same": True})
    expected = pd.DataFrame(
        {"deletion": [1.0, 0.5, 0.0, np.nan], "aopc": [np.nan, 0.0, 1.0, 0.5], "same": [1.0, 1.0, np.nan, 1.0]},
        index=table.index,
    )
    pd.testing.assert_frame_equal(out, expected)
    axes = evaluation.axis_scores(out, {"faithfulness": ["deletion", "aopc"], "other": ["same"]})
    assert axes["faithfulness"].tolist() == pytest.approx([1.0, 0.25, 0.5, 0.5])
    assert axes["other"].isna().tolist() == [False, False, True, False]


def test_scoreboard_bad_inputs_raise_clear_errors():
    table = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]})
    with pytest.raises(ValueError, match="missing .*'b'"):
        evaluation.normalise_columns(table, higher_is_better={"a": True})
    with pytest.raises(ValueError, match="not in the table"):
        evaluation.normalise_columns(table, higher_is_better={"a": True, "b": True, "c": False})
    with pytest.raises(ValueError, match="numeric"):
        evaluation.normalise_columns(pd.DataFrame({"a": ["x", "y"]}), higher_is_better={"a": True})
    with pytest.raises(ValueError, match="non-empty"):
        evaluation.normalise_columns(pd.DataFrame(), higher_is_better={})
    with pytest.raises(ValueError, match="inf"):
        evaluation.normalise_columns(pd.DataFrame({"a": [1.0, np.inf]}), higher_is_better={"a": True})
    with pytest.raises(ValueError, match="not in the table"):
        evaluation.axis_scores(table, {"faithfulness": ["a", "zzz"]})
    with pytest.raises(ValueError, match="no columns"):
        evaluation.axis_scores(table, {"faithfulness": []})
    with pytest.raises(ValueError, match="share one"):
        evaluation.rank_correlation(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="at least 2"):
        evaluation.rank_correlation(torch.ones(1, 3), torch.ones(1, 3), mask=torch.tensor([[True, False, False]]))
    with pytest.raises(ValueError, match="NaN"):
        evaluation.ground_truth_auc(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[True, False]]))
    with pytest.raises(ValueError, match="repeats"):
        evaluation.stability(lambda x, s: x, torch.ones(1, 3), repeats=0)
    with pytest.raises(ValueError, match="keep the shape"):
        evaluation.stability(lambda x, s: x[:, :2], torch.ones(1, 3), perturb=lambda x, g: x[:, :2])


def test_sanity_distance_known_answers():
    a = torch.tensor([[1.0, -2.0, 3.0, -4.0], [1.0, 2.0, 3.0, 4.0]])
    # sign flips and a reversed ranking count as unchanged (distance 0), never as more than changed
    torch.testing.assert_close(evaluation.sanity_distance(a, -a), torch.zeros(2, dtype=torch.float64))
    reverse = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]])
    d = evaluation.sanity_distance(a, reverse, absolute=False)
    assert float(d[1]) == pytest.approx(0.0, abs=1e-12)  # rho = -1 -> 1 - abs(rho) = 0
    assert float(d[0]) == pytest.approx(1 - 0.4)  # rho = 0.4 by hand on the signed ranks
    # an unrelated ranking: rho = 0 -> distance 1
    unrelated = evaluation.sanity_distance(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([[2.0, 4, 1, 3]]))
    torch.testing.assert_close(unrelated, torch.tensor([1.0], dtype=torch.float64))
    out = evaluation.sanity_distance(torch.randn(20, 30), torch.randn(20, 30))
    assert ((out >= 0) & (out <= 1)).all()
    with pytest.raises(ValueError, match="absolute"):
        evaluation.sanity_distance(a, a, absolute="yes")


def test_randomised_copy_redraws_every_parameter_and_keeps_the_original():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rand = evaluation.randomised_copy(model, seed=3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])  # original untouched
    for (name, p), (_, q) in zip(model.named_parameters(), rand.named_parameters(), strict=True):
        assert p.shape == q.shape
        p, q = p.detach(), q.detach()
        if float(p.std()) > 0:
            assert (p != q).float().mean() > 0.99, name
            assert abs(float(q.mean()) - float(p.mean())) < 3 * float(p.std()) + 1e-6
        else:
            torch.testing.assert_close(p, q)  # LayerNorm's constant init stays constant
    again = evaluation.randomised_copy(model, seed=3)
    for p, q in zip(rand.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(p, q)  # same seed, same draw
    with pytest.raises(ValueError, match="nn.Module"):
        evaluation.randomised_copy("not a model")


def test_stability_leaves_out_reruns_whose_prediction_changed():
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    flip = lambda inputs, g: inputs.flip(1)  # noqa: E731
    ident = lambda inputs, seed: inputs  # noqa: E731
    plain = evaluation.stability(ident, x, perturb=flip)
    torch.testing.assert_close(plain, torch.tensor([-1.0, -1.0], dtype=torch.float64))
    # the first item's prediction changed: its re-runs are dropped (NaN); the second still counts
    kept = evaluation.stability(ident, x, perturb=flip, repeats=2, unchanged=lambda a, b: torch.tensor([False, True]))
    assert math.isnan(float(kept[0])) and float(kept[1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="unchanged"):
        evaluation.stability(ident, x, perturb=flip, unchanged=lambda a, b: torch.tensor([True]))


def test_normalise_columns_noise_floor():
    import pandas as pd

    t = pd.DataFrame({"comp": [0.001, 0.005, 0.009], "t": [1.0, 2.0, 3.0]}, index=["a", "b", "c"])
    # spread 0.008 inside a floor of 0.08: gaps shrink tenfold, the best keeps 1
    out = evaluation.normalise_columns(t, higher_is_better={"comp": True, "t": False}, floor={"comp": 0.08})
    assert out["comp"].round(6).tolist() == [0.9, 0.95, 1.0]
    assert out["t"].round(6).tolist() == [1.0, 0.5, 0.0]  # no floor: plain min-max
    # a floor below the spread changes nothing
    plain = evaluation.normalise_columns(t, higher_is_better={"comp": True, "t": False})
    small = evaluation.normalise_columns(t, higher_is_better={"comp": True, "t": False}, floor={"comp": 1e-4})
    pd.testing.assert_frame_equal(plain, small)
    with pytest.raises(ValueError, match="floor names"):
        evaluation.normalise_columns(t, higher_is_better={"comp": True, "t": False}, floor={"x": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        evaluation.normalise_columns(t, higher_is_better={"comp": True, "t": False}, floor={"comp": -1.0})


def test_chapter14_text_study_artefact_is_intact():
    """The committed per-passage metrics of Chapter 14's text setting match their sidecar and their ranges."""
    import numpy as np

    from helpers import common

    files = sorted((common.WEIGHTS_DIR / "results" / "ch14").glob("text-study-*.npz"))
    assert files, "Chapter 14's text study is not committed under helpers/weights/results/ch14"
    for path in files:
        assert common.verified(path)
        study = dict(np.load(path))
        methods = {k.split("|")[0] for k in study if "|" in k}
        assert "random" in methods and len(methods) == 7
        n = len(study["random|plausibility AUC"])
        assert n >= 100
        for m in methods:
            for metric in ("sanity 1 - |ρ|", "sanity head"):
                v = study[f"{m}|{metric}"]
                assert v.shape == (n,) and np.all((v[np.isfinite(v)] >= 0) & (v[np.isfinite(v)] <= 1))
            assert np.all(np.abs(study[f"{m}|stability ρ"][np.isfinite(study[f"{m}|stability ρ"])]) <= 1 + 1e-9)
        assert np.allclose(study["random|sanity 1 - |ρ|"], 0.0)  # same seed, same random ranking on any model


# ---------------------------------------------------------------------------------------------
# Chapter 14's harness: explanations, perturbations, tables (small synthetic inputs, known answers)
# ---------------------------------------------------------------------------------------------


def _linear_image_model(n_classes=3):
    """[batch, 1, 28, 28] -> [batch, class] logits of a linear model with known weights."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, n_classes)).eval()
    return model, model[1].weight.detach().reshape(n_classes, 28, 28)


def test_image_explanation_known_answers_on_a_linear_model():
    model, w = _linear_image_model()
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([0, 1, 2, 1])
    black = -0.8
    sal = evaluation.image_explanation(model, "saliency", images, target, black=black)
    torch.testing.assert_close(sal, w[target].abs())  # |gradient| of a linear logit = |its weights|
    ig = evaluation.image_explanation(model, "integrated gradients", images, target, black=black)
    torch.testing.assert_close(ig, (images[:, 0] - black) * w[target], rtol=1e-4, atol=1e-5)  # exact on a linear model
    occ = evaluation.image_explanation(model, "occlusion", images, target, black=black)
    assert occ.shape == (4, 28, 28) and torch.isfinite(occ).all()
    r1 = evaluation.image_explanation(model, "random", images, target, black=black, seed=3)
    r2 = evaluation.image_explanation(model, "random", images, target, black=black, seed=3)
    assert torch.equal(r1, r2) and r1.shape == (4, 28, 28) and float(r1.min()) >= 0 and float(r1.max()) < 1
    assert not torch.equal(r1, evaluation.image_explanation(model, "random", images, target, black=black, seed=4))
    shap = evaluation.image_explanation(model, "GradientSHAP", images, target, black=black,
                                        shap_baselines=torch.zeros(2, 1, 28, 28))
    assert shap.shape == (4, 28, 28)
    rise = evaluation.image_explanation(model, "RISE", images[:1], target[:1], black=black, seed=2)
    from helpers import vision  # the harness runs vision.rise_saliency, dimming to black

    ref = vision.rise_saliency(model, images[:1], target[:1], fill=black, seed=2, **evaluation.RISE_SETTINGS)
    assert torch.equal(rise, ref) and rise.shape == (1, 28, 28)


def test_image_explanation_attention_maps_on_a_tiny_vit():
    from helpers import vision

    torch.manual_seed(0)
    vit = vision.fashion_vit(width=16, depth=2, heads=2).eval()
    images = torch.randn(3, 1, 28, 28)
    for method in ("last-layer attention", "rollout"):
        m = evaluation.image_explanation(vit, method, images, torch.zeros(3, dtype=torch.long), black=-0.8)
        assert m.shape == (3, 28, 28) and bool((m >= 0).all())  # attention weights are non-negative


def test_image_explanation_bad_inputs():
    model, _ = _linear_image_model()
    images, target = torch.zeros(2, 1, 28, 28), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="method must be one of"):
        evaluation.image_explanation(model, "lime", images, target, black=0.0)
    with pytest.raises(ValueError, match=r"\[batch, 1, height, width\]"):
        evaluation.image_explanation(model, "saliency", images[:, 0], target, black=0.0)
    with pytest.raises(ValueError, match="NaN"):
        evaluation.image_explanation(model, "saliency", images.fill_(float("nan")), target, black=0.0)
    with pytest.raises(ValueError, match="target must be"):
        evaluation.image_explanation(model, "saliency", torch.zeros(2, 1, 28, 28), torch.tensor([0]), black=0.0)
    with pytest.raises(ValueError, match="shap_baselines"):
        evaluation.image_explanation(model, "GradientSHAP", torch.zeros(2, 1, 28, 28), target, black=0.0)
    with pytest.raises(ValueError, match="ProtoViT"):
        evaluation.image_explanation(model, "prototype map", torch.zeros(2, 1, 28, 28), target, black=0.0)
    with pytest.raises(ValueError, match="black"):
        evaluation.image_explanation(model, "saliency", torch.zeros(2, 1, 28, 28), target, black=float("nan"))


def test_perturbations_and_prediction_check():
    x = torch.zeros(3, 5)
    noisy = evaluation.gaussian_perturbation(0.5)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, 0.5 * torch.randn(3, 5, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="std"):
        evaluation.gaussian_perturbation(-1.0)
    kept = evaluation.prediction_kept(lambda v: v, torch.tensor([1, 0, 2]))
    assert kept(None, torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 0, 1]])).tolist() == [True, False, True]
    with pytest.raises(ValueError, match="target"):
        evaluation.prediction_kept(lambda v: v, torch.zeros(2, 2))
    probs = evaluation.softmax_predictor(lambda v: v)(torch.tensor([[0.0, math.log(3.0)]]))
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.75]]))
    with pytest.raises(ValueError, match="callable"):
        evaluation.softmax_predictor("model")


def test_token_masking_masks_one_candidate_per_passage():
    ids = torch.tensor([[101, 5, 6, 7, 102], [101, 8, 102, 0, 0]])
    cand = torch.tensor([[False, True, True, True, False], [False, True, False, False, False]])
    moved = evaluation.token_masking(cand, 103)(ids, torch.Generator().manual_seed(0))
    changed = moved != ids
    assert changed.sum(1).tolist() == [1, 1] and bool((changed <= cand).all()) and bool((moved[changed] == 103).all())
    again = evaluation.token_masking(cand, 103)(ids, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)  # the generator decides
    with pytest.raises(ValueError, match="no candidate"):
        evaluation.token_masking(torch.tensor([[True, False], [False, False]]), 103)
    with pytest.raises(ValueError, match="shape"):
        evaluation.token_masking(cand, 103)(ids[:, :3], torch.Generator())


def test_item_swap_replaces_one_purchase():
    seqs = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    moved = evaluation.item_swap(5)(seqs, torch.Generator().manual_seed(0))
    assert bool(((moved != seqs).sum(1) == 1).all())  # catalogue 0..4 never holds the old items
    assert bool(((moved == seqs) | (moved < 5)).all())
    with pytest.raises(ValueError, match="n_items"):
        evaluation.item_swap(0)


def test_setting_table_hand_computed():
    per_item = {"image: a": {"auc": np.array([0.2, np.nan, 0.4]), "rho": np.array([1.0, 0.0, 0.5])},
                "image: b": {"auc": np.array([0.6, 0.6, 0.6]), "rho": np.array([0.0, 0.0, 0.0])},
                "text: a": {"auc": np.array([0.9])}}
    seconds = {"image: a": 0.1, "image: b": 0.2, "text: a": 3.0}
    table = evaluation.setting_table(per_item, seconds, "image")
    assert list(table.index) == ["a", "b"] and list(table.columns) == ["setting", "auc", "rho", "seconds per input"]
    assert table.loc["a", "auc"] == pytest.approx(0.3) and table.loc["a", "rho"] == pytest.approx(0.5)
    assert table.loc["b", "seconds per input"] == 0.2 and set(table["setting"]) == {"image"}
    with pytest.raises(ValueError, match="no row"):
        evaluation.setting_table(per_item, seconds, "shop")
    with pytest.raises(ValueError, match="seconds_of"):
        evaluation.setting_table(per_item, {"image: a": 0.1}, "image")


class _Words:
    """A stand-in for a fast tokenizer's backend: lower-cases, splits at spaces and punctuation."""

    class backend_tokenizer:  # noqa: N801 (the attribute name of a Hugging Face tokenizer)
        class normalizer:  # noqa: N801
            normalize_str = staticmethod(str.lower)

        class pre_tokenizer:  # noqa: N801
            @staticmethod
            def pre_tokenize_str(text):
                import re

                return [(m.group(), m.span()) for m in re.finditer(r"\w+|[^\w\s]", text)]


def test_exclusive_words_and_their_word_pieces():
    assert evaluation.tokenizer_words(_Words(), "Emma, said Harriet.") == ["emma", ",", "said", "harriet", "."]
    texts = [("Emma said yes", 0), ("Emma said no", 0), ("Anne said 3 3 3", 1), ("Anne Anne", 1)]
    words = [evaluation.tokenizer_words(_Words(), t) for t, _ in texts]
    counts, exclusive = evaluation.exclusive_words(words, [y for _, y in texts], 2, min_count=2)
    assert counts[0] == {"emma": 2, "said": 2, "yes": 1, "no": 1} and counts[1]["anne"] == 3
    assert exclusive == [{"emma"}, {"anne"}]  # "said" is in both novels; "3" is not a word; "yes" is too rare
    cand = torch.tensor([[False, True, True, True, False], [False, True, True, False, False]])
    truth = evaluation.word_piece_truth([[None, 0, 0, 1, None], [None, 0, 1, None, None]],
                                        [["emma", "said"], ["said", "anne"]], [{"emma"}, {"anne"}], cand)
    assert truth.tolist() == [[False, True, True, False, False], [False, False, True, False, False]]
    with pytest.raises(ValueError, match="labels"):
        evaluation.exclusive_words(words, [0, 0, 1, 2], 2, min_count=1)
    with pytest.raises(ValueError, match="min_count"):
        evaluation.exclusive_words(words, [0, 0, 1, 1], 2, min_count=0)
    with pytest.raises(ValueError, match="word ids"):
        evaluation.word_piece_truth([[None, 0]], [["emma"]], [{"emma"}], torch.ones(1, 3).bool())


def test_text_study_on_a_tiny_classifier(tmp_path):
    from transformers import BertConfig, BertModel

    from helpers import attribution

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16)
    cfg._attn_implementation = "eager"
    clf = attribution.PooledClassifier(BertModel(cfg, add_pooling_layer=False), 3).eval().requires_grad_(False)
    with torch.no_grad():
        clf.head.weight.normal_(0, 3.0)
    ids = torch.tensor([[1, 7, 8, 9, 10, 2], [1, 11, 12, 13, 2, 0]])
    am = (ids != 0).long()
    content = am.bool() & (ids != 1) & (ids != 2)
    names = torch.tensor([[False, True, False, False, False, False], [False, False, True, True, False, False]])
    with torch.no_grad():
        target = clf.predict_proba(ids, am).argmax(1)
    methods = ["integrated_gradients", "random"]
    out = evaluation.text_study(clf, ids, am, content, names, target, methods=methods, pad_id=0, mask_id=3,
                                ig_steps=4, path=tmp_path / "study.npz")
    assert set(out) == {"ig delta / gap"} | {f"{m}|{k}" for m in methods for k in
                                             ("seconds", "text AOPC comprehensiveness", "text AOPC sufficiency",
                                              "plausibility AUC", "stability ρ", "sanity head", "sanity 1 - |ρ|")}
    for key, v in out.items():
        assert v.shape == ((1,) if key.endswith("seconds") else (2,)), key
    assert np.allclose(out["random|sanity 1 - |ρ|"], 0.0)  # same seed, same random ranking on any model
    saved = dict(np.load(tmp_path / "study.npz"))
    assert all(np.array_equal(saved[k], out[k], equal_nan=True) for k in out)
    with pytest.raises(ValueError, match="share one"):
        evaluation.text_study(clf, ids, am[:, :5], content, names, target, methods=methods, pad_id=0, mask_id=3,
                              ig_steps=4)
    with pytest.raises(ValueError, match="ig_steps"):
        evaluation.text_study(clf, ids, am, content, names, target, methods=methods, pad_id=0, mask_id=3, ig_steps=0)


def test_concept_students_and_contributions():
    groups = [[0, 1], [2, 3, 4]]
    choq, lin = evaluation.concept_students(groups, 5, 3, seed=0)
    choq2, lin2 = evaluation.concept_students(groups, 5, 3, seed=0)
    assert torch.equal(lin.weight, lin2.weight) and lin.weight.shape == (3, 5)  # the seed decides
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 2, 1, 2])
    c = evaluation.concept_contributions(choq, z, target, "Choquet contributions")
    torch.testing.assert_close(c.sum(1), choq.scores(z)[torch.arange(4), target])  # shares sum to the class score
    lc = evaluation.concept_contributions(lin, z, target, "linear contributions")
    torch.testing.assert_close(lc.sum(1) + lin.bias[target].detach(), lin(z)[torch.arange(4), target].detach())
    r = evaluation.concept_contributions(lin, z, target, "random concepts", seed=2)
    assert torch.equal(r, evaluation.concept_contributions(choq, z, target, "random concepts", seed=2))
    with pytest.raises(ValueError, match="partition"):
        evaluation.concept_students([[0, 1], [2]], 5, 3, seed=0)
    with pytest.raises(ValueError, match="method"):
        evaluation.concept_contributions(lin, z, target, "shapley")
    with pytest.raises(ValueError, match="target"):
        evaluation.concept_contributions(lin, z, target[:2], "linear contributions")


def test_history_predictor_and_redrawn_prototypes():
    from helpers import prototypes

    torch.manual_seed(0)
    model = prototypes.SequentialRecommender(torch.randn(50, 6), dim=8, max_len=7, n_prototypes=3).eval()
    predict = evaluation.history_predictor(model, 50)
    ids, am = torch.tensor([[3, 4, 5], [6, 7, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad():
        expected = model(prototypes.pad_histories([[3, 4, 5], [6, 7]], n_items=50, max_len=7))[:, -1].softmax(-1)
    torch.testing.assert_close(predict(ids, am), expected)
    assert predict(ids, am).shape == (2, 50)
    redrawn = evaluation.redrawn_prototypes(model, seed=1)
    assert not torch.equal(redrawn.prototypes, model.prototypes) and bool((redrawn.bias == 0).all())
    torch.testing.assert_close(evaluation.redrawn_prototypes(model, seed=1).prototypes, redrawn.prototypes)
    for name, p in model.named_parameters():  # everything else, and the original, untouched
        if name not in ("prototypes", "bias"):
            assert torch.equal(p, dict(redrawn.named_parameters())[name])
    with pytest.raises(ValueError, match="prototypes"):
        evaluation.redrawn_prototypes(torch.nn.Linear(2, 2), seed=0)
    with pytest.raises(ValueError, match="max_len"):
        evaluation.history_predictor(torch.nn.Linear(2, 2), 50)


def test_normalise_columns_batched_matches_normalise_columns():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 5, 3))
    values[0, 1, 0] = values[2, :, 2] = np.nan  # a missing cell; a column missing from every method
    values[1, :, 1] = 0.7  # a constant column
    cols, higher = ["auc", "rho", "t"], {"auc": True, "rho": False, "t": False}
    floor = {"auc": 5.0}  # wider than the spread: the floor binds
    out = evaluation.normalise_columns_batched(values, cols, higher_is_better=higher, floor=floor)
    for b in range(2):
        one = evaluation.normalise_columns(pd.DataFrame(values[b], columns=cols), higher_is_better=higher, floor=floor)
        np.testing.assert_allclose(out[b], one.to_numpy(), equal_nan=True)
    assert np.isnan(out[2, :, 2]).all()
    with pytest.raises(ValueError, match="metric"):
        evaluation.normalise_columns_batched(values[0], cols, higher_is_better=higher)
    with pytest.raises(ValueError, match="missing"):
        evaluation.normalise_columns_batched(values, cols, higher_is_better={"auc": True})


def test_paired_comparison_and_ties_with_the_best():
    from helpers import stats

    base = np.linspace(0.0, 1.0, 20)
    per_item = {"s: best": {"auc": base + 1.0}, "s: same": {"auc": base + 1.0},
                "s: close": {"auc": base + 1.0 + np.where(np.arange(20) % 2, 0.01, -0.01)},
                "s: worse": {"auc": base}}
    d = evaluation.paired_comparison(per_item, "s", "auc", "best", "worse")
    assert d.value == pytest.approx(1.0) and d.excludes(0.0) and d.n == 20
    per_item["s: worse"]["auc"][3] = np.nan  # an item undefined for one method is left out of the pair
    assert evaluation.paired_comparison(per_item, "s", "auc", "best", "worse").n == 19
    setting = pd.Series("s", index=list(per_item))
    cell_ci = {r: {"auc": stats.bootstrap_ci(v["auc"][np.isfinite(v["auc"])])} for r, v in per_item.items()}
    tied = evaluation.tied_with_best(per_item, setting, ["auc"], higher_is_better={"auc": True}, cell_ci=cell_ci)
    assert tied.to_dict("records")[0]["tied with the best (paired bootstrap)"] == "same, close"
    assert tied.loc[0, "best"].startswith("best ") and tied.loc[0, "metric"] == "auc"
    lower = evaluation.tied_with_best(per_item, setting, ["auc"], higher_is_better={"auc": False}, cell_ci=cell_ci)
    assert lower.loc[0, "best"].startswith("worse ") and lower.loc[0, "tied with the best (paired bootstrap)"] == "-"
    with pytest.raises(ValueError, match="no 'auc'"):
        evaluation.paired_comparison(per_item, "s", "auc", "best", "missing")
    with pytest.raises(ValueError, match="which way"):
        evaluation.tied_with_best(per_item, setting, ["auc"], higher_is_better={}, cell_ci=cell_ci)


def test_word_intrusion_helpers():
    unit = evaluation.unit_rows(np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]]), np.array([[0, 1, 2]]))
    torch.testing.assert_close(unit, torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64))
    odd = evaluation.intrusion_oddness(unit)
    assert odd.tolist() == [[0.5, 0.5, 1.0]] and int(odd.argmax(1)) == 2  # the orthogonal word is the intruder
    import scipy.sparse

    sparse = evaluation.unit_rows(scipy.sparse.csr_matrix(np.array([[0.0, 4.0]])), np.array([0]))
    assert sparse.tolist() == [[0.0, 1.0]]
    rows = evaluation.word_rows(torch.arange(6.0).reshape(3, 2), {"a": 0, "b": 2}, np.array([["b", "a"]], dtype=object))
    assert rows.tolist() == [[[4.0, 5.0], [0.0, 1.0]]] and rows.dtype == torch.float64
    with pytest.raises(ValueError, match="not in the table"):
        evaluation.word_rows(torch.eye(2), {"a": 0}, np.array(["a", "zz"], dtype=object))
    with pytest.raises(ValueError, match="idx"):
        evaluation.unit_rows(np.eye(2), np.array([2]))
    with pytest.raises(ValueError, match="sets"):
        evaluation.intrusion_oddness(torch.ones(3, 2))


def test_kendall_w_is_friedmans_statistic_rescaled_and_reliability_reads_per_item_tables():
    from scipy.stats import friedmanchisquare

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (30, 5)).astype(float) + np.arange(5) * 0.7          # ties, and a shared trend
    chi2 = friedmanchisquare(*x.T).statistic                                     # tie-corrected
    assert evaluation.kendall_w(x) == pytest.approx(chi2 / (30 * (5 - 1)), rel=1e-9)
    with pytest.raises(ValueError, match="finite"):
        evaluation.kendall_w([[1.0, np.nan], [1.0, 2.0]])
    per_item = {f"s: m{j}": {"a": x[:, j], "b": -x[:, j], "c": rng.random(30)} for j in range(5)}
    conc, agree = evaluation.metric_reliability(per_item, list(per_item), ["a", "c"], variants=[("a", "b", False)],
                                                n_resamples=200)
    assert conc["a"].value == pytest.approx(evaluation.kendall_w(x)) and conc["a"].lo <= conc["a"].value
    assert conc["c"].value < conc["a"].value                                    # noise is less concordant
    assert agree["a", "b"].value == pytest.approx(1.0)                            # b is a with the other sign
    with pytest.raises(ValueError, match="two methods"):
        evaluation.metric_reliability(per_item, ["s: m0"], ["a"])


def test_roar_remove_fills_the_top_ranked_pixels_of_each_image():
    x = torch.arange(8.0).reshape(2, 1, 2, 2)
    scores = torch.tensor([[[0.1, 0.9], [0.5, 0.2]], [[1.0, 1.0], [0.0, 0.0]]])
    out = evaluation.roar_remove(x, scores, 0.5, fill=-1.0)
    assert out[0, 0].tolist() == [[0.0, -1.0], [-1.0, 3.0]]
    assert out[1, 0].tolist() == [[-1.0, -1.0], [6.0, 7.0]]                      # ties: first pixel first
    assert bool((evaluation.roar_remove(x, scores, 1.0) == 0).all())
    with pytest.raises(ValueError, match="scores"):
        evaluation.roar_remove(x, scores[:1], 0.5)
    with pytest.raises(ValueError, match="scores"):
        evaluation.roar_remove(x, torch.full_like(scores, float("nan")), 0.5)
    with pytest.raises(ValueError):
        evaluation.roar_remove(x, scores, 1.5)


def test_roar_maps_rank_by_the_method_and_sobel_needs_no_model():
    from helpers import data, vision

    model = vision.pretrained("vit", progress=False)
    x, _ = data.fashion_tensors("test")
    edges = evaluation.roar_maps(None, "Sobel edges", x[:3])
    assert edges.shape == (3, 28, 28) and torch.equal(edges, data.shift_domain(x[:3], "edges")[:, 0])
    sal = evaluation.roar_maps(model, "saliency", x[:3], chunk=2)
    assert sal.shape == (3, 28, 28) and bool((sal >= 0).all())
    with pytest.raises(ValueError, match="method"):
        evaluation.roar_maps(model, "occlusion", x[:3])


# --- meta-evaluation (MetaQuantus) ------------------------------------------------------------------------------

def test_perturbed_weights_multiplies_every_parameter_by_noise_around_one_and_leaves_the_model_alone():
    import numpy as np

    model = torch.nn.Sequential(torch.nn.Linear(200, 300), torch.nn.LayerNorm(300))
    before = [p.detach().clone() for p in model.parameters()]
    same = evaluation.perturbed_weights(model, 0.0, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, same.parameters(), strict=True))
    moved = evaluation.perturbed_weights(model, 0.1, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))   # original untouched
    ratio = (moved[0].weight / model[0].weight).detach().numpy().ravel()
    assert abs(ratio.mean() - 1) < 0.005 and abs(ratio.std() - 0.1) < 0.005
    again = evaluation.perturbed_weights(model, 0.1, seed=0)
    assert torch.equal(again[0].weight, moved[0].weight)                                       # seeded
    other = evaluation.perturbed_weights(model, 0.1, seed=1)
    assert not np.allclose(other[0].weight.detach(), moved[0].weight.detach())
    with pytest.raises(ValueError, match="std"):
        evaluation.perturbed_weights(model, -1.0, seed=0)


def test_uniform_input_noise_stays_within_its_amount_and_is_clipped_at_the_batch_minimum():
    x = torch.linspace(-1, 1, 2 * 28 * 28).reshape(2, 1, 28, 28)
    moved = evaluation.uniform_input_noise(x, 0.3, seed=0)
    assert (moved - x).abs().max() <= 0.3 + 1e-6 and float(moved.min()) >= -1.0
    assert (moved - x).abs().max() > 0.29                                   # the noise fills its range
    assert torch.equal(evaluation.uniform_input_noise(x, 0.0, seed=0), x)
    with pytest.raises(ValueError, match="amount"):
        evaluation.uniform_input_noise(x, float("nan"), seed=0)
    with pytest.raises(ValueError):
        evaluation.uniform_input_noise(torch.zeros(2, 28, 28), 0.1, seed=0)


def test_meta_consistency_known_answers():
    import numpy as np
    from scipy.stats import wilcoxon

    q = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 0.1, 0.5, 0.2]])   # [method, item]
    every = np.ones(4, bool)
    # nothing moved: resilient and consistent
    assert evaluation.meta_consistency(q, q, every, kind="resilience", higher_is_better=True) == \
        {"IAC": 1.0, "IEC": 1.0, "kept": 4}
    # methods 0 and 1 swap places on item 0 only: 2 of the 12 (rank, item) places change
    swapped = q.copy()
    swapped[[0, 1], 0] = swapped[[1, 0], 0]
    r = evaluation.meta_consistency(q, swapped, every, kind="resilience", higher_is_better=True)
    assert r["IEC"] == pytest.approx(10 / 12)
    # IAC is the mean Wilcoxon p (zsplit); unmoved methods give p = 1
    p0 = wilcoxon(q[0], swapped[0], zero_method="zsplit").pvalue
    p1 = wilcoxon(q[1], swapped[1], zero_method="zsplit").pvalue
    assert r["IAC"] == pytest.approx((p0 + p1 + 1.0) / 3)
    # adversary: every score falls -> IEC 1 for higher-is-better, 0 for lower-is-better; IAC = mean(1 - p)
    down = q - 0.05
    a = evaluation.meta_consistency(q, down, every, kind="adversary", higher_is_better=True)
    assert a["IEC"] == 1.0
    assert a["IAC"] == pytest.approx(1 - wilcoxon(q[0], down[0], zero_method="zsplit").pvalue)
    assert evaluation.meta_consistency(q, down, every, kind="adversary", higher_is_better=False)["IEC"] == 0.0
    # only the kept items count
    kept = np.array([True, False, False, False])
    assert evaluation.meta_consistency(q, swapped, kept, kind="resilience", higher_is_better=True)["IEC"] == \
        pytest.approx(1 / 3)
    none = evaluation.meta_consistency(q, q, np.zeros(4, bool), kind="adversary", higher_is_better=True)
    assert np.isnan(none["IAC"]) and np.isnan(none["IEC"]) and none["kept"] == 0


def test_meta_consistency_rejects_bad_input():
    import numpy as np

    q = np.zeros((2, 3))
    with pytest.raises(ValueError, match="kind"):
        evaluation.meta_consistency(q, q, np.ones(3, bool), kind="other", higher_is_better=True)
    with pytest.raises(ValueError, match="kept"):
        evaluation.meta_consistency(q, q, np.ones(4, bool), kind="resilience", higher_is_better=True)
    with pytest.raises(ValueError, match="shape"):
        evaluation.meta_consistency(q, np.zeros((2, 4)), np.ones(3, bool), kind="resilience", higher_is_better=True)
    with pytest.raises(ValueError, match="finite"):
        evaluation.meta_consistency(q, np.full((2, 3), np.nan), np.ones(3, bool), kind="resilience",
                                    higher_is_better=True)


def _fake_study(recipe, n=6):
    """A study whose metrics never move under resilience tests and all fall under adversary tests."""
    import numpy as np

    gen = np.random.default_rng(0)
    clean = {m: {k: gen.random(n).tolist() for k in evaluation.IMAGE_QUALITY} for m in recipe["methods"]}
    target = [0] * n
    tests = {}
    for name, (_, kind, _) in recipe["tests"].items():
        if kind == "resilience":
            scores, predicted = clean, target
        else:
            scores = {m: {k: [v - 0.5 if evaluation.IMAGE_QUALITY[k] else v + 0.5 for v in vals]
                          for k, vals in d.items()} for m, d in clean.items()}
            predicted = [1] * n
        tests[name] = [{"predicted": predicted, "scores": scores}] * recipe["draws"]
    return {"target": target, "clean": clean, "tests": tests}


def test_meta_scores_of_an_ideal_metric_and_of_the_two_controls():
    import numpy as np

    recipe = {**evaluation.META, "methods": ("a", "b", "c"), "draws": 2}
    scores = evaluation.meta_scores(_fake_study(recipe), recipe=recipe)
    assert set(scores) == {"model", "input"}
    ideal = scores["model"]["image deletion AUC"]
    assert ideal["IAC_NR"] == [1.0, 1.0] and ideal["IEC_NR"] == [1.0, 1.0] and ideal["IEC_AR"] == [1.0, 1.0]
    assert all(0.9 < v <= 1.0 for v in ideal["IAC_AR"])         # six items, every one moved: p = 1/32
    frozen = scores["input"]["frozen"]                          # resilient by construction, never reactive
    assert frozen["IAC_NR"] == [1.0, 1.0] and frozen["IEC_NR"] == [1.0, 1.0]
    assert frozen["IAC_AR"] == [0.0, 0.0] and frozen["IEC_AR"] == [0.0, 0.0] and frozen["MC"] == [0.5, 0.5]
    assert all(np.isfinite(scores["model"]["random"]["MC"]))
    bad = {**recipe, "tests": {"model resilience": ("model", "resilience", 0.001)}}
    with pytest.raises(ValueError, match="adversary"):
        evaluation.meta_scores(_fake_study(bad), recipe=bad)


def test_image_quality_rejects_bad_maps_and_scores_a_map_equal_to_the_truth_as_plausible():
    vit_like = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 3))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    truth = x[:, 0] > 0.5
    q = evaluation.image_quality(vit_like, truth.float(), x, torch.tensor([0, 1]), black=-1.0, foreground=truth)
    assert q["plausibility AUC"].tolist() == [1.0, 1.0]
    assert set(q) == set(evaluation.IMAGE_QUALITY) and q["image deletion AUC"].shape == (2,)
    with pytest.raises(ValueError, match="maps"):
        evaluation.image_quality(vit_like, torch.zeros(2, 27, 28), x, torch.tensor([0, 1]), black=-1.0,
                                 foreground=truth)
    with pytest.raises(ValueError, match="foreground"):
        evaluation.image_quality(vit_like, truth.float(), x, torch.tensor([0, 1]), black=-1.0, foreground=truth.float())
