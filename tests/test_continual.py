"""helpers.continual: ZSCL metrics, WiSE-FT endpoints, CoOp's trainable set, the replay buffer, the stream,
the LwF and ZSCL losses, weight ensembling and the paper's WiSE-FT."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from helpers import clip, continual, data


def _tiny_task(name="toy", n=12, classes=("sandal", "bag"), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = data.normalise((torch.rand(n, 28, 28, generator=g) * 255).byte())
    y = torch.arange(n) % len(classes)
    return data.Task(name, tuple(classes), ("a photo of a {}.",), x, y, x[: n // 2], y[: n // 2])


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


def test_run_stream_fills_the_matrix_and_the_buffer():
    tasks = [_tiny_task("a", seed=0), _tiny_task("b", classes=("three", "seven"), seed=1)]
    zero = _tiny_task("zero-shot", n=20, classes=data.CLASS_TEXT, seed=2)
    recipe = continual.StepRecipe(steps=2, batch_size=4, buffer_size=6, replay_batch=4)
    result, model = continual.run_stream("replay", clip.FashionClip(dim=8), tasks, zero, recipe=recipe)
    assert np.array(result["matrix"]).shape == (3, 2) and len(result["zero_shot"]) == 3
    assert np.array(result["questions"]).shape == (3, len(continual.QUESTIONS))
    assert result["stored_images"] == 6 and result["trained_params"] > 0
    probe, _ = continual.run_stream("linear probe", clip.FashionClip(dim=8), tasks, zero, recipe=recipe)
    assert probe["zero_shot"][0] == probe["zero_shot"][-1]  # frozen tower: the zero-shot set is untouched


def test_answers_are_probabilities_and_balanced_accuracy_is_chance_for_constant_answers():
    model, task = _toy_model(), _tiny_task(n=20, classes=data.CLASS_TEXT)
    p = continual.answer_questions(model, task.x_test)
    assert p.shape == (10, len(continual.QUESTIONS)) and bool(((p >= 0) & (p <= 1)).all())
    truth = torch.tensor([True, False, False, True])
    assert continual.balanced_accuracy(torch.ones(4), truth) == 0.5


def test_bad_inputs_give_clear_errors():
    a = _toy_model()
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
            continual.wise_ft(a, a, alpha)
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
    with pytest.raises(ValueError, match="reference"):
        continual.zscl_paper(a, _tiny_task(), state=continual.State(initial=a))
    with pytest.raises(ValueError, match="unknown methods"):
        continual.seed_runs(clip.FashionClip(dim=8), 0, methods=("magic",))
    with pytest.raises(ValueError, match="every"):
        continual.learning_curves(clip.FashionClip(dim=8), 0, steps=5, every=10)
    with pytest.raises(ValueError, match="unknown methods"):
        continual.lit_runs(0, recipe=continual.StepRecipe(), methods=("magic",))
    with pytest.raises(ValueError, match="LitRecipe"):
        clip.pretrained_lit(clip.RECIPE)
    with pytest.raises(ValueError, match="unlabelled images"):
        continual.pseudo_label_start(0, n=0)
    with pytest.raises(ValueError, match="alphas"):
        continual.wise_ft_sweep(clip.FashionClip(dim=8), 0, alphas=(0.5, 1.5))


def _perturbed(model, seed=1, scale=0.05):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.clip.parameters():
            if p.is_floating_point():
                p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def test_kl_matches_a_hand_computed_value_and_scales_with_t_squared():
    student, teacher = torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]])
    # T = 1: teacher (3/4, 1/4), student (1/2, 1/2)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(continual._kl(student, teacher, 1.0)) == pytest.approx(expected, rel=1e-5)
    # T = 2: teacher softmax(log(3)/2, 0) = (sqrt3, 1) / (1 + sqrt3); the KL is multiplied by T^2 = 4
    q = math.sqrt(3) / (1 + math.sqrt(3))
    expected2 = 4 * (q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5))
    assert float(continual._kl(student, teacher, 2.0)) == pytest.approx(expected2, rel=1e-5)


def test_lwf_and_zscl_losses_are_zero_when_the_student_is_the_teacher():
    teacher, task = _toy_model(), _tiny_task(n=8)
    student = copy.deepcopy(teacher)
    old = [(data.CLASS_TEXT, ("a photo of a {}.",)), (task.class_names, task.templates)]
    assert float(continual.lwf_loss(student, teacher, task.x_train, old, temperature=2.0)) == pytest.approx(0, abs=1e-6)
    minilm = teacher.clip.text(["a photo of a bag.", "a photo of a shirt.", "a photo of a boot."])
    for student_text in (True, False):
        for t in (1.0, 2.0):
            i2t, t2i = continual.zscl_loss(student, teacher, task.x_train, minilm, temperature=t,
                                           student_text=student_text)
            assert float(i2t) == pytest.approx(0, abs=1e-6) and float(t2i) == pytest.approx(0, abs=1e-6)
    # a different student is penalised
    i2t, t2i = continual.zscl_loss(_perturbed(teacher), teacher, task.x_train, minilm)
    assert float(i2t) > 1e-4 and float(t2i) > 1e-4


def test_distillation_gradients_reach_the_student_only():
    teacher, task = _toy_model(), _tiny_task(n=8)
    teacher.requires_grad_(True)  # even a teacher that could take gradients must get none
    minilm = teacher.clip.text(["a photo of a bag.", "a photo of a shirt.", "a photo of a boot."])
    old = [(data.CLASS_TEXT, ("a photo of a {}.",))]
    cases = {"lwf": lambda s: continual.lwf_loss(s, teacher, task.x_train, old),
             "zscl": lambda s: sum(continual.zscl_loss(s, teacher, task.x_train, minilm)),
             "zscl teacher text": lambda s: sum(continual.zscl_loss(s, teacher, task.x_train, minilm,
                                                                    student_text=False))}
    for name, loss_of in cases.items():
        student = _perturbed(teacher).requires_grad_(True)
        teacher.zero_grad(set_to_none=True)
        loss_of(student).backward()
        assert all(p.grad is None for p in teacher.parameters()), name
        assert float(student.clip.image_proj.weight.grad.abs().sum()) > 0, name
        assert any(float(p.grad.abs().sum()) > 0 for p in student.clip.vit.parameters() if p.grad is not None), name
        text_grad = student.clip.text_proj.weight.grad
        if name == "zscl teacher text":  # ZSCL's reference code: the student's text side is not distilled
            assert text_grad is None or float(text_grad.abs().sum()) == 0
        else:
            assert float(text_grad.abs().sum()) > 0, name


def test_weight_ensembling_returns_the_mean_of_the_start_and_the_snapshots():
    model, task = _toy_model(), _tiny_task()
    state = continual.State(initial=model, recipe=continual.StepRecipe(steps=3, batch_size=4, lr=1e-2))
    key = "clip.image_proj.weight"
    snapshots = [model.state_dict()[key].clone()]
    out = continual._fine_tune(model, task, state, we_every=1,
                               callback=lambda n, m: snapshots.append(m.state_dict()[key].clone()))
    assert len(snapshots) == 4 and not torch.equal(snapshots[0], snapshots[-1])
    assert torch.allclose(out.state_dict()[key], torch.stack(snapshots).mean(0), atol=1e-6)
    # every 2 steps: steps 1 and 3 are averaged with the start
    out2 = continual._fine_tune(model, task, state, we_every=2,
                                callback=lambda n, m: snapshots.append(m.state_dict()[key].clone()))
    s = snapshots[4:]
    assert torch.allclose(out2.state_dict()[key], (snapshots[0] + s[0] + s[2]) / 3, atol=1e-6)


def test_l2_penalty_keeps_the_model_closer_to_where_the_task_started():
    model, task = _toy_model(), _tiny_task()
    state = continual.State(initial=model, recipe=continual.StepRecipe(steps=5, batch_size=4, lr=1e-2))

    def distance(out):
        pairs = zip(out.clip.parameters(), model.clip.parameters(), strict=True)
        return sum(float(((a - b) ** 2).sum()) for a, b in pairs)

    penalised = continual._fine_tune(model, task, state, l2=100.0)
    assert distance(penalised) < distance(continual._fine_tune(model, task, state))


def test_paper_wise_ft_blends_with_the_previous_model_at_alpha():
    model, task = _toy_model(), _tiny_task()
    state = continual.State(initial=_toy_model(seed=5), recipe=continual.StepRecipe(steps=2, batch_size=4))
    tuned = continual._fine_tune(model, task, state, label_smoothing=continual.PAPER_SETTINGS["label_smoothing"])
    out = continual.wise_ft_paper(model, task, state=state)
    a = continual.PAPER_SETTINGS["alpha"]
    k = "clip.image_proj.weight"
    expected = (1 - a) * model.state_dict()[k] + a * tuned.state_dict()[k]  # the previous model, not state.initial
    assert torch.allclose(out.state_dict()[k], expected, atol=1e-6)


# --- the LiT setting: held-out domain, off-domain reference set, the locked ImageNet tower ---


def test_off_domain_reference_set_is_photos_and_austen_text():
    state = continual.State(initial=_toy_model(), recipe=continual.StepRecipe(n_reference=16, n_reference_texts=10))
    continual.zscl_paper_off_domain.prepare(state)
    assert torch.equal(state.reference_images, data.photo_patches(16, seed=0))
    assert len(state.reference_texts) == 10 and len(set(state.reference_texts)) == 10
    assert all(len(t.split()) == 12 for t in state.reference_texts)
    assert not set(state.reference_texts) & set(data.caption_table())


def test_run_stream_reports_extra_sets_never_trained_on():
    tasks = [_tiny_task("a", seed=0)]
    zero, extra = _tiny_task("zero-shot", n=20, classes=data.CLASS_TEXT, seed=2), _tiny_task("held", seed=3)
    recipe = continual.StepRecipe(steps=2, batch_size=4)
    torch.manual_seed(0)
    result, _ = continual.run_stream("fine-tune", clip.FashionClip(dim=8), tasks, zero, recipe=recipe,
                                     extra_tasks=[extra])
    assert list(result["extra"]) == ["held"] and len(result["extra"]["held"]) == 2
    torch.manual_seed(0)
    plain, _ = continual.run_stream("fine-tune", clip.FashionClip(dim=8), tasks, zero, recipe=recipe)
    assert "extra" not in plain and plain["matrix"] == result["matrix"]


def test_imagenet_features_are_cached_by_content_and_match_a_direct_computation():
    tower = clip.ImageNetFeatures(resolution=64)
    x = _tiny_task(n=6).x_train
    first = tower(x)
    assert first.shape == (6, 1280) and len(tower._cache) == 6
    again = tower(torch.cat([x[3:], x[:3]]))  # same images, other order: cache hits, rows follow the images
    assert torch.equal(again, torch.cat([first[3:], first[:3]])) and len(tower._cache) == 6
    assert torch.allclose(tower._compute(x), first, atol=1e-5)


def test_lit_model_trains_only_its_projections_and_copies_share_the_tower():
    torch.manual_seed(0)
    lit = clip.LitClip(dim=8)
    assert continual.n_parameters(lit.image_tower) == 0
    assert {n for n, _ in lit.named_parameters()} == {"image_proj.weight", "text_proj.weight", "log_scale"}
    model = continual.ContinualClip(lit).eval().requires_grad_(False)
    twin = copy.deepcopy(model)
    task = _tiny_task(n=8)
    emb = model.encode_images(task.x_test)
    assert emb.shape == (4, 8) and torch.allclose(twin.encode_images(task.x_test), emb)
    tuned = continual.finetune(model, task, state=continual.State(initial=model,
                                                                  recipe=continual.StepRecipe(steps=2, batch_size=4)))
    assert not torch.equal(tuned.clip.image_proj.weight, model.clip.image_proj.weight)
    assert torch.equal(tuned.clip.log_scale, model.clip.log_scale)


def test_few_labels_keeps_the_first_images_labelled_and_returns_the_rest():
    task = _tiny_task(n=12)
    labelled, unlabelled = continual.few_labels(task, 5)
    assert torch.equal(labelled.x_train, task.x_train[:5]) and torch.equal(labelled.y_train, task.y_train[:5])
    assert torch.equal(unlabelled, task.x_train[5:]) and torch.equal(labelled.x_test, task.x_test)
    for n in (0, 12):
        with pytest.raises(ValueError, match="n_labelled"):
            continual.few_labels(task, n)


def test_pseudo_label_loss_is_cross_entropy_to_confident_predictions_only():
    model, task = _toy_model(), _tiny_task(n=12)
    images = task.x_train
    with torch.no_grad():
        p = model.logits(images, task).softmax(-1)
    everything, kept = continual.pseudo_label_loss(model, images, task, threshold=0.0)
    assert kept == 1.0
    assert torch.allclose(everything, torch.nn.functional.cross_entropy(model.logits(images, task), p.argmax(-1)))
    nothing, kept = continual.pseudo_label_loss(model, images, task, threshold=1.01)
    assert kept == 0.0 and float(nothing) == 0.0
    middle = float(p.max(-1).values.median())
    some, kept = continual.pseudo_label_loss(model, images, task, threshold=middle)
    keep = p.max(-1).values >= middle
    expected = torch.nn.functional.cross_entropy(model.logits(images, task)[keep], p.argmax(-1)[keep],
                                                 reduction="sum") / len(images)
    assert kept == float(keep.float().mean()) and torch.allclose(some, expected)


def test_few_label_methods_train_on_the_labelled_images_only(monkeypatch):
    monkeypatch.setattr(continual, "FEW_LABELS", 4)
    model, task = _toy_model(), _tiny_task(n=12)
    state = continual.State(initial=model, recipe=continual.StepRecipe(steps=3, batch_size=4))
    labelled, _ = continual.few_labels(task)
    assert len(labelled.x_train) == 4
    few = continual.finetune_few(model, task, state=state)
    by_hand = continual.finetune(model, labelled, state=state)
    assert torch.equal(few.clip.image_proj.weight, by_hand.clip.image_proj.weight)
    monkeypatch.setattr(continual, "PSEUDO_THRESHOLD", 0.0)  # every unlabelled image counts
    self_trained = continual.self_training_few(model, task, state=state)
    assert not torch.equal(self_trained.clip.image_proj.weight, few.clip.image_proj.weight)


def test_class_specific_context_learns_one_context_per_class_name():
    model, task = _toy_model(), _tiny_task()
    state = continual.State(initial=model, recipe=continual.StepRecipe(coop_steps=3, coop_lr=0.05))
    out = continual.coop_class_specific(model, task, state=state)
    keys = sorted(out.context.class_vectors.keys())
    assert keys == ["bag", "sandal"]  # the shared vectors stay the hand-written start
    assert torch.equal(out.context.vectors, continual.PromptContext(model.clip.text).vectors)
    a, b = (out.context.class_vectors[k] for k in keys)
    assert not torch.equal(a, b)  # each class moved on its own
    with torch.no_grad():  # a class never trained keeps the hand-written prompt
        assert torch.allclose(out.context(["coat"]), model.clip.text(["a photo of a coat."]), atol=1e-5)
    twin = copy.deepcopy(out)
    assert torch.equal(twin.context.class_vectors["bag"], out.context.class_vectors["bag"])
    with pytest.raises(ValueError, match="class-specific"):
        continual.PromptContext(model.clip.text).add_classes(["bag"])


def test_per_task_context_is_used_for_its_task_only():
    model = _toy_model()
    first, second = _tiny_task("a", seed=0), _tiny_task("b", classes=("three", "seven"), seed=1)
    state = continual.State(initial=model, recipe=continual.StepRecipe(coop_steps=3, coop_lr=0.05))
    out = continual.coop_per_task(continual.coop_per_task(model, first, state=state), second, state=state)
    assert sorted(out.task_contexts) == ["a", "b"] and out.context is None
    other = _tiny_task("c")
    assert torch.allclose(out.class_embeddings(other), model.class_embeddings(other))  # unseen task: prompts
    assert not torch.allclose(out.class_embeddings(first), model.class_embeddings(first))


def test_lit_tuned_picks_the_best_validation_avg_and_the_default_on_ties():
    recipe = continual.StepRecipe(lr=0.003, steps=275)
    tuning = {m: {str(v): {"avg": 0.5, "last": 0.5, "transfer": 0.5} for v in values}
              for m, (_, values) in continual.LIT_TUNING.items()}
    tuning["LwF"]["3.0"]["avg"] = 0.6                                      # one clear winner
    tuned = continual.lit_tuned(tuning, recipe)
    assert tuned["LwF"].distil_weight == 3.0 and tuned["LwF"].lr == 0.003 and tuned["LwF"].steps == 275
    assert tuned["ZSCL (paper)"].distil_weight == continual.StepRecipe().distil_weight      # a tie: the default
    assert tuned["replay"].replay_batch == continual.StepRecipe().replay_batch


def test_the_committed_tuning_study_loads_without_training(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the committed tuning study should load, not run the stream")

    monkeypatch.setattr(continual, "run_stream", no_training)
    lr, steps, _ = continual.lit_choice(continual.lit_curves(0))
    recipe = dataclasses.replace(continual.StepRecipe(), lr=lr, steps=steps)
    tuning = continual.lit_tuning(0, recipe=recipe)
    assert {m: sorted(map(float, v)) for m, v in tuning.items()} == {
        m: sorted(map(float, values)) for m, (_, values) in continual.LIT_TUNING.items()}
    assert all(0 <= r[k] <= 1 for v in tuning.values() for r in v.values() for k in ("avg", "last", "transfer"))
