"""Vision transformers on Fashion-MNIST and saliency on real photos (chapter 8; reused by 9-13).

The book's image models are trained here once, by a fixed-seed recipe, and shared: chapters 9-13
call :func:`pretrained` and never retrain. The trained weights of the two default recipes are small
(about 0.6 MB each) and are committed under ``helpers/weights/models/vision/`` (:mod:`helpers.zoo`);
:func:`pretrained` verifies them by SHA-256 and, when they are missing, altered or the recipe has
changed, retrains into the book's cache (under a file lock, so parallel notebooks train once).
``make refresh-artefacts`` rebuilds every committed artefact, these included.

Tensors: images are ``[batch, 1, 28, 28]`` floats normalised as in :mod:`helpers.data`; ViT tokens are
``[batch, 1 + 16, width]`` (the CLS token first, then the 4 x 4 grid of 7 x 7 patches in row-major order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helpers import assets, common, data, hooks, zoo
from helpers.common import tensor_digest
from helpers.zoo import SmallCNN, fashion_vit, predict_logits  # noqa: F401  (the book's architectures live in zoo)

IMAGE_SIZE, PATCH = data.IMAGE_SIZE, 7
GRID = IMAGE_SIZE // PATCH  # 4 x 4 patches


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {"vit": fashion_vit, "cnn": SmallCNN}


@dataclasses.dataclass(frozen=True)
class Recipe(zoo.Recipe):
    """Everything that determines a trained model; its content hash (``key()``) names the weights file."""

    arch: str = "vit"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.0
    n_train: int | None = None  # None: all 60,000 training images
    seed: int = 0
    version: int = 1


RECIPES = {
    "vit": Recipe(arch="vit", epochs=6),
    "cnn": Recipe(arch="cnn", epochs=3),
}
"""The book's two default recipes (chapter 8): the same optimiser and about the same time budget
(two minutes on 2 CPU cores: 6 ViT epochs at ~19 s, 3 CNN epochs at ~36 s)."""


def _cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo on Linux), recorded with training times."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)``."""
    return float((predict_logits(model, images).argmax(1) == labels).float().mean())


def train(recipe: Recipe, *, progress: bool = True,
          images: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> tuple[nn.Module, dict]:
    """Train a model by ``recipe`` on the Fashion-MNIST training set (AdamW, warm-up + cosine).

    Args:
        recipe: architecture and optimisation settings; the seed fixes initialisation and batch order.
        progress: show a tqdm bar over epochs.
        images: ``(x_train, y_train, x_test, y_test)`` to train and test on instead of Fashion-MNIST's own
            (e.g. ROAR's modified images); ``recipe.n_train`` still cuts the training set.

    Returns:
        ``(model in eval mode, history)`` with history ``{"epoch", "train_loss", "test_accuracy",
        "seconds", "cpu_seconds"}`` lists (test accuracy measured after each epoch, for the training
        curve; wall and process CPU time since the start, the latter robust to other jobs on the
        machine) and ``"threads"``, the torch thread count used.
    """
    if recipe.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {recipe.arch!r}; choose from {sorted(ARCHITECTURES)}")
    from tqdm.auto import tqdm

    common.set_seed(recipe.seed)
    if images is None:
        x_train, y_train = data.fashion_tensors("train")
        x_test, y_test = data.fashion_tensors("test")
    else:
        x_train, y_train, x_test, y_test = images
        if x_train.ndim != 4 or len(x_train) != len(y_train) or x_test.ndim != 4 or len(x_test) != len(y_test):
            raise ValueError(f"images must be ([n, 1, 28, 28], [n], [m, 1, 28, 28], [m]), got "
                             f"{[tuple(t.shape) for t in images]}")
    if recipe.n_train is not None:
        x_train, y_train = x_train[: recipe.n_train], y_train[: recipe.n_train]
    model = ARCHITECTURES[recipe.arch]()
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, int(recipe.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: common.warmup_cosine(s, total, warmup))
    generator = torch.Generator().manual_seed(recipe.seed)
    history: dict = {
        "epoch": [], "train_loss": [], "test_accuracy": [], "seconds": [], "cpu_seconds": [],
        "threads": torch.get_num_threads(), "cpu": _cpu_name(), "torch": torch.__version__,
    }  # fmt: skip
    start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in tqdm(range(recipe.epochs), desc=f"training {recipe.arch}", disable=not progress):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        losses = []
        for i in range(0, len(order), recipe.batch_size):
            batch = order[i : i + recipe.batch_size]
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch], label_smoothing=recipe.label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(float(np.mean(losses)))
        history["seconds"].append(time.perf_counter() - start)
        history["cpu_seconds"].append(time.process_time() - cpu_start)
        history["test_accuracy"].append(accuracy(model, x_test, y_test))
    return model.eval(), history


def _weights_name(recipe: Recipe) -> str:
    return f"fashion_{recipe.arch}-{recipe.key()}.pt"


def pretrained(name: str | Recipe = "vit", *, progress: bool = True) -> nn.Module:
    """The book's trained Fashion-MNIST classifier: ``"vit"`` (default) or ``"cnn"``, or any :class:`Recipe`.

    Looks for verified weights in ``helpers/weights/models/vision/`` (committed), then in the cache; trains
    by the recipe (about two minutes on 2 CPU cores for the defaults) when neither holds a verified copy
    (:func:`helpers.zoo.trained_model`; ``zoo.load("vit", seed=...)`` is the same call by name).

    Returns:
        the model in eval mode, with ``model.history`` (the training curve, see :func:`train`) and
        ``model.recipe`` attached.

    Introduced in nbs/08_vision_transformers.ipynb; reused by chapters 9-13.
    """
    recipe = RECIPES.get(name) if isinstance(name, str) else name
    if not isinstance(recipe, Recipe):
        raise ValueError(f"unknown model {name!r}; choose from {sorted(RECIPES)} or pass a Recipe")
    return zoo.trained_model(
        ARCHITECTURES[recipe.arch], lambda: train(recipe, progress=progress), recipe,
        _weights_name(recipe), family="vision",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Inside the ViT: attention probabilities and tokens
# ---------------------------------------------------------------------------------------------


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") for b in blocks):
        raise ValueError("model must be a timm VisionTransformer (with .blocks[i].attn); got " + type(model).__name__)
    return blocks


@contextlib.contextmanager
def _unfused(model: nn.Module) -> Iterator[None]:
    """Make timm's attention compute explicit probabilities (its fused kernel never materialises them)."""
    blocks = _blocks(model)
    saved = [b.attn.fused_attn for b in blocks]
    for b in blocks:
        b.attn.fused_attn = False
    try:
        yield
    finally:
        for b, fused in zip(blocks, saved, strict=True):
            b.attn.fused_attn = fused


def vit_attentions(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Run the ViT and capture every layer's attention probabilities.

    Args:
        model: a timm ``VisionTransformer`` (e.g. ``pretrained("vit")``).
        images: ``[batch, 1, 28, 28]``.

    Returns:
        ``(logits [batch, classes], attn [layer, batch, head, query, key])`` with query/key over
        the 1 + 16 tokens (CLS first); rows sum to 1. Same layout as chapter 1's BERT attentions.
    """
    images = data.check_images(images)
    captured: list[Tensor] = []
    keep = [(b.attn.attn_drop, "output", lambda _m, _i, out: captured.append(out.detach())) for b in _blocks(model)]
    with hooks.on_modules(keep), _unfused(model), torch.no_grad():
        logits = model(images)
    return logits, torch.stack(captured)


def vit_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """The ViT's final token vectors ``[batch, 1 + 16, width]`` (CLS first), after the final LayerNorm.

    Chapter 9's prototypes live in this space (patch tokens ``[:, 1:]``).
    """
    images = data.check_images(images)
    with torch.no_grad():
        return model.forward_features(images)


def cls_rollout(attn: Tensor, *, residual: float = 0.5) -> Tensor:
    """Attention rollout from the CLS token to the patches, as a ``[batch, 4, 4]`` map summing to ≤ 1.

    Chapter 1's :func:`helpers.attention.rollout` on the ViT's attentions, read at the CLS row
    (the token the classifier reads), without the CLS-to-CLS entry.
    """
    from helpers.attention import rollout

    rolled = rollout(attn, residual=residual)  # [batch, query, key]
    return rolled[:, 0, 1:].reshape(-1, GRID, GRID)


# ---------------------------------------------------------------------------------------------
# Faithfulness of a saliency map: deletion and insertion (Petsiuk et al. 2018)
# ---------------------------------------------------------------------------------------------


def _check_saliency(images: Tensor, saliency: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be [batch, channel, height, width], got shape {tuple(images.shape)}")
    if saliency.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(
            f"saliency must be [batch, height, width] = {(images.shape[0], *images.shape[2:])}, got "
            f"{tuple(saliency.shape)}; sum attributions over channels and upsample patch maps first"
        )
    if not torch.isfinite(saliency).all():
        raise ValueError("saliency contains NaN or infinite values")


def upsample(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Nearest-neighbour upsampling of patch-level maps ``[batch, h, w]`` to pixels ``[batch, H, W]``."""
    size = (size, size) if isinstance(size, int) else size
    return F.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0]


def perturbation_curve(
    predict: Callable[[Tensor], Tensor],
    images: Tensor,
    saliency: Tensor,
    *,
    target: Tensor,
    mode: str = "deletion",
    canvas: Tensor | float = 0.0,
    steps: int = 28,
    batch_size: int = 512,
    pixels: Tensor | None = None,
    points: Sequence[int] | None = None,
) -> Tensor:
    """Class probability as the most salient pixels are deleted (or inserted), step by step.

    Deletion starts from the image and replaces pixels, most salient first, by ``canvas``; insertion
    starts from ``canvas`` (e.g. a blurred copy) and puts the image's pixels back in the same order.
    All channels of a pixel move together; ties keep pixel order (a stable sort).

    Args:
        predict: images ``[n, C, H, W]`` -> class probabilities ``[n, classes]``.
        images: ``[batch, C, H, W]`` model inputs.
        saliency: ``[batch, H, W]`` importance of each pixel (higher = more important).
        target: ``[batch]`` class whose probability is tracked.
        mode: ``"deletion"`` or ``"insertion"``.
        canvas: what deleted pixels become: a number or ``[batch, C, H, W]`` tensor.
        steps: number of equal steps from 0 to all pixels.
        batch_size: images per call to ``predict``.
        pixels: optional ``[batch, H, W]`` bool mask of the pixels allowed to move (e.g. the
            foreground); the others never move, and the steps are fractions of each image's own
            count of allowed pixels. ``None``: every pixel.
        points: optional indices of the steps to evaluate (e.g. ``range(0, steps + 1, 8)``), each
            with the same image as in the full curve; ``None``: all ``steps + 1``.

    Returns:
        ``[batch, steps + 1]`` probabilities at fractions ``0, 1/steps, ..., 1`` of the pixels moved
        (``[batch, len(points)]`` with ``points``).

    Petsiuk, Das & Saenko (2018), RISE §4. Introduced in nbs/08_vision_transformers.ipynb.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    _check_saliency(images, saliency)
    target = torch.as_tensor(target).long().reshape(-1)
    if target.shape[0] != images.shape[0]:
        raise ValueError(f"target must have one class per image ({images.shape[0]}), got {target.shape[0]}")
    canvas = torch.broadcast_to(torch.as_tensor(canvas, dtype=images.dtype), images.shape)
    batch, n_pixels = saliency.shape[0], saliency[0].numel()
    scores = saliency.reshape(batch, -1)
    if pixels is None:
        allowed = torch.full((batch,), n_pixels)
    else:
        if pixels.shape != saliency.shape or pixels.dtype != torch.bool:
            raise ValueError(f"pixels must be a bool mask shaped like saliency {tuple(saliency.shape)}, "
                             f"got {pixels.dtype} {tuple(pixels.shape)}")
        keep = pixels.reshape(batch, -1)
        scores = torch.where(keep, scores, torch.tensor(-float("inf"), dtype=scores.dtype))  # never chosen first
        allowed = keep.sum(1)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_pixels).expand(batch, -1))  # rank[b, p]: position of pixel p
    start, end = (images, canvas) if mode == "deletion" else (canvas, images)
    if pixels is None:  # every image moves the same counts
        counts = torch.round(torch.linspace(0, n_pixels, steps + 1)).long()[:, None].expand(-1, batch)
    else:
        fractions = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
        counts = torch.round(fractions[:, None] * allowed[None].double()).long()  # [step, batch] pixels moved
    if points is not None:
        points = torch.as_tensor(list(points), dtype=torch.long)
        if points.numel() == 0 or points.min() < 0 or points.max() > steps:
            raise ValueError(f"points must be step indices in [0, {steps}], got {points.tolist()}")
        counts = counts[points]
    n_points = counts.shape[0]
    curves = torch.empty(batch, n_points)
    chunk = max(1, batch_size // n_points)
    for b0 in range(0, batch, chunk):
        sl = slice(b0, b0 + chunk)
        moved = rank[sl][None] < counts[:, sl, None]  # [step, b, pixel]
        moved = moved.reshape(n_points, -1, 1, *images.shape[2:])
        stack = torch.where(moved, end[sl][None], start[sl][None])  # [step, b, C, H, W]
        with torch.no_grad():
            probs = predict(stack.flatten(0, 1))
        probs = probs.reshape(n_points, -1, probs.shape[-1])  # [step, b, classes]
        curves[sl] = probs.gather(2, target[sl][None, :, None].expand(n_points, -1, 1))[..., 0].T
    return curves


def rise_masks(n: int, size: int | tuple[int, int], *, grid: int = 7, p: float = 0.5, seed: int = 0) -> Tensor:
    """RISE's random masks ``[n, H, W]`` in [0, 1] (Petsiuk et al. 2018, §3; eclique/RISE ``generate_masks``).

    Each mask is a ``grid x grid`` Bernoulli(``p``) grid upsampled bilinearly to ``(grid + 1) * cell`` pixels
    (``cell = ceil(size / grid)``) and cropped at a random shift in ``[0, cell)``, so that the kept regions
    have smooth edges and are not tied to the grid.

    >>> m = rise_masks(3, 28, grid=7, seed=0)
    >>> tuple(m.shape), bool((m >= 0).all() and (m <= 1).all())
    ((3, 28, 28), True)
    """
    h, w = (size, size) if isinstance(size, int) else size
    if n < 1 or grid < 1 or not 0 < p < 1 or min(h, w) < grid:
        raise ValueError(f"need n >= 1, 1 <= grid <= size and p in (0, 1), got n={n}, grid={grid}, size={(h, w)}, "
                         f"p={p}")
    gen = torch.Generator().manual_seed(seed)
    cell_h, cell_w = -(-h // grid), -(-w // grid)
    cells = (torch.rand(n, 1, grid, grid, generator=gen) < p).float()
    up = F.interpolate(cells, size=((grid + 1) * cell_h, (grid + 1) * cell_w), mode="bilinear", align_corners=False)
    dy = torch.randint(0, cell_h, (n,), generator=gen)
    dx = torch.randint(0, cell_w, (n,), generator=gen)
    return torch.stack([up[i, 0, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def rise_saliency(model: nn.Module, images: Tensor, target, *, fill: float, n_masks: int = 1000, grid: int = 7,
                  p: float = 0.5, seed: int = 0, batch_size: int = 500) -> Tensor:
    """RISE saliency ``[batch, H, W]``: ``E[P(target | image with mask M) · M] / p`` over random masks.

    Masked pixels are dimmed towards ``fill`` (RISE dims them to zero intensity: pass the normalised value of a
    black pixel); every image sees the same :func:`rise_masks` (as in the reference code). Monte Carlo over
    ``n_masks`` masks: two seeds give two estimates of the same map.

    Petsiuk, Das & Saenko (2018), eq. 6. Introduced in nbs/14_evaluating_interpretability.ipynb.
    """
    if images.ndim != 4 or not torch.isfinite(images).all() or len(images) == 0:
        raise ValueError(f"images must be a finite, non-empty [batch, C, H, W] tensor, got {tuple(images.shape)}")
    target = torch.as_tensor(target).long().reshape(-1)
    if target.shape[0] != images.shape[0]:
        raise ValueError(f"target must have one class per image ({images.shape[0]}), got {target.shape[0]}")
    if not math.isfinite(fill):
        raise ValueError(f"fill must be a finite number, got {fill!r}")
    masks = rise_masks(n_masks, tuple(images.shape[2:]), grid=grid, p=p, seed=seed)   # [n, H, W]
    out = torch.empty(images.shape[0], *images.shape[2:])
    for b in range(images.shape[0]):
        probs = []
        for m in masks.split(batch_size):
            m4 = m[:, None]
            probs.append(model(images[b:b + 1] * m4 + fill * (1 - m4)).softmax(-1)[:, target[b]])
        out[b] = torch.einsum("n,nhw->hw", torch.cat(probs), masks) / (n_masks * p)
    return out


def auc(curves: Tensor) -> Tensor:
    """Area under ``[batch, steps + 1]`` curves sampled at equal fractions of ``[0, 1]`` (trapezoid rule).

    The same number as RISE's ``auc`` (eclique/RISE, evaluation.py): ``(sum - first / 2 - last / 2) / steps``.
    """
    curves = torch.as_tensor(curves, dtype=torch.float64)
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[-1] - 1), dim=-1)


# ---------------------------------------------------------------------------------------------
# Sanity check: cascading model randomisation (Adebayo et al. 2018)
# ---------------------------------------------------------------------------------------------


def cascading_randomisation(
    model: nn.Module, layers: Sequence[str], *, seed: int = 0, reset_embeddings: bool = False
) -> Iterator[tuple[str, nn.Module]]:
    """Yield copies of ``model`` with more and more layers re-initialised, from the output down.

    Step ``k`` re-initialises ``layers[:k+1]`` (each submodule's ``reset_parameters``: the layer's
    own initialisation), leaving the rest trained. A saliency method that passes the sanity check
    produces maps that change as its model's weights are destroyed.

    Args:
        model: the trained model (left untouched).
        layers: names of submodules, output side first, e.g. ``["head", "blocks.3", ..., "patch_embed"]``.
        seed: seeds the re-initialisation.
        reset_embeddings: also re-initialise a ViT's ``pos_embed`` and ``cls_token`` (parameters,
            not submodules, so no layer name reaches them) together with the *last* layer, so that
            the last step is a fully random network (timm's initialisation: truncated normal with
            standard deviation 0.02 for positions, 1e-6 for the CLS token).

    Yields:
        ``(layer name, model copy in eval mode)`` after each layer is randomised.

    Adebayo et al. (2018), "Sanity checks for saliency maps", §3. Used in nbs/08_vision_transformers.ipynb.
    """
    import copy

    names = dict(model.named_modules())
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ValueError(f"unknown layer name(s) {unknown}; see [n for n, _ in model.named_modules()]")
    randomised = copy.deepcopy(model).eval()
    modules = dict(randomised.named_modules())
    generator_state = torch.random.get_rng_state()
    if reset_embeddings and not all(hasattr(randomised, p) for p in ("pos_embed", "cls_token")):
        raise ValueError("reset_embeddings=True needs a ViT with pos_embed and cls_token parameters")
    torch.manual_seed(seed)
    try:
        for i, name in enumerate(layers):
            for sub in modules[name].modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
            if reset_embeddings and i == len(layers) - 1:
                with torch.no_grad():
                    nn.init.trunc_normal_(randomised.pos_embed, std=0.02)
                    nn.init.normal_(randomised.cls_token, std=1e-6)
            yield name, randomised
    finally:
        torch.random.set_rng_state(generator_state)


def plot_explanation_grid(images, maps: dict, *, row_labels: Sequence[str], title: str, figsize=(11, 6.5),
                          image_cmap: str | None = "gray", fontsize: int = 8):  # fmt: skip
    """One row per image: the image, then one signed map per method (red supports, blue opposes).

    Args:
        images: ``[row, H, W]`` (grey) or ``[row, H, W, 3]`` images to show in the first column.
        maps: method name -> ``[row, H, W]`` attribution maps; each map gets its own symmetric colour scale.
        row_labels: the first column's y-label of each row (e.g. the predicted class).
        title: the figure's title.

    Returns:
        the figure (already shown by the notebook's ``plt.show()``).

    Introduced in nbs/08_vision_transformers.ipynb.
    """
    import matplotlib.pyplot as plt

    if len(row_labels) != len(images) or any(len(m) != len(images) for m in maps.values()):
        raise ValueError(f"need one row label and one map per image: {len(images)} images, "
                         f"{len(row_labels)} labels, maps of lengths {[len(m) for m in maps.values()]}")
    fig, axes = plt.subplots(len(images), len(maps) + 1, figsize=figsize, squeeze=False)
    for r in range(len(images)):
        axes[r, 0].imshow(images[r], cmap=image_cmap)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=fontsize)
        for c, (name, method_maps) in enumerate(maps.items(), start=1):
            m = method_maps[r]
            lim = float(m.abs().max()) or 1.0
            axes[r, c].imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
            if r == 0:
                axes[r, c].set_title(name, fontsize=fontsize)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    return fig


def map_similarity(reference: Tensor, maps: Tensor) -> dict[str, Tensor]:
    """How similar two batches of saliency maps are, by the four measures of Adebayo et al.

    Args:
        reference: ``[batch, H, W]`` maps of the trained model.
        maps: ``[batch, H, W]`` maps of the same images from another model (e.g. a randomised copy).

    Returns:
        ``{"spearman", "spearman_abs", "ssim", "hog"}`` -> ``[batch]``: Spearman rank correlation of the
        signed maps and of their absolute values (:func:`helpers.stats.rank_correlations`: 1 where both
        maps are constant; where only one is, 0 instead of its NaN: a flat map keeps no ordering); SSIM
        and the Pearson correlation of HOG features of the absolute maps, each scaled to [0, 1] by its own
        maximum (an all-zero map stays zero; a constant HOG vector correlates 0 with anything).

    Adebayo et al. (2018), "Sanity checks for saliency maps", §3 and Fig. 2.
    Used in nbs/08_vision_transformers.ipynb.
    """
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    reference, maps = torch.as_tensor(reference, dtype=torch.float64), torch.as_tensor(maps, dtype=torch.float64)
    if reference.shape != maps.shape or reference.ndim != 3:
        raise ValueError(f"need two [batch, H, W] batches of the same shape, got {tuple(reference.shape)} "
                         f"and {tuple(maps.shape)}")
    if min(reference.shape[1:]) < 7:
        raise ValueError(f"maps must be at least 7 x 7 for SSIM's window, got {tuple(reference.shape[1:])}; upsample")

    def scaled(m: Tensor) -> np.ndarray:
        a = m.abs()
        top = a.flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
        return (a / top).numpy()

    ra, rb = scaled(reference), scaled(maps)
    cell = (max(1, reference.shape[1] // 4), max(1, reference.shape[2] // 4))
    ssim, hogs = [], []
    for x, y in zip(ra, rb, strict=True):
        ssim.append(structural_similarity(x, y, data_range=1.0))
        hx, hy = (hog(z, orientations=9, pixels_per_cell=cell, cells_per_block=(2, 2)) for z in (x, y))
        hx, hy = hx - hx.mean(), hy - hy.mean()
        denom = np.linalg.norm(hx) * np.linalg.norm(hy)
        hogs.append(float(hx @ hy / denom) if denom > 1e-12 else 0.0)
    from helpers import stats

    def spearman(a: Tensor, b: Tensor) -> Tensor:
        # the book's convention (1 if both constant, NaN if one is), with NaN read as 0 here, as for HOG: a map
        # that went flat (e.g. Grad-CAM of a randomised network) keeps no ordering of the other
        return torch.from_numpy(stats.rank_correlations(a.numpy(), b.numpy())).nan_to_num(0.0)

    return {
        "spearman": spearman(reference, maps),
        "spearman_abs": spearman(reference.abs(), maps.abs()),
        "ssim": torch.tensor(ssim, dtype=torch.float64),
        "hog": torch.tensor(hogs, dtype=torch.float64),
    }


# ---------------------------------------------------------------------------------------------
# Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021)
# ---------------------------------------------------------------------------------------------


def chefer_relevance(model: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    """Chefer et al.'s gradient-weighted attention relevance from ``[CLS]`` to the patches, ``[batch, 4, 4]``.

    Every layer's attention ``A`` is weighted by the gradient of the target logit with respect to
    it, positive parts kept and heads averaged, ``Ā = E_h[(∇A ⊙ A)^+]``; relevance starts from the
    identity and accumulates ``R ← R + Ā R`` from the first layer to the last; the map is row 0
    (``[CLS]``) without its own entry. Unlike rollout it depends on the class explained.

    Args:
        model: a timm ``VisionTransformer``.
        images: ``[batch, 1, 28, 28]``.
        target: ``[batch]`` class explained.

    Chefer, Gur & Wolf (2021), "Generic attention-model explainability for interpreting bi-modal and
    encoder-decoder transformers", eqs. 5-6. Introduced in nbs/08_vision_transformers.ipynb.
    """
    images = data.check_images(images)
    target = torch.as_tensor(target).long().reshape(-1)
    if target.shape[0] != images.shape[0]:
        raise ValueError(f"target must have one class per image ({images.shape[0]}), got {target.shape[0]}")
    captured: list[Tensor] = []

    def keep(_m, _i, out):
        out.retain_grad()
        captured.append(out)

    was_training = model.training
    model.eval()
    try:
        with hooks.on_modules([(b.attn.attn_drop, "output", keep) for b in _blocks(model)]), _unfused(model):
            with torch.enable_grad():
                logits = model(images)
                logits.gather(1, target[:, None]).sum().backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    tokens = captured[0].shape[-1]
    relevance = torch.eye(tokens).expand(len(images), -1, -1).clone()  # [batch, query, key]
    for a in captured:  # first layer to last
        weighted = (a.grad * a).clamp_min(0).mean(1).detach()  # [batch, query, key], heads averaged
        relevance = relevance + weighted @ relevance
    return relevance[:, 0, 1:].reshape(-1, GRID, GRID)


# ---------------------------------------------------------------------------------------------
# Chapter 8's faithfulness study of the ViT on Fashion-MNIST: nine maps, four protocols
# ---------------------------------------------------------------------------------------------

FASHION_BLACK = (0.0 - data.FASHION_MEAN) / data.FASHION_STD  # a black pixel, normalised
FASHION_GREY = 0.0  # the training set's mean pixel, normalised
VIT_METHODS = ("saliency", "integrated gradients", "IG, grey baseline", "GradientSHAP", "occlusion",
               "last-layer attention", "rollout", "Chefer relevance", "random")  # fmt: skip
VIT_PROTOCOLS = {  # column -> (glue key, mode, canvas, garment only)
    "deletion to black": ("del", "deletion", "black", False),
    "deletion to grey": ("del_grey", "deletion", "grey", False),
    "deletion to black, garment only": ("del_fg", "deletion", "black", True),
    "insertion from blur": ("ins", "insertion", "blur", False),
}
"""Chapter 8's deletion/insertion protocols on Fashion-MNIST: canvas black, grey (the mean pixel) or the image
blurred (Gaussian, kernel 25, sigma 4); "garment only" moves only pixels brighter than 1 % of white."""
VIT_STEPS = 28


def gradient_shap(model: nn.Module, images: Tensor, target: Tensor, baselines: Tensor, *, seed: int = 0) -> Tensor:
    """``[batch, 28, 28]`` GradientSHAP map of class ``target`` (Captum, 16 samples from ``baselines``, noise 0.1),
    a function of ``seed`` alone: Captum draws baselines and noise from torch's global generator (seeded here)
    and the points on each path from NumPy's (seeded here, its state restored afterwards)."""
    from captum.attr import GradientShap

    torch.manual_seed(seed)
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return GradientShap(model).attribute(images, baselines=baselines, target=target, n_samples=16,
                                             stdevs=0.1)[:, 0].detach()
    finally:
        np.random.set_state(state)


def vit_maps(model: nn.Module, images: Tensor, target: Tensor, methods: Sequence[str] = VIT_METHODS, *,
             shap_baselines: Tensor | None = None, seed: int = 0) -> tuple[dict, dict, dict]:  # fmt: skip
    """Chapter 8's pixel maps ``[batch, 28, 28]`` of the ViT's ``target`` class, one per method (in that order).

    Saliency (``|grad|``), integrated gradients from black and from grey (64 steps), GradientSHAP (16 samples
    from ``shap_baselines``, noise 0.1; torch and NumPy seeded with ``seed``, NumPy's state restored),
    occlusion (4 x 4 black squares, stride 2), last-layer attention and rollout from ``[CLS]`` and
    :func:`chefer_relevance` (patch maps upsampled), and a uniform random map (``seed``).

    Returns:
        ``({method: map}, {method: seconds per image}, {IG method: Captum's convergence delta [batch]})``.
    """
    from captum.attr import IntegratedGradients, Occlusion, Saliency

    unknown = [m for m in methods if m not in VIT_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(VIT_METHODS)}")
    if "GradientSHAP" in methods and shap_baselines is None:
        raise ValueError("GradientSHAP needs shap_baselines (e.g. 16 training images)")
    maps, seconds, deltas = {}, {}, {}
    for name in methods:
        t0 = time.perf_counter()
        if name == "saliency":
            m = Saliency(model).attribute(images, target=target, abs=True)[:, 0]
        elif name in ("integrated gradients", "IG, grey baseline"):
            m, deltas[name] = IntegratedGradients(model).attribute(
                images, baselines=FASHION_BLACK if name == "integrated gradients" else FASHION_GREY, target=target,
                n_steps=64, internal_batch_size=2048, return_convergence_delta=True)
            m, deltas[name] = m[:, 0], deltas[name].detach()
        elif name == "GradientSHAP":
            m = gradient_shap(model, images, target, shap_baselines, seed=seed)
        elif name == "occlusion":
            m = Occlusion(model).attribute(images, target=target, sliding_window_shapes=(1, 4, 4), strides=(1, 2, 2),
                                           baselines=FASHION_BLACK, perturbations_per_eval=64)[:, 0]
        elif name in ("last-layer attention", "rollout"):
            _, a = vit_attentions(model, images)
            last = name == "last-layer attention"
            patch = a[-1, :, :, 0, 1:].mean(1).reshape(-1, GRID, GRID) if last else cls_rollout(a)
            m = upsample(patch, IMAGE_SIZE)
        elif name == "Chefer relevance":
            m = upsample(chefer_relevance(model, images, target), IMAGE_SIZE)
        else:  # random
            m = torch.rand(len(images), IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
        maps[name] = m.detach()
        seconds[name] = (time.perf_counter() - t0) / len(images)
    return maps, seconds, deltas


def vit_faithfulness(model: nn.Module, images: Tensor, target: Tensor, *, shap_baselines: Tensor,
                     seed: int = 0, random_map: Tensor | None = None) -> dict:  # fmt: skip
    """Deletion and insertion curves of :data:`VIT_METHODS`' maps under :data:`VIT_PROTOCOLS` for one batch.

    ``random_map`` (``[batch, 28, 28]``), when given, is the "random" method's map instead of :func:`vit_maps`'.

    Returns:
        ``{"curves": {protocol: {method: [batch, 29]}}, "ig_delta": {IG method: [batch]}}``; the maps are
        :func:`vit_maps` (with ``seed``), the tracked probability is the softmax of ``target``, 28 steps.
    """
    maps, _, deltas = vit_maps(model, images, target, shap_baselines=shap_baselines, seed=seed)
    if random_map is not None:
        maps["random"] = random_map
    from torchvision.transforms.functional import gaussian_blur

    canvases = {"black": FASHION_BLACK, "grey": FASHION_GREY, "blur": gaussian_blur(images, kernel_size=25, sigma=4.0)}
    garment = data.unnormalise(images) > 0.01  # [batch, 28, 28]: pixels that are not black

    def probs(z: Tensor) -> Tensor:
        return model(z).softmax(-1)

    curves = {p: {m: perturbation_curve(probs, images, maps[m], target=target, mode=mode, canvas=canvases[canvas],
                                        pixels=garment if fg else None, steps=VIT_STEPS) for m in VIT_METHODS}
              for p, (_, mode, canvas, fg) in VIT_PROTOCOLS.items()}  # fmt: skip
    return {"curves": curves, "ig_delta": deltas}


def vit_faithfulness_study(model: nn.Module, images: Tensor, target: Tensor, groups: Tensor, *,
                           shap_baselines: Tensor) -> dict:  # fmt: skip
    """Chapter 8's faithfulness study: :func:`vit_faithfulness` on each group of images (a class), seeded by its group.

    The maps of one group are computed in one batch with ``seed = group`` (GradientSHAP's draws); the random map
    of image ``i`` is row ``i`` of ``torch.rand(n, 28, 28)`` drawn with seed 0. Any group can be recomputed alone
    and must give the same curves (the chapter checks one live).

    Returns:
        ``{"curves": {protocol: {method: [n, 29]}}, "ig_delta": {IG method: [n]}, "target": [n], "seconds"}``, rows
        in the order of ``images``.
    """
    t0 = time.perf_counter()
    model = model.eval()
    groups = torch.as_tensor(groups)
    random = torch.rand(len(images), IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    parts = {int(g): vit_faithfulness(model, images[groups == g], target[groups == g], shap_baselines=shap_baselines,
                                      seed=int(g), random_map=random[groups == g])
             for g in groups.unique()}  # fmt: skip

    def gather(get) -> Tensor:
        out = None
        for g, part in parts.items():
            value = get(part)
            out = torch.empty(len(images), *value.shape[1:], dtype=value.dtype) if out is None else out
            out[groups == g] = value
        return out

    return {"curves": {p: {m: gather(lambda r, p=p, m=m: r["curves"][p][m]) for m in VIT_METHODS}
                       for p in VIT_PROTOCOLS},
            "ig_delta": {k: gather(lambda r, k=k: r["ig_delta"][k])
                         for k in ("integrated gradients", "IG, grey baseline")},
            "target": target.clone(), "seconds": time.perf_counter() - t0}  # fmt: skip


def vit_faithfulness_results(model: nn.Module, images: Tensor, target: Tensor, groups: Tensor, *,
                             shap_baselines: Tensor) -> dict:  # fmt: skip
    """:func:`vit_faithfulness_study`'s results, committed with the book (verified by SHA-256) and rebuilt when
    missing or altered; the file is named by a hash of the methods, protocols, images, groups and weights.

    Rebuilding takes about a minute on 2 cores (``BOOK_THREADS`` sets the threads).
    """
    key = {"methods": list(VIT_METHODS), "protocols": VIT_PROTOCOLS, "steps": VIT_STEPS, "blur": [25, 4.0],
           "garment": 0.01, "seeds": "GradientSHAP: torch, NumPy seeded by group; random: seed 0",
           "inputs": tensor_digest([images, torch.as_tensor(target), torch.as_tensor(groups), shap_baselines]),
           "model": tensor_digest(list(model.state_dict().values()))}  # fmt: skip

    def build(path) -> None:
        with common.torch_threads(common.free_cores()):
            study = vit_faithfulness_study(model, images, target, groups, shap_baselines=shap_baselines)
        torch.save(study, path)

    path = common.cached_file(common.cache_dir("results", "ch8") / f"vit-faithfulness-{common.content_hash(key)}.pt",
                              build, committed=True)
    return torch.load(path, weights_only=True)


VIT_CASCADE = ("head", "norm", "blocks.3", "blocks.2", "blocks.1", "blocks.0", "patch_embed")
"""Chapter 8's cascading randomisation of the ViT, output side first (the last step also re-draws the position
embeddings and the ``[CLS]`` vector, :func:`cascading_randomisation`'s ``reset_embeddings``)."""
VIT_SANITY = ("saliency", "integrated gradients", "occlusion", "rollout", "Chefer relevance")


def vit_sanity_study(model: nn.Module, images: Tensor, target: Tensor, *, steps: Sequence[int] | None = None) -> dict:
    """Chapter 8's sanity check of the ViT: :data:`VIT_SANITY`'s maps (:func:`vit_maps`, one batch) on the trained
    model and on each copy of :func:`cascading_randomisation` over :data:`VIT_CASCADE`, compared by
    :func:`map_similarity`; the floor compares each image's trained map with the next image's.

    Args:
        steps: optional indices of the cascade's steps to compute (the rest are skipped): a spot check.

    Returns:
        ``{"similarity": {method: {measure: [steps, batch]}}, "floor": {method: {measure: [batch]}}, "seconds"}``
        (float64; with ``steps``, only those rows, in order).
    """
    t0 = time.perf_counter()
    keep = range(len(VIT_CASCADE)) if steps is None else list(steps)
    reference, _, _ = vit_maps(model, images, target, VIT_SANITY)
    rows: dict[str, dict[str, list]] = {m: {} for m in VIT_SANITY}
    for i, (_layer, randomised) in enumerate(cascading_randomisation(model, VIT_CASCADE, seed=0,
                                                                     reset_embeddings=True)):  # fmt: skip
        if i not in keep:
            continue
        now, _, _ = vit_maps(randomised, images, target, VIT_SANITY)
        for m in VIT_SANITY:
            for k, v in map_similarity(reference[m], now[m]).items():
                rows[m].setdefault(k, []).append(v)
    floor = {m: map_similarity(reference[m], reference[m].roll(1, 0)) for m in VIT_SANITY}
    return {"similarity": {m: {k: torch.stack(v) for k, v in per.items()} for m, per in rows.items()},
            "floor": floor, "seconds": time.perf_counter() - t0}  # fmt: skip


def vit_sanity_results(model: nn.Module, images: Tensor, target: Tensor) -> dict:
    """:func:`vit_sanity_study`'s results, committed with the book (verified by SHA-256) and rebuilt when missing or
    altered; the file is named by a hash of the methods, the cascade, the images and the weights."""
    key = {"methods": list(VIT_SANITY), "cascade": list(VIT_CASCADE), "reset_embeddings": True, "seed": 0,
           "measures": ["spearman", "spearman_abs", "ssim", "hog"], "floor": "roll 1",
           "inputs": tensor_digest([images, torch.as_tensor(target)]),
           "model": tensor_digest(list(model.state_dict().values()))}

    def build(path) -> None:
        with common.torch_threads(common.free_cores()):
            study = vit_sanity_study(model, images, target)
        torch.save(study, path)

    path = common.cached_file(common.cache_dir("results", "ch8") / f"vit-sanity-{common.content_hash(key)}.pt",
                              build, committed=True)
    return torch.load(path, weights_only=True)


# ---------------------------------------------------------------------------------------------
# Real photos: explanations of EfficientNet-Lite0 and RISE's deletion/insertion canvases
# ---------------------------------------------------------------------------------------------

PHOTO_METHODS = ("saliency", "integrated gradients", "GradientSHAP", "occlusion", "Grad-CAM")
P_BLACK = -1.0  # black in EfficientNet-Lite0's [-1, 1] input
RISE_PROTOCOL = {"deletion canvas": 0.0, "blur kernel": 11, "blur sigma": 5.0, "pixels per step": 224}
"""Petsiuk et al.'s deletion/insertion set-up (eclique/RISE, evaluation.py): deleted pixels become the
normalised zero (the mean image), insertion starts from a Gaussian blur (kernel 11, sigma 5), 224 pixels a step."""
RISE_STEPS = 224 * 224 // RISE_PROTOCOL["pixels per step"]
"""RISE's steps on a 224 x 224 image (224 of 224 pixels): curves of 225 points, the intact image first."""
PhotoMaps = tuple[dict[str, Tensor], dict[str, float], Tensor | None]


def photo_maps(model: nn.Module, images: Tensor, target: Tensor, methods: Sequence[str] = PHOTO_METHODS,
               *, grad_cam_layer: nn.Module | None = None) -> PhotoMaps:  # fmt: skip
    """Chapter 8's explanations of an ImageNet CNN's class on photos.

    Returns ``({method: [batch, 224, 224]}, {method: s per photo}, IG's convergence delta [batch] or None)``;
    the delta is Captum's ``sum(attributions) - (f(x) - f(baseline))`` on the logit.

    Saliency (the largest absolute gradient over channels), integrated gradients (black baseline, 64 steps),
    GradientSHAP (4 noisy black baselines, 8 samples, seeded), occlusion (32-pixel squares, stride 24, black)
    and Grad-CAM (``grad_cam_layer``, default ``model.bn2``, upsampled bilinearly); "random" is a
    uniform random map (seed 0). Channel attributions are summed.
    """
    from captum.attr import LayerAttribution, LayerGradCam, Occlusion, Saliency

    unknown = [m for m in methods if m not in (*PHOTO_METHODS, "random")]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {[*PHOTO_METHODS, 'random']}")
    layer = grad_cam_layer if grad_cam_layer is not None else model.bn2
    fns = {
        "saliency": lambda: Saliency(model).attribute(images, target=target, abs=True).amax(1),
        "integrated gradients": lambda: _photo_ig(model, images, target, deltas),
        "GradientSHAP": lambda: _photo_gradient_shap(model, images, target),
        "occlusion": lambda: Occlusion(model).attribute(
            images, target=target, sliding_window_shapes=(3, 32, 32), strides=(3, 24, 24), baselines=P_BLACK,
            perturbations_per_eval=16).sum(1),
        "Grad-CAM": lambda: LayerAttribution.interpolate(
            LayerGradCam(model, layer).attribute(images, target=target, relu_attributions=True),
            images.shape[-2:], interpolate_mode="bilinear")[:, 0],
        "random": lambda: torch.rand(len(images), *images.shape[-2:], generator=torch.Generator().manual_seed(0)),
    }  # fmt: skip
    maps, seconds, deltas = {}, {}, []
    for name in methods:
        t0 = time.perf_counter()
        maps[name] = fns[name]().detach()
        seconds[name] = (time.perf_counter() - t0) / len(images)
    return maps, seconds, (deltas[0] if deltas else None)


def _photo_ig(model: nn.Module, images: Tensor, target: Tensor, deltas: list) -> Tensor:
    from captum.attr import IntegratedGradients

    attributions, delta = IntegratedGradients(model).attribute(  # 8 images per backward: bounded memory
        images, baselines=P_BLACK, target=target, n_steps=64, internal_batch_size=8, return_convergence_delta=True)
    deltas.append(delta.detach())
    return attributions.sum(1)


def _photo_gradient_shap(model: nn.Module, images: Tensor, target: Tensor) -> Tensor:
    from captum.attr import GradientShap

    torch.manual_seed(0)
    noise = torch.full((4, *images.shape[1:]), P_BLACK) + 0.2 * torch.randn(4, *images.shape[1:])
    state = np.random.get_state()  # Captum draws the points on the path with NumPy's global generator
    np.random.seed(0)
    try:
        return torch.cat([GradientShap(model).attribute(images[i : i + 1], baselines=noise, target=target[i : i + 1],
                                                        n_samples=8, stdevs=0.1).sum(1)
                          for i in range(len(images))])  # fmt: skip  # one photo at a time
    finally:
        np.random.set_state(state)


def rise_kernel() -> Tensor:
    """RISE's ``gkern(11, 5)``: scipy's ``gaussian_filter`` (sigma 5, reflecting edges) of a centred unit
    impulse on an 11 x 11 grid, so a Gaussian folded back into the window; ``[11, 11]``, summing to 1."""
    from scipy.ndimage import gaussian_filter

    size = RISE_PROTOCOL["blur kernel"]
    impulse = np.zeros((size, size))
    impulse[size // 2, size // 2] = 1.0
    return torch.from_numpy(gaussian_filter(impulse, RISE_PROTOCOL["blur sigma"]).astype(np.float32))


def rise_canvases(images: Tensor) -> tuple[Tensor, Tensor]:
    """RISE's ``(deletion canvas, insertion canvas)`` for normalised images ``[batch, C, H, W]``.

    The normalised zero (the mean image), and the blur of eclique/RISE's ``evaluation.py``: each channel
    convolved with :func:`rise_kernel` with zero padding, so the border fades towards the normalised zero.
    """
    size, channels = RISE_PROTOCOL["blur kernel"], images.shape[1]
    kernel = rise_kernel().to(images.dtype).expand(channels, 1, size, size)
    return torch.zeros_like(images), F.conv2d(images, kernel, padding=size // 2, groups=channels)


def rise_benchmark(model: nn.Module, images: Tensor, targets: Tensor, maps: dict[str, Tensor], *,
                   points: Sequence[int] | None = None, batch_size: int = 16) -> dict[str, dict[str, Tensor]]:
    """RISE's deletion and insertion games (Petsiuk et al. 2018, eclique/RISE ``evaluation.py``) for several maps.

    Every curve has :data:`RISE_STEPS` steps of 224 pixels (224 x 224 images) and starts with the intact
    image; deletion moves towards the normalised zero and insertion starts from the blur
    (:func:`rise_canvases`); the tracked probability (softmax) is ``targets``' (RISE: the class the model
    predicts on the intact image). Pixels are ranked by decreasing map value, ties in pixel order.

    Args:
        model: images ``[n, 3, 224, 224]`` -> logits ``[n, classes]``.
        images: ``[batch, 3, 224, 224]`` normalised images.
        targets: ``[batch]`` tracked classes.
        maps: ``{method: [batch, 224, 224]}``.
        points: optional step indices to evaluate (a spot check of the curves); ``None``: all 225.
        batch_size: images per forward pass.

    Returns:
        ``{"deletion": {method: [batch, points]}, "insertion": {...}}`` probabilities; :func:`auc` of a full
        curve is RISE's AUC.
    """
    if images.shape[-2:] != (224, 224):
        raise ValueError(f"RISE's protocol is for 224 x 224 images, got {tuple(images.shape[-2:])}")
    delete_to, insert_from = rise_canvases(images)

    def probs(z: Tensor) -> Tensor:
        return torch.cat([model(z[i : i + batch_size]).softmax(-1) for i in range(0, len(z), batch_size)])

    return {mode: {name: perturbation_curve(probs, images, m, target=targets, mode=mode, canvas=canvas,
                                            steps=RISE_STEPS, batch_size=RISE_STEPS + 1, points=points)
                   for name, m in maps.items()}
            for mode, canvas in (("deletion", delete_to), ("insertion", insert_from))}  # fmt: skip



def rise_photo_study(model: nn.Module, names: Sequence[str] = assets.BENCHMARK_PHOTOS) -> dict:
    """Chapter 8's RISE benchmark on bundled photos: :func:`photo_maps`' five methods and a random map.

    The photos (:func:`helpers.assets.sample_photos`) are resized whole to 224 x 224
    (:func:`helpers.assets.imagenet_transform`); each map explains the model's top class, the class the
    curves track. Takes about half an hour on one CPU core for twelve photos (32,400 forwards).

    Returns:
        a dict with ``"photos"`` (the names), ``"targets"`` ``[n]``, ``"curves"``
        ``{mode: {method: [n, 225]}}``, ``"auc"`` ``{mode: {method: [n]}}`` and ``"seconds"`` (build time).
    """
    t0 = time.perf_counter()
    to_input = assets.imagenet_transform()
    images = torch.stack([to_input(p) for p in assets.sample_photos(names).values()])
    model = model.eval()
    with torch.no_grad():
        targets = model(images).argmax(1)
    maps, _, _ = photo_maps(model, images, targets, [*PHOTO_METHODS, "random"])
    curves = rise_benchmark(model, images, targets, maps)
    return {"photos": list(names), "targets": targets, "curves": curves,
            "auc": {mode: {m: auc(c).float() for m, c in per.items()} for mode, per in curves.items()},
            "seconds": time.perf_counter() - t0}  # fmt: skip


def rise_photo_results(model: nn.Module, names: Sequence[str] = assets.BENCHMARK_PHOTOS) -> dict:
    """:func:`rise_photo_study`'s results, committed with the book (verified by SHA-256) and rebuilt when
    missing or altered; the file is named by a hash of the protocol, the photos and the model's weights.

    Rebuilding takes about half an hour on one core (``BOOK_THREADS`` sets the threads).
    """
    to_input = assets.imagenet_transform()
    images = torch.stack([to_input(p) for p in assets.sample_photos(names).values()])
    key = {"protocol": RISE_PROTOCOL, "steps": RISE_STEPS, "methods": [*PHOTO_METHODS, "random"],
           "photos": list(names), "inputs": tensor_digest([images]), "seeds": "torch 0; NumPy 0 for GradientSHAP",
           "model": tensor_digest(list(model.state_dict().values()))}  # fmt: skip

    def build(path) -> None:
        with common.torch_threads(common.free_cores()):
            torch.save(rise_photo_study(model, names), path)

    path = common.cached_file(common.cache_dir("results", "ch8") / f"rise-photos-{common.content_hash(key)}.pt",
                              build, committed=True)
    return torch.load(path, weights_only=True)

