"""helpers.continual's CoCoOp: the conditional context starts as CoOp's, conditions on the image once trained,
gives [N, C] logits through the one evaluation path, learns a tiny problem, shares the frozen encoder, checks input."""

import copy

import pytest
import torch
from torch.nn import functional as F

from helpers import clip, common, continual, data

NAMES = ["sandal", "bag", "coat"]


@pytest.fixture(autouse=True)
def _one_thread():
    with common.torch_threads(1):  # small prompts: a second thread only spins
        yield


def _toy_model(seed=0, dim=8):
    torch.manual_seed(seed)
    return continual.ContinualClip(clip.FashionClip(dim=dim)).eval().requires_grad_(False)


def _embeddings(n, dim=8, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _task(n=8, classes=("sandal", "bag"), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = data.normalise((torch.rand(n, 28, 28, generator=g) * 255).byte())
    y = torch.arange(n) % len(classes)
    return data.Task("toy", tuple(classes), ("a photo of a {}.",), x, y, x[: n // 2], y[: n // 2])


def _shake(context, seed=1):
    """Give the meta-net a non-zero last layer (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in context.meta_net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))


def test_zero_meta_net_gives_coops_prompts_exactly():
    model = _toy_model()
    conditional = continual.ConditionalPromptContext(model.clip.text, image_dim=8)
    plain = continual.PromptContext(model.clip.text)
    assert torch.equal(conditional.vectors, plain.vectors)  # both start from "a photo of a"
    assert conditional.meta_net[-1].weight.abs().sum() == 0 and conditional.meta_net[-1].bias.abs().sum() == 0
    with torch.no_grad():
        per_image = conditional.conditioned(NAMES, _embeddings(3))  # [N, C, 384]
        shared = plain(NAMES)  # [C, 384]
    assert per_image.shape == (3, len(NAMES), 384)
    for row in per_image:
        assert torch.equal(row, shared)


def test_hidden_width_follows_the_reference_ratio():
    model = _toy_model()
    assert continual.ConditionalPromptContext(model.clip.text, image_dim=128).meta_net[0].out_features == 8
    assert continual.ConditionalPromptContext(model.clip.text, image_dim=8).meta_net[0].out_features == 1
    assert continual.ConditionalPromptContext(model.clip.text, image_dim=8, hidden=5).meta_net[0].out_features == 5


def test_a_nonzero_meta_net_gives_each_image_its_own_class_embeddings():
    model = _toy_model()
    model.context = continual.ConditionalPromptContext(model.clip.text, image_dim=8, hidden=16)
    _shake(model.context)
    task = _task(classes=tuple(NAMES))
    emb = _embeddings(4)
    with torch.no_grad():
        per_image = model.image_class_embeddings(emb, task)  # [N, C, d]
        again = model.image_class_embeddings(emb[1:2], task)
        batched = model.image_class_embeddings(emb, task, batch_size=1)  # one image per text-tower call
    assert per_image.shape == (4, len(NAMES), 8)
    assert torch.allclose(per_image.norm(dim=-1), torch.ones(4, len(NAMES)), atol=1e-5)
    assert (per_image[0] - per_image[1]).abs().max() > 1e-3
    assert torch.allclose(again[0], per_image[1], atol=1e-5)  # an image's prompts do not depend on its batch
    assert torch.allclose(batched, per_image, atol=1e-5)


def test_logits_are_n_by_c_and_evaluation_uses_the_same_path():
    model = _toy_model()
    model.context = continual.ConditionalPromptContext(model.clip.text, image_dim=8, hidden=16)
    _shake(model.context)
    task = _task(n=6, classes=tuple(NAMES))
    with torch.no_grad():
        logits = model.logits(task.x_test, task)
        emb = model.encode_images(task.x_test)
        sims = model.similarities(emb, task)
        by_hand = torch.einsum("nd,ncd->nc", emb, model.image_class_embeddings(emb, task))
    assert logits.shape == (len(task.x_test), len(NAMES))
    assert torch.allclose(logits, model.logit_scale * sims, atol=1e-4)
    assert torch.allclose(sims, by_hand, atol=1e-6)
    alternate = continual.Question("even?", ("a photo of a bag.",), ("a photo of a coat.",),
                                   lambda labels, _images: torch.arange(len(labels)) % 2 == 0)
    out = continual.evaluate(model, [task], task, [alternate], image_emb=[emb, emb])
    assert out["tasks"][0] == pytest.approx(float((sims.argmax(1) == task.y_test).float().mean()))
    with pytest.raises(ValueError, match="image-conditioned"):
        model.class_embeddings(task)


def test_a_few_steps_reduce_the_loss_on_a_separable_problem():
    model = _toy_model()
    model.context = continual.ConditionalPromptContext(model.clip.text, image_dim=8)
    context = model.context
    task = _task(classes=("sandal", "bag"))
    emb = F.normalize(torch.eye(8)[:2].repeat(4, 1), dim=-1)  # class 0: e_0, class 1: e_1
    labels = torch.arange(8) % 2
    params = [context.vectors, *context.meta_net.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=0.05)

    def loss():
        return F.cross_entropy(model.logit_scale * model.similarities(emb, task), labels)

    with torch.no_grad():
        before = float(loss())
    for _ in range(5):
        step = loss()
        optimiser.zero_grad()
        step.backward()
        optimiser.step()
    with torch.no_grad():
        after = float(loss())
    assert after < before - 0.05, (before, after)
    assert context.meta_net[-1].weight.abs().sum() > 0  # the meta-net learnt something


def test_cocoop_method_trains_only_the_context_and_the_meta_net():
    model = _toy_model()
    task = _task()
    state = continual.State(initial=model, recipe=continual.StepRecipe(coop_steps=3, coop_lr=0.05))
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    out = continual.ALL_METHODS["CoCoOp"](model, task, state=state)
    assert isinstance(out.context, continual.ConditionalPromptContext) and model.context is None
    names = [n for n, _ in out.named_parameters() if not n.startswith("clip.")]
    assert names == ["context.vectors", "context.meta_net.0.weight", "context.meta_net.0.bias",
                     "context.meta_net.2.weight", "context.meta_net.2.bias"]
    assert all(torch.equal(v, clip_before[k]) for k, v in out.clip.state_dict().items())
    assert out.context.meta_net[-1].weight.abs().sum() > 0
    assert not any(p.requires_grad for p in out.parameters())
    assert "CoCoOp" not in continual.PROMPT_METHODS and "CoCoOp" not in continual.LIT_METHODS
    with pytest.raises(ValueError, match="another kind"):
        continual.coop(out, task, state=state)


def test_deepcopy_shares_the_frozen_encoder_and_copies_the_trained_parts():
    model = _toy_model()
    model.context = continual.ConditionalPromptContext(model.clip.text, image_dim=8, hidden=16)
    _shake(model.context)
    twin = copy.deepcopy(model)
    assert twin.context.encoder is model.context.encoder
    assert isinstance(twin.context, continual.ConditionalPromptContext)
    for a, b in zip(twin.context.parameters(), model.context.parameters(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with torch.no_grad():
        twin.context.meta_net[0].bias.add_(1.0)
    assert not torch.equal(twin.context.meta_net[0].bias, model.context.meta_net[0].bias)


def test_bad_input_raises_value_errors():
    model = _toy_model()
    text = model.clip.text
    with pytest.raises(ValueError, match="image_dim"):
        continual.ConditionalPromptContext(text, image_dim=0)
    with pytest.raises(ValueError, match="hidden"):
        continual.ConditionalPromptContext(text, image_dim=8, hidden=0)
    context = continual.ConditionalPromptContext(text, image_dim=8)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        context.conditioned(NAMES, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="class names"):
        context.conditioned([], torch.zeros(2, 8))
    with pytest.raises(ValueError, match="conditional context"):
        model.image_class_embeddings(_embeddings(2), _task())
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        model.similarities(torch.zeros(8), _task())
