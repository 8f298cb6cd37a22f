"""helpers.prototypes: push returns real patches/items, map shapes, the shop simulator, ranking metrics, bad input."""

import math

import numpy as np
import pytest
import torch

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


def test_item_attributes_known_answer():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0, :7] = 255  # a quarter of the image, full brightness
    img[1, :, :14] = 102  # half the image at 0.4
    np.testing.assert_allclose(P.item_attributes(img), [[1.0, 0.25], [0.4, 0.5]])


def test_simulator_is_deterministic_and_follows_its_preference_model():
    images, labels = _images()
    config = P.ShopConfig(n_users=300, n_items=200, length=20, seed=3)
    shop = P.simulate_shop(images, labels, config)
    again = P.simulate_shop(images, labels, config)
    assert np.array_equal(shop.sequences, again.sequences) and np.array_equal(shop.liked, again.liked)
    other = P.simulate_shop(images, labels, P.ShopConfig(n_users=300, n_items=200, length=20, seed=4))
    assert not np.array_equal(shop.sequences, other.sequences)
    assert shop.sequences.shape == (300, 20)
    assert all(len(set(s)) == len(s) for s in shop.sequences), "repeats are forbidden by default"
    assert set(shop.liked.sum(1)) <= {2, 3}
    # empirical class frequencies follow the liked classes
    counts = np.stack([np.bincount(shop.item_class[s], minlength=10) for s in shop.sequences])  # [U, classes]
    corr = [np.corrcoef(c, l)[0, 1] for c, l in zip(counts, shop.liked, strict=True)]
    assert np.mean(corr) > 0.7
    assert shop.liked[np.arange(300)[:, None], shop.item_class[shop.sequences]].mean() > 0.75
    # and the attribute taste: users with a positive weight pick items above the mean attribute
    chosen = shop.item_attrs[shop.sequences].mean(1)  # [U, 2]
    for a in range(2):
        assert np.corrcoef(shop.taste[:, a], chosen[:, a])[0, 1] > 0.3


def test_simulator_can_allow_repeats_and_split_holds_out_the_last_items():
    images, labels = _images()
    shop = P.simulate_shop(images, labels, P.ShopConfig(n_users=50, n_items=20, length=30, repeats=True))
    assert any(len(set(s)) < len(s) for s in shop.sequences)
    train, test = P.split_by_time(shop.sequences, n_test=2)
    assert train.shape == (50, 28) and test.shape == (50, 2)
    assert np.array_equal(np.concatenate([train, test], 1), shop.sequences)


def test_shop_bad_inputs():
    images, labels = _images()
    shop = P.simulate_shop(images, labels, P.ShopConfig(n_users=10, n_items=20, length=5))
    with pytest.raises(ValueError, match="unknown user"):
        shop.utility([10])
    with pytest.raises(ValueError, match="unknown user"):
        shop.check_users([-1])
    with pytest.raises(ValueError, match="multiple"):
        P.simulate_shop(images, labels, P.ShopConfig(n_items=25))
    with pytest.raises(ValueError, match="allow repeats"):
        P.simulate_shop(images, labels, P.ShopConfig(n_items=20, length=30))
    with pytest.raises(ValueError, match="uint8"):
        P.item_attributes(np.zeros((2, 32, 32)))


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
    return P.simulate_shop(images, labels, P.ShopConfig(n_users=120, n_items=50, length=8))


def test_recommender_prototypes_become_real_item_embeddings(small_shop):
    train, test = P.split_by_time(small_shop.sequences)
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    recipe = P.RecRecipe(dim=16, n_prototypes=5, epochs=2, finetune_epochs=1, batch_size=40)
    model, history = P.train_recommender(features, train, recipe)
    emb = model.item_embeddings().detach()
    assert model.prototype_items.shape == (5,)
    assert torch.equal(model.prototypes.detach(), emb[model.prototype_items])
    scores = P.next_item_scores(model, [list(s) for s in train])
    assert scores.shape == (120, 50)
    assert torch.isinf(scores[0, train[0]]).all() and torch.isfinite(scores[0, test[0]]).all()
    hr, ndcg = P.hit_rate_ndcg(scores, torch.as_tensor(test[:, 0]))
    assert 0 <= ndcg <= hr <= 1
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
    train, _ = P.split_by_time(small_shop.sequences)
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
    train, _ = P.split_by_time(small_shop.sequences)
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
    monkeypatch.setattr(P, "patch_tokens", lambda vit, x, batch_size=2000: vit.forward_features(x))
    head, history = P.cached_prototype_head(TinyViT(), images, labels, recipe)
    assert len(list((tmp_path / "models" / "ch9").glob("protopnet-*.pt"))) == 1
    again, history2 = P.cached_prototype_head(TinyViT(), images, labels, recipe)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True))
    assert not again.training and "state_before_push" in history2
