"""Chapter 12's compositional VQA: scene truth on hand-made scenes, the answer vocabulary and balance, items kept
out of the stream, the answer head's inputs and errors, and the committed studies loading without training."""

import dataclasses

import numpy as np
import pytest
import torch

from helpers import clip, continual, data

SANDAL, BAG, TSHIRT, SNEAKER, BOOT, COAT = 5, 8, 0, 7, 9, 4


def _tiny_task(name="toy", n=12, classes=("sandal", "bag"), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = data.normalise((torch.rand(n, 28, 28, generator=g) * 255).byte())
    y = torch.arange(n) % len(classes)
    return data.Task(name, tuple(classes), ("a photo of a {}.",), x, y, x[: n // 2], y[: n // 2])


def test_scene_truth_on_hand_made_scenes():
    # slot 0 top left, 1 top right, 2 bottom left, 3 bottom right
    classes, dark = [SANDAL, BAG, SNEAKER, -1], [True, False, False, False]
    answer = lambda q: data.vqa_answer(q, classes, dark)  # noqa: E731
    assert answer(("presence", BAG)) == "yes" and answer(("presence", COAT)) == "no"
    assert answer(("count", "items")) == "3" and answer(("count", "pieces of footwear")) == "2"
    assert answer(("count", "tops")) == "0" and answer(("count", SANDAL)) == "1"
    assert answer(("attribute", SANDAL)) == "yes" and answer(("attribute", BAG)) == "no"
    assert answer(("spatial", SANDAL, "left of", BAG)) == "yes" and answer(("spatial", BAG, "left of", SANDAL)) == "no"
    assert answer(("spatial", SANDAL, "above", SNEAKER)) == "yes"
    assert answer(("spatial", SNEAKER, "above", SANDAL)) == "no"
    assert answer(("spatial", SANDAL, "left of", SNEAKER)) == "no"       # same column: not left of
    assert answer(("spatial", SANDAL, "above", BAG)) == "no"             # same row: not above
    full = [BOOT, BOOT, BOOT, BOOT]
    assert data.vqa_answer(("count", BOOT), full, [False] * 4) == "4"
    assert data.vqa_answer(("count", "items"), [-1] * 4, [False] * 4) == "0"


def test_questions_that_name_nothing_or_several_items_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        data.vqa_answer(("attribute", COAT), [SANDAL, -1, -1, -1], [False] * 4)
    with pytest.raises(ValueError, match="exactly one"):
        data.vqa_answer(("spatial", BOOT, "above", SANDAL), [BOOT, BOOT, SANDAL, -1], [False] * 4)
    with pytest.raises(ValueError, match="4 slots"):
        data.vqa_answer(("presence", BAG), [BAG], [False])
    with pytest.raises(ValueError, match="unknown question type"):
        data.vqa_text(("colour", BAG))


def test_question_texts_follow_the_templates():
    assert data.vqa_text(("presence", BOOT)) == "Is there an ankle boot?"
    assert data.vqa_text(("count", "pieces of footwear")) == "How many pieces of footwear are there?"
    assert data.vqa_text(("attribute", TSHIRT)) == "Is the t-shirt dark?"
    assert data.vqa_text(("spatial", BAG, "above", COAT)) == "Is the bag above the coat?"


@pytest.fixture(scope="module")
def splits():
    return continual.vqa_scenes()


def test_items_stay_out_of_the_retention_set_and_every_lit_stream(splits):
    used = torch.cat([data.stream_test_indices(order, n_test=400, seed=s)
                      for s in continual.LIT_SEEDS for order in continual.LIT_ORDERS])
    indices = [s.items.index for s in splits.values()]
    for idx in indices:
        assert int(idx.min()) >= data.ZERO_SHOT_SIZE and not torch.isin(idx, used).any()
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.isin(indices[a], indices[b]).any()        # train / validation / test items disjoint
    # the indices are those make_stream really uses (its inverted task's test images, by content)
    x, _ = data.fashion_tensors("test")
    task = data.make_stream(("inverted",), n_test=400, seed=1)[0]
    mine = data.shift_domain(x[data.stream_test_indices(("inverted",), n_test=400, seed=1)], "inverted")
    assert {t.numpy().tobytes() for t in task.x_test} == {t.numpy().tobytes() for t in mine}


def test_answers_are_in_the_vocabulary_balanced_and_true(splits):
    test = splits["test"]
    classes, dark = test.slot_classes(), test.slot_dark()
    for k, kind in enumerate(data.VQA_TYPES):
        answers = [data.VQA_ANSWERS[a] for a in test.answer[test.kind == k].tolist()]
        assert set(answers) == set(data.VQA_TYPE_ANSWERS[kind])
        counts = [answers.count(a) for a in data.VQA_TYPE_ANSWERS[kind]]
        assert max(counts) == min(counts)                                 # balanced within the type
    assert bool((test.items.dark == (data.pixel_attributes(test.items.images, test.items.labels)["tone"] == 0)).all())
    assert bool(test.items.dark[test.items.darkened].all())              # darkened items are dark by the pixel rule
    # the words agree with the truth: re-derive a sample of answers from the slots
    rng = np.random.default_rng(0)
    presence = {data.vqa_text(("presence", c)): c for c in range(len(data.CLASS_TEXT))}
    for q in rng.choice(len(test.answer), 200, replace=False).tolist():
        i = int(test.scene[q])
        text = test.text[q]
        if text.startswith("How many items"):
            assert data.VQA_ANSWERS[test.answer[q]] == str(int((classes[i] >= 0).sum()))
        if text.startswith("Is there"):
            present = presence[text] in classes[i].tolist()
            assert data.VQA_ANSWERS[test.answer[q]] == ("yes" if present else "no")
        if text.endswith("dark?"):
            c = data.CLASS_TEXT.index(text[len("Is the "):-len(" dark?")])
            assert data.VQA_ANSWERS[test.answer[q]] == ("yes" if bool(dark[i][classes[i] == c][0]) else "no")


def test_tables_prior_and_accuracy_on_a_tiny_case(splits):
    test = splits["test"]
    table = continual.symbolic_table(test.items)
    assert table.shape == (len(test.items.labels) + 1, 12) and float(table[-1, -1]) == 1.0
    assert torch.equal(table[:-1, :10].argmax(1), test.items.labels)
    prior = continual.answer_prior(test)
    assert set(prior) == set(test.text) and all(0 <= a < len(data.VQA_ANSWERS) for a in prior.values())
    tiny = dataclasses.replace(test, scene=torch.tensor([0, 0]), kind=torch.tensor([0, 1]),
                               text=("Is there a bag?", "How many items are there?"), answer=torch.tensor([1, 2]))
    assert continual.prior_correct({"Is there a bag?": 1}, tiny).tolist() == [True, False]
    acc = continual.vqa_accuracy(torch.tensor([True, False]), tiny)
    assert acc == {"presence": 1.0, "count": 0.0, "mean": 0.5}
    everything = continual.vqa_mean_ci(torch.ones(len(test.answer)), test)
    assert (everything.value, everything.lo, everything.hi) == (1.0, 1.0, 1.0)
    kinds = test.kind.numpy()
    half = continual.vqa_mean_ci(kinds % 2 == 0, test)      # presence and attribute right, count and spatial wrong
    assert half.value == pytest.approx(0.5) and half.lo <= 0.5 <= half.hi
    head = continual.AnswerHead(12, width=16)
    logits = head(*continual._inputs(table, tiny, torch.arange(2)))
    assert logits.shape == (2, len(data.VQA_ANSWERS))


def test_bad_inputs_give_clear_errors(splits):
    test = splits["test"]
    head = continual.AnswerHead(12, width=16)
    with pytest.raises(ValueError, match="one row per item"):
        continual.vqa_correct(head, torch.zeros(3, 12), test)
    with pytest.raises(ValueError, match="no questions"):
        continual.vqa_correct(head, continual.symbolic_table(test.items),
                              dataclasses.replace(test, scene=test.scene[:0], kind=test.kind[:0], text=(),
                                                  answer=test.answer[:0]))
    with pytest.raises(ValueError, match="one per question"):
        continual.vqa_accuracy(torch.ones(3, dtype=torch.bool), test)
    with pytest.raises(ValueError, match="n_scenes"):
        data.make_scenes(test.items, 0)
    with pytest.raises(ValueError, match="exclude_seeds"):
        data.vqa_items(exclude_seeds=())
    with pytest.raises(ValueError, match="questions"):
        continual.question_tokens([])
    with pytest.raises(ValueError, match="unknown methods"):
        continual.lit_vqa_runs(0, recipe=continual.StepRecipe(), methods=("magic",))


def test_run_stream_reads_the_model_after_every_step_without_changing_the_run():
    tasks = [_tiny_task("a", seed=0), _tiny_task("b", seed=1)]
    zero = _tiny_task("zero-shot", n=20, classes=data.CLASS_TEXT, seed=2)
    recipe = continual.StepRecipe(steps=2, batch_size=4)
    torch.manual_seed(0)
    initial = clip.FashionClip(dim=8)
    read, _ = continual.run_stream("fine-tune", initial, tasks, zero, recipe=recipe,
                                   after_step=lambda m: float(m.clip.image_proj.weight.detach().sum()))
    plain, _ = continual.run_stream("fine-tune", initial, tasks, zero, recipe=recipe)
    assert len(read["after_step"]) == 3 and read["matrix"] == plain["matrix"] and "after_step" not in plain
    assert read["after_step"][0] == pytest.approx(float(initial.image_proj.weight.detach().sum()))


def test_the_committed_vqa_studies_load_without_training(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the committed VQA studies should load, not train")

    monkeypatch.setattr(continual, "run_stream", no_training)
    monkeypatch.setattr(continual, "train_answer_head", no_training)
    image, symbolic, report = continual.vqa_heads()
    n_test = len(continual.vqa_scenes()["test"].answer)
    assert all(len(report[k]["test"]) == n_test for k in ("image", "symbolic", "prior"))
    # the head on the symbolic truth is (near) perfect where it only has to look things up
    test = continual.vqa_scenes()["test"]
    sym = continual.vqa_accuracy(torch.tensor(report["symbolic"]["test"]).bool(), test)
    assert min(sym["presence"], sym["count"], sym["attribute"]) > 0.95
    lr, steps, _ = continual.lit_choice(continual.lit_curves(0))
    recipe = dataclasses.replace(continual.StepRecipe(), lr=lr, steps=steps)
    for seed in continual.LIT_SEEDS:
        for order in continual.LIT_ORDERS:
            runs = continual.lit_vqa_runs(seed, order, recipe=recipe)
            assert list(runs) == list(continual.VQA_METHODS)
            assert all(len(r["vqa"]) == len(order) + 1 for r in runs.values())
