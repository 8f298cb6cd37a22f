"""The book's own data: splits and data sets that several chapters share.

A chapter that needs the same data as another imports it from here instead of copying the cell or
importing the other chapter's module. It holds:

* the Austen passage split (:func:`austen_passages`; Chapters 3, 6c, 7, 14);
* Fashion-MNIST as model-ready tensors (:func:`fashion_tensors`, :func:`normalise`,
  :func:`unnormalise`, :func:`check_images`; Chapters 8-14);
* scikit-learn's handwritten digits (:func:`digits_images`, :func:`digits_tensors`; Chapters 12, 13)
  and the domain shifts (:func:`shift_domain`; Chapters 12, 13);
* the captions of the CLIP-style model (:func:`pixel_attributes`, :func:`caption_table`,
  :func:`sample_captions`; Chapters 10-12);
* the continual-learning task stream (:class:`Task`, :func:`make_stream`, :func:`retention_set`,
  :func:`reference_images`; Chapter 12) and the compositional VQA scenes over items it does not use
  (:func:`vqa_splits`, :func:`make_scenes`, :func:`vqa_answer`; Chapter 12);
* the simulated shop (:func:`simulate_shop`, :class:`ShopConfig`, :func:`split_train_valid_test`;
  Chapters 9, 14).

Tensors: images are ``[N, 1, 28, 28]`` floats normalised with :data:`FASHION_MEAN` / :data:`FASHION_STD`
(:func:`normalise`); raw images are uint8 ``[N, 28, 28]`` in 0-255.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from helpers import assets


class AustenSplit(NamedTuple):
    """Train and test passages ``(text, label)`` and how many passages each novel has."""

    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    n_passages: dict[str, int]


def austen_passages(titles: Sequence[str] | None = None, *, words: int = 30, n_train: int = 300,
                    n_test: int = 100, seed: int = 0) -> AustenSplit:  # fmt: skip
    """Cut each novel into consecutive passages of ``words`` words and draw disjoint train/test sets.

    One permutation per novel (one ``numpy`` generator seeded once, novels in order) gives the first
    ``n_train`` passages to training and the next ``n_test`` to the test set, labelled by the novel's
    index in ``titles`` (default: all six novels, in the order :func:`helpers.assets.austen_novels` gives).

    The passages of Chapters 3 (six novels), 6c, 7 and 14 (four novels).
    """
    from helpers.assets import austen_novels

    novels = austen_novels()
    titles = list(novels) if titles is None else list(titles)
    unknown = [t for t in titles if t not in novels]
    if unknown or not titles:
        raise ValueError(f"titles must be novels among {sorted(novels)}, got unknown {unknown or 'none (empty)'}")
    if min(words, n_train, n_test) < 1:
        raise ValueError(f"words, n_train and n_test must be >= 1, got {words}, {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    train, test, counts = [], [], {}
    for label, title in enumerate(titles):
        tokens = novels[title].split()
        passages = [" ".join(tokens[i:i + words]) for i in range(0, len(tokens) - words + 1, words)]
        if len(passages) < n_train + n_test:
            raise ValueError(f"{title} has {len(passages)} passages of {words} words, fewer than {n_train + n_test}")
        order = rng.permutation(len(passages))
        train += [(passages[i], label) for i in order[:n_train]]
        test += [(passages[i], label) for i in order[n_train:n_train + n_test]]
        counts[title] = len(passages)
    return AustenSplit(train, test, counts)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST as model-ready tensors
# ---------------------------------------------------------------------------------------------

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530  # training-set pixel mean and std (of values in [0, 1])
IMAGE_SIZE = 28  # Fashion-MNIST images are 28 x 28


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


def _renormalise(pixels: Tensor) -> Tensor:
    """Pixels ``[N, 28, 28]`` in [0, 1] → model input ``[N, 1, 28, 28]``."""
    return ((pixels - FASHION_MEAN) / FASHION_STD)[:, None].float()


def fashion_tensors(split: str = "train") -> tuple[Tensor, Tensor]:
    """Fashion-MNIST as model-ready tensors: ``([N, 1, 28, 28] float, [N] long)``."""
    images, labels = assets.fashion_mnist(split)
    return normalise(images), torch.as_tensor(labels)


# ---------------------------------------------------------------------------------------------
# Handwritten digits and domain shifts
# ---------------------------------------------------------------------------------------------


def _digit_pixels(size: int) -> tuple[Tensor, np.ndarray]:
    """scikit-learn's 1,797 digits (8 x 8, 0-16) upscaled (bilinear): ``([1797, 1, size, size] in [0, 1], [1797])``."""
    from sklearn.datasets import load_digits

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x, digits.target.astype(np.int64)


def digits_images(size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8 x 8 handwritten digits, upscaled (bilinear) to fill ``size`` x ``size``, uint8 (Chapter 13).

    Returns:
        ``(images [1797, size, size] uint8 in 0-255, labels [1797] in 0-9)``; white digits on black,
        as Fashion-MNIST's items are light on a dark background.
    """
    x, labels = _digit_pixels(size)
    return (x[:, 0] * 255).round().to(torch.uint8).numpy(), labels


def digits_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 handwritten digits (8 x 8, 0-16) upscaled to 20 x 20 and padded to 28 x 28 like MNIST.

    Unlike :func:`digits_images` (which fills the frame), the digit keeps a 4-pixel black margin, and
    the pixels are not rounded to uint8 (Chapter 12).

    Returns:
        ``([1797, 1, 28, 28] normalised images, [1797] labels)``.
    """
    big, labels = _digit_pixels(20)
    return _renormalise(F.pad(big, (4, 4, 4, 4))[:, 0]), torch.as_tensor(labels).long()


DOMAIN_SHIFTS = ("none", "inverted", "rotated", "edges", "edges-replicate", "flipped")
"""The kinds of :func:`shift_domain`."""


def shift_domain(images: np.ndarray | Tensor, kind: str) -> np.ndarray | Tensor:
    """A domain-shifted copy of a batch of images, in the representation it was given.

    Uint8 pixels ``[N, H, W]`` give uint8 ``[N, H, W]`` (Chapter 13); normalised images
    ``[N, 1, 28, 28]`` give normalised ``[N, 1, 28, 28]`` (Chapter 12). The kinds (:data:`DOMAIN_SHIFTS`):

    * ``"none"``: unchanged;
    * ``"inverted"``: ``1 - pixel`` (``255 - x`` for uint8);
    * ``"rotated"``: a quarter turn counter-clockwise;
    * ``"flipped"``: upside down (rows in reverse order; Chapter 12's held-out domain);
    * ``"edges"``: Sobel gradient magnitude, scaled to a maximum of 1 (255) per image, the image padded
      with black (zeros) at its border (Chapter 12's task stream);
    * ``"edges-replicate"``: the same with the border pixels repeated outwards (Chapter 13's target),
      which differs from ``"edges"`` only where an item touches the border.

    Uint8 results are rounded to 0-255; normalised results stay float.

    >>> shift_domain(np.array([[[0, 255], [0, 0]]], dtype=np.uint8), "rotated")[0].tolist()
    [[255, 0], [0, 0]]
    >>> x = normalise(np.zeros((1, 28, 28), np.uint8))
    >>> float(unnormalise(shift_domain(x, "inverted")).min())
    1.0
    """
    if kind not in DOMAIN_SHIFTS:
        raise ValueError(f"unknown domain shift {kind!r}; choose from {DOMAIN_SHIFTS}")
    if isinstance(images, Tensor):
        return _shift_normalised(images, kind)
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W] or normalised [N, 1, 28, 28] tensors, "
                         f"got {images.dtype} {images.shape}")  # fmt: skip
    if kind == "none":
        return images.copy()
    if kind == "rotated":
        return np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2)))
    if kind == "flipped":
        return np.ascontiguousarray(images[:, ::-1])
    if kind == "inverted":
        return 255 - images
    from scipy import ndimage

    mode = "nearest" if kind == "edges-replicate" else "constant"
    x = images.astype(np.float64)
    sobel = np.outer([1.0, 2.0, 1.0], [-1.0, 0.0, 1.0])[None]  # [1, 3, 3]: each image on its own
    gx = ndimage.correlate(x, sobel, mode=mode)  # [N, H, W] horizontal gradient
    gy = ndimage.correlate(x, sobel.transpose(0, 2, 1), mode=mode)
    mag = np.hypot(gx, gy)
    peak = mag.reshape(len(x), -1).max(1).reshape(-1, 1, 1)
    return np.round(255 * mag / np.maximum(peak, 1e-9)).astype(np.uint8)


def _shift_normalised(images: Tensor, kind: str) -> Tensor:
    """:func:`shift_domain` of normalised images ``[N, 1, 28, 28]`` → ``[N, 1, 28, 28]``."""
    pixels = unnormalise(check_images(images))  # [N, 28, 28]
    if kind == "none":
        out = pixels
    elif kind == "inverted":
        out = 1 - pixels
    elif kind == "rotated":
        out = torch.rot90(pixels, 1, dims=(-2, -1))
    elif kind == "flipped":
        out = torch.flip(pixels, dims=(-2,))
    else:
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([sobel, sobel.T])[:, None]  # [2, 1, 3, 3]
        if kind == "edges":
            grad = F.conv2d(pixels[:, None], kernels, padding=1)  # [N, 2, 28, 28]
        else:
            grad = F.conv2d(F.pad(pixels[:, None], (1, 1, 1, 1), mode="replicate"), kernels)
        magnitude = grad.pow(2).sum(1).sqrt()
        out = magnitude / magnitude.amax((1, 2), keepdim=True).clamp_min(1e-6)
    return _renormalise(out)


# ---------------------------------------------------------------------------------------------
# Captions of the CLIP-style model: class names, pixel attributes, known parts
# ---------------------------------------------------------------------------------------------

CLASS_TEXT = (
    "t-shirt",
    "pair of trousers",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
"""How captions name the ten Fashion-MNIST classes (``assets.FASHION_CLASSES`` order)."""

SYNONYMS = ("tee", "pair of pants", "sweater", "gown", "jacket", "flip-flop", "blouse", "trainer", "handbag", "boot")
"""Other names for the classes, never used in training (a test of how far the text tower generalises)."""

CLASS_PARTS = (
    ("short sleeves", "a round neckline"),
    ("two long legs", "a waistband"),
    ("long sleeves", "a ribbed hem"),
    ("a long skirt", "a fitted waist"),
    ("long sleeves", "buttons down the front"),
    ("thin straps", "an open toe"),
    ("a collar", "buttons down the front"),
    ("laces", "a flat rubber sole"),
    ("a handle", "a rectangular shape"),
    ("a heel", "an ankle-high shaft"),
)
"""Two parts per class that captions may mention ("a sneaker with laces"); known per class, not measured."""

TRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a {}.",
    "an image of a {}.",
    "a product photo of a {}.",
    "a black and white photo of a {}.",
)
HELD_OUT_TEMPLATES = (
    "a low resolution photo of a {}.",
    "a close-up of a {}.",
    "this is a {}.",
    "a catalogue image showing a {}.",
)
"""Templates never seen in training: zero-shot accuracy with them tests prompt generalisation."""

TONES, TEXTURES, SHAPES = ("dark", "grey", "light"), ("plain", "patterned"), ("slim", "", "wide")


def pixel_attributes(images: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Visual attributes measured on the pixels: tone, texture and silhouette, as indices ``[N]``.

    * tone (:data:`TONES`): mean brightness of the item's pixels (pixel > 0.1), cut at 0.55 and 0.72
      (about the tertiles of the training set);
    * texture (:data:`TEXTURES`): "patterned" when the mean absolute difference between neighbouring
      item pixels exceeds 0.12 (stripes, prints, knit), else "plain";
    * shape (:data:`SHAPES`): the item's area relative to the median of its class: < 0.85 "slim",
      > 1.15 "wide", otherwise unnamed.

    Args:
        images: ``[N, 1, 28, 28]`` normalised; labels: ``[N]``.
    """
    pixels = unnormalise(check_images(images))  # [N, 28, 28] in [0, 1]
    n_classes = len(CLASS_TEXT)
    if labels.shape != (len(pixels),) or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < n_classes):
        raise ValueError(f"labels must be [{len(pixels)}] class indices in [0, {n_classes}), got {tuple(labels.shape)}")
    item = pixels > 0.1
    count = item.sum((1, 2)).clamp_min(1).float()
    brightness = (pixels * item).sum((1, 2)) / count
    tone = (brightness > 0.55).long() + (brightness > 0.72).long()
    dx = (pixels[:, :, 1:] - pixels[:, :, :-1]).abs() * (item[:, :, 1:] & item[:, :, :-1])
    dy = (pixels[:, 1:] - pixels[:, :-1]).abs() * (item[:, 1:] & item[:, :-1])
    pairs = (item[:, :, 1:] & item[:, :, :-1]).sum((1, 2)) + (item[:, 1:] & item[:, :-1]).sum((1, 2))
    roughness = (dx.sum((1, 2)) + dy.sum((1, 2))) / pairs.clamp_min(1)
    texture = (roughness > 0.12).long()
    median = torch.stack([count[labels == c].median() if (labels == c).any() else count.new_tensor(1.0)
                          for c in range(len(CLASS_TEXT))])
    ratio = count / median[labels]
    shape = torch.where(ratio < 0.85, 0, torch.where(ratio > 1.15, 2, 1))
    return {"tone": tone, "texture": texture, "shape": shape}


def describe(label: int, *, tone: int | None = None, texture: int | None = None, shape: int | None = None,
             part: int | None = None, names: Sequence[str] = CLASS_TEXT) -> str:
    """The noun phrase of a caption, e.g. ``"dark patterned pullover with long sleeves"``.

    >>> describe(2, tone=0, texture=1, part=0)
    'dark patterned pullover with long sleeves'
    """
    words = [TONES[tone] if tone is not None else "", TEXTURES[texture] if texture is not None else "",
             SHAPES[shape] if shape is not None else "", names[label]]
    phrase = " ".join(w for w in words if w)
    return phrase + (f" with {CLASS_PARTS[label][part]}" if part is not None else "")


def caption_table(templates: Sequence[str] = TRAIN_TEMPLATES) -> list[str]:
    """Every caption the training recipe can draw, indexed by :func:`caption_index` (10 x T x 4 x 3 x 4 x 3)."""
    out = []
    for label in range(len(CLASS_TEXT)):
        for template in templates:
            for tone in (None, 0, 1, 2):
                for texture in (None, 0, 1):
                    for shape in (None, 0, 1, 2):
                        for part in (None, 0, 1):
                            phrase = describe(label, tone=tone, texture=texture, shape=shape, part=part)
                            out.append(template.format(phrase))
    return out


def caption_index(labels: Tensor, template: Tensor, tone: Tensor, texture: Tensor, shape: Tensor, part: Tensor,
                  *, n_templates: int = len(TRAIN_TEMPLATES)) -> Tensor:
    """Row of :func:`caption_table` for each example; attribute index ``-1`` means "not mentioned"."""
    index = labels * n_templates + template
    index = index * 4 + (tone + 1)
    index = index * 3 + (texture + 1)
    index = index * 4 + (shape + 1)
    return index * 3 + (part + 1)


def sample_captions(attributes: dict[str, Tensor], labels: Tensor, generator: torch.Generator, *,
                    p_mention: float = 0.5, n_templates: int = len(TRAIN_TEMPLATES)) -> Tensor:
    """Draw one caption index per image: a random template; each attribute and one part mentioned with ``p_mention``.

    The unnamed middle silhouette (``SHAPES[1] == ""``) is never mentioned.
    """
    n = len(labels)
    if not 0 <= p_mention <= 1:
        raise ValueError(f"p_mention must be in [0, 1], got {p_mention}")
    if any(len(attributes[k]) != n for k in ("tone", "texture", "shape")):
        raise ValueError(f"attributes (tone, texture, shape) must each have {n} entries, one per label")

    def maybe(values: Tensor) -> Tensor:
        keep = torch.rand(n, generator=generator) < p_mention
        return torch.where(keep, values, -1)

    template = torch.randint(n_templates, (n,), generator=generator)
    shape = maybe(attributes["shape"])
    shape = torch.where(shape == 1, -1, shape)
    part = maybe(torch.randint(2, (n,), generator=generator))
    return caption_index(labels, template, maybe(attributes["tone"]), maybe(attributes["texture"]), shape, part,
                         n_templates=n_templates)


# ---------------------------------------------------------------------------------------------
# The continual-learning task stream
# ---------------------------------------------------------------------------------------------


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = ("a photo of the digit {}.", "a picture of the number {}.", "a handwritten {}.")
"""Captions of the new classes: "a photo of the digit three"."""

DOMAINS = ("inverted", "digits", "edges", "rotated")
"""The default stream: domain shift, new classes, domain shift, domain shift."""


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One step of the stream: images, labels and the prompts that name its classes.

    Args:
        name: short name (``"digits"``).
        class_names: what the prompts call each class, ``C`` entries.
        templates: prompt templates with ``{}`` for the class name; class embeddings average over them.
        x_train, y_train, x_test, y_test: ``[N, 1, 28, 28]`` images and ``[N]`` labels in ``[0, C)``.
    """

    name: str
    class_names: tuple[str, ...]
    templates: tuple[str, ...]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def __post_init__(self):
        if len(self.class_names) == 0 or len(self.templates) == 0:
            raise ValueError(f"task {self.name!r} needs at least one class name and one template")
        if not all("{}" in t for t in self.templates):
            raise ValueError(f"task {self.name!r}: every template must contain '{{}}' for the class name")
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) == 0:
                raise ValueError(f"task {self.name!r} has an empty {split} set: give it at least one image")
            check_images(x, name=f"x_{split}")
            if y.shape != (len(x),):
                raise ValueError(f"task {self.name!r}: y_{split} must be [{len(x)}], got {tuple(y.shape)}")
            if int(y.min()) < 0 or int(y.max()) >= len(self.class_names):
                raise ValueError(f"task {self.name!r}: labels must lie in [0, {len(self.class_names)})")

    @property
    def prompts(self) -> list[str]:
        """Every (class, template) prompt, class-major: ``C * T`` strings."""
        return [t.format(c) for c in self.class_names for t in self.templates]


ZERO_SHOT_SIZE = 1000
"""Fashion-MNIST test images ``[0, 1000)`` form the retention set; task test images come after them."""
TASK_POOL = 50_000
"""Tasks draw training images from Fashion-MNIST's first 50,000; ZSCL's reference set from the rest."""


def _stream_orders(seed: int, n_test_images: int = 10_000) -> tuple[torch.Generator, Tensor, Tensor]:
    """The draws :func:`make_stream` makes first: its generator, the training and the test image orders."""
    generator = torch.Generator().manual_seed(seed)
    train_order = torch.randperm(TASK_POOL, generator=generator)
    test_order = ZERO_SHOT_SIZE + torch.randperm(n_test_images - ZERO_SHOT_SIZE, generator=generator)
    return generator, train_order, test_order


def stream_test_indices(domains: Sequence[str] = DOMAINS, *, n_test: int = 400, seed: int = 0) -> Tensor:
    """Indices of the Fashion-MNIST *test* images that :func:`make_stream` gives its Fashion-MNIST tasks, sorted.

    The digits take none; the others take ``n_test`` each, in the order the stream draws them, so the set does
    not depend on the order of the domains, only on how many are Fashion-MNIST domains.

    >>> len(stream_test_indices(("inverted", "digits"), n_test=10)), int(stream_test_indices(n_test=10).min()) >= 1000
    (10, True)
    """
    n_fashion = sum(kind != "digits" for kind in domains)
    _, _, test_order = _stream_orders(seed)
    return test_order[: n_fashion * n_test].sort().values


def make_stream(domains: Sequence[str] = DOMAINS, *, n_train: int = 2000, n_test: int = 400,
                seed: int = 0) -> list[Task]:
    """The task stream: one :class:`Task` per domain, drawn deterministically from ``seed``.

    Fashion-MNIST domains (``"inverted"``, ``"edges"``, ``"rotated"``, ``"none"``) take disjoint
    random subsets of the training set and of the test images after the retention set; ``"digits"``
    splits the 1,797 scikit-learn digits (test first, ``n_test`` images; training from the rest).

    Args:
        domains: one entry per step.
        n_train, n_test: images per task (digits have at most ``1797 - n_test`` training images).
        seed: fixes every draw.

    Returns:
        ``len(domains)`` tasks.
    """
    if len(domains) == 0:
        raise ValueError("the stream is empty: give at least one domain, e.g. DOMAINS")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train and n_test must be >= 1, got {n_train} and {n_test}")
    x_train, y_train = fashion_tensors("train")
    x_test, y_test = fashion_tensors("test")
    generator, train_order, test_order = _stream_orders(seed, len(x_test))
    tasks, used_train, used_test = [], 0, 0
    for kind in domains:
        if kind == "digits":
            x, y = digits_tensors()
            order = torch.randperm(len(x), generator=generator)
            test, train = order[:n_test], order[n_test : n_test + n_train]
            tasks.append(Task("digits", DIGIT_NAMES, DIGIT_TEMPLATES, x[train], y[train], x[test], y[test]))
            continue
        tr = train_order[used_train : used_train + n_train]
        te = test_order[used_test : used_test + n_test]
        used_train, used_test = used_train + n_train, used_test + n_test
        if len(te) < n_test or len(tr) < n_train:
            raise ValueError(f"not enough Fashion-MNIST images for {len(domains)} tasks of {n_train} + {n_test}")
        tasks.append(Task(kind, CLASS_TEXT, TRAIN_TEMPLATES, shift_domain(x_train[tr], kind), y_train[tr],
                          shift_domain(x_test[te], kind), y_test[te]))
    return tasks


def retention_set(n: int = ZERO_SHOT_SIZE) -> Task:
    """The retention set: the first ``n`` original Fashion-MNIST test images, held-out templates.

    The images come from the *pre-training* distribution (the ten classes the CLIP-style model was
    trained on); only the prompt templates are new. It measures how much of the pre-trained ability a
    method keeps, not zero-shot transfer to unseen data. Its "training" split is empty of meaning (a
    single image, never used): no method trains on it.
    """
    if not 1 <= n <= ZERO_SHOT_SIZE:
        raise ValueError(f"n must be in [1, {ZERO_SHOT_SIZE}], got {n}")
    x, y = fashion_tensors("test")
    return Task("retention", CLASS_TEXT, HELD_OUT_TEMPLATES, x[:1], y[:1], x[:n], y[:n])


def held_out_domain(kind: str = "flipped", n: int = ZERO_SHOT_SIZE) -> Task:
    """A zero-shot set in a domain that neither pre-training nor the stream trains on.

    The retention set's images (the first ``n`` Fashion-MNIST test images) shifted by ``kind``
    (default: upside down), named by the *training* templates, so that only the image domain is new.
    No method trains on it; like :func:`retention_set`, its one "training" image is never used.
    """
    if kind in ("none", "edges-replicate", *DOMAINS):
        raise ValueError(f"kind must be a domain outside the stream {DOMAINS} and not 'none', got {kind!r}")
    if not 1 <= n <= ZERO_SHOT_SIZE:
        raise ValueError(f"n must be in [1, {ZERO_SHOT_SIZE}], got {n}")
    x, y = fashion_tensors("test")
    x = shift_domain(x[:n], kind)
    return Task(kind, CLASS_TEXT, TRAIN_TEMPLATES, x[:1], y[:1], x, y[:n])


def photo_patches(n: int = 1000, *, seed: int = 0) -> Tensor:
    """Off-domain unlabelled images: ``n`` random grey crops of the bundled photos, ``[n, 1, 28, 28]`` normalised.

    Each crop is a random square (side 40-160 pixels) of one of :func:`helpers.assets.sample_photos`'
    seven photos (a cat, an astronaut, coffee, a rocket, ...), turned grey, resized to 28 x 28 (area
    averaging) and normalised as Fashion-MNIST. Neither clothes nor digits: the role ImageNet plays
    as ZSCL's reference set for a CLIP pre-trained on web data (Chapter 12).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    photos = [torch.from_numpy(p.astype(np.float32) / 255).mean(-1) for p in assets.sample_photos().values()]
    out = torch.empty(n, IMAGE_SIZE, IMAGE_SIZE)
    for i in range(n):
        grey = photos[rng.integers(len(photos))]  # [H, W] in [0, 1]
        side = int(rng.integers(40, min(160, *grey.shape) + 1))
        top, left = int(rng.integers(grey.shape[0] - side + 1)), int(rng.integers(grey.shape[1] - side + 1))
        crop = grey[top : top + side, left : left + side][None, None]
        out[i] = F.interpolate(crop, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")[0, 0]
    return _renormalise(out)


def reference_images(n: int = 1000, *, seed: int = 0) -> Tensor:
    """ZSCL's reference set: ``n`` original Fashion-MNIST training images (pre-training domain), ``[n, 1, 28, 28]``.

    Drawn from training images ``[TASK_POOL, 60000)``, which no task uses; no labels are kept.
    """
    x, _ = fashion_tensors("train")
    if not 1 <= n <= len(x) - TASK_POOL:
        raise ValueError(f"n must be in [1, {len(x) - TASK_POOL}], got {n}")
    order = TASK_POOL + torch.randperm(len(x) - TASK_POOL, generator=torch.Generator().manual_seed(seed))
    return x[order[:n]]


# ---------------------------------------------------------------------------------------------
# Compositional visual questions over small scenes of Fashion-MNIST items (Chapter 12)
# ---------------------------------------------------------------------------------------------

VQA_GRID = 2
"""Scenes are ``VQA_GRID x VQA_GRID`` slots of 28 x 28 pixels, each empty or holding one item; slot ``s`` sits at
row ``s // VQA_GRID`` and column ``s % VQA_GRID`` (slot 0 top left, slot 3 bottom right)."""
VQA_SLOTS = VQA_GRID * VQA_GRID
VQA_ANSWERS = ("no", "yes", "0", "1", "2", "3", "4")
"""The fixed answer vocabulary: every question's answer is one of these."""
VQA_TYPES = ("presence", "count", "attribute", "spatial")
VQA_TYPE_ANSWERS = {"presence": ("no", "yes"), "count": ("0", "1", "2", "3", "4"), "attribute": ("no", "yes"),
                    "spatial": ("no", "yes")}
"""The answers each question type can have (chance is one over their number)."""
VQA_PLURALS = ("t-shirts", "pairs of trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers",
               "bags", "ankle boots")
VQA_GROUPS = {"items": tuple(range(10)), "pieces of footwear": (5, 7, 9), "tops": (0, 2, 4, 6)}
"""What count questions may count besides one class: every item, footwear, tops."""
VQA_RELATIONS = ("left of", "above")
VQA_DARKEN, VQA_P_DARKENED = 0.5, 0.25
"""A quarter of the items have their pixels multiplied by 0.5 (always "dark" by :func:`pixel_attributes`); with the
items dark by nature this makes about half of them dark, and darkness less tied to the class."""


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def vqa_text(question: tuple) -> str:
    """The words of a question spec: ``("presence", c)``, ``("count", group name or class)``, ``("attribute", c)``,
    ``("spatial", a, relation, b)``.

    >>> vqa_text(("spatial", 7, "left of", 0)), vqa_text(("count", "tops")), vqa_text(("count", 9))
    ('Is the sneaker left of the t-shirt?', 'How many tops are there?', 'How many ankle boots are there?')
    """
    kind = question[0]
    if kind == "presence":
        return f"Is there {_article(CLASS_TEXT[question[1]])}?"
    if kind == "count":
        what = question[1] if isinstance(question[1], str) else VQA_PLURALS[question[1]]
        return f"How many {what} are there?"
    if kind == "attribute":
        return f"Is the {CLASS_TEXT[question[1]]} dark?"
    if kind == "spatial":
        return f"Is the {CLASS_TEXT[question[1]]} {question[2]} the {CLASS_TEXT[question[3]]}?"
    raise ValueError(f"unknown question type {kind!r}; choose from {VQA_TYPES}")


def vqa_answer(question: tuple, classes: Sequence[int], dark: Sequence[bool]) -> str:
    """The true answer (a word of :data:`VQA_ANSWERS`) to a question spec (see :func:`vqa_text`) about one scene.

    Args:
        classes: ``[VQA_SLOTS]`` the class in each slot, ``-1`` for an empty slot.
        dark: ``[VQA_SLOTS]`` whether each slot's item is dark (ignored for empty slots).

    Attribute questions need their class exactly once in the scene, spatial ones both classes exactly once (else
    "the sandal" names nothing or several items): a ``ValueError`` says so.

    >>> vqa_answer(("spatial", 5, "left of", 8), [5, 8, -1, -1], [False] * 4)
    'yes'
    >>> vqa_answer(("count", "pieces of footwear"), [5, 7, 9, 0], [False] * 4)
    '3'
    """
    classes = [int(c) for c in classes]
    if len(classes) != VQA_SLOTS or len(dark) != VQA_SLOTS:
        raise ValueError(f"a scene has {VQA_SLOTS} slots: give {VQA_SLOTS} classes (-1 = empty) and {VQA_SLOTS} "
                         f"dark flags, got {len(classes)} and {len(dark)}")
    if any(not -1 <= c < len(CLASS_TEXT) for c in classes):
        raise ValueError(f"slot classes must lie in [-1, {len(CLASS_TEXT)}), got {classes}")
    kind = question[0]
    if kind == "presence":
        return VQA_ANSWERS[int(question[1] in classes)]
    if kind == "count":
        members = VQA_GROUPS[question[1]] if isinstance(question[1], str) else (question[1],)
        return str(sum(c in members for c in classes))

    def the(c: int) -> int:
        if classes.count(c) != 1:
            raise ValueError(f"'the {CLASS_TEXT[c]}' needs exactly one {CLASS_TEXT[c]} in the scene, "
                             f"found {classes.count(c)}")
        return classes.index(c)

    if kind == "attribute":
        return VQA_ANSWERS[int(bool(dark[the(question[1])]))]
    if kind == "spatial":
        a, b = the(question[1]), the(question[3])
        if a == b:
            raise ValueError("a spatial question needs two different classes")
        axis = {"left of": lambda s: s % VQA_GRID, "above": lambda s: s // VQA_GRID}[question[2]]
        return VQA_ANSWERS[int(axis(a) < axis(b))]
    raise ValueError(f"unknown question type {kind!r}; choose from {VQA_TYPES}")


@dataclasses.dataclass(frozen=True, eq=False)
class VqaItems:
    """The items scenes are made of: ``images [M, 1, 28, 28]`` (normalised), ``labels [M]``, ``dark [M]`` (pixel
    truth, :func:`pixel_attributes` tone 0), ``darkened [M]`` (drawn darker on purpose) and ``index [M]`` (their
    Fashion-MNIST test index)."""

    images: Tensor
    labels: Tensor
    dark: Tensor
    darkened: Tensor
    index: Tensor


def vqa_items(*, exclude_seeds: Sequence[int], n_test: int = 400, domains: Sequence[str] = DOMAINS,
              seed: int = 0) -> VqaItems:
    """Fashion-MNIST test images that neither the retention set nor the streams of ``exclude_seeds`` use.

    The candidates are test images ``[ZERO_SHOT_SIZE, 10000)`` (the retention set and the held-out domain are
    the first ``ZERO_SHOT_SIZE``) minus :func:`stream_test_indices` of every excluded seed; no training image
    is used, so neither pre-training nor ZSCL's reference set has seen them. A random :data:`VQA_P_DARKENED` of
    them are darkened (pixels times :data:`VQA_DARKEN`), and ``dark`` is measured on the final pixels.
    """
    if len(exclude_seeds) == 0:
        raise ValueError("exclude_seeds is empty: name the seeds of the streams the items must stay out of")
    x, y = fashion_tensors("test")
    used = torch.cat([stream_test_indices(domains, n_test=n_test, seed=s) for s in exclude_seeds])
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[:ZERO_SHOT_SIZE] = False
    keep[used] = False
    index = torch.nonzero(keep)[:, 0]
    darkened = torch.rand(len(index), generator=torch.Generator().manual_seed(seed)) < VQA_P_DARKENED
    pixels = unnormalise(x[index])
    pixels[darkened] = pixels[darkened] * VQA_DARKEN
    images = _renormalise(pixels)
    dark = pixel_attributes(images, y[index])["tone"] == 0
    return VqaItems(images, y[index], dark, darkened, index)


def _split_items(items: VqaItems, rows: Tensor) -> VqaItems:
    return VqaItems(*(getattr(items, f.name)[rows] for f in dataclasses.fields(VqaItems)))


@dataclasses.dataclass(frozen=True, eq=False)
class Scenes:
    """Scenes and their questions.

    ``items``: a :class:`VqaItems`; ``slots [S, VQA_SLOTS]``: the item in each slot (``-1``: empty);
    ``scene [Q]``, ``kind [Q]`` (index into :data:`VQA_TYPES`), ``text`` (``Q`` strings), ``answer [Q]`` (index
    into :data:`VQA_ANSWERS`) for the questions.
    """

    items: VqaItems
    slots: Tensor
    scene: Tensor
    kind: Tensor
    text: tuple[str, ...]
    answer: Tensor

    def slot_classes(self) -> Tensor:
        """``[S, VQA_SLOTS]`` class per slot, ``-1`` when empty."""
        return torch.where(self.slots >= 0, self.items.labels[self.slots.clamp_min(0)], -1)

    def slot_dark(self) -> Tensor:
        """``[S, VQA_SLOTS]`` darkness per slot (False when empty)."""
        return (self.slots >= 0) & self.items.dark[self.slots.clamp_min(0)]

    def canvas(self, i: int) -> Tensor:
        """Scene ``i`` as one picture, ``[56, 56]`` pixels in [0, 1] (empty slots black)."""
        side = VQA_GRID * IMAGE_SIZE
        out = torch.zeros(side, side)
        for s, item in enumerate(self.slots[i].tolist()):
            if item >= 0:
                r, c = divmod(s, VQA_GRID)
                out[r * IMAGE_SIZE:(r + 1) * IMAGE_SIZE, c * IMAGE_SIZE:(c + 1) * IMAGE_SIZE] = unnormalise(
                    self.items.images[item : item + 1])[0]
        return out


def _draw_scene(by_class: list[np.ndarray], rng: np.random.Generator) -> list[int]:
    """One scene's slots: 0-4 items, their classes mixed (half the scenes), from one group or one class."""
    k = int(rng.choice(VQA_SLOTS + 1, p=[0.1] + [0.225] * VQA_SLOTS))
    theme = rng.random()
    if theme < 0.5:
        classes = rng.integers(len(CLASS_TEXT), size=k)
    elif theme < 0.8:
        group = VQA_GROUPS[("pieces of footwear", "tops")[int(rng.integers(2))]]
        classes = rng.choice(group, size=k)
    else:
        classes = np.full(k, rng.integers(len(CLASS_TEXT)))
    slots = [-1] * VQA_SLOTS
    chosen: set[int] = set()
    for s, c in zip(rng.permutation(VQA_SLOTS)[:k], classes, strict=True):
        pool = [i for i in by_class[c] if i not in chosen] or list(by_class[c])
        item = int(pool[int(rng.integers(len(pool)))])
        chosen.add(item)
        slots[int(s)] = item
    return slots


def _candidates(classes: list[int]) -> list[tuple[str, tuple]]:
    """Every question one may ask about a scene, with the key its answers are balanced within."""
    out = [(f"presence {c}", ("presence", c)) for c in range(len(CLASS_TEXT))]
    out += [("count items", ("count", "items"))]
    out += [("count group", ("count", g)) for g in VQA_GROUPS if g != "items"]
    out += [("count class", ("count", c)) for c in range(len(CLASS_TEXT))]
    once = [c for c in range(len(CLASS_TEXT)) if classes.count(c) == 1]
    out += [(f"attribute {c}", ("attribute", c)) for c in once]
    out += [(f"spatial {rel}", ("spatial", a, rel, b)) for rel in VQA_RELATIONS for a in once for b in once if a != b]
    return out


def make_scenes(items: VqaItems, n_scenes: int, *, seed: int = 0) -> Scenes:
    """``n_scenes`` random scenes of ``items`` and templated questions about them, answers balanced.

    Each scene holds 0-4 items (no item twice); half the scenes mix classes freely, the others draw from one
    group (footwear or tops) or repeat one class, so that counts above one occur. Every question that can be
    asked (:func:`_candidates`) is a candidate; within each balancing key (presence and attribute: the
    question; count: items, groups or classes; spatial: the relation) every possible answer gets the same
    number of questions, at most ``n_scenes // (keys of the type x answers of the type)``, drawn at random.
    """
    if n_scenes < 1:
        raise ValueError(f"n_scenes must be >= 1, got {n_scenes}")
    if len(items.labels) == 0:
        raise ValueError("no items to build scenes from")
    rng = np.random.default_rng(seed)
    labels = items.labels.numpy()
    by_class = [np.nonzero(labels == c)[0] for c in range(len(CLASS_TEXT))]
    if any(len(b) == 0 for b in by_class):
        raise ValueError("every class needs at least one item to build scenes from")
    slots = [_draw_scene(by_class, rng) for _ in range(n_scenes)]
    dark = items.dark.numpy()
    pools: dict[tuple[str, str], list[tuple[int, tuple]]] = {}
    for i, s in enumerate(slots):
        classes = [int(labels[j]) if j >= 0 else -1 for j in s]
        flags = [bool(dark[j]) if j >= 0 else False for j in s]
        for key, q in _candidates(classes):
            pools.setdefault((key, vqa_answer(q, classes, flags)), []).append((i, q))
    chosen: list[tuple[int, tuple, str]] = []
    for kind in VQA_TYPES:
        answers = VQA_TYPE_ANSWERS[kind]
        keys = sorted({k for k, _ in pools if k.split()[0] == kind})
        cap = max(1, n_scenes // (len(keys) * len(answers)))
        for key in keys:
            n = min([cap] + [len(pools.get((key, a), [])) for a in answers])
            for a in answers:
                pool = pools.get((key, a), [])
                chosen += [(*pool[j], a) for j in sorted(rng.choice(len(pool), size=n, replace=False))]
    chosen.sort(key=lambda t: t[0])
    return Scenes(items, torch.tensor(slots, dtype=torch.long), torch.tensor([c[0] for c in chosen]),
                  torch.tensor([VQA_TYPES.index(c[1][0]) for c in chosen]), tuple(vqa_text(c[1]) for c in chosen),
                  torch.tensor([VQA_ANSWERS.index(c[2]) for c in chosen]))


VQA_SPLITS = {"train": 4000, "validation": 1000, "test": 1000}
"""Scenes per split; each split draws from its own items (:func:`vqa_splits`)."""


def vqa_splits(*, exclude_seeds: Sequence[int], n_test: int = 400, seed: int = 0,
               sizes: dict[str, int] | None = None) -> dict[str, Scenes]:
    """Train, validation and test scenes over disjoint items of :func:`vqa_items` (about 60/15/25 %)."""
    sizes = dict(VQA_SPLITS if sizes is None else sizes)
    if set(sizes) != set(VQA_SPLITS):
        raise ValueError(f"sizes must give scenes for {list(VQA_SPLITS)}, got {list(sizes)}")
    items = vqa_items(exclude_seeds=exclude_seeds, n_test=n_test, seed=seed)
    order = torch.randperm(len(items.labels), generator=torch.Generator().manual_seed(seed))
    n_val, n_test_items = len(order) * 15 // 100, len(order) * 25 // 100
    parts = {"train": order[n_val + n_test_items :], "validation": order[:n_val],
             "test": order[n_val : n_val + n_test_items]}
    return {name: make_scenes(_split_items(items, parts[name].sort().values), sizes[name], seed=seed + k)
            for k, name in enumerate(VQA_SPLITS)}


# ---------------------------------------------------------------------------------------------
# The simulated shop over Fashion-MNIST items
# ---------------------------------------------------------------------------------------------


ATTRIBUTES = ("brightness", "size", "texture", "aspect")
"""Pixel attributes :func:`item_attributes` can compute (the default shop uses the first two)."""


def item_attributes(images: np.ndarray | Tensor, *, foreground: float = 0.1,
                    names: Sequence[str] = ("brightness", "size")) -> np.ndarray:  # fmt: skip
    """Visual attributes computed from pixels: ``[N, 28, 28]`` uint8 -> ``[N, len(names)]``.

    With foreground pixels those above ``foreground`` (intensity in [0, 1]):

    * ``"brightness"``: mean intensity of the foreground pixels (tone);
    * ``"size"``: fraction of the image that is foreground;
    * ``"texture"``: standard deviation of the foreground intensities (plain vs patterned);
    * ``"aspect"``: width / height of the foreground's bounding box (silhouette; 1 when empty).

    >>> img = np.zeros((1, 28, 28), np.uint8); img[0, :14] = 255
    >>> item_attributes(img).round(3).tolist()
    [[1.0, 0.5]]
    >>> item_attributes(img, names=("texture", "aspect")).round(3).tolist()
    [[0.0, 2.0]]
    """
    names = tuple(names)
    unknown = [n for n in names if n not in ATTRIBUTES]
    if not names or unknown:
        raise ValueError(f"unknown attribute(s) {unknown} (or none asked for); choose from {ATTRIBUTES}")
    x = np.asarray(images, dtype=np.float64) / 255.0
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise ValueError(f"images must be uint8 [N, 28, 28], got shape {x.shape}")
    fg = x > foreground
    count = np.maximum(fg.sum((1, 2)), 1)
    size = fg.mean((1, 2))
    brightness = (x * fg).sum((1, 2)) / count
    out = {"brightness": brightness, "size": size}
    if "texture" in names:
        out["texture"] = np.sqrt(np.maximum((x**2 * fg).sum((1, 2)) / count - brightness**2, 0.0))
    if "aspect" in names:

        def extent(mask):  # [N, 28] -> [N] span from the first to the last True (1 when none)
            first, last = mask.argmax(1), mask.shape[1] - 1 - mask[:, ::-1].argmax(1)
            return np.where(mask.any(1), last - first + 1, 1)

        out["aspect"] = extent(fg.any(1)) / extent(fg.any(2))  # columns with foreground / rows with foreground
    return np.stack([out[n] for n in names], 1)


@dataclasses.dataclass(frozen=True)
class ShopConfig:
    """The generative model of the simulated shop (see :func:`simulate_shop`)."""

    n_users: int = 2000
    n_items: int = 1000  # drawn evenly over the 10 classes
    length: int = 25  # interactions per user
    liked: tuple[int, ...] = (2, 3)  # a user likes 2 or 3 classes (uniformly)
    alpha: float = 3.0  # utility of a liked class
    beta: float = 1.0  # weight of the attribute taste w_u . x_i
    gamma: float = 1.0  # bonus for staying in the class of the previous item
    temperature: float = 1.0
    repeats: bool = False
    seed: int = 0
    attributes: tuple[str, ...] = ("brightness", "size")  # the pixel attributes of the taste (ATTRIBUTES)

    def as_key(self) -> dict:
        """The fields that name cached models: ``dataclasses.asdict`` without ``attributes`` when it is the
        default, so the default shop keeps the key its committed models were trained under."""
        key = dataclasses.asdict(self)
        if tuple(self.attributes) == ("brightness", "size"):
            del key["attributes"]
        return key


@dataclasses.dataclass
class Shop:
    """A simulated shop: items, users' hidden preferences and their interaction sequences."""

    config: ShopConfig
    item_index: np.ndarray  # [I] index of each item in the source image set
    item_class: np.ndarray  # [I] class label
    item_attrs: np.ndarray  # [I, d] standardised config.attributes (default: brightness, size)
    liked: np.ndarray  # [U, classes] bool
    taste: np.ndarray  # [U, d] attribute weights w_u
    sequences: np.ndarray  # [U, length] item ids in time order

    def utility(self, users: np.ndarray | Sequence[int], previous: np.ndarray | None = None) -> np.ndarray:
        """The stated utility ``U[u, i]``, ``[len(users), I]``; with ``previous`` items, the stay-in-class bonus too."""
        users = self.check_users(users)
        c = self.config
        u = c.alpha * self.liked[users][:, self.item_class] + c.beta * self.taste[users] @ self.item_attrs.T
        if previous is not None:
            u = u + c.gamma * (self.item_class[None, :] == self.item_class[np.asarray(previous)][:, None])
        return u

    def check_users(self, users: np.ndarray | Sequence[int]) -> np.ndarray:
        """Validate user ids (``ValueError`` for an unknown user) and return them as an int array."""
        users = np.atleast_1d(np.asarray(users))
        if users.dtype.kind not in "iu" or ((users < 0) | (users >= len(self.liked))).any():
            raise ValueError(f"unknown user id(s) {users.tolist()[:5]}: users are 0..{len(self.liked) - 1}")
        return users.astype(np.int64)


def simulate_shop(images: np.ndarray, labels: np.ndarray, config: ShopConfig = ShopConfig()) -> Shop:
    """Generate a shop's interaction sequences from a stated preference model.

    Items: ``n_items`` images, the same number per class, with class ``c_i`` and standardised
    attributes ``x_i`` (the ``d`` :func:`item_attributes` named by ``config.attributes``). Users: a set
    ``L_u`` of ``|L_u| ~ U{liked}`` classes and a taste ``w_u ~ N(0, I_d)``. At step ``t`` user ``u``
    picks item ``i`` with

    ``P(i_t = i) ∝ exp(U_t(u, i) / temperature)`` over items not yet chosen (unless ``repeats``), where
    ``U_t(u, i) = alpha 1[c_i ∈ L_u] + beta w_u·x_i + gamma 1[c_i = c_{i_{t-1}}]`` (no bonus at t = 0).

    Args:
        images: uint8 ``[N, 28, 28]`` candidate item images; labels: ``[N]`` their classes.
        config: sizes and weights; ``config.seed`` makes the shop deterministic.

    Returns:
        a :class:`Shop`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0 or len(labels) != len(images):
        raise ValueError(f"need as many labels [N] as images [N, 28, 28], got {labels.shape} and {np.shape(images)}")
    n_classes = int(labels.max()) + 1
    if config.n_items % n_classes:
        raise ValueError(f"n_items must be a multiple of the number of classes ({n_classes}), got {config.n_items}")
    if not config.repeats and config.length > config.n_items:
        raise ValueError(f"length {config.length} > n_items {config.n_items}: allow repeats or shorten the sequences")
    rng = np.random.default_rng(config.seed)
    per = config.n_items // n_classes
    item_index = np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in range(n_classes)])
    attrs = item_attributes(images[item_index], names=config.attributes)
    attrs = (attrs - attrs.mean(0)) / np.maximum(attrs.std(0), 1e-12)  # a constant attribute stays 0
    liked = np.zeros((config.n_users, n_classes), bool)
    for u in range(config.n_users):
        liked[u, rng.choice(n_classes, rng.choice(config.liked), replace=False)] = True
    taste = rng.normal(size=(config.n_users, len(config.attributes)))
    shop = Shop(config, item_index, labels[item_index], attrs, liked, taste, np.zeros((config.n_users, 0), np.int64))
    users = np.arange(config.n_users)
    base = shop.utility(users)  # [U, I]
    chosen = np.zeros((config.n_users, config.n_items), bool)
    seq = np.zeros((config.n_users, config.length), np.int64)
    for t in range(config.length):
        u_t = base.copy()
        if t:
            u_t += config.gamma * (shop.item_class[None, :] == shop.item_class[seq[:, t - 1]][:, None])
        logits = u_t / config.temperature
        if not config.repeats:
            logits[chosen] = -np.inf
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        # inverse-CDF sampling, one uniform per user (vectorised and seeded)
        seq[:, t] = np.minimum((p.cumsum(1) < rng.random((config.n_users, 1))).sum(1), config.n_items - 1)
        chosen[users, seq[:, t]] = True
    shop.sequences = seq
    return shop


def split_by_time(sequences: np.ndarray, *, n_test: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Leave-last-out split: ``(train [U, T - n_test], test [U, n_test])``; the last items are held out."""
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or not 1 <= n_test < sequences.shape[1]:
        raise ValueError(f"need sequences [users, time] longer than n_test={n_test}, got shape {sequences.shape}")
    return sequences[:, :-n_test], sequences[:, -n_test:]


def split_train_valid_test(sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SASRec's split (Kang & McAuley 2018, §4.1): ``(train [U, T - 2], valid [U], test [U])``.

    Models train on all but the last two items; choices (hyper-parameters) are made on the
    second-to-last item predicted from ``train``; the last item is reported, predicted from the
    history *including* the validation item (``np.c_[train, valid]``), as SASRec's reference code does.

    >>> split_train_valid_test(np.array([[1, 2, 3, 4]]))
    (array([[1, 2]]), array([3]), array([4]))
    """
    sequences = np.asarray(sequences)
    if sequences.ndim != 2 or sequences.shape[1] < 3:
        raise ValueError(f"need sequences [users, time >= 3] (train, validation and test items), got {sequences.shape}")
    return sequences[:, :-2], sequences[:, -2], sequences[:, -1]


ATTRIBUTE_SHOP = ShopConfig(alpha=0.0, gamma=0.0, attributes=ATTRIBUTES)
"""The second shop: no liked classes (``alpha = 0``) and no stay-in-class bonus (``gamma = 0``); users
differ only by a taste over four pixel attributes (brightness, size, texture, aspect), so an explanation
that only names classes cannot state the preference."""
