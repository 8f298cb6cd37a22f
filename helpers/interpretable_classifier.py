"""Classifiers that stay in SINr space: task-vector attention over frozen sparse word vectors.

A document's tokens get their frozen SINr vectors x_t (Chapter 2); a learned *task vector* u, itself
a point of the SINr space, scores them, α_t = softmax_t(⟨x_t, u⟩ / τ) (Bahdanau-style attention with
one learned query, Bahdanau et al. 2015); the document vector z = Σ_t α_t x_t is a convex mixture of
the inputs and so still lives in SINr space; a linear layer reads z. Every quantity has a name:
α says which tokens were read, W[c, d] · z[d] how much dimension d (a community of words) pushed
class c, and u's largest coordinates which dimensions the task looks for. The logit of class c is
exactly Σ_d W[c, d] z[d] + b[c].

:class:`ContextTagger` is the token-level variant for tagging (named entities): the token's own
vector plus an attention-pooled context of its neighbours, both in SINr space.

Introduced in nbs/03_interpretable_classifier.ipynb.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import Tensor, nn

from helpers import sinr

PAD = 0
"""Input id of padding and of tokens without a SINr vector; word ``i`` of the embedding has id ``i + 1``."""


class Encoded(NamedTuple):
    input_ids: Tensor  # [batch, pos] long, PAD = 0
    attention_mask: Tensor  # [batch, pos] bool
    tokens: list[list[str]]  # the kept tokens of each text, in order


def encode(emb: sinr.SinrEmbedding, texts: Sequence[str], *, max_tokens: int | None = None) -> Encoded:
    """Tokenise texts as Chapter 2 does and keep the words that have a SINr vector.

    A text with no such word gets one padding position and an all-False mask (see
    :meth:`TaskAttentionClassifier.explain` for what the model does with it).

    >>> emb = sinr.SinrEmbedding(("cat", "dog"), sparse.csr_matrix(np.eye(2)), np.arange(2))
    >>> enc = encode(emb, ["The cat and the dog.", "Nothing known"])
    >>> enc.input_ids.tolist(), enc.attention_mask.tolist(), enc.tokens
    ([[1, 2], [0, 0]], [[True, True], [False, False]], [['cat', 'dog'], []])
    """
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    tokens = []
    for text in texts:
        kept = [w for w in sinr.tokenize(text) if w in emb.index]
        tokens.append(kept[:max_tokens] if max_tokens else kept)
    width = max(1, max(map(len, tokens)))
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    for b, kept in enumerate(tokens):
        ids[b, : len(kept)] = torch.tensor([emb.index[w] + 1 for w in kept], dtype=torch.long)
    return Encoded(ids, ids != PAD, tokens)


def _embedding_table(vectors) -> Tensor:
    dense = vectors.toarray() if sparse.issparse(vectors) else np.asarray(vectors)
    if dense.ndim != 2:
        raise ValueError(f"vectors must be [vocab, dim], got shape {dense.shape}")
    table = torch.zeros(dense.shape[0] + 1, dense.shape[1])
    table[1:] = torch.as_tensor(dense, dtype=torch.float32)
    return table


def _check_inputs(input_ids: Tensor, attention_mask: Tensor, vocab: int) -> Tensor:
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [batch, pos], got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() > vocab):
        raise ValueError(f"input_ids must lie in [0, {vocab}] (0 = padding); encode texts with encode()")
    return attention_mask.bool() & (input_ids != PAD)


def masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis restricted to ``mask``; rows with no True entry give all zeros (not NaN).

    >>> masked_softmax(torch.tensor([[0.0, 0.0, 5.0], [1.0, 2.0, 3.0]]), torch.tensor([[1, 1, 0], [0, 0, 0]]).bool())
    tensor([[0.5000, 0.5000, 0.0000],
            [0.0000, 0.0000, 0.0000]])
    """
    empty = ~mask.any(-1, keepdim=True)
    scores = scores.masked_fill(~mask, float("-inf")).masked_fill(empty, 0.0)
    return torch.softmax(scores, dim=-1) * mask


class Explanation(NamedTuple):
    logits: Tensor  # [batch, class]
    attention: Tensor  # [batch, pos]: α_t, sums to 1 over the known tokens (0 if none)
    z: Tensor  # [batch, dim]: document vector in SINr space
    contributions: Tensor  # [batch, class, dim]: W[c, d] · z[d]
    bias: Tensor  # [class]


class TaskAttentionClassifier(nn.Module):
    """tokens → frozen SINr vectors → task-vector attention → z in SINr space → linear.

    Args:
        vectors: ``[vocab, dim]`` SINr vectors (sparse or dense); frozen.
        n_classes: number of classes.
        tau: attention temperature τ.

    Introduced in nbs/03_interpretable_classifier.ipynb.
    """

    def __init__(self, vectors, n_classes: int, *, tau: float = 0.1):
        super().__init__()
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        self.register_buffer("embeddings", _embedding_table(vectors))      # [vocab + 1, dim], row 0 = PAD
        self.tau = tau
        self.query = nn.Parameter(torch.zeros(self.embeddings.shape[1]))   # u: the task vector, [dim]
        self.linear = nn.Linear(self.embeddings.shape[1], n_classes)

    def reset_parameters(self) -> None:
        """u = 0 (attention starts as a plain mean) and PyTorch's default initialisation of the readout."""
        nn.init.zeros_(self.query)
        self.linear.reset_parameters()

    def _pool(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        mask = _check_inputs(input_ids, attention_mask, self.embeddings.shape[0] - 1)
        x = F.embedding(input_ids, self.embeddings)                        # [batch, pos, dim]
        alpha = masked_softmax(x @ self.query / self.tau, mask)            # [batch, pos]
        return alpha, torch.einsum("bp,bpd->bd", alpha, x)                 # z: [batch, dim]

    def explain(self, input_ids: Tensor, attention_mask: Tensor) -> Explanation:
        """Logits with every intermediate quantity. A text with no known token gets α = 0, z = 0 and
        logits = the bias: the model falls back on its class prior."""
        alpha, z = self._pool(input_ids, attention_mask)
        contributions = z[:, None, :] * self.linear.weight[None]           # [batch, class, dim]
        logits = contributions.sum(-1) + self.linear.bias
        return Explanation(logits, alpha, z, contributions, self.linear.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[batch, class] logits."""
        return self.linear(self._pool(input_ids, attention_mask)[1])

    def predict_proba(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[batch, class] probabilities (the ``predict`` that helpers.evaluation expects)."""
        with torch.no_grad():
            return self(input_ids, attention_mask).softmax(-1)


class ContextTagger(nn.Module):
    """Token-level classifier: the token's own SINr vector plus task-vector attention over its neighbours.

    For position i, α_ij = softmax_j(⟨x_j, u⟩ / τ) over the known tokens j ≠ i with ``|i − j| ≤ window``,
    c_i = Σ_j α_ij x_j, and logits_i = W_self x_i + W_ctx c_i + b: both readers work on SINr dimensions.

    Introduced in nbs/03_interpretable_classifier.ipynb (named-entity tagging).
    """

    def __init__(self, vectors, n_classes: int, *, window: int = 2, tau: float = 0.1):
        super().__init__()
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        self.register_buffer("embeddings", _embedding_table(vectors))
        self.window, self.tau = window, tau
        dim = self.embeddings.shape[1]
        self.query = nn.Parameter(torch.zeros(dim))
        self.self_linear = nn.Linear(dim, n_classes)
        self.context_linear = nn.Linear(dim, n_classes, bias=False)

    def reset_parameters(self) -> None:
        """u = 0 (uniform context attention) and PyTorch's default initialisation of the readouts."""
        nn.init.zeros_(self.query)
        self.self_linear.reset_parameters()
        self.context_linear.reset_parameters()

    def _pool(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        known = _check_inputs(input_ids, attention_mask, self.embeddings.shape[0] - 1)
        w = self.window
        x = F.embedding(input_ids, self.embeddings)                                   # [batch, pos, dim]
        xw = F.pad(x, (0, 0, w, w)).unfold(1, 2 * w + 1, 1).transpose(-1, -2)        # [batch, pos, 2w+1, dim]
        mw = F.pad(known, (w, w)).unfold(1, 2 * w + 1, 1).clone()                      # [batch, pos, 2w+1]
        mw[..., w] = False                                                            # the token itself is not context
        alpha = masked_softmax(xw @ self.query / self.tau, mw)                        # [batch, pos, 2w+1]
        context = torch.einsum("bpk,bpkd->bpd", alpha, xw)                            # [batch, pos, dim]
        return x, alpha, context

    def explain(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """``logits`` [batch, pos, class], ``attention`` [batch, pos, 2w+1] over offsets −w..w,
        ``self_contributions`` and ``context_contributions`` [batch, pos, class, dim]."""
        x, alpha, context = self._pool(input_ids, attention_mask)
        own = x[..., None, :] * self.self_linear.weight                                # [batch, pos, class, dim]
        ctx = context[..., None, :] * self.context_linear.weight
        logits = own.sum(-1) + ctx.sum(-1) + self.self_linear.bias
        return {"logits": logits, "attention": alpha, "self_contributions": own, "context_contributions": ctx}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[batch, pos, class] logits."""
        x, _, context = self._pool(input_ids, attention_mask)
        return self.self_linear(x) + self.context_linear(context)


ENTITY_TYPES = {
    "PER": ("PERSON",),
    "LOC": ("GPE", "LOC", "FAC"),
    "ORG": ("ORG",),
    "MISC": ("NORP", "EVENT", "WORK_OF_ART", "LAW", "LANGUAGE", "PRODUCT"),
    "NUM": ("DATE", "TIME", "CARDINAL", "ORDINAL", "QUANTITY", "PERCENT", "MONEY"),
}
"""Coarse tags for spaCy's OntoNotes entity types; every other token is ``"O"``."""
TAGS = ("O", *ENTITY_TYPES)


def silver_entities(nlp, sentences: Sequence[str], *, batch_size: int = 64) -> tuple[list[list[str]], list[list[int]]]:
    """Tokens and coarse entity tags (indices into :data:`TAGS`) from a spaCy pipeline's NER.

    The labels are *silver*: a statistical tagger's output, not human annotation.
    """
    if isinstance(sentences, str) or len(sentences) == 0:
        raise ValueError("sentences must be a non-empty list of strings")
    coarse = {fine: TAGS.index(tag) for tag, fines in ENTITY_TYPES.items() for fine in fines}
    words, tags = [], []
    for doc in nlp.pipe(sentences, batch_size=batch_size, disable=["parser", "lemmatizer"]):
        words.append([t.text for t in doc])
        tags.append([coarse.get(t.ent_type_, 0) for t in doc])
    return words, tags


def encode_words(emb: sinr.SinrEmbedding, words: Sequence[Sequence[str]]) -> Encoded:
    """Encode pre-tokenised sentences position by position: a word without a SINr vector (stop word,
    number, punctuation, rare word) keeps its position with id PAD, and the mask marks real positions."""
    width = max(map(len, words))
    ids = torch.zeros(len(words), width, dtype=torch.long)
    mask = torch.zeros(len(words), width, dtype=torch.bool)
    for b, sent in enumerate(words):
        ids[b, : len(sent)] = torch.tensor([emb.index.get(w.lower(), -1) + 1 for w in sent], dtype=torch.long)
        mask[b, : len(sent)] = True
    return Encoded(ids, mask, [list(s) for s in words])


def fit(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, *, epochs: int = 40,
        lr: float = 0.05, weight_decay: float = 0.0, l1: float = 0.0, batch_size: int = 128, seed: int = 0,
        class_weight: Tensor | None = None, nonnegative: bool = False) -> list[float]:
    """Train with Adam and cross-entropy, deterministically under ``seed``; returns the loss per epoch.

    The parameters are re-initialised under ``seed`` first, so the trained model depends only on the
    data, the options and the seed.

    Args:
        labels: [batch] class ids (documents) or [batch, pos] tag ids with -100 where there is no label.
        l1: L1 penalty on the readout weights (sparser, easier-to-read explanations).
        nonnegative: project the readout weights onto W ≥ 0 after every step (a class is then argued
            for only by the presence of dimensions).
    """
    if labels.shape[0] != input_ids.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows but input_ids has {input_ids.shape[0]}")
    if epochs < 1 or batch_size < 1:
        raise ValueError("epochs and batch_size must be positive")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if hasattr(model, "reset_parameters"):
        model.reset_parameters()
    readouts = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(input_ids.shape[0], generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            logits = model(input_ids[idx], attention_mask[idx])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[idx].reshape(-1), weight=class_weight,
                                   ignore_index=-100)
            if l1:
                loss = loss + l1 * sum(w.abs().sum() for w in readouts)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if nonnegative:
                with torch.no_grad():
                    for w in readouts:
                        w.clamp_(min=0)
            total += float(loss.detach()) * len(idx)
        losses.append(total / input_ids.shape[0])
    model.eval()
    return losses


def task_vector_dimensions(model: nn.Module, emb: sinr.SinrEmbedding, k: int = 5,
                           words: int = 4) -> list[tuple[int, float, list[str]]]:
    """The ``k`` largest coordinates of the task vector u, with each dimension's central words."""
    u = model.query.detach()
    top = torch.argsort(u, descending=True, stable=True)[:k]
    return [(int(d), float(u[d]), emb.label(int(d), words)) for d in top]


def class_dimensions(explanation: Explanation, emb: sinr.SinrEmbedding, row: int, target: int, k: int = 5,
                     words: int = 4) -> list[tuple[int, float, list[str]]]:
    """The dimensions that pushed class ``target`` most for document ``row``: (dim, W·z, words)."""
    contrib = explanation.contributions[row, target].detach()
    top = torch.argsort(contrib, descending=True, stable=True)[:k]
    return [(int(d), float(contrib[d]), emb.label(int(d), words)) for d in top if contrib[d] > 0]


def load_labelled_csv(
    path: str | os.PathLike, *, labels: Sequence[str] | None = None, text_column: str = "text",
    label_column: str = "label",
) -> tuple[list[str], np.ndarray, list[str]]:
    """Read a user's ``text,label`` CSV (e.g. a hate-speech data set, which no registry ships).

    Args:
        path: a UTF-8 CSV file with a header row naming ``text_column`` and ``label_column``.
        labels: the allowed labels, in class order; by default the sorted distinct labels found.

    Returns:
        ``(texts, y, label_names)`` with ``y`` an int64 array of class ids into ``label_names``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a CSV file with a header row "
                                f"'{text_column},{label_column}'")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise ValueError(f"{path} is empty; it needs a header row '{text_column},{label_column}' and data rows")
        missing = [c for c in (text_column, label_column) if c not in reader.fieldnames]
        if missing:
            raise ValueError(f"{path} has columns {reader.fieldnames} but lacks {missing}; rename the columns or pass "
                             "text_column= / label_column=")
        rows = [(r[text_column] or "", (r[label_column] or "").strip()) for r in reader]
    if not rows:
        raise ValueError(f"{path} has a header but no data rows")
    blank = [i + 2 for i, (t, lab) in enumerate(rows) if not t.strip() or not lab]
    if blank:
        raise ValueError(f"{path}: empty text or label on line(s) {blank[:10]}; fill or remove them")
    names = sorted({lab for _, lab in rows}) if labels is None else list(labels)
    unknown = sorted({lab for _, lab in rows} - set(names))
    if unknown:
        raise ValueError(f"{path}: unknown label(s) {unknown}; expected one of {names}")
    if len(names) < 2:
        raise ValueError(f"{path}: a classifier needs at least two labels, found {names}")
    index = {n: i for i, n in enumerate(names)}
    return [t for t, _ in rows], np.array([index[lab] for _, lab in rows], dtype=np.int64), names
