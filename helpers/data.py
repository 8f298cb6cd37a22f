"""The book's own data: splits and data sets that several chapters share.

A chapter that needs the same data as another imports it from here instead of copying the cell or
importing the other chapter's module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class AustenSplit(NamedTuple):
    """Train and test passages ``(text, label)`` and how many passages each novel has."""

    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    n_passages: dict[str, int]


def austen_passages(titles: Sequence[str] | None = None, *, words: int = 30, n_train: int = 300,
                    n_test: int = 100, seed: int = 0) -> AustenSplit:  # fmt: skip
    """Cut each novel into consecutive passages of ``words`` words and draw disjoint train/test sets.

    One permutation per novel (one ``numpy`` generator seeded once, novels in order) gives the first
    ``n_train`` passages to training and the next ``n_test`` to the test set, labelled by the novel's
    index in ``titles`` (default: all six novels, in the order :func:`helpers.assets.austen_novels` gives).

    The passages of Chapters 3 (six novels), 6c, 7 and 14 (four novels).
    """
    import numpy as np

    from helpers.assets import austen_novels

    novels = austen_novels()
    titles = list(novels) if titles is None else list(titles)
    unknown = [t for t in titles if t not in novels]
    if unknown or not titles:
        raise ValueError(f"titles must be novels among {sorted(novels)}, got unknown {unknown or 'none (empty)'}")
    if min(words, n_train, n_test) < 1:
        raise ValueError(f"words, n_train and n_test must be >= 1, got {words}, {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    train, test, counts = [], [], {}
    for label, title in enumerate(titles):
        tokens = novels[title].split()
        passages = [" ".join(tokens[i:i + words]) for i in range(0, len(tokens) - words + 1, words)]
        if len(passages) < n_train + n_test:
            raise ValueError(f"{title} has {len(passages)} passages of {words} words, fewer than {n_train + n_test}")
        order = rng.permutation(len(passages))
        train += [(passages[i], label) for i in order[:n_train]]
        test += [(passages[i], label) for i in order[n_train:n_train + n_test]]
        counts[title] = len(passages)
    return AustenSplit(train, test, counts)
