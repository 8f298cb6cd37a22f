"""Rare classes with 1 % labels: an unaware CLIP-style model, ontology concepts, CAVs, self-training (chapter 11).

The research setting of Inria's OceanIA project, scaled down to Fashion-MNIST: millions of images, about 1 %
annotated, and rare classes whose sub-concepts a generic multimodal model barely knows. Here:

* :func:`rare_split`: a pool of training images in which a few classes are rare (a small fraction of
  their images is kept), and a stratified ~1 % of it labelled (at least ``min_labelled`` per class);
* :class:`RareClipRecipe` / :func:`pretrained_rare_clip`: chapter 10's CLIP-style model trained
  *without* the rare classes' images and without their parts in any caption, so the multimodal
  embedding does not know them (weights committed under ``helpers/weights/``);
* :func:`wordnet_concepts` and :func:`ground_concepts`: a concept dictionary built from WordNet
  (hypernyms, part meronyms, gloss nouns of each class's synset), kept where the CLIP-style model
  grounds the word on the few labelled images; :func:`random_concepts` is the control;
* :func:`concept_activation_vectors`: concept directions learned from labelled examples in the image
  embedding space (CAVs, Kim et al. 2018);
* :func:`self_train`: pseudo-labelling with a consistency check, seeded by zero-shot predictions,
  on frozen image embeddings (Lee 2013; Sohn et al. 2020);
* :func:`class_balanced_weights`, :func:`distil_student` and :func:`student_study`: students distilled with
  each pool image weighted by the inverse frequency of the teacher's class, or semi-supervised (the 1 %
  labels plus distillation of the unlabelled pool), compared over seeds (:func:`student_study_results`,
  committed under ``helpers/weights/results/ch11/``);
* :func:`choquet_students_results`, :func:`cav_tests_results` and :func:`self_training_results`: the chapter's
  other heavy studies (the dictionaries' and the probes' Choquet students, the TCAV tests, the pseudo-labelling
  runs), committed there too; the notebook recomputes a subset of each live and compares;
* :func:`train_one_percent_lit`, :func:`fit_feature_probe` and :func:`one_percent_results`: the real 1 % regime,
  where the concept model (chapter 12's locked ImageNet tower, its projections aligned on the captions of the
  labelled images only) and the black box (a probe on the same locked features, trained on the labelled images)
  see nothing but the 1 %; :func:`one_percent_seeds_results` repeats its first-order results over seeds;
* :func:`long_tail_indices`, :func:`classification_ci`, :func:`open_set_auroc` and
  :func:`nearest_mean_distance`: a Zipf-shaped test set, class-averaged metrics with bootstrap intervals,
  and how well an unknown-detector flags a class the classifier was never given.

Reuses :mod:`helpers.clip` (model, captions, concept bank) and :mod:`helpers.choquet` (the student).
Introduced in nbs/11_rare_classes.ipynb.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from helpers import assets, clip, common, data, zoo
from helpers.common import tensor_digest

RARE_CLASSES = (5, 6, 8)
"""Sandal, shirt and bag: the classes made rare and hidden from the CLIP-style model."""

FASHION_SYNSETS = assets.FASHION_SYNSETS
"""The WordNet 3.0 noun sense of each Fashion-MNIST class (``bag`` is the handbag sense; there is no ankle boot)."""

PART_CONCEPTS = {
    "short sleeves": "short sleeves", "a round neckline": "neckline", "two long legs": "legs",
    "a waistband": "waistband", "long sleeves": "long sleeves", "a ribbed hem": "hem", "a long skirt": "skirt",
    "a fitted waist": "fitted waist", "buttons down the front": "buttons", "thin straps": "straps",
    "an open toe": "open toe", "a collar": "collar", "laces": "laces", "a flat rubber sole": "sole",
    "a handle": "handle", "a rectangular shape": "rectangular", "a heel": "heel",
    "an ankle-high shaft": "ankle shaft",
}  # fmt: skip
"""Each part of :data:`helpers.data.CLASS_PARTS` → the :data:`helpers.clip.FASHION_CONCEPTS` concept that names it."""


def _check_classes(classes: Sequence[int], n_classes: int = len(data.CLASS_TEXT)) -> tuple[int, ...]:
    classes = tuple(int(c) for c in classes)
    if not classes or len(set(classes)) != len(classes) or not all(0 <= c < n_classes for c in classes):
        raise ValueError(f"rare classes must be distinct class indices in 0..{n_classes - 1}, got {classes}")
    return classes


def part_classes(parts: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Which classes have each part of :data:`helpers.data.CLASS_PARTS` (class-level annotation).

    >>> part_classes(["buttons down the front"])
    {'buttons down the front': (4, 6)}
    """
    table: dict[str, list[int]] = {}
    for c, row in enumerate(data.CLASS_PARTS):
        for part in row:
            table.setdefault(part, []).append(c)
    parts = list(table) if parts is None else list(parts)
    unknown = [p for p in parts if p not in table]
    if unknown:
        raise ValueError(f"unknown parts {unknown}: choose among {list(table)}")
    return {p: tuple(table[p]) for p in parts}


def hidden_parts(rare_classes: Sequence[int] = RARE_CLASSES) -> tuple[str, ...]:
    """The parts of the rare classes (they are removed from every caption, whichever class it describes).

    >>> hidden_parts((5, 8))
    ('thin straps', 'an open toe', 'a handle', 'a rectangular shape')
    """
    return tuple(p for c in _check_classes(rare_classes) for p in data.CLASS_PARTS[c])


# ---------------------------------------------------------------------------------------------
# The split: a pool with rare classes, ~1 % of it labelled
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RareSplit:
    """Indices into the training set: the ``labelled`` few and the ``unlabelled`` rest of a pool.

    ``labelled`` and ``unlabelled`` are disjoint (checked); the test set never enters a split.
    """

    labelled: np.ndarray
    unlabelled: np.ndarray
    rare_classes: tuple[int, ...]

    def __post_init__(self):
        if np.intersect1d(self.labelled, self.unlabelled).size:
            raise ValueError("labelled and unlabelled indices overlap")

    @property
    def pool(self) -> np.ndarray:
        """All pool indices, labelled first."""
        return np.concatenate([self.labelled, self.unlabelled])


def rare_split(labels: Tensor | np.ndarray, *, rare_classes: Sequence[int] = RARE_CLASSES, rare_fraction: float = 0.05,
               label_fraction: float = 0.01, min_labelled: int = 5, n_per_class: int | None = None,
               seed: int = 0) -> RareSplit:
    """Make some classes rare in a pool of training images, and label a stratified fraction of the pool.

    Args:
        labels: ``[N]`` training labels (used to stratify; only ``labelled`` ones are ever read afterwards).
        rare_classes: classes of which only ``rare_fraction`` of the images enter the pool.
        rare_fraction: in (0, 1].
        label_fraction: share of each class's pool images that are labelled, in (0, 1].
        min_labelled: at least this many labelled images per class (rare classes would get almost none).
        n_per_class: cap on a common class's images before thinning (``None``: all of them).
        seed: the random draw.

    Returns:
        a :class:`RareSplit`.

    >>> s = rare_split(np.repeat(np.arange(3), 1000), rare_classes=[2], rare_fraction=0.1, label_fraction=0.01)
    >>> len(s.labelled), len(s.unlabelled)
    (25, 2075)
    """
    for name, value in (("label_fraction", label_fraction), ("rare_fraction", rare_fraction)):
        if not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(f"{name} must be in (0, 1], e.g. 0.01 for 1 %; got {value!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty [N] array, got shape {labels.shape}")
    rare_classes = _check_classes(rare_classes, int(labels.max()) + 1)
    rng = np.random.default_rng(seed)
    labelled, unlabelled = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if n_per_class is not None:
            idx = idx[:n_per_class]
        if c in rare_classes:
            idx = idx[: max(min_labelled + 1, round(rare_fraction * len(idx)))]
        n_lab = min(len(idx) - 1, max(min_labelled, round(label_fraction * len(idx))))
        labelled.append(idx[:n_lab])
        unlabelled.append(idx[n_lab:])
    return RareSplit(np.sort(np.concatenate(labelled)), np.sort(np.concatenate(unlabelled)), rare_classes)


# ---------------------------------------------------------------------------------------------
# A CLIP-style model that never saw the rare classes nor their parts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RareClipRecipe(zoo.Recipe):
    """Chapter 10's recipe, minus the ``hidden_classes`` images and the ``hidden_parts`` in every caption."""

    base: clip.ClipRecipe = clip.RECIPE
    hidden_classes: tuple[int, ...] = RARE_CLASSES
    hidden_parts: tuple[str, ...] = hidden_parts(RARE_CLASSES)


RARE_RECIPE = RareClipRecipe()
"""The chapter's recipe: about 3 minutes on 2 CPU cores, so its weights are committed."""


def rare_captions(attributes: dict[str, Tensor], labels: Tensor, generator: torch.Generator, *,
                  hidden_parts: Sequence[str], p_mention: float = 0.5) -> Tensor:
    """:func:`helpers.data.sample_captions`, except that a drawn part in ``hidden_parts`` is not mentioned."""
    n = len(labels)
    template = torch.randint(len(data.TRAIN_TEMPLATES), (n,), generator=generator)

    def maybe(values: Tensor) -> Tensor:
        keep = torch.rand(n, generator=generator) < p_mention
        return torch.where(keep, values, -1)

    shape = maybe(attributes["shape"])
    shape = torch.where(shape == 1, -1, shape)
    part = maybe(torch.randint(2, (n,), generator=generator))
    hidden = torch.tensor([[p in hidden_parts for p in row] for row in data.CLASS_PARTS])  # [class, 2]
    part = torch.where((part >= 0) & hidden[labels, part.clamp_min(0)], -1, part)
    return data.caption_index(labels, template, maybe(attributes["tone"]), maybe(attributes["texture"]), shape, part)


def train_rare_clip(recipe: RareClipRecipe = RARE_RECIPE, *, progress: bool = True) -> tuple[clip.FashionClip, dict]:
    """Train a :class:`helpers.clip.FashionClip` by ``recipe`` (chapter 10's loop on the filtered data and captions).

    Returns:
        ``(model in eval mode, history)`` as :func:`helpers.clip.train_clip`, plus ``history["n_images"]``.
    """
    if not isinstance(recipe, RareClipRecipe):
        raise ValueError(f"recipe must be a RareClipRecipe, got {type(recipe).__name__}")
    with common.torch_threads(1):  # small batches: one thread is faster, and immune to a busy machine
        return _train_rare_clip(recipe, progress=progress)


def _train_rare_clip(recipe: RareClipRecipe, *, progress: bool) -> tuple[clip.FashionClip, dict]:
    base = recipe.base
    common.set_seed(base.seed)
    x_train, y_train = data.fashion_tensors("train")
    if base.n_train is not None:
        x_train, y_train = x_train[: base.n_train], y_train[: base.n_train]
    keep = ~torch.isin(y_train, torch.tensor(recipe.hidden_classes, dtype=torch.long))
    x_train, y_train = x_train[keep], y_train[keep]

    def draw(attributes: dict[str, Tensor], labels: Tensor, generator: torch.Generator) -> Tensor:
        return rare_captions(attributes, labels, generator, hidden_parts=recipe.hidden_parts, p_mention=base.p_mention)

    return clip.fit_contrastive(base, x_train, y_train, draw, progress=progress,
                                desc="training CLIP-style model without the rare classes")


def _weights_name(recipe: RareClipRecipe) -> str:
    return f"rare_clip-{recipe.key()}.pt"


def pretrained_rare_clip(recipe: RareClipRecipe = RARE_RECIPE, *, progress: bool = True) -> clip.FashionClip:
    """The CLIP-style model that never saw the rare classes (committed weights, else cache, else trained).

    Returns:
        a :class:`helpers.clip.FashionClip` in eval mode with ``history`` and ``recipe`` attached.
    """
    if not isinstance(recipe, RareClipRecipe):
        raise ValueError(f"recipe must be a RareClipRecipe, got {type(recipe).__name__}")
    model = zoo.trained_model(
        lambda: clip.FashionClip(dim=recipe.base.dim), lambda: train_rare_clip(recipe, progress=progress), recipe,
        _weights_name(recipe), family="clip",
    )  # fmt: skip
    return model.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Concept dictionaries: WordNet, grounding filter, random control, edits
# ---------------------------------------------------------------------------------------------

RELATIONS = {"hypernym": "is a (hypernyms)", "part": "has part (meronyms)", "gloss": "gloss words"}
"""Where a WordNet concept comes from → the name of its group in the Choquet student."""

PROMPTS = {"hypernym": "a photo of {}.", "part": "an item with {}.", "gloss": "an item with {}."}
"""How a WordNet word is written as a prompt (``{}`` gets the word with its article)."""

_STOPWORDS = frozenset(
    "the and for with that has have used worn usually especially often made from into over who which its one two "
    "upper lower part each small something someone such other very this may can are was being some more most "
    "designed relating particular general outer".split()
)


@dataclasses.dataclass(frozen=True)
class WordNetConcept:
    """A candidate concept: a ``word``, the ``relation`` that produced it, and the ``classes`` it came from."""

    word: str
    relation: str
    classes: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return PROMPTS[self.relation].format(_with_article(self.word))


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _lemma(synset) -> str:
    return synset.lemma_names()[0].replace("_", " ").lower()


def class_synsets(class_names: Sequence[str], *, wn=None, synsets: Mapping[str, str] | None = None) -> list:
    """One WordNet noun synset per class: ``synsets[name]`` when given, else the first noun sense of the name.

    Raises:
        ValueError: a class name with no noun sense in WordNet (pass ``synsets={name: "word.n.01"}``), or an
        unknown synset name.
    """
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError("class_names must be a non-empty list of class names")
    wn = wn if wn is not None else _wordnet()
    synsets = dict(synsets or {})
    out = []
    for name in class_names:
        if name in synsets:
            try:
                out.append(wn.synset(synsets[name]))
            except Exception as err:  # nltk raises WordNetError or ValueError
                raise ValueError(f"{synsets[name]!r} (for class {name!r}) is not a WordNet synset name such as "
                                 "'sandal.n.01'") from err
            continue
        found = wn.synsets(name.strip().lower().replace(" ", "_"), pos="n")
        if not found:
            raise ValueError(f"class name {name!r} is not in WordNet: pass synsets={{{name!r}: 'word.n.01'}} with a "
                             "sense you chose (look one up with helpers.assets.wordnet().synsets('word'))")
        out.append(found[0])
    return out


def _wordnet():
    from helpers.assets import wordnet

    return wordnet()


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def class_lemmas(class_names: Sequence[str], *, wn=None, synsets: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every name a class goes by: its display name and the lemma names of its synset, lower case, sorted.

    >>> class_lemmas(["Ankle boot"], synsets={"Ankle boot": "boot.n.01"})
    ('ankle boot', 'boot')
    """
    targets = class_synsets(class_names, wn=wn, synsets=synsets)
    names = {n.lower() for n in class_names} | {n.replace("_", " ").lower() for s in targets for n in s.lemma_names()}
    return tuple(sorted(names))


def leaks_class_name(word: str, lemmas: Sequence[str], *, min_substring: int = 3, min_stem: int = 4) -> bool:
    """Does a candidate concept name a class? The rule of the chapter's dictionary filter.

    Both ``word`` and every class lemma are split into lower-case letter runs (tokens); tokens shorter than
    ``min_substring`` letters ("t" of "T-shirt", "s" of "woman's") are ignored. The word leaks a class name
    when one of its tokens ``t`` and one lemma token ``l``

    * are equal ("ankle" and "ankle boot"), or
    * one contains the other ("shirtfront" contains "shirt", "pocket" is inside "pocketbook"), or
    * share a stem: a common prefix of at least ``min_stem`` letters ("pulling" and "pullover").

    The rule is deliberately coarse: a collateral drop ("pocket", because a handbag is also a
    "pocketbook") costs one word, a leak lets the class name explain the class.

    >>> lemmas = ("coat", "pullover", "shirt", "t-shirt")
    >>> [w for w in ("coattail", "pulling", "shirt button", "collar", "cover") if leaks_class_name(w, lemmas)]
    ['coattail', 'pulling', 'shirt button']
    """
    if isinstance(lemmas, str):
        raise ValueError("lemmas must be a list of class names, e.g. class_lemmas(FASHION_CLASSES)")
    if min_substring < 1 or min_stem < 1:
        raise ValueError(f"need min_substring >= 1 and min_stem >= 1, got {min_substring}, {min_stem}")
    words = [t for t in _tokens(word) if len(t) >= min_substring]
    names = {t for lemma in lemmas for t in _tokens(lemma) if len(t) >= min_substring}
    for t in words:
        for n in names:
            stem = len(t) >= min_stem and len(n) >= min_stem and t[:min_stem] == n[:min_stem]
            if t == n or t in n or n in t or stem:
                return True
    return False


def visible_noun(word: str, *, wn=None) -> bool:
    """Is a gloss word a visible thing? True when WordNet uses it mostly as a noun and its first noun sense is physical.

    "Mostly a noun": in WordNet's sense-tagged counts the noun senses outnumber every other part of speech,
    or the word has no other part of speech ("personal" in "small personal items" is an adjective).
    "Physical": the most frequent noun sense descends from ``physical_entity.n.01`` ("money", "item" and
    "half" do not). Hypernyms and parts come from WordNet as synsets and are not filtered by this rule.
    """
    wn = wn if wn is not None else _wordnet()
    key = word.strip().lower().replace(" ", "_")
    senses = wn.synsets(key, pos="n")
    if not senses:
        return False
    counts: dict[str, int] = {}
    for lemma in wn.lemmas(key):
        pos = lemma.synset().pos().replace("s", "a")  # satellite adjectives count as adjectives
        counts[pos] = counts.get(pos, 0) + lemma.count()
    if any(pos != "n" and c >= counts.get("n", 0) for pos, c in counts.items()):
        return False
    physical = wn.synset("physical_entity.n.01")
    return physical in senses[0].closure(lambda s: s.hypernyms() + s.instance_hypernyms())


def wordnet_concepts(class_names: Sequence[str], *, wn=None, synsets: Mapping[str, str] | None = None,
                     hypernym_depth: int = 2, inherit_parts: bool = True, gloss: bool = True,
                     drop_class_names: bool = True, visible_gloss: bool = True) -> list[WordNetConcept]:
    """Candidate concepts for each class from WordNet: hypernyms, part meronyms and nouns of the gloss.

    Args:
        class_names: the classes, e.g. ``assets.FASHION_CLASSES``.
        wn: a WordNet reader (default :func:`helpers.assets.wordnet`).
        synsets: class name → synset name where the first noun sense is wrong or missing
            (:data:`FASHION_SYNSETS`).
        hypernym_depth: how many levels of hypernyms to climb ("sandal" → "shoe" → "footwear").
        inherit_parts: also take the part meronyms of the direct hypernyms (a sandal has a shoe's parts).
        gloss: also take the nouns of the definition ("a shoe consisting of a sole fastened by straps").

        drop_class_names: leave out every word that shares a token, a substring or a stem with the name of
            *any* class (:func:`leaks_class_name` against :func:`class_lemmas`): "coattail", "shirt button",
            "pulling" (for pullover) would let the class name explain the class.
        visible_gloss: keep a gloss word only when it names a visible thing (:func:`visible_noun`; drops
            "money", "personal", "item").

    Returns:
        one :class:`WordNetConcept` per distinct word, with every class it came from; a word found by several
        relations keeps the first of hypernym, part, gloss. The classes' own names are always left out.
    """
    wn = wn if wn is not None else _wordnet()
    if hypernym_depth < 0:
        raise ValueError(f"hypernym_depth must be >= 0, got {hypernym_depth}")
    targets = class_synsets(class_names, wn=wn, synsets=synsets)
    own = {n.replace("_", " ").lower() for s in targets for n in s.lemma_names()}
    lemmas = class_lemmas(class_names, wn=wn, synsets=synsets)
    found: dict[str, tuple[str, set[int]]] = {}

    def add(word: str, relation: str, c: int) -> None:
        word = word.replace("_", " ").lower()
        if word in own or (drop_class_names and leaks_class_name(word, lemmas)):
            return
        if visible_gloss and relation == "gloss" and not visible_noun(word, wn=wn):
            return
        if word not in found:
            found[word] = (relation, set())
        elif list(RELATIONS).index(relation) < list(RELATIONS).index(found[word][0]):
            found[word] = (relation, found[word][1])
        found[word][1].add(c)

    for c, synset in enumerate(targets):
        level = [synset]
        for _ in range(hypernym_depth):
            level = [h for s in level for h in s.hypernyms()]
            for h in level:
                add(_lemma(h), "hypernym", c)
        holders = [synset] + (synset.hypernyms() if inherit_parts else [])
        for holder in holders:
            for part in holder.part_meronyms():
                add(_lemma(part), "part", c)
        if gloss:
            for token in re.findall(r"[a-z]+", synset.definition().lower()):
                noun = wn.morphy(token, "n")
                if len(token) >= 3 and token not in _STOPWORDS and noun and noun not in _STOPWORDS:
                    add(noun, "gloss", c)
    return [WordNetConcept(w, r, tuple(sorted(cs))) for w, (r, cs) in found.items()]


def concept_auc(scores: Tensor | np.ndarray, positives: Tensor | np.ndarray) -> np.ndarray:
    """Per-concept ROC AUC of ``scores [N, K]`` for separating ``positives [N, K]`` (bool) from the rest.

    The Mann-Whitney statistic with average ranks for ties; ``nan`` where a concept has no positive or
    no negative image.

    >>> concept_auc(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([[0], [0], [1], [1]], bool)).tolist()
    [0.75]
    """
    from scipy.stats import rankdata

    scores, positives = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    if scores.ndim != 2 or scores.shape != positives.shape:
        raise ValueError(f"scores and positives must both be [N, K], got {scores.shape} and {positives.shape}")
    ranks = rankdata(scores, axis=0)
    n_pos = positives.sum(0)
    n_neg = len(scores) - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * positives).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def class_positives(labels: Tensor | np.ndarray, classes: Sequence[Sequence[int]]) -> np.ndarray:
    """``[N, K]`` bool: image ``n`` has concept ``k`` when its label is one of ``classes[k]`` (class-level truth)."""
    labels = np.asarray(labels)
    return np.stack([np.isin(labels, list(cs)) for cs in classes], 1)


def ground_concepts(model: clip.ClipLike, candidates: Sequence[WordNetConcept], image_emb: Tensor, labels: Tensor, *,
                    min_auc: float = 0.75, max_concepts: int = 50) -> tuple[list[WordNetConcept], np.ndarray]:
    """Keep the candidates the multimodal model grounds: AUC of ``cos(image, prompt)`` on labelled images.

    A word is grounded when its prompt's similarity ranks the images of the classes the word came from
    above the others (AUC >= ``min_auc``); the best ``max_concepts`` are kept.

    Args:
        image_emb: ``[N, d]`` normalised image embeddings of *labelled* images; labels ``[N]``.

    Returns:
        ``(kept candidates, best first; AUC of every candidate [len(candidates)])``.
    """
    if len(candidates) == 0:
        raise ValueError("no candidate concepts: build them with wordnet_concepts(class_names)")
    if not 0 <= min_auc <= 1 or max_concepts < 1:
        raise ValueError(f"need min_auc in [0, 1] and max_concepts >= 1, got {min_auc}, {max_concepts}")
    text = model.encode_text([c.prompt for c in candidates])  # [K, d]
    auc = concept_auc((image_emb @ text.T).numpy(), class_positives(labels, [c.classes for c in candidates]))
    order = [int(i) for i in np.argsort(-np.nan_to_num(auc, nan=-1), kind="stable") if auc[i] >= min_auc]
    return [candidates[i] for i in order[:max_concepts]], auc


def wordnet_bank(concepts: Sequence[WordNetConcept]) -> clip.ConceptBank:
    """A :class:`helpers.clip.ConceptBank` of WordNet concepts, grouped by relation (:data:`RELATIONS`)."""
    rows = sorted(((c.word, c.prompt, RELATIONS[c.relation]) for c in concepts),
                  key=lambda r: list(RELATIONS.values()).index(r[2]))
    return clip.ConceptBank.from_rows(rows)


def random_concepts(n: int, *, wn=None, n_groups: int = 3, seed: int = 0,
                    exclude: Sequence[str] = ()) -> clip.ConceptBank:
    """The control dictionary: ``n`` random single-word WordNet nouns in ``n_groups`` random groups.

    Prompts are ``"a photo of a <word>."``; ``exclude`` words (e.g. the other dictionaries') are never drawn.
    """
    if n < 1 or n_groups < 1:
        raise ValueError(f"need n >= 1 and n_groups >= 1, got {n}, {n_groups}")
    wn = wn if wn is not None else _wordnet()
    skip = {w.lower() for w in exclude}
    words = sorted(w for w in wn.all_lemma_names(pos="n") if w.isalpha() and w.islower() and 4 <= len(w) <= 10
                   and w not in skip)
    rng = np.random.default_rng(seed)
    chosen = [words[i] for i in rng.choice(len(words), size=n, replace=False)]
    rows = [(w, f"a photo of {_with_article(w)}.", f"random {1 + k % n_groups}") for k, w in enumerate(chosen)]
    return clip.ConceptBank.from_rows(sorted(rows, key=lambda r: r[2]))


def edit_bank(bank: clip.ConceptBank, *, remove: Sequence[str] = (),
              add: Sequence[tuple[str, str, str]] = ()) -> clip.ConceptBank:
    """A copy of ``bank`` without the concepts named in ``remove`` and with ``(name, prompt, group)`` rows added.

    >>> edit_bank(clip.FASHION_CONCEPTS, remove=["laces"], add=[("zip", "a bag with a zip", "accessory")]).names[-1]
    'zip'
    """
    unknown = [r for r in remove if r not in bank.names]
    if unknown:
        raise ValueError(f"cannot remove {unknown}: not in the bank")
    rows = [(n, p, g) for n, p, g in zip(bank.names, bank.prompts, bank.groups, strict=True) if n not in set(remove)]
    return clip.ConceptBank.from_rows([*rows, *add])


def concept_scores(model: clip.ClipLike, image_emb: Tensor, bank: clip.ConceptBank | Sequence[str]) -> Tensor:
    """CB2's concept probabilities from precomputed image embeddings ``[N, d]`` → ``[N, K]`` (rows sum to 1).

    The same as :func:`helpers.clip.concept_probabilities` without re-encoding the images for every bank.
    """
    prompts = list(bank.prompts) if isinstance(bank, clip.ConceptBank) else list(bank)
    text = model.encode_text(prompts)  # [K, d]
    return (model.logit_scale * image_emb @ text.T).softmax(-1)


def group_lists(groups: Sequence[str]) -> list[list[int]]:
    """Concept indices of each group name, in order of first appearance (the student's ``groups`` argument).

    >>> group_lists(["a", "b", "a"])
    [[0, 2], [1]]
    """
    out: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# Concept activation vectors
# ---------------------------------------------------------------------------------------------


def concept_activation_vectors(image_emb: Tensor, positives: Tensor | np.ndarray, *, c: float = 1.0) -> Tensor:
    """CAVs (Kim et al. 2018): per concept, a linear classifier of with- vs without-concept embeddings; its unit normal.

    Args:
        image_emb: ``[N, d]`` embeddings of the (few) labelled examples.
        positives: ``[N, K]`` bool, which examples show each concept.
        c: inverse L2 regularisation of the logistic regression (classes balanced).

    Returns:
        ``[K, d]`` unit vectors pointing towards the concept; ``image_emb @ cavs.T`` scores new images.
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(image_emb, dtype=float)
    positives = np.asarray(positives, dtype=bool)
    if x.ndim != 2 or positives.ndim != 2 or len(x) != len(positives):
        raise ValueError(f"need image_emb [N, d] and positives [N, K], got {x.shape} and {positives.shape}")
    cavs = []
    for k in range(positives.shape[1]):
        y = positives[:, k]
        if y.all() or not y.any():
            raise ValueError(f"concept {k} needs examples with and without it; got {int(y.sum())} of {len(y)}")
        fit = LogisticRegression(C=c, class_weight="balanced", max_iter=1000).fit(x, y)
        cavs.append(fit.coef_[0] / np.linalg.norm(fit.coef_[0]))
    return torch.tensor(np.stack(cavs), dtype=torch.float32)


def within_class_auc(scores: Tensor | np.ndarray, positives: Tensor | np.ndarray,
                     labels: Tensor | np.ndarray) -> np.ndarray:
    """Per-concept ROC AUC computed inside each class, then averaged over the classes where it is defined.

    A score that only tells classes apart gets 0.5 here: it must rank the images *of one class* that show
    the concept above those of the same class that do not (image-level truth, e.g. a pixel rule).

    Args:
        scores: ``[N, K]`` concept scores; positives: ``[N, K]`` bool image-level truth; labels: ``[N]`` classes.

    Returns:
        ``[K]`` mean within-class AUC; ``nan`` where no class has both positive and negative images.

    >>> s = np.array([[0.9], [0.1], [0.2], [0.8]])        # two classes, the concept ranked right in class 0 only
    >>> within_class_auc(s, np.array([[1], [0], [1], [0]], bool), np.array([0, 0, 1, 1])).tolist()
    [0.5]
    """
    scores, positives, labels = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool), np.asarray(labels)
    if scores.ndim != 2 or scores.shape != positives.shape or labels.shape != (len(scores),):
        raise ValueError(f"need scores [N, K], positives [N, K] and labels [N], got {scores.shape}, "
                         f"{positives.shape} and {labels.shape}")
    per_class = np.stack([concept_auc(scores[labels == c], positives[labels == c]) for c in np.unique(labels)])
    with np.errstate(invalid="ignore"):
        defined = ~np.isnan(per_class)
        return np.where(defined.any(0), np.nansum(per_class, 0) / defined.sum(0).clip(min=1), np.nan)


@dataclasses.dataclass(frozen=True)
class CavTest:
    """TCAV's significance test of one concept (Kim et al. 2018, §3.5), on a grounding statistic.

    ``concept`` and ``random`` hold the statistic of each run's concept CAV and random CAV; ``t`` and ``p``
    come from a two-sided Welch t-test of the two samples."""

    concept: np.ndarray
    random: np.ndarray
    t: float
    p: float

    def significant(self, alpha: float = 0.05, *, n_tests: int = 1) -> bool:
        """p below ``alpha / n_tests`` (Bonferroni, as Kim et al. correct for several concepts)."""
        return bool(self.p < alpha / n_tests)


def cav_significance(image_emb: Tensor, positives: Tensor | np.ndarray, statistic, *, n_runs: int = 10,
                     fraction: float = 0.5, seed: int = 0, c: float = 1.0) -> CavTest:
    """Is a CAV better than a random direction? TCAV's test with ``n_runs`` concept and random CAVs.

    Run ``r`` draws a random ``fraction`` of the examples; its concept CAV is fitted on them with the
    concept's labels, its random CAV on the same examples with those labels permuted (a random concept with
    as many positives). ``statistic(cav [d]) -> float`` scores each CAV on held-out data (e.g. the
    :func:`within_class_auc` of ``u_test @ cav`` against a pixel rule); the two samples of ``n_runs`` values
    are compared with a two-sided t-test, as Kim et al. compare TCAV scores against random CAVs.

    Args:
        image_emb: ``[N, d]`` embeddings of the labelled examples; positives: ``[N]`` bool, which show the concept.

    Returns:
        a :class:`CavTest`.
    """
    from scipy.stats import ttest_ind

    positives = np.asarray(positives, dtype=bool)
    if positives.ndim != 1 or len(positives) != len(image_emb):
        raise ValueError(f"positives must be [N] bool for image_emb [N, d], got {positives.shape} and "
                         f"{tuple(image_emb.shape)}")
    if n_runs < 2 or not 0 < fraction <= 1:
        raise ValueError(f"need n_runs >= 2 and fraction in (0, 1], got {n_runs}, {fraction}")
    rng = np.random.default_rng(seed)
    concept, random = [], []
    for _ in range(n_runs):
        for _ in range(100):  # redraw until the subsample has examples with and without the concept
            idx = rng.choice(len(positives), size=max(2, round(fraction * len(positives))), replace=False)
            y = positives[idx]
            if 0 < y.sum() < len(y):
                break
        else:
            raise ValueError(f"the concept needs examples with and without it, got {int(positives.sum())} of "
                             f"{len(positives)}")
        pair = np.stack([y, rng.permutation(y)], 1)
        cavs = concept_activation_vectors(image_emb[torch.as_tensor(idx)], pair, c=c)
        concept.append(float(statistic(cavs[0])))
        random.append(float(statistic(cavs[1])))
    concept, random = np.array(concept), np.array(random)
    t, p = ttest_ind(concept, random, equal_var=False)
    return CavTest(concept, random, float(t), float(p))


# ---------------------------------------------------------------------------------------------
# Linear probe and self-training
# ---------------------------------------------------------------------------------------------


def augment(images: Tensor, *, seed: int = 0, max_shift: int = 2) -> Tensor:
    """A second view of each image: a random shift of up to ``max_shift`` pixels and a random horizontal flip."""
    images = data.check_images(images)
    generator = torch.Generator().manual_seed(seed)
    background = -data.FASHION_MEAN / data.FASHION_STD  # a black pixel, normalised
    n = len(images)
    flip = torch.rand(n, generator=generator) < 0.5
    out = torch.where(flip[:, None, None, None], images.flip(-1), images)
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator)
    padded = F.pad(out, (max_shift,) * 4, value=background)  # [N, 1, 28 + 2s, 28 + 2s]
    rows = (torch.arange(28)[None, :] + max_shift - shifts[:, :1])  # [N, 28]
    cols = (torch.arange(28)[None, :] + max_shift - shifts[:, 1:])
    return padded[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


def fit_probe(x: Tensor, y: Tensor, *, n_classes: int, sample_weight: Tensor | None = None, steps: int = 300,
              lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression on frozen features ``x [N, d]``, classes weighted equally (full batch, Adam).

    Each class's examples share the same total weight, so rare classes count as much as common ones.
    """
    if x.ndim != 2 or y.shape != (len(x),):
        raise ValueError(f"need x [N, d] and y [N], got {tuple(x.shape)} and {tuple(y.shape)}")
    torch.manual_seed(seed)
    weight = torch.ones(len(x)) if sample_weight is None else sample_weight.float()
    per_class = torch.zeros(n_classes).index_add_(0, y, weight)
    weight = weight / per_class[y].clamp_min(1e-9)
    weight = weight / weight.sum()
    probe = torch.nn.Linear(x.shape[1], n_classes)
    optimiser = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = (F.cross_entropy(probe(x), y, reduction="none") * weight).sum()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    return probe.eval().requires_grad_(False)


@dataclasses.dataclass
class SelfTraining:
    """The outcome of :func:`self_train`: the final ``probe``, ``pseudo`` labels of the unlabelled images
    (``-1``: not used) and per-round ``history`` (``n_pseudo``, ``per_class``)."""

    probe: torch.nn.Linear
    pseudo: Tensor
    history: list[dict]
    supervised: torch.nn.Linear


def self_train(x_lab: Tensor, y_lab: Tensor, x_unlab: Tensor, *, n_classes: int, seed_logits: Tensor | None = None,
               seed_classes: Sequence[int] = (), x_unlab_view: Tensor | None = None, rounds: int = 3,
               threshold: float = 0.9, pseudo_weight: float = 1.0, **probe_options) -> SelfTraining:
    """Pseudo-labelling with a consistency check, seeded by zero-shot predictions (Lee 2013; Sohn et al. 2020).

    Round 0 fits a probe on the labelled examples only (the supervised baseline). Each round then
    pseudo-labels an unlabelled image

    * with the seed (zero-shot) class when that class is in ``seed_classes`` (those the zero-shot model
      is trusted on, see :func:`trusted_classes`) and ``softmax(seed_logits)`` reaches ``threshold``;
    * otherwise with the probe's class when the probe reaches ``threshold`` *and* gives the same class to
      the image's second view ``x_unlab_view`` (e.g. :func:`augment`; the consistency check),

    and refits the probe on the labelled examples plus the pseudo-labelled ones (both views, weight
    ``pseudo_weight``; classes weighted equally). The function only sees the labels it is given (``y_lab``,
    one per row of ``x_lab``): it cannot read the labels of unlabelled or test images.

    Returns:
        a :class:`SelfTraining`.
    """
    if len(x_lab) != len(y_lab) or x_lab.ndim != 2 or x_unlab.ndim != 2 or x_lab.shape[1] != x_unlab.shape[1]:
        raise ValueError(f"need x_lab [L, d], y_lab [L], x_unlab [U, d]; got {tuple(x_lab.shape)}, "
                         f"{tuple(y_lab.shape)}, {tuple(x_unlab.shape)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    for name, t in (("seed_logits", seed_logits), ("x_unlab_view", x_unlab_view)):
        if t is not None and len(t) != len(x_unlab):
            raise ValueError(f"{name} needs one row per unlabelled image ({len(x_unlab)}), got {len(t)}")
    if seed_logits is None and len(seed_classes):
        raise ValueError("seed_classes needs seed_logits (e.g. zero-shot logits of the unlabelled images)")
    from_seed = torch.zeros(len(x_unlab), dtype=torch.bool)
    seed_guess = torch.zeros(len(x_unlab), dtype=torch.long)
    if seed_logits is not None:
        seed_confidence, seed_guess = seed_logits.softmax(-1).max(-1)
        from_seed = torch.isin(seed_guess, torch.as_tensor(list(seed_classes), dtype=torch.long))
        from_seed &= seed_confidence >= threshold
    supervised = probe = fit_probe(x_lab, y_lab, n_classes=n_classes, **probe_options)
    pseudo = torch.full((len(x_unlab),), -1)
    history = []
    for _ in range(rounds):
        confidence, guess = probe(x_unlab).softmax(-1).max(-1)
        keep = (confidence >= threshold) & ~from_seed
        if x_unlab_view is not None:
            keep &= probe(x_unlab_view).argmax(-1) == guess
        guess = torch.where(from_seed, seed_guess, guess)
        keep |= from_seed
        pseudo = torch.where(keep, guess, -1)
        views = [x_unlab] if x_unlab_view is None else [x_unlab, x_unlab_view]
        xs = torch.cat([x_lab, *(v[keep] for v in views)])
        ys = torch.cat([y_lab, *(guess[keep] for _ in views)])
        ws = torch.cat([torch.ones(len(x_lab)), torch.full((len(views) * int(keep.sum()),), pseudo_weight)])
        probe = fit_probe(xs, ys, n_classes=n_classes, sample_weight=ws, **probe_options)
        history.append({"n_pseudo": int(keep.sum()), "n_from_seed": int(from_seed.sum()),
                        "per_class": torch.bincount(guess[keep], minlength=n_classes).tolist()})
    return SelfTraining(probe, pseudo, history, supervised)


def trusted_classes(seed_pred: Tensor, y_lab: Tensor, *, n_classes: int, min_recall: float = 0.5) -> list[int]:
    """Classes whose labelled examples the seed (zero-shot) model recognises with recall >= ``min_recall``.

    The few labels say where zero-shot predictions may seed pseudo-labels (not on classes it does not know).

    >>> trusted_classes(torch.tensor([0, 0, 1, 0]), torch.tensor([0, 0, 1, 1]), n_classes=3)
    [0, 1]
    """
    if seed_pred.shape != y_lab.shape:
        raise ValueError(f"seed_pred and y_lab must have the same shape, got {tuple(seed_pred.shape)} and "
                         f"{tuple(y_lab.shape)}")
    out = []
    for c in range(n_classes):
        mask = y_lab == c
        if mask.any() and float((seed_pred[mask] == c).float().mean()) >= min_recall:
            out.append(c)
    return out


def classification_scores(y_true: Tensor, y_pred: Tensor, *, rare_classes: Sequence[int] = RARE_CLASSES,
                          n_classes: int = 10) -> dict[str, float]:
    """Accuracy, macro-F1 and the recall of each rare class (``"recall <c>"``).

    >>> classification_scores(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), rare_classes=[1], n_classes=2)
    {'accuracy': 0.6666666666666666, 'macro-F1': 0.6666666666666666, 'recall 1': 0.5}
    """
    from sklearn.metrics import f1_score, recall_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred must have the same shape, got {y_true.shape} and {y_pred.shape}")
    labels = list(range(n_classes))
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out = {"accuracy": float((y_true == y_pred).mean()),
           "macro-F1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))}
    out.update({f"recall {c}": float(recall[c]) for c in rare_classes})
    return out


def fit_student(z: Tensor, teacher_logits: Tensor, groups: Sequence[str], *, epochs: int = 10,
                batch_size: int = 1024, lr: float = 0.05, seed: int = 0, weights: Tensor | str | None = None,
                labels: Tensor | None = None, label_weight: float = 1.0):
    """Distil chapter 10's hierarchical Choquet student (fixed sigmoid utilities) on standardised scores ``z [N, K]``.

    ``groups`` gives each concept's group name. With the defaults this is plain distillation from the
    teacher's logits (:func:`helpers.choquet.distil`, ``T = 2``). ``weights`` (``"balanced"`` for
    :func:`class_balanced_weights`, or one weight per image) and ``labels`` (the semi-supervised objective)
    go through :func:`distil_student`; see there.

    Returns:
        the :class:`helpers.choquet.ChoquetStudent`.
    """
    from helpers import choquet

    if z.ndim != 2 or z.shape[1] != len(groups):
        raise ValueError(f"one group name per concept: z has shape {tuple(z.shape)}, groups {len(groups)}")
    common.set_seed(seed)
    student = choquet.ChoquetStudent(group_lists(groups), teacher_logits.shape[1], utility="sigmoid")
    if weights is None and labels is None:
        choquet.distil(student, z, teacher_logits, temperature=2.0, epochs=epochs, batch_size=batch_size, lr=lr,
                       seed=seed)
    else:
        distil_student(student, z, teacher_logits, weights=weights, labels=labels, label_weight=label_weight,
                       epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    return student


# --------------------------------------------------------------------------------------------------
# Class-balanced and semi-supervised students, several seeds
# --------------------------------------------------------------------------------------------------

STUDENT_KINDS = ("Choquet", "linear", "MLP")
"""The students of :func:`make_student`: chapter 10's hierarchical Choquet student (sigmoid utilities), a
linear layer, and a one-hidden-layer MLP (256 ReLU units), as in chapter 10's comparison."""

STUDENT_OBJECTIVES = ("distillation", "class-balanced distillation", "semi-supervised")
"""The objectives of :func:`student_study`: :func:`distil_student` without weights (the chapter's student),
with :func:`class_balanced_weights`, and with the labelled images' cross-entropy added to the class-balanced
distillation of the unlabelled ones."""


def class_balanced_weights(teacher_logits: Tensor) -> Tensor:
    """One weight per image, the inverse frequency of the teacher's predicted class, normalised to mean 1.

    Every predicted class then carries the same total weight, ``N / (number of classes predicted)``, so the
    rare classes count in a distillation loss as much as the common ones; no label is read.

    >>> class_balanced_weights(torch.tensor([[2.0, 0.0], [3.0, 1.0], [1.0, 4.0]])).tolist()
    [0.75, 0.75, 1.5]
    """
    if teacher_logits.ndim != 2 or len(teacher_logits) == 0:
        raise ValueError(f"need teacher logits [N >= 1, classes], got shape {tuple(teacher_logits.shape)}")
    pred = teacher_logits.argmax(-1)
    counts = torch.bincount(pred, minlength=teacher_logits.shape[1]).float()
    n_present = int((counts > 0).sum())
    return len(pred) / (n_present * counts[pred])


def distil_student(student: torch.nn.Module, z: Tensor, teacher_logits: Tensor, *, weights: Tensor | str | None = None,
                   labels: Tensor | None = None, label_weight: float = 1.0, temperature: float = 2.0,
                   epochs: int = 10, batch_size: int = 1024, lr: float = 0.05, seed: int = 0) -> list[float]:
    """Train any student ``z [N, K] -> logits`` by weighted distillation, optionally with labels (semi-supervised).

    The distillation term of a batch ``B`` is ``(1/|B|) Σ_i w_i T² KL(softmax(t_i / T) || softmax(s_i / T))``,
    with weights normalised to mean 1 over the distilled images, so equal weights give back
    :func:`helpers.choquet.distil` (same batches, same Adam). ``weights="balanced"`` uses
    :func:`class_balanced_weights` of the distilled images' teacher logits (no labels needed).

    With ``labels`` (``[N]``, ``-1`` for an unlabelled image), only the unlabelled images are distilled, and
    every step adds ``label_weight`` times the cross-entropy of *all* the labelled images, each class's
    images sharing the same total weight (as :func:`fit_probe`).

    Returns:
        the mean loss of each epoch.
    """
    if z.ndim != 2 or teacher_logits.ndim != 2 or len(z) != len(teacher_logits):
        raise ValueError(f"need z [N, K] and teacher_logits [N, classes], got {tuple(z.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0 or epochs < 1 or batch_size < 1 or lr <= 0 or label_weight < 0:
        raise ValueError(f"need temperature, lr > 0, epochs, batch_size >= 1 and label_weight >= 0, got "
                         f"{temperature}, {lr}, {epochs}, {batch_size}, {label_weight}")
    from helpers import choquet

    n_classes = teacher_logits.shape[1]
    distilled = torch.arange(len(z))
    lab_x = lab_y = lab_w = None
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (len(z),) or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"labels must be integers [N] = [{len(z)}] (-1: unlabelled), got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if int(labels.max()) >= n_classes or int(labels.min()) < -1:
            raise ValueError(f"labels must be -1 (unlabelled) or a class in [0, {n_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        is_lab = labels >= 0
        if not is_lab.any() or is_lab.all():
            raise ValueError("labels needs both labelled (>= 0) and unlabelled (-1) images")
        distilled = torch.nonzero(~is_lab).squeeze(1)
        lab_x, lab_y = z[is_lab], labels[is_lab].long()
        per_class = torch.bincount(lab_y, minlength=n_classes).float()
        lab_w = 1.0 / per_class[lab_y]
        lab_w = lab_w / lab_w.sum()
    if isinstance(weights, str):
        if weights != "balanced":
            raise ValueError(f"weights must be 'balanced', a tensor [N] or None, got {weights!r}")
        w = class_balanced_weights(teacher_logits[distilled])
    elif weights is None:
        w = torch.ones(len(distilled))
    else:
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if weights.shape != (len(z),) or not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"weights must be finite and >= 0, one per image ({len(z)}), got shape "
                             f"{tuple(weights.shape)}")
        w = weights[distilled]
        if float(w.sum()) <= 0:
            raise ValueError("weights of the distilled images sum to 0")
    w = w / w.mean()

    def labelled_term(student):   # label_weight x the class-balanced cross-entropy of every labelled image
        return label_weight * (lab_w * F.cross_entropy(student(lab_x), lab_y, reduction="none")).sum()

    return choquet.distil(student, z[distilled], teacher_logits[distilled], temperature=temperature, epochs=epochs,
                          batch_size=batch_size, lr=lr, seed=seed, weights=w,
                          extra_loss=None if lab_x is None else labelled_term)


def make_student(kind: str, n_features: int, n_classes: int, *, groups: Sequence[str] | None = None,
                 seed: int = 0) -> torch.nn.Module:
    """A fresh student of :data:`STUDENT_KINDS`, its weights drawn with ``seed``.

    The Choquet student needs ``groups`` (one group name per feature) and starts from fixed weights, so its
    seed only changes the batch order of the training; the linear and MLP students draw their weights.
    """
    from helpers import choquet

    if kind not in STUDENT_KINDS:
        raise ValueError(f"kind must be one of {STUDENT_KINDS}, got {kind!r}")
    if n_features < 1 or n_classes < 2:
        raise ValueError(f"need n_features >= 1 and n_classes >= 2, got {n_features} and {n_classes}")
    torch.manual_seed(seed)
    if kind == "Choquet":
        if groups is None or len(groups) != n_features:
            raise ValueError(f"a Choquet student needs one group name per feature ({n_features})")
        return choquet.ChoquetStudent(group_lists(groups), n_classes, utility="sigmoid")
    if kind == "linear":
        return torch.nn.Linear(n_features, n_classes)
    return torch.nn.Sequential(torch.nn.Linear(n_features, 256), torch.nn.ReLU(), torch.nn.Linear(256, n_classes))


def _objective_options(objective: str, labels: Tensor, label_weight: float) -> dict:
    if objective not in STUDENT_OBJECTIVES:
        raise ValueError(f"objective must be one of {STUDENT_OBJECTIVES}, got {objective!r}")
    if objective == "distillation":
        return {}
    if objective == "class-balanced distillation":
        return {"weights": "balanced"}
    return {"weights": "balanced", "labels": labels, "label_weight": label_weight}


def train_study_student(spec: Sequence, objective: str, seed: int, features: Mapping[str, tuple[Tensor, Tensor]],
                        teacher_pool: Tensor, labels: Tensor, groups: Sequence[str], *, epochs: int = 8,
                        batch_size: int = 1024, label_weight: float = 1.0) -> torch.nn.Module:
    """One run of :func:`student_study`: the student ``spec = (kind, feature name, lr)`` trained with one
    objective of :data:`STUDENT_OBJECTIVES` and one seed (initialisation and batch order)."""
    kind, feature, lr = spec
    if feature not in features:
        raise ValueError(f"no features named {feature!r}; have {sorted(features)}")
    z_pool = features[feature][0]
    student = make_student(kind, z_pool.shape[1], teacher_pool.shape[1], groups=groups if kind == "Choquet" else None,
                           seed=seed)
    distil_student(student, z_pool, teacher_pool, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                   **_objective_options(objective, labels, label_weight))
    return student


def student_study(features: Mapping[str, tuple[Tensor, Tensor]], teacher_pool: Tensor, teacher_test: Tensor,
                  labels: Tensor, y_test: Tensor, groups: Sequence[str], *, students: Mapping[str, Sequence],
                  objectives: Sequence[str] = STUDENT_OBJECTIVES, seeds: Sequence[int] = (0, 1, 2), epochs: int = 8,
                  batch_size: int = 1024, label_weight: float = 1.0, rare_classes: Sequence[int] = RARE_CLASSES,
                  keep_logits: tuple[str, str, int] | None = None) -> dict:
    """Every student × objective × seed, scored on the test images.

    Args:
        features: ``{name: (pool [N, d], test [M, d])}`` the inputs of the students (concept scores, embeddings).
        teacher_pool, teacher_test: the black box's logits ``[N, C]`` and ``[M, C]``.
        labels: ``[N]`` the pool's labels, ``-1`` where unlabelled (read by the semi-supervised objective only).
        y_test: ``[M]`` test labels (for the scores only).
        groups: one group name per concept of the Choquet student's features.
        students: ``{name: (kind of STUDENT_KINDS, feature name, learning rate)}``.
        keep_logits: ``(student, objective, seed)`` whose test logits are kept, for a live check.

    Returns:
        a dict with ``"pred"`` ``{"student/objective": int16 [seed, M]}``, ``"scores"``
        ``{"student/objective": {"faithfulness", "accuracy", "macro-F1", "rare recall": [seed]}}``,
        ``"seconds"`` ``{"student/objective": [seed]}``, ``"seeds"`` and ``"logits"`` (the kept logits
        ``[M, C]``, or an empty tensor).
    """
    import time

    from helpers import choquet

    if len(seeds) < 1 or len(set(seeds)) != len(seeds):
        raise ValueError(f"need distinct seeds, got {seeds}")
    for name, (kind, feature, lr) in students.items():
        if kind not in STUDENT_KINDS or feature not in features or lr <= 0:
            raise ValueError(f"student {name!r} needs (kind of {STUDENT_KINDS}, feature of {sorted(features)}, lr > 0)")
    for name, (pool, test) in features.items():
        if pool.shape[0] != len(teacher_pool) or test.shape[0] != len(teacher_test) or pool.shape[1] != test.shape[1]:
            raise ValueError(f"features {name!r} need one row per pool and per test image, got {tuple(pool.shape)}, "
                             f"{tuple(test.shape)}")
    if len(y_test) != len(teacher_test):
        raise ValueError(f"y_test needs one label per test image ({len(teacher_test)}), got {len(y_test)}")
    for objective in objectives:
        _objective_options(objective, labels, label_weight)
    keep_logits = None if keep_logits is None else tuple(keep_logits)
    out = {"pred": {}, "scores": {}, "seconds": {}, "seeds": list(seeds), "logits": torch.empty(0)}
    for name, spec in students.items():
        for objective in objectives:
            key = f"{name}/{objective}"
            preds, scores, seconds = [], {m: [] for m in ("faithfulness", "accuracy", "macro-F1", "rare recall")}, []
            for seed in seeds:
                t0 = time.perf_counter()
                student = train_study_student(spec, objective, seed, features, teacher_pool, labels, groups,
                                              epochs=epochs, batch_size=batch_size, label_weight=label_weight)
                seconds.append(time.perf_counter() - t0)
                with torch.no_grad():
                    logits = student(features[spec[1]][1])
                if keep_logits == (name, objective, seed):
                    out["logits"] = logits.clone()
                pred = logits.argmax(1)
                s = classification_scores(y_test, pred, rare_classes=rare_classes, n_classes=teacher_test.shape[1])
                scores["faithfulness"].append(choquet.agreement(logits, teacher_test))
                scores["accuracy"].append(s["accuracy"])
                scores["macro-F1"].append(s["macro-F1"])
                scores["rare recall"].append(float(np.mean([s[f"recall {c}"] for c in rare_classes])))
                preds.append(pred.to(torch.int16))
            out["pred"][key], out["scores"][key], out["seconds"][key] = torch.stack(preds), scores, seconds
    return out



def student_study_results(features: Mapping[str, tuple[Tensor, Tensor]], teacher_pool: Tensor, teacher_test: Tensor,
                          labels: Tensor, y_test: Tensor, groups: Sequence[str], *, recipe: Mapping,
                          concept_names: Sequence[str]) -> dict:
    """:func:`student_study`'s results (``recipe`` = its keyword options), committed with the book and verified by
    SHA-256; rebuilt when missing or altered.

    The file is named by a hash of the recipe, the concept names and groups, and the integer inputs (pool
    labels, the teacher's predicted classes on pool and test, the test labels, the feature shapes): float
    inputs differ in their last bits between machines, so they are checked live instead (recompute one run).
    """
    key = {"recipe": dict(recipe), "concepts": list(concept_names), "groups": list(groups),
           "inputs": tensor_digest([torch.as_tensor(labels), teacher_pool.argmax(1), teacher_test.argmax(1),
                              torch.as_tensor(y_test)]),
           "shapes": {k: [list(p.shape), list(t.shape)] for k, (p, t) in features.items()}}

    def build(path) -> None:
        torch.save(student_study(features, teacher_pool, teacher_test, labels, y_test, groups, **recipe), path)

    path = common.cached_file(common.cache_dir("results", "ch11") / f"students-{common.content_hash(key)}.pt",
                              build, committed=True)
    return torch.load(path, weights_only=True)


# --------------------------------------------------------------------------------------------------
# The chapter's other committed studies: dictionary and probe students, TCAV tests, self-training
# --------------------------------------------------------------------------------------------------


def _committed_results(name: str, key: Mapping, build) -> dict:
    """Load ``results/ch11/<name>-<hash of key>.pt``, built by ``build(path)`` when missing (committed copy first)."""
    path = common.cached_file(common.cache_dir("results", "ch11") / f"{name}-{common.content_hash(dict(key))}.pt",
                              build, committed=True)
    return torch.load(path, weights_only=True)


def load_choquet_student(groups: Sequence[str], n_classes: int, state: Mapping[str, Tensor]):
    """A Choquet student of :func:`fit_student` (sigmoid utilities) with the weights of a state dict, in eval mode."""
    from helpers import choquet

    student = choquet.ChoquetStudent(group_lists(groups), n_classes, utility="sigmoid")
    student.load_state_dict(dict(state))
    return student.eval()


def choquet_students(runs: Mapping[str, tuple[Tensor, Tensor, Sequence[str]]], *, epochs: int = 8,
                     check: str | None = None, check_epochs: int | None = None) -> dict:
    """:func:`fit_student` for every run ``{name: (z_pool [N, K], teacher logits [N, C], groups [K])}``.

    Returns:
        ``{"state": {name: state dict}, "seconds": {name: s}, "check_state": ...}``; with ``check`` and
        ``check_epochs``, ``check_state`` is the state of run ``check`` trained for ``check_epochs`` epochs only
        (the first epochs of the full run: a cheap live check), else empty.
    """
    import time

    out = {"state": {}, "seconds": {}, "check_state": {}}
    for name, (z, teacher, groups) in runs.items():
        t0 = time.perf_counter()
        student = fit_student(z, teacher, groups, epochs=epochs)
        out["seconds"][name] = time.perf_counter() - t0
        out["state"][name] = {k: v.detach().clone() for k, v in student.state_dict().items()}
    if check is not None and check_epochs is not None:
        z, teacher, groups = runs[check]
        out["check_state"] = dict(fit_student(z, teacher, groups, epochs=check_epochs).state_dict())
    return out


def choquet_students_results(runs: Mapping[str, tuple[Tensor, Tensor, Sequence[str]]], *, name: str,
                             concepts: Mapping[str, Sequence[str]], epochs: int = 8, check: str | None = None,
                             check_epochs: int | None = None) -> tuple[dict, dict]:
    """:func:`choquet_students`, committed under ``helpers/weights/results/ch11/<name>-<hash>.pt``.

    The file is named by a hash of the runs' concepts (``concepts[run]``: the prompts behind ``z``), groups,
    input shapes and the teacher's predicted classes (integers: float inputs differ in their last bits between
    machines, so the notebook retrains a run live and compares it instead).

    Returns:
        ``({name: ChoquetStudent with the committed weights}, the loaded results)``.
    """
    key = {"epochs": epochs, "check": [check, check_epochs],
           "runs": {n: {"concepts": list(concepts[n]), "groups": list(g), "shape": list(z.shape),
                        "teacher": tensor_digest([t.argmax(1)])} for n, (z, t, g) in runs.items()}}

    def build(path) -> None:
        torch.save(choquet_students(runs, epochs=epochs, check=check, check_epochs=check_epochs), path)

    results = _committed_results(name, key, build)
    students = {n: load_choquet_student(g, t.shape[1], results["state"][n]) for n, (_, t, g) in runs.items()}
    return students, results


def cav_tests(image_emb: Tensor, tests: Mapping[str, tuple[np.ndarray, object]], *, n_runs: int = 10) -> dict:
    """:func:`cav_significance` of every test ``{name: (positives [N] bool, statistic)}`` on ``image_emb [N, d]``.

    Returns:
        ``{name: {"concept": [n_runs], "random": [n_runs], "t": float, "p": float}}`` (float64 tensors).
    """
    out = {}
    for name, (positives, statistic) in tests.items():
        t = cav_significance(image_emb, positives, statistic, n_runs=n_runs)
        out[name] = {"concept": torch.from_numpy(t.concept), "random": torch.from_numpy(t.random), "t": t.t, "p": t.p}
    return out


def cav_tests_results(image_emb: Tensor, tests: Mapping[str, tuple[np.ndarray, object]], *, n_runs: int = 10,
                      truth: Sequence[Tensor] = (), name: str = "cavtests") -> dict[str, CavTest]:
    """:func:`cav_tests`, committed under ``helpers/weights/results/ch11/<name>-<hash>.pt``.

    Named by the tests, ``n_runs``, each test's positives and the integer ``truth`` the statistics read (labels,
    pixel rules); the embeddings are floats, so the notebook recomputes one test live and compares it. The same
    tests in another embedding space need another ``name``: the hash does not see the embeddings.
    """
    key = {"n_runs": n_runs, "tests": list(tests), "shape": list(image_emb.shape),
           "inputs": tensor_digest([torch.as_tensor(np.asarray(p, dtype=np.int64)) for p, _ in tests.values()]
                             + [torch.as_tensor(t).long() for t in truth])}

    def build(path) -> None:
        torch.save(cav_tests(image_emb, tests, n_runs=n_runs), path)

    results = _committed_results(name, key, build)
    return {n: CavTest(r["concept"].numpy(), r["random"].numpy(), float(r["t"]), float(r["p"]))
            for n, r in results.items()}


def _pack_probe(probe: torch.nn.Linear) -> dict:
    return {k: v.detach().clone() for k, v in probe.state_dict().items()}


def _unpack_probe(state: Mapping[str, Tensor]) -> torch.nn.Linear:
    weight = state["weight"]
    probe = torch.nn.Linear(weight.shape[1], weight.shape[0])
    probe.load_state_dict(dict(state))
    return probe.eval().requires_grad_(False)


def self_training_study(x_lab: Tensor, y_lab: Tensor, x_unlab: Tensor, x_unlab_view: Tensor, seed_logits: Tensor,
                        seed_classes: Sequence[int], x_pool: Tensor, y_pool: Tensor, *, n_classes: int = 10,
                        rounds: int = 3, threshold: float = 0.9, steps: int = 200) -> dict:
    """The chapter's pseudo-labelling comparison: :func:`self_train` plain (consistency check) and seeded by
    zero-shot, the probe on every pool label (the ceiling), and the seeded run stopped after one round (the
    live check). Probes are stored as state dicts, pseudo-labels as int16."""
    import time

    def pack(r: SelfTraining) -> dict:
        return {"probe": _pack_probe(r.probe), "supervised": _pack_probe(r.supervised),
                "pseudo": r.pseudo.to(torch.int16), "history": r.history}

    options = {"n_classes": n_classes, "x_unlab_view": x_unlab_view, "threshold": threshold, "steps": steps}
    t0 = time.perf_counter()
    plain = self_train(x_lab, y_lab, x_unlab, rounds=rounds, **options)
    seeded = self_train(x_lab, y_lab, x_unlab, seed_logits=seed_logits, seed_classes=seed_classes, rounds=rounds,
                        **options)
    seconds = time.perf_counter() - t0
    ceiling = fit_probe(x_pool, y_pool, n_classes=n_classes, steps=steps)
    first = self_train(x_lab, y_lab, x_unlab, seed_logits=seed_logits, seed_classes=seed_classes, rounds=1, **options)
    return {"plain": pack(plain), "seeded": pack(seeded), "seeded, round 1": pack(first),
            "ceiling": _pack_probe(ceiling), "seconds": seconds}


def self_training_results(x_lab: Tensor, y_lab: Tensor, x_unlab: Tensor, x_unlab_view: Tensor, seed_logits: Tensor,
                          seed_classes: Sequence[int], x_pool: Tensor, y_pool: Tensor, *, n_classes: int = 10,
                          rounds: int = 3, threshold: float = 0.9, steps: int = 200) -> dict:
    """:func:`self_training_study`, committed under ``helpers/weights/results/ch11/selftrain-<hash>.pt``.

    Named by the options, the seed classes and the integer inputs (labels, the seed's predicted classes, the
    shapes); the embeddings are floats, so the notebook reruns the seeded run's first round live and compares.

    Returns:
        ``{"plain", "seeded", "seeded, round 1"}``: :class:`SelfTraining`; ``"ceiling"``: the probe on every pool
        label; ``"seconds"``: the two self-training runs' build time.
    """
    key = {"n_classes": n_classes, "rounds": rounds, "threshold": threshold, "steps": steps,
           "seed_classes": [int(c) for c in seed_classes],
           "shapes": [list(t.shape) for t in (x_lab, x_unlab, x_unlab_view, seed_logits, x_pool)],
           "inputs": tensor_digest([torch.as_tensor(y_lab), seed_logits.argmax(1), torch.as_tensor(y_pool)])}

    def build(path) -> None:
        torch.save(self_training_study(x_lab, y_lab, x_unlab, x_unlab_view, seed_logits, seed_classes, x_pool, y_pool,
                                       n_classes=n_classes, rounds=rounds, threshold=threshold, steps=steps), path)

    results = _committed_results("selftrain", key, build)

    def unpack(r: dict) -> SelfTraining:
        return SelfTraining(_unpack_probe(r["probe"]), r["pseudo"].long(), r["history"],
                            _unpack_probe(r["supervised"]))

    out = {k: unpack(results[k]) for k in ("plain", "seeded", "seeded, round 1")}
    out["ceiling"] = _unpack_probe(results["ceiling"])
    out["seconds"] = float(results["seconds"])
    return out


# --------------------------------------------------------------------------------------------------
# The real 1 % regime: a generic locked tower; captions and labels of the 1 % only
# --------------------------------------------------------------------------------------------------

ONE_PERCENT_LIT = clip.LitRecipe(epochs=200.0, batch_size=64, warmup_steps=40, n_train=None)
"""Chapter 12's LiT recipe for the labelled images alone: four batches an epoch, 800 steps in all (``n_train``
is unused: the images are given)."""


def train_one_percent_lit(x_lab: Tensor, y_lab: Tensor, *, recipe: clip.LitRecipe = ONE_PERCENT_LIT,
                          progress: bool = False) -> tuple[clip.LitClip, dict]:
    """Chapter 12's LiT model with its two projections trained on the captions of the labelled images only.

    The image tower is EfficientNet-Lite0's ImageNet-1k features, locked (it never saw a Fashion-MNIST image);
    the text tower is the frozen MiniLM. Each epoch draws one caption per labelled image
    (:func:`helpers.data.sample_captions`: class name, attributes and one part, each named with probability
    ``recipe.p_mention``), so the words reach the model through the 1 % only.

    Args:
        x_lab: ``[N, 1, 28, 28]`` the labelled images; y_lab: ``[N]`` their labels.

    Returns:
        ``(model in eval mode, history)`` as :func:`helpers.clip.fit_contrastive`.
    """
    if not isinstance(recipe, clip.LitRecipe):
        raise ValueError(f"recipe must be a helpers.clip.LitRecipe, got {type(recipe).__name__}")
    x_lab = data.check_images(x_lab)
    y_lab = torch.as_tensor(y_lab)
    if y_lab.shape != (len(x_lab),) or len(x_lab) < 2:
        raise ValueError(f"need at least two images and one label each, got {tuple(x_lab.shape)} and "
                         f"{tuple(y_lab.shape)}")
    clip.imagenet_tower().precompute(x_lab)
    common.set_seed(recipe.seed)

    def draw(attributes: dict[str, Tensor], labels: Tensor, generator: torch.Generator) -> Tensor:
        return data.sample_captions(attributes, labels, generator, p_mention=recipe.p_mention)

    with common.torch_threads(1):
        return clip.fit_contrastive(recipe, x_lab, y_lab, draw, progress=progress, desc="training LiT on the 1 %",
                                    decay_log_scale=False, model=clip.LitClip(dim=recipe.dim))


class FeatureProbe(torch.nn.Module):
    """A linear classifier on standardised frozen features, ``[N, d] -> [N, C]``: ``W (f - mean) / std + b``."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = torch.nn.Linear(dim, n_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features - self.mean) / self.std)


def fit_feature_probe(features: Tensor, y: Tensor, *, n_classes: int, steps: int = 300, seed: int = 0) -> FeatureProbe:
    """:func:`fit_probe` (classes weighted equally) on features standardised by their own mean and deviation.

    The black box of the real 1 % regime: the locked ImageNet tower's ``[N, 1280]`` features of the labelled
    images and their labels, nothing else.
    """
    if features.ndim != 2 or len(features) < 2 or not torch.isfinite(features).all():
        raise ValueError(f"need finite features [N >= 2, d], got {tuple(features.shape)}")
    probe = FeatureProbe(features.shape[1], n_classes)
    probe.mean.copy_(features.mean(0))
    probe.std.copy_(features.std(0).clamp_min(1e-6))
    fitted = fit_probe((features - probe.mean) / probe.std, torch.as_tensor(y), n_classes=n_classes, steps=steps,
                       seed=seed)
    probe.linear.load_state_dict(fitted.state_dict())
    return probe.eval().requires_grad_(False)


def one_percent_models(labelled: Tensor, pool: Tensor, *, recipe: clip.LitRecipe = ONE_PERCENT_LIT,
                       n_classes: int = 10, teacher_steps: int = 300) -> dict:
    """Everything the real 1 % regime trains, and the embeddings and teacher logits of the pool and test images.

    Reads the training labels of ``labelled`` only. The pool's and the 10,000 test images' ImageNet features
    (the slow part: about 7 minutes on 2 cores) are projected by the LiT model and classified by the teacher.

    Args:
        labelled: ``[L]`` training-set indices of the labelled images; pool: ``[N]`` those of the pool
            (labelled first, as in the chapter).

    Returns:
        a dict: ``"lit"`` and ``"teacher"`` (state dicts), ``"history"``, ``"u_pool"`` ``[N, d]`` and ``"u_test"``
        ``[10000, d]`` (L2-normalised float16 embeddings), ``"teacher_pool"`` ``[N, C]`` and ``"teacher_test"``
        ``[10000, C]`` (logits), ``"seconds"``.
    """
    import time

    labelled, pool = torch.as_tensor(labelled).long(), torch.as_tensor(pool).long()
    if not torch.equal(pool[: len(labelled)], labelled):
        raise ValueError("the pool must start with the labelled images")
    x_train, y_train = data.fashion_tensors("train")
    x_test, _ = data.fashion_tensors("test")
    tower, seconds = clip.imagenet_tower(), {}
    t0 = time.perf_counter()
    tower.precompute(x_train[pool], x_test)
    seconds["features"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    lit, history = train_one_percent_lit(x_train[labelled], y_train[labelled], recipe=recipe)
    seconds["lit"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher = fit_feature_probe(tower(x_train[labelled]), y_train[labelled], n_classes=n_classes, steps=teacher_steps)
    seconds["teacher"] = time.perf_counter() - t0
    out = {"lit": {k: v.clone() for k, v in lit.state_dict().items()}, "history": history,
           "teacher": {k: v.clone() for k, v in teacher.state_dict().items()}, "seconds": seconds}
    with torch.no_grad():
        for name, images in [("pool", x_train[pool]), ("test", x_test)]:
            features = tower(images)
            out[f"u_{name}"] = F.normalize(lit.image_proj(features), dim=-1).half()
            out[f"teacher_{name}"] = teacher(features)
    return out


def one_percent_results(labelled: Tensor, pool: Tensor, *, recipe: clip.LitRecipe = ONE_PERCENT_LIT,
                        n_classes: int = 10, teacher_steps: int = 300) -> tuple[clip.LitClip, FeatureProbe, dict]:
    """:func:`one_percent_models`, committed under ``helpers/weights/results/ch11/one-percent-<hash>.pt``.

    Named by the recipe and the indices (integers); the notebook retrains the LiT model and the teacher live
    on the labelled images and compares them, and recomputes a few test images' embeddings.

    Returns:
        ``(the LiT model, the teacher, the loaded results)``; embeddings come back as float32.
    """
    key = {"recipe": recipe.hashed_fields(), "n_classes": n_classes, "teacher_steps": teacher_steps,
           "indices": tensor_digest([torch.as_tensor(labelled).long(), torch.as_tensor(pool).long()])}

    def build(path) -> None:
        torch.save(one_percent_models(labelled, pool, recipe=recipe, n_classes=n_classes,
                                      teacher_steps=teacher_steps), path)

    results = _committed_results("one-percent", key, build)
    for name in ("u_pool", "u_test"):
        results[name] = results[name].float()
    lit = clip.LitClip(dim=recipe.dim)
    lit.load_state_dict(results["lit"])
    teacher = FeatureProbe(clip.ImageNetFeatures.dim, n_classes)
    teacher.load_state_dict(results["teacher"])
    return lit.eval().requires_grad_(False), teacher.eval().requires_grad_(False), results


def one_percent_seeds(labelled: Tensor, parts: Mapping[str, Sequence[int]], *, seeds: Sequence[int] = (0, 1, 2),
                      recipe: clip.LitRecipe = ONE_PERCENT_LIT, n_classes: int = 10, teacher_steps: int = 300) -> dict:
    """The first-order results of the 1 % regime over seeds of the LiT projections and of the black box.

    For each seed (captions, batch order and initialisations): the text head's and the black box's test
    predictions, and the class-level test AUC of each part's prompt and of its CAV learnt from the labelled
    images (:func:`concept_activation_vectors`). Only the labelled images and the test set are embedded.

    Args:
        labelled: ``[L]`` training-set indices of the labelled images.
        parts: ``{part prompt: classes that have the part}``, the concepts scored.

    Returns:
        a dict: ``"zs"`` and ``"teacher"`` (int16 test predictions ``[S, 10000]``), ``"prompt_auc"`` and
        ``"cav_auc"`` (``[S, K]``), ``"seeds"``, ``"seconds"``.
    """
    import time

    if len(seeds) < 1 or len(set(seeds)) != len(seeds) or not parts:
        raise ValueError(f"need distinct seeds and at least one part, got {seeds} and {len(parts)} parts")
    labelled = torch.as_tensor(labelled).long()
    x_train, y_train = data.fashion_tensors("train")
    x_test, y_test = data.fashion_tensors("test")
    x_lab, y_lab = x_train[labelled], y_train[labelled]
    tower = clip.imagenet_tower()
    t0 = time.perf_counter()
    tower.precompute(x_lab, x_test)
    f_lab, f_test = tower(x_lab), tower(x_test)
    prompts, holders = list(parts), [parts[p] for p in parts]
    positives_lab, positives_test = class_positives(y_lab, holders), class_positives(y_test, holders)
    out = {"zs": [], "teacher": [], "prompt_auc": [], "cav_auc": [], "seeds": list(seeds)}
    for seed in seeds:
        lit, _ = train_one_percent_lit(x_lab, y_lab, recipe=dataclasses.replace(recipe, seed=int(seed)))
        teacher = fit_feature_probe(f_lab, y_lab, n_classes=n_classes, steps=teacher_steps, seed=int(seed))
        with torch.no_grad():
            u_lab, u_test = (F.normalize(lit.image_proj(f), dim=-1) for f in (f_lab, f_test))
            out["zs"].append((u_test @ clip.zero_shot_weights(lit).T).argmax(1).to(torch.int16))
            out["teacher"].append(teacher(f_test).argmax(1).to(torch.int16))
            scores = (u_test @ lit.encode_text(prompts).T).numpy()
        out["prompt_auc"].append(torch.from_numpy(concept_auc(scores, positives_test)))
        cavs = concept_activation_vectors(u_lab, positives_lab)
        out["cav_auc"].append(torch.from_numpy(concept_auc((u_test @ cavs.T).numpy(), positives_test)))
    out = {k: torch.stack(v) if k != "seeds" else v for k, v in out.items()}
    out["seconds"] = time.perf_counter() - t0
    return out


def one_percent_seeds_results(labelled: Tensor, parts: Mapping[str, Sequence[int]], *,
                              seeds: Sequence[int] = (0, 1, 2), recipe: clip.LitRecipe = ONE_PERCENT_LIT,
                              n_classes: int = 10, teacher_steps: int = 300) -> dict:
    """:func:`one_percent_seeds`, committed under ``helpers/weights/results/ch11/one-percent-seeds-<hash>.pt``
    (named by the recipe, seeds, parts and labelled indices); seed 0 is the committed models' run, which the
    notebook compares with :func:`one_percent_results`."""
    key = {"recipe": recipe.hashed_fields(), "seeds": [int(s) for s in seeds], "n_classes": n_classes,
           "teacher_steps": teacher_steps, "parts": {p: list(map(int, c)) for p, c in parts.items()},
           "labelled": tensor_digest([torch.as_tensor(labelled).long()])}

    def build(path) -> None:
        torch.save(one_percent_seeds(labelled, parts, seeds=seeds, recipe=recipe, n_classes=n_classes,
                                     teacher_steps=teacher_steps), path)

    return _committed_results("one-percent-seeds", key, build)


# --------------------------------------------------------------------------------------------------
# Long-tailed test sets and the open-set case
# --------------------------------------------------------------------------------------------------

CLASSIFICATION_METRICS = ("macro-F1", "balanced accuracy", "rare recall")
"""The metrics of :func:`classification_ci`: macro-F1 over ``n_classes``, mean recall over the classes present
(sklearn's balanced accuracy) and mean recall over the rare classes present."""


def long_tail_indices(labels: Tensor | np.ndarray, order: Sequence[int], *, n_head: int | None = None,
                      exponent: float = 1.0, seed: int = 0) -> np.ndarray:
    """Indices of a long-tailed (Zipf) subsample of a labelled set, without replacement.

    The class of rank ``r`` in ``order`` (1 = head) keeps ``round(n_head * r ** -exponent)`` images (at least
    one), drawn at random with ``seed``; classes not in ``order`` are dropped.

    Args:
        labels: ``[N]`` integer class of each example.
        order: the classes from head to tail, each once.
        n_head: images kept of the head class; default: every image of the head class.
        exponent: Zipf exponent ``s >= 0`` (0 keeps ``n_head`` of every class).
        seed: seed of the draw.

    Returns:
        ``[M]`` sorted indices into ``labels``.

    >>> labels = np.repeat([0, 1, 2], 100)
    >>> np.bincount(labels[long_tail_indices(labels, [2, 0, 1], exponent=1.0)]).tolist()
    [50, 33, 100]
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {y.shape}, dtype {y.dtype}")
    order = [int(c) for c in order]
    if not order or len(set(order)) != len(order):
        raise ValueError(f"order must list each class once, head first, got {order}")
    if not np.isfinite(exponent) or exponent < 0:
        raise ValueError(f"exponent must be a finite number >= 0, got {exponent}")
    available = {c: int(np.sum(y == c)) for c in order}
    n_head = available[order[0]] if n_head is None else int(n_head)
    if n_head < 1:
        raise ValueError(f"n_head must be >= 1, got {n_head}")
    rng = np.random.default_rng(seed)
    keep = []
    for rank, c in enumerate(order, start=1):
        n = max(1, int(round(n_head * rank ** -exponent)))
        if n > available[c]:
            raise ValueError(f"class {c} (rank {rank}) needs {n} examples but has {available[c]}; lower n_head")
        keep.append(rng.choice(np.flatnonzero(y == c), size=n, replace=False))
    return np.sort(np.concatenate(keep))


def encode_predictions(y_true: Tensor | np.ndarray, y_pred: Tensor | np.ndarray, *, n_classes: int) -> np.ndarray:
    """One float per example, ``y_true * n_classes + y_pred``, so that a bootstrap over examples keeps the pairs.

    ``[N], [N] -> [N]``; :func:`classification_metric` decodes it (also on ``[B, N]`` resamples).
    """
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.ndim != 1 or t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must be 1-D with the same shape, got {t.shape} and {p.shape}")
    for name, v in (("y_true", t), ("y_pred", p)):
        if v.size and (v.min() < 0 or v.max() >= n_classes or not np.all(v == np.round(v))):
            raise ValueError(f"{name} must hold class indices in [0, {n_classes}), got {np.unique(v)[:5].tolist()}")
    return (t.astype(np.int64) * n_classes + p.astype(np.int64)).astype(np.float64)


def classification_metric(codes: np.ndarray, *, metric: str, n_classes: int,
                          rare_classes: Sequence[int] = RARE_CLASSES, axis: int = -1) -> np.ndarray | float:
    """A metric of :data:`CLASSIFICATION_METRICS` from :func:`encode_predictions` codes ``[..., N]`` -> ``[...]``.

    Vectorised over leading axes (one confusion matrix per row), as ``helpers.stats.bootstrap_ci`` needs.
    """
    if metric not in CLASSIFICATION_METRICS:
        raise ValueError(f"metric must be one of {CLASSIFICATION_METRICS}, got {metric!r}")
    x = np.moveaxis(np.asarray(codes), axis, -1).astype(np.int64)
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n)
    k2 = n_classes * n_classes
    offsets = np.arange(len(rows))[:, None] * k2
    confusion = np.bincount((rows + offsets).ravel(), minlength=len(rows) * k2).reshape(len(rows), n_classes,
                                                                                       n_classes)
    tp = np.diagonal(confusion, axis1=1, axis2=2).astype(np.float64)      # [B, K]
    n_true, n_pred = confusion.sum(2).astype(np.float64), confusion.sum(1).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "macro-F1":
            denom = n_true + n_pred
            out = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0).mean(1)
        else:
            recall = np.where(n_true > 0, tp / np.where(n_true > 0, n_true, 1), np.nan)
            if metric == "rare recall":
                recall = recall[:, list(rare_classes)]
            out = np.nanmean(recall, axis=1)
    out = out.reshape(lead)
    return float(out) if out.ndim == 0 else out


def classification_ci(y_true: Tensor | np.ndarray, y_pred: Tensor | np.ndarray, *, metric: str, n_classes: int = 10,
                       rare_classes: Sequence[int] = RARE_CLASSES, seed: int = 0, n_resamples: int = 2000):
    """``metric`` of predictions ``y_pred [N]`` against ``y_true [N]`` with a bootstrap interval over the examples.

    Returns a ``helpers.stats.Estimate`` (from ``stats.bootstrap_ci``).
    """
    from helpers import stats

    if metric not in CLASSIFICATION_METRICS:
        raise ValueError(f"metric must be one of {CLASSIFICATION_METRICS}, got {metric!r}")
    codes = encode_predictions(y_true, y_pred, n_classes=n_classes)

    def statistic(x, axis=-1):
        return classification_metric(x, metric=metric, n_classes=n_classes, rare_classes=rare_classes, axis=axis)

    return stats.bootstrap_ci(codes, statistic=statistic, seed=seed, n_resamples=n_resamples)


def _auroc_codes(scores: np.ndarray, is_unknown: np.ndarray) -> np.ndarray:
    # dense rank of the score (ties share a rank) times 2, plus 1 for an unknown example
    ranks = np.unique(scores, return_inverse=True)[1].reshape(-1)
    return (2 * ranks + is_unknown).astype(np.float64)


def _auroc_of_codes(codes: np.ndarray, axis: int = -1) -> np.ndarray | float:
    # Mann-Whitney AUROC (ties count 1/2) of every row of codes [..., N], through per-rank counts
    x = np.moveaxis(np.asarray(codes), axis, -1).astype(np.int64)
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n)
    n_ranks = int(rows.max()) // 2 + 1 if rows.size else 1
    # one bincount: row b, flag f (1 = unknown), rank r -> bin (2 b + f) * n_ranks + r
    flat = (rows >> 1) + ((rows & 1) + 2 * np.arange(len(rows))[:, None]) * n_ranks
    counts = np.bincount(flat.ravel(), minlength=2 * len(rows) * n_ranks).reshape(len(rows), 2, n_ranks)
    known, unknown = counts[:, 0], counts[:, 1]                                       # [B, ranks]
    below_twice = 2 * np.cumsum(known, axis=1) - known                      # 2 * (known below) + known tied
    wins = (unknown * below_twice).sum(1) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        out = wins / (known.sum(1).astype(np.float64) * unknown.sum(1))
    out = out.reshape(lead)
    return float(out) if out.ndim == 0 else out


def open_set_auroc(scores: Tensor | np.ndarray, is_unknown: Tensor | np.ndarray, *, seed: int = 0,
                   n_resamples: int = 2000, min_per_group: int = 10):
    """AUROC of an unknown-detector: how often an unseen-class example scores above a known one (ties 1/2).

    Args:
        scores: ``[N]`` "unknown-ness" of each test example (higher = more likely unseen), e.g.
            ``1 - max softmax`` or :func:`nearest_mean_distance`.
        is_unknown: ``[N]`` bool, True for the examples of the class held out of training.
        seed, n_resamples: of the bootstrap over examples (``helpers.stats.bootstrap_ci``).

    Returns:
        a ``helpers.stats.Estimate``; 0.5 is a random score, 1 a perfect detector. The bootstrap needs at
        least ``min_per_group`` known and unknown examples (a resample without either has no AUROC).

    >>> open_set_auroc(np.arange(20.0), np.arange(20) >= 10).value
    1.0
    """
    from helpers import stats

    codes = open_set_codes(scores, is_unknown)
    n_unknown = int(np.asarray(is_unknown).sum())
    if min(n_unknown, len(codes) - n_unknown) < min_per_group:
        raise ValueError(f"need at least {min_per_group} known and {min_per_group} unknown examples for the "
                         f"bootstrap, got {len(codes) - n_unknown} and {n_unknown}")
    return stats.bootstrap_ci(codes, statistic=_auroc_of_codes, seed=seed, n_resamples=n_resamples)


def open_set_codes(scores: Tensor | np.ndarray, is_unknown: Tensor | np.ndarray) -> np.ndarray:
    """``[N], [N] -> [N]`` floats that carry each example's score rank and unknown flag through a bootstrap.

    ``helpers.stats.paired_difference(codes_a, codes_b, statistic=open_set_auroc_statistic)`` compares two
    detectors on the same examples.

    >>> open_set_auroc_statistic(open_set_codes([0.1, 0.4, 0.35, 0.8], np.array([False, False, True, True])))
    0.75
    """
    s, u = np.asarray(scores, dtype=np.float64), np.asarray(is_unknown)
    if s.ndim != 1 or s.shape != u.shape:
        raise ValueError(f"scores and is_unknown must be 1-D with the same shape, got {s.shape} and {u.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    if u.dtype != bool:
        raise ValueError(f"is_unknown must be bool, got dtype {u.dtype}")
    if u.all() or not u.any():
        raise ValueError(f"need known and unknown examples, got {int(u.sum())} unknown of {u.size}")
    return _auroc_codes(s, u.astype(np.int64))


open_set_auroc_statistic = _auroc_of_codes
"""The AUROC of :func:`open_set_codes` ``[..., N] -> [...]`` (vectorised), for ``helpers.stats``."""


def nearest_mean_distance(emb: Tensor, means: Tensor) -> Tensor:
    """Cosine distance ``[N]`` of each embedding ``emb [N, d]`` to the nearest class mean ``means [K, d]``.

    An unknown-detector that needs no classifier: an image far from every known class mean is suspect.
    """
    if emb.ndim != 2 or means.ndim != 2 or emb.shape[1] != means.shape[1] or len(means) == 0:
        raise ValueError(f"need emb [N, d] and means [K, d] with the same d, got {tuple(emb.shape)} and "
                         f"{tuple(means.shape)}")
    return 1 - (F.normalize(emb.float(), dim=1) @ F.normalize(means.float(), dim=1).T).max(1).values

