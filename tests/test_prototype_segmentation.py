"""Known-answer tests for Chapter 9's segmentation test (scenes, pointing game, mIoU) and its baselines."""

import numpy as np
import pytest
import torch

from helpers import prototypes as P


def test_textured_scenes_keep_item_pixels_and_texture_the_rest():
    items = np.zeros((3, 28, 28), np.uint8)
    items[:, 10:18, 8:20] = 200
    items[0, 10, 8] = 20  # a dark item pixel below the threshold counts as background
    scenes, masks = P.textured_scenes(items, amplitude=30, threshold=25, seed=1)
    assert scenes.dtype == np.uint8 and masks.dtype == bool and scenes.shape == masks.shape == (3, 28, 28)
    assert masks.sum() == 3 * 8 * 12 - 1
    assert (scenes[masks] == 200).all()
    assert scenes[~masks].max() <= 30 and scenes[~masks].std() > 1  # a texture, not a constant
    again, _ = P.textured_scenes(items, amplitude=30, threshold=25, seed=1)
    assert np.array_equal(scenes, again)
    zero, _ = P.textured_scenes(items, amplitude=0)
    assert (zero[~masks] == 0).all()


@pytest.mark.parametrize("bad", [np.zeros((2, 28, 28), np.float32), np.zeros((2, 32, 32), np.uint8)])
def test_textured_scenes_rejects_wrong_input(bad):
    with pytest.raises(ValueError, match="uint8"):
        P.textured_scenes(bad)


def test_pointing_game_known_answers():
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[:, :2, :2] = True
    maps = torch.zeros(3, 4, 4)
    maps[0, 1, 1] = 5.0  # maximum on the object
    maps[1, 3, 3] = 5.0  # maximum on the background
    # map 2 is flat: its 16 tied maxima score the object's share, 4 / 16
    assert P.pointing_game(maps, mask).tolist() == [1.0, 0.0, 0.25]


def test_segmentation_miou_known_answers():
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True  # left half is the object
    perfect = mask.float()
    inverted = 1 - mask.float()
    scores = P.segmentation_miou(torch.stack([perfect[0], inverted[1]]), mask, quantile=0.5)
    assert scores.tolist() == [1.0, 0.0]
    # predicting the left three columns: object IoU 8/12, background IoU 4/8
    three = torch.zeros(1, 4, 4)
    three[0, :, :3] = 1
    assert P.segmentation_miou(three, mask[:1], quantile=0.25).item() == pytest.approx((8 / 12 + 4 / 8) / 2)


def test_map_metrics_reject_bad_input():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    with pytest.raises(ValueError, match="both"):
        P.pointing_game(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        P.pointing_game(torch.full((1, 4, 4), float("nan")), mask)
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        P.segmentation_miou(torch.rand(1, 2, 2), mask, quantile=0.5)
    with pytest.raises(ValueError, match="quantile"):
        P.segmentation_miou(torch.rand(1, 4, 4), mask, quantile=1.0)


def test_frozen_token_classifier_learns_a_separable_problem():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    tokens = torch.randn(300, 16, 8, generator=generator) * 0.1
    tokens[torch.arange(300), labels, 0] += 3.0  # the class is written in one patch's first feature
    for hidden in (0, 16):
        model = P.frozen_token_classifier(tokens, labels, hidden=hidden, epochs=30, lr=1e-2, batch_size=50)
        with torch.no_grad():
            assert (model(tokens.flatten(1)).argmax(1) == labels).float().mean() > 0.95
    with pytest.raises(ValueError, match="labels"):
        P.frozen_token_classifier(tokens, labels[:10])


def test_patch_tokens_of_an_earlier_block():
    from helpers import vision

    vit = vision.fashion_vit()
    x = torch.randn(3, 1, 28, 28)
    final = P.patch_tokens(vit.eval(), x)
    assert torch.allclose(P.patch_tokens(vit, x, block=3), final, atol=1e-6)  # the last block is the final tokens
    assert P.patch_tokens(vit, x, block=1).shape == (3, 16, 64)
    with pytest.raises(ValueError, match="block"):
        P.patch_tokens(vit, x, block=4)


def test_recipe_key_unchanged_by_the_block_field():
    # committed heads are named by the recipe's hash: the default (block=None) must keep the old name
    assert P.ProtoRecipe().key() == "f0cb8f7cd528"
    assert P.ProtoRecipe(block=1).key() != P.ProtoRecipe().key()
