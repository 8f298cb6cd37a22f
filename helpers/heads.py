"""What attention heads specialise in: per-head statistics, head maps, syntax probing and ablation.

Introduced in nbs/04_head_specialisation.ipynb (Chapter 4), which reproduces Clark et al. (2019),
"What Does BERT Look At? An Analysis of BERT's Attention", on MiniLM-L6. Everything works on the
stacked attention probabilities ``attn  # [layer, batch, head, query, key]`` with padding zeroed, as
returned by :func:`helpers.attention.attention_maps` (Chapter 1) or streamed batch by batch by
:func:`iter_attention`, so that a corpus of thousands of sentences never sits in memory at once.

- :func:`head_scores`: mean attention of every head on a pattern (previous / current / next token,
  ``[CLS]``, ``[SEP]``, punctuation, broad attention, or a pattern matrix of your own), Clark §3.
- :class:`HeadStatistics`: the same scores, entropies and Jensen–Shannon divergences between heads,
  accumulated over a stream of batches (Clark §3 and §6).
- :func:`word_attention`, :func:`align_words`, :class:`RelationProbe`: word-level attention and the
  "most-attended word is the syntactic head" probe with a fixed-offset baseline (Clark §4.2, Table 1).
- :func:`ablated_embeddings`: mean-pooled sentence embeddings with heads or layers masked out
  (Michel et al. 2019 mask heads the same way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from helpers import hooks
from helpers.attention import ROW_TOL, AttentionMaps, encode_batches

PATTERNS = ("previous", "current", "next", "first", "cls", "sep", "dot", "comma", "punct", "broad")
"""Patterns known to :func:`head_scores`; ``first`` is the first position (``[CLS]`` in BERT) and
``punct`` is ``"."`` or ``","`` as in Clark et al."""

ENTROPY_SMOOTHING = 1e-4  # Clark et al.'s smoothing of attention rows before taking entropies
JS_SMOOTHING = 1e-3  # ... and before Jensen-Shannon divergences (their head_distances.py)

__all__ = [
    "PATTERNS",
    "iter_attention",
    "pattern_matrix",
    "head_scores",
    "attention_entropy",
    "js_divergence",
    "HeadStatistics",
    "parse_sentences",
    "align_words",
    "gold_heads",
    "word_attention",
    "head_predictions",
    "RelationProbe",
    "head_mask",
    "ablated_embeddings",
    "row_sums_ok",
]


# ---------------------------------------------------------------------------------------------
# Validation and streaming extraction
# ---------------------------------------------------------------------------------------------


def _check_attn(attn: Tensor, tokens: Sequence[Sequence[str]] | None = None) -> Tensor:
    if isinstance(attn, np.ndarray):
        attn = torch.from_numpy(attn)
    if not isinstance(attn, Tensor) or not attn.is_floating_point():
        raise ValueError(f"attn must be a floating-point tensor of probabilities, got {type(attn).__name__}")
    if attn.ndim != 5:
        raise ValueError(
            f"attn must be [layer, batch, head, query, key], got shape {tuple(attn.shape)}; "
            "for one sentence use attn[:, None]"
        )
    if attn.shape[1] == 0:
        raise ValueError("attn holds an empty batch (0 sentences); pass at least one sentence")
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn must be square in (query, key), got shape {tuple(attn.shape)}")
    if not torch.isfinite(attn).all():
        raise ValueError("attn contains NaN or inf; pass attention probabilities (padding set to 0, not NaN)")
    if tokens is not None:
        if isinstance(tokens, str) or len(tokens) != attn.shape[1]:
            raise ValueError(
                f"tokens must hold one list of word pieces per sentence: got {len(tokens)} lists "
                f"for a batch of {attn.shape[1]}"
            )
        too_long = [len(t) for t in tokens if len(t) > attn.shape[-1] or len(t) == 0]
        if too_long:
            raise ValueError(
                f"a sentence has {too_long[0]} word pieces but attn has {attn.shape[-1]} positions; "
                "tokens and attn must come from the same tokenisation (padding removed from tokens)"
            )
    return attn


def _real_mask(tokens: Sequence[Sequence[str]], width: int) -> Tensor:
    """[batch, pos] True on the real word pieces (the first len(tokens[b]) positions)."""
    lengths = torch.tensor([len(t) for t in tokens])
    return torch.arange(width)[None, :] < lengths[:, None]


def iter_attention(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str] | Sequence[Sequence[str]],
    *,
    batch_size: int = 64,
    max_length: int = 64,
) -> Iterator[tuple[list[int], AttentionMaps]]:
    """Stream attention maps batch by batch, shortest sentences first, without gradients.

    The streaming counterpart of :func:`helpers.attention.attention_maps`: sentences are sorted by
    length so that each batch is padded as little as possible, and only one batch of attention
    (``batch_size x layers x heads x width^2`` floats) is alive at a time.

    Args:
        model: a Hugging Face encoder loaded with ``attn_implementation="eager"``.
        tokenizer: its tokenizer.
        texts: sentences as strings, or as lists of words (e.g. spaCy tokens), which are then
            tokenised with ``is_split_into_words=True``.
        batch_size: sentences per forward pass.
        max_length: truncation length in word pieces, special tokens included.

    Yields:
        ``(indices, maps)``: the positions in ``texts`` of this batch's sentences, and their
        ``AttentionMaps(attn [layer, batch, head, query, key], tokens, mask [batch, pos])``.
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of sentences (strings or lists of words)")
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise ValueError("load the model with attn_implementation='eager' to get attention probabilities")
    split = not isinstance(texts[0], str)
    enc = tokenizer(
        list(map(list, texts)) if split else list(texts),
        truncation=True,
        max_length=max_length,
        is_split_into_words=split,
    )
    order = np.argsort([len(ids) for ids in enc["input_ids"]], kind="stable")
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size].tolist()
        batch = tokenizer.pad({"input_ids": [enc["input_ids"][i] for i in idx]}, return_tensors="pt")
        mask = batch["attention_mask"].bool()  # [batch, pos]
        with torch.inference_mode():
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask.to(device), output_attentions=True)
        attn = torch.stack(out.attentions).float().cpu()  # [layer, batch, head, query, key]
        attn *= (mask[:, :, None] & mask[:, None, :])[None, :, None]
        tokens = [tokenizer.convert_ids_to_tokens(enc["input_ids"][i]) for i in idx]
        yield idx, AttentionMaps(attn, tokens, mask)


# ---------------------------------------------------------------------------------------------
# Head patterns and scores (Clark et al. §3)
# ---------------------------------------------------------------------------------------------

_TOKEN_PATTERNS = {"cls": ("[CLS]",), "sep": ("[SEP]",), "dot": (".",), "comma": (",",), "punct": (".", ",")}


def pattern_matrix(tokens: Sequence[Sequence[str]], width: int, *, pattern: str) -> Tensor:
    """The target positions of a named pattern, as a [batch, query, key] 0/1 matrix on real tokens.

    Args:
        tokens: word pieces per sentence (padding removed).
        width: padded length of the attention maps.
        pattern: ``"previous"``, ``"current"``, ``"next"`` (relative positions), ``"first"``
            (the first position), or ``"cls"``,
            ``"sep"``, ``"dot"``, ``"comma"``, ``"punct"`` (keys holding those word pieces).

    Returns:
        [batch, query, key] float, 1 where a query's attention counts for the pattern.

    >>> pattern_matrix([["[CLS]", "hi", "[SEP]"]], 3, pattern="previous")[0]
    tensor([[0., 0., 0.],
            [1., 0., 0.],
            [0., 1., 0.]])
    """
    real = _real_mask(tokens, width)  # [batch, pos]
    pair = real[:, :, None] & real[:, None, :]  # [batch, query, key]
    pos = torch.arange(width)
    offsets = {"previous": -1, "current": 0, "next": 1}
    if pattern in offsets:
        target = (pos[None, :] == pos[:, None] + offsets[pattern])[None]  # [1, query, key]
    elif pattern == "first":
        target = (pos == 0)[None, None, :]  # [1, 1, key]
    elif pattern in _TOKEN_PATTERNS:
        names = _TOKEN_PATTERNS[pattern]
        keys = torch.tensor([[t in names for t in toks] + [False] * (width - len(toks)) for toks in tokens])
        target = keys[:, None, :]  # [batch, 1, key]
    else:
        raise ValueError(f"unknown pattern {pattern!r}; use one of {PATTERNS} or pass a [batch, query, key] tensor")
    return (target & pair).float()


def attention_entropy(attn: Tensor, mask: Tensor, *, smoothing: float = ENTROPY_SMOOTHING) -> Tensor:
    """Mean entropy (nats) of each head's attention rows, per sentence, after Clark's smoothing.

    Each row is smoothed over the sentence's ``n`` real keys as ``(1 - s) a + s / n`` (Clark et al.
    use ``s = 1e-4`` to avoid ``log 0``), its entropy taken, and averaged over real queries.

    Args:
        attn: [layer, batch, head, query, key], padding zeroed.
        mask: [batch, pos], True on real tokens.
        smoothing: ``s`` in [0, 1).

    Returns:
        [layer, batch, head] mean row entropy; compare with the uniform entropy ``log n``.

    >>> import math
    >>> round(attention_entropy(torch.full((1, 1, 1, 4, 4), 0.25), torch.ones(1, 4).bool()).item() - math.log(4), 6)
    0.0
    """
    n = mask.sum(1).to(attn.dtype)  # [batch]
    keys = mask[None, :, None, None, :].to(attn.dtype)  # [1, batch, 1, 1, key]
    smoothed = (1 - smoothing) * attn + smoothing * keys / n[None, :, None, None, None]
    rows = -torch.special.xlogy(smoothed, smoothed).sum(-1)  # [layer, batch, head, query]
    queries = mask[None, :, None, :].to(attn.dtype)
    return (rows * queries).sum(-1) / n[None, :, None]


def head_scores(attn: Tensor, tokens: Sequence[Sequence[str]], *, pattern: str | Tensor = "previous") -> Tensor:
    """Score every head by how closely it follows an attention pattern.

    The score of a head is its attention mass on the pattern's target keys, averaged over the real
    query tokens of each sentence and then over sentences (Clark et al. §3 average per document).
    For ``"broad"`` it is the head's mean row entropy divided by the uniform entropy ``log n``
    (1 = attends uniformly), with Clark's smoothing.

    Args:
        attn: attention probabilities, [layer, batch, head, query, key], padding already masked.
        tokens: word pieces per sentence, used for token-based patterns and to find padding.
        pattern: one of :data:`PATTERNS`, or a [batch, query, key] matrix of weights of your own
            (e.g. 1 on a dependency's head word).

    Returns:
        [layer, head] scores.

    >>> eye = torch.eye(3)[None, None, None].expand(1, 1, 2, 3, 3).clone()
    >>> head_scores(eye, [["[CLS]", "a", "[SEP]"]], pattern="current")
    tensor([[1., 1.]])

    Introduced in nbs/04_head_specialisation.ipynb (Clark et al. 2019, §3).
    """
    attn = _check_attn(attn, tokens)
    width = attn.shape[-1]
    mask = _real_mask(tokens, width)  # [batch, pos]
    n = mask.sum(1).to(attn.dtype)  # [batch]
    if isinstance(pattern, str) and pattern == "broad":
        ent = attention_entropy(attn, mask)  # [layer, batch, head]
        uniform = torch.log(n).clamp_min(1e-12)[None, :, None]
        return (ent / uniform).mean(1)
    if isinstance(pattern, (Tensor, np.ndarray)):
        target = torch.as_tensor(pattern, dtype=attn.dtype)
        if target.shape != (attn.shape[1], width, width):
            raise ValueError(
                f"a pattern matrix must be [batch, query, key] = {(attn.shape[1], width, width)}, "
                f"got {tuple(target.shape)}"
            )
        mass = (attn * target[None, :, None]).sum(-1)  # [layer, batch, head, query]
    elif isinstance(pattern, str):
        mass = _pattern_mass(attn, tokens, pattern)
    else:
        raise ValueError(f"pattern must be a name from {PATTERNS} or a [batch, query, key] tensor, got {type(pattern)}")
    per_sentence = mass.sum(-1) / n[None, :, None]  # mean over real queries (padding rows are 0)
    return per_sentence.mean(1)


_OFFSETS = {"previous": -1, "current": 0, "next": 1}


def _pattern_mass(attn: Tensor, tokens: Sequence[Sequence[str]], pattern: str) -> Tensor:
    """[layer, batch, head, query] mass on a named pattern without building a [q, k] matrix:
    positional patterns are diagonals, token patterns a product with a [key] indicator."""
    width = attn.shape[-1]
    if pattern in _OFFSETS:
        o = _OFFSETS[pattern]
        diag = attn.diagonal(offset=o, dim1=-2, dim2=-1)  # [layer, batch, head, width - |o|]
        mass = torch.zeros(attn.shape[:-1], dtype=attn.dtype)
        if o <= 0:
            mass[..., -o:] = diag  # query q reads key q + o
        else:
            mass[..., : width - o] = diag
        return mass  # padding rows and columns are 0 in attn already
    if pattern == "first":
        return attn[..., 0].clone()
    if pattern in _TOKEN_PATTERNS:
        names = _TOKEN_PATTERNS[pattern]
        keys = torch.tensor([[t in names for t in toks] + [False] * (width - len(toks)) for toks in tokens])
        return (attn @ keys.to(attn.dtype)[None, :, None, :, None]).squeeze(-1)
    raise ValueError(f"unknown pattern {pattern!r}; use one of {PATTERNS} or pass a [batch, query, key] tensor")


def js_divergence(
    attn: Tensor, mask: Tensor, *, smoothing: float = JS_SMOOTHING, rows: Tensor | None = None
) -> tuple[Tensor, int]:
    """Summed Jensen–Shannon divergence between every pair of heads, over real query tokens.

    For heads ``i, j`` and each query token, ``JS(P_i, P_j) = H(M) - (H(P_i) + H(P_j)) / 2`` with
    ``M = (P_i + P_j) / 2`` and rows smoothed as ``(1 - s) p + s / n`` over the sentence's ``n``
    real keys (Clark et al. §6 and their head_distances.py, ``s = 1e-3``).

    Args:
        attn: [layer, batch, head, query, key], padding zeroed.
        mask: [batch, pos], True on real tokens.
        smoothing: ``s``.
        rows: optional [n] indices into the flattened real query rows (``batch * pos`` order,
            padding excluded) to use a sample of query tokens; all real rows by default.

    Returns:
        ``(total [layer*head, layer*head], n_queries)``; divide to get the mean per query token.
        Heads are flattened layer-major (index ``layer * n_heads + head``).

    >>> a = torch.stack([torch.eye(2), torch.full((2, 2), 0.5)])[None, None]  # one-hot head vs uniform head
    >>> total, n = js_divergence(a, torch.ones(1, 2).bool(), smoothing=0.0)
    >>> round(total[0, 1].item() / n, 4)  # H([.75, .25]) - (0 + log 2) / 2
    0.2158
    """
    n_layers, batch, n_heads, width, _ = attn.shape
    n = mask.sum(1).to(attn.dtype)
    keys = mask[None, :, None, None, :].to(attn.dtype)
    p = (1 - smoothing) * attn + smoothing * keys / n[None, :, None, None, None]
    p = p.permute(0, 2, 1, 3, 4).reshape(n_layers * n_heads, batch * width, width)  # [head, row, key]
    p = p[:, mask.flatten()]  # real query rows only  [head, row, key]
    if rows is not None:
        p = p[:, rows]
    ent = -torch.special.xlogy(p, p).sum(-1)  # [head, row]
    total = torch.zeros(n_layers * n_heads, n_layers * n_heads, dtype=torch.float64)
    for i in range(n_layers * n_heads - 1):
        m = (p[i] + p[i + 1 :]) / 2  # [other heads, row, key]
        h_m = -torch.special.xlogy(m, m).sum(-1)  # [other heads, row]
        js = (h_m - (ent[i] + ent[i + 1 :]) / 2).sum(-1).double()
        total[i, i + 1 :] = js
        total[i + 1 :, i] = js
    return total.clamp_min(0), p.shape[1]


class HeadStatistics:
    """Per-head statistics of Clark et al. §3 and §6, accumulated over a stream of batches.

    Every statistic is a per-sentence mean (over real query tokens) averaged over sentences, so
    batches of different widths combine exactly. Call :meth:`update` with each batch's attention and
    tokens, then :meth:`result`.

    Args:
        js_fraction: fraction of the real query tokens of each batch, drawn at random (seeded), on
            which to also accumulate Jensen–Shannon divergences between heads (Clark §6); 0 skips
            them. They cost ``O(heads^2)`` per token, far more than everything else.
        seed: seed of that draw.

    >>> stats = HeadStatistics()
    >>> stats.update(torch.eye(3)[None, None, None].expand(1, 1, 2, 3, 3), [["[CLS]", "a", "[SEP]"]])
    >>> stats.result()["current"]
    tensor([[1., 1.]])
    """

    SCORES = ("cls", "sep", "dot", "comma", "punct", "previous", "current", "next")

    def __init__(self, *, js_fraction: float = 0.0, seed: int = 0):
        if not 0.0 <= js_fraction <= 1.0:
            raise ValueError(f"js_fraction must lie in [0, 1], got {js_fraction}")
        self.js_fraction = js_fraction
        self.n_sentences = 0
        self._sums: dict[str, Tensor] = {}
        self._js = None
        self._js_rows = 0
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, attn: Tensor, tokens: Sequence[Sequence[str]]) -> None:
        """Add one batch: ``attn`` [layer, batch, head, query, key] (padding zeroed) and its word pieces."""
        attn = _check_attn(attn, tokens)
        mask = _real_mask(tokens, attn.shape[-1])
        batch = attn.shape[1]
        scores = {name: head_scores(attn, tokens, pattern=name) for name in self.SCORES}
        entropy = attention_entropy(attn, mask)  # [layer, batch, head]
        n = mask.sum(1).to(attn.dtype)
        scores["entropy"] = entropy.mean(1)
        scores["broad"] = (entropy / torch.log(n)[None, :, None]).mean(1)
        scores["uniform_entropy"] = torch.log(n).mean().expand(attn.shape[0], attn.shape[2])
        # [SEP] attending to [SEP] versus other tokens attending to [SEP] (Clark Fig. 2, middle)
        to_sep = _pattern_mass(attn, tokens, "sep")  # [layer, batch, head, query]
        is_sep = torch.tensor(
            [[t == "[SEP]" for t in toks] + [False] * (attn.shape[-1] - len(toks)) for toks in tokens]
        )
        others = (mask & ~is_sep).to(attn.dtype)  # [batch, query]
        n_sep = is_sep.sum(1).clamp_min(1)[None, :, None]  # [1, batch, 1]
        scores["sep_from_sep"] = ((to_sep * is_sep[None, :, None]).sum(-1) / n_sep).mean(1)
        scores["sep_from_others"] = ((to_sep * others[None, :, None]).sum(-1) / others.sum(-1)[None, :, None]).mean(1)
        for name, value in scores.items():
            self._sums[name] = self._sums.get(name, 0) + value.double() * batch
        self.n_sentences += batch
        if self.js_fraction > 0:
            n_rows = int(mask.sum())
            take = max(1, round(self.js_fraction * n_rows))
            rows = torch.randperm(n_rows, generator=self._generator)[:take].sort().values
            total, used = js_divergence(attn, mask, rows=rows)
            self._js = total if self._js is None else self._js + total
            self._js_rows += used

    def result(self) -> dict[str, Tensor]:
        """``name -> [layer, head]`` means over all sentences seen, plus ``"js"`` [layer*head, layer*head]
        (mean divergence per query token) when ``js_fraction > 0``."""
        if self.n_sentences == 0:
            raise ValueError("no batch seen yet: call update() with at least one batch")
        out = {name: (value / self.n_sentences).float() for name, value in self._sums.items()}
        if self._js is not None:
            out["js"] = (self._js / self._js_rows).float()
        return out


# ---------------------------------------------------------------------------------------------
# Word-level attention and dependency probing (Clark et al. §4.2)
# ---------------------------------------------------------------------------------------------


def parse_sentences(nlp, sentences: Sequence[str], *, batch_size: int = 64) -> list[dict]:
    """Silver dependency parses from a spaCy pipeline: words, 0-based head indices and labels.

    Whitespace tokens are dropped (BERT has no piece for them); an arc to a dropped token becomes
    a self-loop, i.e. is not scored.

    Args:
        nlp: a spaCy pipeline with a parser (``helpers.assets.spacy_pipeline()``).
        sentences: the texts.

    Returns:
        one ``{"words": [...], "heads": [...], "labels": [...]}`` per sentence (JSON-serialisable).
    """
    if isinstance(sentences, str) or len(sentences) == 0:
        raise ValueError("sentences must be a non-empty list of strings")
    parses = []
    disable = [p for p in ("ner", "lemmatizer") if p in nlp.pipe_names]
    for doc in nlp.pipe(sentences, batch_size=batch_size, disable=disable):
        kept = [t for t in doc if not t.is_space]
        new = {t.i: j for j, t in enumerate(kept)}
        parses.append(
            {
                "words": [t.text for t in kept],
                "heads": [new.get(t.head.i, j) for j, t in enumerate(kept)],
                "labels": [t.dep_ for t in kept],
            }
        )
    return parses


def align_words(tokenizer, words: Sequence[Sequence[str]], *, max_length: int = 64) -> Tensor:
    """Word index of every word piece when sentences are given as lists of words.

    The layout is the one of :func:`word_attention`: ``[CLS]`` is word 0, the sentence's words are
    1..n, ``[SEP]`` is n + 1 (n counts the words that survive truncation), padding is -1. Pieces
    come from ``tokenizer(words, is_split_into_words=True)``, exactly as :func:`iter_attention`
    tokenises lists of words, so the alignment is exact (no character arithmetic).

    Args:
        tokenizer: a fast Hugging Face tokenizer (``word_ids`` needed).
        words: one list of words per sentence (e.g. spaCy tokens).
        max_length: truncation length, as in :func:`iter_attention`.

    Returns:
        [batch, pos] long, padded with -1 to the longest sentence.
    """
    if isinstance(words, str) or len(words) == 0 or any(isinstance(w, str) or len(w) == 0 for w in words):
        raise ValueError("words must be a non-empty list of non-empty lists of words")
    enc = tokenizer([list(w) for w in words], truncation=True, max_length=max_length, is_split_into_words=True)
    rows = []
    for b in range(len(words)):
        ids = enc.word_ids(b)
        last = max(i for i in ids if i is not None)
        rows.append([(0 if p == 0 else last + 2) if i is None else i + 1 for p, i in enumerate(ids)])
    width = max(map(len, rows))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


def word_attention(attn: Tensor, word_index: Tensor) -> Tensor:
    """Convert word-piece attention to word attention (Clark et al. §4.1).

    Attention *to* a word is the sum over its pieces; attention *from* a word is the mean over its
    pieces. Both are linear, so ``W = S_mean A S_sum^T`` with ``S`` the [word, piece] membership
    matrix; rows of real words still sum to 1.

    Args:
        attn: [layer, batch, head, query, key] word-piece attention, padding zeroed.
        word_index: [batch, pos] word of each piece (-1 on padding), e.g. from :func:`align_words`.

    Returns:
        [layer, batch, head, word, word], zero rows and columns beyond each sentence's words.

    >>> a = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [0.0, 1.0, 0.0]])[None, None, None]
    >>> word_attention(a, torch.tensor([[0, 1, 1]]))[0, 0, 0]   # pieces 1 and 2 form word 1
    tensor([[0.5000, 0.5000],
            [0.1000, 0.9000]])
    """
    attn = _check_attn(attn)
    if word_index.shape != attn.shape[1:2] + attn.shape[-1:]:
        raise ValueError(
            f"word_index must be [batch, pos] = {(attn.shape[1], attn.shape[-1])}, got {tuple(word_index.shape)}"
        )
    n_words = int(word_index.max()) + 1
    member = (word_index[:, None, :] == torch.arange(n_words)[None, :, None]).to(attn.dtype)  # [batch, word, pos]
    mean = member / member.sum(-1, keepdim=True).clamp_min(1)
    from_words = torch.einsum("bwp,lbhpk->lbhwk", mean, attn)
    return torch.einsum("lbhwk,bvk->lbhwv", from_words, member)


def head_predictions(word_attn: Tensor, n_words: Tensor, *, direction: str = "dep->head") -> Tensor:
    """Each word's predicted syntactic head: the word it attends to most (or that attends to it most).

    As in Clark et al.'s code, attention to itself and to ``[CLS]``/``[SEP]`` is ignored, so the
    prediction is always another word of the sentence.

    Args:
        word_attn: [layer, batch, head, word, word] from :func:`word_attention` (``[CLS]`` = word 0).
        n_words: [batch] number of real words (the layout's words 1..n).
        direction: ``"dep->head"`` (the dependent attends to its head: argmax of its row) or
            ``"head->dep"`` (the head attends to its dependent: argmax of the dependent's column).

    Returns:
        [layer, batch, head, word] long predicted head index in the same word layout.
    """
    if direction not in ("dep->head", "head->dep"):
        raise ValueError(f"direction must be 'dep->head' or 'head->dep', got {direction!r}")
    scores = word_attn if direction == "dep->head" else word_attn.transpose(-1, -2)
    width = scores.shape[-1]
    pos = torch.arange(width)
    content = (pos[None, :] >= 1) & (pos[None, :] <= n_words[:, None])  # [batch, word]
    allowed = content[:, None, :] & (pos[:, None] != pos[None, :])[None]  # [batch, query, key]
    return scores.masked_fill(~allowed[None, :, None], -1.0).argmax(-1)


class RelationProbe:
    """Accuracy of every head at finding each word's syntactic head, per relation (Clark Table 1).

    For every dependent of relation ``r`` (word ``d`` with gold head ``g``), a head of the model is
    correct in direction ``dep->head`` when ``d`` attends most to ``g``, and in ``head->dep`` when
    ``g`` is the word that attends most to ``d`` (Clark's "transpose" mode). The fixed-offset baseline predicts
    ``g = d + o`` for the best constant offset ``o`` of each relation.

    Args:
        relations: relation labels to score (others are ignored, except in ``"all"``).
        offsets: candidate offsets of the baseline.

    Call :meth:`update` per batch, then :meth:`table`.
    """

    def __init__(self, relations: Sequence[str], *, offsets: Sequence[int] = (-5, -4, -3, -2, -1, 1, 2, 3, 4, 5)):
        if len(relations) == 0:
            raise ValueError("give at least one relation label, e.g. ['det', 'dobj']")
        self.relations = list(relations)
        self.offsets = list(offsets)
        self._index = {r: i for i, r in enumerate(self.relations)}
        self.correct = {d: 0 for d in ("dep->head", "head->dep")}
        self.baseline = torch.zeros(len(self.offsets), len(self.relations) + 1, dtype=torch.long)
        self.total = torch.zeros(len(self.relations) + 1, dtype=torch.long)

    def update(self, word_attn: Tensor, gold_heads: Tensor, labels: Sequence[Sequence[str]], n_words: Tensor) -> None:
        """Add one batch.

        Args:
            word_attn: [layer, batch, head, word, word] word attention (layout of :func:`align_words`).
            gold_heads: [batch, word] gold head of each word in the same layout, -1 when there is
                no arc to score (``[CLS]``/``[SEP]``, the root, words cut by truncation, padding).
            labels: relation label of words 1..n of each sentence.
            n_words: [batch] real words per sentence (after truncation).
        """
        batch, width = gold_heads.shape
        if word_attn.shape[1] != batch or word_attn.shape[-1] != width:
            raise ValueError(f"gold_heads {tuple(gold_heads.shape)} does not match word_attn {tuple(word_attn.shape)}")
        rel = torch.full((batch, width), -1, dtype=torch.long)  # relation id; len(relations) = other
        for b, labs in enumerate(labels):
            for w in range(1, int(n_words[b]) + 1):
                rel[b, w] = self._index.get(labs[w - 1], len(self.relations))
        scored = (gold_heads >= 0) & (rel >= 0)
        onehot = torch.zeros(batch, width, len(self.relations) + 1)
        onehot[scored] = torch.nn.functional.one_hot(rel[scored], len(self.relations) + 1).float()
        self.total += onehot.sum((0, 1)).long()
        for direction in self.correct:
            pred = head_predictions(word_attn, n_words, direction=direction)  # [layer, batch, head, word]
            hit = (pred == gold_heads[None, :, None]).float()
            self.correct[direction] = (
                self.correct[direction] + torch.einsum("lbhw,bwr->lhr", hit, onehot).round().long()
            )
        pos = torch.arange(width)
        for i, o in enumerate(self.offsets):
            hit = (pos[None, :] + o == gold_heads).float()  # [batch, word]
            self.baseline[i] += torch.einsum("bw,bwr->r", hit, onehot).round().long()

    def accuracy(self, direction: str = "dep->head") -> Tensor:
        """[layer, head, relation + "all"] accuracy of every head."""
        correct = self.correct[direction]
        if isinstance(correct, int):
            raise ValueError("no batch seen yet: call update() first")
        per_rel = correct.float() / self.total.clamp_min(1)
        all_rel = correct.sum(-1).float() / self.total.sum().clamp_min(1)
        return torch.cat([per_rel[..., : len(self.relations)], all_rel[..., None]], dim=-1)

    def table(self):
        """One row per relation (and ``"all"``): count, best head and direction, its accuracy, the
        best offset and its accuracy. Layers and heads are numbered from 1, as in the paper."""
        import pandas as pd

        accs = {d: self.accuracy(d) for d in self.correct}  # [layer, head, rel + all]
        base = self.baseline.float() / self.total.clamp_min(1)
        base = torch.cat(
            [base[:, : len(self.relations)], (self.baseline.sum(1) / self.total.sum()).float()[:, None]], 1
        )
        rows = []
        counts = [*self.total[: len(self.relations)].tolist(), int(self.total.sum())]
        for r, name in enumerate([*self.relations, "all"]):
            best = max(((accs[d][:, :, r].max().item(), d) for d in accs), key=lambda t: t[0])
            layer, head = np.unravel_index(int(accs[best[1]][:, :, r].argmax()), accs[best[1]].shape[:2])
            o = int(base[:, r].argmax())
            rows.append(
                {
                    "relation": name,
                    "count": counts[r],
                    "best head": f"L{layer + 1}·H{head + 1}",
                    "direction": best[1],
                    "accuracy": best[0],
                    "best offset": self.offsets[o],
                    "offset accuracy": base[o, r].item(),
                }
            )
        return pd.DataFrame(rows).set_index("relation")


# ---------------------------------------------------------------------------------------------
# Ablation: masking heads and layers
# ---------------------------------------------------------------------------------------------


def _layers(model: nn.Module):
    try:
        return model.encoder.layer
    except AttributeError as err:
        raise ValueError(
            "model must be a BERT-like encoder with model.encoder.layer[i].attention.output.dense"
        ) from err


def _hidden_states_and_mask(model: nn.Module, layers, enc) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """Every hidden state of one forward pass, and ``{"mask": ...}``, the attention mask as the first layer
    receives it (so that layers can be re-run one by one on the hidden states)."""
    seen: dict[str, Tensor] = {}

    def grab_mask(_module, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    with hooks.on_modules([(layers[0], "input_kwargs", grab_mask)]), torch.inference_mode():
        hidden = model(**enc, output_hidden_states=True).hidden_states  # (layer + 1) x [batch, pos, d]
    return hidden, seen


@contextlib.contextmanager
def head_mask(model: nn.Module, keep: Tensor) -> Iterator[None]:
    """Mask attention heads inside the block: their output is zeroed before the output projection.

    Equivalent to the ``head_mask`` argument older versions of transformers offered (which multiplied
    each head's attention probabilities by 0 or 1): a head's context vector ``A^h V^h`` is scaled by
    ``keep[layer, head]``. Implemented as :func:`helpers.hooks.patch` of each layer's
    ``attn.hook_z`` (the input of the output projection ``attention.output.dense``), always removed on exit.

    Args:
        model: a BERT-like encoder.
        keep: [layer, head] of 1 (keep) / 0 (ablate); fractional values scale the head.

    >>> from transformers import BertConfig, BertModel
    >>> tiny = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8))
    >>> with head_mask(tiny, torch.tensor([[1.0, 0.0]])):
    ...     pass
    >>> len(tiny.encoder.layer[0].attention.output.dense._forward_pre_hooks)
    0
    """
    layers = _layers(model)
    n_heads = model.config.num_attention_heads
    if keep.shape != (len(layers), n_heads):
        raise ValueError(f"keep must be [layer, head] = {(len(layers), n_heads)}, got {tuple(keep.shape)}")

    def scale_for(layer_keep: Tensor):
        def scale(z: Tensor) -> Tensor:  # [batch, pos, head, d_head]
            return z * layer_keep.to(z)[:, None]

        return scale

    with hooks.patches(
        hooks.patch(model, f"blocks.{layer}.attn.hook_z", fn=scale_for(layer_keep))
        for layer, layer_keep in enumerate(keep)
        if bool((layer_keep != 1).any())
    ):
        yield


def ablated_embeddings(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    keep: Tensor,
    *,
    max_length: int = 64,
    batch_size: int = 64,
) -> Tensor:
    """Mean-pooled sentence embeddings under several head masks, reusing the unablated lower layers.

    Masking a head of layer ``l`` changes nothing below ``l``, so each batch is run once with its
    hidden states kept, and every mask restarts from the hidden state entering its first masked
    layer: on average this halves the cost of ablating every head of a 6-layer model.

    Args:
        model, tokenizer: a BERT-like encoder and its tokenizer.
        texts: the sentences or passages.
        keep: [config, layer, head] masks (1 keep, 0 ablate); an all-ones mask gives the unablated model.
        max_length, batch_size: tokenisation and batching.

    Returns:
        [config, text, d] mean-pooled last hidden states (as MiniLM embeds sentences, not normalised).
    """
    layers = _layers(model)
    if keep.ndim != 3 or keep.shape[1:] != (len(layers), model.config.num_attention_heads):
        raise ValueError(
            f"keep must be [config, layer, head] with {len(layers)} layers and "
            f"{model.config.num_attention_heads} heads, got {tuple(keep.shape)}"
        )
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    device = next(model.parameters()).device
    first = [int((k != 1).any(1).float().argmax()) if bool((k != 1).any()) else len(layers) for k in keep]

    out = torch.zeros(len(keep), len(texts), model.config.hidden_size)
    for start, enc in encode_batches(tokenizer, texts, batch_size=batch_size, max_length=max_length, device=device):
        weights = enc["attention_mask"][..., None].float()  # [batch, pos, 1]
        hidden, seen = _hidden_states_and_mask(model, layers, enc)
        for c, (k, lo) in enumerate(zip(keep, first, strict=True)):
            h = hidden[lo]
            with torch.inference_mode(), head_mask(model, k):
                for layer in layers[lo:]:
                    h = layer(h, seen["mask"])
                    h = h[0] if isinstance(h, tuple) else h
            out[c, start : start + len(enc["input_ids"])] = ((h * weights).sum(1) / weights.sum(1)).cpu()
    return out


def gold_heads(
    heads: Sequence[Sequence[int]],
    labels: Sequence[Sequence[str]],
    n_words: Tensor,
    width: int,
    *,
    skip: Sequence[str] = ("punct", "ROOT"),
) -> Tensor:
    """Gold head of every word in the layout of :func:`align_words`, -1 where no arc is scored.

    Args:
        heads: per sentence, the 0-based index of each word's head (a root points to itself, as in spaCy).
        labels: per sentence, each word's relation label.
        n_words: [batch] words kept after truncation; arcs to or from a cut word are not scored.
        width: number of word slots (``word_attn.shape[-1]``).
        skip: labels never scored (punctuation and the root, as in Clark et al.'s Table 1).

    Returns:
        [batch, width] long.

    >>> gold_heads([[1, 1, 1]], [["det", "ROOT", "punct"]], torch.tensor([3]), 5)
    tensor([[-1,  2, -1, -1, -1]])
    """
    out = torch.full((len(heads), width), -1, dtype=torch.long)
    for b, (hs, labs) in enumerate(zip(heads, labels, strict=True)):
        n = int(n_words[b])
        for w, (h, lab) in enumerate(zip(hs[:n], labs[:n], strict=True)):
            if h != w and h < n and lab not in skip:
                out[b, w + 1] = h + 1
    return out


def row_sums_ok(attn: Tensor, mask: Tensor) -> bool:
    """True when every real query row sums to 1 and every padding row to 0 (within ``ROW_TOL``)."""
    sums = attn.sum(-1)  # [layer, batch, head, query]
    target = mask[None, :, None, :].to(sums.dtype)
    return bool(((sums - target).abs() <= ROW_TOL).all())


# ---------------------------------------------------------------------------------------------
# Held-out selection of the best head per relation (Clark Table 1 without selection bias)
# ---------------------------------------------------------------------------------------------

CLARK_OFFSETS = (-3, -2, -1, 0, 1, 2)
"""The fixed offsets of Clark et al.'s baseline (``range(-3, 3)`` in their Syntax_Analysis notebook;
offset 0 points at the word itself and is never right)."""

POSSESSIVE_MARKERS = ("'s", "s'", "’s", "s’")


class ArcRecords:
    """Per-dependent outcomes of every (head, direction) and every offset, for held-out selection.

    :class:`RelationProbe` only keeps counts, so the best head of a relation is chosen and scored on
    the same sentences. ``ArcRecords`` keeps, for every scored dependent, whether each of the
    ``layer x head x 2`` attention predictors and each fixed offset found its gold head, with the
    sentence it comes from, so that :meth:`table` can pick the best option on one set of sentences
    and report it on another (``helpers.stats.select_then_report``).

    Clark et al.'s special case for possessives is applied when ``possessive=True``: for a ``poss``
    dependent followed by ``'s``, the prediction made *from the* ``'s`` token is scored instead (in
    their trees and in spaCy's, ``'s`` sits between the possessor and the possessed noun).
    The offset baseline predicts word ``d + o`` clipped to the sentence, as in their code.

    Args:
        relations: relation labels to keep (others count only in ``"all"``).
        offsets: offsets of the baseline (Clark's -3..+2 by default).
        possessive: apply the possessive special case (to heads and offsets alike, as Clark does).

    Call :meth:`update` per batch, then :meth:`table` or :meth:`outcomes`.
    """

    DIRECTIONS = ("dep->head", "head->dep")

    def __init__(self, relations: Sequence[str], *, offsets: Sequence[int] = CLARK_OFFSETS, possessive: bool = True):
        if len(relations) == 0:
            raise ValueError("give at least one relation label, e.g. ['det', 'dobj']")
        self.relations = list(relations)
        self.offsets = list(offsets)
        self.possessive = possessive
        self._index = {r: i for i, r in enumerate(self.relations)}
        self._parts: dict[str, list[Tensor]] = {
            k: [] for k in ("dep->head", "head->dep", "offset", "rel", "sentence", "word")
        }
        self.shape: tuple[int, int] | None = None

    def update(
        self,
        word_attn: Tensor,
        gold: Tensor,
        words: Sequence[Sequence[str]],
        labels: Sequence[Sequence[str]],
        n_words: Tensor,
        sentence_ids: Sequence[int],
    ) -> None:
        """Add one batch.

        Args:
            word_attn: [layer, batch, head, word, word] (layout of :func:`align_words`).
            gold: [batch, word] gold heads from :func:`gold_heads` (-1: not scored).
            words, labels: the words and relation labels of each sentence (words 1..n of the layout).
            n_words: [batch] words kept after truncation.
            sentence_ids: [batch] index of each sentence in the corpus (the unit of the split).
        """
        n_layers, batch, n_heads, width, _ = word_attn.shape
        if gold.shape != (batch, width) or len(labels) != batch or len(words) != batch or len(sentence_ids) != batch:
            raise ValueError(
                f"gold {tuple(gold.shape)}, words, labels and sentence_ids must describe the batch of "
                f"word_attn {tuple(word_attn.shape)}"
            )
        self.shape = (n_layers, n_heads)
        source = torch.arange(width)[None, :].repeat(batch, 1)  # [batch, word] whose prediction is scored
        rel = torch.full((batch, width), -1, dtype=torch.long)
        for b in range(batch):
            n = int(n_words[b])
            for w in range(1, n + 1):
                rel[b, w] = self._index.get(labels[b][w - 1], len(self.relations))
                if (
                    self.possessive
                    and labels[b][w - 1] == "poss"
                    and w < n
                    and words[b][w].lower() in POSSESSIVE_MARKERS
                ):
                    source[b, w] = w + 1  # score the 's token's prediction (Clark's special case)
        keep = gold >= 0  # [batch, word]
        b_idx, w_idx = keep.nonzero(as_tuple=True)
        src = source[b_idx, w_idx]
        target = gold[b_idx, w_idx]
        for direction in self.DIRECTIONS:
            pred = head_predictions(word_attn, n_words, direction=direction)  # [layer, batch, head, word]
            hit = pred.permute(1, 3, 0, 2)[b_idx, src] == target[:, None, None]  # [dep, layer, head]
            self._parts[direction].append(hit.reshape(len(b_idx), -1))  # [dep, layer*head]
        n = n_words[b_idx]
        offset_pred = (src[:, None] + torch.tensor(self.offsets)[None, :]).clamp(min=torch.zeros_like(n)[:, None],
                                                                                  max=n[:, None])
        self._parts["offset"].append(offset_pred == target[:, None])  # [dep, offset]
        self._parts["rel"].append(rel[b_idx, w_idx])
        self._parts["sentence"].append(torch.as_tensor(list(sentence_ids))[b_idx])
        self._parts["word"].append(w_idx)

    def outcomes(self) -> dict[str, np.ndarray]:
        """``{"dep->head", "head->dep": [dep, layer*head] bool, "offset": [dep, offset] bool,
        "rel": [dep] relation id (len(relations) = other), "sentence": [dep], "word": [dep] position
        of the dependent in the layout (1 = first word)}``."""
        if not self._parts["rel"]:
            raise ValueError("no batch seen yet: call update() first")
        return {k: torch.cat(v).numpy() for k, v in self._parts.items()}

    def state(self) -> dict:
        """A compact, picklable copy (bits packed) for a cached artefact; see :meth:`from_state`."""
        out = self.outcomes()
        packed = {k: (np.packbits(v, axis=-1), v.shape[-1]) for k, v in out.items() if v.dtype == bool}
        return {"relations": self.relations, "offsets": self.offsets, "possessive": self.possessive,
                "shape": self.shape, "packed": packed, "rel": out["rel"], "sentence": out["sentence"],
                "word": out["word"]}

    @classmethod
    def from_state(cls, state: dict) -> ArcRecords:
        """Rebuild the records saved by :meth:`state`."""
        rec = cls(state["relations"], offsets=state["offsets"], possessive=state["possessive"])
        rec.shape = tuple(state["shape"])
        for k, (bits, count) in state["packed"].items():
            rec._parts[k] = [torch.from_numpy(np.unpackbits(bits, axis=-1, count=count).astype(bool))]
        rec._parts["rel"] = [torch.from_numpy(state["rel"])]
        rec._parts["sentence"] = [torch.from_numpy(state["sentence"])]
        rec._parts["word"] = [torch.from_numpy(state["word"])]
        return rec

    def _options(self, out: dict, rows: np.ndarray) -> dict:
        n_layers, n_heads = self.shape
        options = {}
        for direction in self.DIRECTIONS:
            for k in range(n_layers * n_heads):
                options[(direction, k // n_heads, k % n_heads)] = out[direction][rows, k]
        return options

    def table(self, select: Sequence[int], report: Sequence[int], *, n_resamples: int = 2000, seed: int = 0):
        """Best head and best offset per relation, chosen on the ``select`` sentences and reported,
        with 95 % bootstrap intervals, on the ``report`` sentences. The intervals resample whole
        sentences (a cluster bootstrap): the dependents of one sentence are not independent.

        Args:
            select, report: disjoint sentence ids (e.g. from ``helpers.stats.split_indices``).
            n_resamples, seed: of the bootstrap.

        Returns:
            DataFrame indexed by relation (and ``"all"``): ``count`` (report dependents), ``best head``
            (``L{layer}·H{head}``, from 1), ``direction``, ``selection accuracy`` (its accuracy on the
            select half), ``selection gain`` (its margin over the best offset there), ``accuracy``
            (:class:`~helpers.stats.Estimate` on the report half),
            ``in-sample best`` (the best option's accuracy when chosen on the report half itself, the
            optimistic number), ``best offset``, ``offset accuracy`` (Estimate, offset also chosen on
            the select half) and ``gain`` (paired bootstrap Estimate of head − offset on the report half).
        """
        import pandas as pd

        from helpers import stats

        out = self.outcomes()
        select_set, report_set = set(map(int, select)), set(map(int, report))
        if select_set & report_set:
            raise ValueError("select and report sentences overlap: held-out selection needs disjoint sets")
        in_select = np.isin(out["sentence"], list(select_set))
        in_report = np.isin(out["sentence"], list(report_set))
        rows = []
        for r, name in enumerate([*self.relations, "all"]):
            is_rel = np.ones_like(in_select) if name == "all" else out["rel"] == r
            sel, rep = np.flatnonzero(is_rel & in_select), np.flatnonzero(is_rel & in_report)
            if sel.size < 2 or rep.size < 2:
                continue
            sentences = out["sentence"][rep]  # the report dependents' sentences: the bootstrap's groups
            chosen = stats.select_then_report(self._options(out, sel), self._options(out, rep),
                                              n_resamples=n_resamples, seed=seed, groups=sentences)
            offsets_sel = {o: out["offset"][sel, i] for i, o in enumerate(self.offsets)}
            offsets_rep = {o: out["offset"][rep, i] for i, o in enumerate(self.offsets)}
            base = stats.select_then_report(offsets_sel, offsets_rep, n_resamples=n_resamples, seed=seed,
                                            groups=sentences)
            head_hits = self._options(out, rep)[chosen.key]
            in_sample = max(float(v.mean()) for v in self._options(out, rep).values())
            direction, layer, head = chosen.key
            rows.append(
                {
                    "relation": name,
                    "count": int(rep.size),
                    "best head": f"L{layer + 1}·H{head + 1}",
                    "direction": direction,
                    "selection accuracy": chosen.select_score,
                    "selection gain": chosen.select_score - base.select_score,
                    "accuracy": chosen.report,
                    "in-sample best": in_sample,
                    "best offset": int(base.key),
                    "offset accuracy": base.report,
                    "gain": stats.paired_difference(head_hits, offsets_rep[base.key], n_resamples=n_resamples,
                                                    seed=seed, groups=sentences),
                }
            )
        return pd.DataFrame(rows).set_index("relation")


# ---------------------------------------------------------------------------------------------
# Attention-based probing classifier (Clark et al. §5, the "Attn" probe of their Table 3)
# ---------------------------------------------------------------------------------------------


def arc_features(word_attn: Tensor, n_words: Tensor) -> list[Tensor]:
    """Both directions of every head's word attention, per sentence, for :class:`AttentionParser`.

    Args:
        word_attn: [layer, batch, head, word, word] (layout of :func:`align_words`: ``[CLS]`` = 0,
            words 1..n, ``[SEP]`` = n + 1).
        n_words: [batch] real words per sentence.

    Returns:
        one ``[n, n + 2, 2 * layer * head]`` tensor per sentence: row ``d`` is dependent word
        ``d + 1``; column ``c`` is candidate ``c`` of the layout (0 = ``[CLS]``, ``n + 1`` = ``[SEP]``);
        features ``A_k[d, c]`` for the heads ``k``, then ``A_k[c, d]`` (Clark's "transpose").
    """
    n_layers, batch, n_heads = word_attn.shape[:3]
    if n_words.shape != (batch,):
        raise ValueError(f"n_words must be [batch] = ({batch},), got {tuple(n_words.shape)}")
    maps = word_attn.permute(1, 0, 2, 3, 4).reshape(batch, n_layers * n_heads, *word_attn.shape[-2:])
    feats = []
    for b in range(batch):
        n = int(n_words[b])
        a = maps[b, :, : n + 2, : n + 2]  # [map, word, word]
        both = torch.cat([a, a.transpose(-1, -2)], 0)  # [2 * map, word, word]
        feats.append(both[:, 1 : n + 1].permute(1, 2, 0).contiguous())  # [dep, candidate, 2 * map]
    return feats


def parser_targets(heads: Sequence[int], labels: Sequence[str], n: int) -> Tensor:
    """Gold candidate of each of the first ``n`` words for :class:`AttentionParser`: 0 for the root,
    ``h + 1`` for word ``h``, -1 when the head was cut by truncation (spaCy roots point to themselves).

    >>> parser_targets([1, 1, 1], ["det", "ROOT", "punct"], 3)
    tensor([2, 0, 2])
    """
    out = []
    for w, (h, lab) in enumerate(zip(heads[:n], labels[:n], strict=True)):
        out.append(0 if (h == w or lab == "ROOT") else (h + 1 if h < n else -1))
    return torch.tensor(out, dtype=torch.long)


class AttentionParser(nn.Module):
    """Clark et al.'s attention-only probing classifier: a linear combination of attention maps.

    The score of candidate head ``i`` for dependent ``j`` is ``sum_k w_k a^k_ji + u_k a^k_ij`` over
    the heads ``k``; the root's score uses the attention to ``[CLS]`` and ``[SEP]``,
    ``s * score(j, [CLS]) + e * score(j, [SEP])`` with two more learned scalars (their
    ``ROOT_start`` / ``ROOT_end``). A softmax over the root and the sentence's words gives
    ``p(head | dependent)``.

    Args:
        n_features: ``2 * layers * heads`` (both directions of every head).

    >>> parser = AttentionParser(2)
    >>> feats = torch.zeros(1, 3, 2); feats[0, 2, 0] = 1.0   # one dependent, candidates [CLS], w1, [SEP]
    >>> with torch.no_grad():
    ...     parser.weight[0] = 5.0
    >>> parser(feats).shape   # root + 1 word
    torch.Size([1, 2])
    """

    def __init__(self, n_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_features))
        self.root = nn.Parameter(torch.ones(2))

    def forward(self, feats: Tensor) -> Tensor:
        """``feats`` [dep, n + 2, features] of one sentence -> logits [dep, 1 + n] (0 = root)."""
        scores = feats.float() @ self.weight  # [dep, n + 2]
        root = self.root[0] * scores[:, 0] + self.root[1] * scores[:, -1]
        return torch.cat([root[:, None], scores[:, 1:-1]], 1)

    def fit(self, feats: Sequence[Tensor], targets: Sequence[Tensor], *, epochs: int = 30, lr: float = 0.01,
            seed: int = 0) -> list[float]:
        """Train with Adam on whole sentences (the sum of the dependents' cross-entropies, as Clark et
        al., over ``epochs`` passes in a seeded random order). Returns the mean loss per epoch."""
        if len(feats) != len(targets) or len(feats) == 0:
            raise ValueError("feats and targets must be non-empty lists of the same length (one per sentence)")
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        history = []
        n_deps = sum(int((t >= 0).sum()) for t in targets)
        for _ in range(epochs):
            total = 0.0
            for i in torch.randperm(len(feats), generator=gen).tolist():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(self(feats[i]), targets[i], ignore_index=-1, reduction="sum")
                loss.backward()
                opt.step()
                total += float(loss.detach())
            history.append(total / max(n_deps, 1))
        return history

    @torch.no_grad()
    def predict(self, feats: Tensor) -> Tensor:
        """[dep] predicted head: 0 = root, ``i`` = word ``i`` (1-based)."""
        return self(feats).argmax(-1)


# ---------------------------------------------------------------------------------------------
# Downstream probes under ablation: per-example outcomes, so that effects get intervals
# ---------------------------------------------------------------------------------------------


def bigram_shift(sentences: Sequence[str], *, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Conneau et al.'s (2018) bigram-shift probing task: every second sentence gets two adjacent
    words swapped, and the label says which (1 = shifted).

    Words are split on whitespace; the swapped pair never includes the last word (so sentence-final
    punctuation stays in place) and never consists of two equal words.

    >>> texts, y = bigram_shift(["the cat sat on the mat .", "a dog ran home today ."], seed=0)
    >>> y.tolist(), texts[0]
    ([0, 1], 'the cat sat on the mat .')
    """
    if isinstance(sentences, str) or len(sentences) == 0:
        raise ValueError("sentences must be a non-empty list of strings")
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i, sentence in enumerate(sentences):
        words = sentence.split()
        shift = i % 2 == 1
        if shift:
            if len(words) < 3:
                raise ValueError(f"sentence {i} has {len(words)} words; bigram shift needs at least 3")
            choices = [j for j in range(len(words) - 2) if words[j] != words[j + 1]]
            j = int(rng.choice(choices)) if choices else 0
            words[j], words[j + 1] = words[j + 1], words[j]
        texts.append(" ".join(words))
        labels.append(int(shift))
    return texts, np.array(labels)


def probe_under_ablation(
    model: nn.Module,
    tokenizer,
    train_texts: Sequence[str],
    y_train,
    test_texts: Sequence[str],
    y_test,
    keep: Tensor,
    *,
    max_length: int = 64,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Per-example outcomes of a frozen linear probe when heads are masked.

    A logistic regression is trained on the normalised mean-pooled embeddings of the unablated
    model (``train_texts``) and left unchanged; each mask of ``keep`` is then applied to the test
    passages (:func:`ablated_embeddings`) and every test example's correctness and cross-entropy
    recorded, so that differences between masks can be given paired intervals over examples.

    Args:
        model, tokenizer: a BERT-like encoder and its tokenizer.
        train_texts, y_train: the probe's training data (integer classes).
        test_texts, y_test: the held-out examples.
        keep: [config, layer, head] masks (1 keep, 0 ablate).
        max_length, batch_size: tokenisation and batching.

    Returns:
        ``{"correct": [config, text] bool, "loss": [config, text] float32, "cos": [config, text]
        float32 (cosine to the unablated embedding), "base_correct", "base_loss": [text] of the
        unablated model, "train_accuracy": float, "coef": [class, d], "intercept": [class]}``.
    """
    from sklearn.linear_model import LogisticRegression

    layers = _layers(model)
    ones = torch.ones(1, len(layers), model.config.num_attention_heads)
    if keep.ndim != 3 or keep.shape[1:] != ones.shape[1:]:
        raise ValueError(
            f"keep must be [config, layer, head] = [*, {ones.shape[1]}, {ones.shape[2]}], got {tuple(keep.shape)}"
        )
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if len(y_train) != len(train_texts) or len(y_test) != len(test_texts):
        raise ValueError("each text needs one label: len(y_train) == len(train_texts), len(y_test) == len(test_texts)")
    train = nn.functional.normalize(
        ablated_embeddings(model, tokenizer, train_texts, ones, max_length=max_length, batch_size=batch_size)[0], dim=-1
    )
    clf = LogisticRegression(max_iter=5000).fit(train.numpy(), y_train)
    test = ablated_embeddings(model, tokenizer, test_texts, torch.cat([ones, keep.float()]), max_length=max_length,
                              batch_size=batch_size)  # [1 + config, text, d]
    cos = nn.functional.cosine_similarity(test, test[:1], dim=-1)  # [1 + config, text]
    w = torch.tensor(clf.coef_, dtype=torch.float32)
    b = torch.tensor(clf.intercept_, dtype=torch.float32)
    if w.shape[0] == 1:  # binary: sklearn keeps one row; make it a two-class softmax
        w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
    logits = nn.functional.normalize(test, dim=-1) @ w.T + b  # [1 + config, text, class]
    y = torch.as_tensor(y_test, dtype=torch.long)
    loss = nn.functional.cross_entropy(logits.permute(0, 2, 1), y[None].expand(len(logits), -1), reduction="none")
    correct = logits.argmax(-1) == y[None]
    return {
        "correct": correct[1:].numpy(),
        "loss": loss[1:].numpy().astype(np.float32),
        "cos": cos[1:].numpy().astype(np.float32),
        "base_correct": correct[0].numpy(),
        "base_loss": loss[0].numpy().astype(np.float32),
        "train_accuracy": float(clf.score(train.numpy(), y_train)),
        "coef": w.numpy(),
        "intercept": b.numpy(),
    }


HEAD_POSITIONS = ("root", "<=-3", "-2", "-1", "+1", "+2", ">=+3")
"""Classes of :func:`head_positions`: where a word's syntactic head sits relative to it."""


def head_positions(
    heads: Sequence[int], labels: Sequence[str], n: int, *, skip: Sequence[str] = ("punct",)
) -> list[int]:
    """Class (index into :data:`HEAD_POSITIONS`) of the relative position of each word's head.

    Args:
        heads, labels: one sentence's 0-based heads (a root points to itself) and relation labels.
        n: words kept after truncation; a word whose head was cut gets -1.
        skip: labels not scored (-1), punctuation by default as in attachment scores.

    >>> head_positions([1, 1, 1, 0], ["det", "ROOT", "punct", "dep"], 4)
    [4, 0, -1, 1]
    """
    out = []
    for w, (h, lab) in enumerate(zip(heads[:n], labels[:n], strict=True)):
        if lab in skip or h >= n:
            out.append(-1)
        elif h == w or lab == "ROOT":
            out.append(0)
        else:
            d = h - w
            out.append({-2: 2, -1: 3, 1: 4, 2: 5}.get(d, 1 if d < 0 else 6))
    return out


def neighbour_classes(
    labels: Sequence[str], n: int, *, offset: int, classes: Sequence[str], skip: Sequence[str] = ("punct",)
) -> list[int]:
    """Class of the relation label of the word ``offset`` places away, for each of the first ``n`` words.

    A probe that reads the *previous* word's relation (``offset=-1``) from a word's own vector needs
    information moved from one position to the next: the job a previous-token head seems to do.

    Args:
        labels: one sentence's relation labels; n: words kept after truncation.
        offset: -1 (previous word), +1 (next word), any non-zero shift.
        classes: the labels that get a class of their own (index into it); any other label is class
            ``len(classes)`` ("other").
        skip: a word with one of these labels is not scored (-1), punctuation by default.

    Returns:
        per word, the neighbour's class, or -1 when the word is skipped or the neighbour lies outside the
        ``n`` kept words.

    >>> neighbour_classes(["det", "nsubj", "ROOT", "punct"], 4, offset=-1, classes=["det", "nsubj"])
    [-1, 0, 1, -1]
    >>> neighbour_classes(["det", "nsubj", "ROOT"], 3, offset=1, classes=["nsubj"])
    [0, 1, -1]
    """
    if offset == 0:
        raise ValueError("offset must be non-zero (-1: previous word, +1: next word)")
    if not 0 <= n <= len(labels):
        raise ValueError(f"n must lie in [0, {len(labels)}] (the sentence's words), got {n}")
    index = {lab: i for i, lab in enumerate(classes)}
    out = []
    for w in range(n):
        j = w + offset
        out.append(-1 if labels[w] in skip or not 0 <= j < n else index.get(labels[j], len(classes)))
    return out


def _ablated_last_hidden(model: nn.Module, enc, keep: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Last hidden state [batch, pos, d] of one encoded batch under every mask of ``keep``, each run
    restarting from the hidden state entering its first masked layer (as :func:`ablated_embeddings`)."""
    layers = _layers(model)

    hidden, seen = _hidden_states_and_mask(model, layers, enc)
    for c, k in enumerate(keep):
        lo = int((k != 1).any(1).float().argmax()) if bool((k != 1).any()) else len(layers)
        h = hidden[lo]
        with torch.inference_mode(), head_mask(model, k):
            for layer in layers[lo:]:
                h = layer(h, seen["mask"])
                h = h[0] if isinstance(h, tuple) else h
        yield c, h


def ablated_word_vectors(
    model: nn.Module, tokenizer, words: Sequence[Sequence[str]], keep: Tensor, *, max_length: int = 64,
    batch_size: int = 64,
) -> Tensor:
    """Last-layer vector of every word (mean of its pieces) under several head masks.

    Args:
        model, tokenizer: a BERT-like encoder and its fast tokenizer.
        words: one list of words per sentence (tokenised with ``is_split_into_words=True``).
        keep: [config, layer, head] masks (1 keep, 0 ablate).
        max_length, batch_size: truncation and batching.

    Returns:
        [config, word, d]: the words of all sentences in order, each sentence's words cut by
        truncation left out (``align_words(...).amax(1) - 1`` words are kept per sentence).
    """
    layers = _layers(model)
    if keep.ndim != 3 or keep.shape[1:] != (len(layers), model.config.num_attention_heads):
        raise ValueError(
            f"keep must be [config, layer, head] with {len(layers)} layers and "
            f"{model.config.num_attention_heads} heads, got {tuple(keep.shape)}"
        )
    device = next(model.parameters()).device
    chunks: list[list[Tensor]] = [[] for _ in range(len(keep))]
    for start in range(0, len(words), batch_size):
        batch_words = [list(w) for w in words[start : start + batch_size]]
        enc = tokenizer(batch_words, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        word_index = align_words(tokenizer, batch_words, max_length=max_length)  # [batch, pos]
        n_words = word_index.amax(1) - 1  # [batch]
        width = int(n_words.max())
        member = (word_index[:, None, :] == torch.arange(1, width + 1)[None, :, None]).float()  # [batch, word, pos]
        mean = member / member.sum(-1, keepdim=True).clamp_min(1)
        real = torch.arange(width)[None, :] < n_words[:, None]  # [batch, word]
        for c, h in _ablated_last_hidden(model, enc.to(device), keep):
            vec = torch.einsum("bwp,bpd->bwd", mean.to(h), h).cpu()  # [batch, word, d]
            chunks[c].append(vec[real])
    return torch.stack([torch.cat(ch) for ch in chunks])


def word_probe_under_ablation(
    model: nn.Module,
    tokenizer,
    train_words: Sequence[Sequence[str]],
    y_train: Sequence[Sequence[int]],
    test_words: Sequence[Sequence[str]],
    y_test: Sequence[Sequence[int]],
    keep: Tensor,
    *,
    max_length: int = 64,
) -> dict[str, np.ndarray]:
    """:func:`probe_under_ablation` for a word-level probe: a logistic regression on each word's
    standardised last-layer vector, trained on the unablated model and frozen.

    Args:
        train_words, test_words: one list of words per sentence.
        y_train, y_test: per sentence, one class per word kept after truncation (-1: not scored),
            e.g. :func:`head_positions`.
        keep: [config, layer, head] masks.

    Returns:
        as :func:`probe_under_ablation`, over the scored test words (in order), plus ``"y"`` [word].
    """
    from sklearn.linear_model import LogisticRegression

    ones = torch.ones(1, *keep.shape[1:])
    train = ablated_word_vectors(model, tokenizer, train_words, ones, max_length=max_length)[0]
    y_tr = np.concatenate([np.asarray(y, dtype=np.int64) for y in y_train])
    if len(y_tr) != len(train):
        raise ValueError(f"y_train has {len(y_tr)} labels for {len(train)} words kept after truncation")
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-6)
    fit = y_tr >= 0
    clf = LogisticRegression(max_iter=3000).fit(((train - mu) / sd)[fit].numpy(), y_tr[fit])
    test = ablated_word_vectors(model, tokenizer, test_words, torch.cat([ones, keep.float()]), max_length=max_length)
    y_te = np.concatenate([np.asarray(y, dtype=np.int64) for y in y_test])
    if len(y_te) != test.shape[1]:
        raise ValueError(f"y_test has {len(y_te)} labels for {test.shape[1]} words kept after truncation")
    scored = y_te >= 0
    classes = torch.as_tensor(clf.classes_)
    w = torch.tensor(clf.coef_, dtype=torch.float32)
    b = torch.tensor(clf.intercept_, dtype=torch.float32)
    if w.shape[0] == 1:  # binary: sklearn keeps one row; make it a two-class softmax
        w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
    logits = ((test[:, scored] - mu) / sd) @ w.T + b  # [1 + config, word, class]
    y = torch.as_tensor(np.searchsorted(clf.classes_, y_te[scored]))
    loss = nn.functional.cross_entropy(logits.permute(0, 2, 1), y[None].expand(len(logits), -1), reduction="none")
    correct = classes[logits.argmax(-1)] == torch.as_tensor(y_te[scored])[None]
    return {
        "correct": correct[1:].numpy(),
        "loss": loss[1:].numpy().astype(np.float32),
        "base_correct": correct[0].numpy(),
        "base_loss": loss[0].numpy().astype(np.float32),
        "train_accuracy": float(clf.score(((train - mu) / sd)[fit].numpy(), y_tr[fit])),
        "y": y_te[scored],
    }
