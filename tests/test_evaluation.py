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
