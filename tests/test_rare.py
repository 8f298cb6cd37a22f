"""helpers.rare: WordNet dictionaries, grounding, CAVs, the rare split, self-training, the unaware CLIP-style model."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import clip, common, data, rare, zoo
from helpers.assets import FASHION_CLASSES


@pytest.fixture(scope="module")
def wn():
    from helpers.assets import wordnet

    return wordnet()


def test_wordnet_dictionary_on_known_synsets(wn):
    concepts = {c.word: c for c in rare.wordnet_concepts(["shoe"], wn=wn)}
    assert concepts["footwear"].relation == "hypernym" and concepts["footwear"].classes == (0,)
    assert concepts["heel"].relation == "part"  # shoe.n.01 has a heel (part meronym)
    sandal = {c.word: c for c in rare.wordnet_concepts(["sandal", "shoe"], wn=wn)}
    assert sandal["strap"].relation == "gloss"  # "a shoe consisting of a sole fastened by straps to the foot"
    assert sandal["footwear"].classes == (0, 1)  # found from both classes
    assert "shoe" not in sandal  # a class's own name is never one of its concepts
    assert sandal["heel"].classes == (0, 1)  # inherited from the hypernym shoe by the sandal
    no_inherit = {c.word for c in rare.wordnet_concepts(["sandal"], wn=wn, inherit_parts=False)}
    assert "heel" not in no_inherit
    fashion = rare.wordnet_concepts(FASHION_CLASSES, wn=wn, synsets=rare.FASHION_SYNSETS)
    assert {"garment", "footwear", "clothing"} <= {c.word for c in fashion}
    assert rare.WordNetConcept("strap", "gloss", (5,)).prompt == "an item with a strap."


def test_wordnet_bad_input_gives_clear_errors(wn):
    with pytest.raises(ValueError, match="not in WordNet"):
        rare.wordnet_concepts(["zorblax garment"], wn=wn)
    with pytest.raises(ValueError, match="not a WordNet synset"):
        rare.class_synsets(["Bag"], wn=wn, synsets={"Bag": "bag.n.99"})
    with pytest.raises(ValueError, match="non-empty"):
        rare.class_synsets("shoe", wn=wn)


def test_random_dictionary_is_a_seeded_control(wn):
    a = rare.random_concepts(12, wn=wn, seed=1, exclude=["footwear"])
    b = rare.random_concepts(12, wn=wn, seed=1, exclude=["footwear"])
    assert a == b and len(a) == 12 and len(set(a.groups)) == 3 and "footwear" not in a.names
    assert all(p.startswith("a photo of a") for p in a.prompts)


def test_concept_auc_and_class_positives():
    scores = np.array([[0.1, 1.0], [0.4, 1.0], [0.35, 1.0], [0.8, 1.0]])
    positives = rare.class_positives([0, 0, 1, 2], [(1, 2), (0, 1, 2)])
    auc = rare.concept_auc(scores, positives)
    assert auc[0] == pytest.approx(0.75) and math.isnan(auc[1])  # concept 2 has no negative image
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        rare.concept_auc(scores, positives[:, 0])


class _ToyClip:
    """A ClipLike whose text embedding is fixed per prompt: 'grounded' prompts point at class 0's images."""

    logit_scale = 10.0

    def encode_image(self, images):
        raise AssertionError("ground_concepts must work on precomputed embeddings")

    def encode_text(self, texts):
        return torch.stack([torch.tensor([1.0, 0.0]) if "grounded" in t else torch.tensor([0.0, 1.0]) for t in texts])


def test_grounding_keeps_only_words_the_model_can_see():
    emb = F.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.2], [0.1, 1.0], [0.2, 0.9]]), dim=-1)
    labels = torch.tensor([0, 0, 1, 1])
    candidates = [rare.WordNetConcept("grounded", "part", (0,)), rare.WordNetConcept("ungrounded", "part", (1,)),
                  rare.WordNetConcept("grounded too", "gloss", (0,))]
    kept, auc = rare.ground_concepts(_ToyClip(), candidates, emb, labels, min_auc=0.75)
    assert [c.word for c in kept] == ["grounded", "grounded too"] and auc.tolist() == [1.0, 0.0, 1.0]
    kept, _ = rare.ground_concepts(_ToyClip(), candidates, emb, labels, min_auc=0.75, max_concepts=1)
    assert len(kept) == 1
    bank = rare.wordnet_bank(candidates)
    assert bank.groups == (rare.RELATIONS["part"],) * 2 + (rare.RELATIONS["gloss"],)
    with pytest.raises(ValueError, match="no candidate"):
        rare.ground_concepts(_ToyClip(), [], emb, labels)


def test_cavs_separate_planted_concepts_on_synthetic_latents():
    gen = torch.Generator().manual_seed(0)
    n, d, k = 300, 16, 3
    truth = F.normalize(torch.randn(k, d, generator=gen), dim=-1)  # [concept, d] planted directions
    has = torch.rand(n, k, generator=gen) < 0.3
    emb = torch.randn(n, d, generator=gen) * 0.5 + 1.5 * has.float() @ truth  # [n, d]
    cavs = rare.concept_activation_vectors(emb[:200], has[:200])
    assert cavs.shape == (k, d) and torch.allclose(cavs.norm(dim=-1), torch.ones(k), atol=1e-5)
    assert (F.cosine_similarity(cavs, truth) > 0.8).all()
    auc = rare.concept_auc((emb[200:] @ cavs.T).numpy(), has[200:].numpy())
    assert (auc > 0.95).all()
    with pytest.raises(ValueError, match="with and without"):
        rare.concept_activation_vectors(emb[:10], torch.ones(10, 1, dtype=torch.bool))


def test_rare_split_makes_classes_rare_and_labels_one_percent():
    labels = np.repeat(np.arange(10), 1000)
    split = rare.rare_split(labels, rare_classes=(5, 8), rare_fraction=0.05, label_fraction=0.01, min_labelled=5)
    lab, pool = labels[split.labelled], labels[split.pool]
    assert np.intersect1d(split.labelled, split.unlabelled).size == 0
    assert (np.bincount(pool, minlength=10)[[5, 8]] == 50).all() and np.bincount(pool)[0] == 1000
    assert np.bincount(lab)[0] == 10 and np.bincount(lab)[5] == 5  # 1 % of 1000; at least 5 for the rare
    again = rare.rare_split(labels, rare_classes=(5, 8), rare_fraction=0.05, label_fraction=0.01, min_labelled=5)
    assert np.array_equal(split.labelled, again.labelled)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan")])
def test_label_fraction_outside_unit_interval_is_refused(fraction):
    with pytest.raises(ValueError, match=r"label_fraction must be in \(0, 1\]"):
        rare.rare_split(np.arange(100) % 10, label_fraction=fraction)


def test_bad_split_inputs():
    with pytest.raises(ValueError, match="rare_fraction"):
        rare.rare_split(np.arange(100) % 10, rare_fraction=0)
    with pytest.raises(ValueError, match="distinct class indices"):
        rare.rare_split(np.arange(100) % 10, rare_classes=(5, 12))
    with pytest.raises(ValueError, match="overlap"):
        rare.RareSplit(np.array([1, 2]), np.array([2, 3]), (5,))


def _blobs(n_per_class=(200, 200, 20), seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    return centres[y] + torch.randn(len(y), 2, generator=gen), y


def test_pseudo_labelling_never_reads_labels_outside_the_labelled_indices():
    x, y = _blobs()
    x_test, y_test = _blobs(seed=1)
    split = rare.rare_split(y.numpy(), rare_classes=(2,), rare_fraction=1.0, label_fraction=0.02, min_labelled=3)
    assert np.intersect1d(split.labelled, split.unlabelled).size == 0
    assert set(split.pool.tolist()) <= set(range(len(y)))  # training indices only; the test set is separate
    poisoned = y.clone()
    poisoned[torch.as_tensor(split.unlabelled)] = torch.randint(3, (len(split.unlabelled),))
    runs = []
    for labels in (y, poisoned):
        lab, unlab = torch.as_tensor(split.labelled), torch.as_tensor(split.unlabelled)
        runs.append(rare.self_train(x[lab], labels[lab], x[unlab], n_classes=3, rounds=2, steps=100))
    assert torch.equal(runs[0].pseudo, runs[1].pseudo)
    assert torch.equal(runs[0].probe.weight, runs[1].probe.weight)
    result = runs[0]
    assert len(result.history) == 2 and result.history[-1]["n_pseudo"] > 0
    accuracy = float((result.probe(x_test).argmax(1) == y_test).float().mean())
    assert accuracy > 0.9
    kept = result.pseudo >= 0
    assert float((result.pseudo[kept] == y[torch.as_tensor(split.unlabelled)][kept]).float().mean()) > 0.9


def test_self_training_seed_prior_and_bad_input():
    x, y = _blobs()
    seed = torch.zeros(len(x) - 6, 3)
    with pytest.raises(ValueError, match="one row per unlabelled"):
        rare.self_train(x[:6], y[:6], x[6:], n_classes=3, seed_logits=seed[:-1])
    with pytest.raises(ValueError, match="threshold"):
        rare.self_train(x[:6], y[:6], x[6:], n_classes=3, threshold=1.0)
    with pytest.raises(ValueError, match="seed_classes needs seed_logits"):
        rare.self_train(x[:6], y[:6], x[6:], n_classes=3, seed_classes=[0])
    # a seed that is right and confident on class 0 only: its labels are used for class 0, never for class 1
    seed_logits = torch.full((len(x) - 6, 3), -5.0)
    seed_logits[torch.arange(len(x) - 6), 0] = 5.0
    run = rare.self_train(x[:6], y[:6], x[6:], n_classes=3, seed_logits=seed_logits, seed_classes=[0], rounds=1,
                          steps=50)
    assert run.history[0]["n_from_seed"] == len(x) - 6 and (run.pseudo == 0).all()
    assert rare.trusted_classes(torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]), n_classes=3) == [0]
    scores = rare.classification_scores(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0]), rare_classes=[2],
                                        n_classes=3)
    assert scores["recall 2"] == 0.5 and scores["accuracy"] == 0.75


def test_augment_shifts_and_flips_deterministically():
    x, _ = data.fashion_tensors("test")
    a, b = rare.augment(x[:16], seed=3), rare.augment(x[:16], seed=3)
    assert a.shape == (16, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, x[:16])
    assert torch.allclose(a.mean(), x[:16].mean(), atol=0.1)  # shifts only move the item
    same = rare.augment(x[:4], seed=0, max_shift=0)
    assert all(torch.equal(s, o) or torch.equal(s, o.flip(-1)) for s, o in zip(same, x[:4], strict=True))


def test_captions_of_the_unaware_model_never_name_hidden_parts():
    x, y = data.fashion_tensors("test")
    attributes = data.pixel_attributes(x[:2000], y[:2000])
    hidden = rare.hidden_parts((5, 6, 8))
    assert "buttons down the front" in hidden  # shared with coats: removed from their captions too
    index = rare.rare_captions(attributes, y[:2000], torch.Generator().manual_seed(0), hidden_parts=hidden,
                               p_mention=1.0)
    table = data.caption_table()
    captions = [table[i] for i in index.tolist()]
    assert not any(part in caption for caption in captions for part in hidden)
    assert any("with long sleeves" in caption for caption in captions)  # other parts are still named
    assert rare.part_classes(["a collar"]) == {"a collar": (6,)}
    with pytest.raises(ValueError, match="unknown parts"):
        rare.part_classes(["a tail"])


def test_edit_bank_and_groups():
    bank = rare.edit_bank(clip.FASHION_CONCEPTS, remove=["laces", "heel"], add=[("zip", "a bag with a zip", "x")])
    assert len(bank) == len(clip.FASHION_CONCEPTS) - 1 and "laces" not in bank.names and bank.groups[-1] == "x"
    with pytest.raises(ValueError, match="not in the bank"):
        rare.edit_bank(clip.FASHION_CONCEPTS, remove=["tail"])
    assert rare.group_lists(["a", "b", "a", "c"]) == [[0, 2], [1], [3]]


@pytest.mark.slow
def test_short_unaware_training_run_learns_and_committed_weights_verify():
    """A short version of the recipe: the loss falls below chance, and the hidden classes are never trained on."""
    recipe = rare.RareClipRecipe(base=clip.ClipRecipe(n_train=1024, epochs=2, batch_size=128, warmup_steps=4,
                                                      p_mention=0.0))
    model, history = rare.train_rare_clip(recipe, progress=False)
    y = data.fashion_tensors("train")[1][:1024]
    assert history["n_images"] == int((~torch.isin(y, torch.tensor(rare.RARE_CLASSES))).sum())
    assert history["loss"][-1] < math.log(128)
    assert isinstance(model, clip.ClipLike)
    committed = zoo.committed_path("clip", rare._weights_name(rare.RARE_RECIPE))
    if committed.exists():
        assert common.verified(committed), "committed weights do not match their .sha256 sidecar"
    with pytest.raises(ValueError, match="RareClipRecipe"):
        rare.pretrained_rare_clip(clip.RECIPE)


def test_class_name_filter_rule():
    lemmas = ("coat", "pullover", "shirt", "t-shirt/top", "pocketbook", "ankle boot")
    leaks = ["coattail", "coat button", "shirtfront", "shirttail", "shirt button", "pulling", "pocket",
             "Ankle", "boots"]
    clean = ["collar", "cover", "overgarment", "sleeve", "heel", "strap", "toe", "to", "woman's clothing"]
    assert all(rare.leaks_class_name(w, lemmas) for w in leaks)  # equal, contains, contained, 4-letter stem
    assert not any(rare.leaks_class_name(w, lemmas) for w in clean)  # "t" of T-shirt is too short to count
    assert rare.leaks_class_name("pulling", ["pullover"], min_stem=5) is False  # "pull" is a 4-letter stem
    assert rare.leaks_class_name("topper", ["top"]) and not rare.leaks_class_name("topper", ["top"], min_substring=4)
    with pytest.raises(ValueError, match="list of class names"):
        rare.leaks_class_name("coat", "coat")
    with pytest.raises(ValueError, match="min_substring"):
        rare.leaks_class_name("coat", ["coat"], min_substring=0)


def test_fashion_dictionary_never_names_a_class(wn):
    lemmas = rare.class_lemmas(FASHION_CLASSES, wn=wn, synsets=rare.FASHION_SYNSETS)
    assert {"pocketbook", "gym shoe", "slipover", "t-shirt/top"} <= set(lemmas)
    words = {c.word for c in rare.wordnet_concepts(FASHION_CLASSES, wn=wn, synsets=rare.FASHION_SYNSETS)}
    assert not any(rare.leaks_class_name(w, lemmas) for w in words)
    assert not words & {"pulling", "coattail", "coat button", "shirtfront", "shirttail", "shirt button",
                        "money", "personal", "item"}
    assert {"container", "accessory", "strap", "garment", "collar"} <= words
    raw = {c.word for c in rare.wordnet_concepts(FASHION_CLASSES, wn=wn, synsets=rare.FASHION_SYNSETS,
                                                 drop_class_names=False, visible_gloss=False)}
    assert {"pulling", "coattail", "money", "personal"} <= raw  # the leaks exist before the rules


def test_visible_noun_keeps_things_and_drops_adjectives_and_abstractions(wn):
    assert all(rare.visible_noun(w, wn=wn) for w in ["strap", "accessory", "foot", "canvas"])
    assert not any(rare.visible_noun(w, wn=wn) for w in ["personal", "money", "item", "half", "plural", "zorblax"])


def test_within_class_auc_ignores_what_separates_classes():
    labels = np.repeat([0, 1], 4)
    truth = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)[:, None]
    class_detector = labels[:, None].astype(float)  # ranks class 1 first, nothing inside a class
    part_detector = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.6, 0.3, 0.4])[:, None]
    assert rare.within_class_auc(class_detector, truth, labels).tolist() == [0.5]
    assert rare.within_class_auc(part_detector, truth, labels).tolist() == [1.0]
    constant = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)[:, None]  # class-level truth: undefined within a class
    assert math.isnan(rare.within_class_auc(part_detector, constant, labels)[0])
    with pytest.raises(ValueError, match="labels"):
        rare.within_class_auc(part_detector, truth, labels[:3])


def test_cav_significance_separates_a_planted_concept_from_noise():
    gen = torch.Generator().manual_seed(0)
    n, d = 240, 8
    labels = torch.randint(3, (n,), generator=gen)
    has = torch.rand(n, generator=gen) < 0.4
    emb = torch.randn(n, d, generator=gen) + 3.0 * F.one_hot(labels, d).float()  # classes on axes 0..2
    emb[:, 5] += 2.0 * has.float()  # the concept lives on axis 5, inside every class
    train, test = slice(0, 120), slice(120, None)

    def statistic(cav):
        return rare.within_class_auc((emb[test] @ cav[:, None]).numpy(), has[test, None].numpy(),
                                     labels[test].numpy())[0]

    real = rare.cav_significance(emb[train], has[train].numpy(), statistic, n_runs=6)
    assert real.concept.mean() > 0.9 and abs(real.random.mean() - 0.5) < 0.2 and real.significant(n_tests=3)
    noise = rare.cav_significance(emb[train], (torch.rand(120, generator=gen) < 0.4).numpy(), statistic, n_runs=6)
    assert not noise.significant()
    with pytest.raises(ValueError, match="n_runs"):
        rare.cav_significance(emb[train], has[train].numpy(), statistic, n_runs=1)
    with pytest.raises(ValueError, match=r"\[N\] bool"):
        rare.cav_significance(emb[train], has[:10].numpy(), statistic)


def test_long_tail_indices_follow_zipf_and_are_seeded():
    labels = np.repeat([0, 1, 2, 3], 100)
    idx = rare.long_tail_indices(labels, [3, 0, 1, 2], n_head=80, exponent=1.0, seed=0)
    assert np.bincount(labels[idx]).tolist() == [40, 27, 20, 80]  # round(80 / r): ranks 2, 3, 4 and 1
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)  # sorted, no repeats
    assert np.array_equal(idx, rare.long_tail_indices(labels, [3, 0, 1, 2], n_head=80, seed=0))
    assert not np.array_equal(idx, rare.long_tail_indices(labels, [3, 0, 1, 2], n_head=80, seed=1))
    flat = rare.long_tail_indices(labels, [1, 2], exponent=0.0)  # s = 0: every listed class keeps n_head
    assert np.bincount(labels[flat], minlength=4).tolist() == [0, 100, 100, 0]
    with pytest.raises(ValueError, match="each class once"):
        rare.long_tail_indices(labels, [0, 0, 1])
    with pytest.raises(ValueError, match="exponent"):
        rare.long_tail_indices(labels, [0, 1], exponent=-1.0)
    with pytest.raises(ValueError, match="lower n_head"):
        rare.long_tail_indices(labels, [0, 1], n_head=150)
    with pytest.raises(ValueError, match="integer"):
        rare.long_tail_indices(labels.astype(float), [0, 1])


def test_classification_metrics_match_sklearn_and_bootstrap_in_batches():
    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    gen = np.random.default_rng(0)
    y = gen.integers(0, 5, 300)
    pred = np.where(gen.random(300) < 0.6, y, gen.integers(0, 5, 300))
    codes = rare.encode_predictions(y, pred, n_classes=5)
    metric = rare.classification_metric
    assert metric(codes, metric="macro-F1", n_classes=5) == pytest.approx(
        f1_score(y, pred, labels=range(5), average="macro", zero_division=0))
    assert metric(codes, metric="balanced accuracy", n_classes=5) == pytest.approx(balanced_accuracy_score(y, pred))
    rare_recall = recall_score(y, pred, labels=[1, 3], average=None).mean()
    assert metric(codes, metric="rare recall", n_classes=5, rare_classes=(1, 3)) == pytest.approx(rare_recall)
    batch = np.stack([codes, codes[::-1], codes[:150].repeat(2)])  # [3, 300]: one value per row
    per_row = metric(batch, metric="macro-F1", n_classes=5)
    assert per_row.shape == (3,) and per_row[0] == pytest.approx(per_row[1])
    perfect = rare.classification_ci(y, y, metric="macro-F1", n_classes=5)
    assert (perfect.value, perfect.lo, perfect.hi) == (1.0, 1.0, 1.0)
    est = rare.classification_ci(y, pred, metric="balanced accuracy", n_classes=5)
    assert est.lo < balanced_accuracy_score(y, pred) < est.hi
    with pytest.raises(ValueError, match="metric must be one of"):
        rare.classification_ci(y, pred, metric="accuracy")
    with pytest.raises(ValueError, match="class indices"):
        rare.encode_predictions(y, pred + 5, n_classes=5)
    with pytest.raises(ValueError, match="same shape"):
        rare.encode_predictions(y, pred[:10], n_classes=5)


def test_open_set_auroc_known_answers_and_paired_comparison():
    from sklearn.metrics import roc_auc_score

    from helpers import stats

    perfect = rare.open_set_auroc(np.r_[np.zeros(12), np.ones(10)], np.arange(22) >= 12)
    assert (perfect.value, perfect.lo, perfect.hi) == (1.0, 1.0, 1.0)
    tied = rare.open_set_codes(np.full(4, 0.5), np.array([0, 1, 0, 1], bool))
    assert rare.open_set_auroc_statistic(tied) == 0.5  # every pair tied: half a win each
    with pytest.raises(ValueError, match="at least 10"):
        rare.open_set_auroc([0.1, 0.2, 0.9], np.array([0, 0, 1], bool))
    gen = np.random.default_rng(0)
    unknown = gen.random(400) < 0.25
    good = np.round(gen.normal(size=400) + 1.5 * unknown, 1)  # rounded: many ties
    noise = gen.normal(size=400)
    est = rare.open_set_auroc(good, unknown)
    assert est.value == pytest.approx(roc_auc_score(unknown, good)) and est.lo > 0.5
    codes = np.stack([rare.open_set_codes(good, unknown), rare.open_set_codes(noise, unknown)])
    assert rare.open_set_auroc_statistic(codes) == pytest.approx([roc_auc_score(unknown, s) for s in (good, noise)])
    d = stats.paired_difference(codes[0], codes[1], statistic=rare.open_set_auroc_statistic)
    assert d.verdict(("good", "noise")) == "good beats noise"
    with pytest.raises(ValueError, match="known and unknown"):
        rare.open_set_auroc(good, np.zeros(400, bool))
    with pytest.raises(ValueError, match="bool"):
        rare.open_set_auroc(good, unknown.astype(int))
    with pytest.raises(ValueError, match="NaN"):
        rare.open_set_auroc(np.r_[good[:-1], np.nan], unknown)


def test_nearest_mean_distance_is_zero_on_a_mean_and_checks_shapes():
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    emb = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    dist = rare.nearest_mean_distance(emb, means)
    assert torch.allclose(dist, torch.tensor([0.0, 1 - 2 ** -0.5, 1.0]), atol=1e-6)
    with pytest.raises(ValueError, match="same d"):
        rare.nearest_mean_distance(emb, torch.ones(2, 3))


# ---------------------------------------------------------------------------------------------
# Class-balanced and semi-supervised students
# ---------------------------------------------------------------------------------------------


def test_class_balanced_weights_equalise_each_predicted_class():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(500, 4, generator=gen) + torch.tensor([3.0, 1.0, 0.0, -1.0])  # class 0 dominates
    w = rare.class_balanced_weights(teacher)
    pred = teacher.argmax(1)
    totals = torch.zeros(4).index_add_(0, pred, w)
    present = torch.bincount(pred, minlength=4) > 0
    assert float(w.mean()) == pytest.approx(1.0)
    assert torch.allclose(totals[present], torch.full((int(present.sum()),), 500 / int(present.sum())))
    assert w[pred == 0].max() < w[pred != 0].min()  # the frequent class gets the smallest weight
    with pytest.raises(ValueError, match=r"\[N >= 1, classes\]"):
        rare.class_balanced_weights(torch.zeros(5))


def _concept_problem(n=300, k=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=gen)
    teacher = 3 * z[:, :3] @ torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])
    return z, teacher, ["a", "a", "b", "b", "c", "c"]


def test_equal_weights_reduce_to_the_plain_distillation():
    z, teacher, groups = _concept_problem()
    old = rare.fit_student(z, teacher, groups, epochs=3, batch_size=64)
    for weights in (torch.ones(len(z)), torch.full((len(z),), 3.0)):  # weights are normalised to mean 1
        new = rare.fit_student(z, teacher, groups, epochs=3, batch_size=64, weights=weights)
        with torch.no_grad():
            assert torch.allclose(new(z), old(z), atol=1e-4)
    balanced = rare.fit_student(z, teacher, groups, epochs=3, batch_size=64, weights="balanced")
    with torch.no_grad():
        assert not torch.allclose(balanced(z), old(z), atol=1e-4)


def test_semi_supervised_student_fits_the_labels_of_a_separable_problem():
    x, y = _blobs(n_per_class=(100, 100, 100))
    x_test, y_test = _blobs(n_per_class=(100, 100, 100), seed=1)
    labels = torch.full((len(x),), -1)
    labelled = torch.tensor([0, 1, 2, 100, 101, 102, 200, 201, 202])
    labels[labelled] = y[labelled]
    useless = torch.zeros(len(x), 3)  # a teacher that says nothing: the labels must do the work
    student = rare.make_student("linear", 2, 3, seed=0)
    rare.distil_student(student, x, useless, labels=labels, epochs=20, batch_size=64, lr=0.05)
    with torch.no_grad():
        assert (student(x[labelled]).argmax(1) == y[labelled]).all()
        assert float((student(x_test).argmax(1) == y_test).float().mean()) > 0.9
    plain = rare.make_student("linear", 2, 3, seed=0)
    rare.distil_student(plain, x, useless, epochs=20, batch_size=64, lr=0.05)
    with torch.no_grad():
        assert float((plain(x_test).argmax(1) == y_test).float().mean()) < 0.6  # without labels: chance-like


def test_student_bad_input_raises_value_error():
    z, teacher, groups = _concept_problem(n=20)
    student = rare.make_student("MLP", 6, 3)
    labels = torch.full((20,), -1)
    with pytest.raises(ValueError, match="both labelled"):
        rare.distil_student(student, z, teacher, labels=labels)
    labels[0] = 3
    with pytest.raises(ValueError, match="-1 \\(unlabelled\\) or a class"):
        rare.distil_student(student, z, teacher, labels=labels)
    with pytest.raises(ValueError, match="integers"):
        rare.distil_student(student, z, teacher, labels=labels.float())
    with pytest.raises(ValueError, match="'balanced'"):
        rare.distil_student(student, z, teacher, weights="inverse")
    with pytest.raises(ValueError, match="finite and >= 0"):
        rare.distil_student(student, z, teacher, weights=-torch.ones(20))
    with pytest.raises(ValueError, match="sum to 0"):
        rare.distil_student(student, z, teacher, weights=torch.zeros(20))
    with pytest.raises(ValueError, match=r"z \[N, K\]"):
        rare.distil_student(student, z, teacher[:-1])
    with pytest.raises(ValueError, match="kind must be"):
        rare.make_student("tree", 6, 3)
    with pytest.raises(ValueError, match="group name per feature"):
        rare.make_student("Choquet", 6, 3)
    with pytest.raises(ValueError, match="one group name per concept"):
        rare.fit_student(z, teacher, groups[:-1])


def test_student_study_is_seeded_and_scores_every_run():
    z, teacher, groups = _concept_problem(n=240)
    z_test, teacher_test, _ = _concept_problem(n=90, seed=1)
    y_test = teacher_test.argmax(1)
    labels = torch.full((240,), -1)
    labels[:12] = teacher[:12].argmax(1)
    features = {"concepts": (z, z_test), "embedding": (z[:, :3], z_test[:, :3])}
    students = {"Choquet": ("Choquet", "concepts", 0.05), "linear (embedding)": ("linear", "embedding", 0.03)}
    options = {"students": students, "seeds": (0, 1), "epochs": 2, "batch_size": 64, "rare_classes": (2,),
               "keep_logits": ["Choquet", "semi-supervised", 1]}
    a = rare.student_study(features, teacher, teacher_test, labels, y_test, groups, **options)
    b = rare.student_study(features, teacher, teacher_test, labels, y_test, groups, **options)
    assert set(a["pred"]) == {f"{s}/{o}" for s in students for o in rare.STUDENT_OBJECTIVES}
    assert a["pred"]["Choquet/distillation"].shape == (2, 90)
    assert all(torch.equal(a["pred"][k], b["pred"][k]) for k in a["pred"]) and torch.equal(a["logits"], b["logits"])
    again = rare.train_study_student(students["Choquet"], "semi-supervised", 1, features, teacher, labels, groups,
                                     epochs=2, batch_size=64)
    with torch.no_grad():
        assert torch.equal(again(z_test), a["logits"])  # one run recomputed alone gives the kept logits
    scores = a["scores"]["linear (embedding)/distillation"]
    pred = a["pred"]["linear (embedding)/distillation"][0].long()
    assert scores["faithfulness"][0] == pytest.approx(float((pred == teacher_test.argmax(1)).float().mean()))
    assert scores["rare recall"][0] == pytest.approx(float((pred[y_test == 2] == 2).float().mean()))
    with pytest.raises(ValueError, match="needs \\(kind"):
        rare.student_study(features, teacher, teacher_test, labels, y_test, groups,
                           students={"x": ("linear", "pixels", 0.1)})


def test_committed_students_match_a_live_fit_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    z, teacher, groups = _concept_problem(n=200)
    runs = {"a": (z, teacher, groups), "b": (z[:, [1, 0, 3, 2, 5, 4]], teacher, groups)}
    concepts = {"a": list("abcdef"), "b": list("badcfe")}
    students, results = rare.choquet_students_results(runs, name="test-students", concepts=concepts, epochs=2,
                                                      check="b", check_epochs=1)
    assert set(students) == {"a", "b"} and set(results["seconds"]) == {"a", "b"}
    live = {name: rare.fit_student(x, t, g, epochs=2) for name, (x, t, g) in runs.items()}
    live_first = rare.fit_student(*runs["b"], epochs=1)
    first = rare.load_choquet_student(groups, 3, results["check_state"])
    with torch.no_grad():
        for name, (x, _, _) in runs.items():
            assert torch.equal(students[name](x), live[name](x))
        assert torch.equal(first(z), live_first(z))  # the first epoch of the run
    assert len(list(tmp_path.glob("results/ch11/test-students-*.pt"))) == 1
    again, _ = rare.choquet_students_results(runs, name="test-students", concepts=concepts, epochs=2, check="b",
                                             check_epochs=1)
    assert len(list(tmp_path.glob("results/ch11/test-students-*.pt"))) == 1  # loaded, not rebuilt
    with torch.no_grad():
        assert torch.equal(again["a"](z), students["a"](z))


def test_committed_cav_tests_match_live_tests(tmp_path, monkeypatch):
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(2, (160,), generator=gen)
    has = torch.rand(160, generator=gen) < 0.4
    emb = torch.randn(160, 6, generator=gen) + 2.0 * F.one_hot(labels, 6).float()
    emb[:, 4] += 2.0 * has.float()

    def statistic(cav):
        return rare.within_class_auc((emb[80:] @ cav[:, None]).numpy(), has[80:, None].numpy(),
                                     labels[80:].numpy())[0]

    tests = {"concept": (has[:80].numpy(), statistic), "class": (labels[:80].numpy() == 1, statistic)}
    committed = rare.cav_tests_results(emb[:80], tests, n_runs=3, truth=[labels, has])
    for name, (positives, stat) in tests.items():
        live = rare.cav_significance(emb[:80], positives, stat, n_runs=3)
        assert np.array_equal(live.concept, committed[name].concept) and live.p == committed[name].p
    assert committed["concept"].concept.mean() > 0.8


def test_committed_self_training_matches_live_runs(tmp_path, monkeypatch):
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    x, y = _blobs()
    lab, unlab = torch.arange(0, len(x), 20), torch.tensor([i for i in range(len(x)) if i % 20])
    view = x[unlab] + 0.01
    seed_logits = torch.zeros(len(unlab), 3)
    seed_logits[:, 0] = 5.0 * (x[unlab, 0] > 1).float()
    options = {"n_classes": 3, "rounds": 2, "threshold": 0.9, "steps": 50}
    runs = rare.self_training_results(x[lab], y[lab], x[unlab], view, seed_logits, [0], x, y, **options)
    plain = rare.self_train(x[lab], y[lab], x[unlab], x_unlab_view=view, **options)
    seeded = rare.self_train(x[lab], y[lab], x[unlab], x_unlab_view=view, seed_logits=seed_logits, seed_classes=[0],
                             **options)
    for live, committed in [(plain, runs["plain"]), (seeded, runs["seeded"])]:
        assert torch.equal(live.pseudo, committed.pseudo) and live.history == committed.history
        assert torch.equal(live.probe.weight, committed.probe.weight)
        assert torch.equal(live.supervised.bias, committed.supervised.bias)
    assert runs["seeded, round 1"].history == seeded.history[:1]
    assert torch.equal(runs["ceiling"].weight, rare.fit_probe(x, y, n_classes=3, steps=50).weight)


def test_feature_probe_standardises_and_refuses_bad_features():
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(30)
    features = torch.randn(120, 8, generator=gen) + 3.0 * F.one_hot(y, 8).float()
    scaled = 1000.0 + 50.0 * features                        # raw scales of a locked tower's features
    probe = rare.fit_feature_probe(scaled, y, n_classes=4)
    assert torch.allclose(probe.mean, scaled.mean(0)) and torch.allclose(probe.std, scaled.std(0))
    with torch.no_grad():
        assert (probe(scaled).argmax(1) == y).float().mean() > 0.95
        same = rare.fit_feature_probe(features, y, n_classes=4)   # standardising makes the scale irrelevant
        assert torch.allclose(probe(scaled), same(features), atol=1e-3)
    with pytest.raises(ValueError, match="finite"):
        rare.fit_feature_probe(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long), n_classes=2)
    with pytest.raises(ValueError, match="finite"):
        rare.fit_feature_probe(torch.randn(5), torch.zeros(5, dtype=torch.long), n_classes=2)


def test_one_percent_lit_refuses_bad_input_and_needs_a_lit_recipe():
    x = data.fashion_tensors("test")[0][:4]
    with pytest.raises(ValueError, match="LitRecipe"):
        rare.train_one_percent_lit(x, torch.zeros(4, dtype=torch.long), recipe=clip.RECIPE)
    with pytest.raises(ValueError, match="one label each"):
        rare.train_one_percent_lit(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labelled"):
        rare.one_percent_models(torch.tensor([3, 4]), torch.tensor([4, 3, 5]))
    with pytest.raises(ValueError, match="distinct seeds"):
        rare.one_percent_seeds(torch.tensor([3, 4]), {"an item with a zip": (8,)}, seeds=(0, 0))


def test_committed_one_percent_models_verify_and_saw_the_labelled_images_only():
    x_train, y_train = data.fashion_tensors("train")
    split = rare.rare_split(y_train, rare_classes=rare.RARE_CLASSES, rare_fraction=0.05, label_fraction=0.01,
                            min_labelled=5, n_per_class=3000, seed=0)
    lab, unlab = torch.as_tensor(split.labelled), torch.as_tensor(split.unlabelled)
    pool = torch.cat([lab, unlab])
    key = {"recipe": rare.ONE_PERCENT_LIT.hashed_fields(), "n_classes": 10, "teacher_steps": 300,
           "indices": common.tensor_digest([lab.long(), pool.long()])}
    name = f"one-percent-{common.content_hash(key)}.pt"
    assert common.verified(common.WEIGHTS_DIR / "results" / "ch11" / name), "the committed 1 % models are missing"
    lit, teacher, results = rare.one_percent_results(lab, pool)       # the committed copy: nothing is rebuilt
    assert results["u_pool"].shape == (len(pool), 128) and results["u_test"].shape == (10_000, 128)
    assert torch.allclose(results["u_test"].norm(dim=1), torch.ones(10_000), atol=1e-2)
    assert results["history"]["n_images"] == len(lab)                 # the projections saw the 1 % only
    assert isinstance(teacher, rare.FeatureProbe) and teacher.linear.out_features == 10
    features = clip.imagenet_tower()(x_train[lab])                   # the teacher was standardised on these
    assert torch.allclose(teacher.mean, features.mean(0), atol=1e-3)
    assert not any(p.requires_grad for p in lit.parameters())
