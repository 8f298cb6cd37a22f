"""SINr: sparse interpretable word embeddings from the community structure of a co-occurrence graph.

The pipeline (Prouteau et al. 2021; 2024, "From communities to interpretable network and word
embedding"): a corpus → word co-occurrence counts in a window → edges kept where their PMI is
positive → Louvain communities at resolution γ → each word's *node recall* NR(u, C), the share of its
weighted degree that goes to community C → the top-k dimensions per word → dimensions filtered by
their number of non-zeros. Every dimension is a community of words, so it can be read by its words.

Evaluation helpers (word-similarity Spearman, the word-intrusion measure DistRatio) accept any
``[word, dim]`` matrix, so the dense baselines (PPMI + SVD, word2vec) are scored by the same code.

Introduced in nbs/02_sinr_embeddings.ipynb.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import sparse, stats
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS as _SKLEARN_STOP_WORDS

from helpers import common

# sklearn's English stop-word list (Glasgow IR group, 318 words); the corpus cache key includes the
# list itself, so a library update that changes it rebuilds the corpus rather than reusing a stale one.

STOP_WORDS: frozenset[str] = frozenset(_SKLEARN_STOP_WORDS) | frozenset({"mr", "mrs", "miss", "said"})
"""Stop words removed from the corpus: sklearn's English list plus Austen's ubiquitous forms of address."""

_CLITIC = re.compile(r"(?:'s|n't|'ll|'ve|'re|'d|'m)\b")
_WORD = re.compile(r"[a-z]+")

# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


def tokenize(text: str, *, stop_words: Iterable[str] = STOP_WORDS) -> list[str]:
    """Lower-case alphabetic tokens of two letters or more, clitics and stop words removed.

    >>> tokenize("Elizabeth's sister wouldn't dance with Mr. Darcy in 1811.")
    ['elizabeth', 'sister', 'dance', 'darcy']
    """
    stop = stop_words if isinstance(stop_words, (set, frozenset)) else frozenset(stop_words)
    words = _WORD.findall(_CLITIC.sub(" ", text.lower().replace("\u2019", "'")))
    return [w for w in words if len(w) > 1 and w not in stop]


@dataclass(frozen=True)
class Corpus:
    """A tokenised corpus as flat word ids: document ``i`` is ``ids[offsets[i]:offsets[i + 1]]``.

    Attributes:
        words: the vocabulary, most frequent first, ``[vocab]``.
        counts: corpus frequency of each word, ``[vocab]``.
        ids: word ids of every kept token, in order, ``[tokens]``.
        offsets: start of each document in ``ids`` plus the end, ``[documents + 1]``.
        raw_tokens: alphabetic tokens before stop-word and frequency filtering.
    """

    words: tuple[str, ...]
    counts: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray
    raw_tokens: int = 0
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "index", {w: i for i, w in enumerate(self.words)})

    @property
    def n_tokens(self) -> int:
        return int(self.ids.size)

    @property
    def n_documents(self) -> int:
        return int(self.offsets.size - 1)

    def fingerprint(self) -> str:
        """A content hash of the tokenised corpus (vocabulary and token ids), to key derived caches."""
        import hashlib

        digest = hashlib.sha256("\n".join(self.words).encode())
        digest.update(np.ascontiguousarray(self.ids).tobytes())
        digest.update(np.ascontiguousarray(self.offsets).tobytes())
        return digest.hexdigest()[:16]

    def documents(self) -> list[list[str]]:
        """The documents as lists of words (what gensim and the reference package take)."""
        words = np.asarray(self.words, dtype=object)
        return [words[self.ids[a:b]].tolist() for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True)]


def corpus_from_documents(documents: Iterable[str], *, min_count: int = 5,
                          stop_words: Iterable[str] = STOP_WORDS) -> Corpus:
    """Tokenise documents, drop words seen fewer than ``min_count`` times, and index the rest.

    Args:
        documents: texts; a co-occurrence window never crosses from one document to the next.
        min_count: minimum corpus frequency of a kept word (after stop-word removal).
        stop_words: words to drop before counting.

    Returns:
        a :class:`Corpus`; empty documents (after filtering) are dropped.

    >>> c = corpus_from_documents(["the cat sat", "a cat ran", "dogs ran"], min_count=2)
    >>> c.words, c.ids.tolist(), c.offsets.tolist()
    (('cat', 'ran'), [0, 0, 1, 1], [0, 1, 3, 4])
    """
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be a positive int, got {min_count!r}")
    stop = frozenset(stop_words)
    raw = 0
    tokenised = []
    for text in documents:
        raw += len(_WORD.findall(text.lower()))
        tokenised.append(tokenize(text, stop_words=stop))
    return corpus_from_tokens(tokenised, min_count=min_count, raw_tokens=raw)


def corpus_from_tokens(tokenised: Sequence[Sequence[str]], *, min_count: int, raw_tokens: int) -> Corpus:
    """The :class:`Corpus` of documents already tokenised by :func:`tokenize` (see :func:`corpus_from_documents`).

    Words seen fewer than ``min_count`` times are dropped; ``raw_tokens`` is recorded as the corpus's size
    before filtering. Empty documents (after filtering) are dropped.

    >>> corpus_from_tokens([["cat", "sat"], ["cat"]], min_count=2, raw_tokens=5).ids.tolist()
    [0, 0]
    """
    counts = Counter(w for doc in tokenised for w in doc)
    kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    if not kept:
        raise ValueError(
            f"the corpus is empty after tokenisation (no word occurs {min_count} times or more); "
            "pass more text or lower min_count"
        )
    index = {w: i for i, w in enumerate(kept)}
    ids, offsets = [], [0]
    for doc in tokenised:
        doc_ids = [index[w] for w in doc if w in index]
        if doc_ids:
            ids.extend(doc_ids)
            offsets.append(len(ids))
    return Corpus(
        words=tuple(kept),
        counts=np.array([counts[w] for w in kept], dtype=np.int64),
        ids=np.array(ids, dtype=np.int32),
        offsets=np.array(offsets, dtype=np.int64),
        raw_tokens=raw_tokens,
    )


def book_documents() -> list[tuple[str, str]]:
    """The chapter's corpus as ``(source, paragraph)`` pairs: the Wikipedia subset, then Austen's novels.

    Paragraphs are the documents: a window may cross a sentence boundary but not a paragraph.
    """
    from helpers.assets import austen_novels, wikipedia_articles

    docs = []
    for _, text in wikipedia_articles():
        docs += [("wikipedia", p) for p in text.split("\n") if p.strip()]
    for title, text in austen_novels().items():
        docs += [(title, p.replace("\n", " ")) for p in re.split(r"\n\s*\n", text) if p.strip()]
    return docs


CORPUS_VERSION = 1


def book_corpus(*, min_count: int = 5) -> Corpus:
    """Wikipedia subset + Austen's six novels, tokenised by :func:`tokenize` and cached (npz, hash-verified).

    Args:
        min_count: minimum frequency of a kept word.

    Returns:
        the :class:`Corpus` (about 1.2M raw tokens; about 0.55M after stop words and rare words).
    """
    recipe = {"v": CORPUS_VERSION, "min_count": min_count, "stop": sorted(STOP_WORDS), "tokenizer": _WORD.pattern}
    path = common.cache_dir("data") / f"sinr-corpus-{common.content_hash(recipe)}.npz"

    def build(out: Path) -> None:
        corpus = corpus_from_documents([text for _, text in book_documents()], min_count=min_count)
        with open(out, "wb") as fh:
            np.savez_compressed(fh, words=np.array(json.dumps(corpus.words)), counts=corpus.counts, ids=corpus.ids,
                                offsets=corpus.offsets, raw_tokens=np.array(corpus.raw_tokens))

    with np.load(common.cached_file(path, build, committed=True)) as data:
        return Corpus(words=tuple(json.loads(str(data["words"]))), counts=data["counts"], ids=data["ids"],
                      offsets=data["offsets"], raw_tokens=int(data["raw_tokens"]))


# ---------------------------------------------------------------------------------------------
# Graph: co-occurrence, PMI filter, communities, node recall
# ---------------------------------------------------------------------------------------------


def cooccurrence(corpus: Corpus, *, window: int = 5) -> sparse.csr_matrix:
    """Symmetric co-occurrence counts: ``C[u, v]`` = times u and v occur at most ``window`` tokens apart.

    Each pair of positions (i, j) with 0 < j - i <= window in the same document counts once, for
    both orders; a word never co-occurs with itself (zero diagonal), as in the SINr package.

    Returns:
        ``[vocab, vocab]`` CSR matrix of float64 counts.

    >>> c = corpus_from_documents(["cat dog owl cat"], min_count=1, stop_words=())
    >>> c.words, cooccurrence(c, window=1).toarray().astype(int).tolist()
    (('cat', 'dog', 'owl'), [[0, 1, 1], [1, 0, 1], [1, 1, 0]])
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (tokens on each side), got {window!r}")
    if corpus.n_tokens == 0:
        raise ValueError("the corpus has no tokens; build it from non-empty documents")
    n = len(corpus.words)
    doc = np.repeat(np.arange(corpus.n_documents), np.diff(corpus.offsets))
    rows, cols = [], []
    for k in range(1, window + 1):
        same = doc[:-k] == doc[k:]
        a, b = corpus.ids[:-k][same], corpus.ids[k:][same]
        keep = a != b
        rows.append(np.minimum(a[keep], b[keep]))
        cols.append(np.maximum(a[keep], b[keep]))
    r, c = np.concatenate(rows), np.concatenate(cols)
    upper = sparse.coo_matrix((np.ones(r.size), (r, c)), shape=(n, n)).tocsr()  # sums duplicate pairs
    return (upper + upper.T).tocsr()


def _check_adjacency(adjacency) -> sparse.csr_matrix:
    if not sparse.issparse(adjacency) or adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"adjacency must be a square scipy.sparse matrix, got {type(adjacency).__name__}")
    adjacency = sparse.csr_matrix(adjacency)
    if adjacency.nnz and not np.isfinite(adjacency.data).all():
        raise ValueError("adjacency has NaN or infinite weights; co-occurrence counts must be finite")
    if adjacency.nnz and adjacency.data.min() < 0:
        raise ValueError("adjacency has negative weights; SINr needs non-negative co-occurrence weights")
    return adjacency


def pmi(adjacency: sparse.spmatrix) -> sparse.csr_matrix:
    """PMI of every edge, with the SINr package's marginals: log(w(u,v) · W / (d(u) · d(v))).

    W is the total weight of the edges counted once and d(u) the weighted degree; this is the usual
    PMI of a symmetric co-occurrence matrix minus log 2 (each pair is counted once, not twice).

    Returns:
        ``[vocab, vocab]`` CSR matrix with the PMI on the edges of ``adjacency`` (other entries absent).
    """
    adjacency = _check_adjacency(adjacency)
    coo = sparse.triu(adjacency, k=1).tocoo()
    total = coo.data.sum()
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    values = np.log(coo.data * total / (degree[coo.row] * degree[coo.col]))
    upper = sparse.coo_matrix((values, (coo.row, coo.col)), shape=adjacency.shape)
    return (upper + upper.T).tocsr()


def pmi_filter(adjacency: sparse.spmatrix, *, min_pmi: float = 0.0) -> sparse.csr_matrix:
    """Keep the co-occurrence counts of the edges whose :func:`pmi` exceeds ``min_pmi``; drop the rest.

    Edges between two frequent words that meet no more often than chance (PMI <= 0) are what makes a
    co-occurrence graph one big hairball; removing them lets communities appear (SINr's ``pmi_filter``).

    Returns:
        ``[vocab, vocab]`` CSR matrix: the same weights as ``adjacency`` on the kept edges.
    """
    adjacency = _check_adjacency(adjacency)
    scores = pmi(adjacency)
    keep = scores.copy()
    keep.data = (scores.data > min_pmi).astype(np.float64)
    out = adjacency.multiply(keep).tocsr()
    out.eliminate_zeros()
    return out


def louvain(adjacency: sparse.spmatrix, *, gamma: float = 1.0, seed: int = 0, mode: str = "multilevel") -> np.ndarray:
    """Louvain communities (igraph's C implementation) at resolution ``gamma``, deterministic under ``seed``.

    Maximises the modularity with resolution, Q = 1/2m Σ_uv (w(u,v) − γ d(u) d(v) / 2m) [c(u) = c(v)]:
    the larger γ, the more and smaller the communities (Blondel et al. 2008; Reichardt & Bornholdt 2006).

    Args:
        adjacency: ``[vocab, vocab]`` symmetric non-negative weights.
        gamma: resolution, > 0.
        seed: igraph draws node orders from Python's ``random``; it is seeded here.
        mode: ``"multilevel"`` (the full method: move nodes, aggregate communities into super-nodes,
            repeat until nothing moves) or ``"one-level"`` (the first pass only, before any aggregation:
            what the SINr package's networkit ``PLM(recurse=False)`` computes; more, smaller communities).

    Returns:
        ``[vocab]`` int64 community of each node, numbered 0..C-1 by decreasing size (ties by first node).
    """
    if mode not in ("multilevel", "one-level"):
        raise ValueError(f"mode must be 'multilevel' or 'one-level', got {mode!r}")
    adjacency = _check_adjacency(adjacency)
    if mode == "one-level":
        return louvain_levels(adjacency, gamma=gamma, seed=seed)[0]
    return _renumber(_igraph_louvain(adjacency, gamma, seed, levels=False))


def louvain_levels(adjacency: sparse.spmatrix, *, gamma: float = 1.0, seed: int = 0) -> list[np.ndarray]:
    """Every level of one Louvain run, finest first: level ``i + 1`` merges whole communities of level ``i``.

    Level 0 is the partition after the first pass of local moves (``louvain(mode="one-level")``), the last
    level the final partition (``louvain(mode="multilevel")``, the same seed gives the same partition).

    Returns:
        ``[level][vocab]`` int64 memberships, each numbered by decreasing community size.

    >>> A = sparse.csr_matrix(np.kron(np.eye(2), np.ones((3, 3))) - np.eye(6))
    >>> [m.tolist() for m in louvain_levels(A, gamma=1.0)]
    [[0, 0, 0, 1, 1, 1]]
    """
    adjacency = _check_adjacency(adjacency)
    return [_renumber(m) for m in _igraph_louvain(adjacency, gamma, seed, levels=True)]


def _igraph_louvain(adjacency: sparse.csr_matrix, gamma: float, seed: int, *, levels: bool, loops: bool = False):
    """igraph's multilevel Louvain on the upper triangle (with the diagonal as self-loops when ``loops``)."""
    import igraph

    if not np.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma (the Louvain resolution) must be > 0, got {gamma!r}")
    upper = sparse.triu(adjacency, k=0 if loops else 1).tocoo()
    # igraph counts a self-loop twice in a node's strength; halving it keeps strength = row sum
    weights = np.where(upper.row == upper.col, upper.data / 2, upper.data)
    graph = igraph.Graph(n=adjacency.shape[0], edges=np.column_stack([upper.row, upper.col]).tolist(),
                         edge_attrs={"weight": weights.tolist()})
    state = random.getstate()
    try:
        random.seed(seed)
        igraph.set_random_number_generator(random)
        found = graph.community_multilevel(weights="weight", resolution=gamma, return_levels=levels)
    finally:
        random.setstate(state)
    if levels:
        return [np.asarray(level.membership) for level in found]
    return np.asarray(found.membership)


def _renumber(membership: np.ndarray) -> np.ndarray:
    """Number communities 0..C-1 by decreasing size, ties broken by their first node."""
    labels, first, sizes = np.unique(membership, return_index=True, return_counts=True)
    order = np.lexsort((first, -sizes))
    new = np.empty(labels.size, dtype=np.int64)
    new[order] = np.arange(labels.size)
    return new[np.searchsorted(labels, membership)]


def membership_matrix(membership: np.ndarray, n_communities: int | None = None) -> sparse.csr_matrix:
    """One-hot ``[node, community]`` matrix of a membership vector (-1 = no community)."""
    membership = np.asarray(membership)
    n_communities = int(membership.max()) + 1 if n_communities is None else n_communities
    rows = np.flatnonzero(membership >= 0)
    return sparse.csr_matrix((np.ones(rows.size), (rows, membership[rows])),
                             shape=(membership.size, n_communities))


def _check_membership(adjacency, membership) -> tuple[sparse.csr_matrix, np.ndarray]:
    adjacency = _check_adjacency(adjacency)
    membership = np.asarray(membership)
    if membership.ndim != 1 or membership.size != adjacency.shape[0]:
        raise ValueError(f"membership must be [{adjacency.shape[0]}] (one community per node), "
                         f"got shape {membership.shape}")
    if not np.issubdtype(membership.dtype, np.integer) or membership.min() < 0:
        raise ValueError("membership must hold non-negative integer community ids")
    return adjacency, membership


def node_recall(adjacency: sparse.spmatrix, membership: np.ndarray) -> sparse.csr_matrix:
    """NR(u, C) = Σ_{v∈C} w(u,v) / d(u): the share of u's weighted degree that goes to community C.

    Rows of non-isolated nodes sum to 1; an isolated node's row is zero.

    Returns:
        ``[node, community]`` CSR matrix.

    >>> A = sparse.csr_matrix(np.array([[0, 2, 1], [2, 0, 0], [1, 0, 0]], float))
    >>> node_recall(A, np.array([0, 0, 1])).toarray().round(3).tolist()
    [[0.667, 0.333], [1.0, 0.0], [1.0, 0.0]]
    """
    adjacency, membership = _check_membership(adjacency, membership)
    degree = np.asarray(adjacency.sum(axis=1)).ravel()
    inv = np.divide(1.0, degree, out=np.zeros_like(degree), where=degree > 0)
    return (sparse.diags(inv) @ adjacency @ membership_matrix(membership)).tocsr()


def node_predominance(adjacency: sparse.spmatrix, membership: np.ndarray) -> sparse.csr_matrix:
    """NP(u, C) = Σ_{v∈C} w(u,v) / Σ_{v∈C} d(v): how much of community C's total weight touches u.

    Returns:
        ``[node, community]`` CSR matrix; large values mark a community's central words.
    """
    adjacency, membership = _check_membership(adjacency, membership)
    member = membership_matrix(membership)
    links = (adjacency @ member).tocsr()                             # [node, community]: Σ_{v∈C} w(u,v)
    weight = np.asarray(links.sum(axis=0)).ravel()                   # [community]: Σ_{v∈C} d(v)
    inv = np.divide(1.0, weight, out=np.zeros_like(weight), where=weight > 0)
    return (links @ sparse.diags(inv)).tocsr()


def sparsify(vectors: sparse.spmatrix, k: int) -> sparse.csr_matrix:
    """Keep each row's ``k`` largest values (ties: lower column first) and zero the rest.

    >>> sparsify(sparse.csr_matrix([[0.1, 0.5, 0.4], [0.0, 0.3, 0.0]]), 1).toarray().tolist()
    [[0.0, 0.5, 0.0], [0.0, 0.3, 0.0]]
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (dimensions kept per word), got {k!r}")
    csr = sparse.csr_matrix(vectors, copy=True)
    csr.eliminate_zeros()
    csr.sort_indices()
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    order = np.lexsort((csr.indices, -csr.data, rows))               # by row, then value desc, then column
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - csr.indptr[rows[order]]
    keep = rank < k
    return sparse.csr_matrix((csr.data[keep], (rows[keep], csr.indices[keep])), shape=csr.shape)


def filter_dimensions(vectors: sparse.spmatrix, *, min_nnz: int = 1,
                      max_nnz: int | None = None) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Drop the dimensions used by fewer than ``min_nnz`` or more than ``max_nnz`` words.

    Returns:
        ``(vectors[:, kept], kept)``: the filtered ``[word, kept_dim]`` matrix and the kept column indices.
    """
    csr = sparse.csr_matrix(vectors)
    nnz = np.diff(csr.tocsc().indptr)
    keep = nnz >= min_nnz
    if max_nnz is not None:
        keep &= nnz <= max_nnz
    kept = np.flatnonzero(keep)
    if kept.size == 0:
        raise ValueError(f"no dimension has between {min_nnz} and {max_nnz} non-zeros; relax the bounds")
    return csr[:, kept].tocsr(), kept


# ---------------------------------------------------------------------------------------------
# Hierarchy of communities, and a null model
# ---------------------------------------------------------------------------------------------


def quotient_graph(adjacency: sparse.spmatrix, membership: np.ndarray) -> sparse.csr_matrix:
    """The graph of communities: ``Q = Mᵀ A M``, Q[c, d] = weight between c and d, Q[c, c] = 2 × weight inside c.

    Row sums of Q are the communities' total degrees, so modularity on Q equals modularity on A for
    any partition that keeps each community whole (the aggregation step of Louvain).

    >>> A = sparse.csr_matrix(np.array([[0, 2, 1], [2, 0, 0], [1, 0, 0]], float))
    >>> quotient_graph(A, np.array([0, 0, 1])).toarray().tolist()
    [[4.0, 1.0], [1.0, 0.0]]
    """
    adjacency, membership = _check_membership(adjacency, membership)
    member = membership_matrix(membership)
    return (member.T @ adjacency @ member).tocsr()


def nesting(fine: np.ndarray, coarse: np.ndarray, *, per_community: bool = False):
    """How well a fine partition nests in a coarse one: the share of words whose fine community's
    majority lies in the same coarse community as they do.

    Each fine community is mapped to the coarse community holding most of its words; the score is the
    share of all words that agree with that map (1.0: every fine community lies inside one coarse one).

    Args:
        fine, coarse: ``[vocab]`` memberships of the same words (ints >= 0).
        per_community: also return ``[fine community]`` shares and ``[fine community]`` parents.

    Returns:
        the share (float), or ``(share, shares, parents)`` when ``per_community``.

    >>> nesting(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 0, 0, 0, 1, 1]))
    1.0
    >>> nesting(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))
    0.75
    """
    fine, coarse = np.asarray(fine), np.asarray(coarse)
    if fine.shape != coarse.shape or fine.ndim != 1 or fine.size == 0:
        raise ValueError(f"fine and coarse must be [vocab] memberships of the same words, got {fine.shape}, "
                         f"{coarse.shape}")
    if not (np.issubdtype(fine.dtype, np.integer) and np.issubdtype(coarse.dtype, np.integer)) or min(
            fine.min(), coarse.min()) < 0:
        raise ValueError("memberships must be non-negative ints (one community id per word)")
    counts = sparse.coo_matrix((np.ones(fine.size), (fine, coarse))).tocsr()   # [fine, coarse] word counts
    best = np.asarray(counts.max(axis=1).todense()).ravel()
    sizes = np.asarray(counts.sum(axis=1)).ravel()
    share = float(best.sum() / fine.size)
    if not per_community:
        return share
    parents = np.asarray(counts.argmax(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        return share, best / sizes, parents


@dataclass
class CommunityHierarchy:
    """Nested partitions of one graph, finest first: every community of level ``i`` lies inside one of level ``i + 1``.

    Attributes:
        levels: ``[level][word]`` memberships, finest first, each numbered by decreasing size.
        gammas: ``[level]`` the resolution that produced each level.
        parents: ``[level - 1][community]`` the community of the next level that holds each community.
    """

    levels: list[np.ndarray]
    gammas: list[float]
    parents: list[np.ndarray] = field(init=False)

    def __post_init__(self):
        self.parents = [nesting(f, c, per_community=True)[2] for f, c in pairwise(self.levels)]

    @property
    def sizes(self) -> list[int]:
        """Number of communities at each level, finest first."""
        return [int(m.max()) + 1 for m in self.levels]

    def nesting(self) -> list[float]:
        """:func:`nesting` of each level in the next (1.0 when the levels nest exactly)."""
        return [nesting(f, c) for f, c in pairwise(self.levels)]

    def children(self, level: int, community: int) -> np.ndarray:
        """The communities of level ``level - 1`` inside ``community`` of level ``level``."""
        if not 1 <= level < len(self.levels):
            raise ValueError(f"level must be in [1, {len(self.levels)}) (level 0 has no children), got {level!r}")
        return np.flatnonzero(self.parents[level - 1] == community)


def community_hierarchy(adjacency: sparse.spmatrix, *, gamma: float = 5.0, coarse_gammas: Sequence[float] = (1.0,),
                        seed: int = 0) -> CommunityHierarchy:
    """Nested SINr dimensions: Louvain's own levels at ``gamma``, then coarser levels that merge whole communities.

    Louvain's levels nest by construction (each pass merges the previous pass's communities). For
    each resolution in ``coarse_gammas`` the last level's communities are merged further by Louvain on
    the :func:`quotient_graph`, so every level is a partition of the words into unions of the
    communities below it: a tree of dimensions. Independent runs at two resolutions do not nest in
    general (measure it with :func:`nesting`).

    Args:
        adjacency: ``[vocab, vocab]`` PMI-filtered co-occurrence graph (no isolated words).
        gamma: resolution of the fine levels (Chapter 2's γ).
        coarse_gammas: decreasing resolutions for the coarse levels (each level is kept only if it
            merges something).
        seed: seed of every Louvain run.

    Returns:
        a :class:`CommunityHierarchy`; ``node_recall(adjacency, h.levels[i])`` gives the vectors of level ``i``.

    Introduced in nbs/02_sinr_embeddings.ipynb; meant for classifiers that read coarse then fine dimensions.
    """
    adjacency = _check_adjacency(adjacency)
    gammas = [float(g) for g in coarse_gammas]
    if any(not np.isfinite(g) or g <= 0 for g in gammas) or any(b >= a for a, b in pairwise([gamma, *gammas])):
        raise ValueError(f"coarse_gammas must be positive and decreasing below gamma={gamma}, got {coarse_gammas!r}")
    levels = louvain_levels(adjacency, gamma=gamma, seed=seed)
    level_gammas = [float(gamma)] * len(levels)
    for g in gammas:
        top = levels[-1]
        merged = _renumber(_igraph_louvain(quotient_graph(adjacency, top), g, seed, levels=False, loops=True))
        if merged.max() + 1 < top.max() + 1:
            levels.append(_renumber(merged[top]))
            level_gammas.append(g)
    return CommunityHierarchy(levels, level_gammas)


def shuffled_membership(membership: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """A null model of a partition: the same community sizes, the words dealt out at random.

    Node recall on the shuffled partition keeps SINr's sparsity and number of dimensions but none of
    its communities, so it shows what the measures give for structure-free dimensions.

    >>> m = np.array([0, 0, 0, 1, 1, 2])
    >>> np.bincount(shuffled_membership(m, seed=1)).tolist()
    [3, 2, 1]
    """
    membership = np.asarray(membership)
    if membership.ndim != 1 or not np.issubdtype(membership.dtype, np.integer):
        raise ValueError(f"membership must be a [vocab] int array, got {membership.dtype} {membership.shape}")
    return np.random.default_rng(seed).permutation(membership)


def keep_top(vectors, k) -> sparse.csr_matrix:
    """Sparsify a dense embedding like SINr: keep each row's ``k`` largest *positive* values, zero the rest.

    Args:
        vectors: ``[word, dim]`` dense array.
        k: an int, or ``[word]`` ints (e.g. each word's number of non-zeros in another embedding).

    Returns:
        ``[word, dim]`` CSR matrix with at most ``k`` non-negative values per row (ties: lower column first).

    >>> keep_top(np.array([[0.2, -0.9, 0.5], [0.1, 0.3, 0.2]]), [1, 2]).toarray().tolist()
    [[0.0, 0.0, 0.5], [0.0, 0.3, 0.2]]
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"vectors must be a dense [word, dim] array, got shape {x.shape}")
    k = np.broadcast_to(np.asarray(k), (x.shape[0],))
    if not np.issubdtype(k.dtype, np.integer) or k.min() < 0:
        raise ValueError("k must be a non-negative int or one non-negative int per row")
    order = np.argsort(-x, axis=1, kind="stable")                          # [word, rank]
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(x.shape[1])[None, :].repeat(x.shape[0], 0), axis=1)
    keep = (rank < k[:, None]) & (x > 0)
    return sparse.csr_matrix(np.where(keep, x, 0.0))


def nonnegative_sparse_code(vectors, n_components: int, k, *, alpha: float = 0.1, epochs: int = 3,
                            seed: int = 0) -> sparse.csr_matrix:
    """NNSE-style baseline: a dictionary learnt on dense vectors, non-negative sparse codes, top-``k`` per word.

    Learns ``vectors ≈ codes @ dictionary`` with codes >= 0 and an L1 penalty ``alpha``
    (scikit-learn's ``MiniBatchDictionaryLearning``, Mairal et al. 2009), then keeps each word's ``k``
    largest codes (:func:`keep_top`) so that the result is exactly as sparse as the embedding compared.
    Murphy et al. (2012) learn NNSE on corpus statistics in the same way.

    Args:
        vectors: ``[word, d]`` dense vectors (e.g. :func:`ppmi_svd`); rows are scaled to unit norm first.
        n_components: number of dimensions (atoms).
        k: an int or ``[word]`` ints, non-zeros kept per word.
        alpha: L1 penalty of the codes; epochs: passes over the words; seed: seed of the learning.

    Returns:
        ``[word, n_components]`` CSR matrix of non-negative codes.
    """
    from sklearn.decomposition import MiniBatchDictionaryLearning

    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or not isinstance(n_components, int) or n_components < 2:
        raise ValueError(f"need [word, d] vectors and n_components >= 2, got {x.shape}, {n_components!r}")
    x = _normalise_rows(x)
    learner = MiniBatchDictionaryLearning(n_components=n_components, alpha=alpha, batch_size=256, max_iter=epochs,
                                          fit_algorithm="cd",
                                          positive_code=True, transform_algorithm="lasso_cd", transform_alpha=alpha,
                                          random_state=seed)
    codes = learner.fit(x).transform(x)
    return keep_top(codes, k)


# ---------------------------------------------------------------------------------------------
# The interpretable embedding
# ---------------------------------------------------------------------------------------------


def _normalise_rows(x) -> np.ndarray | sparse.csr_matrix:
    if sparse.issparse(x):
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return (sparse.diags(inv) @ x).tocsr()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)


@dataclass
class SinrEmbedding:
    """Sparse word vectors whose dimensions are communities of words.

    Attributes:
        words: ``[word]`` vocabulary (words isolated by the PMI filter are not in it).
        vectors: ``[word, dim]`` CSR node-recall matrix (sparsified and filtered as built).
        membership: ``[word]`` dimension of each word's own community, -1 if that dimension was filtered out.
        predominance: ``[word, dim]`` node predominance (names dimensions by their central words), or None.
        info: how the embedding was built (window, γ, timings, ...).
    """

    words: tuple[str, ...]
    vectors: sparse.csr_matrix
    membership: np.ndarray
    predominance: sparse.csr_matrix | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.vectors.shape[0] != len(self.words) or self.membership.shape != (len(self.words),):
            raise ValueError(f"vectors {self.vectors.shape} and membership {self.membership.shape} must have one "
                             f"row per word ({len(self.words)})")
        self.index = {w: i for i, w in enumerate(self.words)}
        self._unit = _normalise_rows(self.vectors)

    @property
    def n_dims(self) -> int:
        return int(self.vectors.shape[1])

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def _id(self, word: str) -> int:
        try:
            return self.index[word]
        except KeyError:
            raise KeyError(f"{word!r} is not in the vocabulary ({len(self.words)} words, lower-case, stop words "
                           "and rare words removed); check the spelling or lower min_count") from None

    def vector(self, word: str) -> np.ndarray:
        """The dense ``[dim]`` vector of a word."""
        return self.vectors[self._id(word)].toarray().ravel()

    def similarity(self, first: str, second: str) -> float:
        """Cosine similarity of two words (0 when either vector is empty)."""
        a, b = self._unit[self._id(first)], self._unit[self._id(second)]
        return float(a.multiply(b).sum())

    def most_similar(self, word: str, topn: int = 10) -> list[tuple[str, float]]:
        """The ``topn`` nearest words by cosine similarity, the word itself excluded."""
        if not isinstance(topn, int) or topn < 1:
            raise ValueError(f"topn must be a positive int, got {topn!r}")
        i = self._id(word)
        sims = np.asarray((self._unit @ self._unit[i].T).todense()).ravel()
        sims[i] = -np.inf
        best = np.argsort(-sims, kind="stable")[:topn]
        return [(self.words[j], float(sims[j])) for j in best]

    def _check_dim(self, dim: int) -> int:
        if not isinstance(dim, (int, np.integer)) or not 0 <= dim < self.n_dims:
            raise ValueError(f"dimension must be an int in [0, {self.n_dims}), got {dim!r}")
        return int(dim)

    def dimension_words(self, dim: int, k: int = 10, *, by: str = "recall") -> list[tuple[str, float]]:
        """The ``k`` words with the highest value on a dimension: its descriptors.

        Args:
            dim: dimension index.
            k: how many words.
            by: ``"recall"`` (the words most devoted to the community, SINr's "stereotypes") or
                ``"predominance"`` (the community's central words; needs ``predominance``).
        """
        dim = self._check_dim(dim)
        if by not in ("recall", "predominance"):
            raise ValueError(f"by must be 'recall' or 'predominance', got {by!r}")
        source = self.vectors if by == "recall" else self.predominance
        if source is None:
            raise ValueError("this embedding was built without node predominance; use by='recall'")
        column = source[:, dim].toarray().ravel()
        best = np.argsort(-column, kind="stable")[:k]
        return [(self.words[j], float(column[j])) for j in best if column[j] > 0]

    def describe(self, word: str, dims: int = 5, k: int = 5) -> list[tuple[int, float, list[str]]]:
        """A word's strongest dimensions: ``(dim, value, descriptor words)`` by decreasing value.

        Dimensions are named by their central words (node predominance) when the embedding has
        them, else by their most devoted words (node recall).
        """
        row = self.vectors[self._id(word)]
        order = np.argsort(-row.data, kind="stable")[:dims]
        return [(int(row.indices[j]), float(row.data[j]), self.label(row.indices[j], k)) for j in order]

    def label(self, dim: int, k: int = 5) -> list[str]:
        """A dimension's name: its ``k`` central words (node predominance), or its most devoted words
        (node recall) when the embedding has no predominance."""
        by = "recall" if self.predominance is None else "predominance"
        return [w for w, _ in self.dimension_words(dim, k, by=by)]

    def sparsity(self) -> dict[str, float]:
        """Vocabulary size, number of dimensions, mean non-zeros per word, and the share of non-zero entries."""
        nnz = np.diff(self.vectors.indptr)
        return {"words": len(self.words), "dims": self.n_dims, "mean_nnz_per_word": float(nnz.mean()),
                "max_nnz_per_word": int(nnz.max()),
                "pct_nonzero": 100.0 * self.vectors.nnz / max(1, self.vectors.shape[0] * self.vectors.shape[1])}

    def sparsified(self, k: int) -> SinrEmbedding:
        """A copy with each word's top-``k`` dimensions only (:func:`sparsify`)."""
        return SinrEmbedding(self.words, sparsify(self.vectors, k), self.membership.copy(), self.predominance,
                             dict(self.info, topk=k))

    def filtered(self, *, min_nnz: int = 1, max_nnz: int | None = None) -> SinrEmbedding:
        """A copy without the dimensions used by too few or too many words (:func:`filter_dimensions`)."""
        vectors, kept = filter_dimensions(self.vectors, min_nnz=min_nnz, max_nnz=max_nnz)
        remap = np.full(self.n_dims, -1)
        remap[kept] = np.arange(kept.size)
        member = np.where(self.membership >= 0, remap[np.maximum(self.membership, 0)], -1)
        pred = None if self.predominance is None else self.predominance[:, kept].tocsr()
        return SinrEmbedding(self.words, vectors, member, pred, dict(self.info, min_nnz=min_nnz, max_nnz=max_nnz))


class Timings(NamedTuple):
    graph_s: float
    communities_s: float
    vectors_s: float


def train(corpus: Corpus, *, window: int = 5, gamma: float = 1.0, min_pmi: float = 0.0, seed: int = 0,
          cooc: sparse.csr_matrix | None = None, mode: str = "multilevel",
          membership: np.ndarray | None = None) -> SinrEmbedding:
    """Build SINr vectors end to end: co-occurrence → PMI filter → Louvain(γ) → node recall.

    Words left without an edge by the PMI filter are dropped (as the SINr package keeps only the
    non-isolated nodes). Sparsify and filter the result with :meth:`SinrEmbedding.sparsified` and
    :meth:`SinrEmbedding.filtered`.

    Args:
        corpus: a :class:`Corpus`.
        window: co-occurrence window, tokens on each side.
        gamma: Louvain resolution.
        min_pmi: PMI threshold for keeping an edge.
        seed: seed of the community detection.
        cooc: the corpus's co-occurrence matrix, when already computed with this window.
        mode: ``"multilevel"`` (full Louvain) or ``"one-level"`` (its first pass, as the SINr package's
            networkit PLM with ``recurse=False``); see :func:`louvain`.
        membership: the communities of the filtered graph's words, when :func:`louvain` already ran on
            that graph with this ``gamma``, ``seed`` and ``mode`` (Louvain is then skipped and
            ``info["timings"].communities_s`` is 0); one community per word of the returned embedding.

    Returns:
        a :class:`SinrEmbedding` with ``info["timings"]`` = (graph, communities, vectors) seconds.

    Prouteau et al. 2021 (SINr); taught in nbs/02_sinr_embeddings.ipynb.
    """
    t0 = time.perf_counter()
    if cooc is None:
        cooc = cooccurrence(corpus, window=window)
    elif cooc.shape != (len(corpus.words),) * 2:
        raise ValueError(f"cooc is {cooc.shape} but the corpus has {len(corpus.words)} words")
    graph = pmi_filter(cooc, min_pmi=min_pmi)
    alive = np.flatnonzero(np.diff(graph.indptr) > 0)
    graph = graph[alive][:, alive].tocsr()
    t1 = time.perf_counter()
    if membership is None:
        membership = louvain(graph, gamma=gamma, seed=seed, mode=mode)
    else:
        membership = np.asarray(membership)
        if membership.shape != (alive.size,):
            raise ValueError(f"membership must give one community to each of the {alive.size} words left by the "
                             f"PMI filter, got shape {membership.shape}")
    t2 = time.perf_counter()
    vectors = node_recall(graph, membership)
    pred = node_predominance(graph, membership)
    t3 = time.perf_counter()
    info = {"window": window, "gamma": gamma, "min_pmi": min_pmi, "seed": seed, "mode": mode, "edges": graph.nnz // 2,
            "dropped_isolated": len(corpus.words) - alive.size,
            "timings": Timings(t1 - t0, t2 - t1, t3 - t2)}
    return SinrEmbedding(tuple(corpus.words[i] for i in alive), vectors, membership, pred, info)


BOOK_CONFIG = {"min_count": 5, "window": 5, "gamma": 5.0, "topk": 50, "min_nnz": 10, "seed": 0}
"""Chapter 2's configuration of SINr on the book corpus."""


def book_embedding() -> SinrEmbedding:
    """The SINr embedding built in Chapter 2 (:data:`BOOK_CONFIG`), rebuilt in a few seconds from the cached corpus.

    Used by nbs/03_interpretable_classifier.ipynb.
    """
    c = BOOK_CONFIG
    emb = train(book_corpus(min_count=c["min_count"]), window=c["window"], gamma=c["gamma"], seed=c["seed"])
    return emb.sparsified(c["topk"]).filtered(min_nnz=c["min_nnz"])


def resolution_sweep(corpus: Corpus, gammas: Sequence[float], pairs: Sequence[tuple[str, str, float]], *,
                     window: int = 5, topk: int = 50, min_nnz: int = 10, seed: int = 0,
                     cooc: sparse.csr_matrix | None = None) -> dict[str, np.ndarray]:
    """Chapter 2's resolution sweep: SINr trained at each γ, then sparsified, filtered and scored.

    For each resolution: :func:`train` (an independent Louvain run), ``.sparsified(topk).filtered(min_nnz=...)``,
    Spearman's ρ against ``pairs`` (:func:`similarity_correlation`) and :func:`dist_ratio` (intruders drawn
    under ``seed``).

    Args:
        corpus: the :class:`Corpus`.
        gammas: the Louvain resolutions.
        pairs: ``(word1, word2, score)`` human judgements (WS353 in the chapter).
        window, topk, min_nnz, seed: co-occurrence window, values kept per word, minimum words per
            dimension, seed of Louvain and of the intruder draws.
        cooc: the corpus's co-occurrence matrix, when already computed with this window.

    Returns:
        ``{"gammas": [g], "dims": [g], "ws353": [g], "dist_ratio": [g], "membership": [g, word], "seconds": [g]}``:
        each run's number of dimensions after filtering, ρ, DistRatio, the full partition (the community of
        every word of :func:`train`'s vocabulary, before filtering) and its wall time.
    """
    cooc = cooccurrence(corpus, window=window) if cooc is None else cooc
    rows = {"gammas": [], "dims": [], "ws353": [], "dist_ratio": [], "membership": [], "seconds": []}
    for gamma in gammas:
        t0 = time.perf_counter()
        full = train(corpus, window=window, gamma=float(gamma), seed=seed, cooc=cooc)
        emb = full.sparsified(topk).filtered(min_nnz=min_nnz)
        rows["ws353"].append(similarity_correlation(emb.vectors, emb.index, pairs)[0])
        rows["dist_ratio"].append(dist_ratio(emb.vectors, seed=seed))
        rows["gammas"].append(float(gamma))
        rows["dims"].append(emb.n_dims)
        rows["membership"].append(full.membership)
        rows["seconds"].append(time.perf_counter() - t0)
    return {k: np.asarray(v, dtype=np.int64 if k in ("dims", "membership") else np.float64) for k, v in rows.items()}


SWEEP_VERSION = 1


def resolution_sweep_results(corpus: Corpus, gammas: Sequence[float], pairs: Sequence[tuple[str, str, float]], *,
                             window: int = 5, topk: int = 50, min_nnz: int = 10,
                             seed: int = 0) -> dict[str, np.ndarray]:
    """:func:`resolution_sweep`, cached and committed with the book (npz, hash-verified, named by its recipe).

    The sweep retrains SINr at every resolution (about half a minute on two cores); the chapter loads
    this result and recomputes one resolution live to check it. The partitions are stored as int16.

    Returns:
        the dict of :func:`resolution_sweep` (memberships as int64 again).
    """
    import igraph

    recipe = {"v": SWEEP_VERSION, "corpus": corpus.fingerprint(), "gammas": [float(g) for g in gammas],
              "pairs": common.content_hash([list(p) for p in pairs]), "window": window, "topk": topk,
              "min_nnz": min_nnz, "seed": seed, "igraph": ".".join(igraph.__version__.split(".")[:2])}
    path = common.cache_dir("results", "ch2") / f"sweep-{common.content_hash(recipe)}.npz"

    def build(out: Path) -> None:
        result = resolution_sweep(corpus, gammas, pairs, window=window, topk=topk, min_nnz=min_nnz, seed=seed)
        if result["membership"].max() > np.iinfo(np.int16).max:
            raise ValueError("more communities than int16 holds; store the partitions as int32")
        result["membership"] = result["membership"].astype(np.int16)
        with open(out, "wb") as fh:
            np.savez_compressed(fh, **result)

    with np.load(common.cached_file(path, build, committed=True)) as data:
        result = {k: data[k] for k in data.files}
    result["membership"] = result["membership"].astype(np.int64)
    return result


# ---------------------------------------------------------------------------------------------
# Baselines and evaluation (any [word, dim] matrix)
# ---------------------------------------------------------------------------------------------


def ppmi_svd(cooc: sparse.spmatrix, dim: int, *, seed: int = 0) -> np.ndarray:
    """Dense baseline: positive PMI (the usual definition) factorised by truncated SVD, U·√S (Levy et al. 2015).

    Returns:
        ``[vocab, dim]`` float64 vectors; the first ``d`` columns are the ``d``-dimensional embedding
        for any ``d <= dim`` (the components come out sorted by singular value).
    """
    from sklearn.utils.extmath import randomized_svd

    cooc = _check_adjacency(cooc)
    if not isinstance(dim, int) or not 1 <= dim < min(cooc.shape):
        raise ValueError(f"dim must be an int in [1, {min(cooc.shape)}), got {dim!r}")
    scores = pmi(cooc)
    scores.data += np.log(2.0)                                        # back to the usual, ordered-pair PMI
    scores.data = np.maximum(scores.data, 0.0)
    scores.eliminate_zeros()
    u, s, _ = randomized_svd(scores, dim, n_iter=5, random_state=seed)
    return u * np.sqrt(s)


def word2vec(corpus: Corpus, *, dim: int = 300, window: int = 5, epochs: int = 15, negative: int = 5,
             seed: int = 0) -> tuple[np.ndarray, tuple[str, ...]]:
    """Dense baseline: skip-gram word2vec (gensim) on the same documents, cached by content hash.

    Trained with one worker thread so that the vectors are identical from run to run (gensim's
    multi-threaded training is not deterministic).

    Returns:
        ``(vectors, words)``: ``[vocab, dim]`` float32 vectors and their words (gensim's order).

    Mikolov et al. 2013; the word2vec baseline of nbs/02_sinr_embeddings.ipynb.
    """
    from gensim.models import Word2Vec

    if not isinstance(dim, int) or dim < 1 or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"dim and epochs must be positive ints, got {dim!r}, {epochs!r}")
    recipe = {"corpus": corpus.fingerprint(), "dim": dim, "window": window, "epochs": epochs, "negative": negative,
              "seed": seed, "sg": 1, "gensim": "4.4"}
    path = common.cache_dir("models", "word2vec") / f"w2v-{common.content_hash(recipe)}.npz"

    def build(out: Path) -> None:
        model = Word2Vec(corpus.documents(), vector_size=dim, window=window, min_count=1, sg=1, negative=negative,
                         epochs=epochs, workers=1, seed=seed)
        with open(out, "wb") as fh:
            np.savez(fh, vectors=model.wv.vectors, words=np.array(json.dumps(model.wv.index_to_key)))

    with np.load(common.cached_file(path, build, committed=True)) as data:   # committed: training takes ~1 min
        return data["vectors"], tuple(json.loads(str(data["words"])))


def sparse_code_baseline(corpus: Corpus, dim: int, k, *, window: int = 5, alpha: float = 0.03, epochs: int = 2,
                         seed: int = 0) -> sparse.csr_matrix:
    """The NNSE-style baseline of Chapter 2, cached: :func:`nonnegative_sparse_code` of the corpus's :func:`ppmi_svd`.

    Learning the dictionary takes about a minute on two cores, so the result is committed with the book
    (hash-verified, named by the hash of its recipe: corpus, dimensions, per-word sparsity, options).

    Args:
        corpus: the :class:`Corpus` (its rows are ``corpus.words``).
        dim: dimensions of the SVD and of the code.
        k: an int or ``[vocab]`` ints, non-zeros kept per word.
        window, alpha, epochs, seed: co-occurrence window and the options of :func:`nonnegative_sparse_code`.

    Returns:
        ``[vocab, dim]`` CSR matrix of non-negative codes, rows in ``corpus.words`` order.
    """
    import hashlib

    import sklearn

    k = np.broadcast_to(np.asarray(k), (len(corpus.words),))
    k_hash = hashlib.sha256(k.astype(np.int64).tobytes()).hexdigest()[:16]
    recipe = {"corpus": corpus.fingerprint(), "dim": dim, "k": k_hash,
              "window": window, "alpha": alpha, "epochs": epochs, "seed": seed, "sklearn": sklearn.__version__[:3]}
    path = common.cache_dir("models", "sinr") / f"nnse-{common.content_hash(recipe)}.npz"

    def build(out: Path) -> None:
        vectors = ppmi_svd(cooccurrence(corpus, window=window), dim, seed=seed)
        codes = nonnegative_sparse_code(vectors, dim, k, alpha=alpha, epochs=epochs, seed=seed)
        with open(out, "wb") as fh:
            sparse.save_npz(fh, codes)

    return sparse.load_npz(common.cached_file(path, build, committed=True)).tocsr()


def similarity_correlation(vectors, words: Sequence[str] | dict[str, int],
                           pairs: Sequence[tuple[str, str, float]]) -> tuple[float, float]:
    """Spearman correlation between cosine similarities and human scores, over the covered pairs.

    Args:
        vectors: ``[word, dim]`` dense array or sparse matrix.
        words: the row labels (a sequence, or a word → row dict).
        pairs: ``(word1, word2, score)`` triples (lower-cased before lookup).

    Returns:
        ``(rho, coverage)``: Spearman's ρ and the fraction of pairs whose two words are in the vocabulary.
    """
    cos, gold, coverage = _pair_cosines(vectors, words, pairs)
    return float(stats.spearmanr(cos, gold).statistic), coverage


def _pair_cosines(vectors, words, pairs) -> tuple[np.ndarray, np.ndarray, float]:
    """``([pair] cosines, [pair] human scores, coverage)`` over the pairs whose two words are known."""
    index = words if isinstance(words, dict) else {w: i for i, w in enumerate(words)}
    if not pairs:
        raise ValueError("pairs is empty; pass (word1, word2, score) triples, e.g. assets.word_similarity()")
    covered = [(index[a.lower()], index[b.lower()], s) for a, b, s in pairs
               if a.lower() in index and b.lower() in index]
    if len(covered) < 3:
        raise ValueError(f"only {len(covered)} of {len(pairs)} pairs are in the vocabulary; a correlation needs 3+")
    unit = _normalise_rows(vectors)
    i, j, gold = (np.array(x) for x in zip(*covered, strict=True))
    if sparse.issparse(unit):
        cos = np.asarray(unit[i].multiply(unit[j]).sum(axis=1)).ravel()
    else:
        cos = (unit[i] * unit[j]).sum(axis=1)
    return cos, gold.astype(np.float64), len(covered) / len(pairs)


def similarity_ci(vectors, words: Sequence[str] | dict[str, int], pairs: Sequence[tuple[str, str, float]], *,
                  n_resamples: int = 1000, seed: int = 0):
    """:func:`similarity_correlation`'s Spearman ρ with a bootstrap interval over the covered word pairs.

    Returns:
        a :class:`helpers.stats.Estimate` (percentile bootstrap, 95 %, resampling pairs).
    """
    from helpers.stats import bootstrap_ci

    cos, gold, _ = _pair_cosines(vectors, words, pairs)

    def rho(rows):
        rows = rows.astype(np.int64)
        return float(stats.spearmanr(cos[rows], gold[rows]).statistic)

    return bootstrap_ci(np.arange(cos.size), statistic=rho, n_resamples=n_resamples, seed=seed)


def intrusion_sets(vectors, *, top: int = 5, bottom: float = 0.5, top_share: float = 0.1,
                   seed: int = 0, rule: str = "book") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Word-intrusion sets: each dimension's ``top`` words plus one intruder (Chang et al. 2009; Sun et al. 2016).

    For each dimension d: its ``top`` highest words, and an intruder drawn at random among the words
    that are in the bottom ``bottom`` share of d *and* among the top ``top_share`` of some other
    dimension (with a positive value there): a word that is salient elsewhere, so it is not
    recognisable by rarity alone. Dimensions without such a word get no set.

    Args:
        vectors: ``[word, dim]`` dense array or sparse matrix.
        top, bottom, top_share: as above (SINr's defaults: 5, 50 %, 10 %).
        seed: seed of the intruder draws.
        rule: ``"book"`` (above: "top of another dimension" needs a positive value there) or
            ``"package"``, the SINr package's ``pick_intruder`` rule (``sinr.text.evaluate.dist_ratio``):
            ranks alone decide, so a dimension with fewer non-zeros than its top share also counts
            zero-valued words as its top words (numpy's ``argpartition`` picks them; here ties are
            broken at random under ``seed``), the bottom share is a count of ranks, and the top words
            of a dimension with fewer than ``top`` non-zeros include zeros.

    Returns:
        ``(sets, dims)``: ``[n_sets, top + 1]`` word indices, the intruder last, and the ``[n_sets]``
        dimension of each set.
    """
    n, d = vectors.shape
    if n < 2 * top or d < 2:
        raise ValueError(f"need at least {2 * top} words and 2 dimensions, got shape {(n, d)}")
    if not 0 < bottom < 1 or not 0 < top_share < 1:
        raise ValueError(f"bottom and top_share must lie in (0, 1), got {bottom}, {top_share}")
    if rule not in ("book", "package"):
        raise ValueError(f"rule must be 'book' or 'package', got {rule!r}")
    dense = vectors.toarray() if sparse.issparse(vectors) else np.asarray(vectors, dtype=np.float64)
    rng = np.random.default_rng(seed)
    if rule == "package":
        return _package_intrusion_sets(dense, top, bottom, top_share, rng)
    # Selection, not sorting: each dimension's two cut-off values and top words come from np.partition
    # (linear time), with the same ties as a stable sort of the column (equal values: lower word first).
    n_top = max(1, int(round(top_share * n)))
    lowest_top = n - 1 - min(n - 1, int((1 - bottom) * n))              # ascending position of the bottom cut
    in_top = np.empty((d, n), dtype=bool)                                 # [dim, word]: in the top share
    in_bottom = np.empty((d, n), dtype=bool)                              # [dim, word]: in the bottom share
    tops = np.empty((d, top), dtype=np.int64)                             # [dim, top]: its top words
    for start, chunk in _column_chunks(dense):
        part = np.partition(chunk, sorted({n - n_top, lowest_top, n - top}), axis=1)
        rows = slice(start, start + chunk.shape[0])
        in_top[rows] = (chunk >= part[:, [n - n_top]]) & (chunk > 0)
        # the bottom share, ties at the boundary included (a sparse dimension's bottom is all its zeros)
        in_bottom[rows] = chunk <= part[:, [lowest_top]]
        for i, col in enumerate(chunk):
            tops[start + i] = _largest(col, top, part[i, n - top])
    top_count = in_top.sum(axis=0)                                        # [word]: dims where it is top
    sets, dims = [], []
    for dim in range(d):
        elsewhere = top_count - in_top[dim]                               # top of another dimension
        candidates = np.flatnonzero(in_bottom[dim] & (elsewhere > 0))
        if candidates.size:
            sets.append(np.append(tops[dim], rng.choice(candidates)))
            dims.append(dim)
    return np.array(sets, dtype=np.int64).reshape(-1, top + 1), np.array(dims, dtype=np.int64)


def _column_chunks(dense: np.ndarray, size: int = 256):
    """``(first column, [column, word] contiguous copy)`` for blocks of ``size`` columns of ``dense``."""
    for start in range(0, dense.shape[1], size):
        yield start, np.ascontiguousarray(dense[:, start:start + size].T)


def _largest(col: np.ndarray, k: int, kth_value: float) -> np.ndarray:
    """The ``k`` largest entries of ``col``, largest first, equal values by lower index: exactly
    ``np.argsort(-col, kind="stable")[:k]``, given ``kth_value``, the ``k``-th largest value."""
    above = np.flatnonzero(col > kth_value)
    idx = np.concatenate([above, np.flatnonzero(col == kth_value)[: k - above.size]])
    return idx[np.argsort(-col[idx], kind="stable")]


def _package_intrusion_sets(dense: np.ndarray, top: int, bottom: float, top_share: float,
                            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The SINr package's intruder rule, by ranks only (ties, zeros included, broken at random).

    Each dimension ranks the words by value, then by a random tie-breaker drawn once per call; ranks
    are found by selection (np.partition) rather than a full sort, with the same result.
    """
    n, d = dense.shape
    tie = rng.random(n)
    tie_rank = np.empty(n, dtype=np.int64)
    tie_rank[np.lexsort((np.arange(n), tie))] = np.arange(n)             # [word]: order of the tie-breaker
    n_top = int(round(top_share * n))
    n_bottom = int(round(bottom * n))
    kth = sorted({n - m for m in (n_top, n - n_bottom, top) if 0 < m < n})
    in_top = np.zeros((d, n), dtype=bool)                                 # [dim, word]: rank < n_top
    in_bottom = np.zeros((d, n), dtype=bool)                              # [dim, word]: rank >= n - n_bottom
    tops = np.empty((d, top), dtype=np.int64)                             # [dim, top]: words of rank < top
    for start, chunk in _column_chunks(dense):
        part = np.partition(chunk, kth, axis=1) if kth else chunk
        for i, col in enumerate(chunk):
            in_top[start + i] = _first_ranks(col, n_top, part[i], tie_rank)
            in_bottom[start + i] = ~_first_ranks(col, n - n_bottom, part[i], tie_rank)
            first = np.flatnonzero(_first_ranks(col, top, part[i], tie_rank))
            tops[start + i] = first[np.lexsort((tie_rank[first], -col[first]))]
    union = in_top.any(axis=0)                                            # [word]: in some dimension's top ranks
    sets, dims = [], []
    for dim in range(d):
        candidates = np.flatnonzero(union & in_bottom[dim])
        if candidates.size:
            sets.append(np.append(tops[dim], rng.choice(candidates)))
            dims.append(dim)
    return np.array(sets, dtype=np.int64).reshape(-1, top + 1), np.array(dims, dtype=np.int64)


def _first_ranks(col: np.ndarray, m: int, partitioned: np.ndarray, tie_rank: np.ndarray) -> np.ndarray:
    """``[word]`` mask of the ``m`` words ranked first in ``col``: by value (descending), then by ``tie_rank``.

    ``partitioned`` is ``col`` partitioned at position ``n - m`` (np.partition), which holds the ``m``-th
    largest value; the words tied at that value are split by their (distinct) tie ranks.
    """
    n = col.size
    if m <= 0 or m >= n:
        return np.full(n, m >= n)
    value = partitioned[n - m]
    mask = col > value
    at = np.flatnonzero(col == value)
    need = m - int(mask.sum())
    if need < at.size:
        at = at[np.argpartition(tie_rank[at], need - 1)[:need]] if need > 0 else at[:0]
    mask[at] = True
    return mask


def dist_ratio(vectors, *, top: int = 5, bottom: float = 0.5, top_share: float = 0.1, seed: int = 0,
               per_dimension: bool = False, rule: str = "book"):
    """Automated word intrusion: DistRatio = mean over dimensions of InterDist / IntraDist (Sun et al. 2016).

    On the sets of :func:`intrusion_sets`: IntraDist = mean cosine distance among a dimension's top
    words; InterDist = mean cosine distance between the intruder and the top words. Interpretable
    dimensions gather close words and push intruders away: DistRatio > 1, and the higher the better.

    Args:
        vectors: ``[word, dim]`` dense array or sparse matrix.
        top, bottom, top_share, seed, rule: as in :func:`intrusion_sets` (SINr's defaults: 5, 50 %, 10 %).
        per_dimension: also return the ``[dim]`` ratios (NaN where no intruder or no spread exists).

    Returns:
        the DistRatio (float), or ``(dist_ratio, ratios)`` when ``per_dimension``.
    """
    dense = vectors.toarray() if sparse.issparse(vectors) else np.asarray(vectors, dtype=np.float64)
    sets, dims = intrusion_sets(dense, top=top, bottom=bottom, top_share=top_share, seed=seed, rule=rule)
    unit = _normalise_rows(dense)
    ratios = np.full(vectors.shape[1], np.nan)
    for words, dim in zip(sets, dims, strict=True):
        tops, intruder = words[:top], words[top]
        block = unit[tops] @ unit[tops].T
        intra = 1.0 - block[np.triu_indices(top, 1)].mean()
        inter = 1.0 - (unit[tops] @ unit[intruder]).mean()
        if intra > 1e-12:
            ratios[dim] = inter / intra
    value = float(np.nanmean(ratios)) if np.isfinite(ratios).any() else float("nan")
    return (value, ratios) if per_dimension else value
