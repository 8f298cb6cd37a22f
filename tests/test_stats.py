"""helpers.stats: known-answer intervals and tests, formatting, held-out selection, bad inputs."""

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats as st

from helpers import stats
from helpers.stats import Estimate


def correctness(p: float, n: int, seed: int) -> np.ndarray:
    """[n] 0/1 correctness of a classifier that is right with probability p."""
    return (np.random.default_rng(seed).random(n) < p).astype(float)


# Estimate


def test_format_exact_strings():
    e = Estimate(0.59, 0.55, 0.63, n=400, method="bootstrap 95 % over 400 examples")
    assert f"{e:.2f}" == "0.59 [0.55, 0.63]"
    assert f"{e:.1%}" == "59.0% [55.0%, 63.0%]"
    assert f"{e}" == str(e) == "0.59 [0.55, 0.63]"
    assert f"{Estimate(0.123456, 0.1, 0.15, n=3, method='m')}" == "0.123 [0.1, 0.15]"
    assert f"{e.scaled(100):.1f}" == "59.0 [55.0, 63.0]"


def test_scaled_negative_swaps_bounds_and_keeps_the_rest():
    e = Estimate(0.04, 0.01, 0.07, n=400, method="paired", p=0.02).scaled(-1)
    assert (e.value, e.lo, e.hi) == (-0.04, -0.07, -0.01)
    assert (e.n, e.method, e.p) == (400, "paired", 0.02)


def test_excludes_overlaps_verdict():
    win, tie, loss = (Estimate(v, lo, hi, n=10, method="m") for v, lo, hi in [(1, 0.5, 2), (0, -1, 1), (-1, -2, -0.5)])
    assert win.excludes() and not tie.excludes() and loss.excludes()
    assert tie.excludes(1.5) and not tie.excludes(1.0)  # the bounds are inside the interval
    assert win.overlaps(tie) and not win.overlaps(loss) and loss.overlaps(tie)
    assert win.verdict(("SINr", "BoW")) == "SINr beats BoW"
    assert loss.verdict(("SINr", "BoW")) == "BoW beats SINr"
    assert tie.verdict() == "a tie"
    assert win.verdict(("A", "B"), higher_is_better=False) == "B beats A"  # a loss that grew


def test_as_dict_is_json_ready():
    e = Estimate(np.float64(0.5), np.float64(0.4), 0.6, n=np.int64(20), method="m", p=np.float64(0.01))
    d = e.as_dict()
    assert d == {"value": 0.5, "lo": 0.4, "hi": 0.6, "n": 20, "method": "m", "p": 0.01, "text": "0.5 [0.4, 0.6]"}
    json.dumps(d)


# bootstrap_ci


def test_bootstrap_normal_mean_known_width():
    sigma, n = 2.0, 4000
    x = np.random.default_rng(1).normal(3.0, sigma, n)
    e = stats.bootstrap_ci(x)
    assert e.lo < 3.0 < e.hi
    assert e.value == pytest.approx(x.mean())
    assert e.hi - e.lo == pytest.approx(2 * 1.96 * sigma / math.sqrt(n), rel=0.15)
    assert e.method == "bootstrap 95 % over 4000 examples" and e.n == n


def test_bootstrap_accuracy_and_other_statistics():
    c = correctness(0.7, 400, seed=2)
    e = stats.bootstrap_ci(c)
    assert e.value == c.mean() and e.lo < e.value < e.hi
    acc = c.mean()
    assert (e.hi - e.lo) / 2 == pytest.approx(1.96 * math.sqrt(acc * (1 - acc) / 400), rel=0.15)  # normal approx.
    bca = stats.bootstrap_ci(c, method="BCa")
    assert bca.method.startswith("BCa bootstrap") and bca.lo < bca.value < bca.hi
    q90 = stats.bootstrap_ci(np.arange(50.0), statistic=lambda v: float(np.percentile(v, 90)), n_resamples=200)
    assert q90.lo <= q90.value <= q90.hi


@pytest.mark.parametrize("method", ["percentile", "BCa", "basic"])
def test_bootstrap_degenerate_is_zero_width_without_warning(method):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        e = stats.bootstrap_ci(np.full(30, 0.8), method=method)
    assert e.lo == e.value == e.hi == pytest.approx(0.8)


def test_bootstrap_is_deterministic():
    x = np.random.default_rng(3).normal(size=200)
    assert stats.bootstrap_ci(x, seed=5) == stats.bootstrap_ci(x, seed=5)
    assert stats.bootstrap_ci(x, seed=5) != stats.bootstrap_ci(x, seed=6)
    a, b = correctness(0.8, 200, 4), correctness(0.7, 200, 5)
    assert stats.paired_difference(a, b, seed=1) == stats.paired_difference(a, b, seed=1)


# paired_difference and mcnemar


def test_paired_identical_is_exactly_zero():
    a = correctness(0.7, 300, seed=6)
    d = stats.paired_difference(a, a.copy())
    assert (d.value, d.lo, d.hi, d.p) == (0.0, 0.0, 0.0, 1.0)
    assert d.verdict() == "a tie"


def test_paired_clearly_better_and_symmetric():
    a, b = correctness(0.9, 500, seed=7), correctness(0.6, 500, seed=8)
    d = stats.paired_difference(a, b)
    assert d.value == pytest.approx(a.mean() - b.mean())
    assert d.p < 0.01 and d.p == pytest.approx(2 / 2001)  # no resample on the other side: the floor
    assert d.verdict(("A", "B")) == "A beats B"
    r = stats.paired_difference(b, a)
    assert (r.value, r.lo, r.hi, r.p) == pytest.approx((-d.value, -d.hi, -d.lo, d.p))
    assert r.verdict(("A", "B")) == "B beats A"
    assert d.method == "paired bootstrap 95 % over 500 examples"


def test_paired_same_skill_is_a_tie():
    a, b = correctness(0.75, 400, seed=10), correctness(0.75, 400, seed=11)
    d = stats.paired_difference(a, b)
    assert abs(d.value) < 0.05 and not d.excludes(0.0) and d.p > 0.05


def test_paired_pairing_narrows_the_interval():
    rng = np.random.default_rng(11)
    shared = rng.normal(0, 5, 300)  # example difficulty, shared by both systems
    a, b = shared + 0.3 + rng.normal(0, 0.5, 300), shared + rng.normal(0, 0.5, 300)
    d = stats.paired_difference(a, b)
    ea, eb = stats.bootstrap_ci(a), stats.bootstrap_ci(b)
    assert d.verdict() == "A beats B" and ea.overlaps(eb)  # unpaired intervals cannot tell them apart


def test_mcnemar_hand_table():
    # 50 both right, 12 only A right, 3 only B right, 35 both wrong
    a = np.array([1] * 50 + [1] * 12 + [0] * 3 + [0] * 35)
    b = np.array([1] * 50 + [0] * 12 + [1] * 3 + [0] * 35)
    m = stats.mcnemar(a, b)
    assert (m.b01, m.b10) == (3, 12)
    assert m.p == pytest.approx(st.binomtest(12, 15, 0.5).pvalue)
    assert m.p == pytest.approx(2 * (455 + 105 + 15 + 1) / 2**15)  # 2 P(X >= 12), X ~ Bin(15, 1/2)
    assert m.difference.value == pytest.approx(0.09) and m.difference.p is not None
    assert stats.mcnemar(a.astype(bool), b.astype(bool)) == m


def test_mcnemar_no_discordant_pairs():
    a = np.array([1, 0, 1, 1, 0])
    m = stats.mcnemar(a, a)
    assert (m.b01, m.b10, m.p) == (0, 0, 1.0)


# over_seeds, binomial_ci, spearman


def test_over_seeds_t_interval():
    e = stats.over_seeds([1.0, 2.0, 3.0])
    half = 4.302653 / math.sqrt(3)
    assert (e.value, e.lo, e.hi) == pytest.approx((2.0, 2 - half, 2 + half), abs=1e-6)
    assert e.method == "3 seeds, t interval" and e.n == 3
    assert stats.over_seeds([0.5, 0.5, 0.5]) == Estimate(0.5, 0.5, 0.5, n=3, method="3 seeds, t interval")


def test_binomial_wilson_textbook():
    e = stats.binomial_ci(8, 10)
    z, p, n = st.norm.ppf(0.975), 0.8, 10
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert (e.value, e.lo, e.hi) == pytest.approx((0.8, centre - half, centre + half), abs=1e-9)
    assert (e.lo, e.hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert e.method == "Wilson 95 % over 10 trials"
    cp = stats.binomial_ci(8, 10, method="exact")
    assert (cp.lo, cp.hi) == pytest.approx((0.4439, 0.9748), abs=1e-4)  # Clopper-Pearson tables
    assert stats.binomial_ci(0, 5).lo == 0.0 and stats.binomial_ci(5, 5).hi == pytest.approx(1.0)


def test_spearman_convention():
    assert stats.spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert stats.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert stats.spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties averaged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(stats.spearman([1, 2, 3], [5, 5, 5]))
        assert stats.spearman([4, 4], [4, 4]) == 1.0  # both constant: nothing to reorder (rank_correlations)


# held-out selection


@pytest.mark.parametrize("labels", [None, np.array([0] * 30 + [1] * 10)])
def test_split_indices_disjoint_deterministic(labels):
    s, r = stats.split_indices(40, fraction=0.5, seed=3, labels=labels)
    assert np.intersect1d(s, r).size == 0 and np.array_equal(np.sort(np.concatenate([s, r])), np.arange(40))
    assert s.dtype == r.dtype == np.int64 and len(s) == 20
    s2, r2 = stats.split_indices(40, fraction=0.5, seed=3, labels=labels)
    assert np.array_equal(s, s2) and np.array_equal(r, r2)
    assert not np.array_equal(s, stats.split_indices(40, fraction=0.5, seed=4, labels=labels)[0])
    if labels is not None:
        assert (labels[s] == 1).sum() == 5 and (labels[r] == 1).sum() == 5


def test_selection_ignores_the_report_split():
    select = {"lr=1e-3": [0.70, 0.72, 0.71], "lr=1e-2": [0.80, 0.82, 0.81], "lr=1e-1": [0.50, 0.52, 0.51]}
    report = {"lr=1e-3": [0.99, 0.98, 0.99], "lr=1e-2": [0.60, 0.62, 0.61], "lr=1e-1": [1.0, 1.0, 1.0]}
    s = stats.select_then_report(select, report)
    assert s.key == "lr=1e-2" and s.select_score == pytest.approx(0.81)
    assert s.report == stats.bootstrap_ci([0.60, 0.62, 0.61])
    assert list(s.select_scores) == list(select)
    calls = []
    s2 = stats.select_then_report(select, lambda k: calls.append(k) or report[k])
    assert calls == ["lr=1e-2"] and s2 == s
    assert stats.select_then_report(select, report, higher_is_better=False).key == "lr=1e-1"


def test_selection_ties_go_to_the_first_option():
    s = stats.select_then_report({"b": 0.5, "a": 0.5}, {"a": [1.0, 0.0], "b": [0.0, 1.0]})
    assert s.key == "b"


# bad inputs: every public function names what was wrong


def _mcnemar_bad():
    stats.mcnemar([0, 1, 2], [0, 1, 1])


BAD = {
    "empty": (lambda: stats.bootstrap_ci([]), "at least 2"),
    "nan": (lambda: stats.bootstrap_ci([1.0, np.nan, 2.0]), "NaN or inf"),
    "inf": (lambda: stats.over_seeds([1.0, np.inf]), "NaN or inf"),
    "2-D": (lambda: stats.bootstrap_ci(np.ones((3, 2))), "1-D"),
    "strings": (lambda: stats.bootstrap_ci(["a", "b"]), "must be numbers"),
    "confidence": (lambda: stats.bootstrap_ci([1.0, 2.0], confidence=95), "confidence"),
    "resamples": (lambda: stats.bootstrap_ci([1.0, 2.0], n_resamples=10), "n_resamples"),
    "method": (lambda: stats.bootstrap_ci([1.0, 2.0], method="studentized"), "method"),
    "array statistic": (lambda: stats.bootstrap_ci([1.0, 2.0], statistic=np.sort), "one number"),
    "paired lengths": (lambda: stats.paired_difference([1, 0, 1], [1, 0]), "same examples"),
    "paired confidence": (lambda: stats.paired_difference([1, 0], [1, 0], confidence=0.0), "confidence"),
    "mcnemar not 0/1": (_mcnemar_bad, "0/1"),
    "mcnemar lengths": (lambda: stats.mcnemar([0, 1, 1], [0, 1]), "same examples"),
    "one seed": (lambda: stats.over_seeds([0.8]), "at least 2"),
    "seeds confidence": (lambda: stats.over_seeds([0.8, 0.9], confidence=1.0), "confidence"),
    "binomial too many": (lambda: stats.binomial_ci(11, 10), "successes <= trials"),
    "binomial proportion": (lambda: stats.binomial_ci(0.8, 10), "must be an int"),
    "binomial method": (lambda: stats.binomial_ci(8, 10, method="wald"), "method"),
    "spearman lengths": (lambda: stats.spearman([1, 2, 3], [1, 2]), "same items"),
    "spearman short": (lambda: stats.spearman([1], [1]), "at least 2"),
    "split n": (lambda: stats.split_indices(1), "n must be"),
    "split fraction": (lambda: stats.split_indices(10, fraction=1.0), "fraction"),
    "split labels": (lambda: stats.split_indices(10, labels=[0, 1]), "labels"),
    "split empty": (lambda: stats.split_indices(3, fraction=0.1), "empty"),
    "select empty": (lambda: stats.select_then_report({}, {}), "non-empty"),
    "select report type": (lambda: stats.select_then_report({"a": 1.0}, [1.0, 2.0]), "scores_report"),
    "select missing key": (lambda: stats.select_then_report({"a": 1.0}, {"b": [1.0, 2.0]}), "chosen option"),
    "select nan": (lambda: stats.select_then_report({"a": [np.nan]}, {"a": [1.0, 2.0]}), "NaN"),
    "estimate bounds": (lambda: Estimate(0.5, 0.6, 0.4, n=1, method="m"), "lo <= hi"),
    "verdict names": (lambda: Estimate(0.5, 0.4, 0.6, n=1, method="m").verdict(("A",)), "pair"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_a_clear_value_error(case):
    fn, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        fn()


def test_rank_correlations_is_the_one_convention_for_spearman():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    expected = [float(st.spearmanr(x, y).statistic) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(stats.rank_correlations(a, b), expected)
    assert [stats.spearman(x, y) for x, y in zip(a, b, strict=True)] == pytest.approx(expected)
    assert stats.rank_correlations([[1, 1, 1]], [[2, 2, 2]])[0] == 1.0 and stats.spearman([1, 1], [3, 3]) == 1.0
    assert np.isnan(stats.rank_correlations([[1, 2, 3]], [[2, 2, 2]])[0])
    masked = stats.rank_correlations([[1, 2, 3, 9]], [[1, 2, 3, -9]], mask=[[True, True, True, False]])
    assert masked[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="share one"):
        stats.rank_correlations(a, b[:, :3])
    with pytest.raises(ValueError, match="at least 2"):
        stats.rank_correlations([[1, 2]], [[1, 2]], mask=[[True, False]])
    with pytest.raises(ValueError, match="NaN"):
        stats.rank_correlations([[1.0, np.nan]], [[1.0, 2.0]])


def test_cluster_bootstrap_resamples_whole_groups():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, 400).astype(float)
    # one example per group: the cluster bootstrap is the ordinary bootstrap (up to resampling noise)
    single = stats.bootstrap_ci(x, groups=np.arange(400))
    plain = stats.bootstrap_ci(x)
    assert single.value == plain.value and abs(single.lo - plain.lo) < 0.015 and abs(single.hi - plain.hi) < 0.015
    # 40 sentences of 10 identical words: 40 independent observations, not 400
    sentences = np.repeat(np.arange(40), 10)
    y = np.repeat(rng.integers(0, 2, 40).astype(float), 10)
    clustered, naive = stats.bootstrap_ci(y, groups=sentences), stats.bootstrap_ci(y)
    assert clustered.hi - clustered.lo > 2.5 * (naive.hi - naive.lo)
    assert "40 groups" in clustered.method
    # paired: the same, on differences; a constant shift inside every group is still a sure difference
    d = stats.paired_difference(y + 0.1, y, groups=sentences)
    assert d.value == pytest.approx(0.1) and d.lo == pytest.approx(0.1) and d.hi == pytest.approx(0.1) and d.p < 0.01
    wide = stats.paired_difference(y, np.zeros_like(y), groups=sentences)
    assert wide.hi - wide.lo == pytest.approx(clustered.hi - clustered.lo)
    with pytest.raises(ValueError, match="mean only"):
        stats.bootstrap_ci(y, groups=sentences, statistic=np.median)
    with pytest.raises(ValueError, match="one group id per example"):
        stats.bootstrap_ci(y, groups=sentences[:10])
    with pytest.raises(ValueError, match="at least 2 groups"):
        stats.paired_difference(y, y, groups=np.zeros(400))


def test_label_permutation_p_finds_structure_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 6)  # 4 groups of 6 items
    points = rng.normal(size=(24, 2))
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)

    def within_over_across(lab):
        same = (lab[:, None] == lab[None]) & ~np.eye(lab.size, dtype=bool)
        return dist[same].mean() / dist[lab[:, None] != lab[None]].mean()

    _, p_noise = stats.label_permutation_p(within_over_across, labels, n_resamples=999)
    assert p_noise > 0.05  # no group structure in random points
    points[:, 0] += 3 * labels  # now groups sit apart
    dist = np.linalg.norm(points[:, None] - points[None], axis=-1)
    value, p = stats.label_permutation_p(within_over_across, labels, n_resamples=999)
    assert value < 1 and p <= 0.002
    _, p_greater = stats.label_permutation_p(within_over_across, labels, alternative="greater", n_resamples=999)
    assert p_greater > 0.99
    with pytest.raises(ValueError, match="2 groups"):
        stats.label_permutation_p(within_over_across, np.zeros(5))
    with pytest.raises(ValueError, match="alternative"):
        stats.label_permutation_p(within_over_across, labels, alternative="smaller")
    with pytest.raises(ValueError, match="not finite"):
        stats.label_permutation_p(lambda lab: float("nan"), labels)
