"""helpers.vision: the shared Fashion-MNIST models, attention capture, deletion/insertion, sanity checks."""

import dataclasses

import pytest
import torch
from torch import nn

from helpers import common, data, vision, zoo


@pytest.fixture(scope="module")
def test_set():
    x, y = data.fashion_tensors("test")
    return x[:500], y[:500]


@pytest.fixture(scope="module")
def vit():
    return vision.pretrained("vit", progress=False)


def test_committed_weights_are_verified_and_accurate(vit, test_set):
    for name in vision.RECIPES:
        path = zoo.committed_path("vision", vision._weights_name(vision.RECIPES[name]))
        assert common.verified(path), (
            f"committed weights for {name!r} missing or altered: run make refresh-artefacts"
        )
    assert sum(p.numel() for p in vit.parameters()) == 139_018
    assert vit.history["test_accuracy"][-1] > 0.86
    assert vision.accuracy(vit, *test_set) > 0.84


def test_altered_weights_are_rebuilt(tmp_path, monkeypatch):
    """A corrupt cached file is retrained (here: a tiny recipe, so the test stays fast)."""
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    recipe = vision.Recipe(arch="vit", epochs=1, n_train=256, batch_size=64)
    first = vision.pretrained(recipe, progress=False)
    cached = tmp_path / "models" / "vision" / vision._weights_name(recipe)
    cached.write_bytes(b"corrupt")
    again = vision.pretrained(recipe, progress=False)
    for (k, a), b in zip(first.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"short recipe is not deterministic under its seed ({k})"


def test_short_recipe_learns(tmp_path, monkeypatch, test_set):
    """The recipe of the committed weights, shortened: it must beat chance by far on held-out images."""
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    recipe = dataclasses.replace(vision.RECIPES["vit"], epochs=2, n_train=6000)
    model = vision.pretrained(recipe, progress=False)
    assert vision.accuracy(model, *test_set) > 0.6


def test_cnn_architecture():
    cnn = vision.SmallCNN()
    assert cnn(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_attention_capture_matches_the_fused_forward(vit, test_set):
    x = test_set[0][:8]
    logits, attn = vision.vit_attentions(vit, x)
    assert attn.shape == (4, 8, 4, 17, 17)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, 8, 4, 17))
    torch.testing.assert_close(logits, vision.predict_logits(vit, x), atol=1e-5, rtol=1e-5)
    assert all(b.attn.fused_attn for b in vit.blocks) or not any(b.attn.fused_attn for b in vit.blocks)


def test_cls_rollout_rows(vit, test_set):
    _, attn = vision.vit_attentions(vit, test_set[0][:4])
    full = vision.cls_rollout(attn)
    assert full.shape == (4, 4, 4) and (full >= 0).all()
    from helpers.attention import rollout

    rows = rollout(attn)[:, 0]  # [batch, key]
    torch.testing.assert_close(rows.sum(-1), torch.ones(4))
    torch.testing.assert_close(full.flatten(1), rows[:, 1:])


def test_tokens_shape(vit, test_set):
    assert vision.vit_tokens(vit, test_set[0][:3]).shape == (3, 17, 64)


class _Linear(nn.Module):
    """p(class 1) = sigmoid(w . x): deleting positive-weight pixels can only lower it."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        z = (x[:, 0] * self.weight).flatten(1).sum(1)
        p = torch.sigmoid(z)
        return torch.stack([1 - p, p], dim=1)


def test_deletion_and_insertion_on_a_known_model():
    torch.manual_seed(0)
    weight = torch.rand(6, 6)
    model = _Linear(weight)
    images = torch.rand(3, 1, 6, 6)
    target = torch.ones(3, dtype=torch.long)
    saliency = (images[:, 0] * weight).expand(3, 6, 6)  # exact contributions
    deletion = vision.perturbation_curve(model, images, saliency, target=target, steps=36)
    insertion = vision.perturbation_curve(model, images, saliency, target=target, mode="insertion", steps=36)
    assert deletion.shape == (3, 37)
    assert (deletion.diff(dim=1) <= 1e-7).all(), "deletion must be monotone for non-negative contributions"
    assert (insertion.diff(dim=1) >= -1e-7).all()
    torch.testing.assert_close(deletion[:, 0], insertion[:, -1])
    torch.testing.assert_close(deletion[:, -1], torch.full((3,), 0.5))
    # the exact ordering beats the reverse ordering and a random one
    reverse = vision.perturbation_curve(model, images, -saliency, target=target, steps=36)
    shuffled = vision.perturbation_curve(model, images, torch.rand(3, 6, 6), target=target, steps=36)
    assert (vision.auc(deletion) < vision.auc(shuffled)).all() and (vision.auc(shuffled) < vision.auc(reverse)).all()


def test_auc_known_values():
    torch.testing.assert_close(vision.auc(torch.ones(2, 5)), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(vision.auc(torch.linspace(1, 0, 11)[None]), torch.tensor([0.5], dtype=torch.float64))


def test_cascading_randomisation_changes_weights_in_order(vit):
    layers = ["head", "blocks.3", "blocks.2"]
    original = {k: v.clone() for k, v in vit.state_dict().items()}
    seen = []
    for name, model in vision.cascading_randomisation(vit, layers):
        seen.append(name)
        state = model.state_dict()
        for done in seen:
            key = f"{done}.weight" if done == "head" else f"{done}.mlp.fc1.weight"
            assert not torch.equal(state[key], original[key])
        assert torch.equal(state["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    assert seen == layers
    for k, v in vit.state_dict().items():
        assert torch.equal(v, original[k]), "the trained model must be left untouched"


def test_map_similarity_uses_the_books_one_spearman_convention():
    a = torch.rand(4, 8, 8)
    sim = vision.map_similarity(a, 2 * a + 1)
    torch.testing.assert_close(sim["spearman"], torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(vision.map_similarity(a, -a)["spearman"], -torch.ones(4, dtype=torch.float64))
    flat = torch.zeros(2, 8, 8)
    flat[1] = a[1]  # item 0: both maps constant (1, nothing to reorder); item 1: one constant (a flat map: 0)
    rho = vision.map_similarity(torch.zeros(2, 8, 8), flat)["spearman"]
    assert rho.tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 28, 28), "channel axis"),
        (torch.zeros(2, 3, 28, 28), "grey images"),
        (torch.zeros(2, 1, 32, 32), r"\[batch, 1, 28, 28\]"),
        (torch.full((1, 1, 28, 28), float("nan")), "NaN"),
    ],
)
def test_bad_images_are_rejected(vit, bad, message):
    with pytest.raises(ValueError, match=message):
        vision.vit_attentions(vit, bad)


def test_bad_arguments_are_rejected(vit):
    images = torch.zeros(2, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown model"):
        vision.pretrained("resnet")
    with pytest.raises(ValueError, match="saliency must be"):
        vision.perturbation_curve(vit, images, torch.zeros(2, 4, 4), target=torch.zeros(2))
    with pytest.raises(ValueError, match="mode"):
        vision.perturbation_curve(vit, images, torch.zeros(2, 28, 28), target=torch.zeros(2), mode="erase")
    with pytest.raises(ValueError, match="unknown layer"):
        next(vision.cascading_randomisation(vit, ["blocks.9"]))
    with pytest.raises(ValueError, match="VisionTransformer"):
        vision.vit_attentions(vision.SmallCNN(), images)


def test_plot_explanation_grid_shape_and_bad_input():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = torch.rand(2, 8, 8)
    maps = {"a": torch.randn(2, 8, 8), "b": torch.zeros(2, 8, 8)}  # an all-zero map must not break the scale
    fig = vision.plot_explanation_grid(images, maps, row_labels=["x", "y"], title="t")
    assert len(fig.axes) == 2 * 3
    plt.close(fig)
    with pytest.raises(ValueError, match="one row label"):
        vision.plot_explanation_grid(images, maps, row_labels=["x"], title="t")


def test_deletion_restricted_to_foreground_pixels():
    """With a pixel mask, only those pixels move: the last deletion step knows its answer."""
    torch.manual_seed(1)
    weight = torch.rand(6, 6)
    model = _Linear(weight)
    images = torch.rand(2, 1, 6, 6)
    target = torch.ones(2, dtype=torch.long)
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[0, :3] = True  # top half of image 0
    mask[1, :, :2] = True  # two left columns of image 1
    saliency = torch.rand(2, 6, 6)
    curve = vision.perturbation_curve(model, images, saliency, target=target, steps=6, pixels=mask)
    kept = (images[:, 0] * weight * ~mask).flatten(1).sum(1)  # only the unmasked pixels stay
    torch.testing.assert_close(curve[:, -1], torch.sigmoid(kept))
    torch.testing.assert_close(curve[:, 0], model(images)[:, 1])
    full = vision.perturbation_curve(model, images, saliency, target=target, steps=6)
    every = vision.perturbation_curve(model, images, saliency, target=target, steps=6,
                                      pixels=torch.ones(2, 6, 6, dtype=torch.bool))
    torch.testing.assert_close(full, every)
    with pytest.raises(ValueError, match="bool mask"):
        vision.perturbation_curve(model, images, saliency, target=target, pixels=mask.float())


def test_cascading_randomisation_resets_embeddings_at_the_last_step(vit):
    layers = ["head", "blocks.3"]
    steps = [{k: v.clone() for k, v in m.state_dict().items()}
             for _, m in vision.cascading_randomisation(vit, layers, reset_embeddings=True)]
    for key in ("pos_embed", "cls_token"):
        assert torch.equal(steps[0][key], vit.state_dict()[key]), "embeddings must wait for the last step"
        assert not torch.equal(steps[-1][key], vit.state_dict()[key])
    default = [m.state_dict()["pos_embed"].clone() for _, m in vision.cascading_randomisation(vit, layers)]
    assert torch.equal(default[-1], vit.state_dict()["pos_embed"]), "the default must leave embeddings trained"
    with pytest.raises(ValueError, match="pos_embed"):
        next(vision.cascading_randomisation(vision.SmallCNN(), ["head"], reset_embeddings=True))


def test_map_similarity_known_values():
    torch.manual_seed(0)
    a = torch.randn(3, 28, 28)
    same = vision.map_similarity(a, a)
    for k, v in same.items():
        torch.testing.assert_close(v, torch.ones(3, dtype=torch.float64), msg=k)
    flipped = vision.map_similarity(a, -a)
    torch.testing.assert_close(flipped["spearman"], -torch.ones(3, dtype=torch.float64))
    for k in ("spearman_abs", "ssim", "hog"):
        torch.testing.assert_close(flipped[k], torch.ones(3, dtype=torch.float64), msg=k)
    unrelated = vision.map_similarity(a, torch.randn(3, 28, 28))
    assert all((v.abs() < 0.5).all() for k, v in unrelated.items() if k != "ssim")
    with pytest.raises(ValueError, match="same shape"):
        vision.map_similarity(a, a[:2])


def test_chefer_relevance_accumulates_gradient_weighted_attention():
    """Two blocks: the map is row 0 of (I + Ā2)(I + Ā1) with Ā = mean over heads of (grad ⊙ A)+."""
    torch.manual_seed(0)
    model = vision.fashion_vit(depth=2).eval()
    x, target = torch.randn(3, 1, 28, 28), torch.tensor([0, 3, 7])
    got = vision.chefer_relevance(model, x, target)
    attn = []
    hooks = [b.attn.attn_drop.register_forward_hook(lambda _m, _i, o: attn.append(o)) for b in model.blocks]
    for b in model.blocks:
        b.attn.fused_attn = False
    logits = model(x)
    for h in hooks:
        h.remove()
    grads = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), attn)
    eye = torch.eye(17).expand(3, -1, -1)
    a1, a2 = ((g * a).clamp_min(0).mean(1) for g, a in zip(grads, attn, strict=True))
    expected = ((eye + a2) @ (eye + a1))[:, 0, 1:].reshape(3, 4, 4)
    torch.testing.assert_close(got, expected.detach())
    assert (got >= 0).all()
    with torch.no_grad():
        model.head.weight.zero_()
    torch.testing.assert_close(vision.chefer_relevance(model, x, target), torch.zeros(3, 4, 4))


def test_rise_canvases_and_photo_method_names():
    x = torch.full((2, 3, 32, 32), 0.5)
    x[1, :, 10:20, 10:20] = -1.0
    delete_to, insert_from = vision.rise_canvases(x)
    assert torch.equal(delete_to, torch.zeros_like(x)), "RISE deletes to the normalised zero"
    inner = (slice(None), slice(5, -5), slice(5, -5))
    torch.testing.assert_close(insert_from[0][inner], x[0][inner])  # a constant image is its own blur inside
    assert (insert_from[0, :, 0, 0] < 0.5 / 2 + 1e-6).all(), "RISE pads with zeros: the corner fades to grey"
    assert insert_from[1][inner].std() < x[1][inner].std(), "the blur must smooth the square"
    kernel = vision.rise_kernel()
    assert kernel.shape == (11, 11) and torch.equal(kernel, kernel.T) and torch.equal(kernel, kernel.flip(0))
    torch.testing.assert_close(kernel.sum(), torch.tensor(1.0))
    assert kernel[5, 5] == kernel.max() and kernel[0, 0] == kernel.min() > 0
    with pytest.raises(ValueError, match="unknown method"):
        vision.photo_maps(nn.Identity(), torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), ["LIME"])


class _Pixel(nn.Module):
    """p(class 1) = sigmoid(8 * (pixel (0, 0) of channel 0 - 0.5)): one informative pixel."""

    def forward(self, x):
        z = 8.0 * (x[:, 0, 0, 0] - 0.5)
        return torch.stack([-z / 2, z / 2], dim=1)  # logits: softmax gives sigmoid(z) for class 1


def test_rise_protocol_known_answers():
    assert vision.RISE_STEPS == 224 and vision.RISE_PROTOCOL["pixels per step"] == 224
    # 224 steps of 224 pixels from the intact image: the curve of "fraction of pixels kept" is 1 - i / 224
    ones = torch.ones(1, 1, 224, 224)
    kept = vision.perturbation_curve(lambda z: torch.stack([1 - z.mean((1, 2, 3)), z.mean((1, 2, 3))], 1), ones,
                                     torch.rand(1, 224, 224), target=torch.ones(1), steps=vision.RISE_STEPS)
    torch.testing.assert_close(kept[0], 1 - torch.arange(225) / 224)
    # RISE's auc: (sum - first / 2 - last / 2) / steps; a constant curve's area is the constant
    curves = torch.rand(3, 225)
    expected = (curves.double().sum(1) - curves[:, 0] / 2 - curves[:, -1] / 2) / 224
    torch.testing.assert_close(vision.auc(curves), expected)
    torch.testing.assert_close(vision.auc(torch.full((2, 225), 0.3)), torch.full((2,), 0.3, dtype=torch.float64))
    # 8 x 8 images: a map that ranks the one informative pixel first drops the deletion curve at step 1
    images = torch.ones(2, 3, 8, 8)
    first = torch.zeros(2, 8, 8)
    first[:, 0, 0] = 1.0
    last = 1.0 - first
    curve = {name: vision.perturbation_curve(lambda z: _Pixel()(z).softmax(-1), images, m, target=torch.ones(2),
                                             steps=8, batch_size=9) for name, m in (("first", first), ("last", last))}
    high, low = torch.sigmoid(torch.tensor(4.0)), torch.sigmoid(torch.tensor(-4.0))
    torch.testing.assert_close(curve["first"], torch.cat([high.expand(2, 1), low.expand(2, 8)], 1))
    torch.testing.assert_close(curve["last"], torch.cat([high.expand(2, 8), low.expand(2, 1)], 1))
    assert (vision.auc(curve["first"]) < vision.auc(curve["last"])).all()


def test_rise_benchmark_curves_start_from_the_intact_image():
    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(32), nn.Flatten(), nn.Linear(3 * 7 * 7, 5)).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        target = model(images).argmax(1)
        p = model(images).softmax(-1)
    maps = {"a": torch.rand(2, 224, 224), "b": torch.rand(2, 224, 224)}
    curves = vision.rise_benchmark(model, images, target, maps)
    assert set(curves) == {"deletion", "insertion"} and all(set(c) == set(maps) for c in curves.values())
    assert all(c.shape == (2, 225) for per in curves.values() for c in per.values())
    rows = torch.arange(2)
    delete_to, insert_from = vision.rise_canvases(images)
    with torch.no_grad():
        grey, blur = model(delete_to).softmax(-1)[rows, target], model(insert_from).softmax(-1)[rows, target]
    for c in curves["deletion"].values():
        torch.testing.assert_close(c[:, 0], p[rows, target])
        torch.testing.assert_close(c[:, -1], grey)
    for c in curves["insertion"].values():
        torch.testing.assert_close(c[:, 0], blur)
        torch.testing.assert_close(c[:, -1], p[rows, target])
    spot = vision.rise_benchmark(model, images, target, maps, points=[0, 8, 224])
    torch.testing.assert_close(spot["insertion"]["b"], curves["insertion"]["b"][:, [0, 8, 224]])
    with pytest.raises(ValueError, match="224 x 224"):
        vision.rise_benchmark(model, images[..., :200], target, maps)
    with pytest.raises(ValueError, match="points"):
        vision.perturbation_curve(model, images, maps["a"], target=target, steps=4, points=[5])


def test_committed_rise_study_is_verified_and_complete():
    from helpers import assets

    files = sorted((common.WEIGHTS_DIR / "results" / "ch8").glob("rise-photos-*.pt"))
    assert len(files) == 1 and common.verified(files[0]), "the RISE photo study must be committed with its .sha256"
    study = torch.load(files[0], weights_only=True)
    n = len(assets.BENCHMARK_PHOTOS)
    assert study["photos"] == list(assets.BENCHMARK_PHOTOS) and n >= 12
    methods = {*vision.PHOTO_METHODS, "random"}
    for mode in ("deletion", "insertion"):
        assert set(study["curves"][mode]) == methods
        for m, c in study["curves"][mode].items():
            assert c.shape == (n, vision.RISE_STEPS + 1)
            torch.testing.assert_close(study["auc"][mode][m], vision.auc(c).float())


def test_photo_gradient_shap_is_seeded_and_restores_numpy():
    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    np.random.seed(1)
    a = vision.photo_maps(model, x, t, ["GradientSHAP"], grad_cam_layer=model[0])[0]["GradientSHAP"]
    after = np.random.random()
    np.random.seed(2)
    b = vision.photo_maps(model, x[:1], t[:1], ["GradientSHAP"], grad_cam_layer=model[0])[0]["GradientSHAP"]
    assert torch.equal(a[:1], b), "the first photo's map depends neither on the batch nor on NumPy's state"
    np.random.seed(1)
    assert np.random.random() == after, "NumPy's global generator must be left as it was"


def test_vit_maps_methods_seeds_and_bad_input(vit, test_set):
    import numpy as np

    x, _ = test_set
    x, t = x[:3], vision.predict_logits(vit, x[:3]).argmax(1)
    np.random.seed(1)
    maps, seconds, deltas = vision.vit_maps(vit, x, t, shap_baselines=x, seed=3)
    after = np.random.random()
    assert list(maps) == list(vision.VIT_METHODS) == list(seconds)
    assert all(m.shape == (3, 28, 28) for m in maps.values())
    assert set(deltas) == {"integrated gradients", "IG, grey baseline"} and deltas["IG, grey baseline"].shape == (3,)
    np.random.seed(2)
    again, _, _ = vision.vit_maps(vit, x, t, ["GradientSHAP", "random"], shap_baselines=x, seed=3)
    np.random.seed(1)
    assert np.random.random() == after, "NumPy's global generator must be left as it was"
    for m in ("GradientSHAP", "random"):
        assert torch.equal(maps[m], again[m]), f"{m} must depend only on its seed"
    with pytest.raises(ValueError, match="unknown method"):
        vision.vit_maps(vit, x, t, ["LIME"])
    with pytest.raises(ValueError, match="shap_baselines"):
        vision.vit_maps(vit, x, t, ["GradientSHAP"])


def test_vit_faithfulness_study_groups_can_be_recomputed_alone(vit, test_set):
    x, y = test_set
    idx = torch.cat([(y == c).nonzero()[:2, 0] for c in (0, 1)])
    x, groups = x[idx], y[idx]
    t = vision.predict_logits(vit, x).argmax(1)
    study = vision.vit_faithfulness_study(vit, x, t, groups, shap_baselines=x)
    assert set(study["curves"]) == set(vision.VIT_PROTOCOLS) and torch.equal(study["target"], t)
    rows = groups == 1
    random = torch.rand(len(x), 28, 28, generator=torch.Generator().manual_seed(0))[rows]
    one = vision.vit_faithfulness(vit, x[rows], t[rows], shap_baselines=x, seed=1, random_map=random)
    for p, per in study["curves"].items():
        for m, c in per.items():
            assert c.shape == (4, vision.VIT_STEPS + 1)
            torch.testing.assert_close(one["curves"][p][m], c[rows], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one["ig_delta"]["integrated gradients"], study["ig_delta"]["integrated gradients"][rows])


def test_vit_sanity_study_spot_check_matches_the_full_cascade(vit, test_set):
    x, _ = test_set
    x, t = x[:2], vision.predict_logits(vit, x[:2]).argmax(1)
    full = vision.vit_sanity_study(vit, x, t)
    last = vision.vit_sanity_study(vit, x, t, steps=[len(vision.VIT_CASCADE) - 1])
    for m in vision.VIT_SANITY:
        for k, v in full["similarity"][m].items():
            assert v.shape == (len(vision.VIT_CASCADE), 2)
            torch.testing.assert_close(last["similarity"][m][k][0], v[-1])
            torch.testing.assert_close(last["floor"][m][k], full["floor"][m][k])
    assert torch.allclose(full["similarity"]["rollout"]["spearman"][0], torch.ones(2, dtype=torch.float64)), \
        "rollout never reads the head: re-initialising it alone leaves the map unchanged"


def test_committed_vit_studies_are_verified_and_complete():
    folder = common.WEIGHTS_DIR / "results" / "ch8"
    faith, sanity = sorted(folder.glob("vit-faithfulness-*.pt")), sorted(folder.glob("vit-sanity-*.pt"))
    assert len(faith) == 1 and common.verified(faith[0]), "the ViT faithfulness study must be committed (.sha256)"
    assert len(sanity) == 1 and common.verified(sanity[0]), "the ViT sanity study must be committed with its .sha256"
    study = torch.load(faith[0], weights_only=True)
    for p in vision.VIT_PROTOCOLS:
        assert set(study["curves"][p]) == set(vision.VIT_METHODS)
        assert all(c.shape == (300, vision.VIT_STEPS + 1) for c in study["curves"][p].values())
    cascade = torch.load(sanity[0], weights_only=True)
    assert set(cascade["similarity"]) == set(vision.VIT_SANITY)
    assert all(v.shape[0] == len(vision.VIT_CASCADE) for per in cascade["similarity"].values() for v in per.values())


def test_rise_masks_are_smooth_random_and_keep_a_share_p_of_the_image():
    m = vision.rise_masks(4000, 28, grid=7, p=0.5, seed=0)
    assert m.shape == (4000, 28, 28) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert abs(float(m.mean()) - 0.5) < 0.02                                    # E[M] = p
    assert torch.equal(vision.rise_masks(5, 28, seed=3), vision.rise_masks(5, 28, seed=3))
    assert not torch.equal(vision.rise_masks(5, 28, seed=3), vision.rise_masks(5, 28, seed=4))
    soft = ((m > 0.01) & (m < 0.99)).float().mean()                             # bilinear edges, not a hard grid
    assert float(soft) > 0.1
    with pytest.raises(ValueError, match="grid"):
        vision.rise_masks(3, 4, grid=7)


def test_rise_saliency_is_the_mask_average_weighted_by_the_probability_and_finds_the_region():
    region = torch.zeros(1, 1, 28, 28)
    region[..., 4:12, 16:24] = 1.0

    class RegionModel(nn.Module):             # class 0's logit grows with how much of the region is visible
        def forward(self, x):
            seen = (x * region).sum((1, 2, 3)) / region.sum()
            return torch.stack([8 * (seen - 0.5), torch.zeros_like(seen)], 1)

    image = torch.ones(1, 1, 28, 28)
    sal = vision.rise_saliency(RegionModel(), image, [0], fill=0.0, n_masks=300, seed=1, batch_size=64)
    masks = vision.rise_masks(300, 28, seed=1)
    probs = RegionModel()(image * masks[:, None]).softmax(-1)[:, 0]               # fill 0: image x mask
    assert torch.allclose(sal[0], torch.einsum("n,nhw->hw", probs, masks) / (300 * 0.5), atol=1e-5)
    inside = region[0, 0].bool()
    assert float(sal[0][inside].mean()) > float(sal[0][~inside].mean()) + 0.05
    with pytest.raises(ValueError, match="one class per image"):
        vision.rise_saliency(RegionModel(), image, [0, 1], fill=0.0, n_masks=4)
    with pytest.raises(ValueError, match="finite"):
        vision.rise_saliency(RegionModel(), image * float("nan"), [0], fill=0.0, n_masks=4)
