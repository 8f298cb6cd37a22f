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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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
        ``{"comprehensiveness": [bin, batch], "sufficiency": [bin, batch],
        "aopc_comprehensiveness": [batch], "aopc_sufficiency": [batch]}`` (float64); the AOPC is the
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
