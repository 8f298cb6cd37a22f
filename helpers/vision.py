"""Vision transformers on Fashion-MNIST and saliency on real photos (chapter 8; reused by 9-13).

The book's image models are trained here once, by a fixed-seed recipe, and shared: chapters 9-13
call :func:`pretrained` and never retrain. The trained weights of the two default recipes are small
(about 0.6 MB each) and are committed under ``helpers/weights/`` beside the recipe that made them;
:func:`pretrained` verifies them by SHA-256 and, when they are missing, altered or the recipe has
changed, retrains into the book's cache (under a file lock, so parallel notebooks train once).
Rebuild the committed copies with ``python -m helpers.vision``.

Tensors: images are ``[batch, 1, 28, 28]`` floats normalised with :data:`FASHION_MEAN` /
:data:`FASHION_STD`; ViT tokens are ``[batch, 1 + 16, width]`` (the CLS token first, then the 4 x 4 grid of 7 x 7
patches in row-major order).
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

from helpers import assets, common

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # training-set pixel mean and std (of values in [0, 1])
IMAGE_SIZE, PATCH = 28, 7
GRID = IMAGE_SIZE // PATCH  # 4 x 4 patches
WEIGHTS_DIR = common.WEIGHTS_DIR  # committed weights (helpers/weights/)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def check_images(images: Tensor, *, name: str = "images") -> Tensor:
    """Validate a batch of normalised Fashion-MNIST images and return it as float32.

    Raises a ``ValueError`` that says what shape was expected, e.g. for an RGB photo or a missing
    batch axis.
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [batch, 1, 28, 28], got {type(images).__name__}")
    if images.ndim == 3 and images.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{name} has shape {tuple(images.shape)}: add the channel axis with images[:, None]")
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"{name} must be [batch, 1, {IMAGE_SIZE}, {IMAGE_SIZE}] grey images, got shape {tuple(images.shape)}; "
            "convert photos with fashion_tensors()-style preprocessing (grey, 28 x 28, normalised)"
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return images.float()


def normalise(images: np.ndarray | Tensor) -> Tensor:
    """uint8 ``[N, 28, 28]`` (0-255) → float ``[N, 1, 28, 28]`` normalised for the book's models."""
    x = torch.as_tensor(np.asarray(images)).float().div(255.0)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected uint8 images [N, 28, 28], got shape {tuple(x.shape)}")
    return ((x - FASHION_MEAN) / FASHION_STD)[:, None]


def unnormalise(images: Tensor) -> Tensor:
    """Inverse of :func:`normalise`: back to pixel values in [0, 1], ``[N, 28, 28]``."""
    return (images[:, 0] * FASHION_STD + FASHION_MEAN).clamp(0, 1)


def fashion_tensors(split: str = "train") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as model-ready tensors: ``([N, 1, 28, 28] float, [N] long)``."""
    images, labels = assets.fashion_mnist(split)
    return normalise(images), torch.as_tensor(labels)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def fashion_vit(*, width: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0) -> nn.Module:
    """A timm ``VisionTransformer`` sized for 28 x 28 grey images: 7 x 7 patches, CLS token, 10 classes.

    With the defaults it has 139,018 parameters: 16 patch tokens + CLS, 4 blocks of 4 heads of width 16.
    """
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=IMAGE_SIZE, patch_size=PATCH, in_chans=1, num_classes=len(assets.FASHION_CLASSES),
        embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, global_pool="token",
    )  # fmt: skip


class SmallCNN(nn.Module):
    """Three conv blocks (32, 64, 128 channels, batch norm, ReLU, 2x2 max-pool) + global average + linear.

    The convolutional baseline of chapter 8 (about 94k parameters, same training recipe as the ViT).
    """

    def __init__(self, n_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        channels = [1, 32, 64, 128]
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers)  # [batch, 128, 3, 3]
        self.head = nn.Linear(channels[-1], n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {"vit": fashion_vit, "cnn": SmallCNN}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained model; its content hash names the weights file."""

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

    def key(self) -> str:
        return common.content_hash(dataclasses.asdict(self), length=12)


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


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, *, batch_size: int = 1000) -> Tensor:
    """Logits ``[N, classes]`` of ``model`` on ``images`` ``[N, 1, 28, 28]`` in eval mode, in batches."""
    images = check_images(images)
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(images, labels)``."""
    return float((predict_logits(model, images).argmax(1) == labels).float().mean())


def train(recipe: Recipe, *, progress: bool = True) -> tuple[nn.Module, dict]:
    """Train a model by ``recipe`` on the Fashion-MNIST training set (AdamW, warm-up + cosine).

    Args:
        recipe: architecture and optimisation settings; the seed fixes initialisation and batch order.
        progress: show a tqdm bar over epochs.

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
    x_train, y_train = fashion_tensors("train")
    x_test, y_test = fashion_tensors("test")
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

    Looks for verified weights in ``helpers/weights/`` (committed), then in the cache; trains by the
    recipe (about two minutes on 2 CPU cores for the defaults) when neither holds a verified copy.

    Returns:
        the model in eval mode, with ``model.history`` (the training curve, see :func:`train`) and
        ``model.recipe`` attached.

    Introduced in nbs/08_vision_transformers.ipynb; reused by chapters 9-13.
    """
    recipe = RECIPES.get(name) if isinstance(name, str) else name
    if not isinstance(recipe, Recipe):
        raise ValueError(f"unknown model {name!r}; choose from {sorted(RECIPES)} or pass a Recipe")
    return common.trained_model(
        ARCHITECTURES[recipe.arch], lambda: train(recipe, progress=progress), recipe,
        _weights_name(recipe), cache="vision",
    )  # fmt: skip


def write_committed_weights(names: Sequence[str] = ("vit", "cnn")) -> list[Path]:
    """Train the default recipes and write them (with SHA-256 sidecars) to ``helpers/weights/``.

    Removes older weight files of the same architecture. Run as ``python -m helpers.vision``.
    """
    written = []
    for name in names:
        recipe = RECIPES[name]
        model, history = train(recipe)
        stale = f"fashion_{recipe.arch}-*.pt*"
        path = common.commit_trained(model, recipe, history, _weights_name(recipe), replaces=stale)
        print(f"{name}: test accuracy {history['test_accuracy'][-1]:.4f} in {history['seconds'][-1]:.0f} s -> {path}")
        written.append(path)
    return written


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
    images = check_images(images)
    captured: list[Tensor] = []
    hooks = [
        b.attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        for b in _blocks(model)
    ]
    try:
        with _unfused(model), torch.no_grad():
            logits = model(images)
    finally:
        for h in hooks:
            h.remove()
    return logits, torch.stack(captured)


def vit_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """The ViT's final token vectors ``[batch, 1 + 16, width]`` (CLS first), after the final LayerNorm.

    Chapter 9's prototypes live in this space (patch tokens ``[:, 1:]``).
    """
    images = check_images(images)
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

    Returns:
        ``[batch, steps + 1]`` probabilities at fractions ``0, 1/steps, ..., 1`` of the pixels moved.

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
    batch, pixels = saliency.shape[0], saliency[0].numel()
    order = torch.argsort(saliency.reshape(batch, -1), dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels).expand(batch, -1))  # rank[b, p]: position of pixel p
    start, end = (images, canvas) if mode == "deletion" else (canvas, images)
    counts = torch.round(torch.linspace(0, pixels, steps + 1)).long()  # pixels moved at each step
    curves = torch.empty(batch, steps + 1)
    chunk = max(1, batch_size // (steps + 1))
    for b0 in range(0, batch, chunk):
        sl = slice(b0, b0 + chunk)
        moved = rank[sl][None] < counts[:, None, None]  # [step, b, pixel]
        moved = moved.reshape(steps + 1, -1, 1, *images.shape[2:])
        stack = torch.where(moved, end[sl][None], start[sl][None])  # [step, b, C, H, W]
        with torch.no_grad():
            probs = predict(stack.flatten(0, 1))
        probs = probs.reshape(steps + 1, -1, probs.shape[-1])  # [step, b, classes]
        curves[sl] = probs.gather(2, target[sl][None, :, None].expand(steps + 1, -1, 1))[..., 0].T
    return curves


def auc(curves: Tensor) -> Tensor:
    """Area under ``[batch, steps + 1]`` curves sampled at equal fractions of ``[0, 1]`` (trapezoid rule)."""
    curves = torch.as_tensor(curves, dtype=torch.float64)
    return torch.trapezoid(curves, dx=1.0 / (curves.shape[-1] - 1), dim=-1)


# ---------------------------------------------------------------------------------------------
# Sanity check: cascading model randomisation (Adebayo et al. 2018)
# ---------------------------------------------------------------------------------------------


def cascading_randomisation(
    model: nn.Module, layers: Sequence[str], *, seed: int = 0
) -> Iterator[tuple[str, nn.Module]]:
    """Yield copies of ``model`` with more and more layers re-initialised, from the output down.

    Step ``k`` re-initialises ``layers[:k+1]`` (each submodule's ``reset_parameters``: the layer's
    own initialisation), leaving the rest trained. A saliency method that passes the sanity check
    produces maps that change as its model's weights are destroyed.

    Args:
        model: the trained model (left untouched).
        layers: names of submodules, output side first, e.g. ``["head", "blocks.3", ..., "patch_embed"]``.
        seed: seeds the re-initialisation.

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
    torch.manual_seed(seed)
    try:
        for name in layers:
            for sub in modules[name].modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
            yield name, randomised
    finally:
        torch.random.set_rng_state(generator_state)


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation between two batches of maps ``[batch, ...]`` -> ``[batch]`` (ties averaged)."""
    from scipy.stats import rankdata

    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra = torch.as_tensor(rankdata(a.reshape(len(a), -1).numpy(), axis=1))
    rb = torch.as_tensor(rankdata(b.reshape(len(b), -1).numpy(), axis=1))
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


if __name__ == "__main__":
    write_committed_weights()


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
