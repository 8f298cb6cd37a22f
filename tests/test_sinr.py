"""helpers.sinr: known answers on toy graphs with planted communities, properties, and bad input."""

from itertools import pairwise

import numpy as np
import pytest
from scipy import sparse

from helpers import sinr


def _two_triangles():
    """Nodes 0-2 and 3-5 form two weighted triangles joined by one light edge 2-3."""
    a = np.zeros((6, 6))
    for u, v, w in [(0, 1, 3), (0, 2, 2), (1, 2, 1), (3, 4, 2), (3, 5, 2), (4, 5, 4), (2, 3, 1)]:
        a[u, v] = a[v, u] = w
    return sparse.csr_matrix(a)


def test_louvain_recovers_planted_communities_and_nr_matches_hand_computation():
    adj = _two_triangles()
    membership = sinr.louvain(adj, gamma=1.0, seed=0)
    assert membership.tolist() == [0, 0, 0, 1, 1, 1]
    nr = sinr.node_recall(adj, membership).toarray()
    # node 2: degree 2 + 1 + 1 = 4, of which 3 inside its triangle and 1 towards node 3
    np.testing.assert_allclose(nr[2], [3 / 4, 1 / 4])
    np.testing.assert_allclose(nr[3], [1 / 5, 4 / 5])            # degree 2 + 2 + 1 = 5
    np.testing.assert_allclose(nr[0], [1, 0])
    np.testing.assert_allclose(nr.sum(axis=1), 1.0)
    npred = sinr.node_predominance(adj, membership).toarray()
    # community 0 has total degree 5 + 4 + 4 = 13 (nodes 0, 1, 2); node 3 sends it weight 1
    np.testing.assert_allclose(npred[3, 0], 1 / 13)
    np.testing.assert_allclose(npred[:, 0].sum(), 1.0)


def test_nr_rows_sum_to_one_except_isolated_nodes():
    rng = np.random.default_rng(0)
    dense = np.triu(rng.random((40, 40)) * (rng.random((40, 40)) < 0.2), 1)
    dense[7] = dense[:, 7] = 0                                      # node 7 is isolated
    adj = sparse.csr_matrix(dense + dense.T)
    membership = sinr.louvain(adj, gamma=1.0, seed=1)
    sums = np.asarray(sinr.node_recall(adj, membership).sum(axis=1)).ravel()
    degree = np.asarray(adj.sum(axis=1)).ravel()
    np.testing.assert_allclose(sums[degree > 0], 1.0)
    assert sums[7] == 0


def test_louvain_is_deterministic_under_a_seed_and_gamma_controls_granularity():
    rng = np.random.default_rng(0)
    dense = np.triu(rng.random((120, 120)) * (rng.random((120, 120)) < 0.1), 1)
    adj = sparse.csr_matrix(dense + dense.T)
    first = sinr.louvain(adj, gamma=2.0, seed=3)
    assert np.array_equal(first, sinr.louvain(adj, gamma=2.0, seed=3))
    assert len(np.unique(sinr.louvain(adj, gamma=0.5))) < len(np.unique(sinr.louvain(adj, gamma=8.0)))
    sizes = np.bincount(first)
    assert (np.diff(sizes) <= 0).all(), "communities are numbered by decreasing size"


def test_cooccurrence_counts_pairs_within_the_window_and_never_across_documents():
    corpus = sinr.corpus_from_documents(["alpha beta gamma alpha", "gamma delta"], min_count=1, stop_words=())
    w = corpus.index
    c1 = sinr.cooccurrence(corpus, window=1).toarray()
    assert c1[w["alpha"], w["beta"]] == 1 and c1[w["beta"], w["gamma"]] == 1
    assert c1[w["gamma"], w["alpha"]] == 1 and c1[w["gamma"], w["delta"]] == 1
    assert c1[w["alpha"], w["delta"]] == 0                          # "alpha" ends doc 1, "gamma" starts doc 2
    c2 = sinr.cooccurrence(corpus, window=3).toarray()
    assert c2[w["alpha"], w["gamma"]] == 2                          # distances 2 and 1
    assert np.array_equal(c2, c2.T) and np.all(np.diag(c2) == 0)   # alpha-alpha (distance 3) is not counted


def test_pmi_and_filter_follow_the_definition():
    adj = _two_triangles()
    dense = adj.toarray()
    total = np.triu(dense, 1).sum()
    degree = dense.sum(1)
    expected = np.log(dense[0, 1] * total / (degree[0] * degree[1]))
    assert sinr.pmi(adj)[0, 1] == pytest.approx(expected)
    kept = sinr.pmi_filter(adj).toarray()
    with np.errstate(divide="ignore"):
        positive = (dense > 0) & (np.log(dense * total / np.outer(degree, degree)) > 0)
    np.testing.assert_array_equal(kept, np.where(positive, dense, 0))


def test_sparsify_keeps_exactly_the_k_largest_per_word():
    rng = np.random.default_rng(0)
    dense = rng.random((30, 12)) * (rng.random((30, 12)) < 0.7)
    out = sinr.sparsify(sparse.csr_matrix(dense), 3).toarray()
    for row, full in zip(out, dense, strict=True):
        n = min(3, int((full > 0).sum()))
        assert (row > 0).sum() == n
        np.testing.assert_allclose(np.sort(row[row > 0]), np.sort(full)[::-1][:n][::-1])


def test_filter_dimensions_by_nonzeros():
    vectors = sparse.csr_matrix(np.array([[1, 0, 1], [1, 0, 0], [1, 1, 0]], float))
    out, kept = sinr.filter_dimensions(vectors, min_nnz=2)
    assert kept.tolist() == [0] and out.shape == (3, 1)
    out, kept = sinr.filter_dimensions(vectors, min_nnz=1, max_nnz=2)
    assert kept.tolist() == [1, 2]


def _planted(n_dims=20, per_dim=15, seed=0):
    """Words of cluster j are strong on dimension j: interpretable by construction."""
    rng = np.random.default_rng(seed)
    n = n_dims * per_dim
    vectors = rng.random((n, n_dims)) * 0.05
    vectors[np.arange(n), np.arange(n) // per_dim] += 1 + rng.random(n)
    return vectors


def test_dist_ratio_is_high_on_planted_dimensions_and_near_one_without_structure():
    vectors = _planted()
    assert sinr.dist_ratio(vectors) > 3
    # i.i.d. Gaussian vectors: a dimension's top words share nothing but one coordinate out of 300
    noise = np.random.default_rng(1).standard_normal((3000, 300))
    assert abs(sinr.dist_ratio(noise) - 1) < 0.1
    value, per_dim = sinr.dist_ratio(sparse.csr_matrix(vectors), per_dimension=True)
    assert per_dim.shape == (20,) and value == pytest.approx(np.nanmean(per_dim))


def test_intrusion_sets_take_the_top_words_and_an_intruder_salient_elsewhere():
    vectors = _planted()                                  # 20 dims, words 15 j .. 15 j + 14 are strong on dim j
    sets, dims = sinr.intrusion_sets(vectors, seed=0)
    assert sets.shape == (20, 6) and dims.tolist() == list(range(20))
    for words, dim in zip(sets, dims, strict=True):
        assert all(w // 15 == dim for w in words[:5]), "the top words are the dimension's own cluster"
        assert words[5] // 15 != dim, "the intruder comes from another cluster"
        assert vectors[words[5], dim] <= np.median(vectors[:, dim])   # in the bottom half of this dimension
    again, _ = sinr.intrusion_sets(vectors, seed=0)
    other, _ = sinr.intrusion_sets(vectors, seed=1)
    assert np.array_equal(sets, again) and not np.array_equal(sets[:, 5], other[:, 5])
    assert np.array_equal(sets[:, :5], other[:, :5])


def test_similarity_correlation_is_perfect_when_cosines_follow_the_scores():
    angles = np.linspace(0, np.pi / 2, 6)
    vectors = np.column_stack([np.cos(angles), np.sin(angles)])
    words = [f"w{i}" for i in range(6)]
    pairs = [("w0", f"w{i}", 10 - i) for i in range(1, 6)] + [("w0", "unknown", 5.0)]
    rho, coverage = sinr.similarity_correlation(vectors, words, pairs)
    assert rho == pytest.approx(1.0) and coverage == pytest.approx(5 / 6)


def _embedding():
    docs = ["cats purr and cats meow softly", "dogs bark and dogs growl loudly"] * 20
    corpus = sinr.corpus_from_documents(docs, min_count=1)
    return sinr.train(corpus, window=2, gamma=1.0, seed=0), corpus


def test_train_end_to_end_on_two_topics():
    emb, corpus = _embedding()
    assert set(emb.words) <= set(corpus.words)
    assert emb.membership[emb.index["cats"]] == emb.membership[emb.index["purr"]]
    assert emb.membership[emb.index["cats"]] != emb.membership[emb.index["dogs"]]
    assert emb.most_similar("cats", 2)[0][0] in {"purr", "meow", "softly"}
    assert emb.similarity("cats", "purr") > emb.similarity("cats", "bark")
    dim, value, words = emb.describe("dogs", dims=1, k=3)[0]
    assert dim == emb.membership[emb.index["dogs"]] and "dogs" in words and 0 < value <= 1
    stats = emb.sparsity()
    assert stats["words"] == len(emb.words) and stats["dims"] == emb.n_dims
    again, _ = _embedding()
    assert (again.vectors != emb.vectors).nnz == 0


def test_sparsified_and_filtered_embeddings_keep_their_bookkeeping():
    emb, _ = _embedding()
    one = emb.sparsified(1)
    assert (np.diff(one.vectors.indptr) <= 1).all()
    big = emb.filtered(min_nnz=3)
    assert big.n_dims <= emb.n_dims and big.predominance.shape == big.vectors.shape
    if big.membership[0] >= 0:
        assert big.dimension_words(int(big.membership[0]), 50)[0][1] > 0
    assert {w for w, _ in big.dimension_words(0, 100, by="predominance")} <= set(emb.words)


def test_ppmi_svd_matches_the_exact_top_singular_values():
    rng = np.random.default_rng(0)
    dense = np.triu(rng.integers(0, 4, (60, 60)) * (rng.random((60, 60)) < 0.3), 1).astype(float)
    cooc = sparse.csr_matrix(dense + dense.T)
    vectors = sinr.ppmi_svd(cooc, 4)
    assert vectors.shape == (60, 4)
    degree, total = dense.sum(0) + dense.sum(1), dense.sum()
    with np.errstate(divide="ignore"):
        ppmi = np.maximum(np.log((dense + dense.T) * 2 * total / np.outer(degree, degree)), 0)
    exact = np.linalg.svd(ppmi, compute_uv=False)[:4]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=0) ** 2, exact, rtol=0.02)


def test_tokenize_lowercases_and_drops_stop_words_clitics_and_digits():
    assert sinr.tokenize("The Bennets' house, Longbourn, wasn't far in 1811!") == ["bennets", "house", "longbourn",
                                                                                   "far"]


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: sinr.corpus_from_documents([]), ValueError, "empty"),
        (lambda: sinr.corpus_from_documents(["the of and"]), ValueError, "empty"),
        (lambda: sinr.corpus_from_documents(["cats"], min_count=0), ValueError, "min_count"),
        (lambda: sinr.cooccurrence(sinr.corpus_from_documents(["cats purr"], min_count=1), window=0), ValueError,
         "window"),
        (lambda: sinr.louvain(_two_triangles(), gamma=0), ValueError, "gamma"),
        (lambda: sinr.louvain(_two_triangles(), gamma=-1.0), ValueError, "gamma"),
        (lambda: sinr.louvain(np.eye(3)), ValueError, "sparse"),
        (lambda: sinr.node_recall(_two_triangles(), np.zeros(4, int)), ValueError, "membership"),
        (lambda: sinr.sparsify(_two_triangles(), 0), ValueError, "k must"),
        (lambda: sinr.filter_dimensions(_two_triangles(), min_nnz=99), ValueError, "relax"),
        (lambda: _embedding()[0].vector("unicorn"), KeyError, "not in the vocabulary"),
        (lambda: _embedding()[0].dimension_words(10_000), ValueError, "dimension"),
        (lambda: _embedding()[0].most_similar("cats", 0), ValueError, "topn"),
        (lambda: sinr.similarity_correlation(np.eye(3), ["a", "b", "c"], []), ValueError, "empty"),
        (lambda: sinr.ppmi_svd(_two_triangles(), 6), ValueError, "dim"),
        (lambda: sinr.dist_ratio(np.eye(3)), ValueError, "at least"),
        (lambda: sinr.pmi(sparse.csr_matrix(np.full((3, 3), np.nan))), ValueError, "NaN"),
        (lambda: sinr.pmi_filter(sparse.csr_matrix(np.full((3, 3), np.inf))), ValueError, "infinite"),
        (lambda: sinr.louvain(_two_triangles(), mode="two-level"), ValueError, "mode"),
        (lambda: sinr.community_hierarchy(_two_triangles(), gamma=1.0, coarse_gammas=(2.0,)), ValueError, "decreasing"),
        (lambda: sinr.nesting(np.zeros(3, int), np.zeros(4, int)), ValueError, "same words"),
        (lambda: sinr.nesting(np.array([0, -1]), np.array([0, 0])), ValueError, "non-negative"),
        (lambda: sinr.shuffled_membership(np.zeros((2, 2), int)), ValueError, "membership"),
        (lambda: sinr.keep_top(np.ones(3), 1), ValueError, "dense"),
        (lambda: sinr.keep_top(np.ones((2, 3)), -1), ValueError, "non-negative"),
        (lambda: sinr.dist_ratio(_planted(), rule="human"), ValueError, "rule"),
        (lambda: sinr.CommunityHierarchy([np.zeros(3, int)], [1.0]).children(0, 0), ValueError, "level"),
        (lambda: sinr.train(_embedding()[1], window=2, membership=np.zeros(3, int)), ValueError, "one community"),
    ],
)
def test_bad_input_gives_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _ring_of_cliques(n_cliques=8, size=4):
    """Cliques of ``size`` nodes joined in a ring by one edge each: Louvain merges them in several passes."""
    n = n_cliques * size
    a = np.zeros((n, n))
    for c in range(n_cliques):
        block = slice(c * size, (c + 1) * size)
        a[block, block] = 1
        u, v = c * size, ((c + 1) % n_cliques) * size + 1
        a[u, v] = a[v, u] = 1
    np.fill_diagonal(a, 0)
    return sparse.csr_matrix(a)


def test_louvain_levels_nest_one_level_is_the_first_pass_and_multilevel_the_last():
    adj = _ring_of_cliques(16, 4)
    levels = sinr.louvain_levels(adj, gamma=1.0, seed=0)
    assert len(levels) >= 2 and levels[0].max() + 1 == 16, "the first pass finds the 16 cliques"
    assert levels[-1].max() < levels[0].max(), "later passes merge cliques"
    assert all(sinr.nesting(f, c) == 1.0 for f, c in pairwise(levels))
    assert np.array_equal(sinr.louvain(adj, gamma=1.0, seed=0, mode="one-level"), levels[0])
    assert np.array_equal(sinr.louvain(adj, gamma=1.0, seed=0), levels[-1])


def test_quotient_graph_keeps_degrees_and_hierarchy_merges_whole_communities():
    adj = _ring_of_cliques(12, 4)
    member = np.arange(48) // 4                                      # the 12 cliques
    q = sinr.quotient_graph(adj, member).toarray()
    np.testing.assert_allclose(q.sum(axis=1), np.asarray(adj.sum(axis=1)).ravel().reshape(12, 4).sum(axis=1))
    assert q[0, 0] == 2 * 6 and q[0, 1] == 1                         # a 4-clique has 6 edges; one ring edge
    h = sinr.community_hierarchy(adj, gamma=4.0, coarse_gammas=(0.5,), seed=0)
    assert h.sizes[0] == 12 and h.sizes[-1] < h.sizes[-2], "gamma=4 keeps the cliques; 0.5 merges them"
    assert h.nesting() == [1.0] * (len(h.levels) - 1)
    top = len(h.levels) - 1
    for c in range(h.sizes[top]):
        kids = h.children(top, c)
        assert set(np.flatnonzero(h.levels[top] == c)) == set(np.flatnonzero(np.isin(h.levels[top - 1], kids)))


def test_nesting_scores_the_share_of_words_in_their_fine_communitys_majority():
    fine = np.array([0, 0, 0, 0, 1, 1])
    coarse = np.array([0, 0, 0, 1, 1, 1])                            # fine 0 is split 3 / 1
    share, shares, parents = sinr.nesting(fine, coarse, per_community=True)
    assert share == pytest.approx(5 / 6)
    np.testing.assert_allclose(shares, [0.75, 1.0])
    assert parents.tolist() == [0, 1]


def test_shuffled_membership_keeps_sizes_and_moves_words():
    m = np.repeat(np.arange(10), np.arange(1, 11))                   # sizes 1..10, 55 words
    s = sinr.shuffled_membership(m, seed=0)
    assert np.array_equal(np.bincount(s), np.bincount(m))
    assert (s != m).mean() > 0.5
    assert np.array_equal(s, sinr.shuffled_membership(m, seed=0))
    assert not np.array_equal(s, sinr.shuffled_membership(m, seed=1))


def test_keep_top_keeps_k_largest_positive_values_per_row():
    x = np.array([[0.5, -2.0, 0.1, 0.3], [-1.0, -0.5, 0.2, -0.1], [4.0, 3.0, 2.0, 1.0]])
    out = sinr.keep_top(x, [2, 3, 1]).toarray()
    np.testing.assert_allclose(out, [[0.5, 0, 0, 0.3], [0, 0, 0.2, 0], [4.0, 0, 0, 0]])
    assert (sinr.keep_top(x, 0).toarray() == 0).all()


def test_package_rule_counts_zero_valued_words_as_top_where_the_book_rule_does_not():
    # 40 words, 2 dimensions; dimension 1 has a single non-zero, so its top 10 % (4 words) are mostly zeros
    x = np.zeros((40, 2))
    x[:20, 0] = np.linspace(1, 2, 20)
    x[30, 1] = 1.0
    _, dims_book = sinr.intrusion_sets(x, top=2, seed=0)
    sets_pkg, dims_pkg = sinr.intrusion_sets(x, top=2, seed=0, rule="package")
    # book rule: an intruder for dimension 0 must be positive in the top 10 % of dimension 1: only word 30,
    # which is in dimension 0's bottom half; for dimension 1 it must be top of dimension 0 (words 16-19, all
    # in dimension 1's zero bottom), so both dimensions get one
    assert dims_book.tolist() == [0, 1]
    assert dims_pkg.tolist() == [0, 1]
    assert x[sets_pkg[1, 1], 1] == 0, "the package's top-2 words of dimension 1 include a zero-valued word"
    union_zero = [w for w in range(40) if x[w].max() == 0]
    picked = {int(sinr.intrusion_sets(x, top=2, seed=s, rule="package")[0][0, 2]) for s in range(30)}
    assert picked & set(union_zero), "zero-valued words counted as 'top' elsewhere become intruders"
    assert sinr.dist_ratio(_planted(), rule="package") > 3


def test_similarity_ci_brackets_the_point_estimate():
    rng = np.random.default_rng(0)
    vectors = rng.random((30, 5))
    words = [f"w{i}" for i in range(30)]
    pairs = [(f"w{i}", f"w{i + 1}", float(rng.random())) for i in range(29)]
    rho, _ = sinr.similarity_correlation(vectors, words, pairs)
    e = sinr.similarity_ci(vectors, words, pairs, n_resamples=200)
    assert e.value == pytest.approx(rho) and e.lo <= rho <= e.hi and e.hi - e.lo > 0.1


def test_nonnegative_sparse_code_is_non_negative_and_as_sparse_as_asked():
    x = _planted(n_dims=6, per_dim=10)
    codes = sinr.nonnegative_sparse_code(x, 6, 2, alpha=0.01, epochs=5, seed=0)
    assert codes.shape == (60, 6) and codes.min() >= 0
    assert np.diff(codes.indptr).max() <= 2
    # planted clusters: words of one cluster share their strongest code
    best = np.asarray(codes.argmax(axis=1)).ravel().reshape(6, 10)
    assert all(np.bincount(row).max() >= 8 for row in best)


def _intrusion_sets_by_sorting(dense, top, bottom, top_share, seed, rule):
    """The reference: intrusion_sets as first written, with full sorts of every column (slow, obviously right)."""
    n, d = dense.shape
    rng = np.random.default_rng(seed)
    if rule == "package":
        tie = rng.random(n)
        order = np.lexsort((tie[:, None].repeat(d, 1), -dense), axis=0)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(n)[:, None].repeat(d, 1), axis=0)
        union = (rank < int(round(top_share * n))).any(axis=1)
        pools = [np.flatnonzero(union & (rank[:, j] >= n - int(round(bottom * n)))) for j in range(d)]
    else:
        order = np.argsort(-dense, axis=0, kind="stable")
        n_top = max(1, int(round(top_share * n)))
        cut = np.take_along_axis(dense, order[[n_top - 1, min(n - 1, int((1 - bottom) * n))]], axis=0)
        in_top = (dense >= cut[0]) & (dense > 0)
        pools = [np.flatnonzero((dense[:, j] <= cut[1, j]) & (in_top.sum(axis=1) - in_top[:, j] > 0))
                 for j in range(d)]
    sets = [np.append(order[:top, j], rng.choice(pool)) for j, pool in enumerate(pools) if pool.size]
    return np.array(sets, dtype=np.int64).reshape(-1, top + 1), np.array([j for j, p in enumerate(pools) if p.size])


@pytest.mark.parametrize("rule", ["book", "package"])
def test_intrusion_sets_by_selection_equal_those_of_a_full_sort(rule):
    rng = np.random.default_rng(0)
    for case in range(30):
        n, d = int(rng.integers(12, 200)), int(rng.integers(2, 30))
        kind = case % 4
        if kind == 0:
            x = rng.standard_normal((n, d))                                      # dense, signed
        elif kind == 1:
            x = rng.random((n, d)) * (rng.random((n, d)) < 0.2)                   # sparse: ties at zero
        elif kind == 2:
            x = np.round(rng.random((n, d)) * 3) * (rng.random((n, d)) < 0.4)     # many ties at every value
        else:
            x = (rng.random((n, d)) < 0.03).astype(float)                         # columns with < top non-zeros
        for top, bottom, share in [(5, 0.5, 0.1), (2, 0.3, 0.25)]:
            expected = _intrusion_sets_by_sorting(x, top, bottom, share, case, rule)
            got = sinr.intrusion_sets(sparse.csr_matrix(x) if case % 2 else x, top=top, bottom=bottom,
                                      top_share=share, seed=case, rule=rule)
            assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]), (case, top)


def test_train_with_given_communities_skips_louvain_and_gives_the_same_embedding():
    emb, corpus = _embedding()
    given = sinr.train(corpus, window=2, gamma=1.0, seed=0, membership=emb.membership)
    assert given.words == emb.words and (given.vectors != emb.vectors).nnz == 0
    assert np.array_equal(given.membership, emb.membership) and given.info["timings"].communities_s < 0.1


def test_resolution_sweep_scores_each_resolution_like_train_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))
    rng = np.random.default_rng(0)
    topics = [["cat", "purr", "meow", "whisker", "kitten", "paw"], ["dog", "bark", "growl", "puppy", "leash", "bone"],
              ["ship", "sail", "mast", "harbour", "anchor", "deck"]]
    every = sum(topics, [])
    docs = [" ".join(rng.choice(topics[i % 3], 12)) + " " + " ".join(rng.choice(every, 3)) for i in range(90)]
    corpus = sinr.corpus_from_documents(docs, min_count=1, stop_words=())
    words = sorted(corpus.words)
    pairs = [(a, b, float(i)) for i, (a, b) in enumerate(pairwise(words))]
    sweep = sinr.resolution_sweep(corpus, [1.0, 4.0], pairs, window=2, topk=3, min_nnz=1, seed=0)
    assert sweep["gammas"].tolist() == [1.0, 4.0] and sweep["membership"].shape == (2, len(corpus.words))
    assert sweep["dims"][0] < sweep["dims"][1], "a higher resolution gives more dimensions"
    emb = sinr.train(corpus, window=2, gamma=4.0, seed=0).sparsified(3).filtered(min_nnz=1)
    assert sweep["dims"][1] == emb.n_dims
    assert sweep["ws353"][1] == sinr.similarity_correlation(emb.vectors, emb.index, pairs)[0]
    assert sweep["dist_ratio"][1] == sinr.dist_ratio(emb.vectors, seed=0) > 1
    stored = sinr.resolution_sweep_results(corpus, [1.0, 4.0], pairs, window=2, topk=3, min_nnz=1, seed=0)
    assert list(tmp_path.glob("results/ch2/sweep-*.npz"))
    for key in ("gammas", "dims", "ws353", "dist_ratio", "membership"):
        np.testing.assert_array_equal(stored[key], sweep[key])
