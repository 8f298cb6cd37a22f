"""The book's own data (helpers/data.py): shared splits are disjoint, balanced, repeatable."""

import pytest

from helpers import data
from helpers.attribution import AUSTEN_TITLES


def test_austen_passages_are_disjoint_balanced_and_repeatable():
    split = data.austen_passages(AUSTEN_TITLES, words=30, n_train=20, n_test=10, seed=0)
    again = data.austen_passages(AUSTEN_TITLES, words=30, n_train=20, n_test=10, seed=0)
    assert split.train == again.train and split.test == again.test
    assert len(split.train) == 4 * 20 and len(split.test) == 4 * 10
    assert not {p for p, _ in split.train} & {p for p, _ in split.test}
    assert sorted({label for _, label in split.test}) == [0, 1, 2, 3]
    assert all(len(p.split()) == 30 for p, _ in split.test)
    assert set(split.n_passages) == set(AUSTEN_TITLES)
    with pytest.raises(ValueError, match="unknown"):
        data.austen_passages(["Dracula"])
    with pytest.raises(ValueError, match=">= 1"):
        data.austen_passages(words=0)


def test_default_titles_are_all_six_novels_and_chapter_3_split_sizes():
    split = data.austen_passages(n_train=400, n_test=100)
    assert len(split.n_passages) == 6 and len(split.train) == 6 * 400 and len(split.test) == 6 * 100
