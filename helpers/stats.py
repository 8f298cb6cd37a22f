"""The book's one statistics layer: intervals, paired tests, seeds and held-out selection.

Every chapter says "A beats B" the same way, through an :class:`Estimate` (a value, its interval,
how it was made) whose :meth:`Estimate.verdict` gives the words the prose glues. How intervals are
made, once for the whole book:

- over examples: a percentile bootstrap (Efron & Tibshirani 1993), 95 %, 2,000 resamples, seed 0;
  two systems on the same examples are compared with a *paired* bootstrap (:func:`paired_difference`,
  Dror et al. 2018), 0/1 correctness also with McNemar's exact test (:func:`mcnemar`);
- over seeds: a Student-t interval on one number per seed (:func:`over_seeds`);
- a single proportion: a Wilson interval (:func:`binomial_ci`).

Hyper-parameters and "the best of many options" are chosen on one split and reported on another
(:func:`split_indices`, :func:`select_then_report`). Rank correlations use :func:`spearman` and, item
by item, :func:`rank_correlations`.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import stats as _st

Statistic = Callable[..., float]


@dataclass(frozen=True)
class Estimate:
    """A number with its interval and how both were made; the unit of every comparison in the book.

    ``f"{e:.2f}"`` gives ``"0.59 [0.55, 0.63]"``; the spec applies to all three numbers, so
    ``f"{e:.1%}"`` gives ``"59.0% [55.0%, 63.0%]"``; an empty spec means ``.3g``. ``p`` is set for
    differences (paired tests) only.

    >>> e = Estimate(0.59, 0.55, 0.63, n=400, method="bootstrap 95 % over 400 examples")
    >>> f"{e:.2f}", f"{e:.1%}", f"{e}"
    ('0.59 [0.55, 0.63]', '59.0% [55.0%, 63.0%]', '0.59 [0.55, 0.63]')
    """

    value: float
    lo: float
    hi: float
    n: int
    method: str
    p: float | None = None

    def __post_init__(self) -> None:
        for name in ("value", "lo", "hi"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "n", int(self.n))
        if self.p is not None:
            object.__setattr__(self, "p", float(self.p))
        if self.lo > self.hi:
            raise ValueError(f"Estimate needs lo <= hi, got [{self.lo}, {self.hi}]; swap the bounds")

    def __format__(self, spec: str) -> str:
        spec = spec or ".3g"
        return f"{format(self.value, spec)} [{format(self.lo, spec)}, {format(self.hi, spec)}]"

    def __str__(self) -> str:
        return format(self, "")

    def excludes(self, x: float = 0.0) -> bool:
        """True when ``x`` lies outside the interval (for a difference: the sign is settled)."""
        return not self.lo <= x <= self.hi

    def overlaps(self, other: Estimate) -> bool:
        """True when the two intervals share at least one point."""
        return self.lo <= other.hi and other.lo <= self.hi

    def verdict(self, names: tuple[str, str] = ("A", "B"), *, higher_is_better: bool = True) -> str:
        """The words for a *difference* estimate ``A − B``: "A beats B", "B beats A" or a tie.

        Args:
            names: how the prose calls A and B.
            higher_is_better: False for losses, errors, perplexities (then a negative ``A − B`` wins).

        Returns:
            ``"A beats B"``, ``"B beats A"`` or ``"a tie"`` (the interval contains 0).

        >>> Estimate(0.04, 0.01, 0.07, n=400, method="paired").verdict(("SINr", "bag of words"))
        'SINr beats bag of words'
        """
        if len(names) != 2:
            raise ValueError(f"names must be a pair (A, B), got {names!r}")
        if not self.excludes(0.0):
            return "a tie"
        a_wins = (self.lo > 0) == higher_is_better
        winner, loser = names if a_wins else names[::-1]
        return f"{winner} beats {loser}"

    def as_dict(self) -> dict:
        """Plain fields for JSON or ``glue``, with ``text`` = the default format."""
        return {**asdict(self), "text": format(self, "")}

    def scaled(self, k: float) -> Estimate:
        """The same estimate times ``k`` (e.g. 100 for points); a negative ``k`` swaps the bounds."""
        lo, hi = sorted((self.lo * k, self.hi * k))
        return replace(self, value=self.value * k, lo=lo, hi=hi)


def _as_1d(values, name: str, *, min_size: int = 1) -> np.ndarray:
    try:
        x = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numbers, got {type(values).__name__}: {err}") from None
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one number per example), got shape {x.shape}; flatten or average first")
    if x.size < min_size:
        raise ValueError(f"{name} needs at least {min_size} values, got {x.size}")
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x))[:5].tolist()
        raise ValueError(f"{name} contains NaN or inf (first at positions {bad}); drop or fix those examples")
    return x


def _check_options(confidence: float, n_resamples: int | None = None) -> None:
    if not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r} (use 0.95 for 95 %)")
    if n_resamples is not None and (not isinstance(n_resamples, (int, np.integer)) or n_resamples < 100):
        raise ValueError(f"n_resamples must be an int >= 100, got {n_resamples!r} (the book uses 2,000)")


def _pct(confidence: float) -> str:
    return f"{confidence * 100:g} %"


def _apply(statistic: Statistic, *xs: np.ndarray) -> float:
    if not callable(statistic):
        raise ValueError(f"statistic must be a function of a 1-D array, got {statistic!r}")
    out = [np.asarray(statistic(x)) for x in xs]
    if any(o.ndim != 0 for o in out):
        raise ValueError("statistic must return one number per array (e.g. np.mean), not an array")
    return float(out[0]) if len(out) == 1 else float(out[0] - out[1])


def _takes_axis(statistic: Statistic) -> bool:
    try:
        return "axis" in inspect.signature(statistic).parameters
    except (TypeError, ValueError):
        return False


def _batch(n: int) -> int:
    return max(1, 4_000_000 // n)  # bounds memory at ~32 MB of float64 per resampled array


def _group_totals(x: np.ndarray, groups, statistic: Statistic) -> tuple[np.ndarray, np.ndarray]:
    """Per-group sums and counts of ``x`` for the cluster bootstrap (only the mean is supported)."""
    if statistic is not np.mean:
        raise ValueError("groups= resamples whole groups and supports the mean only (statistic=np.mean)")
    g = np.asarray(groups)
    if g.shape != x.shape:
        raise ValueError(f"groups must give one group id per example, shape {x.shape}, got {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    if inverse.max() < 1:
        raise ValueError("groups= needs at least 2 groups to resample")
    return np.bincount(inverse, weights=x), np.bincount(inverse).astype(float)


def _cluster_means(sums: np.ndarray, counts: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """``[n_resamples]`` means over resampled groups (groups drawn with replacement, items pooled)."""
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, 500):
        idx = rng.integers(0, sums.size, size=(min(500, n_resamples - start), sums.size))
        out[start : start + len(idx)] = sums[idx].sum(1) / counts[idx].sum(1)
    return out


def bootstrap_ci(values, *, statistic: Statistic = np.mean, confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0, method: str = "percentile", groups=None) -> Estimate:
    """A bootstrap interval for ``statistic(values)`` over examples (accuracy, mean score, ...).

    Args:
        values: ``[example]`` per-example numbers, e.g. 0/1 correctness (then the mean is accuracy).
        statistic: ``f(x) -> float``; vectorised when it accepts ``axis`` (np.mean, np.median do).
        confidence: coverage of the interval, in (0, 1).
        n_resamples: bootstrap resamples (>= 100).
        seed: seed of the resampling; the same seed gives the same interval.
        method: ``"percentile"`` (the book's default), ``"BCa"`` or ``"basic"``.
        groups: ``[example]`` group ids (e.g. the sentence of each word): resample whole groups, not
            examples (a cluster bootstrap, percentile, mean only), when examples of a group are not
            independent. The interval is then usually wider.

    Returns:
        An :class:`Estimate`; all-equal values give a zero-width interval.

    >>> f"{bootstrap_ci([1, 0, 1, 1, 0, 1, 1, 1, 0, 1]):.2f}"
    '0.70 [0.40, 1.00]'
    >>> f"{bootstrap_ci([1, 1, 1, 0, 0, 0, 1, 0], groups=[0, 0, 0, 1, 1, 1, 2, 3]):.2f}"
    '0.50 [0.00, 1.00]'

    Efron & Tibshirani 1993, *An Introduction to the Bootstrap*, ch. 13.
    """
    x = _as_1d(values, "values", min_size=2)
    _check_options(confidence, n_resamples)
    if str(method).lower() not in ("percentile", "bca", "basic"):
        raise ValueError(f"method must be 'percentile', 'BCa' or 'basic', got {method!r}")
    value = _apply(statistic, x)
    label = {"percentile": "bootstrap", "bca": "BCa bootstrap", "basic": "basic bootstrap"}[method.lower()]
    desc = f"{label} {_pct(confidence)} over {x.size} examples"
    if groups is not None:
        if str(method).lower() != "percentile":
            raise ValueError("groups= supports the percentile method only")
        sums, counts = _group_totals(x, groups, statistic)
        dist = _cluster_means(sums, counts, n_resamples, seed)
        lo, hi = np.quantile(dist, [(1 - confidence) / 2, (1 + confidence) / 2])
        return Estimate(value, lo, hi, n=x.size,
                        method=f"cluster bootstrap {_pct(confidence)} over {sums.size} groups of {x.size} examples")
    if np.all(x == x[0]):  # every resample is the sample itself; scipy would warn (BCa) or waste time
        return Estimate(value, value, value, n=x.size, method=desc)
    vec = _takes_axis(statistic)
    res = _st.bootstrap((x,), statistic, vectorized=vec, n_resamples=n_resamples, batch=_batch(x.size),
                        confidence_level=confidence, method=method.lower(), rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Estimate(value, ci.low, ci.high, n=x.size, method=desc)


def paired_difference(a, b, *, statistic: Statistic = np.mean, confidence: float = 0.95, n_resamples: int = 2000,
                      seed: int = 0, groups=None) -> Estimate:
    """``statistic(a) − statistic(b)`` on the same examples, with a paired bootstrap interval and p-value.

    The examples are resampled jointly (one index set for both systems), so what the two systems
    share cancels out. The two-sided p-value is ``2 (k + 1) / (B + 1)`` clipped to 1, where ``k`` of the
    ``B`` resampled differences lie on the other side of 0 from the observed one (0 counts as the
    other side) and the ``+ 1`` keeps p above 0; an observed difference of exactly 0 gives p = 1.

    Args:
        a, b: ``[example]`` per-example scores of systems A and B on the same examples, same order.
        statistic, confidence, n_resamples, seed, groups: as in :func:`bootstrap_ci` (with ``groups``, whole
            groups are resampled jointly for both systems).

    Returns:
        An :class:`Estimate` of ``A − B`` with ``p`` set; ``.verdict((name_a, name_b))`` words it.

    >>> d = paired_difference([1, 1, 1, 0, 1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 1, 0, 0, 1, 0, 1])
    >>> f"{d:.1f}", d.p < 0.05, d.verdict(("A", "B"))
    ('0.4 [0.1, 0.7]', True, 'A beats B')

    Dror et al. 2018, "The Hitchhiker's Guide to Testing Statistical Significance in NLP";
    Efron & Tibshirani 1993, §16.4.
    """
    x, y = _as_1d(a, "a", min_size=2), _as_1d(b, "b", min_size=2)
    if x.size != y.size:
        raise ValueError(f"a and b must score the same examples, got {x.size} and {y.size}; align them first")
    _check_options(confidence, n_resamples)
    value = _apply(statistic, x, y)
    if groups is not None:
        sums, counts = _group_totals(x - y, groups, statistic)
        dist = _cluster_means(sums, counts, n_resamples, seed)
        lo, hi = np.quantile(dist, [(1 - confidence) / 2, (1 + confidence) / 2])
        desc = f"paired cluster bootstrap {_pct(confidence)} over {sums.size} groups of {x.size} examples"
        return Estimate(value, lo, hi, n=x.size, method=desc, p=_bootstrap_p(value, dist))
    if _takes_axis(statistic):
        def diff(u, v, axis=-1):
            return statistic(u, axis=axis) - statistic(v, axis=axis)
    else:
        def diff(u, v):
            return statistic(u) - statistic(v)
    res = _st.bootstrap((x, y), diff, paired=True, vectorized=_takes_axis(statistic), n_resamples=n_resamples,
                        batch=_batch(x.size), confidence_level=confidence, method="percentile",
                        rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    desc = f"paired bootstrap {_pct(confidence)} over {x.size} examples"
    return Estimate(value, ci.low, ci.high, n=x.size, method=desc,
                    p=_bootstrap_p(value, np.asarray(res.bootstrap_distribution)))


def _bootstrap_p(value: float, dist: np.ndarray) -> float:
    """Two-sided bootstrap p of an observed difference against its resampled distribution (see above)."""
    if value == 0:
        return 1.0
    k = int(np.sum(dist <= 0) if value > 0 else np.sum(dist >= 0))
    return min(1.0, 2 * (k + 1) / (dist.size + 1))


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on paired 0/1 correctness, with the accuracy difference A − B."""

    b01: int
    """examples A gets wrong and B gets right."""
    b10: int
    """examples A gets right and B gets wrong."""
    p: float
    """exact two-sided p-value (binomial test of b10 against b01 + b10 trials at 1/2)."""
    difference: Estimate
    """accuracy(A) − accuracy(B) from :func:`paired_difference` (its own ``p`` is the bootstrap one)."""


def mcnemar(correct_a, correct_b, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> McNemar:
    """McNemar's exact test: do two classifiers differ on the examples where exactly one is right?

    Args:
        correct_a, correct_b: ``[example]`` 0/1 (or bool) correctness of A and B on the same examples.
        confidence, n_resamples, seed: for the bootstrap interval of the accuracy difference.

    Returns:
        A :class:`McNemar` with ``b01``, ``b10``, the exact ``p`` (1 when no example is discordant)
        and ``difference`` (an :class:`Estimate` of accuracy A − accuracy B).

    >>> m = mcnemar([1, 1, 1, 1, 1, 1, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1, 0, 1, 1])
    >>> m.b01, m.b10, round(m.p, 4)
    (1, 6, 0.125)

    McNemar 1947, "Note on the sampling error of the difference between correlated proportions".
    """
    x, y = _as_1d(correct_a, "correct_a", min_size=2), _as_1d(correct_b, "correct_b", min_size=2)
    for name, v in (("correct_a", x), ("correct_b", y)):
        if not np.isin(v, (0.0, 1.0)).all():
            raise ValueError(f"{name} must be 0/1 correctness, got values {np.unique(v)[:5].tolist()}")
    difference = paired_difference(x, y, confidence=confidence, n_resamples=n_resamples, seed=seed)
    b01, b10 = int(np.sum((x == 0) & (y == 1))), int(np.sum((x == 1) & (y == 0)))
    p = 1.0 if b01 + b10 == 0 else float(_st.binomtest(b10, b01 + b10, 0.5).pvalue)
    return McNemar(b01=b01, b10=b10, p=p, difference=difference)


def over_seeds(values, *, confidence: float = 0.95) -> Estimate:
    """The mean of one number per seed, with a Student-t interval (spread over seeds).

    Args:
        values: ``[seed]`` one result per training seed; at least 2, and use 3 or more: with 2 seeds
            the t quantile is 12.7 and the interval is rarely informative.
        confidence: coverage of the interval, in (0, 1).

    Returns:
        An :class:`Estimate` with ``method`` = "k seeds, t interval".

    >>> f"{over_seeds([1.0, 2.0, 3.0]):.2f}"
    '2.00 [-0.48, 4.48]'

    Student 1908; see Efron & Tibshirani 1993, §12.2 for the t interval.
    """
    x = _as_1d(values, "values", min_size=2)
    _check_options(confidence)
    k, mean = x.size, float(x.mean())
    half = float(_st.t.ppf((1 + confidence) / 2, k - 1)) * float(x.std(ddof=1)) / math.sqrt(k)
    return Estimate(mean, mean - half, mean + half, n=k, method=f"{k} seeds, t interval")


def label_permutation_p(statistic: Callable[[np.ndarray], float], labels, *, alternative: str = "less",
                        n_resamples: int = 9999, seed: int = 0) -> tuple[float, float]:
    """Is ``statistic(labels)`` extreme among random relabellings? A permutation test of group structure.

    Shuffles which item carries which label (group sizes kept) with ``scipy.stats.permutation_test``
    and compares the statistic with its permutation distribution, e.g. "heads of a layer are closer to
    each other than to other heads": ``statistic`` = mean distance within a layer / across layers.

    Args:
        statistic: ``f(labels) -> float`` for a ``[item]`` array of labels.
        labels: ``[item]`` the observed group of each item (at least 2 groups).
        alternative: ``"less"`` (observed smaller than chance), ``"greater"`` or ``"two-sided"``.
        n_resamples: random permutations (>= 99).
        seed: seed of the permutations.

    Returns:
        ``(value, p)``: the observed statistic and the permutation p-value.

    >>> x = np.array([0.0, 0.1, 0.2, 0.3, 5.0, 5.1, 5.2, 5.3])
    >>> spread = lambda lab: float(np.mean([x[lab == g].std() for g in np.unique(lab)]))
    >>> value, p = label_permutation_p(spread, np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    >>> round(value, 3), round(p, 3)  # exact: 2 of the 70 splits into two groups of 4 are this tight
    (0.112, 0.029)

    Good 2005, *Permutation, Parametric, and Bootstrap Tests of Hypotheses*, ch. 3.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size < 3:
        raise ValueError(f"labels must be a 1-d array of at least 3 items, got shape {labels.shape}")
    groups = np.unique(labels)
    if groups.size < 2:
        raise ValueError("labels must hold at least 2 groups")
    if alternative not in ("less", "greater", "two-sided"):
        raise ValueError(f"alternative must be 'less', 'greater' or 'two-sided', got {alternative!r}")
    if not isinstance(n_resamples, int) or n_resamples < 99:
        raise ValueError(f"n_resamples must be an int >= 99, got {n_resamples!r}")
    value = float(statistic(labels))
    if not math.isfinite(value):
        raise ValueError(f"statistic(labels) is not finite: {value}")
    members = [np.flatnonzero(labels == g) for g in groups]  # the items of each group, as samples

    def relabelled(*samples) -> float:
        new = np.empty_like(labels)
        for g, items in zip(groups, samples, strict=True):
            new[np.asarray(items, dtype=int)] = g
        return float(statistic(new))

    result = _st.permutation_test(members, relabelled, permutation_type="independent", vectorized=False,
                                  n_resamples=n_resamples, alternative=alternative, random_state=seed)  # fmt: skip
    return value, float(result.pvalue)


def binomial_ci(successes: int, trials: int, *, confidence: float = 0.95, method: str = "wilson") -> Estimate:
    """A proportion ``successes / trials`` with a Wilson (default) or exact Clopper–Pearson interval.

    Args:
        successes: number of successes, 0 <= successes <= trials.
        trials: number of trials, >= 1.
        confidence: coverage of the interval, in (0, 1).
        method: ``"wilson"`` or ``"exact"`` (Clopper–Pearson).

    Returns:
        An :class:`Estimate` of the proportion.

    >>> f"{binomial_ci(8, 10):.3f}"
    '0.800 [0.490, 0.943]'

    Wilson 1927, "Probable inference, the law of succession, and statistical inference".
    """
    for name, v in (("successes", successes), ("trials", trials)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an int, got {v!r}; pass counts, not proportions")
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need trials >= 1 and 0 <= successes <= trials, got {successes} / {trials}")
    _check_options(confidence)
    if method not in ("wilson", "exact"):
        raise ValueError(f"method must be 'wilson' or 'exact', got {method!r}")
    ci = _st.binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method=method)
    label = "Wilson" if method == "wilson" else "Clopper-Pearson"
    value = successes / trials
    return Estimate(value, ci.low, ci.high, n=int(trials), method=f"{label} {_pct(confidence)} over {trials} trials")


def rank_correlations(a, b, *, mask=None) -> np.ndarray:
    """Spearman rank correlation item by item (ties averaged): the book's one convention for rank correlations.

    Works for scores of any shape per item: token scores ``[batch, pos]``, pixel maps ``[batch, H, W]``,
    concept importances ``[batch, concept]``; only the entries where ``mask`` is true are ranked.

    Args:
        a, b: ``[batch, ...]`` finite scores of the same items (arrays or tensors of one shape).
        mask: ``[batch, ...]`` bool (default: everything); at least 2 entries per item.

    Returns:
        ``[batch]`` float64 in [-1, 1]; **1 where both are constant** on the mask (nothing to reorder:
        the orderings agree), **NaN where exactly one is** (the correlation is undefined; the caller
        decides), without a scipy warning.

    >>> rank_correlations([[1, 2, 3, 4], [1, 1, 1, 1], [1, 2, 3, 4]], [[10, 20, 40, 30], [5, 5, 5, 5], [2, 2, 2, 2]])
    array([0.8, 1. , nan])

    Spearman 1904, "The proof and measurement of association between two things".
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"a and b must share one [batch, ...] shape, got {x.shape} and {y.shape}")
    m = np.ones(x.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != x.shape:
        raise ValueError(f"mask must have the shape of the scores {x.shape}, got {m.shape}")
    x, y, m = x.reshape(len(x), -1), y.reshape(len(y), -1), m.reshape(len(m), -1)
    if (m.sum(1) < 2).any():
        raise ValueError("every item needs at least 2 entries on the mask to rank")
    if not (np.isfinite(x[m]).all() and np.isfinite(y[m]).all()):
        raise ValueError("scores contain NaN or infinite values")
    out = np.empty(len(x))
    for i, (xi, yi, mi) in enumerate(zip(x, y, m, strict=True)):
        rx, ry = _st.rankdata(xi[mi]), _st.rankdata(yi[mi])
        rx, ry = rx - rx.mean(), ry - ry.mean()
        nx, ny = math.sqrt(float(rx @ rx)), math.sqrt(float(ry @ ry))
        out[i] = (1.0 if nx == ny else math.nan) if nx == 0 or ny == 0 else float(rx @ ry) / (nx * ny)
    return np.clip(out, -1.0, 1.0)  # rounding can put a perfect correlation a hair outside [-1, 1]


def spearman(a, b) -> float:
    """Spearman rank correlation of two scorings of the same items: :func:`rank_correlations` for one item.

    Args:
        a, b: ``[item]`` finite scores of the same items, at least 2.

    Returns:
        rho in [-1, 1]; 1 when both inputs are constant, ``nan`` when exactly one is (the correlation is
        undefined; the caller decides whether that counts as agreement), without a scipy warning.

    >>> round(spearman([1, 2, 3, 4], [10, 20, 40, 30]), 6), spearman([1, 2, 3], [5, 5, 5])
    (0.8, nan)
    """
    x, y = _as_1d(a, "a", min_size=2), _as_1d(b, "b", min_size=2)
    if x.size != y.size:
        raise ValueError(f"a and b must score the same items, got {x.size} and {y.size}")
    return float(rank_correlations(x[None], y[None])[0])


def split_indices(n: int, *, fraction: float = 0.5, seed: int = 0, labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into a selection part and a report part, disjoint and deterministic.

    Args:
        n: number of examples, >= 2.
        fraction: share of the examples used for selection (rounded), in (0, 1).
        seed: the same seed gives the same split.
        labels: optional ``[n]`` classes; then each class is split in the same proportion (stratified).

    Returns:
        ``(select_idx, report_idx)``: sorted int64 arrays that together cover ``range(n)`` once.

    >>> s, r = split_indices(10, fraction=0.3)
    >>> len(s), len(r), sorted(s.tolist() + r.tolist()) == list(range(10))
    (3, 7, True)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an int >= 2 (number of examples), got {n!r}")
    if not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction!r} (0.5 = half for selection)")
    rng = np.random.default_rng(seed)
    if labels is None:
        groups = [np.arange(n)]
    else:
        y = np.asarray(labels)
        if y.shape != (n,):
            raise ValueError(f"labels must be [n] = ({n},), one class per example, got shape {y.shape}")
        groups = [np.flatnonzero(y == c) for c in np.unique(y)]
    select = []
    for g in groups:
        perm = rng.permutation(g)
        select.append(perm[: int(round(fraction * g.size))])
    select_idx = np.sort(np.concatenate(select)).astype(np.int64)
    report_idx = np.setdiff1d(np.arange(n), select_idx).astype(np.int64)
    if select_idx.size == 0 or report_idx.size == 0:
        raise ValueError(f"fraction={fraction} of n={n} leaves a split empty; use more examples or a fraction near 0.5")
    return select_idx, report_idx


@dataclass(frozen=True)
class Selection:
    """An option chosen on the selection split and reported on the report split."""

    key: Hashable
    """the chosen option."""
    select_score: float
    """its statistic on the selection split."""
    report: Estimate
    """its bootstrap estimate on the report split: the number the prose quotes."""
    select_scores: dict
    """every option's statistic on the selection split, in the input's order."""


def select_then_report(scores_select: Mapping, scores_report: Mapping | Callable, *, higher_is_better: bool = True,
                       statistic: Statistic = np.mean, confidence: float = 0.95, n_resamples: int = 2000,
                       seed: int = 0, groups=None) -> Selection:
    """Choose the best option on one split, then report it, and only it, on another.

    Args:
        scores_select: ``{option: [example] scores on the selection split}`` (a number also works).
        scores_report: ``{option: [example] scores on the report split}``, or ``f(option) -> scores``
            (called once, for the chosen option only, so costly evaluations run once).
        higher_is_better: False for losses; ties go to the first option in ``scores_select``.
        statistic, confidence, n_resamples, seed, groups: as in :func:`bootstrap_ci`, for the report
            (``groups``: one group id per report example).

    Returns:
        A :class:`Selection`; the report split never influences which option is chosen.

    >>> s = select_then_report({"a": [0.6, 0.7], "b": [0.8, 0.9]}, {"a": [0.9, 1.0], "b": [0.7, 0.8]})
    >>> s.key, f"{s.report:.2f}"
    ('b', '0.75 [0.70, 0.80]')
    """
    if not isinstance(scores_select, Mapping) or not scores_select:
        raise ValueError("scores_select must be a non-empty mapping {option: scores on the selection split}")
    if not (isinstance(scores_report, Mapping) or callable(scores_report)):
        raise ValueError("scores_report must be a mapping {option: scores} or a function option -> scores")
    _check_options(confidence, n_resamples)
    select_scores = {k: _apply(statistic, _as_1d(np.atleast_1d(v), f"scores_select[{k!r}]"))
                     for k, v in scores_select.items()}
    sign = 1 if higher_is_better else -1
    key = max(select_scores, key=lambda k: sign * select_scores[k])  # max keeps the first of equal options
    if isinstance(scores_report, Mapping):
        if key not in scores_report:
            raise ValueError(f"scores_report has no scores for the chosen option {key!r}")
        report_values = scores_report[key]
    else:
        report_values = scores_report(key)
    report = bootstrap_ci(_as_1d(report_values, f"scores_report[{key!r}]"), statistic=statistic,
                          confidence=confidence, n_resamples=n_resamples, seed=seed, groups=groups)
    return Selection(key=key, select_score=select_scores[key], report=report, select_scores=select_scores)
