"""helpers.prototypes: push returns real patches/items, map shapes, ranking metrics, bad input (the shop: test_data)."""

import math

import numpy as np
import pytest
import torch

from helpers import data
from helpers import prototypes as P


def _separable_tokens(n_per_class=20, classes=3, width=8, seed=0):
    """Patch tokens whose mean depends on the class: a head must separate them."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, width, generator=gen) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    tokens = centres[labels][:, None, :] + torch.randn(len(labels), P.N_PATCHES, width, generator=gen)
    return tokens, labels


@pytest.fixture(scope="module")
def trained_head():
    tokens, labels = _separable_tokens()
    recipe = P.ProtoRecipe(per_class=2, dim=4, warm_epochs=40, last_epochs=2, batch_size=20, lr=1e-2)
    head, history = P.train_prototype_head(tokens, labels, recipe)
    return head, history, tokens, labels


def test_push_makes_every_prototype_an_exact_training_patch_of_its_class(trained_head):
    head, history, tokens, labels = trained_head
    latent = P.latent_patches(head, tokens)  # [N, 16, dim]
    push = history["push"]
    for j, proto in enumerate(head.prototypes.detach()):
        assert torch.equal(proto, latent[push["image"][j], push["patch"][j]])
        assert labels[push["image"][j]] == head.prototype_class[j]
        assert (latent.reshape(-1, latent.shape[-1]) == proto).all(1).any()  # some real patch, bit for bit
    # pushing again moves nothing: each prototype already is its nearest patch
    again = P.push_prototypes(head, tokens, labels)
    assert torch.all(again["distance"] == 0)


def test_similarity_maps_shape_and_max_is_the_activation(trained_head):
    head, _, tokens, _ = trained_head
    maps = P.similarity_maps(head, tokens[:5])
    assert maps.shape == (5, head.prototypes.shape[0], 4, 4)
    _, min_d = head(tokens[:5])
    torch.testing.assert_close(maps.flatten(2).max(-1).values, P.log_similarity(min_d), rtol=1e-5, atol=1e-5)
    up, masks = P.part_masks(maps, size=28, quantile=0.9)
    assert up.shape == masks.shape == (5, head.prototypes.shape[0], 28, 28)
    frac = masks.float().mean((2, 3))
    assert torch.all((frac >= 0.1 - 1e-6) & (frac < 0.5))


def test_training_on_separable_tokens_gives_accurate_pure_prototypes(trained_head):
    head, _, tokens, labels = trained_head
    assert P.head_accuracy(head, tokens, labels) == 1.0
    purity, neighbours = P.prototype_purity(head, tokens, labels, k=5)
    assert purity.shape == (head.prototypes.shape[0],) and neighbours.shape == (head.prototypes.shape[0], 5)
    assert purity.min() == 1.0


def test_log_similarity_and_losses_known_answers():
    assert math.isclose(float(P.log_similarity(torch.tensor(0.0), eps=0.5)), math.log(2.0), rel_tol=1e-6)
    head = P.PrototypeHead(width=4, n_classes=2, per_class=1, dim=2)
    min_d = torch.tensor([[1.0, 3.0], [5.0, 2.0]])  # [batch, P]; prototype j belongs to class j
    cluster, separation = P.prototype_losses(head, min_d, torch.tensor([0, 0]))
    assert float(cluster) == pytest.approx((1 + 5) / 2) and float(separation) == pytest.approx((3 + 2) / 2)


def test_image_bad_inputs_raise_clear_errors():
    from helpers import vision

    vit = vision.fashion_vit()
    with pytest.raises(ValueError, match=r"\[batch, 1, 28, 28\]"):
        P.patch_tokens(vit, torch.zeros(2, 3, 28, 28))  # RGB
    with pytest.raises(ValueError, match=r"\[batch, 1, 28, 28\]"):
        P.patch_tokens(vit, torch.zeros(2, 1, 32, 32))  # wrong size
    model = P.ProtoViT(vit, P.PrototypeHead(64))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="channel axis"):
        model(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="patch tokens"):
        P.similarity_maps(P.PrototypeHead(64), torch.zeros(2, 17, 64))  # CLS not dropped
    with pytest.raises(ValueError, match="quantile"):
        P.part_masks(torch.zeros(1, 1, 4, 4), quantile=1.0)


# --- the simulated shop -----------------------------------------------------------------------


def _images(n=400, seed=0):
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 28, 28)) * 255 * (rng.random((n, 1, 1)) + 0.2)).clip(0, 255).astype(np.uint8)
    return images, np.arange(n) % 10


# --- the recommender and the metrics ----------------------------------------------------------


def test_hit_rate_and_ndcg_on_a_hand_computed_example():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6],  # target 0 at rank 0
            [0.9, 0.8, 0.7, 0.6],  # target 2 at rank 2
            [0.1, 0.2, 0.3, 0.4],  # target 0 at rank 3
        ]
    )
    targets = torch.tensor([0, 2, 0])
    assert P.target_rank(scores, targets).tolist() == [0, 2, 3]
    hr, ndcg = P.hit_rate_ndcg(scores, targets, k=3)
    assert hr == pytest.approx(2 / 3)
    assert ndcg == pytest.approx((1 + 1 / math.log2(4) + 0) / 3)
    assert P.hit_rate_ndcg(scores, targets, k=10) == pytest.approx((1.0, (1 + 0.5 + 1 / math.log2(5)) / 3))
    # ties count against the target
    assert P.target_rank(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0])).tolist() == [1]


def test_sampled_protocol_keeps_the_target_first_and_avoids_seen_items():
    scores = torch.arange(50.0).expand(2, -1).clone()
    seen = torch.zeros(2, 50, dtype=torch.bool)
    seen[:, :10] = True
    sub, targets = P.sampled_scores(scores, torch.tensor([20, 30]), seen, n_negatives=20)
    assert sub.shape == (2, 21) and targets.tolist() == [0, 0]
    assert sub[:, 0].tolist() == [20.0, 30.0] and (sub[:, 1:] >= 10).all()


@pytest.fixture(scope="module")
def small_shop():
    images, labels = _images()
    return data.simulate_shop(images, labels, data.ShopConfig(n_users=120, n_items=50, length=8))


def test_recommender_prototypes_become_real_item_embeddings(small_shop):
    train, test = data.split_by_time(small_shop.sequences)
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    recipe = P.RecRecipe(dim=16, n_prototypes=5, epochs=2, finetune_epochs=1, batch_size=40)
    model, history = P.train_recommender(features, train, recipe)
    emb = model.item_embeddings().detach()
    assert model.prototype_items.shape == (5,)
    assert torch.equal(model.prototypes.detach(), emb[model.prototype_items])
    scores = P.next_item_scores(model, [list(s) for s in train])
    assert scores.shape == (120, 50)
    assert torch.isinf(scores[0, train[0]]).all() and torch.isfinite(scores[0, test[0]]).all()
    plain, _ = P.train_recommender(features, train, P.RecRecipe(dim=16, epochs=1, batch_size=40))
    with pytest.raises(ValueError, match="no prototype layer"):
        plain.project_prototypes()


def test_recommender_bad_inputs(small_shop):
    model = P.SequentialRecommender(torch.randn(50, 6), dim=8, max_len=7, n_prototypes=3)
    with pytest.raises(ValueError, match="empty history"):
        P.next_item_scores(model, [[1, 2], []])
    with pytest.raises(ValueError, match="unknown item"):
        P.next_item_scores(model, [[1, 50]])
    with pytest.raises(ValueError, match="no histories"):
        P.pad_histories([], n_items=50, max_len=7)
    assert P.pad_histories([[3], [1, 2]], n_items=50, max_len=7).tolist() == [[50, 3], [1, 2]]
    with pytest.raises(ValueError, match="target"):
        P.hit_rate_ndcg(torch.zeros(2, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="item features"):
        P.train_recommender(torch.randn(10, 6), small_shop.sequences, P.RecRecipe(epochs=1))


# --- explaining a recommendation over the history ----------------------------------------------


@pytest.fixture(scope="module")
def explained_recommender(small_shop):
    train, _ = data.split_by_time(small_shop.sequences)
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    recipe = P.RecRecipe(dim=16, n_prototypes=5, epochs=2, finetune_epochs=1, batch_size=40)
    model, _ = P.train_recommender(features, train, recipe)
    seq = P.pad_histories([list(s) for s in train[:6]] + [list(train[6, -3:])], n_items=50, max_len=model.max_len)
    target = P.next_item_scores(model, [s[s != 50].tolist() for s in seq]).argmax(1)
    return model, seq, target                                  # the last history is left-padded


def test_history_attributions_shapes_padding_and_seed(explained_recommender):
    model, seq, target = explained_recommender
    pad = seq == model.n_items
    assert pad[-1].any() and not pad[0].any()
    for method in P.HISTORY_METHODS:
        scores = P.history_attributions(model, seq, target, method)
        assert scores.shape == seq.shape and torch.isfinite(scores).all(), method
        assert (scores[pad] == 0).all(), method
    a = P.history_attributions(model, seq, target, "random", seed=3)
    assert torch.equal(a, P.history_attributions(model, seq, target, "random", seed=3))
    assert not torch.equal(a, P.history_attributions(model, seq, target, "random", seed=4))
    attention = P.history_attributions(model, seq, target, "attention")
    assert torch.allclose(attention.sum(1), torch.ones(len(seq)), atol=1e-5)   # a distribution over the past items


def _target_score(model, items, pad, target):
    return model.scores_from_hidden(model.encode_embedded(items, pad)[:, -1]).gather(1, target[:, None])[:, 0]


def test_history_gradients_and_occlusion_match_their_definitions(explained_recommender):
    model, seq, target = explained_recommender
    pad = seq == model.n_items
    items = model.embed(seq).detach().requires_grad_(True)
    score = _target_score(model, items, pad, target)
    (grad,) = torch.autograd.grad(score.sum(), items)
    expected = (grad * items).sum(-1).masked_fill(pad, 0).detach()
    assert torch.allclose(P.history_attributions(model, seq, target, "input_x_gradient"), expected, atol=1e-5)
    # integrated gradients from the zero (padding) embedding: completeness, sum = f(x) - f(0)
    ig = P.history_attributions(model, seq, target, "integrated_gradients", n_steps=200)
    with torch.no_grad():
        gap = score - _target_score(model, torch.zeros_like(items), pad, target)
    assert torch.allclose(ig.sum(1), gap.detach(), atol=2e-2 * float(gap.abs().max()))
    # occlusion: the score drop when position 2 alone is masked as padding
    masked = seq.clone()
    masked[:, 2] = model.n_items
    with torch.no_grad():
        drop = (model(seq)[:, -1] - model(masked)[:, -1]).gather(1, target[:, None])[:, 0]
    live = ~pad[:, 2]
    assert torch.allclose(P.history_attributions(model, seq, target, "occlusion")[live, 2], drop[live], atol=1e-5)


def test_history_prototype_explanation_is_the_stated_formula(explained_recommender):
    model, seq, target = explained_recommender
    with torch.no_grad():
        act = model.activations(model.encode(seq)[:, -1])                       # [batch, K]
        unit_p = torch.nn.functional.normalize(model.prototypes, dim=-1)
        unit_e = torch.nn.functional.normalize(model.item_embeddings(), dim=-1)
    b, j = 0, 4
    expected = sum(float(act[b, k] * (unit_p[k] @ unit_e[target[b]]) * (unit_p[k] @ unit_e[seq[b, j]]))
                   for k in range(model.n_prototypes))
    assert math.isclose(float(P.history_attributions(model, seq, target, "prototypes")[b, j]), expected, rel_tol=1e-4)


def test_history_attributions_bad_inputs(explained_recommender):
    model, seq, target = explained_recommender
    with pytest.raises(ValueError, match="unknown method"):
        P.history_attributions(model, seq, target, "lime")
    with pytest.raises(ValueError, match="target"):
        P.history_attributions(model, seq, target[:2], "occlusion")
    with pytest.raises(ValueError, match="target item ids"):
        P.history_attributions(model, seq, torch.full_like(target, 50), "occlusion")
    with pytest.raises(ValueError, match="n_steps"):
        P.history_attributions(model, seq, target, "integrated_gradients", n_steps=1)
    plain = P.SequentialRecommender(torch.randn(50, 6), dim=8, max_len=7)
    with pytest.raises(ValueError, match="prototype layer"):
        P.history_attributions(plain, seq[:, -7:], target, "prototypes")


def test_cached_recommender_trains_once_then_loads(small_shop, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))
    train, _ = data.split_by_time(small_shop.sequences)
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    recipe = P.RecRecipe(dim=8, n_prototypes=3, epochs=1, finetune_epochs=1, batch_size=60)
    model, history = P.cached_recommender(features, train, recipe, shop_config=small_shop.config, vit_key="test")
    files = list((tmp_path / "models" / "ch9").glob("sasrec-*.pt"))
    assert len(files) == 1
    again, history2 = P.cached_recommender(features, train, recipe, shop_config=small_shop.config, vit_key="test")
    assert history2["loss"] == history["loss"] and torch.equal(again.prototype_items, model.prototype_items)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    P.cached_recommender(features, train, recipe, shop_config=small_shop.config, vit_key="other")
    assert len(list((tmp_path / "models" / "ch9").glob("sasrec-*.pt"))) == 2   # another ViT: another file


def test_cached_prototype_head_trains_once_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))

    class TinyViT(torch.nn.Module):                       # patch tokens: 16 patches of 8 features per image
        recipe = type("Recipe", (), {"key": staticmethod(lambda: "tiny")})()

        def forward_features(self, images):
            return images.reshape(len(images), 1, 28, 28)[:, 0, :16, :8].reshape(len(images), 16, 8)

    tokens, labels = _separable_tokens(n_per_class=10, width=8)
    images = torch.zeros(len(labels), 1, 28, 28)
    images[:, 0, :16, :8] = tokens
    recipe = P.ProtoRecipe(n_train=len(labels), per_class=1, dim=4, warm_epochs=2, last_epochs=1, batch_size=10)
    monkeypatch.setattr(P, "patch_tokens", lambda vit, x, **_: vit.forward_features(x))
    head, history = P.cached_prototype_head(TinyViT(), images, labels, recipe)
    assert len(list((tmp_path / "models" / "ch9").glob("protopnet-*.pt"))) == 1
    again, history2 = P.cached_prototype_head(TinyViT(), images, labels, recipe)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True))
    assert not again.training and "state_before_push" in history2


# --- the recommender study: splits, learning, explanation baselines, deletion (issue #24) -------------


def test_full_ranks_excludes_the_history_and_counts_ties_against_the_target():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [0.1, 0.5, 0.5, 0.9, 0.2]])
    # user 0 has seen items 0 and 1, so target 3 is behind item 2 only; user 1 saw item 3: target 1 ties with 2
    ranks = P.full_ranks(scores, [[0, 1], [3]], [3, 1])
    assert ranks.tolist() == [1, 1]
    # the same rows with the history masked by hand: rank 1 is a miss at k = 1 and a hit worth 1/log2(3) at k = 2
    masked = scores.clone()
    masked[0, :2] = masked[1, 3] = float("-inf")
    assert P.hit_rate_ndcg(masked, torch.tensor([3, 1]), k=1) == (0.0, 0.0)
    hr, ndcg = P.hit_rate_ndcg(masked, torch.tensor([3, 1]), k=2)
    assert hr == 1.0 and ndcg == pytest.approx(1 / math.log2(3))


def _predictable_shop():
    """Users buy one liked class's five items in a row, so the last item is the one left in that class.

    Item features are random (they say nothing about classes): the model must learn from the sequences
    which items go together.
    """
    images, labels = _images()
    config = data.ShopConfig(n_users=400, n_items=50, length=5, beta=0.0, gamma=10.0, temperature=0.5, seed=1)
    shop = data.simulate_shop(images, labels, config)
    one_class = (shop.item_class[shop.sequences] == shop.item_class[shop.sequences[:, :1]]).all(1)
    assert one_class.mean() > 0.95
    return shop, torch.randn(50, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n_prototypes", [0, 10])
def test_recommender_learns_a_predictable_shop_and_beats_popularity(n_prototypes):
    shop, features = _predictable_shop()
    train, test = data.split_by_time(shop.sequences)
    histories, targets = [list(s) for s in train], torch.as_tensor(test[:, 0])
    popularity = P.popularity_scores(train, 50).expand(len(train), -1).clone()
    popularity[P.seen_mask(histories, 50)] = float("-inf")
    hr_pop, _ = P.hit_rate_ndcg(popularity, targets, k=3)
    hr = {}
    for epochs in (0, 20):  # untrained, then trained: the hit rate must come from training
        recipe = P.RecRecipe(dim=16, dropout=0.0, n_prototypes=n_prototypes, epochs=epochs,
                             finetune_epochs=5 if epochs else 0, batch_size=50, lr=1e-2)
        model, history = P.train_recommender(features, train, recipe)
        hr[epochs], _ = P.hit_rate_ndcg(P.next_item_scores(model, histories), targets, k=1)
    assert history["loss"][-1] < history["loss"][0]
    assert hr_pop < 0.15 and hr[0] < 0.15, (hr_pop, hr[0])  # about 3 / 46 and 1 / 46: chance
    assert hr[20] > 0.9, hr  # HR@1 of the trained model, against HR@3 for popularity


def test_most_bought_classes_and_liked_share_known_answer():
    item_class = np.array([0, 0, 1, 1, 2, 3])
    seqs = np.array([[0, 2, 1, 4], [5, 4, 2, 3]])
    # user 0: class 0 twice, then 2 (bought at t=3) before 1 (t=1); user 1: class 1 twice, then 2 (t=1) before 3 (t=0)
    top = P.most_bought_classes(seqs, item_class, k=3)
    assert top.tolist() == [[0, 2, 1], [1, 2, 3]]
    liked = np.array([[True, False, False, True], [False, True, True, True]])
    np.testing.assert_allclose(P.liked_share(top, liked), [1 / 3, 1.0])
    with pytest.raises(ValueError, match="k must be"):
        P.most_bought_classes(seqs, item_class, k=5)
    with pytest.raises(ValueError, match="item ids"):
        P.most_bought_classes(seqs, item_class[:3])
    with pytest.raises(ValueError, match="class ids"):
        P.liked_share(np.array([[4, 0, 1], [0, 1, 2]]), liked)


def test_attribute_profile_known_answer():
    table = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    shared = P.attribute_profile(np.array([[1.0, 1.0, 2.0], [0.0, 1.0, 0.0]]), np.array([0, 1, 2]), table)
    np.testing.assert_allclose(shared, [[7 / 4, 2.0], [0.0, 2.0]])
    per_user = P.attribute_profile(np.ones((2, 2)), np.array([[0, 0], [1, 2]]), table)
    np.testing.assert_allclose(per_user, [[1.0, 0.0], [1.5, 2.5]])
    with pytest.raises(ValueError, match="non-negative"):
        P.attribute_profile(np.array([[1.0, -1.0, 0.0]]), np.array([0, 1, 2]), table)
    with pytest.raises(ValueError, match="ids must index"):
        P.attribute_profile(np.ones((1, 2)), np.array([0, 3]), table)


def test_taste_recovery_is_one_for_a_monotone_profile_and_detects_a_better_one():
    rng = np.random.default_rng(0)
    taste = rng.normal(size=(200, 2))
    perfect = np.exp(taste)  # same ranks
    e = P.taste_recovery(taste, perfect, n_resamples=200)
    assert (e.value, e.lo, e.hi) == pytest.approx((1.0, 1.0, 1.0))
    assert P.taste_recovery(taste, -taste, n_resamples=200).value == -1.0
    noisy = taste + rng.normal(scale=3.0, size=taste.shape)
    d = P.taste_recovery(taste, perfect, baseline=noisy, n_resamples=200)
    assert d.value > 0.3 and d.lo > 0 and d.p is not None and d.p < 0.05
    with pytest.raises(ValueError, match="constant attribute"):
        P.taste_recovery(taste, np.c_[perfect[:, 0], np.ones(200)])
    with pytest.raises(ValueError, match="one shape"):
        P.taste_recovery(taste, perfect[:, :1])


def test_deletion_mask_and_prototype_scores_known_answer():
    act = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.4, 0.05, 0.05, 0.5]])
    assert P.deletion_mask(act, 2, "top").tolist() == [[False, True, True, False], [True, False, False, True]]
    bottom = P.deletion_mask(act, 1, "bottom")
    assert bottom.sum(1).tolist() == [1, 1] and not bottom[0, 1] and not bottom[1, 3]
    rnd = P.deletion_mask(act, 3, "random", seed=1)
    assert rnd.sum(1).tolist() == [3, 3] and torch.equal(rnd, P.deletion_mask(act, 3, "random", seed=1))
    for bad in (0, 4):
        with pytest.raises(ValueError, match="n_removed"):
            P.deletion_mask(act, bad, "top")
    with pytest.raises(ValueError, match="order"):
        P.deletion_mask(act, 1, "middle")
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[0.0, math.log(3.0)]])
    kernel = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0]])
    bias = torch.tensor([0.0, 0.0, 1.0])
    full = P.prototype_scores(logits, kernel, scale=2.0, bias=bias)
    assert torch.allclose(full, torch.tensor([[0.5, 1.5, 5.0]]))
    without_second = P.prototype_scores(logits, kernel, removed=torch.tensor([[False, True]]), scale=2.0, bias=bias)
    assert torch.allclose(without_second, torch.tensor([[2.0, 0.0, 5.0]]))  # the kept prototype takes all the mass
    with pytest.raises(ValueError, match="keep at least one"):
        P.prototype_scores(logits, kernel, removed=torch.tensor([[True, True]]))


def test_prototype_deletion_follows_the_top_recommendation(explained_recommender):
    model, seq, _ = explained_recommender
    histories = [s[s != model.n_items].tolist() for s in seq]
    top = P.prototype_deletion(model, histories, n_removed=2, order="top")
    assert torch.equal(top["item"], P.next_item_scores(model, histories).argmax(1))
    with torch.no_grad():
        hidden = model.encode(seq)[:, -1]
        unit_p = torch.nn.functional.normalize(model.prototypes, dim=-1)
        logits = torch.nn.functional.normalize(hidden, dim=-1) @ unit_p.T / model.tau
        kernel = unit_p @ torch.nn.functional.normalize(model.item_embeddings(), dim=-1).T
        full = P.prototype_scores(logits, kernel, scale=model.scale, bias=model.bias)
        assert torch.allclose(full, model(seq)[:, -1], atol=1e-5)  # the layer's formula, as stated
        removed = P.deletion_mask(model.activations(hidden), 2, "top")
        after = P.prototype_scores(logits, kernel, removed=removed, scale=model.scale, bias=model.bias)
    rows = torch.arange(len(seq))
    assert torch.allclose(top["drop"], (full - after)[rows, top["item"]], atol=1e-5)
    assert (top["rank"] >= 0).all() and top["rank"].dtype == torch.long
    plain = P.SequentialRecommender(torch.randn(50, 6), dim=8, max_len=7)
    with pytest.raises(ValueError, match="prototype layer"):
        P.prototype_deletion(plain, histories)


def test_cached_recommender_names_another_split_by_its_shape(small_shop, tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    recipe = P.RecRecipe(dim=8, epochs=1, batch_size=60)
    P.cached_recommender(features, data.split_by_time(small_shop.sequences)[0], recipe, shop_config=small_shop.config,
                         vit_key="test")
    train3, _, _ = data.split_train_valid_test(small_shop.sequences)
    model, _ = P.cached_recommender(features, train3, recipe, shop_config=small_shop.config, vit_key="test")
    assert len(list((tmp_path / "models" / "ch9").glob("sasrec-*.pt"))) == 2 and model.max_len == train3.shape[1] - 1


def test_recommender_study_selects_on_validation_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))
    images, labels = _images()
    config = data.ShopConfig(n_users=60, n_items=30, length=8, attributes=data.ATTRIBUTES[:3])
    shop = data.simulate_shop(images, labels, config)
    features = torch.randn(30, 6, generator=torch.Generator().manual_seed(0))
    protocol = dict(P.REC_STUDY, grid={"n_prototypes": [3, 4], "tau": [0.1]}, seeds=[0, 1], n_negatives=10,
                    n_removed=[1], recipe={"dim": 8, "epochs": 2, "finetune_epochs": 1, "batch_size": 30})
    res = P.recommender_results({"s": shop}, {"s": features}, vit_key="test", protocol=protocol)
    r = res["shops"]["s"]
    grid = [row for row in r["selection"] if row["stage"] == "K x tau"]
    best = max(grid, key=lambda row: row["valid NDCG@10"])  # chosen on validation, never on test
    stage2 = [best] + [row for row in r["selection"] if row["stage"] == "weights"]
    pick = max(stage2, key=lambda row: row["valid NDCG@10"])
    fields = ("n_prototypes", "tau", "clst", "align")
    assert [r["chosen"][f] for f in fields] == [pick[f] for f in fields]
    assert r["plain_rank"].shape == r["proto_rank"].shape == (2, 60) and r["oracle_rank"].shape == (60,)
    assert r["proto_profile"].shape == (2, 60, 3) and r["proto_classes"].shape == (2, 60, 3)
    assert set(r["deletion"]) == {"top1", "random1", "bottom1"} and r["deletion"]["top1"]["rank"].shape == (2, 60)
    assert set(r["taste_recovery"]) >= {"prototypes", "history", "classes", "prototypes - history"}
    again = P.recommender_results({"s": shop}, {"s": features}, vit_key="test", protocol=protocol)
    assert torch.equal(again["shops"]["s"]["proto_rank"], r["proto_rank"])
    assert len(list((tmp_path / "results" / "ch9").glob("recommender-*.pt"))) == 1
