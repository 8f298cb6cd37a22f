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
