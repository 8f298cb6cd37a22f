"""helpers.zoo: one recipe hash, one weights layout (committed -> cache -> train), one front door."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from helpers import common, zoo


@dataclasses.dataclass(frozen=True)
class TinyRecipe(zoo.Recipe):
    width: int = 3
    seed: int = 0
    extra: str = "old"  # added after weights were committed; "old" reproduces the earlier behaviour

    LATE_FIELDS = {"extra": "old"}


def test_key_is_a_content_hash_that_leaves_late_fields_out_at_their_old_value():
    recipe = TinyRecipe()
    assert recipe.key() == common.content_hash({"width": 3, "seed": 0}, length=12)
    assert TinyRecipe(extra="new").key() == common.content_hash({"width": 3, "seed": 0, "extra": "new"}, length=12)
    assert len({TinyRecipe().key(), TinyRecipe(seed=1).key(), TinyRecipe(width=4).key()}) == 3


def test_every_recipe_of_the_book_is_a_zoo_recipe_with_one_key():
    from helpers import clip, prototypes, rare, transfer, vision

    recipes = [vision.RECIPES["vit"], clip.RECIPE, rare.RARE_RECIPE, transfer.RECIPES["specialist"],
               prototypes.ProtoRecipe(), prototypes.RecRecipe()]  # fmt: skip
    for recipe in recipes:
        assert isinstance(recipe, zoo.Recipe)
        assert "key" not in type(recipe).__dict__, f"{type(recipe).__name__} re-implements key()"


def test_trained_model_trains_once_then_loads_the_committed_copy_and_ignores_an_altered_one(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def train():
        calls.append(1)
        torch.manual_seed(len(calls))
        return nn.Linear(2, 3), {"loss": [1.0, 0.5]}

    recipe = TinyRecipe()
    name = f"tiny-{recipe.key()}.pt"
    first = zoo.trained_model(lambda: nn.Linear(2, 3), train, recipe, name, family="test")
    assert len(calls) == 1 and first.history == {"loss": [1.0, 0.5]} and first.recipe == recipe
    assert not first.training
    cached = zoo.weights_path("test", name)
    assert json.loads(torch.load(cached, weights_only=True)["recipe"]) == dataclasses.asdict(recipe)
    committed = common.commit_cached(cached)
    assert committed == tmp_path / "weights" / "models" / "test" / name
    # a reader with an empty cache loads the committed copy, bit for bit, without training
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "fresh"))
    again = zoo.trained_model(lambda: nn.Linear(2, 3), train, recipe, name, family="test")
    assert len(calls) == 1 and torch.equal(again.weight, first.weight)
    # an altered committed copy is ignored: the model is retrained into the cache
    committed.write_bytes(b"tampered")
    zoo.trained_model(lambda: nn.Linear(2, 3), train, recipe, name, family="test")
    assert len(calls) == 2


def test_bad_input():
    with pytest.raises(ValueError, match="zoo.Recipe"):
        zoo.trained_model(nn.Identity, lambda: None, {"width": 3}, "x-1.pt", family="test")
    with pytest.raises(ValueError, match="family"):
        zoo.weights_path("a/b", "x.pt")
    with pytest.raises(ValueError, match="unknown model"):
        zoo.load("gpt-5")
    with pytest.raises(ValueError, match="seed"):
        zoo.load("vit", seed=-1)


def test_load_returns_the_chapters_committed_models():
    """The committed seeds load without training (each is a verified file under helpers/weights/models/)."""
    from helpers import transfer, vision

    assert {"vit", "cnn", "clip", "rare_clip", "protopnet", "source/specialist"} <= set(zoo.names())
    vit = zoo.load("vit")
    assert vit.recipe == vision.RECIPES["vit"] and "test_accuracy" in vit.history
    assert zoo.load("source/specialist", seed=2).recipe == transfer.RECIPES["specialist_seed2"]
    head = zoo.load("protopnet")  # the chapter's committed head: loads without touching the ViT's tokens
    assert head.recipe.key() == "f0cb8f7cd528" and "push" in head.history
    for name in ("vit", "cnn"):
        path = zoo.weights_path("vision", vision._weights_name(vision.RECIPES[name]))
        assert common.verified(common.WEIGHTS_DIR / path.relative_to(common.cache_dir()))


def test_chapters_that_build_on_the_book_vit_take_it_from_the_zoo_not_from_chapter_8():
    import ast
    from pathlib import Path

    from helpers import vision

    root = Path(__file__).resolve().parents[1] / "helpers"
    for module in ("clip", "transfer"):
        tree = ast.parse((root / f"{module}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "helpers"
                    for a in n.names}
        assert "vision" not in imported, f"helpers/{module}.py imports Chapter 8's module for the ViT"
    assert vision.fashion_vit is zoo.fashion_vit and vision.SmallCNN is zoo.SmallCNN    # Chapter 8 re-exports them
    assert vision.predict_logits is zoo.predict_logits
    logits = zoo.predict_logits(zoo.fashion_vit(), torch.zeros(3, 1, 28, 28))
    assert logits.shape == (3, 10) and not logits.requires_grad                          # teachers' logits: no graph
    assert sum(p.numel() for p in zoo.fashion_vit().parameters()) == 139_018             # as the docstring says
