"""The models the book trains: one recipe type, one hash, one layout, one refresh command.

Every model the book trains itself (the Fashion-MNIST ViT and CNN of Chapter 8, the CLIP-style models of
Chapters 10-12, the source networks of Chapter 13, the ProtoPNet heads of Chapter 9) is described by a
frozen :class:`Recipe` dataclass. Its :meth:`Recipe.key` (a content hash of the fields) names the weights
file, so a changed recipe never loads stale weights. Weights live in one layout:

- committed: ``helpers/weights/models/<family>/<name>-<key>.pt`` with a ``.sha256`` sidecar;
- rebuilt: the same path under the cache directory (``BOOK_CACHE``), trained on demand, verified by hash.

A committed file that is missing or altered is ignored and the model is retrained into the cache
(:func:`helpers.common.cached_file`). ``make refresh-artefacts`` rebuilds every committed artefact,
models included, from an empty cache (tools/refresh_artefacts.sh);
``python -m helpers.common commit PATH`` commits one rebuilt file.

:func:`load` is the front door: ``zoo.load("vit", seed=1)`` trains or loads the ViT of seed 1. The method
that trains each family stays with the chapter that teaches it (``vision.train``, ``clip.train_clip``, ...);
this module holds what they share.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from helpers import common


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Base of every recipe of a model the book trains: everything that determines its weights.

    Subclasses are frozen dataclasses. :meth:`key` hashes their fields; a field added after weights were
    committed is listed in ``LATE_FIELDS`` with the value that reproduces the old behaviour, and is left
    out of the hash while it holds that value, so the committed files keep their names.
    """

    LATE_FIELDS: ClassVar[dict[str, object]] = {}

    def hashed_fields(self) -> dict:
        """The fields that name the weights file (``LATE_FIELDS`` at their old value left out)."""
        fields = dataclasses.asdict(self)
        for name, old in self.LATE_FIELDS.items():
            if name in fields and getattr(self, name) == old:
                del fields[name]
        return fields

    def key(self) -> str:
        """12 hex digits of the SHA-256 of :meth:`hashed_fields` (JSON, sorted keys)."""
        return common.content_hash(self.hashed_fields(), length=12)


def _check_name(family: str, filename: str) -> None:
    if not family or "/" in family or not filename.endswith(".pt"):
        raise ValueError(f"family must be a folder name and filename a .pt file, got {family!r}, {filename!r}")


def weights_path(family: str, filename: str) -> Path:
    """Where a model's weights are cached: ``<cache>/models/<family>/<filename>``; the committed copy sits at
    the same place under ``helpers/weights/`` (:func:`helpers.common.cached_file` with ``committed=True``)."""
    _check_name(family, filename)
    return common.cache_dir("models", family) / filename


def committed_path(family: str, filename: str) -> Path:
    """Where the committed copy of a model's weights lives: ``helpers/weights/models/<family>/<filename>``."""
    _check_name(family, filename)
    return common.WEIGHTS_DIR / "models" / family / filename


def save_trained(model, recipe: Recipe, history: dict, path: str | Path) -> None:
    """Write a trained model's weights with the recipe and training history that produced it (torch file)."""
    import torch

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    blob = {"state_dict": state, "recipe": json.dumps(dataclasses.asdict(recipe), default=str),
            "history": json.dumps(history)}  # fmt: skip
    with open(path, "wb") as fh:
        torch.save(blob, fh)


def trained_model(make: Callable, train: Callable, recipe: Recipe, filename: str, *, family: str):
    """A model with trained weights: committed (verified), else cached (verified), else trained now and cached.

    Args:
        make: ``make() -> nn.Module``, the untrained architecture.
        train: ``train() -> (model, history)``, run only when no verified copy exists.
        recipe: the :class:`Recipe` that determines the weights (saved with them, attached as ``model.recipe``).
        filename: the weights file's name, ``<name>-<recipe.key()>.pt``.
        family: the sub-folder of ``models/`` (``"vision"``, ``"clip"``, ``"transfer"``, ``"ch9"``).

    Returns:
        ``make()`` with the weights loaded, in eval mode, with ``model.history`` and ``model.recipe``.
    """
    import torch

    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe must be a zoo.Recipe, got {type(recipe).__name__}")

    def build(target: Path) -> None:
        model, history = train()
        save_trained(model, recipe, history, target)

    path = common.cached_file(weights_path(family, filename), build, committed=True)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = make()
    model.load_state_dict(blob["state_dict"])
    model.history = json.loads(blob["history"])
    model.recipe = recipe
    return model.eval()


def _vision(arch: str):
    def load(seed: int, overrides: dict):
        from helpers import vision

        return vision.pretrained(dataclasses.replace(vision.RECIPES[arch], seed=seed, **overrides), progress=False)

    return load


def _clip(seed: int, overrides: dict):
    from helpers import clip

    return clip.pretrained_clip(dataclasses.replace(clip.RECIPE, seed=seed, **overrides), progress=False)


def _rare_clip(seed: int, overrides: dict):
    from helpers import rare

    base = dataclasses.replace(rare.RARE_RECIPE.base, seed=seed)  # the seed lives in the CLIP recipe it extends
    return rare.pretrained_rare_clip(dataclasses.replace(rare.RARE_RECIPE, base=base, **overrides), progress=False)


def _source(name: str):
    def load(seed: int, overrides: dict):
        from helpers import transfer

        recipe = dataclasses.replace(transfer.RECIPES[name], seed=seed, **overrides)
        return transfer.source_network(recipe, progress=False)

    return load


def _protopnet(seed: int, overrides: dict):
    from helpers import data, prototypes, vision

    vit = vision.pretrained("vit", progress=False)
    images, labels = data.fashion_tensors("train")  # as Chapters 9 and 14 pass them
    recipe = dataclasses.replace(prototypes.ProtoRecipe(), seed=seed, **overrides)
    head, history = prototypes.cached_prototype_head(vit, images, labels, recipe)
    head.history, head.recipe = history, recipe
    return head


def _registry() -> dict[str, Callable[[int, dict], object]]:
    from helpers import transfer

    models = {"vit": _vision("vit"), "cnn": _vision("cnn"), "clip": _clip, "rare_clip": _rare_clip,
              "protopnet": _protopnet}  # fmt: skip
    models |= {f"source/{name}": _source(name) for name in transfer.RECIPES if "_seed" not in name}  # seed= instead
    return models


def names() -> list[str]:
    """Every name :func:`load` accepts."""
    return sorted(_registry())


def load(name: str, *, seed: int = 0, **overrides):
    """One of the book's trained models, by name and seed: committed, cached, or trained now.

    Args:
        name: one of :func:`names` (``"vit"``, ``"cnn"``, ``"clip"``, ``"rare_clip"``, ``"protopnet"``,
            ``"source/specialist"``, ...).
        seed: the training seed; the chapters' committed seeds load at once, others train (minutes).
        overrides: recipe fields to change (e.g. ``epochs=3``), applied with ``dataclasses.replace``.

    Returns:
        the model in eval mode with ``.history`` (training log) and ``.recipe`` (a :class:`Recipe`).
    """
    models = _registry()
    if name not in models:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(models)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return models[name](seed, overrides)


__all__ = ["Recipe", "committed_path", "load", "names", "save_trained", "trained_model", "weights_path"]


# ---------------------------------------------------------------------------------------------
# The architectures of the book's Fashion-MNIST models (Chapters 8-14 build on them)
# ---------------------------------------------------------------------------------------------


def fashion_vit(*, width: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0) -> nn.Module:
    """A timm ``VisionTransformer`` sized for 28 x 28 grey images: 7 x 7 patches, CLS token, 10 classes
    (Chapter 8's ViT; also the image tower of Chapter 10's CLIP-style model and Chapter 13's trunk).

    With the defaults it has 139,018 parameters: 16 patch tokens + CLS, 4 blocks of 4 heads of width 16.
    """
    from timm.models.vision_transformer import VisionTransformer

    from helpers import assets, data

    return VisionTransformer(
        img_size=data.IMAGE_SIZE, patch_size=7, in_chans=1, num_classes=len(assets.FASHION_CLASSES),
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


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, *, batch_size: int = 1000) -> Tensor:
    """Logits ``[N, classes]`` of ``model`` on ``images`` ``[N, 1, 28, 28]`` in eval mode, in batches."""
    from helpers import data

    images = data.check_images(images)
    was_training = model.training
    model.eval()
    out = torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out
