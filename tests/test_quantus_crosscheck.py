"""Independent cross-check of the book's hand-written faithfulness metrics against Quantus 0.6.0.

Each test runs a book function and the Quantus metric that computes the same quantity on the same tiny,
fixed-seed model and inputs, and asserts agreement. Where the two differ only by a convention (Quantus's
curve has no step-0 point, its region metrics return drops, its SSIM takes its data range from the pair),
the test converts one into the other explicitly and says so.

Quantus is installed with ``--no-deps`` (requirements-nodeps.txt). Of its declared dependencies only
OpenCV and cachetools are not in the book's environment: cachetools is imported only with TensorFlow, and
OpenCV is imported at module level but used only by the rotation and translation perturbations
(``quantus.functions.perturb_func.rotation`` / ``translation_*_direction``), which nothing here calls.
:func:`_import_quantus` lends Quantus an empty ``cv2`` for its import and takes it back at once, so no
other module sees it and any accidental use of OpenCV fails loudly.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from helpers import evaluation, vision


def _import_quantus():
    if "quantus" in sys.modules or importlib.util.find_spec("cv2") is not None:
        return importlib.import_module("quantus")
    stub = types.ModuleType("cv2")

    def _missing(name):
        raise AttributeError(f"cv2.{name}: OpenCV is not installed (quantus comes with --no-deps)")

    stub.__getattr__ = _missing
    sys.modules["cv2"] = stub
    try:
        return importlib.import_module("quantus")
    finally:
        del sys.modules["cv2"]


quantus = _import_quantus()

PIXEL_TOL = 1e-5  # float32 forward passes, batched (book) vs one image at a time (Quantus)


class TinyCNN(nn.Module):
    """Two 3 x 3 convolutions and a linear head on ``[batch, C, 8, 8]`` images; 3 classes, logits out."""

    def __init__(self, channels: int = 1, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def _model(channels: int) -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN(channels).eval()


def _images(channels: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, 8, 8, generator=torch.Generator().manual_seed(1))


def _probabilities(model):
    return lambda x: torch.softmax(model(x), dim=-1)  # Quantus's softmax=True appends the same softmax


def _gradient(model: nn.Module, inputs, targets, **_) -> np.ndarray:
    """Gradient of the target logit w.r.t. the input, summed over channels: ``[batch, 8, 8]``."""
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32).clone().requires_grad_(True)
    logits = model(x)
    logits.gather(1, torch.as_tensor(np.asarray(targets)).long()[:, None]).sum().backward()
    return x.grad.sum(1).numpy()


# ---------------------------------------------------------------------------------------------
# 1. Pixel deletion curve (Chapter 8) vs quantus.PixelFlipping
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_deletion_curve_matches_pixel_flipping(channels):
    model, x = _model(channels), _images(channels)
    target = _probabilities(model)(x).argmax(1)
    # distinct scores: Quantus orders by np.argsort(-a) (not stable), the book by a stable sort
    saliency = torch.rand(len(x), 8, 8, generator=torch.Generator().manual_seed(2))
    book = vision.perturbation_curve(_probabilities(model), x, saliency, target=target, mode="deletion",
                                     canvas=0.0, steps=64)  # fmt: skip
    assert (book.amax(1) - book.amin(1)).min() > 100 * PIXEL_TOL, "the curves must move, or nothing is checked"
    # Quantus broadcasts a [H, W] map over the channels and flips single (channel, pixel) values, most
    # salient first (its features_in_step must divide H * W, so it cannot be C = 3). A pixel's C channels tie,
    # so they sort together: Quantus's flips C k - C + 1 ... C k delete the book's k-th pixel, and its
    # curve, which starts after the first flip, has the book's point k (k pixels deleted) at index C k - 1.
    metric = quantus.PixelFlipping(features_in_step=1, perturb_baseline=0.0, disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=saliency.numpy(),
                    channel_first=True, softmax=True, device="cpu")  # fmt: skip
    theirs = np.asarray(theirs)[:, channels - 1 :: channels]
    np.testing.assert_allclose(theirs, book[:, 1:].numpy(), rtol=0, atol=PIXEL_TOL)
    # AUC: Quantus's calculate_auc calls np.trapz, which NumPy 2.4 removed, so its trapezoid is written out
    # here (dx = 1 per step, no step-0 point); the book's vision.auc puts the 65 points on [0, 1]:
    # 64 * book_auc = Quantus_auc + (p_0 + p_1) / 2.
    quantus_auc = np.trapezoid(theirs, dx=1.0, axis=1)
    converted = 64 * vision.auc(book).numpy() - (book[:, 0] + book[:, 1]).double().numpy() / 2
    np.testing.assert_allclose(converted, quantus_auc, rtol=0, atol=64 * PIXEL_TOL)


# ---------------------------------------------------------------------------------------------
# 2. Patch deletion (upsampled patch maps, Chapter 8) vs quantus.Selectivity and RegionPerturbation
# ---------------------------------------------------------------------------------------------


def test_patch_deletion_matches_selectivity_and_region_perturbation():
    model, x = _model(3), _images(3)
    target = _probabilities(model)(x).argmax(1)
    patches = torch.rand(len(x), 4, 4, generator=torch.Generator().manual_seed(3)) + 0.1  # distinct, > 0
    saliency = vision.upsample(patches, 8)  # constant on 2 x 2 patches
    # 16 steps of 4 pixels: the book's stable sort keeps each patch's 4 equal pixels together, so each
    # step deletes exactly one whole patch, most salient first.
    book = vision.perturbation_curve(_probabilities(model), x, saliency, target=target, canvas=0.0, steps=16)
    kwargs = dict(patch_size=2, perturb_baseline=0.0, disable_warnings=True)
    call = dict(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=saliency.numpy(),
                channel_first=True, softmax=True, device="cpu")  # fmt: skip
    # Quantus slides a 2 x 2 window over every offset and keeps non-overlapping windows by summed
    # attribution; on a map constant on the aligned patches (all > 0, distinct) the aligned windows win,
    # in the book's order. Selectivity returns the probability after each patch (no step-0 point) ...
    selectivity = np.asarray(quantus.Selectivity(**kwargs)(**call), dtype=np.float64)
    np.testing.assert_allclose(selectivity, book[:, 1:].numpy(), rtol=0, atol=PIXEL_TOL)
    # ... and RegionPerturbation the drop from the unperturbed probability, p_0 - p_k.
    drops = np.asarray(quantus.RegionPerturbation(regions_evaluation=16, order="morf", **kwargs)(**call))
    np.testing.assert_allclose(drops, (book[:, :1] - book[:, 1:]).numpy(), rtol=0, atol=PIXEL_TOL)


# ---------------------------------------------------------------------------------------------
# 3. ERASER comprehensiveness, sufficiency and AOPC (Chapters 7, 14) vs quantus.RegionPerturbation
# ---------------------------------------------------------------------------------------------

WEIGHTS = torch.linspace(-1.0, 1.5, 31)
WEIGHTS[0] = 0.0  # id 0 is padding and weighs nothing


class BagOfWords(nn.Module):
    """Two classes; the class-1 logit is the sum of the token weights. Quantus feeds ``[batch, 1, pos]``
    float ids; deleting a token and re-padding (the book) equals replacing it by the pad id (Quantus)."""

    def forward(self, x):
        score = WEIGHTS[x.round().long()].reshape(len(x), -1).sum(1)
        return torch.stack([torch.zeros_like(score), score], 1)


def _predict_text(ids, am):
    score = (WEIGHTS[ids] * am).sum(1)
    return torch.softmax(torch.stack([torch.zeros_like(score), score], 1), dim=1)


def test_eraser_metrics_match_region_perturbation_on_tokens():
    n = 10
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, len(WEIGHTS), (4, n), generator=g)
    am = torch.ones_like(ids)
    attributions = torch.randn(ids.shape, generator=g, dtype=torch.float64)  # distinct: no tie rule involved
    target = torch.tensor([1, 0, 1, 1])
    x = ids[:, None].double().numpy()  # [batch, 1, pos]
    call = dict(model=BagOfWords().eval(), x_batch=x, y_batch=target.numpy(), channel_first=True, softmax=True,
                device="cpu")  # fmt: skip
    kwargs = dict(patch_size=1, regions_evaluation=n, perturb_baseline=0.0, disable_warnings=True)
    # One token per region: morf drops d_k = p(x) - p(x without its top k tokens) (comprehensiveness at k
    # tokens); lerf drops p(x) - p(x without its bottom j tokens) = sufficiency of the top n - j.
    morf = np.asarray(quantus.RegionPerturbation(order="morf", **kwargs)(a_batch=attributions.numpy(), **call))
    lerf = np.asarray(quantus.RegionPerturbation(order="lerf", **kwargs)(a_batch=attributions.numpy(), **call))
    out = evaluation.aopc(_predict_text, ids, am, attributions, target=target, bins=(0.1, 0.2, 0.5, 0.7))
    ks = [math.ceil(f * n) for f in (0.1, 0.2, 0.5, 0.7)]  # the book's rationale: ceil(fraction * n) tokens
    np.testing.assert_allclose(out["comprehensiveness"].numpy(), morf[:, [k - 1 for k in ks]].T, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["sufficiency"].numpy(), lerf[:, [n - k - 1 for k in ks]].T, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["aopc_comprehensiveness"].numpy(), morf[:, [k - 1 for k in ks]].mean(1),
                               rtol=0, atol=1e-6)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 4. Adebayo similarity measures (Chapters 8, 14) vs quantus.similarity_func
# ---------------------------------------------------------------------------------------------


def _maps(batch: int = 4, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(batch, 8, 8, generator=g, dtype=torch.float64)
    other = 0.6 * reference + torch.randn(batch, 8, 8, generator=g, dtype=torch.float64)
    other[0] = other[0].round(decimals=0)  # ties, ranked with average ranks by both
    return reference, other


def test_map_similarity_matches_quantus_similarity_functions():
    reference, other = _maps()
    book = vision.map_similarity(reference, other)
    sim = quantus.similarity_func
    for r, o, i in zip(reference.numpy(), other.numpy(), range(len(reference)), strict=True):
        # Quantus's correlation functions are scipy's on flattened maps (as its MPRT calls them)
        assert book["spearman"][i] == pytest.approx(sim.correlation_spearman(r.ravel(), o.ravel()), abs=1e-12)
        assert book["spearman_abs"][i] == pytest.approx(
            sim.correlation_spearman(np.abs(r).ravel(), np.abs(o).ravel()), abs=1e-12)
        # SSIM: the book compares |map| / max|map| with data_range 1; Quantus takes data_range = max - min of
        # the two maps together. Giving Quantus the book's scaled maps with one pixel at exactly 0 makes its
        # range [0, 1] too (both use skimage's default 7 x 7 window).
        ra, ro = np.abs(r) / np.abs(r).max(), np.abs(o) / np.abs(o).max()
        ra[0, 0] = ro[0, 0] = 0.0
        scaled_book = vision.map_similarity(torch.from_numpy(ra)[None], torch.from_numpy(ro)[None])["ssim"]
        assert float(scaled_book[0]) == pytest.approx(sim.ssim(ra, ro), abs=1e-12)


def test_rank_agreements_match_quantus_similarity_functions():
    reference, other = _maps()
    a, b = reference.flatten(1), other.flatten(1)
    mask = torch.ones(a.shape, dtype=torch.bool)
    spearman = [quantus.similarity_func.correlation_spearman(x, y) for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    kendall = [quantus.similarity_func.correlation_kendall_tau(x, y) for x, y in zip(a.numpy(), b.numpy(), strict=True)]
    np.testing.assert_allclose(evaluation.rank_correlation(a, b).numpy(), spearman, rtol=0, atol=1e-12)
    np.testing.assert_allclose(evaluation.rank_agreement(a, b, mask).numpy(), spearman, rtol=0, atol=1e-12)
    np.testing.assert_allclose(evaluation.rank_agreement(a, b, mask, method="kendall").numpy(), kendall,
                               rtol=0, atol=1e-12)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 5. Model-randomisation sanity check (Chapters 8, 14) vs quantus.MPRT, first (output) layer
# ---------------------------------------------------------------------------------------------


def test_sanity_distance_matches_mprt_on_the_output_layer():
    model, x = _model(1), _images(1, batch=4)
    target = model(x).argmax(1)
    seed = 42
    # Quantus's cascade re-seeds torch with seed + 1 before *each* layer's reset_parameters(), output layer
    # first; the book's cascading_randomisation seeds once and goes on drawing. The first step (the head,
    # "fc") is therefore the same model when the book gets seed + 1; later steps draw different weights.
    metric = quantus.MPRT(seed=seed, layer_order="top_down", disable_warnings=True)  # Spearman of |normalised maps|
    scores = metric(model=model, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=_gradient(model, x, target),
                    explain_func=_gradient, channel_first=True, softmax=False, device="cpu")  # fmt: skip
    assert list(scores)[:2] == ["original", "fc"]
    name, randomised = next(vision.cascading_randomisation(model, ["fc"], seed=seed + 1))
    reference = torch.from_numpy(_gradient(model, x, target)).double()
    moved = torch.from_numpy(_gradient(randomised, x, target)).double()
    # Quantus divides by the batch's max |a| before taking |a|: a positive scale, so ranks are unchanged.
    rho = np.asarray(scores["fc"])
    assert np.all(np.abs(rho) < 0.99), "the head's re-draw must move the maps, or the test checks nothing"
    np.testing.assert_allclose(vision.map_similarity(reference, moved)["spearman_abs"].numpy(), rho, atol=1e-9)
    np.testing.assert_allclose(evaluation.sanity_distance(reference, moved).numpy(), 1 - np.abs(rho), atol=1e-9)
