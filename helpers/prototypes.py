"""Prototype layers: "this looks like that" on ViT patch tokens, and prototypes for recommendation (chapter 9).

Two halves, one idea: a prediction is a linear function of similarities to a few prototypes, and each
prototype is *projected* onto a real training example, so an explanation can show it.

*Images* (ProtoPNet, Chen et al. 2019): the book's ViT (chapter 8, kept frozen) gives 16 patch tokens
per Fashion-MNIST image; :class:`PrototypeHead` maps them through ProtoPNet's add-on layers, compares
them with ``m`` prototypes per class by the log-similarity of the closest patch, and classifies with
a last layer. :func:`train_prototype_head` runs ProtoPNet's stages (warm-up with cluster and
separation costs, push with :func:`push_prototypes`, last-layer optimisation);
:func:`similarity_maps`, :func:`part_masks` and :func:`prototype_purity` give the explanations and
their measures.

*Recommendation* (SASRec, Kang & McAuley 2018): :func:`helpers.data.simulate_shop` generates interaction
sequences over Fashion-MNIST items from a stated preference model (so the ground truth is known);
:class:`SequentialRecommender` is a small causal transformer whose next-item scores come either from
a dot product with item embeddings (plain SASRec) or from a prototype layer whose prototypes are
projected onto real item embeddings; :func:`hit_rate_ndcg` scores rankings.

Tensors: patch tokens ``[batch, 16, width]`` (CLS removed), latent patches ``[batch, 16, dim]``,
prototypes ``[P, dim]``, similarity maps ``[batch, P, 4, 4]``; sequences ``[users, time]`` of item
ids, with ``n_items`` as the padding id.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helpers import common, data, hooks, zoo

GRID = 4  # the book's ViT: 28 x 28 images, 7 x 7 patches -> 4 x 4 grid
N_PATCHES = GRID * GRID


# ---------------------------------------------------------------------------------------------
# Images: a ProtoPNet head on frozen ViT patch tokens
# ---------------------------------------------------------------------------------------------


def log_similarity(distances: Tensor, *, eps: float = 1e-4) -> Tensor:
    """ProtoPNet's similarity ``log((d + 1) / (d + eps))`` of squared distances ``d >= 0`` (same shape).

    Large (about ``log(1/eps)``) when a patch sits on the prototype, near 0 far away.

    >>> [round(v, 3) for v in log_similarity(torch.tensor([0.0, 1.0, 1e6])).tolist()]
    [9.21, 0.693, 0.0]

    Chen et al. (2019), "This looks like that", eq. in §2.1.
    """
    return torch.log((distances + 1) / (distances + eps))


def _check_tokens(tokens: Tensor, width: int | None = None) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.ndim != 3 or tokens.shape[1] != N_PATCHES:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(
            f"tokens must be patch tokens [batch, {N_PATCHES}, width] (vision.vit_tokens(vit, x)[:, 1:]), got {shape}"
        )
    if width is not None and tokens.shape[2] != width:
        raise ValueError(f"tokens have width {tokens.shape[2]}, the head expects {width}")
    return tokens.float()


class PrototypeHead(nn.Module):
    """ProtoPNet's head on patch tokens: add-on layers, ``per_class`` prototypes per class, last layer.

    ``latent`` maps tokens ``[batch, 16, width]`` to ``[batch, 16, dim]`` in ``(0, 1)`` (two linear
    layers with ReLU then sigmoid: ProtoPNet's 1 x 1 convolutions); each prototype ``p_j`` belongs to
    class ``prototype_class[j]``; the logits are ``last_layer(max_patch log_similarity(||z - p_j||^2))``.

    >>> head = PrototypeHead(width=8, n_classes=3, per_class=2, dim=4)
    >>> logits, min_d = head(torch.randn(5, 16, 8))
    >>> tuple(logits.shape), tuple(min_d.shape), head.prototype_class.tolist()
    ((5, 3), (5, 6), [0, 0, 1, 1, 2, 2])
    """

    def __init__(self, width: int = 64, *, n_classes: int = 10, per_class: int = 3, dim: int = 32, eps: float = 1e-4):
        super().__init__()
        self.width, self.n_classes, self.per_class, self.dim, self.eps = width, n_classes, per_class, dim, eps
        self.add_on = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, dim), nn.Sigmoid())
        self.prototypes = nn.Parameter(torch.rand(n_classes * per_class, dim))  # [P, dim], uniform as in ProtoPNet
        self.register_buffer("prototype_class", torch.arange(n_classes).repeat_interleave(per_class))
        self.last_layer = nn.Linear(n_classes * per_class, n_classes, bias=False)
        self.set_last_layer(incorrect=-0.5)

    @property
    def identity(self) -> Tensor:
        """``[P, classes]`` one-hot class membership of the prototypes."""
        return F.one_hot(self.prototype_class, self.n_classes).float()

    @torch.no_grad()
    def set_last_layer(self, *, incorrect: float = -0.5) -> None:
        """ProtoPNet's initial last layer: weight 1 from a prototype to its class, ``incorrect`` elsewhere."""
        ident = self.identity.T  # [classes, P]
        self.last_layer.weight.copy_(ident + incorrect * (1 - ident))

    def latent(self, tokens: Tensor) -> Tensor:
        """Add-on features of the patches: ``[batch, 16, width] -> [batch, 16, dim]``."""
        return self.add_on(tokens)

    def distances(self, tokens: Tensor) -> Tensor:
        """Squared L2 distances from every patch to every prototype: ``[batch, P, 16]``."""
        z = self.latent(_check_tokens(tokens, self.width))  # [batch, patch, dim]
        d = (z**2).sum(-1)[:, None, :] - 2 * torch.einsum("bnd,pd->bpn", z, self.prototypes)
        return (d + (self.prototypes**2).sum(-1)[None, :, None]).clamp_min(0)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [batch, classes], min_distances [batch, P])`` from patch tokens ``[batch, 16, width]``."""
        min_d = self.distances(tokens).min(-1).values  # [batch, P]
        return self.last_layer(log_similarity(min_d, eps=self.eps)), min_d


class AttentionPrototypeHead(PrototypeHead):
    """Prototypes as learned *queries* that attend to the latent patches (one cross-attention layer).

    Prototype ``p_j`` attends to the patches with ``a_jn = softmax_n(-||z_n - p_j||^2 / tau)`` (an RBF
    kernel in place of the dot product, so the prototype stays a point of the latent space that can be
    pushed), and its similarity is the log-similarity of the attended distance ``sum_n a_jn ||z_n - p_j||^2``.
    ``tau`` is learned (``log_tau``); as ``tau -> 0`` the attention becomes ProtoPNet's closest patch.
    The attention weights ``[batch, P, 16]`` are the prototype's map over the image.

    >>> head = AttentionPrototypeHead(width=8, n_classes=3, per_class=2, dim=4)
    >>> logits, d = head(torch.randn(5, 16, 8))
    >>> tuple(logits.shape), tuple(d.shape), tuple(head.attention(torch.randn(5, 16, 8)).sum(-1).shape)
    ((5, 3), (5, 6), (5, 6))
    """

    def __init__(self, width: int = 64, *, n_classes: int = 10, per_class: int = 3, dim: int = 32, eps: float = 1e-4,
                 temperature: float = 0.1):  # fmt: skip
        super().__init__(width, n_classes=n_classes, per_class=per_class, dim=dim, eps=eps)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.log_tau = nn.Parameter(torch.tensor(math.log(temperature)))

    def attention(self, tokens: Tensor) -> Tensor:
        """Each prototype's attention over the patches: ``[batch, 16, width] -> [batch, P, 16]``, rows sum to 1."""
        return torch.softmax(-self.distances(tokens) / self.log_tau.exp(), dim=-1)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [batch, classes], attended distances [batch, P])`` from patch tokens ``[batch, 16, width]``."""
        d = self.distances(tokens)  # [batch, P, 16]
        attended = (torch.softmax(-d / self.log_tau.exp(), dim=-1) * d).sum(-1)  # [batch, P]
        return self.last_layer(log_similarity(attended, eps=self.eps)), attended


class ProtoViT(nn.Module):
    """The frozen book ViT followed by a :class:`PrototypeHead`: images ``[batch, 1, 28, 28]`` -> logits."""

    def __init__(self, backbone: nn.Module, head: PrototypeHead):
        super().__init__()
        self.backbone, self.head = backbone.eval().requires_grad_(False), head

    def patch_tokens(self, images: Tensor) -> Tensor:
        """``[batch, 16, width]`` final-LayerNorm patch tokens (the CLS token dropped), differentiable in ``images``."""
        return self.backbone.forward_features(data.check_images(images))[:, 1:]

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.patch_tokens(images))[0]


def patch_tokens(backbone: nn.Module, images: Tensor, *, block: int | None = None, batch_size: int = 2000) -> Tensor:
    """Frozen ViT patch tokens of many images, in batches: ``[N, 1, 28, 28] -> [N, 16, width]``.

    ``block=None`` gives the final tokens (after the last block and the final LayerNorm); ``block=k``
    the tokens after block ``k`` (0-based), through the same final LayerNorm (timm's
    ``forward_intermediates(..., norm=True)``), whose receptive fields have mixed fewer patches.
    """
    from helpers import vision

    images = data.check_images(images)
    depth = len(getattr(backbone, "blocks", []))
    if block is not None and not 0 <= block < depth:
        raise ValueError(f"block must be None (final tokens) or in 0..{depth - 1}, got {block}")
    chunks = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    if block is None:
        return torch.cat([vision.vit_tokens(backbone, chunk)[:, 1:] for chunk in chunks])
    with torch.no_grad():
        return torch.cat([backbone.forward_intermediates(chunk, indices=[block], norm=True, intermediates_only=True,
                                                         output_fmt="NLC")[0] for chunk in chunks])  # fmt: skip


def prototype_losses(head: PrototypeHead, min_distances: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """ProtoPNet's cluster and separation costs (Chen et al. 2019, §2.2), both ``[]``.

    Cluster: mean over images of the smallest distance to a prototype *of the image's class*
    (pull every image close to one of its class's prototypes). Separation: mean smallest distance to a
    prototype of *another* class (subtracted in the loss, so it pushes those away).
    """
    own = head.identity[:, labels].T.bool()  # [batch, P]
    big = min_distances.detach().max() + 1
    cluster = torch.where(own, min_distances, big).min(1).values.mean()
    separation = torch.where(~own, min_distances, big).min(1).values.mean()
    return cluster, separation


@dataclasses.dataclass(frozen=True)
class ProtoRecipe(zoo.Recipe):
    """Everything that determines a trained :class:`PrototypeHead` (its hash names the cache file)."""

    per_class: int = 3
    dim: int = 32
    n_train: int = 20000  # training images whose frozen tokens the head sees (first n of the training set)
    warm_epochs: int = 8
    last_epochs: int = 4
    batch_size: int = 250
    lr: float = 3e-3
    lr_last: float = 1e-3
    clst: float = 0.8  # ProtoPNet's lambda_1
    sep: float = 0.08  # ProtoPNet's lambda_2
    l1: float = 1e-4  # ProtoPNet's lambda for wrong-class last-layer weights
    seed: int = 0
    version: int = 1
    block: int | None = None  # tokens after this ViT block (0-based); None: the final tokens
    attention: bool = False  # prototypes as attending queries (AttentionPrototypeHead) instead of the closest patch

    LATE_FIELDS = {"block": None, "attention": False}  # added later: at these values the old files' names


def _epochs(head, params, tokens, labels, *, epochs, lr, batch_size, generator, loss_fn) -> list[float]:
    optimiser = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(tokens), generator=generator)
        total = 0.0
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            logits, min_d = head(tokens[b])
            loss = loss_fn(logits, min_d, labels[b])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(b)
        losses.append(total / len(tokens))
    return losses


def train_prototype_head(
    tokens: Tensor, labels: Tensor, recipe: ProtoRecipe = ProtoRecipe()
) -> tuple[PrototypeHead, dict]:
    """Train a :class:`PrototypeHead` on frozen patch tokens by ProtoPNet's three stages.

    1. *Warm-up/joint* (the backbone stays frozen, so they coincide): add-on layers and prototypes
       with the last layer fixed, loss ``CE + clst * Clst - sep * Sep``.
    2. *Push*: every prototype becomes its nearest latent training patch of its own class
       (:func:`push_prototypes`).
    3. *Last layer*: only the last layer, loss ``CE + l1 * |wrong-class weights|_1``.

    Args:
        tokens: ``[N, 16, width]`` patch tokens of the training images; labels: ``[N]``.
        recipe: sizes and optimisation settings.

    Returns:
        ``(head in eval mode, history)`` with ``history["warm_loss"]``, ``history["last_loss"]`` per
        epoch and ``history["push"]`` (see :func:`push_prototypes`); ``history["state_before_push"]``
        holds the head's weights before the push, to measure what the push costs.
    """
    tokens = _check_tokens(tokens)
    labels = torch.as_tensor(labels).long()
    if labels.shape != (len(tokens),):
        raise ValueError(f"labels must be [N] = [{len(tokens)}], got {tuple(labels.shape)}")
    common.set_seed(recipe.seed)
    kind = AttentionPrototypeHead if recipe.attention else PrototypeHead
    head = kind(tokens.shape[2], n_classes=int(labels.max()) + 1, per_class=recipe.per_class, dim=recipe.dim)
    generator = torch.Generator().manual_seed(recipe.seed)

    def warm_loss(logits, min_d, y):
        cluster, separation = prototype_losses(head, min_d, y)
        return F.cross_entropy(logits, y) + recipe.clst * cluster - recipe.sep * separation

    def last_loss(logits, _min_d, y):
        wrong = head.last_layer.weight * (1 - head.identity.T)
        return F.cross_entropy(logits, y) + recipe.l1 * wrong.abs().sum()

    head.train()
    warm_params = [p for name, p in head.named_parameters() if not name.startswith("last_layer")]
    history = {"warm_loss": _epochs(head, warm_params, tokens, labels,
                                    epochs=recipe.warm_epochs, lr=recipe.lr, batch_size=recipe.batch_size,
                                    generator=generator, loss_fn=warm_loss)}  # fmt: skip
    history["state_before_push"] = {k: v.detach().clone() for k, v in head.state_dict().items()}
    history["push"] = push_prototypes(head, tokens, labels)
    history["last_loss"] = _epochs(head, list(head.last_layer.parameters()), tokens, labels, epochs=recipe.last_epochs,
                                   lr=recipe.lr_last, batch_size=recipe.batch_size, generator=generator,
                                   loss_fn=last_loss)  # fmt: skip
    return head.eval(), history


def cached_prototype_head(vit: nn.Module, images: Tensor, labels: Tensor,
                          recipe: ProtoRecipe) -> tuple[PrototypeHead, dict]:  # fmt: skip
    """Chapter 9's ProtoPNet head for ``recipe``: its committed copy, the cache, or trained here.

    Training (:func:`train_prototype_head`) uses the patch tokens of ``images[:recipe.n_train]``
    (normalised ``[N, 1, 28, 28]``) and their ``labels``. The file is named by the hash of the recipe
    and of the ViT's recipe, so Chapters 9 and 14 share it.

    Returns:
        ``(head in eval mode, training history)``; the history holds ``"state_before_push"`` and ``"push"``.
    """
    key = common.content_hash({"recipe": recipe.hashed_fields(), "vit": vit.recipe.key()})

    def build(path):
        tokens = patch_tokens(vit, images[: recipe.n_train], block=recipe.block)
        head, history = train_prototype_head(tokens, torch.as_tensor(labels)[: recipe.n_train], recipe)
        torch.save({"state": head.state_dict(), "history": history}, path)

    path = common.cached_file(common.cache_dir("models", "ch9") / f"protopnet-{key}.pt", build, committed=True)
    blob = torch.load(path, weights_only=True)
    return head_from_state(blob["state"]), blob["history"]


def head_from_state(state: dict) -> PrototypeHead:
    """A :class:`PrototypeHead` (or :class:`AttentionPrototypeHead`, when ``state`` has ``log_tau``) with weights
    ``state`` (its sizes read from them), in eval mode."""
    n_classes, (n_prototypes, dim) = state["last_layer.weight"].shape[0], state["prototypes"].shape
    kind = AttentionPrototypeHead if "log_tau" in state else PrototypeHead
    head = kind(state["add_on.0.weight"].shape[1], n_classes=n_classes, per_class=n_prototypes // n_classes,
                dim=dim)  # fmt: skip
    head.load_state_dict(state)
    return head.eval()


@torch.no_grad()
def latent_patches(head: PrototypeHead, tokens: Tensor, *, batch_size: int = 5000) -> Tensor:
    """Add-on features of every patch: ``[N, 16, width] -> [N, 16, dim]`` (what push searches)."""
    tokens = _check_tokens(tokens, head.width)
    return torch.cat([head.latent(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)])


@torch.no_grad()
def push_prototypes(head: PrototypeHead, tokens: Tensor, labels: Tensor, *, batch_size: int = 5000) -> dict:
    """Project every prototype onto its nearest latent training patch of its own class (ProtoPNet's push).

    After the call, ``head.prototypes[j]`` *is* ``latent_patches(head, tokens)[image[j], patch[j]]``,
    bit for bit, so the prototype can be shown as that 7 x 7 patch of that training image.

    Args:
        head: the head to modify in place; tokens: ``[N, 16, width]``; labels: ``[N]``.

    Returns:
        ``{"image": [P] long, "patch": [P] long, "distance": [P] float}``: where each prototype went
        and how far it moved (squared distance).
    """
    labels = torch.as_tensor(labels).long()
    z = latent_patches(head, tokens, batch_size=batch_size)  # [N, patch, dim]
    flat = z.reshape(-1, z.shape[-1])  # [N * patch, dim]
    patch_class = labels.repeat_interleave(z.shape[1])  # [N * patch]
    image, patch, distance = [], [], []
    for j, proto in enumerate(head.prototypes.detach()):
        d = ((flat - proto) ** 2).sum(-1)
        d[patch_class != head.prototype_class[j]] = float("inf")
        if not torch.isfinite(d).any():
            raise ValueError(f"no training image of class {int(head.prototype_class[j])}: cannot push prototype {j}")
        best = int(d.argmin())
        image.append(best // z.shape[1])
        patch.append(best % z.shape[1])
        distance.append(float(d[best]))
        head.prototypes[j] = flat[best]
    return {"image": torch.tensor(image), "patch": torch.tensor(patch), "distance": torch.tensor(distance)}


@torch.no_grad()
def head_accuracy(head: PrototypeHead, tokens: Tensor, labels: Tensor, *, batch_size: int = 5000) -> float:
    """Top-1 accuracy of the head on patch tokens ``[N, 16, width]``."""
    tokens = _check_tokens(tokens, head.width)
    pred = torch.cat([head(tokens[i : i + batch_size])[0].argmax(1) for i in range(0, len(tokens), batch_size)])
    return float((pred == torch.as_tensor(labels)).float().mean())


@torch.no_grad()
def similarity_maps(head: PrototypeHead, tokens: Tensor) -> Tensor:
    """Per-patch log-similarity to every prototype: ``[batch, 16, width] -> [batch, P, 4, 4]``.

    The maximum of a map over its 16 patches is the activation the last layer sees.
    """
    return log_similarity(head.distances(tokens), eps=head.eps).reshape(len(tokens), -1, GRID, GRID)


def part_masks(maps: Tensor, *, size: int = 28, quantile: float = 0.9) -> tuple[Tensor, Tensor]:
    """Upsample patch-level maps to pixels (bilinear, as ProtoPNet) and keep the most activated pixels.

    Args:
        maps: ``[batch, P, h, w]`` similarity maps.
        size: output side in pixels.
        quantile: a pixel is in the part when its upsampled similarity is at least this quantile of
            its own map (ProtoPNet draws boxes around the top 5 %, ``quantile=0.95``).

    Returns:
        ``(upsampled [batch, P, size, size], masks [batch, P, size, size] bool)``.

    >>> up, mask = part_masks(torch.arange(16.0).reshape(1, 1, 4, 4), size=8, quantile=0.75)
    >>> tuple(mask.shape), int(mask.sum()), bool(mask[0, 0, -1, -1])
    ((1, 1, 8, 8), 16, True)
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be [batch, P, h, w], got shape {tuple(maps.shape)}")
    if not 0 <= quantile < 1:
        raise ValueError(f"quantile must be in [0, 1), got {quantile}")
    b, p = maps.shape[:2]
    up = F.interpolate(maps.reshape(b * p, 1, *maps.shape[2:]).float(), size=(size, size), mode="bilinear",
                       align_corners=False).reshape(b, p, size, size)  # fmt: skip
    cut = torch.quantile(up.reshape(b, p, -1), quantile, dim=-1)[..., None, None]
    return up, up >= cut


@torch.no_grad()
def prototype_purity(head: PrototypeHead, tokens: Tensor, labels: Tensor, *, k: int = 10) -> tuple[Tensor, Tensor]:
    """Class consistency of each prototype's ``k`` nearest training images (nearest by their closest patch).

    Args:
        head: a trained head; tokens: ``[N, 16, width]``; labels: ``[N]``.
        k: neighbours per prototype.

    Returns:
        ``(purity [P], neighbours [P, k])``: the fraction of the ``k`` images whose label is the
        prototype's class, and their indices (nearest first).
    """
    labels = torch.as_tensor(labels).long()
    if not 1 <= k <= len(labels):
        raise ValueError(f"k must be between 1 and the number of images ({len(labels)}), got {k}")
    min_d = torch.cat([head(tokens[i : i + 5000])[1] for i in range(0, len(tokens), 5000)])  # [N, P]
    neighbours = min_d.topk(k, dim=0, largest=False).indices.T  # [P, k]
    purity = (labels[neighbours] == head.prototype_class[:, None]).float().mean(1)
    return purity, neighbours


def frozen_token_classifier(tokens: Tensor, labels: Tensor, *, hidden: int = 0, epochs: int = 10, lr: float = 3e-3,
                            batch_size: int = 250, seed: int = 0) -> nn.Module:  # fmt: skip
    """The non-interpretable baseline on the same frozen tokens: a linear (``hidden=0``) or one-hidden-layer
    MLP classifier on the flattened patch tokens ``[N, 16, width]`` -> logits ``[N, classes]``.

    Trained with Adam on cross-entropy, ``epochs`` passes, seeded; returned in eval mode.
    """
    tokens = _check_tokens(tokens).flatten(1)
    labels = torch.as_tensor(labels).long()
    if labels.shape != (len(tokens),):
        raise ValueError(f"labels must be [N] = [{len(tokens)}], got {tuple(labels.shape)}")
    if hidden < 0 or epochs < 1:
        raise ValueError(f"hidden must be >= 0 and epochs >= 1, got hidden={hidden}, epochs={epochs}")
    common.set_seed(seed)
    n_classes = int(labels.max()) + 1
    layers = [nn.Linear(tokens.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, n_classes)] if hidden else [
        nn.Linear(tokens.shape[1], n_classes)]  # fmt: skip
    model = nn.Sequential(*layers)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(tokens), generator=generator)
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            loss = F.cross_entropy(model(tokens[b]), labels[b])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# A segmentation test with masks by construction
# ---------------------------------------------------------------------------------------------


def textured_scenes(images: np.ndarray, *, amplitude: float = 30.0, threshold: int = 25,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Fashion-MNIST items on a smooth random texture, with each item's mask known by construction.

    The item's pixels above ``threshold`` (its mask) are kept; every other pixel is replaced by a
    texture (uniform noise on a 7 x 7 grid, bicubic to 28 x 28, scaled to ``[0, amplitude]``).

    Args:
        images: uint8 ``[N, 28, 28]`` items on a black background.

    Returns:
        ``(scenes uint8 [N, 28, 28], masks bool [N, 28, 28])``.

    >>> scenes, masks = textured_scenes(np.full((2, 28, 28), 200, np.uint8), amplitude=30)
    >>> bool(masks.all()), int(scenes.max())
    (True, 200)
    """
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, 28, 28], got {images.dtype} {images.shape}")
    if not 0 <= amplitude <= 255 or not 0 <= threshold < 255:
        raise ValueError(f"amplitude must be in [0, 255] and threshold in [0, 255), got {amplitude}, {threshold}")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(len(images), 1, 7, 7, generator=generator)
    texture = F.interpolate(noise, size=28, mode="bicubic", align_corners=False)[:, 0].clamp(0, 1).numpy() * amplitude
    masks = images > threshold
    return np.where(masks, images, np.round(texture)).astype(np.uint8), masks


def _check_maps_masks(maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    maps, masks = torch.as_tensor(maps).float(), torch.as_tensor(masks).bool()
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(f"maps and masks must both be [N, H, W] (upsample maps first), got {tuple(maps.shape)} "
                         f"and {tuple(masks.shape)}")  # fmt: skip
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    if not masks.flatten(1).any(1).all() or masks.flatten(1).all(1).any():
        raise ValueError("every mask needs both object and background pixels")
    return maps, masks


def pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Pointing game: does each map's maximum fall on the object? ``[N, H, W], [N, H, W] -> [N]`` bool.

    A map whose maximum is shared by several pixels scores the fraction of them on the object
    (so a flat map scores the object's share of the image, not a lucky first pixel).

    >>> m = torch.zeros(2, 4, 4); m[0, 0, 0] = 1; m[1, 3, 3] = 1
    >>> mask = torch.zeros(2, 4, 4, dtype=torch.bool); mask[:, :2, :2] = True
    >>> pointing_game(m, mask).tolist()
    [1.0, 0.0]
    """
    maps, masks = _check_maps_masks(maps, masks)
    flat = maps.flatten(1)
    top = flat == flat.max(1, keepdim=True).values
    return (top & masks.flatten(1)).sum(1).float() / top.sum(1).float()


def segmentation_miou(maps: Tensor, masks: Tensor, *, quantile: float) -> Tensor:
    """Mean IoU over the two classes (object, background) of maps thresholded at their own ``quantile``.

    Args:
        maps: ``[N, H, W]`` saliency or similarity maps at pixel resolution; masks: ``[N, H, W]`` bool.
        quantile: a pixel is predicted "object" when its value is at least this quantile of its map.

    Returns:
        ``[N]`` per-image mIoU = (IoU(object) + IoU(background)) / 2.

    >>> m = torch.zeros(1, 4, 4); m[0, :2, :2] = 1
    >>> mask = m.bool()
    >>> segmentation_miou(m, mask, quantile=0.75).tolist()
    [1.0]
    """
    maps, masks = _check_maps_masks(maps, masks)
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    cut = torch.quantile(maps.flatten(1), quantile, dim=1)[:, None, None]
    pred = maps >= cut
    ious = []
    for p, t in ((pred, masks), (~pred, ~masks)):
        inter, union = (p & t).flatten(1).sum(1).float(), (p | t).flatten(1).sum(1).float()
        ious.append(inter / union.clamp_min(1))
    return (ious[0] + ious[1]) / 2


# ---------------------------------------------------------------------------------------------
# Recommendation: SASRec with an optional prototype layer
# ---------------------------------------------------------------------------------------------


class SequentialRecommender(nn.Module):
    """A SASRec-style next-item model, optionally scoring through prototypes projected onto real items.

    Item embeddings are ``e_i = free_i + A f_i``, where ``f_i`` are frozen features of the item's
    image (the ViT's CLS token) and ``A`` is learned; positions are learned; ``n_blocks`` causal
    self-attention blocks give ``h_t`` at every position. Scores for the next item:

    * plain (``n_prototypes = 0``): ``s_i = h_t · e_i`` (SASRec's shared embedding);
    * prototypes: ``a_k = softmax_k(cos(h_t, p_k) / tau)`` and
      ``s_i = scale · Σ_k a_k cos(p_k, e_i) + b_i``, a linear function of the prototype activations
      ``a_k``, whose coefficients say how much item ``i`` resembles prototype ``k``.

    >>> model = SequentialRecommender(torch.randn(20, 6), dim=8, max_len=5, n_prototypes=4)
    >>> tuple(model(torch.tensor([[1, 2, 3]])).shape)
    (1, 3, 20)
    """

    def __init__(self, item_features: Tensor, *, dim: int = 64, max_len: int = 30, n_blocks: int = 2, n_heads: int = 1,
                 dropout: float = 0.2, n_prototypes: int = 0, tau: float = 0.1):  # fmt: skip
        super().__init__()
        feats = torch.as_tensor(item_features).float()
        if feats.ndim != 2:
            raise ValueError(f"item_features must be [items, features], got shape {tuple(feats.shape)}")
        self.n_items, self.max_len, self.tau = len(feats), max_len, tau
        self.register_buffer("features", (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6))
        self.free = nn.Embedding(self.n_items + 1, dim, padding_idx=self.n_items)  # last row: padding
        nn.init.normal_(self.free.weight, std=0.01)
        with torch.no_grad():
            self.free.weight[self.n_items].zero_()
        self.feature_map = nn.Linear(feats.shape[1], dim, bias=False)
        self.position = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, n_heads, dim_feedforward=dim, dropout=dropout, batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.blocks = nn.TransformerEncoder(layer, n_blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.n_prototypes = n_prototypes
        if n_prototypes:
            self.prototypes = nn.Parameter(torch.randn(n_prototypes, dim) * 0.1)  # [K, dim]
            self.scale = nn.Parameter(torch.tensor(10.0))
            self.bias = nn.Parameter(torch.zeros(self.n_items))
        self.prototype_items: Tensor | None = None  # [K] item ids after projection

    def item_embeddings(self) -> Tensor:
        """``[items, dim]`` embeddings (padding row excluded)."""
        return self.free.weight[: self.n_items] + self.feature_map(self.features)

    def embed(self, sequences: Tensor) -> Tensor:
        """Item embeddings of left-padded sequences ``[batch, time]`` -> ``[batch, time, dim]`` (padding: zeros)."""
        return torch.cat([self.item_embeddings(), torch.zeros_like(self.free.weight[-1:])])[sequences]

    def encode(self, sequences: Tensor) -> Tensor:
        """Hidden states ``h_t`` ``[batch, time, dim]`` of left-padded item sequences ``[batch, time]``."""
        return self.encode_embedded(self.embed(sequences), sequences == self.n_items)

    def encode_embedded(self, items: Tensor, pad: Tensor) -> Tensor:
        """:meth:`encode` from item embeddings ``[batch, time, dim]`` and a padding mask ``[batch, time]``.

        Gradient-based explanations differentiate the scores with respect to ``items``.
        """
        t = items.shape[1]
        x = items * math.sqrt(items.shape[-1]) + self.position(torch.arange(self.max_len - t, self.max_len))
        causal = torch.triu(torch.full((t, t), float("-inf")), 1)
        pad = torch.zeros(pad.shape).masked_fill(pad, float("-inf")) if pad.any() else None  # float, like `causal`
        return self.norm(self.blocks(self.dropout(x), mask=causal, src_key_padding_mask=pad))

    def activations(self, hidden: Tensor) -> Tensor:
        """Prototype activations ``a_k`` ``[..., K]`` (softmax over prototypes of scaled cosines)."""
        return (F.normalize(hidden, dim=-1) @ F.normalize(self.prototypes, dim=-1).T / self.tau).softmax(-1)

    def scores_from_hidden(self, hidden: Tensor) -> Tensor:
        emb = self.item_embeddings()
        if not self.n_prototypes:
            return hidden @ emb.T
        kernel = F.normalize(self.prototypes, dim=-1) @ F.normalize(emb, dim=-1).T  # [K, items]
        return self.scale * self.activations(hidden) @ kernel + self.bias

    def forward(self, sequences: Tensor) -> Tensor:
        """Next-item scores ``[batch, time, items]`` after every position of ``sequences`` ``[batch, time]``."""
        return self.scores_from_hidden(self.encode(sequences))

    @torch.no_grad()
    def project_prototypes(self) -> Tensor:
        """Push: replace each prototype by the nearest (cosine) real item embedding; returns the ``[K]`` item ids.

        Distinct prototypes may land on the same item; the returned ids say which.
        """
        if not self.n_prototypes:
            raise ValueError("this recommender has no prototype layer (n_prototypes=0)")
        emb = self.item_embeddings()
        nearest = (F.normalize(self.prototypes, dim=-1) @ F.normalize(emb, dim=-1).T).argmax(1)
        self.prototypes.copy_(emb[nearest])
        self.prototype_items = nearest.clone()
        return nearest


def cached_recommender(item_features: Tensor, train_sequences: np.ndarray, recipe: RecRecipe, *,
                       shop_config: data.ShopConfig, vit_key: str) -> tuple[SequentialRecommender, dict]:  # fmt: skip
    """Chapter 9's recommender for ``recipe``: its committed copy, the cache, or trained here.

    Training is :func:`train_recommender`.

    The file is named by the hash of the shop, the recipe and the ViT whose CLS tokens are the item
    features (``vit_key``, ``vit.recipe.key()``), so Chapters 9 and 14 share it; training sequences
    other than the leave-last-out ones (``[users, length - 1]``, e.g. :func:`helpers.data.split_train_valid_test`'s)
    add their shape to the name.

    Returns:
        ``(model in eval mode, training history)``; ``model.prototype_items`` is set for a prototype model.
    """
    seqs = np.asarray(train_sequences)
    fields = {"shop": shop_config.as_key(), "rec": dataclasses.asdict(recipe), "vit": vit_key}
    if seqs.shape != (shop_config.n_users, shop_config.length - 1):
        fields["train_shape"] = list(seqs.shape)
    key = common.content_hash(fields)

    def build(path):
        model, hist = train_recommender(item_features, seqs, recipe)
        torch.save({"state": model.state_dict(), "history": hist, "prototype_items": model.prototype_items}, path)

    path = common.cached_file(common.cache_dir("models", "ch9") / f"sasrec-{key}.pt", build, committed=True)
    blob = torch.load(path, weights_only=True)
    model = recommender_from_state(item_features, seqs.shape[1] - 1, recipe, blob["state"])
    model.prototype_items = blob["prototype_items"]
    return model, blob["history"]


def recommender_from_state(item_features: Tensor, max_len: int, recipe: RecRecipe,
                           state: dict) -> SequentialRecommender:  # fmt: skip
    """A :class:`SequentialRecommender` built as ``recipe`` says, with weights ``state``, in eval mode."""
    model = SequentialRecommender(item_features, dim=recipe.dim, max_len=max_len, n_blocks=recipe.n_blocks,
                                  n_heads=recipe.n_heads, dropout=recipe.dropout, n_prototypes=recipe.n_prototypes,
                                  tau=recipe.tau)  # fmt: skip
    model.load_state_dict(state)
    return model.eval()


HISTORY_METHODS = ("prototypes", "attention", "input_x_gradient", "integrated_gradients", "occlusion", "random")
"""Explanations of one recommendation over the items of the history (:func:`history_attributions`)."""


def history_attributions(model: SequentialRecommender, sequences: Tensor, target: Tensor, method: str, *,
                         n_steps: int = 32, seed: int = 0) -> Tensor:  # fmt: skip
    """Score each past item of a history for one recommended item: ``[batch, time]``, 0 on padding.

    Args:
        model: a trained :class:`SequentialRecommender` (eval mode).
        sequences: ``[batch, time]`` left-padded histories (:func:`pad_histories`).
        target: ``[batch]`` the recommended item explained, e.g. the top-scored unseen item.
        method: one of :data:`HISTORY_METHODS`:

            * ``"prototypes"`` (prototype models only): ``Σ_k a_k cos(p_k, e_target) · cos(p_k, e_j)``,
              how much past item ``j`` resembles the prototypes that carry the target's score
              ("you bought things like these");
            * ``"attention"``: the last block's attention from the last position;
            * ``"input_x_gradient"``, ``"integrated_gradients"`` (Captum, ``n_steps``, from the padding
              embedding, which is zero): the target's score attributed to each past item's embedding,
              summed over the embedding axis;
            * ``"occlusion"``: the drop of the target's score when item ``j`` alone is masked as padding;
            * ``"random"``: uniform scores from ``seed``.

    Returns:
        ``[batch, time]`` float scores, higher = more important for the target.
    """
    from captum.attr import InputXGradient, IntegratedGradients

    sequences, target = torch.as_tensor(sequences).long(), torch.as_tensor(target).long()
    if sequences.ndim != 2 or target.shape != (len(sequences),):
        raise ValueError(f"need sequences [batch, time] and target [batch], got {tuple(sequences.shape)} "
                         f"and {tuple(target.shape)}")  # fmt: skip
    if ((target < 0) | (target >= model.n_items)).any():
        raise ValueError(f"target item ids must be in 0..{model.n_items - 1}")
    if method not in HISTORY_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {HISTORY_METHODS}")
    model.eval()
    pad = sequences == model.n_items
    rows = torch.arange(len(target))
    if method == "random":
        scores = torch.rand(sequences.shape, generator=torch.Generator().manual_seed(seed))
    elif method == "prototypes":
        if not model.n_prototypes:
            raise ValueError("method 'prototypes' needs a recommender with a prototype layer (n_prototypes > 0)")
        with torch.no_grad():
            act = model.activations(model.encode(sequences)[:, -1])  # [batch, K]
            cos = F.normalize(model.prototypes, dim=-1) @ F.normalize(model.item_embeddings(), dim=-1).T  # [K, items]
            weight = act * cos[:, target].T  # [batch, K] each prototype's share of the target's score
            history = cos[:, sequences.clamp(max=model.n_items - 1)]  # [K, batch, time]
            scores = torch.einsum("bk,kbt->bt", weight, history)
    elif method == "attention":
        captured = {}
        last = model.blocks.layers[-1]
        with hooks.on_modules([(last, "input", lambda _m, args: captured.setdefault("x", args[0]))]), torch.no_grad():
            model.encode(sequences)
        with torch.no_grad():
            x = last.norm1(captured["x"])  # norm_first: attention reads the normalised input
            t = x.shape[1]
            causal = torch.triu(torch.full((t, t), float("-inf")), 1)
            key_pad = torch.zeros(pad.shape).masked_fill(pad, float("-inf")) if pad.any() else None
            _, weights = last.self_attn(x, x, x, attn_mask=causal, key_padding_mask=key_pad, need_weights=True,
                                        average_attn_weights=True)  # fmt: skip
        scores = weights[:, -1]  # [batch, time] from the last position
    elif method == "occlusion":
        with torch.no_grad():
            full = model(sequences)[rows, -1, target]
            scores = torch.zeros(sequences.shape)
            for j in range(sequences.shape[1]):
                live = ~pad[:, j] & ((~pad).sum(1) > 1)  # never mask the only item
                if live.any():
                    masked = sequences[live].clone()
                    masked[:, j] = model.n_items
                    scores[live, j] = full[live] - model(masked)[:, -1].gather(1, target[live, None])[:, 0]
    else:
        def forward(items, pad_mask):
            return model.scores_from_hidden(model.encode_embedded(items, pad_mask)[:, -1])  # [batch, items]

        items = model.embed(sequences).detach().requires_grad_(True)
        if method == "input_x_gradient":
            attr = InputXGradient(forward).attribute(items, target=target, additional_forward_args=(pad,))
        else:
            if not isinstance(n_steps, int) or n_steps < 2:
                raise ValueError(f"n_steps must be an int >= 2, got {n_steps!r}")
            attr = IntegratedGradients(forward).attribute(items, baselines=torch.zeros_like(items), target=target,
                                                          additional_forward_args=(pad,), n_steps=n_steps)  # fmt: skip
        scores = attr.sum(-1).detach()
    return scores.float().masked_fill(pad, 0.0)


def pad_histories(histories: Sequence[Sequence[int]], *, n_items: int, max_len: int) -> Tensor:
    """Left-pad (and left-truncate to ``max_len``) item histories into ``[batch, time]`` with pad id ``n_items``."""
    if len(histories) == 0:
        raise ValueError("no histories given")
    rows = []
    for h in histories:
        h = [int(i) for i in h][-max_len:]
        if not h:
            raise ValueError("empty history: a sequential recommender needs at least one past item; "
                             "use the popularity baseline for new users")  # fmt: skip
        if min(h) < 0 or max(h) >= n_items:
            raise ValueError(f"unknown item id in history {h}: items are 0..{n_items - 1}")
        rows.append(h)
    width = max(len(r) for r in rows)
    return torch.tensor([[n_items] * (width - len(r)) + r for r in rows])


@torch.no_grad()
def next_item_scores(model: SequentialRecommender, histories: Sequence[Sequence[int]], *, exclude_seen: bool = True,
                     batch_size: int = 512) -> Tensor:  # fmt: skip
    """Scores ``[batch, items]`` for each history's next item; items already in the history get ``-inf``."""
    model.eval()
    out = []
    for s in range(0, len(histories), batch_size):
        chunk = histories[s : s + batch_size]
        seq = pad_histories(chunk, n_items=model.n_items, max_len=model.max_len)
        scores = model(seq)[:, -1]
        if exclude_seen:
            scores[seen_mask(chunk, model.n_items)] = float("-inf")
        out.append(scores)
    return torch.cat(out)


def seen_mask(histories: Sequence[Sequence[int]], n_items: int) -> Tensor:
    """``[batch, items]`` bool, True where the item occurs in the history."""
    mask = torch.zeros(len(histories), n_items, dtype=torch.bool)
    for r, h in enumerate(histories):
        mask[r, torch.as_tensor(list(h), dtype=torch.long)] = True
    return mask


@dataclasses.dataclass(frozen=True)
class RecRecipe(zoo.Recipe):
    """Training settings of a :class:`SequentialRecommender` (its hash, with the shop's, names the cache file)."""

    dim: int = 64
    n_blocks: int = 2
    n_heads: int = 1
    dropout: float = 0.2
    n_prototypes: int = 0
    tau: float = 0.1
    epochs: int = 20
    finetune_epochs: int = 4  # after the push (prototypes and item embeddings frozen)
    batch_size: int = 128
    lr: float = 2e-3
    clst: float = 0.1  # pull h_t towards its nearest prototype
    align: float = 0.1  # pull each prototype towards its nearest item embedding
    seed: int = 0
    version: int = 1


def _rec_loss(model: SequentialRecommender, seq: Tensor, recipe: RecRecipe) -> Tensor:
    inputs, targets = seq[:, :-1], seq[:, 1:]
    hidden = model.encode(inputs)  # [batch, time, dim]
    loss = F.cross_entropy(model.scores_from_hidden(hidden).flatten(0, 1), targets.flatten())
    if model.n_prototypes and model.prototype_items is None:
        cos_hp = F.normalize(hidden, dim=-1) @ F.normalize(model.prototypes, dim=-1).T  # [batch, time, K]
        cos_pe = F.normalize(model.prototypes, dim=-1) @ F.normalize(model.item_embeddings(), dim=-1).T  # [K, items]
        loss = loss + recipe.clst * (1 - cos_hp.max(-1).values).mean()
        loss = loss + recipe.align * (1 - cos_pe.max(-1).values).mean()
    return loss


def train_recommender(item_features: Tensor, train_sequences: np.ndarray, recipe: RecRecipe = RecRecipe(),
                      *, progress: bool = False) -> tuple[SequentialRecommender, dict]:  # fmt: skip
    """Train a :class:`SequentialRecommender` on next-item prediction over the training sequences.

    Every position predicts the next item (softmax cross-entropy over all items). With prototypes:
    ``recipe.epochs`` epochs with the cluster/alignment terms, then the push
    (:meth:`SequentialRecommender.project_prototypes`), then ``recipe.finetune_epochs`` epochs of the
    encoder and item biases with prototypes and item embeddings frozen (so they stay real items).

    Returns:
        ``(model in eval mode, history)`` with per-epoch ``"loss"`` and, with prototypes,
        ``"state_before_push"``.
    """
    seqs = torch.as_tensor(np.asarray(train_sequences)).long()
    if seqs.ndim != 2 or seqs.shape[1] < 2:
        raise ValueError(f"train_sequences must be [users, time >= 2], got shape {tuple(seqs.shape)}")
    from tqdm.auto import tqdm

    common.set_seed(recipe.seed)
    # inputs are sequences[:, :-1]: their length is the longest history the model sees
    model = SequentialRecommender(item_features, dim=recipe.dim, max_len=seqs.shape[1] - 1, n_blocks=recipe.n_blocks,
                                  n_heads=recipe.n_heads, dropout=recipe.dropout, n_prototypes=recipe.n_prototypes,
                                  tau=recipe.tau)  # fmt: skip
    if int(seqs.max()) >= model.n_items:
        raise ValueError(f"item id {int(seqs.max())} in the sequences but only {model.n_items} item features")
    generator = torch.Generator().manual_seed(recipe.seed)
    history: dict = {"loss": []}

    def run(params, epochs, desc):
        optimiser = torch.optim.Adam(params, lr=recipe.lr)
        for _ in tqdm(range(epochs), desc=desc, disable=not progress):
            model.train()
            order = torch.randperm(len(seqs), generator=generator)
            total = 0.0
            for i in range(0, len(order), recipe.batch_size):
                loss = _rec_loss(model, seqs[order[i : i + recipe.batch_size]], recipe)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item()
            history["loss"].append(total / math.ceil(len(order) / recipe.batch_size))

    run(list(model.parameters()), recipe.epochs, "training")
    if recipe.n_prototypes:
        history["state_before_push"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.project_prototypes()
        frozen = {"prototypes", "free.weight", "feature_map.weight"}
        run([p for n, p in model.named_parameters() if n not in frozen], recipe.finetune_epochs, "fine-tuning")
    return model.eval(), history


# ---------------------------------------------------------------------------------------------
# Ranking metrics
# ---------------------------------------------------------------------------------------------


def target_rank(scores: Tensor, targets: Tensor) -> Tensor:
    """0-based rank of each target among its row's scores (ties counted against the target): ``[batch]``."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    targets = torch.as_tensor(targets).long()
    if scores.ndim != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(
            f"need scores [batch, items] and targets [batch], got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    if ((targets < 0) | (targets >= scores.shape[1])).any():
        raise ValueError(f"target item ids must be in 0..{scores.shape[1] - 1}")
    target_score = scores.gather(1, targets[:, None])
    if torch.isinf(target_score).any() and (target_score < 0).any():
        raise ValueError("a target item has score -inf (was it excluded as already seen?)")
    better = (scores > target_score).sum(1)
    ties = (scores == target_score).sum(1) - 1
    return better + ties


def hit_rate_ndcg(scores: Tensor, targets: Tensor, *, k: int = 10) -> tuple[float, float]:
    """HitRate@k and NDCG@k of one held-out item per row (Kang & McAuley 2018, §4.2).

    ``HR@k = mean 1[rank < k]``; ``NDCG@k = mean 1[rank < k] / log2(rank + 2)`` with 0-based ranks
    (one relevant item, so the ideal DCG is 1).

    >>> scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.1]])
    >>> hit_rate_ndcg(scores, torch.tensor([2, 0]), k=1)
    (0.0, 0.0)
    >>> hr, ndcg = hit_rate_ndcg(scores, torch.tensor([2, 0]), k=2)
    >>> hr, round(ndcg, 4)
    (1.0, 0.6309)
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rank = target_rank(scores, targets)
    hit = (rank < k).double()
    return float(hit.mean()), float((hit / torch.log2(rank.double() + 2)).mean())


def sampled_scores(
    scores: Tensor, targets: Tensor, seen: Tensor, *, n_negatives: int = 100, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """SASRec's evaluation protocol: rank each target among ``n_negatives`` random unseen items.

    Returns ``(scores [batch, 1 + n_negatives], targets [batch] = 0)``: column 0 is the target.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(len(scores)):
        allowed = ~seen[r]
        allowed[targets[r]] = False
        pool = allowed.nonzero().flatten()
        if len(pool) < n_negatives:
            raise ValueError(f"row {r} has only {len(pool)} unseen items for {n_negatives} negatives")
        rows.append(torch.cat([targets[r : r + 1], pool[torch.randperm(len(pool), generator=gen)[:n_negatives]]]))
    idx = torch.stack(rows)
    return scores.gather(1, idx), torch.zeros(len(scores), dtype=torch.long)


def popularity_scores(train_sequences: np.ndarray, n_items: int) -> Tensor:
    """``[items]`` interaction counts in the training sequences (the popularity baseline's scores)."""
    return torch.as_tensor(np.bincount(np.asarray(train_sequences).ravel(), minlength=n_items)).double()


def full_ranks(scores: Tensor, histories: Sequence[Sequence[int]], targets) -> Tensor:
    """0-based rank ``[batch]`` of each target among the items its history has not seen (full catalogue).

    ``HR@k`` is ``(rank < k).mean()`` and ``NDCG@k`` is ``((rank < k) / log2(rank + 2)).mean()``
    (:func:`hit_rate_ndcg`), so per-user ranks are all a paired comparison needs.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).clone()
    if scores.ndim != 2 or len(histories) != len(scores):
        raise ValueError(f"need scores [batch, items] and one history per row, got {tuple(scores.shape)} "
                         f"and {len(histories)} histories")  # fmt: skip
    scores[seen_mask(histories, scores.shape[1])] = float("-inf")
    return target_rank(scores, torch.as_tensor(np.asarray(targets)))


# ---------------------------------------------------------------------------------------------
# Checking the recommender's explanations: baselines, deletion, a shop whose tastes are not classes
# ---------------------------------------------------------------------------------------------


def most_bought_classes(sequences: np.ndarray, item_class: np.ndarray, *, k: int = 3) -> np.ndarray:
    """The trivial explanation "you buy these classes": each user's ``k`` most bought classes, ``[U, k]``.

    Args:
        sequences: ``[U, T]`` item ids; item_class: ``[I]`` class of each item.
        k: classes per user (1 <= k <= number of classes).

    Returns:
        ``[U, k]`` class ids, most bought first; equal counts go to the more recently bought class,
        then to the lower class id (classes never bought come last).

    >>> most_bought_classes(np.array([[0, 1, 2, 3]]), np.array([5, 5, 7, 2]), k=2).tolist()
    [[5, 2]]
    """
    seqs, item_class = np.asarray(sequences), np.asarray(item_class)
    if seqs.ndim != 2 or seqs.size == 0 or seqs.dtype.kind not in "iu":
        raise ValueError(f"sequences must be non-empty int [users, time], got {seqs.dtype} {seqs.shape}")
    if item_class.ndim != 1 or seqs.min() < 0 or seqs.max() >= len(item_class):
        raise ValueError(f"item ids must index item_class [items] = ({len(item_class)},)")
    n_classes = int(item_class.max()) + 1
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n_classes:
        raise ValueError(f"k must be an int in 1..{n_classes} (the number of classes), got {k!r}")
    cls = item_class[seqs]  # [U, T]
    users, steps = np.arange(len(cls))[:, None], cls.shape[1]
    counts = np.zeros((len(cls), n_classes))
    np.add.at(counts, (users, cls), 1.0)
    last = np.full((len(cls), n_classes), -1.0)
    np.maximum.at(last, (users, cls), np.broadcast_to(np.arange(steps, dtype=float), cls.shape))
    return np.argsort(-(counts + (last + 1) / (steps + 1)), axis=1, kind="stable")[:, :k]


def liked_share(classes: np.ndarray, liked: np.ndarray) -> np.ndarray:
    """Per user, the share of the explanation's classes ``[U, k]`` that the user really likes: ``[U]``.

    ``liked`` is the shop's ``[U, n_classes]`` bool ground truth; a class named twice counts twice.

    >>> liked_share(np.array([[0, 1, 1]]), np.array([[True, False]])).round(3).tolist()
    [0.333]
    """
    classes, liked = np.asarray(classes), np.asarray(liked, dtype=bool)
    if classes.ndim != 2 or liked.ndim != 2 or len(classes) != len(liked):
        raise ValueError(f"need classes [U, k] and liked [U, n_classes] for the same users, got "
                         f"{classes.shape} and {liked.shape}")  # fmt: skip
    if classes.min() < 0 or classes.max() >= liked.shape[1]:
        raise ValueError(f"class ids must be in 0..{liked.shape[1] - 1}")
    return liked[np.arange(len(liked))[:, None], classes].mean(1)


def attribute_profile(weights, ids, table) -> np.ndarray:
    """An explanation's attribute profile: the ``weights``-weighted mean of ``table`` rows, ``[U, d]``.

    Args:
        weights: ``[U, n]`` non-negative weights, e.g. prototype activations ``a_k`` (or ones for a plain mean).
        ids: ``[n]`` (shared by all users, e.g. the prototypes' items) or ``[U, n]`` (e.g. each history)
            row ids into ``table``.
        table: ``[rows, d]`` attributes, e.g. the shop's ``item_attrs`` or per-class mean attributes.

    Returns:
        ``[U, d]``; each row's weights are normalised to sum to 1.

    >>> attribute_profile(np.array([[3.0, 1.0]]), np.array([0, 1]), np.array([[1.0, 0.0], [0.0, 4.0]])).tolist()
    [[0.75, 1.0]]
    """
    w = np.asarray(weights, dtype=np.float64)
    ids, table = np.asarray(ids), np.asarray(table, dtype=np.float64)
    if w.ndim != 2 or table.ndim != 2 or ids.shape not in ((w.shape[1],), w.shape):
        raise ValueError(f"need weights [U, n], ids [n] or [U, n] and table [rows, d], got {w.shape}, "
                         f"{ids.shape} and {table.shape}")  # fmt: skip
    if (w < 0).any() or (w.sum(1) <= 0).any():
        raise ValueError("weights must be non-negative with a positive sum in every row")
    if ids.min() < 0 or ids.max() >= len(table):
        raise ValueError(f"ids must index the table's {len(table)} rows")
    rows = table[ids]  # [n, d] or [U, n, d]
    w = w / w.sum(1, keepdims=True)
    return w @ rows if rows.ndim == 2 else np.einsum("un,und->ud", w, rows)


def taste_recovery(taste, profile, *, baseline=None, n_resamples: int = 2000, seed: int = 0):
    """Does an explanation rank users by their true taste? Mean over attributes of Spearman across users.

    The statistic is ``mean_a spearman(taste[:, a], profile[:, a])`` (:func:`helpers.stats.spearman`),
    with a bootstrap interval over users (:func:`helpers.stats.bootstrap_ci`); with ``baseline``
    (another explanation's ``[U, d]`` profile) it is the paired difference profile − baseline, users
    resampled jointly (:func:`helpers.stats.paired_difference`, which also gives ``p``).

    Args:
        taste: ``[U, d]`` true attribute weights ``w_u``; profile, baseline: ``[U, d]`` explanation profiles.
        n_resamples, seed: of the bootstrap.

    Returns:
        a :class:`helpers.stats.Estimate`.
    """
    from helpers import stats

    t, p = np.asarray(taste, dtype=np.float64), np.asarray(profile, dtype=np.float64)
    b = None if baseline is None else np.asarray(baseline, dtype=np.float64)
    if t.ndim != 2 or p.shape != t.shape or (b is not None and b.shape != t.shape) or len(t) < 3:
        raise ValueError(f"taste, profile (and baseline) must be [U >= 3, d] of one shape, got {t.shape}, "
                         f"{p.shape}" + ("" if b is None else f" and {b.shape}"))  # fmt: skip
    for label, x in (("taste", t), ("profile", p), ("baseline", b)):
        if x is not None and (x == x[:1]).all(0).any():
            raise ValueError(f"{label} has a constant attribute (column {int((x == x[:1]).all(0).argmax())}): "
                             "its rank correlation is undefined; drop that attribute")  # fmt: skip
    n = len(t)
    sources = (p, p if b is None else b)

    def mean_rho(x) -> float:  # x: resampled user ids; ids >= n stand for the baseline's copy of the users
        idx = np.asarray(x).astype(np.int64)
        src, idx = (sources[1], idx - n) if idx.min() >= n else (sources[0], idx)
        return float(np.mean([stats.spearman(t[idx, a], src[idx, a]) for a in range(t.shape[1])]))

    users = np.arange(n)
    if b is None:
        return stats.bootstrap_ci(users, statistic=mean_rho, n_resamples=n_resamples, seed=seed)
    return stats.paired_difference(users, users + n, statistic=mean_rho, n_resamples=n_resamples, seed=seed)


def deletion_mask(activations: Tensor, n_removed: int, order: str, *, seed: int = 0) -> Tensor:
    """Which prototypes a deletion test removes for each user: ``[U, K]`` bool, ``n_removed`` per row.

    ``order``: ``"top"`` the ``n_removed`` most activated (the explanation shown to the user),
    ``"bottom"`` the least activated, ``"random"`` a uniform draw per user (from ``seed``).

    >>> deletion_mask(torch.tensor([[0.1, 0.6, 0.3]]), 1, "top").tolist()
    [[False, True, False]]
    """
    act = torch.as_tensor(activations, dtype=torch.float64)
    if act.ndim != 2:
        raise ValueError(f"activations must be [users, K], got shape {tuple(act.shape)}")
    if not isinstance(n_removed, (int, np.integer)) or not 1 <= n_removed < act.shape[1]:
        raise ValueError(f"n_removed must be an int in 1..K-1 = 1..{act.shape[1] - 1}, got {n_removed!r}")
    if order == "top":
        chosen = act.topk(n_removed, dim=1).indices
    elif order == "bottom":
        chosen = (-act).topk(n_removed, dim=1).indices
    elif order == "random":
        chosen = torch.rand(act.shape, generator=torch.Generator().manual_seed(seed)).argsort(1)[:, :n_removed]
    else:
        raise ValueError(f"order must be 'top', 'bottom' or 'random', got {order!r}")
    return torch.zeros(act.shape, dtype=torch.bool).scatter_(1, chosen, True)


def prototype_scores(logits: Tensor, kernel: Tensor, *, removed: Tensor | None = None, scale: float | Tensor = 1.0,
                     bias: Tensor | None = None) -> Tensor:  # fmt: skip
    """The prototype layer's item scores, optionally with some prototypes removed: ``[U, items]``.

    ``s_i = scale · Σ_k softmax_k(logits)[k] · kernel[k, i] + bias_i``, where ``logits [U, K]`` are
    ``cos(h, p_k) / tau`` and ``kernel [K, items]`` is ``cos(p_k, e_i)``
    (:meth:`SequentialRecommender.scores_from_hidden`). Removed prototypes (``removed [U, K]`` bool,
    at least one kept per row) leave the softmax, so the kept activations are renormalised.

    >>> prototype_scores(torch.zeros(1, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]])).tolist()
    [[0.5, 0.5]]
    >>> prototype_scores(torch.zeros(1, 2), torch.eye(2), removed=torch.tensor([[True, False]])).tolist()
    [[0.0, 1.0]]
    """
    logits, kernel = torch.as_tensor(logits), torch.as_tensor(kernel)
    if logits.ndim != 2 or kernel.ndim != 2 or logits.shape[1] != kernel.shape[0]:
        raise ValueError(f"need logits [U, K] and kernel [K, items], got {tuple(logits.shape)} and "
                         f"{tuple(kernel.shape)}")  # fmt: skip
    if removed is not None:
        removed = torch.as_tensor(removed, dtype=torch.bool)
        if removed.shape != logits.shape or removed.all(1).any():
            raise ValueError(f"removed must be bool {tuple(logits.shape)} and keep at least one prototype per row")
        logits = logits.masked_fill(removed, float("-inf"))
    scores = scale * logits.softmax(1) @ kernel
    return scores if bias is None else scores + bias


@torch.no_grad()
def prototype_deletion(model: SequentialRecommender, histories: Sequence[Sequence[int]], *, n_removed: int = 3,
                       order: str = "top", seed: int = 0) -> dict[str, Tensor]:  # fmt: skip
    """Deletion test of the prototype explanation, per user: remove prototypes, follow the top recommendation.

    For each history, ``i*`` is the model's top recommendation (highest-scored unseen item). The
    prototypes chosen by :func:`deletion_mask` (``order`` = ``"top"``: the explanation; ``"random"``;
    ``"bottom"``) are removed from the layer (:func:`prototype_scores`) and ``i*`` is ranked again. A
    faithful explanation is one whose removal moves ``i*`` further than removing random prototypes.

    Returns:
        a dict of ``[U]`` tensors: ``"item"``, the top recommendation ``i*``; ``"rank"``, its 0-based
        rank among the unseen items after the removal (0 = still first); ``"drop"``, its score before
        minus after.
    """
    if not model.n_prototypes:
        raise ValueError("the deletion test needs a recommender with a prototype layer (n_prototypes > 0)")
    model.eval()
    seq = pad_histories(histories, n_items=model.n_items, max_len=model.max_len)
    hidden = model.encode(seq)[:, -1]
    unit_p = F.normalize(model.prototypes, dim=-1)
    logits = F.normalize(hidden, dim=-1) @ unit_p.T / model.tau  # [U, K]
    kernel = unit_p @ F.normalize(model.item_embeddings(), dim=-1).T  # [K, items]
    seen = seen_mask(histories, model.n_items)
    full = prototype_scores(logits, kernel, scale=model.scale, bias=model.bias).masked_fill(seen, float("-inf"))
    item = full.argmax(1)
    removed = deletion_mask(logits.softmax(1), n_removed, order, seed=seed)
    after = prototype_scores(logits, kernel, removed=removed, scale=model.scale, bias=model.bias)
    after = after.masked_fill(seen, float("-inf"))
    rows = torch.arange(len(item))
    return {"item": item, "rank": target_rank(after, item), "drop": (full[rows, item] - after[rows, item]).float()}


REC_STUDY = {
    "grid": {"n_prototypes": [20, 40, 80], "tau": [0.1, 0.3]},  # stage 1, with the default (clst, align)
    "weights": [[0.1, 0.1], [0.0, 0.0]],  # stage 2: (clst, align) at the chosen (K, tau)
    "select_on": "NDCG@10",  # on the validation item
    "seeds": [0, 1, 2],
    "k": 10,
    "n_negatives": 100,
    "n_explain": 3,  # prototypes / classes shown to a user
    "n_removed": [1, 3],
    "recipe": {},  # RecRecipe fields shared by every model (none: the chapter's defaults)
    "version": 2,
}
"""Chapter 9's recommender study (:func:`recommender_study`): the grid, the selection and the seeds."""


def _ndcg_vector(rank: Tensor, k: int) -> np.ndarray:
    hit = (rank < k).double()
    return (hit / torch.log2(rank.double() + 2)).numpy()


def recommender_study(shops: dict, item_features: dict, *, vit_key: str, protocol: dict = REC_STUDY) -> dict:
    """Chapter 9's recommender study on each shop: selection on validation, seeds, explanations, deletion.

    For each shop (SASRec's split, :func:`helpers.data.split_train_valid_test`): the prototype model's ``(K, tau)``
    grid, then its ``(clst, align)`` weights, are chosen on the validation item's NDCG@k
    (:func:`helpers.stats.select_then_report`, seed 0); the plain model and the chosen prototype model
    are then trained with every seed and evaluated on the test item from the history including the
    validation item. Models come from :func:`cached_recommender` (full-softmax cross-entropy).

    Args:
        shops: ``{name: helpers.data.Shop}``; item_features: ``{name: [items, features]}`` for each shop.
        vit_key: the ViT's recipe key (names the cached models).
        protocol: :data:`REC_STUDY`.

    Returns:
        ``{"protocol", "shops": {name: {...}}}``; per shop (``S`` seeds, ``U`` users, ``d`` attributes):
        ``"selection"`` (rows of the validation table), ``"chosen"`` (the recipe fields), test ranks
        ``"plain_rank"``, ``"proto_rank"`` ``[S, U]`` over the full catalogue and ``"plain_sampled_rank"``,
        ``"proto_sampled_rank"`` among ``n_negatives`` sampled ones, ``"popularity_rank"``, ``"oracle_rank"``
        ``[U]``; the ground truth ``"taste"`` ``[U, d]``, ``"liked"`` ``[U, C]``; explanations
        ``"proto_classes"`` ``[S, U, n_explain]`` (classes of the most activated prototypes),
        ``"bought_classes"`` ``[U, n_explain]`` (:func:`most_bought_classes`), ``"history_liked"`` ``[U]``
        (share of the purchases in a liked class), ``"chance_liked"`` ``[S, U]``
        (share of all prototypes in a liked class), profiles ``"proto_profile"`` ``[S, U, d]``,
        ``"history_profile"``, ``"class_profile"`` ``[U, d]`` (:func:`attribute_profile`);
        ``"deletion"`` ``{f"{order}{n}": {"rank", "drop": [S, U]}}`` (:func:`prototype_deletion`); and
        ``"taste_recovery"``: :func:`taste_recovery` of seed 0's prototypes, the history, the classes and
        the two differences, plus the prototypes' value over seeds, each ``Estimate.as_dict()``.
    """
    from helpers import stats

    k, n_explain = protocol["k"], protocol["n_explain"]
    out: dict = {"protocol": protocol, "shops": {}}
    for name, shop in shops.items():
        feats = torch.as_tensor(item_features[name])
        train, valid, test = data.split_train_valid_test(shop.sequences)
        hist_valid = [list(map(int, h)) for h in train]
        hist_test = [list(map(int, h)) for h in np.c_[train, valid]]
        n_users, n_items = len(train), shop.config.n_items

        def fit(recipe, shop=shop, feats=feats, train=train):
            return cached_recommender(feats, train, recipe, shop_config=shop.config, vit_key=vit_key)[0]

        def test_rank(model, hist_test=hist_test, test=test):
            return full_ranks(next_item_scores(model, hist_test, exclude_seen=False), hist_test, test)

        rows, valid_ndcg = [], {}

        def option(recipe, stage, hist_valid=hist_valid, valid=valid, rows=rows, valid_ndcg=valid_ndcg):
            rank = full_ranks(next_item_scores(fit(recipe), hist_valid, exclude_seen=False), hist_valid, valid)
            valid_ndcg[recipe] = _ndcg_vector(rank, k)
            rows.append({"stage": stage, "n_prototypes": recipe.n_prototypes, "tau": recipe.tau,
                         "clst": recipe.clst, "align": recipe.align, f"valid HR@{k}": float((rank < k).double().mean()),
                         f"valid NDCG@{k}": float(valid_ndcg[recipe].mean())})  # fmt: skip

        plain = RecRecipe(**protocol["recipe"])
        option(plain, "plain")
        grid = [dataclasses.replace(plain, n_prototypes=K, tau=tau) for K in protocol["grid"]["n_prototypes"]
                for tau in protocol["grid"]["tau"]]  # fmt: skip
        for recipe in grid:
            option(recipe, "K x tau")
        best = stats.select_then_report({r: valid_ndcg[r] for r in grid},
                                        lambda r: _ndcg_vector(test_rank(fit(r)), k)).key  # fmt: skip
        stage2 = [dataclasses.replace(best, clst=c, align=a) for c, a in protocol["weights"]]
        for recipe in stage2:
            if recipe not in valid_ndcg:
                option(recipe, "weights")
        chosen = stats.select_then_report({r: valid_ndcg[r] for r in stage2},
                                          lambda r: _ndcg_vector(test_rank(fit(r)), k)).key  # fmt: skip

        hist_arr = np.c_[train, valid]
        seen = seen_mask(hist_test, n_items)
        targets = torch.as_tensor(test)
        pop = popularity_scores(hist_arr, n_items).expand(n_users, -1)
        oracle = torch.as_tensor(shop.utility(np.arange(n_users), previous=valid))
        class_means = np.stack([shop.item_attrs[shop.item_class == c].mean(0) for c in range(shop.liked.shape[1])])
        bought = most_bought_classes(hist_arr, shop.item_class, k=n_explain)
        res = {"selection": rows, "chosen": dataclasses.asdict(chosen),
               "popularity_rank": full_ranks(pop, hist_test, test), "oracle_rank": full_ranks(oracle, hist_test, test),
               "taste": torch.as_tensor(shop.taste, dtype=torch.float32), "liked": torch.as_tensor(shop.liked),
               "bought_classes": torch.as_tensor(bought),
               "history_liked": torch.as_tensor(liked_share(shop.item_class[hist_arr], shop.liked),
                                                dtype=torch.float32),
               "history_profile": torch.as_tensor(attribute_profile(np.ones(hist_arr.shape), hist_arr, shop.item_attrs),
                                                  dtype=torch.float32),
               "class_profile": torch.as_tensor(attribute_profile(np.ones(bought.shape), bought, class_means),
                                                dtype=torch.float32)}  # fmt: skip
        per_seed: dict = {}
        for seed in protocol["seeds"]:
            models = {"plain": fit(dataclasses.replace(plain, seed=seed)),
                      "proto": fit(dataclasses.replace(chosen, seed=seed))}  # fmt: skip
            for tag, model in models.items():
                scores = next_item_scores(model, hist_test, exclude_seen=False).double()
                per_seed.setdefault(f"{tag}_rank", []).append(full_ranks(scores, hist_test, test))
                sub, zero = sampled_scores(scores.masked_fill(seen, float("-inf")), targets, seen,
                                           n_negatives=protocol["n_negatives"], seed=0)  # fmt: skip
                per_seed.setdefault(f"{tag}_sampled_rank", []).append(target_rank(sub, zero))
            proto = models["proto"]
            with torch.no_grad():
                seq = pad_histories(hist_test, n_items=n_items, max_len=proto.max_len)
                act = proto.activations(proto.encode(seq)[:, -1])  # [U, K]
            items = proto.prototype_items.numpy()
            proto_class = shop.item_class[items]  # [K]
            top = act.topk(n_explain, 1).indices.numpy()  # [U, n_explain] most activated prototypes
            per_seed.setdefault("proto_classes", []).append(torch.as_tensor(proto_class[top]))
            per_seed.setdefault("chance_liked", []).append(torch.as_tensor(shop.liked[:, proto_class].mean(1)))
            profile = attribute_profile(act.numpy(), items, shop.item_attrs)  # [U, d] activation-weighted
            per_seed.setdefault("proto_profile", []).append(torch.as_tensor(profile, dtype=torch.float32))
            per_seed.setdefault("prototype_items", []).append(proto.prototype_items.clone())
            for n in protocol["n_removed"]:
                for order in ("top", "random", "bottom"):
                    d = prototype_deletion(proto, hist_test, n_removed=n, order=order, seed=seed)
                    per_seed.setdefault(f"deletion/{order}{n}/rank", []).append(d["rank"])
                    per_seed.setdefault(f"deletion/{order}{n}/drop", []).append(d["drop"])
        deletion: dict = {}
        for key, values in per_seed.items():
            stacked = torch.stack([torch.as_tensor(v) for v in values])
            compact = {torch.int64: torch.int32, torch.float64: torch.float32}  # halves the artefact
            stacked = stacked.to(compact.get(stacked.dtype, stacked.dtype))
            if key.startswith("deletion/"):
                _, cond, field = key.split("/")
                deletion.setdefault(cond, {})[field] = stacked
            else:
                res[key] = stacked
        res["deletion"] = deletion
        # taste recovery (seed 0's explanations against the history and the class explanation), computed here
        # because each bootstrap of a rank correlation takes seconds
        taste, proto_profile = res["taste"].numpy(), res["proto_profile"].numpy()
        history, classes = res["history_profile"].numpy(), res["class_profile"].numpy()
        recovery = {"prototypes": taste_recovery(taste, proto_profile[0]), "history": taste_recovery(taste, history),
                    "classes": taste_recovery(taste, classes),
                    "prototypes - history": taste_recovery(taste, proto_profile[0], baseline=history),
                    "prototypes - classes": taste_recovery(taste, proto_profile[0], baseline=classes),
                    "prototypes over seeds": stats.over_seeds(
                        [np.mean([stats.spearman(taste[:, a], p[:, a]) for a in range(taste.shape[1])])
                         for p in proto_profile])}  # fmt: skip
        res["taste_recovery"] = {key: e.as_dict() for key, e in recovery.items()}
        out["shops"][name] = res
    return out


def recommender_results(shops: dict, item_features: dict, *, vit_key: str, protocol: dict = REC_STUDY) -> dict:
    """:func:`recommender_study`'s results, committed with the book (verified by SHA-256) and rebuilt when
    missing or altered; the file is named by a hash of the protocol, the shops' configurations and the ViT.

    Rebuilding trains 12 models per shop (about 9 CPU-minutes for both shops on one thread, then about a
    minute of evaluation); the models themselves stay in the cache (:func:`cached_recommender`).
    """
    key = {"protocol": protocol, "shops": {name: shop.config.as_key() for name, shop in shops.items()},
           "vit": vit_key}  # fmt: skip

    def build(path) -> None:
        with common.torch_threads(common.free_cores()):
            torch.save(recommender_study(shops, item_features, vit_key=vit_key, protocol=protocol), path)

    path = common.cached_file(common.cache_dir("results", "ch9") / f"recommender-{common.content_hash(key)}.pt",
                              build, committed=True)  # fmt: skip
    return torch.load(path, weights_only=True)
