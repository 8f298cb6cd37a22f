"""More universal representations for transfer: specialist, generalist and MuCaLe features (chapter 13).

Tamaazousti, Le Borgne & Hudelot (CVPR 2017) train a *specialist* network on fine categories and a
*generalist* network on coarser categories of the same images, and concatenate their features
(MuCaLe-Net): the two granularities see different things, so the concatenation serves more target
problems than either. This module holds the chapter's reusable parts:

- the source problem: Fashion-MNIST at two granularities (:data:`COARSE_GROUPS`), with some fine
  classes (:data:`HELD_OUT`) kept out of source training so that they can serve as a target, and a third,
  finer one: appearance clusters within each class (:func:`finer_labels`);
- :class:`SourceNet`, the book's ViT trunk with one or two classification heads, trained by a
  fixed-seed :class:`SourceRecipe` that also holds the coarse grouping (:data:`RECIPES`: specialist,
  generalist, multi-task, budget controls and seed replicates, :data:`SEED_REPLICATES`); weights are
  committed under ``helpers/weights/models/transfer/`` (:mod:`helpers.zoo`; rebuilt by ``make refresh-artefacts``);
- transfer targets (:func:`transfer_targets`), frozen features (:func:`features`), the raw-pixel
  baseline (:func:`pixel_features`), a linear probe (:func:`linear_probe`) whose ``C`` is chosen by
  cross-validation on training data (:func:`select_probe_C`, committed as :func:`chosen_probe_C`) and
  fine-tuning (:func:`fine_tune`);
- the universality metric (:func:`nrg`, :func:`mnrg`) and a per-dimension purity score
  (:func:`dimension_purity`).

Tensors: images are ``[batch, 1, 28, 28]`` normalised as in :mod:`helpers.data`; features are
``[item, dim]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helpers import assets, common, data, zoo

CLASSES = assets.FASHION_CLASSES
COARSE_GROUPS: dict[str, tuple[str, ...]] = {
    "tops": ("T-shirt/top", "Pullover", "Dress", "Coat", "Shirt"),
    "bottoms": ("Trouser",),
    "footwear": ("Sandal", "Sneaker", "Ankle boot"),
    "bags": ("Bag",),
}
"""The coarse granularity: four groups of the ten Fashion-MNIST classes (upper-body and one-piece
garments, leg garments, footwear, bags). WordNet agrees on footwear (``footwear.n.02``), bags
(``container.n.01``) and garments (``garment.n.01``); the split of garments into tops and bottoms
follows the WordNet glosses ("worn on the upper half of the body"); see :data:`WORDNET_SYNSETS`."""

WORDNET_SYNSETS = assets.FASHION_SYNSETS
"""The WordNet 3.0 noun sense of each class name (:data:`helpers.assets.FASHION_SYNSETS`)."""

HELD_OUT: tuple[str, ...] = ("Pullover", "Shirt", "Sandal")
"""Fine classes kept out of every source network's training: the "held-out classes" target."""

SOURCE_POOL = 50_000
"""Source networks train on the first images of the training split below this index; targets draw
their training images from the rest (indices 50,000-59,999), so source and target never share an image."""


# ---------------------------------------------------------------------------------------------
# Granularities
# ---------------------------------------------------------------------------------------------


def class_indices(names: Sequence[str]) -> list[int]:
    """Fashion-MNIST label of each class name; a clear error for a name that is not a class.

    >>> class_indices(["Trouser", "Bag"])
    [1, 8]
    """
    if isinstance(names, str):
        raise ValueError(f"names must be a sequence of class names, got the string {names!r}; wrap it in a list")
    unknown = [n for n in names if n not in CLASSES]
    if unknown:
        raise ValueError(f"unknown class name(s) {unknown}; Fashion-MNIST classes are {list(CLASSES)}")
    return [CLASSES.index(n) for n in names]


def coarse_mapping(groups: Mapping[str, Sequence[str]] | None = None) -> tuple[list[str], list[int]]:
    """Map every fine class to a coarse group.

    Args:
        groups: coarse name -> fine class names; together they must cover each of the 10 classes once
            (default: :data:`COARSE_GROUPS`, read at call time).

    Returns:
        ``(group names, group index of each fine label [10])``.

    >>> names, of_class = coarse_mapping()
    >>> names, of_class
    (['tops', 'bottoms', 'footwear', 'bags'], [0, 1, 0, 0, 0, 2, 0, 2, 3, 2])
    """
    groups = COARSE_GROUPS if groups is None else groups
    if not groups:
        raise ValueError("groups is empty; give coarse name -> fine class names covering all 10 classes")
    of_class = [-1] * len(CLASSES)
    for g, members in enumerate(groups.values()):
        for label in class_indices(list(members)):
            if of_class[label] != -1:
                raise ValueError(f"class {CLASSES[label]!r} is in two coarse groups; each class belongs to one")
            of_class[label] = g
    missing = [CLASSES[i] for i, g in enumerate(of_class) if g == -1]
    if missing:
        raise ValueError(f"coarse groups leave out {missing}; every fine class needs a coarse group")
    return list(groups), of_class


Grouping = tuple[tuple[str, tuple[str, ...]], ...]
"""A coarse grouping frozen into a recipe: ``((group name, (fine class names, ...)), ...)``."""


def freeze_groups(groups: Mapping[str, Sequence[str]] | Sequence) -> Grouping:
    """A coarse grouping as nested tuples (hashable, part of a :class:`SourceRecipe`), validated.

    Args:
        groups: coarse name -> fine class names (a dict), or the same as ``(name, members)`` pairs.

    >>> freeze_groups({"a": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"],
    ...                "b": ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]})[1][0]
    'b'
    """
    if isinstance(groups, Mapping):
        pairs = list(groups.items())
    else:
        try:
            pairs = [(name, members) for name, members in groups]
        except (TypeError, ValueError):
            raise ValueError(f"groups must be a dict coarse name -> fine class names, got {groups!r}") from None
    if any(isinstance(m, str) for _, m in pairs):
        raise ValueError("each group's members must be a sequence of class names, not one string")
    frozen = tuple((str(name), tuple(members)) for name, members in pairs)
    if len({name for name, _ in frozen}) != len(frozen):
        raise ValueError(f"group names must be distinct, got {[name for name, _ in frozen]}")
    coarse_mapping(dict(frozen))  # every class in exactly one group
    return frozen


CHAPTER_GROUPS: Grouping = freeze_groups(COARSE_GROUPS)
"""The chapter's grouping (:data:`COARSE_GROUPS`) frozen at import: the default of every
:class:`SourceRecipe`. Rebinding ``COARSE_GROUPS`` later changes no recipe; pass ``coarse_groups=`` instead."""


def hypernym_paths(synsets: Mapping[str, str] = WORDNET_SYNSETS) -> dict[str, str]:
    """Each class's WordNet hypernym path (below ``artifact.n.01``), as ``"a > b > c"`` text.

    The first path through ``covering.n.02`` or ``instrumentality.n.03`` is shown (WordNet also
    files clothing under ``commodity.n.01``). Reads WordNet through :func:`helpers.assets.wordnet`.
    """
    wn = assets.wordnet()
    out = {}
    for name, synset in synsets.items():
        paths = wn.synset(synset).hypernym_paths()
        paths.sort(key=lambda p: "commodity.n.01" in [s.name() for s in p])
        names = [s.name() for s in paths[0]]
        start = names.index("artifact.n.01") + 1 if "artifact.n.01" in names else 0
        out[name] = " > ".join(n.split(".")[0] for n in names[start:])
    return out


# ---------------------------------------------------------------------------------------------
# Source networks
# ---------------------------------------------------------------------------------------------

TASKS = ("fine", "coarse", "finer")


@dataclasses.dataclass(frozen=True)
class SourceRecipe(zoo.Recipe):
    """Everything that determines a source network; its content hash names the weights file.

    ``tasks`` picks the heads: ``("fine",)`` a specialist, ``("coarse",)`` a generalist, both a
    multi-task network (losses summed); ``("finer",)`` learns ``finer_per_class`` appearance clusters of
    every source class (:func:`finer_labels`), a granularity finer than the classes. All recipes share the
    book's ViT trunk (chapter 8) and the optimiser of :class:`helpers.vision.Recipe`. ``coarse_groups`` is
    the coarse granularity the ``"coarse"`` head learns (a dict is accepted and frozen, see
    :func:`freeze_groups`); another grouping gives another :meth:`key`, hence another weights file, so a
    generalist of your own grouping never loads the chapter's committed one. The chapter's grouping
    (:data:`CHAPTER_GROUPS`) is left out of the hash, which keeps the committed files' names.
    """

    LATE_FIELDS = {"coarse_groups": CHAPTER_GROUPS, "finer_per_class": 2}  # committed files keep their names

    tasks: tuple[str, ...] = ("fine",)
    epochs: int = 3
    n_train: int = 20_000
    held_out: tuple[str, ...] = HELD_OUT
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    width: int = 64
    depth: int = 4
    seed: int = 0
    version: int = 1
    coarse_groups: Grouping = CHAPTER_GROUPS
    finer_per_class: int = 2

    def __post_init__(self):
        object.__setattr__(self, "coarse_groups", freeze_groups(self.coarse_groups))
        if not self.tasks or any(t not in TASKS for t in self.tasks) or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty tuple of distinct names from {TASKS}, got {self.tasks!r}")
        class_indices(list(self.held_out))
        if self.epochs < 1 or self.n_train < 1:
            raise ValueError(f"epochs and n_train must be >= 1, got {self.epochs}, {self.n_train}")
        if self.finer_per_class < 2:
            raise ValueError(f"finer_per_class must be >= 2 (1 is the fine task), got {self.finer_per_class}")

    def coarse_mapping(self) -> tuple[list[str], list[int]]:
        """``(group names, group index of each fine label [10])`` of this recipe's grouping."""
        return coarse_mapping(dict(self.coarse_groups))

    def source_classes(self) -> list[int]:
        """Fine labels (of the 10) the source network is trained on, in label order."""
        held = set(class_indices(list(self.held_out)))
        return [c for c in range(len(CLASSES)) if c not in held]


RECIPES: dict[str, SourceRecipe] = {
    "specialist": SourceRecipe(tasks=("fine",)),
    "generalist": SourceRecipe(tasks=("coarse",)),
    "multitask": SourceRecipe(tasks=("fine", "coarse")),
    "specialist_seed1": SourceRecipe(tasks=("fine",), seed=1),
    "specialist_long": SourceRecipe(tasks=("fine",), epochs=6),
    "specialist_short": SourceRecipe(tasks=("fine",), epochs=1),
    **{f"specialist_seed{k}": SourceRecipe(tasks=("fine",), seed=k) for k in (2, 3, 4, 5)},
    **{f"generalist_seed{k}": SourceRecipe(tasks=("coarse",), seed=k) for k in (1, 2)},
    **{f"multitask_seed{k}": SourceRecipe(tasks=("fine", "coarse"), seed=k) for k in (1, 2)},
    "finer": SourceRecipe(tasks=("finer",)),
    **{f"finer_seed{k}": SourceRecipe(tasks=("finer",), seed=k) for k in (1, 2)},
}
"""The chapter's source networks: same trunk, data and optimiser; 3 epochs over 20,000 images of the 7
source classes unless stated. ``specialist_long`` has the budget of specialist + generalist together
(6 epochs), ``specialist_short`` a third of the budget; ``specialist_seed1`` is the specialist
re-trained from another seed (the "two specialists" control of MuCaLe). The ``*_seed{k}`` recipes
repeat S, S', G and MT over seeds: the seed-level replicates are (S, S') = seeds (0, 1), (2, 3), (4, 5)
and G, MT = seeds 0, 1, 2 (:data:`SEED_REPLICATES`). ``finer`` and ``finer_seed{k}`` learn the appearance
clusters of :func:`finer_labels` (two per source class), seeds 0, 1, 2."""

SEED_REPLICATES: dict[str, tuple[str, ...]] = {
    "S": ("specialist", "specialist_seed2", "specialist_seed4"),
    "S'": ("specialist_seed1", "specialist_seed3", "specialist_seed5"),
    "G": ("generalist", "generalist_seed1", "generalist_seed2"),
    "MT": ("multitask", "multitask_seed1", "multitask_seed2"),
    "F": ("finer", "finer_seed1", "finer_seed2"),
}
"""Network -> the :data:`RECIPES` names of its three seed replicates (replicate k of every network is
used together, e.g. MuCaLe replicate k = S[k] + G[k])."""


class SourceNet(nn.Module):
    """The book's ViT trunk (:func:`helpers.zoo.fashion_vit`, classifier removed) with named heads.

    ``forward(x)`` returns ``{task: logits}``; :meth:`embed` returns the CLS features ``[batch, width]``
    that transfer uses.
    """

    def __init__(self, n_classes: Mapping[str, int], *, width: int = 64, depth: int = 4):
        super().__init__()
        self.trunk = zoo.fashion_vit(width=width, depth=depth)
        self.trunk.reset_classifier(0)
        self.heads = nn.ModuleDict({task: nn.Linear(width, n) for task, n in n_classes.items()})
        self.width = width

    def embed(self, x: Tensor) -> Tensor:
        return self.trunk(x)  # [batch, width]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.embed(x)
        return {task: head(h) for task, head in self.heads.items()}


def source_data(recipe: SourceRecipe, split: str = "train") -> tuple[Tensor, dict[str, Tensor]]:
    """Images and labels of the source problem.

    Args:
        recipe: which classes are held out and (for ``"train"``) how many images to use.
        split: ``"train"`` (the first ``n_train`` source-class images below :data:`SOURCE_POOL`) or
            ``"test"`` (every test image of the source classes).

    Returns:
        ``(images [N, 1, 28, 28], {"fine": [N] in 0..n_source-1, "coarse": [N] group index})``, and
        ``"finer"`` (:func:`finer_labels`) when the recipe trains that head.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    x, y = data.fashion_tensors(split)
    if split == "train":
        x, y = x[:SOURCE_POOL], y[:SOURCE_POOL]
    source = recipe.source_classes()
    keep = torch.isin(y, torch.tensor(source))
    x, y = x[keep], y[keep]
    if split == "train":
        x, y = x[: recipe.n_train], y[: recipe.n_train]
    fine = torch.full((len(CLASSES),), -1, dtype=torch.long)
    fine[torch.tensor(source)] = torch.arange(len(source))
    _, of_class = recipe.coarse_mapping()
    labels = {"fine": fine[y], "coarse": torch.tensor(of_class)[y]}
    if "finer" in recipe.tasks:
        labels["finer"] = finer_labels(recipe, x, labels["fine"])
    return x, labels


@functools.cache
def finer_centroids(recipe: SourceRecipe) -> Tensor:
    """``[n_source, finer_per_class, 784]`` pixel centroids of each source class's appearance clusters.

    k-means (scikit-learn, 10 initialisations, seed 0) on the pixels of the recipe's training images of each
    class; within a class the clusters are ordered by mean brightness (darkest first), so that label
    ``finer_per_class * c + j`` means the same on every machine.
    """
    from sklearn.cluster import KMeans

    x, y = source_data(dataclasses.replace(recipe, tasks=("fine",)), "train")
    flat = x.flatten(1).double().numpy()
    out = []
    for c in range(len(recipe.source_classes())):
        km = KMeans(recipe.finer_per_class, n_init=10, random_state=0).fit(flat[y["fine"].numpy() == c])
        centres = km.cluster_centers_[np.argsort(km.cluster_centers_.mean(1))]
        out.append(torch.from_numpy(centres))
    return torch.stack(out)


def finer_labels(recipe: SourceRecipe, x: Tensor, fine: Tensor) -> Tensor:
    """``[N]`` finer label of each image: its source class's nearest appearance centroid
    (:func:`finer_centroids`), ``finer_per_class * fine + cluster``."""
    centres = finer_centroids(recipe)                                       # [class, k, 784]
    d = torch.cdist(x.flatten(1).double().unsqueeze(1), centres[fine]).squeeze(1)   # [N, k]
    return fine * recipe.finer_per_class + d.argmin(1)


def build_source_net(recipe: SourceRecipe) -> SourceNet:
    """An untrained :class:`SourceNet` for ``recipe``, initialised from its seed."""
    common.set_seed(recipe.seed)
    n = {"fine": len(recipe.source_classes()), "coarse": len(recipe.coarse_groups),
         "finer": len(recipe.source_classes()) * recipe.finer_per_class}
    return SourceNet({t: n[t] for t in recipe.tasks}, width=recipe.width, depth=recipe.depth)


@torch.no_grad()
def _source_accuracy(model: SourceNet, x: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
    model.eval()
    logits = {t: [] for t in model.heads}
    for i in range(0, len(x), 1000):
        for t, z in model(x[i : i + 1000]).items():
            logits[t].append(z)
    return {t: float((torch.cat(z).argmax(1) == labels[t]).float().mean()) for t, z in logits.items()}


def train_source(recipe: SourceRecipe, *, progress: bool = True, evaluate: bool = True) -> tuple[SourceNet, dict]:
    """Train a source network by ``recipe`` (AdamW, warm-up + cosine, summed cross-entropies).

    Returns:
        ``(model in eval mode, history)``; history holds per-epoch ``train_loss``, ``test_accuracy``
        (``{task: [epoch]}`` on the source classes of the test split; empty when ``evaluate`` is
        false), ``seconds`` and ``cpu_seconds``.
    """
    from tqdm.auto import tqdm

    x, labels = source_data(recipe, "train")
    x_test, labels_test = source_data(recipe, "test") if evaluate else (x[:0], {})
    model = build_source_net(recipe)
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(x) / recipe.batch_size)
    total, warmup = recipe.epochs * steps_per_epoch, int(recipe.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: common.warmup_cosine(s, total, warmup))
    generator = torch.Generator().manual_seed(recipe.seed)
    history: dict = {"train_loss": [], "test_accuracy": {t: [] for t in recipe.tasks}, "seconds": [],
                     "cpu_seconds": [], "threads": torch.get_num_threads(), "n_train": len(x)}  # fmt: skip
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in tqdm(range(recipe.epochs), desc=f"training {'+'.join(recipe.tasks)}", disable=not progress):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        losses = []
        for i in range(0, len(order), recipe.batch_size):
            batch = order[i : i + recipe.batch_size]
            out = model(x[batch])
            loss = sum(F.cross_entropy(out[t], labels[t][batch]) for t in recipe.tasks)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(loss.item())
        history["train_loss"].append(float(np.mean(losses)))
        history["seconds"].append(time.perf_counter() - start)
        history["cpu_seconds"].append(time.process_time() - cpu_start)
        if evaluate:
            for t, acc in _source_accuracy(model, x_test, labels_test).items():
                history["test_accuracy"][t].append(acc)
    return model.eval(), history


def _weights_name(recipe: SourceRecipe) -> str:
    return f"transfer_{'_'.join(recipe.tasks)}-{recipe.key()}.pt"


def source_network(name: str | SourceRecipe = "specialist", *, progress: bool = True) -> SourceNet:
    """A trained source network: a name from :data:`RECIPES` or any :class:`SourceRecipe`.

    Looks for verified weights in ``helpers/weights/models/transfer/`` (committed), then in the cache; trains
    by the recipe (about a minute per 3 epochs on one CPU thread) when neither holds a verified copy
    (:func:`helpers.zoo.trained_model`; ``zoo.load("source/specialist", seed=...)`` is the same call by name).

    Returns:
        the model in eval mode with gradients off, ``model.history`` and ``model.recipe`` attached.

    Introduced in nbs/13_universal_representations.ipynb.
    """
    recipe = RECIPES.get(name) if isinstance(name, str) else name
    if not isinstance(recipe, SourceRecipe):
        raise ValueError(f"unknown source network {name!r}; choose from {sorted(RECIPES)} or pass a SourceRecipe")
    model = zoo.trained_model(
        lambda: build_source_net(recipe), lambda: train_source(recipe, progress=progress), recipe,
        _weights_name(recipe), family="transfer",
    )  # fmt: skip
    return model.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Target problems
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """A transfer target: training and test images (normalised) with labels, and class names."""

    name: str
    x_train: Tensor  # [n_train, 1, 28, 28]
    y_train: Tensor  # [n_train]
    x_test: Tensor  # [n_test, 1, 28, 28]
    y_test: Tensor  # [n_test]
    classes: tuple[str, ...]

    def __repr__(self) -> str:
        return (f"Target({self.name!r}: {len(self.classes)} classes, {len(self.y_train)} train, "
                f"{len(self.y_test)} test)")  # fmt: skip


def _per_class(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` random items of each class (fewer if a class has fewer), sorted."""
    picks = [rng.permutation(np.flatnonzero(labels == c))[:n] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def transfer_targets(*, n_train_per_class: int = 100, n_test: int = 2000, seed: int = 0,
                     held_out: Sequence[str] = HELD_OUT) -> dict[str, Target]:  # fmt: skip
    """The chapter's target problems, none of whose images a source network has seen.

    - ``held-out classes``: the :data:`HELD_OUT` fine classes (never in source training);
    - ``fashion-10``: all ten fine classes (a re-labelling: 7 source classes + 3 new ones);
    - ``rotated`` and ``edges``: all ten classes in a shifted domain (:func:`helpers.data.shift_domain`, edges with
      the border replicated);
    - ``digits``: scikit-learn's handwritten digits (:func:`helpers.data.digits_images`), another domain.

    Fashion targets train on images from the target pool of the training split (indices >= :data:`SOURCE_POOL`)
    and test on a random subset of the test split; digits are split at random per class.

    Args:
        n_train_per_class: labelled images per class for the target's training set (a few-shot-ish regime).
        n_test: test images per target (at most).
        seed: seeds the draws.
        held_out: class names of the held-out target.

    Returns:
        ``{name: Target}`` in the order above.
    """
    if n_train_per_class < 1 or n_test < 1:
        raise ValueError(f"n_train_per_class and n_test must be >= 1, got {n_train_per_class}, {n_test}")
    rng = np.random.default_rng(seed)
    held = class_indices(list(held_out))
    train_x, train_y = assets.fashion_mnist("train")
    pool_x, pool_y = train_x[SOURCE_POOL:], train_y[SOURCE_POOL:]
    test_x, test_y = assets.fashion_mnist("test")

    def fashion(name, classes, transform=None):
        tr = _per_class(pool_y[np.isin(pool_y, classes)], n_train_per_class, rng)
        tr = np.flatnonzero(np.isin(pool_y, classes))[tr]
        te = np.flatnonzero(np.isin(test_y, classes))
        te = np.sort(rng.permutation(te)[:n_test])
        remap = {c: i for i, c in enumerate(classes)}
        xs = [pool_x[tr], test_x[te]]
        if transform is not None:
            xs = [data.shift_domain(x, transform) for x in xs]
        ys = [torch.tensor([remap[int(v)] for v in y]) for y in (pool_y[tr], test_y[te])]
        return Target(name, data.normalise(xs[0]), ys[0], data.normalise(xs[1]), ys[1],
                      tuple(CLASSES[c] for c in classes))  # fmt: skip

    everything = list(range(len(CLASSES)))
    targets = {
        "held-out classes": fashion("held-out classes", held),
        "fashion-10": fashion("fashion-10", everything),
        "rotated": fashion("rotated", everything, "rotated"),
        "edges": fashion("edges", everything, "edges-replicate"),
    }
    dx, dy = data.digits_images()
    tr = _per_class(dy, n_train_per_class, rng)
    te = np.setdiff1d(np.arange(len(dy)), tr)
    te = np.sort(rng.permutation(te)[:n_test])
    x_tr, x_te = data.normalise(dx[tr]), data.normalise(dx[te])
    digit_names = tuple(map(str, range(10)))
    targets["digits"] = Target("digits", x_tr, torch.as_tensor(dy[tr]), x_te, torch.as_tensor(dy[te]), digit_names)
    return targets


# ---------------------------------------------------------------------------------------------
# Transfer: frozen features, linear probe, fine-tuning
# ---------------------------------------------------------------------------------------------


def _embedders(models: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    models = [models] if isinstance(models, nn.Module) else list(models)
    if not models:
        raise ValueError("give at least one model to take features from")
    return models


@torch.no_grad()
def features(models: nn.Module | Sequence[nn.Module], images: Tensor, *, batch_size: int = 1000) -> Tensor:
    """Frozen features of one network, or of several concatenated (MuCaLe when given S and G).

    Args:
        models: a :class:`SourceNet` (its :meth:`~SourceNet.embed`), any module mapping images to
            ``[batch, d]``, or a sequence of them.
        images: ``[N, 1, 28, 28]``.

    Returns:
        ``[N, sum of the models' d]``, the models' features side by side in the given order.
    """
    images = data.check_images(images)
    parts = []
    for model in _embedders(models):
        was_training = model.training
        model.eval()
        embed = model.embed if hasattr(model, "embed") else model
        parts.append(torch.cat([embed(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]))
        model.train(was_training)
    return concat_features(*parts)


def concat_features(*parts: Tensor) -> Tensor:
    """Concatenate ``[N, d_k]`` feature blocks of the same N items into ``[N, sum d_k]``.

    >>> concat_features(torch.zeros(3, 2), torch.ones(3, 5)).shape
    torch.Size([3, 7])
    """
    if not parts:
        raise ValueError("give at least one feature block")
    if any(p.ndim != 2 for p in parts):
        raise ValueError(f"feature blocks must be [item, dim], got shapes {[tuple(p.shape) for p in parts]}")
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError(f"feature blocks describe different numbers of items: {[p.shape[0] for p in parts]}")
    return torch.cat(parts, dim=1)


def _check_xy(x, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
    if x.ndim != 2:
        raise ValueError(f"{what} features must be [item, dim], got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{what} set is empty: a target needs labelled items to train and test on")
    if len(x) != len(y):
        raise ValueError(f"{what} features describe {len(x)} items but there are {len(y)} labels; they must match")
    return x, y


def linear_probe(train_x, train_y, test_x, test_y, *, C: float = 1.0, return_model: bool = False):
    """Accuracy of a logistic regression trained on frozen features (standardised per dimension).

    Args:
        train_x, test_x: ``[n, dim]`` features (tensor or array); train_y, test_y: ``[n]`` labels.
        C: inverse L2 regularisation strength of scikit-learn's ``LogisticRegression``.
        return_model: also return the fitted pipeline.

    Returns:
        test accuracy (float), or ``(accuracy, pipeline)``.

    >>> x = np.array([[0.0], [1.0], [0.1], [0.9]]); y = np.array([0, 1, 0, 1])
    >>> linear_probe(x, y, x, y)
    1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = _check_xy(train_x, train_y, "training")
    test_x, test_y = _check_xy(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"training and test features differ in width: {train_x.shape[1]} vs {test_x.shape[1]}")
    if len(np.unique(train_y)) < 2:
        raise ValueError("the training labels hold a single class; a probe needs at least two")
    unseen = sorted(set(np.unique(test_y).tolist()) - set(np.unique(train_y).tolist()))
    if unseen:
        raise ValueError(f"test labels {unseen} never occur in the training labels; give each class training items")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    probe.fit(train_x, train_y)
    acc = float((probe.predict(test_x) == test_y).mean())
    return (acc, probe) if return_model else acc


PROBE_CS: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
"""The candidate values of the probe's ``C`` that :func:`select_probe_C` cross-validates."""


def pixel_features(images: Tensor) -> Tensor:
    """The raw-pixel baseline's features: each normalised image flattened, ``[N, 1, 28, 28] -> [N, 784]``.

    >>> pixel_features(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 784])
    """
    return data.check_images(images).flatten(1)


def select_probe_C(problems: Sequence[tuple], *, Cs: Sequence[float] = PROBE_CS, folds: int = 3,
                   seed: int = 0) -> tuple[float, dict[float, float]]:  # fmt: skip
    """Choose the linear probe's ``C`` by stratified k-fold cross-validation on training data only.

    Every candidate is scored by its mean held-out-fold accuracy over all the given problems (e.g.
    every target's training set for every representation of one feature size); the best mean wins,
    ties going to the smaller ``C`` (the stronger regularisation). Test sets are never seen.

    Args:
        problems: ``(train_x [n, dim], train_y [n])`` pairs, all of the same width ``dim``.
        Cs: candidate values (positive).
        folds: number of stratified folds (at least 2).
        seed: seeds the fold shuffling.

    Returns:
        ``(chosen C, {C: mean cross-validated accuracy})``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    problems = list(problems)
    if not problems:
        raise ValueError("problems is empty: give (train_x, train_y) pairs of one feature size")
    Cs = sorted(float(c) for c in Cs)
    if not Cs or Cs[0] <= 0:
        raise ValueError(f"Cs must be a non-empty sequence of positive numbers, got {Cs}")
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    checked = [_check_xy(x, y, "training") for x, y in problems]
    widths = sorted({x.shape[1] for x, _ in checked})
    if len(widths) != 1:
        raise ValueError(f"problems must share one feature size (C is chosen per size), got widths {widths}")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    mean_acc = {}
    for C in Cs:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        mean_acc[C] = float(np.mean([cross_val_score(probe, x, y, cv=splitter).mean() for x, y in checked]))
    best = max(Cs, key=lambda c: (mean_acc[c], -c))
    return best, mean_acc


def chosen_probe_C(problems_by_size: Mapping[str, Sequence[tuple]] | None, *, recipe: Mapping,
                   Cs: Sequence[float] = PROBE_CS, folds: int = 3, seed: int = 0) -> dict:  # fmt: skip
    """:func:`select_probe_C` for each feature size, as a committed artefact (JSON, verified by SHA-256).

    Cross-validating every candidate on every training set takes a minute or two on one thread, so the
    choice is kept under ``helpers/weights/results/ch13/`` and named by the content hash of ``recipe``
    (what determines the problems: networks, targets) together with ``Cs``, ``folds`` and ``seed``.

    Args:
        problems_by_size: size label -> ``(train_x, train_y)`` pairs; used only when the artefact must
            be rebuilt (may then not be None).
        recipe: JSON-serialisable description of the problems, e.g. recipe keys and target settings.

    Returns:
        ``{size label: {"C": chosen C, "cv_accuracy": {str(C): mean accuracy}}}``.
    """
    import json

    key = common.content_hash({"recipe": dict(recipe), "Cs": sorted(map(float, Cs)), "folds": folds,
                               "seed": seed, "version": 1}, length=12)  # fmt: skip
    path = common.cache_dir("results", "ch13") / f"probe_C-{key}.json"

    def build(target: Path) -> None:
        if problems_by_size is None:
            raise ValueError("the probe-C artefact must be rebuilt: pass problems_by_size")
        out = {}
        for size, problems in problems_by_size.items():
            best, accs = select_probe_C(problems, Cs=Cs, folds=folds, seed=seed)
            out[size] = {"C": best, "cv_accuracy": {str(c): a for c, a in accs.items()}}
        target.write_text(json.dumps(out, indent=1, sort_keys=True))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


class TransferNet(nn.Module):
    """Source trunks (one or several, features concatenated) with a new linear head for a target."""

    def __init__(self, trunks: Sequence[nn.Module], n_classes: int):
        super().__init__()
        self.trunks = nn.ModuleList(trunks)
        width = sum(t.width if hasattr(t, "width") else t.embed_dim for t in trunks)
        self.head = nn.Linear(width, n_classes)

    def embed(self, x: Tensor) -> Tensor:
        return torch.cat([t.embed(x) if hasattr(t, "embed") else t(x) for t in self.trunks], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def fine_tune(models: nn.Module | Sequence[nn.Module], target: Target, *, epochs: int = 8, lr: float = 1e-3,
              batch_size: int = 64, seed: int = 0) -> tuple[TransferNet, dict]:  # fmt: skip
    """Fine-tune copies of source networks (all weights) with a new head on a target's training set.

    AdamW with a cosine schedule; the head starts at zero so the first steps follow the source
    features. The given models are left untouched.

    Returns:
        ``(TransferNet in eval mode, {"test_accuracy": float, "seconds": float})``.
    """
    import copy

    if len(target.y_train) == 0 or len(target.y_test) == 0:
        raise ValueError(f"target {target.name!r} has an empty training or test set")
    common.set_seed(seed)
    trunks = [copy.deepcopy(m).requires_grad_(True) for m in _embedders(models)]
    net = TransferNet(trunks, len(target.classes))
    nn.init.zeros_(net.head.weight)
    nn.init.zeros_(net.head.bias)
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    total = epochs * math.ceil(len(target.y_train) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: common.warmup_cosine(s, total, 0))
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        net.train()
        order = torch.randperm(len(target.y_train), generator=generator)
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            loss = F.cross_entropy(net(target.x_train[batch]), target.y_train[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
    net.eval().requires_grad_(False)
    acc = float((zoo.predict_logits(net, target.x_test).argmax(1) == target.y_test).float().mean())
    return net, {"test_accuracy": acc, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------------------------
# Universality: normalised relative gain
# ---------------------------------------------------------------------------------------------

NORMALISATIONS = ("headroom", "best")


def nrg(scores: Mapping[str, Sequence[float]], *, reference: str, normalisation: str = "headroom",
        max_score: float = 1.0, anchors: Sequence[str] = ()) -> dict[str, np.ndarray]:  # fmt: skip
    """Normalised relative gain of each representation over a reference, target by target.

    ``"headroom"`` (Tamaazousti et al.'s NRG as we read it):
    ``NRG_t(r) = (s_t(r) - s_t(ref)) / (max_score - s_t(ref))``, the share of the reference's
    remaining error that ``r`` removes. ``"best"``: the gain divided by the best gain of a compared
    representation on that target, ``(s_t(r) - s_t(ref)) / max_r' (s_t(r') - s_t(ref))``, so the best
    representation scores 1; ``anchors`` (e.g. a random network or a from-scratch model) are scored but
    never set the normaliser. On a target where no compared representation beats the reference the
    largest absolute gain divides instead (all scores then lie in [-1, 0]); 0 for all when nothing differs.

    Args:
        scores: representation -> one score per target (same targets, same order, e.g. accuracies).
        reference: the representation gains are measured against (it gets 0 everywhere).
        normalisation: ``"headroom"`` or ``"best"``.
        max_score: the best possible score (1.0 for accuracy, 100 for percentages).
        anchors: representations left out of the ``"best"`` normaliser (they still get an NRG).

    Returns:
        representation -> ``[target]`` NRG values.

    >>> nrg({"S": [0.8, 0.5], "M": [0.9, 0.6]}, reference="S")["M"].round(3).tolist()
    [0.5, 0.2]
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; choose from {NORMALISATIONS}")
    if not scores:
        raise ValueError("scores is empty: give representation -> one score per target")
    if reference not in scores:
        raise ValueError(f"reference {reference!r} is not among the representations {list(scores)}")
    table = {name: np.asarray(s, dtype=np.float64).reshape(-1) for name, s in scores.items()}
    lengths = {name: len(s) for name, s in table.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"every representation needs one score per target, got lengths {lengths}")
    if lengths[reference] == 0:
        raise ValueError("no targets: each representation's score list is empty")
    values = np.stack(list(table.values()))  # [representation, target]
    if not np.isfinite(values).all() or (values < 0).any() or (values > max_score).any():
        raise ValueError(f"scores must be finite and lie in [0, max_score={max_score}]; use max_score=100 for %")
    ref = table[reference]
    if normalisation == "headroom":
        if (ref >= max_score).any():
            raise ValueError("the reference has a perfect score on a target: there is no headroom to normalise by")
        denom = max_score - ref
    else:
        unknown = [a for a in anchors if a not in table]
        if unknown:
            raise ValueError(f"anchors {unknown} are not among the representations {list(table)}")
        compared = np.stack([s for name, s in table.items() if name not in anchors])  # [representation, target]
        best = (compared - ref).max(0)  # [target]
        denom = np.where(best > 0, best, np.abs(compared - ref).max(0))
        denom = np.where(denom > 0, denom, 1.0)
    return {name: (s - ref) / denom for name, s in table.items()}


def mnrg(scores: Mapping[str, Sequence[float]], *, reference: str, normalisation: str = "headroom",
         max_score: float = 1.0, anchors: Sequence[str] = ()) -> dict[str, float]:  # fmt: skip
    """Mean normalised relative gain over targets, in percent: ``100 * mean_t NRG_t(r)`` (see :func:`nrg`).

    Tamaazousti et al., "Learning more universal representations for transfer-learning" (TPAMI 2020),
    the universality metric of the MuCaLe-Net line of work (CVPR 2017).

    >>> mnrg({"S": [0.8, 0.5], "M": [0.9, 0.6]}, reference="S")
    {'S': 0.0, 'M': 35.0}
    """
    table = nrg(scores, reference=reference, normalisation=normalisation, max_score=max_score, anchors=anchors)
    return {name: round(float(100 * v.mean()), 10) for name, v in table.items()}


# ---------------------------------------------------------------------------------------------
# Interpretability of feature dimensions
# ---------------------------------------------------------------------------------------------


def dimension_purity(feats, labels, *, top: int = 20) -> np.ndarray:
    """Class purity of each feature dimension's most activating items.

    For every dimension: the ``top`` items with the highest value, and the share of them that carry
    their most common label. 1 means the dimension fires for one class only; ``1 / classes`` is what
    a random dimension over balanced classes gives.

    Args:
        feats: ``[item, dim]`` features; labels: ``[item]`` class labels.
        top: how many top-activating items to inspect per dimension.

    Returns:
        ``[dim]`` purity in ``(0, 1]``.

    >>> dimension_purity(np.array([[3.0, 0.0], [2.0, 1.0], [0.0, 2.0], [1.0, 3.0]]), [0, 0, 1, 2], top=2).tolist()
    [1.0, 0.5]
    """
    feats, labels = _check_xy(feats, labels, "purity")
    if not 1 <= top <= len(feats):
        raise ValueError(f"top must be between 1 and the number of items ({len(feats)}), got {top}")
    order = np.argsort(-feats, axis=0, kind="stable")[:top]  # [top, dim]
    tops = labels[order]  # [top, dim]
    return np.array([np.unique(col, return_counts=True)[1].max() / top for col in tops.T])

