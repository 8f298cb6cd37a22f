"""helpers.clip: contrastive loss, captions, concept scores, a short training run, and the HF CLIPModel adapter."""

import json
import math

import pytest
import torch
from torch.nn import functional as F

from helpers import clip, common, data, zoo


class ToyClip:
    """A hand-built ClipLike: images are embedded by their mean pixel, texts by whether they say "dark"."""

    logit_scale = 10.0

    def encode_image(self, images):
        bright = data.unnormalise(images).mean((1, 2))
        return F.normalize(torch.stack([1 - bright, bright], 1), dim=-1)

    def encode_text(self, texts):
        return torch.tensor([[1.0, 0.0] if "dark" in t else [0.0, 1.0] for t in texts])


def _images(values):
    return data.normalise((torch.tensor(values)[:, None, None] * 255 * torch.ones(len(values), 28, 28)).byte())


def test_contrastive_loss_is_lower_on_aligned_pairs():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(16, 8), dim=-1)
    texts = F.normalize(images + 0.1 * torch.randn(16, 8), dim=-1)
    aligned = clip.contrastive_loss(images, texts, 10.0)
    shuffled = clip.contrastive_loss(images, texts[torch.randperm(16)], 10.0)
    assert aligned < shuffled
    assert aligned < math.log(16) < shuffled  # log(batch) is the loss of uninformative embeddings
    with pytest.raises(ValueError, match="same shape"):
        clip.contrastive_loss(images, texts[:4], 10.0)


def test_toy_model_satisfies_the_protocol_and_gives_concept_scores():
    model = ToyClip()
    assert isinstance(model, clip.ClipLike)
    images = _images([0.2, 0.95])
    probs = clip.concept_probabilities(model, images, ["a dark item", "a light item"])
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(1), torch.ones(2))
    assert probs[0, 0] > 0.5 > probs[1, 0]
    weights = clip.zero_shot_weights(model, ["dark thing", "light thing"], ["a {}."])
    assert clip.zero_shot_logits(model, images, weights).argmax(1).tolist() == [0, 1]
    std = clip.Standardiser.fit(probs)
    assert torch.allclose(std(probs).mean(0), torch.zeros(2), atol=1e-6)


def test_bad_concepts_and_scores_give_clear_errors():
    model, images = ToyClip(), _images([0.5])
    with pytest.raises(ValueError, match="concepts list is empty"):
        clip.concept_probabilities(model, images, [])
    with pytest.raises(ValueError, match="empty"):
        clip.ConceptBank.from_rows([])
    with pytest.raises(ValueError, match="one entry per concept"):
        clip.ConceptBank(("a", "b"), ("p",), ("g", "g"))
    with pytest.raises(ValueError, match="non-empty string"):
        clip.concept_probabilities(model, images, ["a dark item", ""])
    std = clip.Standardiser.fit(torch.rand(5, 3))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        std(torch.rand(5, 4))
    with pytest.raises(ValueError, match="'\\{\\}'"):
        clip.zero_shot_weights(model, ["x"], ["no slot"])
    with pytest.raises(ValueError, match="NaN"):
        model.encode_image(data.check_images(torch.full((1, 1, 28, 28), math.nan)))


def test_retrieval_recall_with_shared_captions():
    emb = torch.eye(3)
    out = clip.retrieval_recall(emb, emb[[1, 0, 2]], ["a", "b", "c"], ["a", "b", "c"], ks=(1, 3))
    assert out["image_to_text@1"] == pytest.approx(1 / 3) and out["image_to_text@3"] == 1.0
    # texts 0 and 1 carry the same caption "a": retrieving either one is a hit
    out = clip.retrieval_recall(emb, emb[[1, 0, 2]], ["a", "a", "c"], ["a", "a", "c"], ks=(1,))
    assert out == {"image_to_text@1": 1.0, "text_to_image@1": 1.0}


def test_concept_bank_of_the_chapter():
    bank = clip.FASHION_CONCEPTS
    assert 30 <= len(bank) <= 80
    groups = bank.group_indices()
    assert sorted(i for g in groups.values() for i in g) == list(range(len(bank)))


@pytest.mark.slow
def test_short_training_run_learns_and_committed_weights_verify():
    """A short version of the recipe (class-name captions only, so MiniLM encodes 60 captions): the loss falls
    below the chance level log(batch)."""
    recipe = clip.ClipRecipe(n_train=1024, epochs=2, batch_size=128, warmup_steps=4, p_mention=0.0)
    model, history = clip.train_clip(recipe, progress=False)
    assert history["loss"][-1] < math.log(128)
    assert isinstance(model, clip.ClipLike)
    x, y = data.fashion_tensors("test")
    emb = model.encode_image(x[:8])
    assert emb.shape == (8, recipe.dim) and torch.allclose(emb.norm(dim=-1), torch.ones(8), atol=1e-5)
    committed = zoo.committed_path("clip", clip._weights_name(clip.RECIPE))
    if committed.exists():
        assert common.verified(committed), "committed CLIP weights do not match their .sha256 sidecar"


def _tiny_clip_dir(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,'-")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=40, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    out = tmp_path / "tiny-clip"
    CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def test_hf_clip_adapter_loads_a_local_tiny_checkpoint(tmp_path):
    path = _tiny_clip_dir(tmp_path)
    model = clip.HFClip.from_pretrained(path)
    assert isinstance(model, clip.ClipLike)
    x, _ = data.fashion_tensors("test")
    pixels = model.preprocess(x[:3])
    assert pixels.shape == (3, 3, 32, 32)
    img = model.encode_image(x[:3])
    txt = model.encode_text(["a photo of a sneaker.", "a coat"])
    assert img.shape == (3, 16) and txt.shape == (2, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert model.logit_scale == pytest.approx(1 / 0.07, rel=1e-3)
    probs = clip.concept_probabilities(model, x[:3], clip.FASHION_CONCEPTS)
    assert probs.shape == (3, len(clip.FASHION_CONCEPTS))
    weights = clip.zero_shot_weights(model, data.CLASS_TEXT[:3])
    assert weights.shape == (3, 16)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        clip.HFClip.from_pretrained(tmp_path / "missing")


class _FakeText:
    """A stand-in for the frozen MiniLM tower: a fixed random 384-d vector per distinct text."""

    def __call__(self, texts):
        return torch.stack([torch.randn(384, generator=torch.Generator().manual_seed(hash(t) % 2**31)) for t in texts])


@pytest.mark.parametrize("decay", [True, False])
def test_log_scale_weight_decay_is_an_option(decay):
    """With AdamW's lr * weight_decay = 0.5, a decayed log_scale halves each step; CLIP's setting leaves it to Adam."""
    common.set_seed(0)
    x, y = data.fashion_tensors("test")
    recipe = clip.ClipRecipe(n_train=64, epochs=1, batch_size=32, warmup_steps=1, lr=1e-3, weight_decay=500.0,
                             p_mention=0.0)

    def draw(attributes, labels, generator):
        return data.sample_captions(attributes, labels, generator, p_mention=0.0)

    model, _ = clip.fit_contrastive(recipe, x[:64], y[:64], draw, progress=False, text=_FakeText(),
                                    decay_log_scale=decay)
    start = math.log(1 / 0.07)
    if decay:
        assert model.log_scale.item() < 0.8 * start
    else:
        assert abs(model.log_scale.item() - start) < 3e-3  # at most one Adam step of size lr per step
