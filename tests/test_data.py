"""The book's own data (helpers/data.py): shared splits are disjoint, balanced, repeatable; image data,
digits, domain shifts, captions, the task stream and the simulated shop have known answers."""

import numpy as np
import pytest
import torch

from helpers import common, data
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


# --- Fashion-MNIST tensors ---------------------------------------------------------------------


def test_fashion_tensors_are_normalised_model_inputs():
    x, y = data.fashion_tensors("test")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (10000,)
    assert y.dtype == torch.int64 and sorted(y.unique().tolist()) == list(range(10))
    pixels = data.unnormalise(x)
    assert pixels.shape == (10000, 28, 28) and float(pixels.min()) == 0.0 and float(pixels.max()) == 1.0
    # the training-set statistics: the normalised training images have mean ~0 and std ~1
    train, _ = data.fashion_tensors("train")
    assert abs(float(train.mean())) < 1e-3 and abs(float(train.std()) - 1) < 1e-3


def test_normalise_and_unnormalise_known_answer():
    x = data.normalise(np.array([[[0, 255] * 14] * 28], np.uint8))
    assert x.shape == (1, 1, 28, 28)
    expected = torch.tensor([-data.FASHION_MEAN, 1 - data.FASHION_MEAN]) / data.FASHION_STD
    torch.testing.assert_close(x[0, 0, 0, :2], expected)
    torch.testing.assert_close(data.unnormalise(x)[0, 0, :2], torch.tensor([0.0, 1.0]))
    assert data.normalise(np.zeros((28, 28), np.uint8)).shape == (1, 1, 28, 28)  # one image gains a batch axis
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        data.normalise(np.zeros((2, 32, 32), np.uint8))


def test_check_images_says_what_is_wrong():
    assert data.check_images(torch.zeros(2, 1, 28, 28, dtype=torch.float64)).dtype == torch.float32
    with pytest.raises(ValueError, match="channel axis"):
        data.check_images(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="grey images"):
        data.check_images(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="NaN"):
        data.check_images(torch.full((1, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="torch.Tensor"):
        data.check_images(np.zeros((1, 1, 28, 28)))


# --- digits and domain shifts ------------------------------------------------------------------


def test_digits_are_one_data_set_in_two_framings():
    images, labels = data.digits_images()
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert images.max() == 255 and images.min() == 0 and sorted(set(labels.tolist())) == list(range(10))
    framed, framed_labels = data.digits_tensors()
    assert framed.shape == (1797, 1, 28, 28) and np.array_equal(framed_labels.numpy(), labels)
    pixels = data.unnormalise(framed)
    assert float(pixels[:, :4].max()) == float(pixels[:, :, -4:].max()) == 0.0  # a 4-pixel black margin
    small, _ = data.digits_images(size=20)
    assert small.shape == (1797, 20, 20)
    # the framed digits are the 20 x 20 upscaling, not rounded to uint8
    np.testing.assert_allclose((pixels[:, 4:24, 4:24] * 255).numpy(), small, atol=0.5 + 1e-3)
    with pytest.raises(ValueError, match="size"):
        data.digits_images(size=0)


def test_domain_shifts_of_uint8_images_known_answer():
    images = np.arange(2 * 9, dtype=np.uint8).reshape(2, 3, 3)
    assert (data.shift_domain(images, "none") == images).all()
    assert (data.shift_domain(images, "inverted") == 255 - images).all()
    rotated = data.shift_domain(data.shift_domain(images, "rotated"), "rotated")
    assert (rotated == images[:, ::-1, ::-1]).all()
    for kind in ("edges", "edges-replicate"):
        edges = data.shift_domain(np.pad(np.full((1, 4, 4), 200, np.uint8), ((0, 0), (2, 2), (2, 2))), kind)
        assert edges.dtype == np.uint8 and edges.max() == 255 and edges[0, 4, 4] == 0  # a flat interior has no edge
        batch = np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8)
        alone = np.stack([data.shift_domain(batch[i : i + 1], kind)[0] for i in range(3)])
        assert (data.shift_domain(batch, kind) == alone).all(), "edge maps must not mix neighbouring images"
    # a bright border: zero padding sees an edge there, replicate padding does not
    full = np.full((1, 6, 6), 200, np.uint8)
    assert data.shift_domain(full, "edges")[0, 0, 0] > 0 and data.shift_domain(full, "edges-replicate").max() == 0


def test_domain_shifts_agree_across_representations():
    raw, _ = data.digits_images()  # digits touch the frame, so the two edge paddings differ
    raw = raw[:50]
    x = data.normalise(raw)
    for kind in data.DOMAIN_SHIFTS:
        shifted = data.shift_domain(x, kind)
        assert shifted.shape == (50, 1, 28, 28) and shifted.dtype == torch.float32
        pixels = data.unnormalise(shifted)
        assert 0 <= float(pixels.min()) <= float(pixels.max()) <= 1
        np.testing.assert_allclose((pixels * 255).numpy(), data.shift_domain(raw, kind), atol=0.5 + 1e-3)
    assert not torch.equal(data.shift_domain(x, "edges"), data.shift_domain(x, "edges-replicate"))


def test_domain_shift_bad_inputs():
    images = np.zeros((2, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown domain shift"):
        data.shift_domain(images, "blur")
    with pytest.raises(ValueError, match="unknown domain shift"):
        data.shift_domain(images, "invert")  # one set of kind names: "inverted"
    with pytest.raises(ValueError, match="uint8"):
        data.shift_domain(images.astype(float), "inverted")
    with pytest.raises(ValueError, match="grey images"):
        data.shift_domain(torch.zeros(2, 3, 28, 28), "inverted")


# --- captions ----------------------------------------------------------------------------------


def test_captions_index_the_table_and_describe_the_pixels():
    table = data.caption_table()
    assert len(table) == len(data.CLASS_TEXT) * len(data.TRAIN_TEMPLATES) * 4 * 3 * 4 * 3
    index = data.caption_index(torch.tensor([2]), torch.tensor([0]), torch.tensor([0]), torch.tensor([1]),
                               torch.tensor([-1]), torch.tensor([0]))
    assert table[int(index)] == "a photo of a dark patterned pullover with long sleeves."
    images = data.normalise((torch.tensor([0.3, 0.9])[:, None, None] * 255 * torch.ones(2, 28, 28)).byte())
    attrs = data.pixel_attributes(images, torch.tensor([0, 0]))
    assert attrs["tone"].tolist() == [0, 2] and attrs["texture"].tolist() == [0, 0]   # flat grey squares
    drawn = data.sample_captions(attrs, torch.tensor([0, 0]), torch.Generator().manual_seed(0))
    assert all(table[int(i)].startswith(("a ", "an ")) and "t-shirt" in table[int(i)] for i in drawn)


def test_sample_captions_are_repeatable_under_a_seed():
    x, y = data.fashion_tensors("test")
    attrs = data.pixel_attributes(x[:200], y[:200])
    a = data.sample_captions(attrs, y[:200], torch.Generator().manual_seed(1))
    b = data.sample_captions(attrs, y[:200], torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (200,) and 0 <= int(a.min()) and int(a.max()) < len(data.caption_table())
    table = data.caption_table()
    assert all(data.CLASS_TEXT[int(c)] in table[int(i)] for i, c in zip(a, y[:200], strict=True))


# --- the task stream ---------------------------------------------------------------------------


def test_stream_is_deterministic_under_a_seed():
    a = data.make_stream(("inverted", "digits"), n_train=20, n_test=10, seed=3)
    b = data.make_stream(("inverted", "digits"), n_train=20, n_test=10, seed=3)
    c = data.make_stream(("inverted", "digits"), n_train=20, n_test=10, seed=4)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta.x_train, tb.x_train) and torch.equal(ta.y_test, tb.y_test)
    assert not torch.equal(a[0].x_train, c[0].x_train)
    assert [t.name for t in a] == ["inverted", "digits"] and a[1].class_names == data.DIGIT_NAMES
    assert a[0].x_train.shape == (20, 1, 28, 28) and a[1].x_test.shape == (10, 1, 28, 28)


def test_shifts_and_digits_are_images_in_range():
    x = data.normalise((torch.rand(3, 28, 28) * 255).byte())
    for kind in ("none", "inverted", "edges", "rotated"):
        pixels = data.unnormalise(data.shift_domain(x, kind))
        assert pixels.shape == (3, 28, 28) and 0 <= float(pixels.min()) <= float(pixels.max()) <= 1
    assert torch.allclose(data.unnormalise(data.shift_domain(x, "inverted")), 1 - data.unnormalise(x), atol=1e-5)
    digits, labels = data.digits_tensors()
    assert digits.shape == (1797, 1, 28, 28) and set(labels.tolist()) == set(range(10))
    assert float(data.unnormalise(digits)[:, :4].max()) == 0.0  # MNIST-style empty border


def test_task_and_stream_bad_inputs_give_clear_errors():
    x = data.normalise(torch.zeros(2, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty train set"):
        data.Task("empty", ("a",), ("a {}.",), x[:0], torch.zeros(0, dtype=torch.long), x, torch.zeros(2).long())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        data.Task("bad", ("a",), ("a {}.",), x, torch.tensor([0, 3]), x, torch.zeros(2).long())
    with pytest.raises(ValueError, match="contain"):
        data.Task("bad", ("a",), ("no slot",), x, torch.zeros(2).long(), x, torch.zeros(2).long())
    with pytest.raises(ValueError, match="stream is empty"):
        data.make_stream(())
    with pytest.raises(ValueError, match="unknown domain shift"):
        data.shift_domain(x, "sepia")


def test_retention_and_reference_sets_are_disjoint_from_the_tasks():
    retention = data.retention_set(30)
    x, y = data.fashion_tensors("test")
    assert torch.equal(retention.x_test, x[:30]) and torch.equal(retention.y_test, y[:30])
    assert retention.templates == data.HELD_OUT_TEMPLATES
    ref = data.reference_images(20, seed=1)
    assert ref.shape == (20, 1, 28, 28) and torch.equal(ref, data.reference_images(20, seed=1))
    with pytest.raises(ValueError, match="n must be in"):
        data.retention_set(data.ZERO_SHOT_SIZE + 1)
    with pytest.raises(ValueError, match="n must be in"):
        data.reference_images(0)


# --- the simulated shop ------------------------------------------------------------------------


def _images(n=400, seed=0):
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 28, 28)) * 255 * (rng.random((n, 1, 1)) + 0.2)).clip(0, 255).astype(np.uint8)
    return images, np.arange(n) % 10


def test_item_attributes_known_answer():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0, :7] = 255  # a quarter of the image, full brightness
    img[1, :, :14] = 102  # half the image at 0.4
    np.testing.assert_allclose(data.item_attributes(img), [[1.0, 0.25], [0.4, 0.5]])


def test_simulator_is_deterministic_and_follows_its_preference_model():
    images, labels = _images()
    config = data.ShopConfig(n_users=300, n_items=200, length=20, seed=3)
    shop = data.simulate_shop(images, labels, config)
    again = data.simulate_shop(images, labels, config)
    assert np.array_equal(shop.sequences, again.sequences) and np.array_equal(shop.liked, again.liked)
    other = data.simulate_shop(images, labels, data.ShopConfig(n_users=300, n_items=200, length=20, seed=4))
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
    shop = data.simulate_shop(images, labels, data.ShopConfig(n_users=50, n_items=20, length=30, repeats=True))
    assert any(len(set(s)) < len(s) for s in shop.sequences)
    train, test = data.split_by_time(shop.sequences, n_test=2)
    assert train.shape == (50, 28) and test.shape == (50, 2)
    assert np.array_equal(np.concatenate([train, test], 1), shop.sequences)


def test_shop_bad_inputs():
    images, labels = _images()
    shop = data.simulate_shop(images, labels, data.ShopConfig(n_users=10, n_items=20, length=5))
    with pytest.raises(ValueError, match="unknown user"):
        shop.utility([10])
    with pytest.raises(ValueError, match="unknown user"):
        shop.check_users([-1])
    with pytest.raises(ValueError, match="multiple"):
        data.simulate_shop(images, labels, data.ShopConfig(n_items=25))
    with pytest.raises(ValueError, match="allow repeats"):
        data.simulate_shop(images, labels, data.ShopConfig(n_items=20, length=30))
    with pytest.raises(ValueError, match="uint8"):
        data.item_attributes(np.zeros((2, 32, 32)))


def test_default_shop_key_is_unchanged_by_the_attribute_option():
    # committed models are named by this hash of the default shop: the new `attributes` field must not move it
    key = data.ShopConfig().as_key()
    assert "attributes" not in key and common.content_hash(key) == "9c0c5a80a3895463"
    assert data.ATTRIBUTE_SHOP.as_key()["attributes"] == data.ATTRIBUTES
    images, labels = _images()
    small = dict(n_users=40, n_items=20, length=6)
    a = data.simulate_shop(images, labels, data.ShopConfig(**small))
    b = data.simulate_shop(images, labels, data.ShopConfig(**small, attributes=("brightness", "size")))
    assert np.array_equal(a.sequences, b.sequences) and np.array_equal(a.taste, b.taste)


def test_item_attributes_texture_and_aspect_known_answer():
    img = np.zeros((2, 28, 28), np.uint8)
    img[0, 4:9, 2:12] = 255  # a 10 wide x 5 tall plain rectangle
    img[1, :, 0::2] = 255  # columns alternating 1.0 and 0.498 over the whole image
    img[1, :, 1::2] = 127
    out = data.item_attributes(img, names=("texture", "aspect", "size"))
    np.testing.assert_allclose(out[0], [0.0, 2.0, 50 / 784])
    np.testing.assert_allclose(out[1], [(1 - 127 / 255) / 2, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown attribute"):
        data.item_attributes(img, names=("colour",))


def test_attribute_shop_has_no_class_preference_and_follows_the_taste():
    images, labels = _images()
    config = data.ShopConfig(n_users=300, n_items=200, length=20, alpha=0.0, gamma=0.0, attributes=data.ATTRIBUTES)
    shop = data.simulate_shop(images, labels, config)
    assert shop.taste.shape == (300, 4) and shop.item_attrs.shape == (200, 4)
    liked = shop.liked[np.arange(300)[:, None], shop.item_class[shop.sequences]].mean()
    assert abs(liked - shop.liked.mean()) < 0.03  # liked classes play no part when alpha = 0
    chosen = shop.item_attrs[shop.sequences].mean(1)
    for a in range(3):  # noise images all fill the frame, so only "aspect" (column 3) is constant (and 0)
        assert np.corrcoef(shop.taste[:, a], chosen[:, a])[0, 1] > 0.3
    assert np.all(shop.item_attrs[:, 3] == 0)


def test_split_train_valid_test_is_sasrec_leave_two_out():
    seqs = np.arange(12).reshape(2, 6)
    train, valid, test = data.split_train_valid_test(seqs)
    assert train.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]] and valid.tolist() == [4, 10] and test.tolist() == [5, 11]
    with pytest.raises(ValueError, match="time >= 3"):
        data.split_train_valid_test(np.zeros((3, 2), int))


def test_caption_and_shop_bad_inputs():
    x, y = data.fashion_tensors("test")
    with pytest.raises(ValueError, match="labels must be"):
        data.pixel_attributes(x[:4], y[:3])
    with pytest.raises(ValueError, match="labels must be"):
        data.pixel_attributes(x[:2], torch.tensor([0, 10]))
    attrs = data.pixel_attributes(x[:4], y[:4])
    with pytest.raises(ValueError, match="p_mention"):
        data.sample_captions(attrs, y[:4], torch.Generator(), p_mention=1.5)
    with pytest.raises(ValueError, match="one per label"):
        data.sample_captions(attrs, y[:3], torch.Generator())
    images, labels = _images()
    with pytest.raises(ValueError, match="as many labels"):
        data.simulate_shop(images, labels[:10])
    with pytest.raises(ValueError, match="as many labels"):
        data.simulate_shop(images[:0], labels[:0])


def test_flipped_domain_is_upside_down_in_both_representations():
    raw = (torch.rand(3, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()
    flipped = data.shift_domain(raw, "flipped")
    assert (flipped == raw[:, ::-1]).all() and (data.shift_domain(flipped, "flipped") == raw).all()
    norm = data.shift_domain(data.normalise(raw), "flipped")
    assert torch.allclose(norm, data.normalise(flipped), atol=1e-6)


def test_held_out_domain_shifts_the_retention_images_and_refuses_stream_domains():
    held, retention = data.held_out_domain("flipped", n=50), data.retention_set(50)
    assert torch.allclose(held.x_test, data.shift_domain(retention.x_test, "flipped"))
    assert torch.equal(held.y_test, retention.y_test) and held.templates == data.TRAIN_TEMPLATES
    for kind in ("inverted", "none", "edges-replicate"):
        with pytest.raises(ValueError, match="outside the stream"):
            data.held_out_domain(kind)


def test_photo_patches_are_seeded_grey_crops_in_range():
    a, b, c = data.photo_patches(20, seed=0), data.photo_patches(20, seed=0), data.photo_patches(20, seed=1)
    assert a.shape == (20, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    pixels = data.unnormalise(a)
    assert float(pixels.min()) >= -1e-6 and float(pixels.max()) <= 1 + 1e-6
    with pytest.raises(ValueError, match="n must be"):
        data.photo_patches(0)
