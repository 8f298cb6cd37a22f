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

Chapter 14's harness lives here too, so the notebook imports it: the explanations it scores
(:func:`image_explanation` with Chapter 8's settings, :func:`concept_contributions`,
:func:`text_study` for the token methods), the perturbations and prediction checks of
:func:`stability` (:func:`gaussian_perturbation`, :func:`token_masking`, :func:`item_swap`,
:func:`prediction_kept`), the models it compares against (:func:`concept_students`,
:func:`redrawn_prototypes`, :func:`history_predictor`), the text ground truth
(:func:`tokenizer_words`, :func:`exclusive_words`, :func:`word_piece_truth`), the tables
(:func:`setting_table`, :func:`normalise_columns_batched`, :func:`paired_comparison`,
:func:`tied_with_best`) and word intrusion (:func:`intrusion_oddness`, :func:`unit_rows`,
:func:`word_rows`).
"""

from __future__ import annotations

import math
import time
import warnings
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


# ---------------------------------------------------------------------------------------------
# Chapter 14's harness: the explanations it scores, the perturbations, the per-setting tables
# ---------------------------------------------------------------------------------------------

IMAGE_METHODS = ("saliency", "integrated gradients", "GradientSHAP", "occlusion", "RISE", "last-layer attention",
                 "rollout", "prototype map", "random")
"""The pixel explanations Chapter 14 scores: Chapter 8's six methods, RISE, Chapter 9's prototype map, a random map."""

RISE_SETTINGS = {"n_masks": 1000, "grid": 7, "p": 0.5}
"""RISE in Chapter 14: 1,000 masks from a 7 x 7 grid (4-pixel cells, as occlusion's window), half of it kept."""

CONCEPT_METHODS = ("Choquet contributions", "linear contributions", "random concepts")
"""The concept explanations Chapter 14 scores (:func:`concept_contributions`)."""


def _check_target_batch(target, batch: int, name: str = "target") -> Tensor:
    target = torch.as_tensor(target)
    if target.shape != (batch,):
        raise ValueError(f"{name} must be a [batch] = ({batch},) tensor of classes, got shape {tuple(target.shape)}")
    return target


def _check_image_batch(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 1 or len(images) == 0:
        raise ValueError(f"{name} must be a non-empty [batch, 1, height, width] tensor of grey images, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def image_explanation(model: torch.nn.Module, method: str, images: Tensor, target: Tensor, *, black: float,
                      shap_baselines: Tensor | None = None, seed: int = 0) -> Tensor:
    """``[batch, 28, 28]`` explanation of class ``target`` by ``method`` (higher = more important).

    Chapter 8's settings: saliency (absolute gradient), integrated gradients from a black image
    (``black``, 64 steps), GradientSHAP (``shap_baselines``, 16 samples, noise 0.1:
    :func:`helpers.vision.gradient_shap`, a function of ``seed`` alone), occlusion (4 x 4 window, stride 2, black), the
    CLS row of the last layer's attention and attention rollout (upsampled from the 4 x 4 grid);
    RISE (:func:`helpers.vision.rise_saliency` with :data:`RISE_SETTINGS`, pixels dimmed to black, masks
    drawn with ``seed``);
    Chapter 9's prototype map (the class's last-layer weights times the prototypes' similarity
    maps; ``model`` must then be a :class:`helpers.prototypes.ProtoViT`); and a random map drawn
    with ``seed``.

    Args:
        model: the book's ViT (or a ProtoViT for ``"prototype map"``), images -> ``[batch, class]`` logits.
        method: one of :data:`IMAGE_METHODS`.
        images: ``[batch, 1, 28, 28]`` normalised Fashion-MNIST images.
        target: ``[batch]`` the explained class of each image.
        black: a black pixel in the normalised units of ``images`` (baseline of IG and occlusion).
        shap_baselines: ``[n, 1, 28, 28]`` images GradientSHAP draws its baselines from (needed for it only).
        seed: seed of GradientSHAP's and the random map's draws.

    Returns:
        ``[batch, 28, 28]`` scores, detached.
    """
    from helpers import prototypes, vision

    if method not in IMAGE_METHODS:
        raise ValueError(f"method must be one of {IMAGE_METHODS}, got {method!r}")
    _check_image_batch(images, "images")
    target = _check_target_batch(target, len(images))
    if not isinstance(black, (int, float)) or not math.isfinite(black):
        raise ValueError(f"black must be a finite number (a black pixel, normalised), got {black!r}")
    if method == "saliency":
        from captum.attr import Saliency

        return Saliency(model).attribute(images, target=target, abs=True)[:, 0].detach()
    if method == "integrated gradients":
        from captum.attr import IntegratedGradients

        return IntegratedGradients(model).attribute(images, baselines=black, target=target, n_steps=64,
                                                    internal_batch_size=2048)[:, 0].detach()
    if method == "GradientSHAP":
        if shap_baselines is None:
            raise ValueError("GradientSHAP needs shap_baselines, [n, 1, 28, 28] images to draw baselines from")
        _check_image_batch(shap_baselines, "shap_baselines")
        return vision.gradient_shap(model, images, target, shap_baselines, seed=seed)
    if method == "occlusion":
        from captum.attr import Occlusion

        with torch.no_grad():
            return Occlusion(model).attribute(images, target=target, sliding_window_shapes=(1, 4, 4),
                                              strides=(1, 2, 2), baselines=black, perturbations_per_eval=64)[:, 0]
    if method == "RISE":
        return vision.rise_saliency(model, images, target, fill=float(black), seed=seed, **RISE_SETTINGS)
    if method in ("last-layer attention", "rollout"):
        _, a = vision.vit_attentions(model, images)  # [layer, batch, head, 17, 17]
        patch = (a[-1, :, :, 0, 1:].mean(1).reshape(-1, vision.GRID, vision.GRID) if method == "last-layer attention"
                 else vision.cls_rollout(a))
        return vision.upsample(patch, vision.IMAGE_SIZE)
    if method == "prototype map":
        if not isinstance(model, prototypes.ProtoViT):
            raise ValueError(f"the prototype map explains a prototypes.ProtoViT, got {type(model).__name__}")
        with torch.no_grad():
            maps = prototypes.similarity_maps(model.head, model.patch_tokens(images))  # [batch, P, 4, 4]
            w = model.head.last_layer.weight[target]  # [batch, P]
            return vision.upsample((w[:, :, None, None] * maps).sum(1), vision.IMAGE_SIZE)
    generator = torch.Generator().manual_seed(seed)  # "random"
    return torch.rand(len(images), vision.IMAGE_SIZE, vision.IMAGE_SIZE, generator=generator)


def softmax_predictor(model: Callable[[Tensor], Tensor], *, flatten: bool = False) -> Callable[[Tensor], Tensor]:
    """``inputs -> [batch, class]`` probabilities, the softmax of ``model``'s logits (for perturbation curves).

    With ``flatten``, the inputs are reshaped to ``[batch, -1]`` first (concept scores that a
    perturbation curve handles as ``[batch, 1, 1, concepts]`` images).

    >>> softmax_predictor(lambda x: x, flatten=True)(torch.zeros(1, 1, 1, 4)).tolist()
    [[0.25, 0.25, 0.25, 0.25]]
    """
    if not callable(model):
        raise ValueError(f"model must be callable (inputs -> logits), got {type(model).__name__}")
    if flatten:
        return lambda inputs: model(inputs.reshape(len(inputs), -1)).softmax(-1)
    return lambda inputs: model(inputs).softmax(-1)


def gaussian_perturbation(std: float) -> Callable[[Tensor, torch.Generator], Tensor]:
    """``(x, generator) -> x + std * noise``, i.i.d. standard Gaussian noise of ``x``'s shape: a
    ``perturb`` for :func:`stability`.

    >>> gaussian_perturbation(0.0)(torch.ones(2, 3), torch.Generator().manual_seed(0)).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    if not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    return lambda x, generator: x + std * torch.randn(x.shape, generator=generator)


def prediction_kept(predict: Callable[[Tensor], Tensor], target: Tensor) -> Callable[[object, Tensor], Tensor]:
    """``(inputs, moved) -> [batch]`` bool, true where ``predict(moved)``'s top class is still ``target``:
    the ``unchanged`` of :func:`stability` (a perturbation must not change the decision).

    Args:
        predict: ``inputs -> [batch, class]`` scores (logits or probabilities; only the argmax counts).
        target: ``[batch]`` the explained class of each input.

    >>> kept = prediction_kept(lambda x: x, torch.tensor([0, 1]))
    >>> kept(None, torch.tensor([[2.0, 1.0], [3.0, 0.0]])).tolist()
    [True, False]
    """
    if not callable(predict):
        raise ValueError(f"predict must be callable (inputs -> [batch, class] scores), got {type(predict).__name__}")
    target = torch.as_tensor(target)
    if target.ndim != 1:
        raise ValueError(f"target must be a [batch] tensor of classes, got shape {tuple(target.shape)}")

    def unchanged(inputs, moved):
        with torch.no_grad():
            return predict(moved).argmax(1) == target

    return unchanged


def setting_table(per_item: dict[str, dict[str, np.ndarray]], seconds_of: dict[str, float], setting: str):
    """One setting's table: the mean of every per-item metric (NaN items left out) and the cost.

    Args:
        per_item: ``{"setting: method": {metric: [item] values}}`` for every setting.
        seconds_of: ``{"setting: method": seconds per input}``.
        setting: the prefix of the rows wanted (``"image"``, ``"text"``, ...).

    Returns:
        a ``DataFrame``, methods x (``"setting"``, metrics..., ``"seconds per input"``), object dtype.

    >>> t = setting_table({"a: x": {"m": np.array([1.0, np.nan, 3.0])}, "b: y": {"m": np.array([0.0])}},
    ...                   {"a: x": 0.5, "b: y": 1.0}, "a")
    >>> t.to_dict("index")
    {'x': {'setting': 'a', 'm': 2.0, 'seconds per input': 0.5}}
    """
    import pandas as pd

    rows = [r for r in per_item if r.startswith(f"{setting}: ")]
    if not rows:
        raise ValueError(f"no row of per_item belongs to setting {setting!r} (rows are named 'setting: method')")
    missing = [r for r in rows if r not in seconds_of]
    if missing:
        raise ValueError(f"seconds_of has no cost for {missing}")
    table = {r.split(": ", 1)[1]: {"setting": setting, **{c: float(np.nanmean(v)) for c, v in per_item[r].items()},
                                   "seconds per input": seconds_of[r]}
             for r in rows}
    return pd.DataFrame(table).T


def tokenizer_words(tokenizer, text: str) -> list[str]:
    """The words a Hugging Face fast tokenizer sees in ``text`` (normalised, e.g. lower-cased, and
    split at spaces and punctuation), in order: the units of ``encoding.word_ids``."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    normalised = tokenizer.backend_tokenizer.normalizer.normalize_str(text)
    return [w for w, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(normalised)]


def exclusive_words(word_lists: Sequence[Sequence[str]], labels: Sequence[int], n_classes: int, *,
                    min_count: int) -> tuple[list[dict[str, int]], list[set[str]]]:
    """Words that only one class uses: a ground truth for text plausibility, known by construction.

    Args:
        word_lists: the words of each training text.
        labels: the class of each text, in ``[0, n_classes)``.
        n_classes: number of classes.
        min_count: a word must occur at least this often in its class.

    Returns:
        ``counts`` (per class, ``{word: occurrences}``) and ``exclusive`` (per class, the alphabetic
        words seen ``min_count`` times or more in that class and never in another).

    >>> counts, excl = exclusive_words([["emma", "the"], ["anne", "the"], ["emma"]], [0, 1, 0], 2, min_count=2)
    >>> excl
    [{'emma'}, set()]
    """
    labels = [int(y) for y in labels]
    if len(word_lists) != len(labels) or not labels:
        raise ValueError(f"need one label per text and at least one text, got {len(word_lists)} texts "
                         f"and {len(labels)} labels")
    if any(not 0 <= y < n_classes for y in labels):
        raise ValueError(f"labels must lie in [0, {n_classes}), got {sorted(set(labels))}")
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a positive int, got {min_count!r}")
    counts: list[dict[str, int]] = [{} for _ in range(n_classes)]
    for words, label in zip(word_lists, labels, strict=True):
        for w in words:
            counts[label][w] = counts[label].get(w, 0) + 1
    exclusive = [{w for w, n in counts[k].items() if n >= min_count and w.isalpha()
                  and all(w not in counts[j] for j in range(n_classes) if j != k)} for k in range(n_classes)]
    return counts, exclusive


def word_piece_truth(word_ids: Sequence[Sequence[int | None]], word_lists: Sequence[Sequence[str]],
                     allowed: Sequence[set[str]], candidates: Tensor) -> Tensor:
    """``[passage, pos]`` bool: the candidate word pieces whose word is in that passage's ``allowed`` set.

    Args:
        word_ids: per passage, the word index of each position (``encoding.word_ids(b)``; None off words).
        word_lists: per passage, its words (:func:`tokenizer_words`).
        allowed: per passage, the words that count as ground truth (e.g. those exclusive to the
            predicted class).
        candidates: ``[passage, pos]`` bool, the positions that may be marked.

    >>> word_piece_truth([[None, 0, 1, 1, None]], [["emma", "walked"]], [{"walked"}],
    ...                  torch.tensor([[False, True, True, True, False]])).tolist()
    [[False, False, True, True, False]]
    """
    candidates = torch.as_tensor(candidates).bool()
    if candidates.ndim != 2 or not len(word_ids) == len(word_lists) == len(allowed) == len(candidates):
        raise ValueError(f"need [passage, pos] candidates and one word_ids, word list and allowed set per passage, "
                         f"got {tuple(candidates.shape)}, {len(word_ids)}, {len(word_lists)}, {len(allowed)}")
    truth = torch.zeros_like(candidates)
    for b, (ids, words) in enumerate(zip(word_ids, word_lists, strict=True)):
        if len(ids) != candidates.shape[1]:
            raise ValueError(f"passage {b} has {len(ids)} word ids for {candidates.shape[1]} positions")
        for pos, w in enumerate(ids):
            if w is not None and candidates[b, pos] and words[w] in allowed[b]:
                truth[b, pos] = True
    return truth


def token_masking(candidates: Tensor, mask_id: int) -> Callable[[Tensor, torch.Generator], Tensor]:
    """``(input_ids, generator) -> input_ids`` with one random candidate word piece per passage
    replaced by ``mask_id``: a ``perturb`` for :func:`stability` on text.

    Args:
        candidates: ``[passage, pos]`` bool, the positions that may be masked (at least one per passage).
        mask_id: the tokenizer's ``[MASK]`` id.

    >>> perturb = token_masking(torch.tensor([[False, True, False]]), 103)
    >>> perturb(torch.tensor([[101, 7, 102]]), torch.Generator().manual_seed(0)).tolist()
    [[101, 103, 102]]
    """
    candidates = torch.as_tensor(candidates).bool()
    if candidates.ndim != 2:
        raise ValueError(f"candidates must be [passage, pos], got shape {tuple(candidates.shape)}")
    empty = (candidates.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"passages {empty} have no candidate position to mask")

    def mask_one(input_ids: Tensor, generator: torch.Generator) -> Tensor:
        if input_ids.shape != candidates.shape:
            raise ValueError(f"input_ids must have the candidates' shape {tuple(candidates.shape)}, "
                             f"got {tuple(input_ids.shape)}")
        out = input_ids.clone()
        for b in range(len(out)):
            pos = candidates[b].nonzero()[:, 0]
            out[b, pos[torch.randint(len(pos), (1,), generator=generator)]] = mask_id
        return out

    return mask_one


def text_study(classifier, ids: Tensor, am: Tensor, content: Tensor, names: Tensor, target: Tensor, *,
               methods: Sequence[str], pad_id: int, mask_id: int, ig_steps: int,
               path=None) -> dict[str, np.ndarray]:
    """Every text metric of Chapter 14, passage by passage, for every method (its expensive part).

    For each method of :func:`helpers.attribution.token_attributions`: the seconds per passage,
    AOPC comprehensiveness and sufficiency (ERASER deletion, :func:`aopc`), plausibility against
    ``names`` (:func:`ground_truth_auc`), stability under one masked word piece (:func:`stability`,
    re-runs whose prediction changed left out), and the sanity distance to the explanation of the
    classifier with its head re-drawn (``"sanity head"``) and with every weight re-drawn; for
    integrated gradients also its convergence delta relative to the gap ``p(x) - p(baseline)``.

    Args:
        classifier: a :class:`helpers.attribution.PooledClassifier`.
        ids, am: ``[passage, pos]`` token ids and attention mask.
        content: ``[passage, pos]`` bool, the candidate tokens (no special tokens).
        names: ``[passage, pos]`` bool, the ground-truth tokens.
        target: ``[passage]`` the explained class (the prediction).
        methods: the methods, e.g. :data:`helpers.attribution.METHODS`.
        pad_id: baseline and deletion token; mask_id: the ``[MASK]`` token; ig_steps: IG's steps.
        path: if given, the arrays are also written there as an ``.npz`` file.

    Returns:
        ``{"method|metric": [passage] float64}`` plus ``"method|seconds"`` ``[1]`` and ``"ig delta / gap"``.
    """
    from helpers import attribution, common

    if ids.ndim != 2 or not ids.shape == am.shape == content.shape == torch.as_tensor(names).shape:
        raise ValueError(f"ids, am, content and names must share one [passage, pos] shape, got {tuple(ids.shape)}, "
                         f"{tuple(am.shape)}, {tuple(content.shape)}, {tuple(torch.as_tensor(names).shape)}")
    target = _check_target_batch(target, len(ids))
    if not methods:
        raise ValueError("methods must name at least one attribution method")
    if not isinstance(ig_steps, int) or ig_steps < 1:
        raise ValueError(f"ig_steps must be a positive int, got {ig_steps!r}")

    def scores_of(model, method, input_ids, seed=0, return_delta=False):
        return attribution.token_attributions(model, input_ids, am, method=method, target=target, candidates=content,
                                              baseline_id=pad_id, n_steps=ig_steps, internal_batch_size=256,
                                              seed=seed, return_delta=return_delta)

    head_only = attribution.randomised_copy(classifier, "head", seed=1)  # first step of the cascade
    destroyed = attribution.randomised_copy(classifier, "model", seed=1)  # last step: every weight re-drawn
    rows = torch.arange(len(ids))
    with torch.no_grad():
        gap = (classifier.predict_proba(ids, am)[rows, target]
               - classifier.predict_proba(ids.masked_fill(content, pad_id), am)[rows, target])
    unchanged = prediction_kept(lambda x: classifier.predict_proba(x, am), target)
    out = {}
    with common.torch_threads(common.free_cores()):  # MiniLM passes in batches: every free core helps
        for m in methods:
            t0 = time.perf_counter()
            if m == "integrated_gradients":
                scores, delta = scores_of(classifier, m, ids, return_delta=True)
                out["ig delta / gap"] = (delta.detach().abs() / gap.abs()).double().numpy()
            else:
                scores = scores_of(classifier, m, ids)
            out[f"{m}|seconds"] = np.array([(time.perf_counter() - t0) / len(ids)])
            faith = aopc(classifier.predict_proba, ids, am, scores, target=target, candidates=content, pad_id=pad_id)
            stab = stability(lambda x, seed, m=m: scores_of(classifier, m, x, seed=seed), ids,
                             perturb=token_masking(content, mask_id), repeats=1, mask=content, reference=scores,
                             unchanged=unchanged)
            out[f"{m}|text AOPC comprehensiveness"] = faith["aopc_comprehensiveness"].numpy()
            out[f"{m}|text AOPC sufficiency"] = faith["aopc_sufficiency"].numpy()
            out[f"{m}|plausibility AUC"] = ground_truth_auc(scores.abs(), names, mask=content).numpy()
            out[f"{m}|stability ρ"] = stab.numpy()
            out[f"{m}|sanity head"] = sanity_distance(scores, scores_of(head_only, m, ids), mask=content).numpy()
            out[f"{m}|sanity 1 - |ρ|"] = sanity_distance(scores, scores_of(destroyed, m, ids), mask=content).numpy()
    if path is not None:
        with open(path, "wb") as fh:  # a file handle: np.savez would add ".npz" to a path without it
            np.savez(fh, **out)
    return out


def concept_students(groups: Sequence[Sequence[int]], n_concepts: int, n_classes: int, *,
                     seed: int) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """A fresh (untrained) hierarchical Choquet student (sigmoid utilities) and a linear bottleneck,
    ``[batch, n_concepts]`` concept scores -> ``[batch, n_classes]`` logits, both drawn after
    :func:`helpers.common.set_seed` ``(seed)``."""
    from helpers import choquet, common

    covered = sorted(i for g in groups for i in g)
    if not groups or covered != list(range(n_concepts)):
        raise ValueError(f"groups must partition the {n_concepts} concepts, got indices {covered[:10]}...")
    if not isinstance(n_classes, int) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
    common.set_seed(seed)
    choq = choquet.ChoquetStudent(groups, n_classes, utility="sigmoid")
    lin = torch.nn.Linear(n_concepts, n_classes)
    return choq, lin


def concept_contributions(student: torch.nn.Module, z: Tensor, target: Tensor, method: str, *,
                          seed: int = 0) -> Tensor:
    """``[batch, concepts]`` contribution of each concept to class ``target``'s score.

    ``"Choquet contributions"``: the Choquet student's local (Shapley-style) contributions;
    ``"linear contributions"``: weight x standardised score of a linear student; ``"random
    concepts"``: uniform draws from a generator seeded with ``seed`` (the student is ignored).

    >>> lin = torch.nn.Linear(2, 2, bias=False)
    >>> _ = lin.weight.data.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    >>> concept_contributions(lin, torch.tensor([[1.0, -1.0]]), torch.tensor([1]), "linear contributions").tolist()
    [[3.0, -4.0]]
    """
    if method not in CONCEPT_METHODS:
        raise ValueError(f"method must be one of {CONCEPT_METHODS}, got {method!r}")
    if z.ndim != 2:
        raise ValueError(f"z must be [batch, concepts] concept scores, got shape {tuple(z.shape)}")
    target = _check_target_batch(target, len(z))
    with torch.no_grad():
        if method == "Choquet contributions":
            return student.choquet.local_contributions(z)[torch.arange(len(z)), target]
        if method == "linear contributions":
            return student.weight[target] * z
    return torch.rand(z.shape, generator=torch.Generator().manual_seed(seed))


def history_predictor(model: torch.nn.Module, pad_item: int) -> Predict:
    """ERASER's ``predict(ids, attention_mask) -> [batch, item]`` next-item probabilities for a
    sequential recommender: the histories that :func:`delete_tokens` packed to the left are
    left-padded again (``pad_item``) to the model's ``max_len``."""
    from helpers import prototypes

    if not hasattr(model, "max_len"):
        raise ValueError(f"model must be a prototypes.SequentialRecommender (with max_len), got {type(model).__name__}")

    def predict(ids: Tensor, attention_mask: Tensor) -> Tensor:
        kept = [row[m.bool()].tolist() for row, m in zip(ids, attention_mask, strict=True)]
        with torch.no_grad():
            return model(prototypes.pad_histories(kept, n_items=pad_item, max_len=model.max_len))[:, -1].softmax(-1)

    return predict


def item_swap(n_items: int) -> Callable[[Tensor, torch.Generator], Tensor]:
    """``(sequences, generator) -> sequences`` with one random purchase per history replaced by a
    random catalogue item in ``[0, n_items)``: a ``perturb`` for :func:`stability` on histories.

    >>> out = item_swap(1)(torch.tensor([[5, 6, 7]]), torch.Generator().manual_seed(0))
    >>> int((out == 0).sum()), int((out != torch.tensor([[5, 6, 7]])).sum())
    (1, 1)
    """
    if not isinstance(n_items, int) or n_items < 1:
        raise ValueError(f"n_items must be a positive int, got {n_items!r}")

    def swap_one(sequences: Tensor, generator: torch.Generator) -> Tensor:
        if sequences.ndim != 2:
            raise ValueError(f"sequences must be [user, pos] item ids, got shape {tuple(sequences.shape)}")
        out = sequences.clone()
        at = torch.randint(sequences.shape[1], (len(sequences),), generator=generator)
        out[torch.arange(len(sequences)), at] = torch.randint(n_items, (len(sequences),), generator=generator)
        return out

    return swap_one


def redrawn_prototypes(model: torch.nn.Module, *, seed: int) -> torch.nn.Module:
    """A copy of a prototype recommender whose scoring layer is re-drawn: prototypes from
    ``N(0, std)`` of the trained ones, bias zero (the first step of its cascade). Seeds torch's
    global generator with ``seed``; the original is untouched."""
    import copy

    if not isinstance(getattr(model, "prototypes", None), Tensor) or not isinstance(getattr(model, "bias", None),
                                                                                     Tensor):
        raise ValueError(f"model must have `prototypes` and `bias` tensors (a prototype recommender), "
                         f"got {type(model).__name__}")
    out = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        out.prototypes.normal_(0, float(model.prototypes.std()))
        out.bias.zero_()
    return out


def normalise_columns_batched(values: np.ndarray, columns: Sequence[str], *, higher_is_better: dict[str, bool],
                              floor: dict[str, float] | None = None) -> np.ndarray:
    """:func:`normalise_columns` on many tables at once (bootstrap resamples of a scoreboard).

    Args:
        values: ``[resample, method, metric]`` float array (NaN: metric does not apply).
        columns: the ``metric`` names, in order.
        higher_is_better: ``{column: bool}`` for every column.
        floor: optional ``{column: noise floor >= 0}``.

    Returns:
        ``[resample, method, metric]`` in [0, 1], 1 = best of its resample.

    >>> normalise_columns_batched(np.array([[[0.2], [0.4], [0.6]]]), ["auc"], higher_is_better={"auc": False})[0, :, 0]
    array([1. , 0.5, 0. ])
    """
    values = np.asarray(values, dtype=float)
    if values.ndim != 3 or values.shape[2] != len(columns):
        raise ValueError(f"values must be [resample, method, metric] with {len(columns)} metrics, "
                         f"got shape {values.shape}")
    missing = [c for c in columns if c not in higher_is_better]
    if missing:
        raise ValueError(f"say for every column whether higher is better; missing {missing} in higher_is_better")
    floor = dict(floor or {})
    out = np.full_like(values, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column stays NaN
        for j, c in enumerate(columns):
            v = values[:, :, j]
            low, high = np.nanmin(v, 1, keepdims=True), np.nanmax(v, 1, keepdims=True)
            span = np.maximum(high - low, floor.get(c, 0.0))
            gap = (high - v) if higher_is_better[c] else (v - low)
            out[:, :, j] = np.where(span > 0, 1 - gap / np.where(span > 0, span, 1.0),
                                    np.where(np.isnan(v), np.nan, 1.0))
    return out


def paired_comparison(per_item: dict[str, dict[str, np.ndarray]], setting: str, metric: str, a: str, b: str):
    """The paired difference ``a - b`` of one metric over a setting's items (the items where both are
    defined), with its bootstrap interval: :func:`helpers.stats.paired_difference`.

    Args:
        per_item: ``{"setting: method": {metric: [item] values}}``.
        setting, metric: which items and which metric.
        a, b: the two methods.

    Returns:
        a :class:`helpers.stats.Estimate`.
    """
    from helpers import stats

    rows = [f"{setting}: {a}", f"{setting}: {b}"]
    for r in rows:
        if r not in per_item or metric not in per_item[r]:
            raise ValueError(f"per_item has no {metric!r} for {r!r}")
    x, y = (np.asarray(per_item[r][metric], dtype=float) for r in rows)
    if x.shape != y.shape:
        raise ValueError(f"{rows[0]} and {rows[1]} must be measured on the same items, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    return stats.paired_difference(x[ok], y[ok])


def kendall_w(scores) -> float:
    """Kendall's coefficient of concordance of ``scores`` ``[rater, item]``: 1 when every rater ranks the items
    the same way, 0 when the rankings share nothing (ties get average ranks, with the tie correction).

    In Chapter 14 a rater is one input (an image) and the items are the methods: W says how consistently the
    inputs rank the methods under one metric (Tomsett et al. 2020's *inter-rater reliability*, with W in place
    of Krippendorff's alpha).

    >>> kendall_w([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    1.0
    >>> round(kendall_w([[1, 2, 3], [3, 2, 1]]), 6)
    0.0
    """
    from scipy.stats import rankdata

    x = np.asarray(scores, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2 or not np.isfinite(x).all():
        raise ValueError(f"scores must be finite [rater >= 2, item >= 2], got shape {x.shape}")
    return _kendall_w_of_ranks(rankdata(x, axis=1))


def _kendall_w_of_ranks(ranks: np.ndarray) -> float:
    """Kendall's W of average ranks ``[rater, item]``; each rater's ties Σ(t³ − t) follow from its sum of
    squared ranks, n(n + 1)(2n + 1)/6 − Σ(t³ − t)/12, so resampled raters need no re-ranking."""
    m, n = ranks.shape
    s = float(((ranks.sum(0) - m * (n + 1) / 2) ** 2).sum())
    ties = float((2 * n * (n + 1) * (2 * n + 1) - 12 * (ranks ** 2).sum(1)).sum())
    denominator = m ** 2 * (n ** 3 - n) - m * ties
    return 1.0 if denominator <= 1e-9 else 12 * s / denominator


def metric_reliability(per_item: dict[str, dict[str, np.ndarray]], rows: Sequence[str], metrics: Sequence[str], *,
                       variants: Sequence[tuple[str, str, bool]] = (), n_resamples: int = 2000, seed: int = 0):
    """How far a setting's metrics can be trusted to rank its methods (Tomsett et al. 2020).

    - **concordance** of each metric: Kendall's W (:func:`kendall_w`) of the methods' values over the items
      measured for every method, with a percentile bootstrap over items;
    - **agreement between protocol variants** ``(metric a, metric b, same direction)``: the mean over items of
      the Spearman correlation (:func:`helpers.stats.rank_correlations`) between the methods' values under
      ``a`` and under ``b`` (``b`` negated when the two run in opposite directions), bootstrap over items.

    Returns:
        ``(concordance, agreement)``: ``{metric: Estimate}`` and ``{(a, b): Estimate}``.
    """
    from scipy.stats import rankdata

    from helpers import stats

    if len(rows) < 2:
        raise ValueError(f"need at least two methods, got {list(rows)}")

    def table(metric):
        missing = [r for r in rows if metric not in per_item.get(r, {})]
        if missing:
            raise ValueError(f"per_item has no {metric!r} for {missing}")
        x = np.stack([np.asarray(per_item[r][metric], dtype=float) for r in rows], 1)   # [item, method]
        return x[np.isfinite(x).all(1)]

    gen = np.random.default_rng(seed)
    concordance = {}
    for metric in metrics:
        x = table(metric)
        if len(x) < 2:
            raise ValueError(f"{metric!r} has fewer than two items measured for every method")
        ranks = rankdata(x, axis=1)                            # resampling raters keeps each rater's ranks
        boot = [_kendall_w_of_ranks(ranks[gen.integers(0, len(x), len(x))]) for _ in range(n_resamples)]
        lo, hi = np.percentile(boot, [2.5, 97.5])
        concordance[metric] = stats.Estimate(kendall_w(x), float(lo), float(hi), n=len(x),
                                             method=f"Kendall's W over {len(x)} items, percentile bootstrap 95%")
    agreement = {}
    for a, b, same in variants:
        xa, xb = (np.stack([np.asarray(per_item[r][m], dtype=float) for r in rows], 1) for m in (a, b))
        ok = np.isfinite(xa).all(1) & np.isfinite(xb).all(1)
        rho = stats.rank_correlations(xa[ok], xb[ok] if same else -xb[ok])   # [item], the book's one convention
        rho = np.nan_to_num(rho, nan=0.0)                   # one variant constant on an item: no agreement there
        agreement[a, b] = stats.bootstrap_ci(rho, seed=seed)
    return concordance, agreement


def tied_with_best(per_item: dict[str, dict[str, np.ndarray]], setting, columns: Sequence[str], *,
                   higher_is_better: dict[str, bool], cell_ci: dict):
    """Which methods are within noise of the best of their setting, metric by metric.

    For every setting and every metric its methods have, the best method by mean, and the methods
    whose paired difference with it (:func:`helpers.stats.paired_difference`, same items) has an
    interval that contains 0 (or that have fewer than two shared items, or the same values).

    Args:
        per_item: ``{"setting: method": {metric: [item] values}}``.
        setting: pandas ``Series``, row name -> setting, in the scoreboard's row order.
        columns: the metrics, in the scoreboard's column order.
        higher_is_better: ``{metric: bool}``.
        cell_ci: ``{row: {metric: Estimate}}``, the cells' intervals (shown with the best).

    Returns:
        a ``DataFrame`` with columns ``setting``, ``metric``, ``best`` (name and interval) and
        ``tied with the best (paired bootstrap)`` (comma-separated names, ``-`` for none).
    """
    import pandas as pd

    from helpers import stats

    rows = list(setting.index)
    missing = [r for r in rows if r not in per_item or r not in cell_ci]
    if missing:
        raise ValueError(f"per_item and cell_ci need every row of setting; missing {missing}")
    out = []
    for s in setting.unique():
        members = [r for r in rows if setting[r] == s]
        for c in [c for c in columns if c in per_item[members[0]]]:
            if c not in higher_is_better:
                raise ValueError(f"higher_is_better does not say which way {c!r} is better")
            means = {r: np.nanmean(per_item[r][c]) for r in members}
            best = (max if higher_is_better[c] else min)(means, key=means.get)
            tied = []
            for r in members:
                if r == best:
                    continue
                x, y = per_item[best][c], per_item[r][c]
                ok = np.isfinite(x) & np.isfinite(y)
                if (ok.sum() < 2 or np.allclose(x[ok], y[ok])
                        or not stats.paired_difference(x[ok], y[ok]).excludes(0.0)):
                    tied.append(r.split(": ", 1)[1])
            out.append({"setting": s, "metric": c, "best": f"{best.split(': ', 1)[1]} {cell_ci[best][c]:.3f}",
                        "tied with the best (paired bootstrap)": ", ".join(tied) or "-"})
    return pd.DataFrame(out)


def intrusion_oddness(unit: Tensor) -> Tensor:
    """Word intrusion without a reader: ``[sets, words, d]`` unit vectors -> ``[sets, words]`` mean
    cosine distance of each word to the others (the intruder should be the oddest).

    >>> intrusion_oddness(torch.tensor([[[1.0, 0], [1.0, 0], [0.0, 1]]])).tolist()
    [[0.5, 0.5, 1.0]]
    """
    if unit.ndim != 3 or unit.shape[1] < 2:
        raise ValueError(f"unit must be [sets, words >= 2, d] vectors, got shape {tuple(unit.shape)}")
    sim = unit @ unit.transpose(1, 2)
    return 1 - (sim.sum(-1) - 1) / (unit.shape[1] - 1)


def unit_rows(vectors, idx) -> Tensor:
    """``vectors`` (``[n, d]`` dense or scipy sparse) normalised to unit length, float64, at the
    integer indices ``idx`` (any shape) -> ``[*idx.shape, d]``.

    >>> unit_rows(np.array([[3.0, 4.0], [0.0, 2.0]]), np.array([[1, 0]])).tolist()
    [[[0.0, 1.0], [0.6, 0.8]]]
    """
    import torch.nn.functional as F

    dense = torch.as_tensor(vectors.toarray() if hasattr(vectors, "toarray") else np.asarray(vectors)).double()
    if dense.ndim != 2:
        raise ValueError(f"vectors must be [n, d], got shape {tuple(dense.shape)}")
    idx = torch.as_tensor(idx)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(dense)):
        raise ValueError(f"idx must lie in [0, {len(dense)}), got [{int(idx.min())}, {int(idx.max())}]")
    return F.normalize(dense, dim=-1)[idx]


def word_rows(table: Tensor, row_of: dict[str, int], words) -> Tensor:
    """The rows of ``table`` (``[vocab, d]``) for an array of ``words`` (any shape) -> ``[*shape, d]`` float64.

    >>> word_rows(torch.eye(2), {"a": 0, "b": 1}, np.array([["b", "a"]], dtype=object)).tolist()
    [[[0.0, 1.0], [1.0, 0.0]]]
    """
    words = np.asarray(words, dtype=object)
    unknown = sorted({w for w in words.ravel() if w not in row_of})
    if unknown:
        raise ValueError(f"words not in the table: {unknown[:10]}")
    return table[torch.as_tensor(np.vectorize(row_of.get)(words))].double()


# ---------------------------------------------------------------------------------------------
# ROAR: remove the pixels an explanation ranks highest, retrain, and measure what is left
# ---------------------------------------------------------------------------------------------

ROAR = {"methods": ("random", "Sobel edges", "saliency", "integrated gradients", "rollout"),
        "fractions": (0.5, 0.9), "seeds": (0, 1, 2), "n_train": 6000, "n_test": 2000, "epochs": 5,
        "fill": 0.0, "version": 1}
"""Chapter 14's small ROAR: the explanations ranked (a random map and the model-free Sobel edge magnitude as
controls), the shares of pixels removed, the retraining seeds, the Fashion-MNIST training and test images used
(the first ``n_train`` and ``n_test``), the ViT's epochs, and the fill value (0: the training set's mean pixel,
normalised, as ROAR's global mean)."""


def roar_remove(images: Tensor, scores: Tensor, fraction: float, *, fill: float = 0.0) -> Tensor:
    """``images`` with the ``fraction`` of each image's pixels that ``scores`` ranks highest set to ``fill``.

    As ROAR's reference code: ``round_down(fraction * pixels)`` pixels per image, the top of the ranking
    (ties broken by position, first pixel first).

    Args:
        images: ``[batch, 1, H, W]``; scores: ``[batch, H, W]`` finite, higher = more important.

    >>> x = torch.arange(4.0).reshape(1, 1, 2, 2)
    >>> roar_remove(x, torch.tensor([[[0.1, 0.9], [0.5, 0.2]]]), 0.5, fill=-1.0)[0, 0].tolist()
    [[0.0, -1.0], [-1.0, 3.0]]
    """
    _check_image_batch(images, "images")
    if scores.shape != (images.shape[0], *images.shape[2:]) or not torch.isfinite(scores).all():
        raise ValueError(f"scores must be finite [batch, H, W] = {(images.shape[0], *images.shape[2:])}, got "
                         f"{tuple(scores.shape)}")
    _check_fraction(fraction)
    flat = scores.reshape(len(scores), -1)
    n = int(fraction * flat.shape[1])
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices[:, :n]    # [batch, n]
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, order, True).reshape(scores.shape)
    return torch.where(drop[:, None], torch.as_tensor(fill, dtype=images.dtype), images)


def roar_maps(model: torch.nn.Module, method: str, images: Tensor, *, seed: int = 0, chunk: int = 500) -> Tensor:
    """``[batch, 28, 28]`` ranking of ``images``' pixels by ``method`` of :data:`ROAR`, explaining the model's
    predicted class: :func:`image_explanation` for the model's explanations, the Sobel edge magnitude of the
    image itself (:func:`helpers.data.shift_domain`, model-free) for ``"Sobel edges"``."""
    from helpers import data, vision, zoo

    if method not in ROAR["methods"]:
        raise ValueError(f"method must be one of {ROAR['methods']}, got {method!r}")
    if method == "Sobel edges":
        return data.shift_domain(images, "edges")[:, 0]
    out = []
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk]
        target = zoo.predict_logits(model, x).argmax(1)
        out.append(image_explanation(model, method, x, target, black=vision.FASHION_BLACK, seed=seed + i))
    return torch.cat(out)


def roar_study(model: torch.nn.Module, *, recipe: dict = ROAR, model_key: str, log=print) -> dict:
    """ROAR (Hooker et al. 2019) on the Fashion-MNIST ViT, small: for each method and fraction of :data:`ROAR`,
    the top pixels of every training and test image are replaced by the mean, a ViT is retrained from scratch
    (Chapter 8's recipe, ``recipe["epochs"]`` epochs) on the modified training images and tested on the modified
    test images, once per seed; a ViT trained on the unmodified images is the reference. A better ranking removes
    more of what a classifier can learn: lower accuracy. Committed JSON (about 15 minutes of CPU to rebuild).

    Args:
        model: the ViT whose explanations are ranked (``model_key`` names it in the cache key).

    Returns:
        ``{"accuracy": {method: {str(fraction): [accuracy per seed]}}, "unmodified": [accuracy per seed]}``.
    """
    import json

    from helpers import common, data, vision

    key = {"recipe": recipe, "model": model_key, "code": 1}
    path = common.cache_dir("results", "ch14") / f"roar-{common.content_hash(key, length=12)}.json"

    def build(target) -> None:
        x_tr, y_tr = (t[: recipe["n_train"]] for t in data.fashion_tensors("train"))
        x_te, y_te = (t[: recipe["n_test"]] for t in data.fashion_tensors("test"))

        def retrained(images) -> list[float]:
            return [vision.train(vision.Recipe(arch="vit", epochs=recipe["epochs"], seed=s), progress=False,
                                 images=images)[1]["test_accuracy"][-1] for s in recipe["seeds"]]

        out = {"accuracy": {}, "unmodified": retrained((x_tr, y_tr, x_te, y_te))}
        log(f"unmodified: {out['unmodified']}")
        for method in recipe["methods"]:
            with common.torch_threads(common.free_cores()):
                m_tr, m_te = roar_maps(model, method, x_tr), roar_maps(model, method, x_te, seed=len(x_tr))
            out["accuracy"][method] = {}
            for f in recipe["fractions"]:
                images = (roar_remove(x_tr, m_tr, f, fill=recipe["fill"]), y_tr,
                          roar_remove(x_te, m_te, f, fill=recipe["fill"]), y_te)
                out["accuracy"][method][str(f)] = retrained(images)
                log(f"{method}, {f:.0%} removed: {out['accuracy'][method][str(f)]}")
        target.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


# ---------------------------------------------------------------------------------------------
# Meta-evaluation (MetaQuantus): do the metrics resist a minor perturbation and react to a disruptive one?
# ---------------------------------------------------------------------------------------------

IMAGE_QUALITY = {"image deletion AUC": False, "image insertion AUC": True, "plausibility AUC": True}
"""Chapter 14's per-image quality metrics of one explanation of one model, and whether higher is better."""


def image_quality(model: torch.nn.Module, maps: Tensor, images: Tensor, target: Tensor, *, black: float,
                  foreground: Tensor, steps: int = 28, blur_sigma: float = 4.0) -> dict[str, np.ndarray]:
    """The image setting's per-image quality of ``maps`` as explanations of ``model``'s class ``target``.

    Deletion AUC (pixels set to ``black`` in the map's order, :func:`helpers.vision.perturbation_curve`),
    insertion AUC (pixels put back into a Gaussian blur of the images, kernel 25, ``blur_sigma``), both on
    ``steps`` steps, and plausibility AUC (:func:`ground_truth_auc` of the map's magnitude against
    ``foreground``).

    Args:
        maps: ``[batch, 28, 28]`` finite scores; images: ``[batch, 1, 28, 28]``; target: ``[batch]``;
        foreground: ``[batch, 28, 28]`` bool, the pixels known to matter.

    Returns:
        ``{metric of IMAGE_QUALITY: [batch] values}``.
    """
    from torchvision.transforms.functional import gaussian_blur

    from helpers import vision

    _check_image_batch(images, "images")
    target = _check_target_batch(target, len(images))
    shape = (images.shape[0], *images.shape[2:])
    if maps.shape != shape or not torch.isfinite(maps).all():
        raise ValueError(f"maps must be finite [batch, H, W] = {shape}, got {tuple(maps.shape)}")
    if foreground.shape != shape or foreground.dtype != torch.bool:
        raise ValueError(f"foreground must be a bool [batch, H, W] = {shape} tensor, got {tuple(foreground.shape)} "
                         f"{foreground.dtype}")
    predict = softmax_predictor(model)
    canvas = {"deletion": black, "insertion": gaussian_blur(images, kernel_size=25, sigma=blur_sigma)}
    auc = {mode: vision.auc(vision.perturbation_curve(predict, images, maps, target=target, mode=mode, steps=steps,
                                                      canvas=canvas[mode])).detach().numpy()
           for mode in ("deletion", "insertion")}
    return {"image deletion AUC": auc["deletion"], "image insertion AUC": auc["insertion"],
            "plausibility AUC": ground_truth_auc(maps.abs(), foreground).numpy()}


META = {"methods": ("saliency", "integrated gradients", "GradientSHAP", "occlusion", "RISE", "last-layer attention",
                    "rollout"),
        "tests": {"model resilience": ("model", "resilience", 0.001), "model adversary": ("model", "adversary", 2.0),
                  "input resilience": ("input", "resilience", 0.001), "input adversary": ("input", "adversary", 5.0)},
        "draws": 5, "version": 1}
"""Chapter 14's meta-evaluation, after MetaQuantus's settings for (Fashion-)MNIST (Hedström et al. 2023,
``setup_test_suite``): the ViT's explanation methods, the four tests ``(space, kind, size)`` — every weight
multiplied by noise ~ N(1, size) (model), or uniform noise in [-size, size] added to every pixel, in pixel
units of [0, 1] (input) — and the number of draws of each perturbation."""


def perturbed_weights(model: torch.nn.Module, std: float, *, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every parameter multiplied by independent noise ~ N(1, ``std``), as Quantus's
    ``model.sample(noise_type="multiplicative")`` that MetaQuantus's model tests call (buffers untouched).

    >>> m = perturbed_weights(torch.nn.Linear(2, 2), 0.0, seed=0)
    >>> isinstance(m, torch.nn.Linear)
    True
    """
    import copy

    if not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    out = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for p in out.parameters():
            p.mul_(1 + std * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return out


def uniform_input_noise(images: Tensor, amount: float, *, seed: int) -> Tensor:
    """``images`` plus independent uniform noise in ``[-amount, amount]``, clipped below at the batch's
    minimum, as MetaQuantus's input tests (``amount`` in the images' own units).

    >>> x = torch.zeros(1, 1, 2, 2)
    >>> bool((uniform_input_noise(x, 0.5, seed=0) >= 0).all())
    True
    """
    _check_image_batch(images, "images")
    if not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount < 0:
        raise ValueError(f"amount must be a finite number >= 0, got {amount!r}")
    generator = torch.Generator().manual_seed(int(seed))
    noise = (2 * torch.rand(images.shape, generator=generator, dtype=images.dtype) - 1) * amount
    return (images + noise).clamp(min=float(images.min()))


def meta_consistency(q, q_hat, kept, *, kind: str, higher_is_better: bool) -> dict[str, float]:
    """MetaQuantus's intra- and inter-consistency of one metric under one perturbation draw.

    On the items ``kept`` (a resilience test keeps the items whose prediction the perturbation left unchanged,
    an adversary test those it changed):

    - **IAC** (intra-consistency): for each method, the p-value of a two-sided Wilcoxon signed-rank test between
      its scores before (``q``) and after (``q_hat``) the perturbation (zero differences split, ``zsplit``; p = 1
      when nothing moved); a resilience test wants them alike (IAC = mean p), an adversary test different
      (IAC = mean of 1 - p);
    - **IEC** (inter-consistency): resilience — the share of (item, rank) places where the method ranked there is
      the same before and after (the ranking of the methods survives); adversary — the share of (method, item)
      pairs whose score got worse (``higher_is_better`` sets the direction: the reference code's
      ``score_direction`` flag).

    Args:
        q, q_hat: ``[method, item]`` scores before and after; kept: ``[item]`` bool.
        kind: ``"resilience"`` or ``"adversary"``.

    Returns:
        ``{"IAC": float, "IEC": float, "kept": int}`` (NaN scores when no item is kept).

    >>> q = np.array([[0.1, 0.2, 0.3], [0.5, 0.6, 0.7]])
    >>> meta_consistency(q, q, np.ones(3, bool), kind="resilience", higher_is_better=True)
    {'IAC': 1.0, 'IEC': 1.0, 'kept': 3}
    >>> meta_consistency(q, q - 0.1, np.ones(3, bool), kind="adversary", higher_is_better=True)["IEC"]
    1.0
    """
    from scipy.stats import wilcoxon

    q, q_hat = np.asarray(q, dtype=float), np.asarray(q_hat, dtype=float)
    kept = np.asarray(kept)
    if q.ndim != 2 or q.shape != q_hat.shape or q.shape[0] < 2:
        raise ValueError(f"q and q_hat must be [method >= 2, item] of one shape, got {q.shape} and {q_hat.shape}")
    if kept.dtype != bool or kept.shape != (q.shape[1],):
        raise ValueError(f"kept must be a bool [item] = ({q.shape[1]},) array, got {kept.dtype} {kept.shape}")
    if not (np.isfinite(q).all() and np.isfinite(q_hat).all()):
        raise ValueError("q and q_hat must be finite")
    if kind not in ("resilience", "adversary"):
        raise ValueError(f"kind must be 'resilience' or 'adversary', got {kind!r}")
    n = int(kept.sum())
    if n == 0:
        return {"IAC": float("nan"), "IEC": float("nan"), "kept": 0}
    a, b = q[:, kept], q_hat[:, kept]
    p = []
    for before, after in zip(a, b, strict=True):
        if np.allclose(before, after, rtol=0, atol=1e-12):
            p.append(1.0)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p.append(float(wilcoxon(before, after, zero_method="zsplit", alternative="two-sided").pvalue))
    p = np.asarray(p)
    if kind == "resilience":
        iec = float((np.argsort(a, axis=0, kind="stable") == np.argsort(b, axis=0, kind="stable")).mean())
        return {"IAC": float(p.mean()), "IEC": iec, "kept": n}
    worse = b < a if higher_is_better else b > a
    return {"IAC": float((1 - p).mean()), "IEC": float(worse.mean()), "kept": n}


def meta_evaluation_study(model: torch.nn.Module, images: Tensor, *, black: float, shap_baselines: Tensor,
                          recipe: dict = META, model_key: str, log=print) -> dict:
    """MetaQuantus's model and input perturbation tests (Hedström et al. 2023) of the image setting's metrics.

    ``model``'s explanations (:func:`image_explanation`, the methods of ``recipe``, seed 0) of its predicted
    class on ``images`` are scored by :func:`image_quality` once as they are, then once per draw of every test
    of ``recipe`` on the perturbed model (or inputs), still explaining the class predicted before the
    perturbation (as MetaQuantus does). The foreground is the clean image's. Committed JSON (about ten
    minutes of CPU to rebuild).

    Returns:
        a dict: ``"target"`` ``[item]``, ``"clean"`` ``{method: {metric: [item]}}`` and ``"tests"``
        ``{test: [one dict per draw]}``, each draw ``{"predicted": [item], "scores": {method: {metric: [item]}}}``.
    """
    import json

    from helpers import common, data

    key = {"recipe": recipe, "model": model_key, "n": len(images), "code": 2,
           "images": common.content_hash(images.numpy().tobytes(), length=12)}
    path = common.cache_dir("results", "ch14") / f"meta-{common.content_hash(key, length=12)}.json"

    def build(target_path) -> None:
        with torch.no_grad():
            target = model(images).argmax(1)
        foreground = data.unnormalise(images) > 0.1

        def scores(m, x) -> dict:
            out = {}
            for method in recipe["methods"]:
                maps = image_explanation(m, method, x, target, black=black, shap_baselines=shap_baselines)
                out[method] = {k: np.round(v.astype(float), 7).tolist()
                               for k, v in image_quality(m, maps, x, target, black=black,
                                                         foreground=foreground).items()}
            return out

        out = {"target": target.tolist(), "clean": scores(model, images), "tests": {}}
        for t, (name, (space, _, size)) in enumerate(recipe["tests"].items()):
            out["tests"][name] = []
            for d in range(recipe["draws"]):
                seed = 1000 * (t + 1) + d
                m = perturbed_weights(model, size, seed=seed).eval() if space == "model" else model
                x = images if space == "model" else uniform_input_noise(images, size / data.FASHION_STD, seed=seed)
                with torch.no_grad():
                    predicted = m(x).argmax(1)
                out["tests"][name].append({"predicted": predicted.tolist(), "scores": scores(m, x)})
                log(f"{name}, draw {d}: prediction kept on {int((predicted == target).sum())} of {len(x)}")
        target_path.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


def meta_scores(study: dict, *, recipe: dict = META, controls: bool = True, seed: int = 0) -> dict:
    """MetaQuantus's four scores and their mean, the meta-consistency MC, per metric and draw, from
    :func:`meta_evaluation_study`'s output.

    For each perturbation space (model, input) and metric, draw ``d`` of the resilience test and draw ``d`` of
    the adversary test give IAC_NR, IEC_NR, IAC_AR, IEC_AR (:func:`meta_consistency`); MC is their mean (1 is
    best). With ``controls``, two estimators that read nothing are scored on the same items: **random** (a
    uniform number per item, drawn anew for every evaluation) and **frozen** (the unperturbed score, whatever
    the perturbation: resilient by construction, never reactive).

    Returns:
        ``{space: {metric: {score: [draw]}}}`` with scores ``IAC_NR, IEC_NR, IAC_AR, IEC_AR, MC``.
    """
    methods = list(recipe["methods"])
    target = np.asarray(study["target"])
    clean = {m: np.stack([np.asarray(study["clean"][k][m], dtype=float) for k in methods]) for m in IMAGE_QUALITY}
    gen = np.random.default_rng(seed)
    out: dict = {}
    for space in sorted({s for s, _, _ in recipe["tests"].values()}):
        tests = {kind: name for name, (s, kind, _) in recipe["tests"].items() if s == space}
        if set(tests) != {"resilience", "adversary"}:
            raise ValueError(f"space {space!r} needs one resilience and one adversary test, got {sorted(tests)}")
        metrics = {**{m: m for m in IMAGE_QUALITY}, **({"random": None, "frozen": None} if controls else {})}
        out[space] = {m: {s: [] for s in ("IAC_NR", "IEC_NR", "IAC_AR", "IEC_AR", "MC")} for m in metrics}
        for d in range(recipe["draws"]):
            for kind, short in (("resilience", "NR"), ("adversary", "AR")):
                draw = study["tests"][tests[kind]][d]
                predicted = np.asarray(draw["predicted"])
                kept = predicted == target if kind == "resilience" else predicted != target
                for metric in metrics:
                    if metric == "random":
                        shape = clean["plausibility AUC"].shape
                        q, q_hat, higher = gen.random(shape), gen.random(shape), True
                    elif metric == "frozen":
                        q = q_hat = clean["plausibility AUC"]
                        higher = True
                    else:
                        q, higher = clean[metric], IMAGE_QUALITY[metric]
                        q_hat = np.stack([np.asarray(draw["scores"][k][metric], dtype=float) for k in methods])
                    r = meta_consistency(q, q_hat, kept, kind=kind, higher_is_better=higher)
                    out[space][metric][f"IAC_{short}"].append(r["IAC"])
                    out[space][metric][f"IEC_{short}"].append(r["IEC"])
            for metric in metrics:
                s = out[space][metric]
                s["MC"].append(float(np.mean([s[k][-1] for k in ("IAC_NR", "IEC_NR", "IAC_AR", "IEC_AR")])))
    return out
