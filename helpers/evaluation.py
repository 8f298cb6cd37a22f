"""Faithfulness of token attributions: ERASER comprehensiveness, sufficiency and AOPC.

A rationale is the top-k % of tokens by attribution. *Comprehensiveness* asks how much the
predicted class's probability drops when the rationale is deleted, ``p(x)_c - p(x \\ r)_c``;
*sufficiency* asks how much it drops when only the rationale is kept, ``p(x)_c - p(r)_c``
(DeYoung et al. 2020, "ERASER: A Benchmark to Evaluate Rationalized NLP Models", §4.2). A faithful
attribution has high comprehensiveness and low sufficiency. AOPC averages either over the bins
k ∈ {1, 5, 10, 20, 50} % (Samek et al. 2016).

Tokens are *deleted*, not masked: the kept word pieces are packed to the left and the sequence is
re-padded, as ERASER does with its text. Special tokens (``[CLS]``, ``[SEP]``) are never candidates.

The functions take any ``predict(input_ids, attention_mask) -> probabilities [batch, class]``, so
they apply to every text classifier in the book. Introduced in
nbs/07_attribution_faithfulness.ipynb; reused by nbs/14_evaluating_interpretability.ipynb.

Chapter 14 adds what it takes to put every explanation of the book on one scoreboard, whatever it
explains (tokens, pixels, concepts, prototypes): :func:`rank_correlation` (masked Spearman, for
stability and sanity checks), :func:`ground_truth_auc` (plausibility against features known by
construction), :func:`stability` (re-runs under new seeds and small input perturbations),
:func:`normalise_columns` (every metric on [0, 1], 1 = best, optionally above a noise floor) and
:func:`axis_scores` (metrics averaged into axes), :func:`sanity_distance` (Adebayo et al.'s
model-randomisation test as ``1 - abs(rho)``) and :func:`randomised_copy` (every layer of a model
re-drawn, the last step of the cascade).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

BINS = (0.01, 0.05, 0.10, 0.20, 0.50)
"""ERASER's rationale sizes, as fractions of the candidate tokens."""

Predict = Callable[[Tensor, Tensor], Tensor]


def _check(input_ids: Tensor, attention_mask: Tensor, attributions: Tensor, candidates: Tensor | None) -> Tensor:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, pos], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if attributions.shape != input_ids.shape:
        raise ValueError(
            f"attributions must have the shape of input_ids {tuple(input_ids.shape)} (one score per token), "
            f"got {tuple(attributions.shape)}; sum or take the norm over the embedding axis first"
        )
    mask = attention_mask.bool()
    if candidates is None:
        candidates = mask
    elif candidates.shape != input_ids.shape:
        raise ValueError(f"candidates must match input_ids {tuple(input_ids.shape)}, got {tuple(candidates.shape)}")
    candidates = candidates.bool() & mask
    empty = (candidates.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"sequences {empty} have no candidate tokens (empty mask); drop them before scoring")
    if not torch.isfinite(attributions[candidates]).all():
        raise ValueError("attributions contain NaN or inf on candidate tokens")
    return candidates


def _check_fraction(fraction: float) -> None:
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r} (use 0.2 for 20 %)")


def _check_target(target, batch: int) -> Tensor:
    target = torch.as_tensor(target, dtype=torch.long)
    if target.ndim == 0:
        target = target.expand(batch)
    if target.shape != (batch,):
        raise ValueError(
            f"target must be an int or a [batch] = ({batch},) tensor of classes, got {tuple(target.shape)}"
        )
    return target


def rationale_mask(attributions: Tensor, candidates: Tensor, fraction: float) -> Tensor:
    """The top ``ceil(fraction * n)`` candidate tokens of each sequence by attribution (ties: first position).

    Args:
        attributions: [batch, pos] token scores (higher = more important for the explained class).
        candidates: [batch, pos] bool, the tokens that may be chosen (``n`` per sequence).
        fraction: in (0, 1]; at least one token is always chosen.

    Returns:
        [batch, pos] bool.

    >>> rationale_mask(torch.tensor([[0.1, 0.9, 0.5, 0.2]]), torch.tensor([[True] * 4]), 0.5)
    tensor([[False,  True,  True, False]])
    """
    _check_fraction(fraction)
    scores = attributions.double().masked_fill(~candidates, -math.inf)
    order = scores.argsort(dim=1, descending=True, stable=True)  # [batch, pos]
    k = torch.ceil(candidates.sum(1) * fraction).long().clamp_min(1)  # [batch]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    return (ranks < k[:, None]) & candidates


def delete_tokens(input_ids: Tensor, attention_mask: Tensor, drop: Tensor, *, pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Delete the ``drop`` positions of each sequence and pack the rest to the left (re-padding).

    >>> drop = torch.tensor([[0, 1, 0, 1, 0]]).bool()
    >>> ids, am = delete_tokens(torch.tensor([[101, 7, 8, 9, 102]]), torch.ones(1, 5).long(), drop)
    >>> ids.tolist(), am.tolist()
    ([[101, 8, 102]], [[1, 1, 1]])
    """
    keep = attention_mask.bool() & ~drop
    lengths = keep.sum(1)
    width = max(int(lengths.max()), 1)
    ids = torch.full((input_ids.shape[0], width), pad_id, dtype=input_ids.dtype)
    mask = torch.zeros((input_ids.shape[0], width), dtype=attention_mask.dtype)
    for b in range(input_ids.shape[0]):
        ids[b, : lengths[b]] = input_ids[b][keep[b]]
        mask[b, : lengths[b]] = 1
    return ids, mask


def _probability(predict: Predict, input_ids: Tensor, attention_mask: Tensor, target: Tensor) -> Tensor:
    with torch.no_grad():
        probs = predict(input_ids, attention_mask)  # [batch, class]
    if probs.ndim != 2 or probs.shape[0] != input_ids.shape[0]:
        raise ValueError(f"predict must return probabilities [batch, class], got shape {tuple(probs.shape)}")
    return probs.gather(1, target[:, None].to(probs.device)).squeeze(1).double().cpu()


def _erase(
    kind: str,
    predict: Predict,
    input_ids: Tensor,
    attention_mask: Tensor,
    attributions: Tensor,
    *,
    target,
    fraction: float,
    candidates: Tensor | None,
    pad_id: int,
    full: Tensor | None = None,
) -> Tensor:
    candidates = _check(input_ids, attention_mask, attributions, candidates)
    _check_fraction(fraction)
    target = _check_target(target, input_ids.shape[0])
    if full is None:
        full = _probability(predict, input_ids, attention_mask, target)
    rationale = rationale_mask(attributions, candidates, fraction)
    # comprehensiveness deletes the rationale; sufficiency deletes every other candidate
    drop = rationale if kind == "comprehensiveness" else candidates & ~rationale
    ids, mask = delete_tokens(input_ids, attention_mask, drop, pad_id=pad_id)
    return full - _probability(predict, ids, mask, target)


def comprehensiveness(
    predict: Predict,
    input_ids: Tensor,
    attention_mask: Tensor,
    attributions: Tensor,
    *,
    target,
    fraction: float,
    candidates: Tensor | None = None,
    pad_id: int = 0,
) -> Tensor:
    """ERASER comprehensiveness ``p(x)_c - p(x \\ r)_c`` with ``r`` the top ``fraction`` of tokens.

    Args:
        predict: ``(input_ids, attention_mask) -> [batch, class]`` probabilities.
        input_ids, attention_mask: [batch, pos].
        attributions: [batch, pos] token scores for class ``target`` (one score per token).
        target: the explained class, an int or a [batch] tensor (usually the predicted class).
        fraction: rationale size in (0, 1], as a fraction of the candidate tokens (at least one token).
        candidates: [batch, pos] bool, tokens that may be deleted (default: every real token; pass
            ``attention_mask & ~special_tokens_mask`` to keep ``[CLS]``/``[SEP]``).
        pad_id: id used to re-pad after deletion.

    Returns:
        [batch] float64; higher = more faithful.

    >>> w = torch.tensor([0.0, 1.0, 2.0, 3.0])            # bag of words: p(class 1) = sigmoid(sum w)
    >>> predict = lambda ids, am: torch.stack([1 - (w[ids] * am).sum(1).sigmoid(), (w[ids] * am).sum(1).sigmoid()], 1)
    >>> ids = torch.tensor([[3, 1, 2]]); am = torch.ones(1, 3)
    >>> c = comprehensiveness(predict, ids, am, w[ids], target=1, fraction=0.3)   # deletes token 3
    >>> round(float(c), 4) == round(float(torch.tensor(6.0).sigmoid() - torch.tensor(3.0).sigmoid()), 4)
    True

    DeYoung et al. (2020), §4.2.
    """
    return _erase(
        "comprehensiveness",
        predict,
        input_ids,
        attention_mask,
        attributions,
        target=target,
        fraction=fraction,
        candidates=candidates,
        pad_id=pad_id,
    )


def sufficiency(
    predict: Predict,
    input_ids: Tensor,
    attention_mask: Tensor,
    attributions: Tensor,
    *,
    target,
    fraction: float,
    candidates: Tensor | None = None,
    pad_id: int = 0,
) -> Tensor:
    """ERASER sufficiency ``p(x)_c - p(r)_c``: keep only the rationale (and non-candidate tokens).

    Arguments as in :func:`comprehensiveness`. Returns [batch] float64; lower = more faithful
    (negative when the rationale alone is more convincing than the whole text).

    DeYoung et al. (2020), §4.2.
    """
    return _erase(
        "sufficiency",
        predict,
        input_ids,
        attention_mask,
        attributions,
        target=target,
        fraction=fraction,
        candidates=candidates,
        pad_id=pad_id,
    )


def aopc(
    predict: Predict,
    input_ids: Tensor,
    attention_mask: Tensor,
    attributions: Tensor,
    *,
    target,
    bins: Sequence[float] = BINS,
    candidates: Tensor | None = None,
    pad_id: int = 0,
) -> dict[str, Tensor]:
    """Comprehensiveness and sufficiency at every bin, and their area over the perturbation curve.

    Args:
        as in :func:`comprehensiveness`; ``bins`` are rationale fractions in (0, 1] (ERASER's
        1/5/10/20/50 % by default).

    Returns:
        a dict of float64 tensors: ``"comprehensiveness"`` and ``"sufficiency"`` ``[bin, batch]``,
        ``"aopc_comprehensiveness"`` and ``"aopc_sufficiency"`` ``[batch]``; the AOPC is the
        mean over the bins (ERASER's aggregate with the ``k = 0`` term left out, since it is 0 for
        comprehensiveness).

    DeYoung et al. (2020), §4.2; Samek et al. (2016) for AOPC.
    """
    bins = list(bins)
    if not bins:
        raise ValueError("bins must be a non-empty sequence of fractions in (0, 1]")
    for fraction in bins:
        _check_fraction(fraction)
    candidates = _check(input_ids, attention_mask, attributions, candidates)
    target = _check_target(target, input_ids.shape[0])
    full = _probability(predict, input_ids, attention_mask, target)
    out = {}
    for kind in ("comprehensiveness", "sufficiency"):
        out[kind] = torch.stack(
            [
                _erase(
                    kind,
                    predict,
                    input_ids,
                    attention_mask,
                    attributions,
                    target=target,
                    fraction=f,
                    candidates=candidates,
                    pad_id=pad_id,
                    full=full,
                )
                for f in bins
            ]
        )
        out[f"aopc_{kind}"] = out[kind].mean(0)
    return out


def rank_agreement(a: Tensor, b: Tensor, candidates: Tensor, *, method: str = "spearman") -> Tensor:
    """Rank correlation between two attributions, sequence by sequence, over the candidate tokens.

    Args:
        a, b: [batch, pos] token scores.
        candidates: [batch, pos] bool, the tokens compared (at least 2 per sequence).
        method: ``"spearman"`` or ``"kendall"`` (tau-b, scipy).

    Returns:
        [batch] float64 correlations (NaN where one attribution is constant).

    >>> rank_agreement(torch.tensor([[1.0, 2, 3]]), torch.tensor([[3.0, 2, 1]]), torch.ones(1, 3).bool())
    tensor([-1.], dtype=torch.float64)
    """
    from scipy.stats import kendalltau, spearmanr

    if a.shape != b.shape or a.shape != candidates.shape or a.ndim != 2:
        raise ValueError(
            f"a, b and candidates must share one [batch, pos] shape, got {a.shape}, {b.shape}, {candidates.shape}"
        )
    if method not in ("spearman", "kendall"):
        raise ValueError(f"method must be 'spearman' or 'kendall', got {method!r}")
    if bool((candidates.sum(1) < 2).any()):
        raise ValueError("every sequence needs at least 2 candidate tokens to rank")
    fn = spearmanr if method == "spearman" else kendalltau
    out = []
    for x, y, m in zip(a.double(), b.double(), candidates.bool(), strict=True):
        x, y = x[m].numpy(), y[m].numpy()
        out.append(float("nan") if x.std() == 0 or y.std() == 0 else float(fn(x, y)[0]))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# One framework for every explanation of the book (chapter 14): plausibility, stability, scoreboard
# ---------------------------------------------------------------------------------------------


def _flat_pair(a: Tensor, b: Tensor, mask: Tensor | None, names: tuple[str, str]) -> tuple[Tensor, Tensor, Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape or a.ndim < 2:
        raise ValueError(
            f"{names[0]} and {names[1]} must share one [batch, ...] shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if mask is None:
        mask = torch.ones(a.shape, dtype=torch.bool)
    mask = torch.as_tensor(mask).bool()
    if mask.shape != a.shape:
        raise ValueError(f"mask must have the shape of {names[0]} {tuple(a.shape)}, got {tuple(mask.shape)}")
    return a.reshape(len(a), -1).double().cpu(), b.reshape(len(b), -1).double().cpu(), mask.reshape(len(a), -1).cpu()


def rank_correlation(a: Tensor, b: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Spearman correlation between two explanations of the same inputs, item by item: the statistics
    layer's :func:`helpers.stats.rank_correlations` (its convention: 1 where both are constant on the
    mask, NaN where exactly one is), as a ``[batch]`` float64 tensor.

    >>> rank_correlation(torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([[10.0, 20, 40, 30]])).round(decimals=6).tolist()
    [0.8]
    """
    from helpers import stats

    a, b, mask = _flat_pair(a, b, mask, ("a", "b"))
    return torch.from_numpy(stats.rank_correlations(a.numpy(), b.numpy(), mask=mask.numpy()))


def ground_truth_auc(scores: Tensor, truth: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Plausibility: how well an explanation's scores single out the features known to matter (ROC AUC).

    For each item, the probability that a ground-truth feature (``truth``) scores higher than a
    feature that is not one, ties counting one half (the Mann-Whitney statistic). 1: every known
    feature is ranked first; 0.5: no better than chance. The ground truth is what the book knows
    by construction: a garment's pixels, a novel's character names, a class's parts in the concept
    bank.

    Args:
        scores: ``[batch, ...]`` explanation scores (higher = more important).
        truth: ``[batch, ...]`` bool, the known-relevant features.
        mask: ``[batch, ...]`` bool, the features that count (default: all).

    Returns:
        ``[batch]`` float64; NaN for items with no positive or no negative feature on the mask.

    >>> ground_truth_auc(torch.tensor([[0.9, 0.1, 0.5, 0.5]]), torch.tensor([[True, False, True, False]])).tolist()
    [0.875]
    """
    from scipy.stats import rankdata

    scores, truth, mask = _flat_pair(scores, torch.as_tensor(truth).double(), mask, ("scores", "truth"))
    if not torch.isfinite(scores[mask]).all():
        raise ValueError("scores contain NaN or inf on the mask")
    out = []
    for s, t, m in zip(scores, truth.bool(), mask, strict=True):
        s, t = s[m].numpy(), t[m].numpy()
        n_pos, n_neg = int(t.sum()), int((~t).sum())
        if n_pos == 0 or n_neg == 0:
            out.append(float("nan"))
            continue
        ranks = rankdata(s)  # average ranks: ties count one half
        out.append((float(ranks[t].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return torch.tensor(out, dtype=torch.float64)


def stability(
    explain: Callable[[Tensor, int], Tensor],
    inputs: Tensor,
    *,
    perturb: Callable[[Tensor, torch.Generator], Tensor] | None = None,
    repeats: int = 2,
    seed: int = 0,
    mask: Tensor | None = None,
    reference: Tensor | None = None,
    unchanged: Callable[[object, object], Tensor] | None = None,
) -> Tensor:
    """Stability: rank agreement between an explanation and re-runs on perturbed inputs with new seeds.

    Run ``explain(inputs, seed)`` once (or take ``reference``, that run when it was already made),
    then ``repeats`` times on ``perturb(inputs, generator)`` with seed ``seed + r``, and average the
    Spearman correlation (:func:`rank_correlation`) with the first run. With ``perturb=None`` only the
    method's own randomness is tested (GradientSHAP's baselines and noise, a random ranking): a
    deterministic method then scores exactly 1.

    Args:
        explain: ``(inputs, seed) -> [batch, ...]`` scores.
        inputs: whatever ``explain`` takes, batch first (images, token ids, concept scores).
        perturb: ``(inputs, torch.Generator) -> inputs`` of the same shape, e.g. Gaussian noise, or
            ``None`` to re-run on the same inputs.
        repeats: number of re-runs (>= 1).
        seed: seed of the first run; re-run ``r`` uses ``seed + r`` (and a generator seeded with it).
        mask: ``[batch, ...]`` bool, the entries compared (default: all).
        reference: ``explain(inputs, seed)`` if the caller already has it (saves one run).
        unchanged: optional ``(inputs, moved) -> [batch]`` bool, true where the model's prediction
            did not change under the perturbation; a re-run where it changed is left out of that
            item's mean (an explanation of another decision is allowed to differ), and an item whose
            prediction changed in every re-run gets NaN; among the kept re-runs an undefined
            correlation (exactly one of the two runs constant) counts as 0. Default ``None``: every
            re-run counts, and an undefined correlation makes the item NaN.

    Returns:
        ``[batch]`` float64, mean Spearman correlation over the re-runs.

    >>> double = lambda x, seed: 2 * x                       # deterministic, and robust to tiny noise
    >>> noise = lambda x, g: x + 0.01 * torch.randn(x.shape, generator=g)
    >>> stability(double, torch.tensor([[1.0, 3, 2]]), perturb=noise).round(decimals=6).tolist()
    [1.0]
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    reference = torch.as_tensor(explain(inputs, seed) if reference is None else reference)
    total = torch.zeros(len(reference), dtype=torch.float64)
    count = torch.zeros(len(reference), dtype=torch.float64)
    for r in range(1, repeats + 1):
        generator = torch.Generator().manual_seed(seed + r)
        moved = inputs if perturb is None else perturb(inputs, generator)
        if isinstance(moved, Tensor) and isinstance(inputs, Tensor) and moved.shape != inputs.shape:
            raise ValueError(f"perturb must keep the shape of inputs {tuple(inputs.shape)}, got {tuple(moved.shape)}")
        rho = rank_correlation(reference, torch.as_tensor(explain(moved, seed + r)), mask=mask)
        if unchanged is None:
            total += rho
            count += 1
            continue
        keep = torch.as_tensor(unchanged(inputs, moved)).bool().reshape(-1).cpu()
        if keep.shape != rho.shape:
            raise ValueError(f"unchanged must return [batch] = ({len(rho)},) bools, got shape {tuple(keep.shape)}")
        total += torch.where(keep, rho.nan_to_num(0.0), 0.0)
        count += keep.double()
    if unchanged is None:
        return total / repeats
    return torch.where(count > 0, total / count.clamp_min(1), torch.nan)


def normalise_columns(table, *, higher_is_better: dict[str, bool], floor: dict[str, float] | None = None):
    """Put every metric of a scoreboard on [0, 1], 1 = the best method, by min-max over the methods.

    Each column is rescaled over the rows where it is defined (NaN stays NaN: a metric that does not
    apply to a method is missing, not bad). A column where lower is better (deletion AUC,
    sufficiency, seconds) is flipped. A column with one distinct value gets 1 everywhere it is
    defined (no method is worse).

    With ``floor``, a column's spread is not stretched beyond its noise: the best method still gets
    1, the others ``1 - gap / max(high - low, floor)`` with ``gap`` their distance to the best, so a
    column whose whole spread lies inside its noise floor keeps every method close to 1 instead of
    blowing noise up to [0, 1]. Where ``high - low >= floor`` nothing changes.

    Args:
        table: pandas ``DataFrame``, methods x metrics, numbers.
        higher_is_better: ``{column: bool}`` for every column of ``table``.
        floor: optional ``{column: noise floor >= 0}`` in the column's own units (e.g. the typical
            width of a cell's bootstrap interval); columns not named get no floor. Default ``None``:
            plain min-max.

    Returns:
        a ``DataFrame`` of the same shape in [0, 1].

    >>> import pandas as pd
    >>> t = pd.DataFrame({"auc": [0.2, 0.4, 0.6], "seconds": [1.0, 3.0, 2.0]}, index=["a", "b", "c"])
    >>> normalise_columns(t, higher_is_better={"auc": False, "seconds": False}).round(2).to_dict("list")
    {'auc': [1.0, 0.5, 0.0], 'seconds': [1.0, 0.0, 0.5]}
    """
    import pandas as pd

    if not isinstance(table, pd.DataFrame) or table.empty:
        raise ValueError("table must be a non-empty pandas DataFrame (methods x metrics)")
    missing = [c for c in table.columns if c not in higher_is_better]
    if missing:
        raise ValueError(f"say for every column whether higher is better; missing {missing} in higher_is_better")
    extra = [c for c in higher_is_better if c not in table.columns]
    if extra:
        raise ValueError(f"higher_is_better names columns that are not in the table: {extra}")
    try:
        values = table.astype(float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"every column must be numeric: {err}") from None
    if np.isinf(values.to_numpy()).any():
        raise ValueError("table contains inf; use NaN for a metric that does not apply")
    floor = dict(floor or {})
    unknown = [c for c in floor if c not in table.columns]
    if unknown:
        raise ValueError(f"floor names columns that are not in the table: {unknown}")
    bad = {c: f for c, f in floor.items() if not (isinstance(f, (int, float)) and math.isfinite(f) and f >= 0)}
    if bad:
        raise ValueError(f"floor values must be finite numbers >= 0, got {bad}")
    out = values.copy()
    for column in values.columns:
        v = values[column]
        low, high = v.min(), v.max()
        if high == low:
            out[column] = v.where(v.isna(), 1.0)
            continue
        span = max(high - low, float(floor.get(column, 0.0)))
        if span == high - low:  # the floor does not bind: plain min-max, computed as it always was
            scaled = (v - low) / (high - low)
            out[column] = scaled if higher_is_better[column] else 1.0 - scaled
            continue
        gap = (high - v) if higher_is_better[column] else (v - low)
        out[column] = 1.0 - gap / span
    return out


def axis_scores(normalised, axes: dict[str, Sequence[str]]):
    """Average normalised metric columns into one score per axis (faithfulness, stability, ...).

    Args:
        normalised: output of :func:`normalise_columns` (methods x metrics, in [0, 1]).
        axes: ``{axis: [columns]}``; a method's axis score is the mean of the columns it has
            (NaN when it has none).

    Returns:
        a ``DataFrame``, methods x axes.

    >>> import pandas as pd
    >>> n = pd.DataFrame({"del": [1.0, 0.0], "ins": [0.5, float("nan")], "t": [0.0, 1.0]}, index=["a", "b"])
    >>> axis_scores(n, {"faithfulness": ["del", "ins"], "cost": ["t"]}).to_dict("list")
    {'faithfulness': [0.75, 0.0], 'cost': [0.0, 1.0]}
    """
    import pandas as pd

    if not axes:
        raise ValueError("axes must map at least one axis name to a list of columns")
    unknown = sorted({c for cols in axes.values() for c in cols} - set(normalised.columns))
    if unknown:
        raise ValueError(f"axes name columns that are not in the table: {unknown}")
    empty = [name for name, cols in axes.items() if len(cols) == 0]
    if empty:
        raise ValueError(f"axes {empty} have no columns")
    return pd.DataFrame({name: normalised[list(cols)].mean(axis=1, skipna=True) for name, cols in axes.items()})


def sanity_distance(reference: Tensor, randomised: Tensor, *, mask: Tensor | None = None,
                    absolute: bool = True) -> Tensor:  # fmt: skip
    """Model-randomisation sanity check: how far an explanation moved when the model was destroyed.

    ``1 - abs(rho)``, with ``rho`` the Spearman correlation (:func:`rank_correlation`) between the
    explanation of the trained model and that of its randomised copy, on the absolute values of the
    scores by default. Quantus's MPRT compares the same two explanations with Spearman's rho after
    taking their absolute value (``abs=True``); Adebayo et al. report the rank correlation with and
    without it. Taking ``abs(rho)`` as well means that a map whose signs flip, or whose ranking
    reverses, counts as *unchanged* (distance 0), not as more than fully changed (``1 - rho`` would
    reach 2). 0: the explanation ignores the weights; 1: no rank relation left.

    Args:
        reference: ``[batch, ...]`` scores from the trained model.
        randomised: ``[batch, ...]`` scores of the same inputs from the randomised model (the last
            step of a cascading randomisation: every layer re-drawn).
        mask: ``[batch, ...]`` bool, the entries compared (default: all).
        absolute: rank ``abs(scores)`` (default, Quantus's ``abs=True``); False ranks the signed scores.

    Returns:
        ``[batch]`` float64 in [0, 1]; NaN where exactly one of the two is constant on the mask.

    >>> a = torch.tensor([[1.0, -2, 3, -4]])
    >>> b = torch.tensor([[4.0, 3, 2, 1]])
    >>> [sanity_distance(a, c, absolute=k).round(decimals=6).tolist() for c, k in [(-a, True), (b, False), (b, True)]]
    [[0.0], [0.6], [0.0]]
    """
    if not isinstance(absolute, bool):
        raise ValueError(f"absolute must be True or False, got {absolute!r}")
    a, b = torch.as_tensor(reference), torch.as_tensor(randomised)
    if absolute:
        a, b = a.abs(), b.abs()
    return (1.0 - rank_correlation(a, b, mask=mask).abs()).clamp(0.0, 1.0)


def randomised_copy(model: torch.nn.Module, *, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` with *every* parameter tensor re-drawn: the last step of a full cascade.

    Each parameter is replaced by i.i.d. Gaussian draws with that tensor's own mean and standard
    deviation (so LayerNorm gains stay near 1 and weight scales are kept, but everything the model
    learned is gone); a constant tensor stays constant. Buffers (running statistics, position ids)
    are kept. The original is untouched; the copy is in eval mode.

    Args:
        model: any ``nn.Module`` (a text encoder with its head, a recommender, a ViT).
        seed: seeds the draws.

    Returns:
        the randomised copy.

    >>> _ = torch.manual_seed(0)
    >>> lin = torch.nn.Linear(50, 40)
    >>> r = randomised_copy(lin, seed=1)
    >>> bool((r.weight != lin.weight).all()), abs(float(r.weight.detach().std() / lin.weight.detach().std()) - 1) < 0.05
    (True, True)
    """
    import copy

    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    out = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            if p.numel() < 2:
                continue
            mean, std = float(p.double().mean()), float(p.double().std())
            draw = torch.randn(p.shape, generator=generator, dtype=torch.float64) * std + mean
            p.copy_(draw.to(p.dtype))
    return out
