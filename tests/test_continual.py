"""helpers.continual: ZSCL metrics, WiSE-FT endpoints, CoOp's trainable set, the replay buffer, the stream."""

import numpy as np
import pytest
import torch

from helpers import clip, continual, vision


def _tiny_task(name="toy", n=12, classes=("sandal", "bag"), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = vision.normalise((torch.rand(n, 28, 28, generator=g) * 255).byte())
    y = torch.arange(n) % len(classes)
    return continual.Task(name, tuple(classes), ("a photo of a {}.",), x, y, x[: n // 2], y[: n // 2])


def _toy_model(seed=0):
    torch.manual_seed(seed)
    return continual.ContinualClip(clip.FashionClip(dim=8)).eval().requires_grad_(False)


def test_stream_metrics_match_a_hand_computed_matrix():
    a = np.array([[0.80, 0.30, 0.10],
                  [0.60, 0.90, 0.20],
                  [0.50, 0.70, 0.95]])  # fmt: skip
    m = continual.stream_metrics(a)
    # Transfer: task 2 -> 0.30; task 3 -> (0.10 + 0.20) / 2 = 0.15; mean 0.225
    assert m["transfer"] == pytest.approx(0.225)
    # Avg: column means (0.6333, 0.6333, 0.4167) -> 0.5611
    assert m["avg"] == pytest.approx((0.80 + 0.30 + 0.10 + 0.60 + 0.90 + 0.20 + 0.50 + 0.70 + 0.95) / 9)
    assert m["last"] == pytest.approx((0.50 + 0.70 + 0.95) / 3)
    # Forgetting: task 1 best 0.80 -> 0.50 (0.30); task 2 best 0.90 -> 0.70 (0.20); mean 0.25
    assert m["forgetting"] == pytest.approx(0.25)
    flat = continual.stream_metrics(np.full((3, 3), 0.4))
    assert flat == pytest.approx({"transfer": 0.4, "avg": 0.4, "last": 0.4, "forgetting": 0.0})


def test_wise_ft_endpoints_are_exact_and_the_midpoint_is_the_mean():
    a, b = _toy_model(0), _toy_model(1)
    for alpha, ref in ((0.0, a), (1.0, b)):
        mixed = continual.wise_ft(a, b, alpha)
        for k, v in mixed.state_dict().items():
            assert torch.equal(v, ref.state_dict()[k]), (alpha, k)
    half = continual.wise_ft(a, b, 0.5)
    k = "clip.image_proj.weight"
    assert torch.allclose(half.state_dict()[k], (a.state_dict()[k] + b.state_dict()[k]) / 2)
    assert half is not b and a.state_dict()[k].data_ptr() != half.state_dict()[k].data_ptr()


def test_coop_trains_only_the_context_vectors():
    model = _toy_model()
    task = _tiny_task()
    state = continual.State(initial=model, recipe=continual.StepRecipe(coop_steps=3, coop_lr=0.05))
    clip_before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    out = continual.coop(model, task, state=state)
    encoder = out.context.encoder
    encoder_before = {k: v.clone() for k, v in encoder.state_dict().items()}
    vectors_before = out.context.vectors.clone()
    out2 = continual.coop(out, task, state=state)
    # the learnable set is exactly the context vectors: the frozen MiniLM is not even registered
    names = [n for n, _ in out2.named_parameters()]
    assert [n for n in names if not n.startswith("clip.")] == ["context.vectors"]
    assert all(torch.equal(v, clip_before[k]) for k, v in out2.clip.state_dict().items())
    assert all(torch.equal(v, encoder_before[k]) for k, v in encoder.state_dict().items())
    assert not torch.equal(out2.context.vectors, vectors_before)
    assert out2.context.vectors.shape == (4, 384)  # "a photo of a" -> 4 tokens


def test_coop_context_starts_as_the_hand_written_prompt():
    model = _toy_model()
    context = continual.PromptContext(model.clip.text)
    with torch.no_grad():
        learned = context(["sandal", "bag"])
    hand = model.clip.text(["a photo of a sandal.", "a photo of a bag."])
    assert torch.allclose(learned, hand, atol=1e-5)


def test_replay_buffer_respects_its_size_and_shares_it_between_tasks():
    buffer = continual.ReplayBuffer(50, seed=0)
    for t in range(3):
        task = _tiny_task(n=40, seed=t)
        buffer.add(task.x_train, task.y_train, t)
        assert len(buffer) <= 50
    counts = torch.bincount(buffer.task_ids, minlength=3).tolist()
    assert sum(counts) <= 50 and max(counts) - min(counts) <= 2
    images, labels, task_ids = buffer.sample(8)
    assert images.shape == (8, 1, 28, 28) and labels.shape == task_ids.shape == (8,)


def test_stream_is_deterministic_under_a_seed():
    a = continual.make_stream(("inverted", "digits"), n_train=20, n_test=10, seed=3)
    b = continual.make_stream(("inverted", "digits"), n_train=20, n_test=10, seed=3)
    c = continual.make_stream(("inverted", "digits"), n_train=20, n_test=10, seed=4)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta.x_train, tb.x_train) and torch.equal(ta.y_test, tb.y_test)
    assert not torch.equal(a[0].x_train, c[0].x_train)
    assert [t.name for t in a] == ["inverted", "digits"] and a[1].class_names == continual.DIGIT_NAMES
    assert a[0].x_train.shape == (20, 1, 28, 28) and a[1].x_test.shape == (10, 1, 28, 28)


def test_shifts_and_digits_are_images_in_range():
    x = vision.normalise((torch.rand(3, 28, 28) * 255).byte())
    for kind in ("none", "inverted", "edges", "rotated"):
        pixels = vision.unnormalise(continual.shift(x, kind))
        assert pixels.shape == (3, 28, 28) and 0 <= float(pixels.min()) <= float(pixels.max()) <= 1
    assert torch.allclose(vision.unnormalise(continual.shift(x, "inverted")), 1 - vision.unnormalise(x), atol=1e-5)
    digits, labels = continual.digits_tensors()
    assert digits.shape == (1797, 1, 28, 28) and set(labels.tolist()) == set(range(10))
    assert float(vision.unnormalise(digits)[:, :4].max()) == 0.0  # MNIST-style empty border


def test_run_stream_fills_the_matrix_and_the_buffer():
    tasks = [_tiny_task("a", seed=0), _tiny_task("b", classes=("three", "seven"), seed=1)]
    zero = _tiny_task("zero-shot", n=20, classes=clip.CLASS_TEXT, seed=2)
    recipe = continual.StepRecipe(steps=2, batch_size=4, buffer_size=6, replay_batch=4)
    result, model = continual.run_stream("replay", clip.FashionClip(dim=8), tasks, zero, recipe=recipe)
    assert np.array(result["matrix"]).shape == (3, 2) and len(result["zero_shot"]) == 3
    assert np.array(result["questions"]).shape == (3, len(continual.QUESTIONS))
    assert result["stored_images"] == 6 and result["trained_params"] > 0
    probe, _ = continual.run_stream("linear probe", clip.FashionClip(dim=8), tasks, zero, recipe=recipe)
    assert probe["zero_shot"][0] == probe["zero_shot"][-1]  # frozen tower: the zero-shot set is untouched


def test_answers_are_probabilities_and_balanced_accuracy_is_chance_for_constant_answers():
    model, task = _toy_model(), _tiny_task(n=20, classes=clip.CLASS_TEXT)
    p = continual.answer_questions(model, task.x_test)
    assert p.shape == (10, len(continual.QUESTIONS)) and bool(((p >= 0) & (p <= 1)).all())
    truth = torch.tensor([True, False, False, True])
    assert continual.balanced_accuracy(torch.ones(4), truth) == 0.5


def test_bad_inputs_give_clear_errors():
    a = _toy_model()
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            continual.wise_ft(a, a, alpha)
    x = vision.normalise(torch.zeros(2, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty train set"):
        continual.Task("empty", ("a",), ("a {}.",), x[:0], torch.zeros(0, dtype=torch.long), x, torch.zeros(2).long())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        continual.Task("bad", ("a",), ("a {}.",), x, torch.tensor([0, 3]), x, torch.zeros(2).long())
    with pytest.raises(ValueError, match="contain"):
        continual.Task("bad", ("a",), ("no slot",), x, torch.zeros(2).long(), x, torch.zeros(2).long())
    with pytest.raises(ValueError, match="stream is empty"):
        continual.make_stream(())
    with pytest.raises(ValueError, match="unknown shift"):
        continual.shift(x, "sepia")
    with pytest.raises(ValueError, match="square"):
        continual.stream_metrics(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="positive int"):
        continual.ReplayBuffer(0)
    with pytest.raises(ValueError, match="unknown method"):
        continual.run_stream("magic", clip.FashionClip(dim=8), [_tiny_task()], _tiny_task())
    with pytest.raises(ValueError, match="stream is empty"):
        continual.run_stream("fine-tune", clip.FashionClip(dim=8), [], _tiny_task())
    with pytest.raises(ValueError, match="reference"):
        continual.zscl(a, _tiny_task(), state=continual.State(initial=a))
