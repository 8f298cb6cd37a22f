"""A small CLIP-style model for Fashion-MNIST, zero-shot classification and concept scores (chapter 10).

No registry package ships CLIP or ViT weights, so the book trains its own CLIP-style model
(Radford et al. 2021) on Fashion-MNIST images paired with generated captions:

* image tower: the chapter-8 ViT architecture (:func:`helpers.zoo.fashion_vit`, 16 patches + CLS,
  width 64), trained *from scratch* here, so it shares no weights with the black box it will help
  explain (``vision.pretrained("vit")``), + a linear projection;
* text tower: the real pretrained MiniLM-L6 sentence encoder (mean pooling), *frozen*, + a linear
  projection; because it is frozen, the MiniLM embedding of every distinct caption is computed once;
* symmetric InfoNCE with a learned temperature.

Captions combine a class name, attributes computed from the pixels (tone, texture, silhouette) and
parts known per class, in several templates (:mod:`helpers.data`); :data:`helpers.data.HELD_OUT_TEMPLATES`
are never seen in training.

Everything downstream (zero-shot classification, retrieval, concept scores) talks to a
:class:`ClipLike` object: the model trained here (:class:`FashionClip`) or a Hugging Face
``CLIPModel`` wrapped by :class:`HFClip` (e.g. ``openai/clip-vit-base-patch32`` for a reader who has
those weights). Chapters 11 and 12 reuse :func:`pretrained_clip`, :func:`zero_shot_weights`,
:func:`concept_probabilities` and :class:`ConceptBank`.

Tensors: images are ``[batch, 1, 28, 28]`` normalised as in :mod:`helpers.data`; embeddings are
L2-normalised ``[n, d]``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helpers import common, data, zoo

# ---------------------------------------------------------------------------------------------
# The interface every chapter uses
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class ClipLike(Protocol):
    """What chapters 10-12 need from a CLIP-style model.

    ``encode_image(images [B, 1, 28, 28]) -> [B, d]`` and ``encode_text(texts) -> [T, d]`` return
    L2-normalised embeddings in one shared space; ``logit_scale`` (a float) multiplies cosine
    similarities into logits.
    """

    logit_scale: float

    def encode_image(self, images: Tensor) -> Tensor: ...

    def encode_text(self, texts: list[str]) -> Tensor: ...


def _check_texts(texts: Sequence[str], name: str = "texts") -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
        raise ValueError(f"{name} must be a non-empty list of strings (wrap a single text in a list)")
    if not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f"every entry of {name} must be a non-empty string")
    return list(texts)


# ---------------------------------------------------------------------------------------------
# Text tower: frozen MiniLM-L6, mean pooling, cached per distinct text
# ---------------------------------------------------------------------------------------------


class MiniLMText:
    """Frozen MiniLM-L6 sentence embeddings (mean of the last hidden states over real tokens), ``[T, 384]``.

    Loaded lazily from the installed package (:func:`helpers.assets.minilm`); every distinct text is
    encoded once and kept in memory, since the tower never changes.
    """

    dim = 384

    def __init__(self, name_or_path: str | os.PathLike | None = None, *, batch_size: int = 256):
        self.name_or_path, self.batch_size = name_or_path, batch_size
        self._model = self._tokenizer = None
        self._cache: dict[str, Tensor] = {}

    def _load(self) -> None:
        if self._model is None:
            from helpers.assets import minilm

            self._model, self._tokenizer = minilm(self.name_or_path, attn_implementation="sdpa")
            self._model.eval().requires_grad_(False)

    def encoder(self):
        """The frozen MiniLM model and its tokenizer, ``(model, tokenizer)`` (loaded on first use).

        For methods that feed the tower their own input embeddings, e.g. CoOp in chapter 12.
        """
        self._load()
        return self._model, self._tokenizer

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        texts = _check_texts(texts)
        todo = sorted({t for t in texts if t not in self._cache})
        if todo:
            self._load()
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                enc = self._tokenizer(chunk, padding=True, truncation=True, max_length=64, return_tensors="pt")
                hidden = self._model(**enc).last_hidden_state  # [batch, pos, 384]
                mask = enc["attention_mask"][..., None].float()
                pooled = (hidden * mask).sum(1) / mask.sum(1)  # [batch, 384]
                self._cache.update(zip(chunk, pooled, strict=True))
        return torch.stack([self._cache[t] for t in texts])


@functools.cache
def text_tower() -> MiniLMText:
    """The process-wide frozen MiniLM text tower (one copy, one cache)."""
    return MiniLMText()


# ---------------------------------------------------------------------------------------------
# The CLIP-style model
# ---------------------------------------------------------------------------------------------


class FashionClip(nn.Module):
    """ViT image tower + frozen MiniLM text tower, each followed by a linear projection to ``dim``.

    ``image_features(images)`` and ``text_features(minilm [T, 384])`` are the trainable paths (no
    normalisation); :meth:`encode_image` / :meth:`encode_text` give the normalised embeddings of the
    :class:`ClipLike` interface. ``logit_scale`` is ``exp`` of the learned ``log_scale`` (clamped to 100,
    as in CLIP).
    """

    def __init__(self, *, dim: int = 128, text: MiniLMText | None = None):
        super().__init__()
        self.vit = zoo.fashion_vit()
        self.vit.reset_classifier(0)  # the CLS token's final-LayerNorm vector, [batch, 64]
        self.image_proj = nn.Linear(self.vit.embed_dim, dim, bias=False)
        self.text_proj = nn.Linear(MiniLMText.dim, dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._text = text

    @property
    def text(self) -> MiniLMText:
        return self._text if self._text is not None else text_tower()

    @property
    def image_tower(self) -> nn.Module:
        """The image tower before its projection (here the ViT; :class:`LitClip`'s is a frozen CNN)."""
        return self.vit

    @property
    def logit_scale(self) -> float:
        return float(self.log_scale.detach().clamp(max=math.log(100)).exp())

    def image_features(self, images: Tensor) -> Tensor:
        return self.image_proj(self.vit(images))  # [batch, dim]

    def text_features(self, minilm: Tensor) -> Tensor:
        return self.text_proj(minilm)  # [T, dim]

    @torch.no_grad()
    def encode_image(self, images: Tensor, *, batch_size: int = 1000) -> Tensor:
        images = data.check_images(images)
        was = self.training
        self.eval()
        out = torch.cat([self.image_features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        self.train(was)
        return F.normalize(out, dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        return F.normalize(self.text_features(self.text(texts)), dim=-1)


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE of CLIP: cross-entropy of image→text and text→image logits, pair ``i`` ↔ ``i``.

    Args:
        image_emb: ``[batch, d]`` and text_emb ``[batch, d]``, L2-normalised, row ``i`` a matching pair.
        logit_scale: the (positive) inverse temperature.

    Returns:
        a scalar, ``(CE(s I Tᵀ, diag) + CE(s T Iᵀ, diag)) / 2``.

    >>> e = torch.eye(4)
    >>> bool(contrastive_loss(e, e, 10.0) < contrastive_loss(e, e[[1, 2, 3, 0]], 10.0))
    True
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"need two [batch, d] tensors of the same shape, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    logits = logit_scale * image_emb @ text_emb.T  # [image, text]
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ---------------------------------------------------------------------------------------------
# Training recipe, cached / committed weights
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClipRecipe(zoo.Recipe):
    """Everything that determines the trained CLIP-style model; its content hash names the weights file."""

    epochs: float = 5.0
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    dim: int = 128
    p_mention: float = 0.5
    n_train: int | None = None  # None: all 60,000 training images
    seed: int = 0
    version: int = 1


RECIPE = ClipRecipe()
"""The book's default recipe (chapter 10): about 2-3 minutes on 2 CPU cores, so its weights are committed."""


def train_clip(recipe: ClipRecipe = RECIPE, *, progress: bool = True,
               text: MiniLMText | None = None) -> tuple[FashionClip, dict]:
    """Train a :class:`FashionClip` by ``recipe`` on Fashion-MNIST images and generated captions.

    The MiniLM embeddings of all :func:`helpers.data.caption_table` captions are computed first (the text tower is
    frozen), so each step costs one ViT forward/backward and two small projections.

    Returns:
        ``(model in eval mode, history)`` with ``history`` lists ``"step"``, ``"loss"``, ``"seconds"``
        (every 50 steps) and the MiniLM encoding time ``"caption_seconds"``.
    """
    with common.torch_threads(1):  # small batches: one thread is faster, and immune to a busy machine
        return _train_clip(recipe, progress=progress, text=text)


def _train_clip(recipe: ClipRecipe, *, progress: bool, text: MiniLMText | None) -> tuple[FashionClip, dict]:
    common.set_seed(recipe.seed)
    x_train, y_train = data.fashion_tensors("train")
    if recipe.n_train is not None:
        x_train, y_train = x_train[: recipe.n_train], y_train[: recipe.n_train]

    def draw(attributes: dict[str, Tensor], labels: Tensor, generator: torch.Generator) -> Tensor:
        return data.sample_captions(attributes, labels, generator, p_mention=recipe.p_mention)

    return fit_contrastive(recipe, x_train, y_train, draw, progress=progress, text=text)


def fit_contrastive(
    recipe: ClipRecipe, x_train: Tensor, y_train: Tensor, draw_captions, *, progress: bool = True,
    text: MiniLMText | None = None, desc: str = "training CLIP-style model", decay_log_scale: bool = True,
    model: FashionClip | None = None,
) -> tuple[FashionClip, dict]:  # fmt: skip
    """Chapter 10's contrastive training loop on given images, with captions drawn by ``draw_captions``.

    Seeds nothing itself: call :func:`helpers.common.set_seed` first, as :func:`train_clip` does.

    Args:
        recipe: optimisation settings (epochs, batch size, learning rate, warm-up, width, seed of the
            caption/batch generator).
        x_train: ``[N, 1, 28, 28]`` images; y_train: ``[N]`` labels.
        draw_captions: ``(attributes, labels, generator) -> [N]`` indices into :func:`helpers.data.caption_table`,
            e.g. :func:`helpers.data.sample_captions` (chapter 11 passes one that never mentions hidden parts).
        text: the frozen text tower (default: the shared MiniLM-L6).
        decay_log_scale: apply AdamW's weight decay to the learned temperature ``log_scale`` too (the
            setting the committed weights of chapters 10-12 and 14 were trained with); CLIP excludes
            it, as ``False`` does. Not part of the recipe's hash: changing the default would silently
            change other chapters' committed artefacts.
        model: the untrained model (default: a :class:`FashionClip` of width ``recipe.dim``; chapter 12
            passes a :class:`LitClip`).

    Returns:
        ``(model in eval mode, history)`` as :func:`train_clip`.
    """
    from tqdm.auto import tqdm

    attributes = data.pixel_attributes(x_train, y_train)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total = max(1, round(recipe.epochs * steps_per_epoch))
    generator = torch.Generator().manual_seed(recipe.seed)
    epochs = []  # (image order, caption index per image) for every epoch, drawn up front
    for _ in range(math.ceil(total / steps_per_epoch)):
        order = torch.randperm(len(x_train), generator=generator)
        epochs.append((order, draw_captions(attributes, y_train, generator)))
    t0 = time.perf_counter()
    table = data.caption_table()
    used = torch.unique(torch.cat([c for _, c in epochs]))
    minilm = torch.zeros(len(table), MiniLMText.dim)  # [captions, 384]; only the drawn ones are encoded
    minilm[used] = (text or text_tower())([table[i] for i in used.tolist()])
    caption_seconds = time.perf_counter() - t0
    model = FashionClip(dim=recipe.dim, text=text) if model is None else model
    decayed = [p for name, p in model.named_parameters() if decay_log_scale or name != "log_scale"]
    param_groups = [{"params": decayed}]
    if not decay_log_scale:
        param_groups.append({"params": [model.log_scale], "weight_decay": 0.0})
    optimiser = torch.optim.AdamW(param_groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = min(recipe.warmup_steps, total // 2)
    warmup = max(1, warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: common.warmup_cosine(s, total, warmup))
    history: dict = {"step": [], "loss": [], "seconds": [], "caption_seconds": caption_seconds,
                     "n_captions": len(used), "n_images": len(x_train)}
    start, step, losses = time.perf_counter(), 0, []
    model.train()
    bar = tqdm(total=total, desc=desc, disable=not progress)
    for order, captions in epochs:
        for i in range(0, len(order), recipe.batch_size):
            if step >= total:
                break
            batch = order[i : i + recipe.batch_size]
            image_emb = F.normalize(model.image_features(x_train[batch]), dim=-1)
            text_emb = F.normalize(model.text_features(minilm[captions[batch]]), dim=-1)
            loss = contrastive_loss(image_emb, text_emb, model.log_scale.clamp(max=math.log(100)).exp())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
            bar.update()
            if step % 50 == 0 or step == total:
                history["step"].append(step)
                history["loss"].append(float(np.mean(losses[-50:])))
                history["seconds"].append(time.perf_counter() - start)
    bar.close()
    return model.eval(), history


def _weights_name(recipe: ClipRecipe) -> str:
    return f"fashion_clip-{recipe.key()}.pt"


def pretrained_clip(recipe: ClipRecipe = RECIPE, *, progress: bool = True) -> FashionClip:
    """The book's trained CLIP-style model (committed weights, else cache, else trained by ``recipe``).

    Returns:
        a :class:`FashionClip` in eval mode with ``model.history`` and ``model.recipe`` attached.

    Introduced in nbs/10_clip_concepts.ipynb; reused by chapters 11 and 12.
    """
    if not isinstance(recipe, ClipRecipe):
        raise ValueError(f"recipe must be a ClipRecipe, got {type(recipe).__name__}")
    model = zoo.trained_model(
        lambda: FashionClip(dim=recipe.dim), lambda: train_clip(recipe, progress=progress), recipe,
        _weights_name(recipe), family="clip",
    )  # fmt: skip
    return model.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# A CLIP-style model on a locked ImageNet tower (LiT), for a stream with zero-shot transfer (chapter 12)
# ---------------------------------------------------------------------------------------------

LIT_RESOLUTION = 112
"""Side (pixels) the 28 x 28 images are upsampled to for EfficientNet-Lite0: 4x the cost of 56, a quarter of
224's (about 90 images/s on 2 cores); a linear probe on its features reads Fashion-MNIST about as well as at 224."""


class ImageNetFeatures:
    """Frozen EfficientNet-Lite0 (ImageNet-1k) features of 28 x 28 grey images, ``[N, 1280]``, cached by content.

    An image is turned back into pixels in [0, 1], copied to three channels, upsampled (bilinear) to
    :data:`LIT_RESOLUTION` and scaled to [-1, 1] as the Lite weights expect; the network's pooled
    pre-logits features are kept for every distinct image (keyed by a hash of its bytes), since the
    tower never changes. :meth:`precompute` fills the cache with all the threads allowed.
    """

    dim = 1280

    def __init__(self, resolution: int = LIT_RESOLUTION, *, batch_size: int = 250):
        self.resolution, self.batch_size = resolution, batch_size
        self._model = None
        self._cache: dict[bytes, Tensor] = {}

    @staticmethod
    def _key(image: Tensor) -> bytes:
        import hashlib

        return hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest()

    @torch.no_grad()
    def _compute(self, images: Tensor) -> Tensor:
        if self._model is None:
            from helpers.assets import efficientnet_lite0

            self._model = efficientnet_lite0().requires_grad_(False)
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = data.unnormalise(images[start : start + self.batch_size])[:, None].expand(-1, 3, -1, -1)
            x = F.interpolate(pixels, size=self.resolution, mode="bilinear", align_corners=False)
            out.append(self._model.forward_head(self._model.forward_features((x - 0.5) / 0.5), pre_logits=True))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        images = data.check_images(images).detach().contiguous()
        keys = [self._key(x) for x in images]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self._cache}.items())
        if todo:
            self._cache.update(zip([k for k, _ in todo], self._compute(images[[i for _, i in todo]]), strict=True))
        return torch.stack([self._cache[k] for k in keys])

    def precompute(self, *image_sets: Tensor, threads: int | None = None) -> None:
        """Compute and cache the features of every image in ``image_sets`` (``threads``: torch's, default all)."""
        with common.torch_threads(threads or os.cpu_count() or 1):
            for images in image_sets:
                self(images)


@functools.cache
def imagenet_tower() -> ImageNetFeatures:
    """The process-wide frozen EfficientNet-Lite0 feature extractor (one copy, one cache)."""
    return ImageNetFeatures()


class _LockedTower(nn.Module):
    """An ``nn.Module`` face for :func:`imagenet_tower`: no parameters, nothing copied by ``deepcopy``."""

    embed_dim = ImageNetFeatures.dim

    def forward(self, images: Tensor) -> Tensor:
        return imagenet_tower()(images)  # [batch, 1280], no gradient: the tower is locked


class LitClip(FashionClip):
    """LiT (Zhai et al. 2022) at the book's scale: a *locked* ImageNet image tower, a frozen MiniLM text tower.

    Image side: EfficientNet-Lite0's ImageNet features (:class:`ImageNetFeatures`, frozen) + a trainable
    linear projection; text side as :class:`FashionClip`. Only the two projections and the temperature
    are trained (contrastively, on the Fashion-MNIST captions, by :func:`pretrained_lit`), so whatever the
    model recognises in a new image domain comes from features learnt on ImageNet photos.
    """

    def __init__(self, *, dim: int = 128, text: MiniLMText | None = None):
        nn.Module.__init__(self)
        self.tower = _LockedTower()
        self.image_proj = nn.Linear(ImageNetFeatures.dim, dim, bias=False)
        self.text_proj = nn.Linear(MiniLMText.dim, dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self._text = text

    @property
    def image_tower(self) -> nn.Module:
        return self.tower

    def image_features(self, images: Tensor) -> Tensor:
        return self.image_proj(self.tower(images))  # [batch, dim]


@dataclasses.dataclass(frozen=True)
class LitRecipe(ClipRecipe):
    """:class:`ClipRecipe` for :class:`LitClip`: projections train on cached features, so more epochs cost little."""

    epochs: float = 20.0
    n_train: int | None = 10_000  # images whose ImageNet features are computed (about 2 minutes on 2 cores)
    resolution: int = LIT_RESOLUTION
    tower: str = "efficientnet_lite0"


LIT_RECIPE = LitRecipe()


def _train_lit(recipe: LitRecipe, *, progress: bool) -> tuple[LitClip, dict]:
    if recipe.resolution != imagenet_tower().resolution:
        raise ValueError(f"the shared tower runs at {imagenet_tower().resolution} pixels, the recipe asks for "
                         f"{recipe.resolution}")
    common.set_seed(recipe.seed)
    x_train, y_train = data.fashion_tensors("train")
    x_train, y_train = x_train[: recipe.n_train], y_train[: recipe.n_train]
    imagenet_tower().precompute(x_train)

    def draw(attributes: dict[str, Tensor], labels: Tensor, generator: torch.Generator) -> Tensor:
        return data.sample_captions(attributes, labels, generator, p_mention=recipe.p_mention)

    with common.torch_threads(1):
        return fit_contrastive(recipe, x_train, y_train, draw, progress=progress, desc="training the LiT model",
                               decay_log_scale=False, model=LitClip(dim=recipe.dim))


def pretrained_lit(recipe: LitRecipe = LIT_RECIPE, *, progress: bool = True) -> LitClip:
    """The LiT model of chapter 12 (committed projections, else cache, else trained by ``recipe``).

    Returns:
        a :class:`LitClip` in eval mode with ``model.history`` and ``model.recipe`` attached; its image
        features are computed (and cached in memory) on first use.
    """
    if not isinstance(recipe, LitRecipe):
        raise ValueError(f"recipe must be a LitRecipe, got {type(recipe).__name__}")
    model = zoo.trained_model(lambda: LitClip(dim=recipe.dim), lambda: _train_lit(recipe, progress=progress),
                              recipe, f"lit_clip-{recipe.key()}.pt", family="clip")
    return model.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval
# ---------------------------------------------------------------------------------------------


def zero_shot_weights(model: ClipLike, class_names: Sequence[str] = data.CLASS_TEXT,
                      templates: Sequence[str] = data.TRAIN_TEMPLATES) -> Tensor:
    """One text embedding per class: the normalised mean over templates (prompt ensembling), ``[C, d]``."""
    class_names, templates = _check_texts(class_names, "class_names"), _check_texts(templates, "templates")
    if not all("{}" in t for t in templates):
        raise ValueError("every template must contain '{}' where the class name goes, e.g. 'a photo of a {}.'")
    texts = [t.format(c) for c in class_names for t in templates]
    emb = model.encode_text(texts).reshape(len(class_names), len(templates), -1)  # [class, template, d]
    return F.normalize(F.normalize(emb, dim=-1).mean(1), dim=-1)


def zero_shot_logits(model: ClipLike, images: Tensor, weights: Tensor) -> Tensor:
    """``logit_scale * cos(image, class text)``, ``[N, C]``, for class embeddings from :func:`zero_shot_weights`."""
    return model.logit_scale * model.encode_image(images) @ weights.T


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, image_keys: Sequence, text_keys: Sequence, *,
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Image→text and text→image recall@k, where a hit is a retrieved item with the same key.

    Keys say which texts describe which images (several images may share a caption, so "the same
    caption string" is the natural key).

    Returns:
        ``{"image_to_text@k": ..., "text_to_image@k": ...}`` for each ``k``.

    >>> e = torch.eye(3)
    >>> retrieval_recall(e, e, [0, 1, 2], [0, 1, 2], ks=(1,))
    {'image_to_text@1': 1.0, 'text_to_image@1': 1.0}
    """
    if len(image_emb) != len(image_keys) or len(text_emb) != len(text_keys):
        raise ValueError("need one key per image and one per text")
    codes = {k: i for i, k in enumerate(dict.fromkeys([*image_keys, *text_keys]))}
    ik = torch.tensor([codes[k] for k in image_keys])
    tk = torch.tensor([codes[k] for k in text_keys])
    sim = image_emb @ text_emb.T  # [image, text]
    out = {}
    for k in ks:
        i2t = (tk[sim.topk(k, dim=1).indices] == ik[:, None]).any(1).float().mean()
        t2i = (ik[sim.T.topk(k, dim=1).indices] == tk[:, None]).any(1).float().mean()
        out[f"image_to_text@{k}"], out[f"text_to_image@{k}"] = float(i2t), float(t2i)
    return out


# ---------------------------------------------------------------------------------------------
# Concept bank and concept scores (CB2)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConceptBank:
    """Named visual concepts written as prompts, grouped for a hierarchical aggregation.

    Args:
        names: short names (``"laces"``), one per concept.
        prompts: what the text tower reads (``"a shoe with laces"``).
        groups: a group name per concept (``"footwear"``); the Choquet student aggregates groups first.
    """

    names: tuple[str, ...]
    prompts: tuple[str, ...]
    groups: tuple[str, ...]

    def __post_init__(self):
        if len(self.names) == 0:
            raise ValueError("the concept bank is empty: give at least one concept (name, prompt, group)")
        if not len(self.names) == len(self.prompts) == len(self.groups):
            raise ValueError(f"names, prompts and groups must have one entry per concept, got {len(self.names)}, "
                             f"{len(self.prompts)}, {len(self.groups)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError("concept names must be unique")
        _check_texts(list(self.prompts), "prompts")

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, str, str]]) -> ConceptBank:
        """From ``(name, prompt, group)`` rows."""
        if len(rows) == 0:
            raise ValueError("the concept bank is empty: give at least one concept (name, prompt, group)")
        names, prompts, groups = zip(*rows, strict=True)
        return cls(tuple(names), tuple(prompts), tuple(groups))

    def __len__(self) -> int:
        return len(self.names)

    def group_indices(self) -> dict[str, list[int]]:
        """Group name → concept indices, groups in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, g in enumerate(self.groups):
            out.setdefault(g, []).append(i)
        return out


FASHION_CONCEPTS = ConceptBank.from_rows([
    # upper body
    ("sleeves", "a garment with sleeves", "upper body"),
    ("long sleeves", "a garment with long sleeves", "upper body"),
    ("short sleeves", "a garment with short sleeves", "upper body"),
    ("sleeveless", "a sleeveless garment", "upper body"),
    ("collar", "a garment with a collar", "upper body"),
    ("hood", "a garment with a hood", "upper body"),
    ("buttons", "a garment with buttons", "upper body"),
    ("zipper", "a garment with a zipper", "upper body"),
    ("neckline", "a garment with a round neckline", "upper body"),
    ("pockets", "a garment with pockets", "upper body"),
    # lower body and length
    ("legs", "a garment with two legs", "lower body"),
    ("waistband", "a garment with a waistband", "lower body"),
    ("skirt", "a garment with a skirt", "lower body"),
    ("fitted waist", "a garment with a fitted waist", "lower body"),
    ("hem", "a garment with a ribbed hem", "lower body"),
    ("belt", "a garment with a belt", "lower body"),
    # footwear
    ("heel", "a shoe with a heel", "footwear"),
    ("laces", "a shoe with laces", "footwear"),
    ("sole", "a shoe with a flat rubber sole", "footwear"),
    ("straps", "a shoe with thin straps", "footwear"),
    ("open toe", "a shoe with an open toe", "footwear"),
    ("ankle shaft", "a shoe with an ankle-high shaft", "footwear"),
    ("buckle", "a shoe with a buckle", "footwear"),
    ("toe cap", "a shoe with a rounded toe cap", "footwear"),
    # accessories
    ("handle", "an item with a handle", "accessory"),
    ("rectangular", "an item with a rectangular shape", "accessory"),
    ("shoulder strap", "an item with a shoulder strap", "accessory"),
    ("clasp", "an item with a metal clasp", "accessory"),
    # silhouette
    ("long", "a long item", "silhouette"),
    ("short", "a short item", "silhouette"),
    ("loose", "a loose-fitting item", "silhouette"),
    ("tight", "a tight-fitting item", "silhouette"),
    ("wide", "a wide item", "silhouette"),
    ("slim", "a slim item", "silhouette"),
    ("symmetric", "a symmetric item", "silhouette"),
    ("low", "a low, flat item", "silhouette"),
    # appearance
    ("dark", "a dark item", "appearance"),
    ("light", "a light item", "appearance"),
    ("grey", "a grey item", "appearance"),
    ("patterned", "a patterned item", "appearance"),
    ("plain", "a plain item", "appearance"),
    ("striped", "a striped item", "appearance"),
    ("logo", "an item with a printed logo", "appearance"),
    # material and use
    ("knitted", "a knitted item", "material and use"),
    ("leather", "a leather item", "material and use"),
    ("denim", "a denim item", "material and use"),
    ("for winter", "an item worn in winter", "material and use"),
    ("for summer", "an item worn in summer", "material and use"),
    ("for sport", "an item worn for sport", "material and use"),
    ("formal", "a formal item", "material and use"),
])  # fmt: skip
"""The chapter-10 concept bank: 50 visual concepts of clothing, footwear and bags, in 7 groups."""


def concept_probabilities(model: ClipLike, images: Tensor, prompts: Sequence[str] | ConceptBank) -> Tensor:
    """CB2's concept scores before standardisation: softmax over concepts of ``logit_scale * cos(image, prompt)``.

    Args:
        model: any :class:`ClipLike`.
        images: ``[N, 1, 28, 28]``.
        prompts: concept prompts, or a :class:`ConceptBank`.

    Returns:
        ``[N, K]`` rows summing to 1.
    """
    prompts = list(prompts.prompts) if isinstance(prompts, ConceptBank) else prompts
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("concepts list is empty: pass at least one concept prompt (or a ConceptBank)")
    text = model.encode_text(_check_texts(prompts, "prompts"))  # [K, d]
    return (model.logit_scale * model.encode_image(images) @ text.T).softmax(-1)


@dataclasses.dataclass
class Standardiser:
    """Per-concept z-scores with the mean and standard deviation of a reference set (the training images)."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, scores: Tensor) -> Standardiser:
        if scores.ndim != 2 or len(scores) < 2:
            raise ValueError(f"fit on [N >= 2, K] scores, got shape {tuple(scores.shape)}")
        return cls(scores.mean(0), scores.std(0).clamp_min(1e-8))

    def __call__(self, scores: Tensor) -> Tensor:
        if scores.ndim != 2 or scores.shape[1] != len(self.mean):
            raise ValueError(f"scores must be [N, {len(self.mean)}], got shape {tuple(scores.shape)}")
        return (scores - self.mean) / self.std


# ---------------------------------------------------------------------------------------------
# Hugging Face CLIPModel adapter
# ---------------------------------------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class HFClip:
    """Wrap a Hugging Face ``CLIPModel`` (and its tokenizer) as a :class:`ClipLike` for grey 28 x 28 images.

    Images are un-normalised to [0, 1], replicated to 3 channels, resized (bilinear) to the vision
    tower's ``image_size`` and normalised with the processor's mean/std (OpenAI's by default).

    Use :meth:`from_pretrained` with a local directory or, with the network or a populated cache,
    ``"openai/clip-vit-base-patch32"``.
    """

    def __init__(self, model, tokenizer, *, image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD, batch_size: int = 256):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(image_std, dtype=torch.float32)[:, None, None]
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> HFClip:
        from transformers import AutoTokenizer, CLIPModel

        try:
            model = CLIPModel.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except OSError as err:
            raise FileNotFoundError(
                f"could not load a CLIPModel from {name_or_path!r}: give a directory saved with save_pretrained "
                "(model + tokenizer), or a hub name with the network or a populated Hugging Face cache"
            ) from err
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        config = Path(name_or_path) / "preprocessor_config.json"
        if config.is_file():
            pre = json.loads(config.read_text())
            mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
        return cls(model, tokenizer, image_mean=mean, image_std=std, **kwargs)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def preprocess(self, images: Tensor) -> Tensor:
        """``[B, 1, 28, 28]`` book images → ``[B, 3, size, size]`` CLIP pixel values."""
        pixels = data.unnormalise(data.check_images(images))[:, None]  # [B, 1, 28, 28] in [0, 1]
        pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (pixels.expand(-1, 3, -1, -1) - self.mean) / self.std

    @staticmethod
    def _tensor(out) -> Tensor:
        # transformers >= 5 may return a model output instead of a tensor
        return out if isinstance(out, Tensor) else out.pooler_output

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        out = [self._tensor(self.model.get_image_features(pixel_values=self.preprocess(chunk)))
               for chunk in images.split(self.batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        texts = _check_texts(texts)
        max_length = int(self.model.config.text_config.max_position_embeddings)
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out = self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return F.normalize(self._tensor(out), dim=-1)

