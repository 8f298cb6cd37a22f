"""helpers.transfer: granularities, source networks, features, linear probe, mNRG, dimension purity."""

import dataclasses

import numpy as np
import pytest
import torch

from helpers import common, data, transfer, zoo

# ---------------------------------------------------------------------------------------------
# Granularities
# ---------------------------------------------------------------------------------------------


def test_coarse_mapping_covers_all_ten_classes_once():
    names, of_class = transfer.coarse_mapping()
    assert names == ["tops", "bottoms", "footwear", "bags"]
    assert len(of_class) == 10 and set(of_class) == {0, 1, 2, 3}
    members = [c for group in transfer.COARSE_GROUPS.values() for c in group]
    assert sorted(members) == sorted(transfer.CLASSES)
    assert of_class[transfer.CLASSES.index("Ankle boot")] == names.index("footwear")


def test_coarse_mapping_rejects_gaps_overlaps_and_unknown_names():
    groups = dict(transfer.COARSE_GROUPS)
    with pytest.raises(ValueError, match="leave out"):
        transfer.coarse_mapping({k: v for k, v in groups.items() if k != "bags"})
    with pytest.raises(ValueError, match="two coarse groups"):
        transfer.coarse_mapping({**groups, "extra": ("Bag",)})
    with pytest.raises(ValueError, match="unknown class name"):
        transfer.coarse_mapping({**groups, "bags": ("Handbag",)})
    with pytest.raises(ValueError, match="empty"):
        transfer.coarse_mapping({})


def test_unknown_class_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown class name.*'Jumper'"):
        transfer.class_indices(["Coat", "Jumper"])
    with pytest.raises(ValueError, match="wrap it in a list"):
        transfer.class_indices("Coat")
    with pytest.raises(ValueError, match="unknown class name"):
        transfer.SourceRecipe(held_out=("Socks",))
    with pytest.raises(ValueError, match="tasks"):
        transfer.SourceRecipe(tasks=("medium",))


@pytest.mark.slow
def test_wordnet_paths_support_the_grouping():
    paths = transfer.hypernym_paths()
    assert set(paths) == set(transfer.CLASSES)
    for name in transfer.COARSE_GROUPS["footwear"]:
        assert "footwear" in paths[name]
    assert "container" in paths["Bag"]
    assert all("garment" in paths[n] for n in ("T-shirt/top", "Pullover", "Coat", "Shirt", "Trouser"))


def test_source_data_hides_the_held_out_classes():
    recipe = transfer.SourceRecipe(n_train=500)
    x, labels = transfer.source_data(recipe, "train")
    assert x.shape == (500, 1, 28, 28)
    assert labels["fine"].min() >= 0 and labels["fine"].max() == len(recipe.source_classes()) - 1 == 6
    assert set(labels["coarse"].tolist()) == {0, 1, 2, 3}
    x_all, y_all = data.fashion_tensors("train")
    source = torch.isin(y_all[: transfer.SOURCE_POOL], torch.tensor(recipe.source_classes()))
    torch.testing.assert_close(x, x_all[: transfer.SOURCE_POOL][source][:500])
    held = torch.tensor(transfer.class_indices(list(transfer.HELD_OUT)))
    assert not torch.isin(torch.tensor(recipe.source_classes()), held).any()


def test_grouping_lives_in_the_recipe(monkeypatch):
    """Another grouping is another recipe (hash, weights file, labels); rebinding COARSE_GROUPS changes nothing."""
    chapter = transfer.RECIPES["generalist"]
    assert chapter.key() == "760f02b1cda5"  # the committed generalist's name: the default grouping is not hashed
    wordnet = {"garment": ("T-shirt/top", "Trouser", "Pullover", "Coat", "Shirt"), "womens": ("Dress",),
               "footwear": ("Sandal", "Sneaker", "Ankle boot"), "container": ("Bag",)}
    mine = transfer.SourceRecipe(tasks=("coarse",), n_train=300, coarse_groups=wordnet)  # a dict is frozen
    assert isinstance(mine.coarse_groups, tuple) and hash(mine)
    assert mine.key() != dataclasses.replace(mine, coarse_groups=transfer.CHAPTER_GROUPS).key()
    assert transfer._weights_name(mine) != transfer._weights_name(chapter)
    _, labels = transfer.source_data(mine, "train")
    _, y = data.fashion_tensors("train")
    names = [transfer.CLASSES[c] for c in y[: transfer.SOURCE_POOL][torch.isin(
        y[: transfer.SOURCE_POOL], torch.tensor(mine.source_classes()))][:300]]  # fmt: skip
    expected = [next(g for g, (_, members) in enumerate(mine.coarse_groups) if n in members) for n in names]
    assert labels["coarse"].tolist() == expected
    assert transfer.build_source_net(mine).heads["coarse"].out_features == 4
    # the old route of Exercise 2 (rebinding the module-level grouping) no longer leaks into any recipe
    monkeypatch.setattr(transfer, "COARSE_GROUPS", wordnet)
    assert transfer.SourceRecipe(tasks=("coarse",)).key() == chapter.key()
    _, again = transfer.source_data(dataclasses.replace(chapter, n_train=300), "train")
    assert again["coarse"].tolist() != expected and set(again["coarse"].tolist()) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="coarse groups leave out"):
        transfer.SourceRecipe(coarse_groups={"tops": ("T-shirt/top",)})
    with pytest.raises(ValueError, match="not one string"):
        transfer.freeze_groups({"all": "Bag"})


def test_seed_replicates_are_distinct_seeds_of_one_recipe():
    for net, names in transfer.SEED_REPLICATES.items():
        assert len(names) >= 3, f"{net} needs at least 3 seeds"
        recipes = [transfer.RECIPES[n] for n in names]
        assert len({r.seed for r in recipes}) == len(recipes)
        assert len({dataclasses.replace(r, seed=0) for r in recipes}) == 1, f"{net}: replicates differ beyond the seed"
    seeds = [transfer.RECIPES[n].seed for n in transfer.SEED_REPLICATES["S"] + transfer.SEED_REPLICATES["S'"]]
    assert len(set(seeds)) == 6, "S and S' must never share a seed"


# ---------------------------------------------------------------------------------------------
# Source networks: determinism, a short recipe, committed weights
# ---------------------------------------------------------------------------------------------


def test_training_is_deterministic_under_a_seed():
    recipe = transfer.SourceRecipe(tasks=("fine", "coarse"), epochs=1, n_train=256, batch_size=64)
    a, ha = transfer.train_source(recipe, progress=False, evaluate=False)
    b, hb = transfer.train_source(recipe, progress=False, evaluate=False)
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"training is not deterministic under its seed ({k})"
    assert ha["train_loss"] == hb["train_loss"]
    c, _ = transfer.train_source(dataclasses.replace(recipe, seed=1), progress=False, evaluate=False)
    assert not torch.equal(a.heads["fine"].weight, c.heads["fine"].weight)


def test_short_recipe_learns_and_is_cached(tmp_path, monkeypatch):
    """The committed recipe, shortened: it must beat chance by far; a corrupt cache file is rebuilt."""
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    recipe = dataclasses.replace(transfer.RECIPES["multitask"], epochs=1, n_train=3000)
    model = transfer.source_network(recipe, progress=False)
    assert model.history["test_accuracy"]["fine"][-1] > 0.55  # 7 classes: chance 0.14
    assert model.history["test_accuracy"]["coarse"][-1] > 0.7
    cached = tmp_path / "models" / "transfer" / transfer._weights_name(recipe)
    cached.write_bytes(b"corrupt")
    again = transfer.source_network(recipe, progress=False)
    assert torch.equal(model.heads["fine"].weight, again.heads["fine"].weight)


def test_committed_weights_are_verified():
    missing = [name for name, r in transfer.RECIPES.items()
               if not common.verified(zoo.committed_path("transfer", transfer._weights_name(r)))]  # fmt: skip
    assert not missing, f"committed weights missing or altered for {missing}: run make refresh-artefacts"
    spec = transfer.source_network("specialist", progress=False)
    assert spec.history["test_accuracy"]["fine"][-1] > 0.85
    gen = transfer.source_network("generalist", progress=False)
    assert list(gen.heads) == ["coarse"] and gen.history["test_accuracy"]["coarse"][-1] > 0.95


def test_unknown_source_network():
    with pytest.raises(ValueError, match="unknown source network"):
        transfer.source_network("mediumist")


# ---------------------------------------------------------------------------------------------
# Features and transfer
# ---------------------------------------------------------------------------------------------


def test_feature_concatenation_shapes():
    s = transfer.build_source_net(transfer.SourceRecipe())
    g = transfer.build_source_net(transfer.SourceRecipe(tasks=("coarse",), seed=1))
    x = torch.randn(5, 1, 28, 28)
    fs, fg = transfer.features(s, x), transfer.features(g, x)
    both = transfer.features([s, g], x, batch_size=2)
    assert fs.shape == fg.shape == (5, 64) and both.shape == (5, 128)
    torch.testing.assert_close(both, torch.cat([fs, fg], 1))
    assert transfer.concat_features(fs, fg, fs).shape == (5, 192)
    with pytest.raises(ValueError, match="different numbers of items"):
        transfer.concat_features(fs, fg[:4])
    with pytest.raises(ValueError, match=r"\[item, dim\]"):
        transfer.concat_features(fs, fg[None])
    with pytest.raises(ValueError, match="at least one"):
        transfer.features([], x)
    with pytest.raises(ValueError, match="channel axis"):
        transfer.features(s, x[:, 0])


def test_linear_probe_known_answer_and_bad_inputs():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 30)
    x = np.eye(3)[y] * 3 + rng.normal(0, 0.3, (90, 3))
    assert transfer.linear_probe(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        transfer.linear_probe(x[:0], y[:0], x, y)
    with pytest.raises(ValueError, match="empty"):
        transfer.linear_probe(x, y, x[:0], y[:0])
    with pytest.raises(ValueError, match="90 items but there are 89 labels"):
        transfer.linear_probe(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="single class"):
        transfer.linear_probe(x[:30], y[:30], x, y)
    with pytest.raises(ValueError, match="never occur"):
        transfer.linear_probe(x[:60], y[:60], x, y)
    with pytest.raises(ValueError, match="width"):
        transfer.linear_probe(x, y, x[:, :2], y)


def test_targets_are_the_chapters_problems():
    targets = transfer.transfer_targets(n_train_per_class=5, n_test=50)
    assert list(targets) == ["held-out classes", "fashion-10", "rotated", "edges", "digits"]
    held = targets["held-out classes"]
    assert held.classes == transfer.HELD_OUT and len(held.y_train) == 15 and len(held.y_test) == 50
    assert targets["digits"].x_train.shape == (50, 1, 28, 28)


def test_fine_tune_runs_and_leaves_the_source_untouched():
    targets = transfer.transfer_targets(n_train_per_class=4, n_test=20)
    s = transfer.build_source_net(transfer.SourceRecipe())
    before = s.heads["fine"].weight.clone(), s.trunk.patch_embed.proj.weight.clone()
    net, info = transfer.fine_tune([s, s], targets["digits"], epochs=1)
    assert net.head.in_features == 128 and 0 <= info["test_accuracy"] <= 1
    assert torch.equal(before[1], s.trunk.patch_embed.proj.weight) and torch.equal(before[0], s.heads["fine"].weight)
    empty = dataclasses.replace(targets["digits"], y_train=torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        transfer.fine_tune(s, empty)


# ---------------------------------------------------------------------------------------------
# mNRG
# ---------------------------------------------------------------------------------------------


def test_mnrg_hand_computed_example():
    # two targets; reference S at 0.80 and 0.50; M at 0.90 and 0.60; W at 0.70 and 0.50.
    scores = {"S": [0.80, 0.50], "M": [0.90, 0.60], "W": [0.70, 0.50]}
    # headroom: M gains 0.1/0.2 = 0.5 and 0.1/0.5 = 0.2 -> mean 0.35 -> 35 %; W: -0.1/0.2 = -0.5 and 0 -> -25 %
    assert transfer.mnrg(scores, reference="S") == pytest.approx({"S": 0.0, "M": 35.0, "W": -25.0})
    # best: divide by the largest |gain| per target (0.1 and 0.1): M 1 and 1 -> 100 %; W -1 and 0 -> -50 %
    best = transfer.mnrg(scores, reference="S", normalisation="best")
    assert best == pytest.approx({"S": 0.0, "M": 100.0, "W": -50.0})
    # the best representation scores 1 per target; an anchor never sets the normaliser, even with the
    # largest gain (O) or the largest loss (R); without anchors=, O's gain would divide instead
    with_anchors = dict(scores, R=[0.10, 0.10], O=[1.0, 1.0])
    best = transfer.nrg(with_anchors, reference="S", normalisation="best", anchors=["R", "O"])
    np.testing.assert_allclose(best["M"], [1.0, 1.0])
    np.testing.assert_allclose(best["R"], [-7.0, -4.0])
    np.testing.assert_allclose(transfer.nrg(with_anchors, reference="S", normalisation="best")["M"], [0.5, 0.2])
    # nobody beats the reference on a target: the largest loss divides
    np.testing.assert_allclose(transfer.nrg({"S": [0.8], "W": [0.6], "V": [0.7]}, reference="S",
                                            normalisation="best")["V"], [-0.5])
    with pytest.raises(ValueError, match="anchors"):
        transfer.nrg(scores, reference="S", normalisation="best", anchors=["nope"])
    # percentages with max_score=100 give the same answer
    pct = {k: [100 * v for v in s] for k, s in scores.items()}
    assert transfer.mnrg(pct, reference="S", max_score=100) == pytest.approx({"S": 0.0, "M": 35.0, "W": -25.0})
    np.testing.assert_allclose(transfer.nrg(scores, reference="S")["W"], [-0.5, 0.0])


def test_best_normalisation_on_a_hand_made_table():
    """The best compared representation scores exactly 1 on every target; anchors (random, pixels) never normalise."""
    table = {"S": [0.80, 0.60, 0.70], "A": [0.85, 0.58, 0.75], "B": [0.82, 0.66, 0.70],
             "random": [0.40, 0.30, 0.20], "pixels": [0.95, 0.50, 0.90]}
    nrg = transfer.nrg(table, reference="S", normalisation="best", anchors=["random", "pixels"])
    # best gains over S: 0.05 (A), 0.06 (B), 0.05 (A)
    np.testing.assert_allclose(nrg["A"], [1.0, -0.02 / 0.06, 1.0])
    np.testing.assert_allclose(nrg["B"], [0.02 / 0.05, 1.0, 0.0])
    np.testing.assert_allclose(nrg["random"], [-0.40 / 0.05, -0.30 / 0.06, -0.50 / 0.05])
    np.testing.assert_allclose(nrg["pixels"], [3.0, -0.10 / 0.06, 4.0])
    compared = np.stack([nrg[r] for r in ("S", "A", "B")])
    np.testing.assert_allclose(compared.max(0), 1.0)
    m = transfer.mnrg(table, reference="S", normalisation="best", anchors=["random", "pixels"])
    assert m["A"] == pytest.approx(100 * (2 - 1 / 3) / 3) and m["B"] == pytest.approx(100 * 1.4 / 3)


def test_mnrg_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        transfer.mnrg({}, reference="S")
    with pytest.raises(ValueError, match="no targets"):
        transfer.mnrg({"S": [], "M": []}, reference="S")
    with pytest.raises(ValueError, match="not among"):
        transfer.mnrg({"S": [0.5]}, reference="G")
    with pytest.raises(ValueError, match="one score per target"):
        transfer.mnrg({"S": [0.5, 0.6], "M": [0.7]}, reference="S")
    with pytest.raises(ValueError, match="max_score=100"):
        transfer.mnrg({"S": [50.0], "M": [60.0]}, reference="S")
    with pytest.raises(ValueError, match="headroom"):
        transfer.mnrg({"S": [1.0], "M": [0.9]}, reference="S")
    with pytest.raises(ValueError, match="normalisation"):
        transfer.mnrg({"S": [0.5]}, reference="S", normalisation="mean")


def test_dimension_purity():
    feats = np.array([[5.0, 0.0], [4.0, 0.0], [0.0, 5.0], [0.0, 4.0]])
    assert transfer.dimension_purity(feats, [0, 0, 1, 0], top=2).tolist() == [1.0, 0.5]
    with pytest.raises(ValueError, match="top must be"):
        transfer.dimension_purity(feats, [0, 0, 1, 0], top=5)
    with pytest.raises(ValueError, match="labels"):
        transfer.dimension_purity(feats, [0, 1], top=1)


# ---------------------------------------------------------------------------------------------
# Baselines: raw pixels, the probe's C by cross-validation
# ---------------------------------------------------------------------------------------------


def test_pixel_features():
    x = torch.arange(2 * 784, dtype=torch.float32).reshape(2, 1, 28, 28)
    assert transfer.pixel_features(x).shape == (2, 784)
    assert transfer.pixel_features(x)[1, 0] == 784.0
    with pytest.raises(ValueError):
        transfer.pixel_features(torch.zeros(2, 28, 28))


def test_select_probe_C_known_answers():
    rng = np.random.default_rng(0)
    # separable but imbalanced (4:1): a tiny C shrinks the weights until the intercept predicts the majority
    x = np.r_[rng.normal(-1, 0.1, (80, 2)), rng.normal(1, 0.1, (20, 2))]
    y = np.r_[np.zeros(80, int), np.ones(20, int)]
    best, accs = transfer.select_probe_C([(x, y), (x + 0.01, y)], Cs=(1e-6, 1.0), folds=3)
    assert best == 1.0 and accs[1.0] == pytest.approx(1.0) and accs[1e-6] == pytest.approx(0.8, abs=0.01)
    # every candidate perfect: the tie goes to the smaller C
    best, accs = transfer.select_probe_C([(x, y)], Cs=(10.0, 1.0), folds=2)
    assert best == 1.0 and accs == {1.0: 1.0, 10.0: 1.0}
    with pytest.raises(ValueError, match="one feature size"):
        transfer.select_probe_C([(x, y), (np.c_[x, x], y)])
    with pytest.raises(ValueError, match="empty"):
        transfer.select_probe_C([])
    with pytest.raises(ValueError, match="positive"):
        transfer.select_probe_C([(x, y)], Cs=(0.0, 1.0))
    with pytest.raises(ValueError, match="folds"):
        transfer.select_probe_C([(x, y)], folds=1)


def test_chosen_probe_C_is_an_artefact(tmp_path, monkeypatch):
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(-1, 0.1, (80, 2)), rng.normal(1, 0.1, (20, 2))]
    y = np.r_[np.zeros(80, int), np.ones(20, int)]
    out = transfer.chosen_probe_C({"2": [(x, y)]}, recipe={"toy": 1}, Cs=(1e-6, 1.0))
    assert out["2"]["C"] == 1.0
    # built once: a second call needs no problems
    assert transfer.chosen_probe_C(None, recipe={"toy": 1}, Cs=(1e-6, 1.0)) == out
    with pytest.raises(ValueError, match="rebuilt"):
        transfer.chosen_probe_C(None, recipe={"toy": 2}, Cs=(1e-6, 1.0))


def test_committed_chapter_results_are_verified():
    """The probe-C choice and the seed study of Chapter 13 are committed beside the weights, hash-verified."""
    files = sorted((common.WEIGHTS_DIR / "results" / "ch13").glob("*.json"))
    assert {f.name.split("-")[0] for f in files} >= {"probe_C", "seeds"}, "run nbs/13 to rebuild, then commit"
    for f in files:
        assert common.verified(f), f"{f.name} does not match its .sha256 sidecar"


def test_finer_labels_split_each_source_class_into_its_clusters():
    recipe = transfer.RECIPES["finer"]
    x, labels = transfer.source_data(recipe, "test")
    k = recipe.finer_per_class
    assert torch.equal(labels["finer"] // k, labels["fine"])                      # a cluster of its own class
    assert set(labels["finer"].tolist()) == set(range(len(recipe.source_classes()) * k))
    centres = transfer.finer_centroids(recipe)                                   # darker cluster first
    assert bool((centres.mean(-1)[:, :-1] <= centres.mean(-1)[:, 1:]).all())
    assert transfer.RECIPES["specialist"].key() == transfer.SourceRecipe().key()  # the new field keeps old names
    with pytest.raises(ValueError, match="finer_per_class"):
        transfer.SourceRecipe(tasks=("finer",), finer_per_class=1)
    assert "finer" not in transfer.source_data(transfer.RECIPES["specialist"], "test")[1]
