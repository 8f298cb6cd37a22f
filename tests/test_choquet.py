"""helpers.choquet: capacities and Choquet integrals against brute force, the hierarchical student, bad input."""

import itertools
import math

import numpy as np
import pytest
import torch

from helpers import choquet


def _random_node(n=4, seed=0):
    torch.manual_seed(seed)
    node = choquet.ChoquetNode(n, 3)
    with torch.no_grad():
        node.logits.normal_(0, 1.5)
    return node


def test_capacity_axioms_of_a_2_additive_node():
    node = _random_node()
    for c in range(3):
        mu = node.capacity(c)
        assert mu[0] == pytest.approx(0) and mu[-1] == pytest.approx(1)
        choquet.check_capacity(mu)  # monotone: raises otherwise
        for s, i in itertools.product(range(16), range(4)):
            assert mu[s | (1 << i)] >= mu[s] - 1e-12


def test_check_capacity_rejects_non_capacities():
    with pytest.raises(ValueError, match="empty set"):
        choquet.check_capacity([0.1, 0.5, 0.5, 1])
    with pytest.raises(ValueError, match="mu\\(N\\) = 1"):
        choquet.check_capacity([0, 0.5, 0.5, 0.9])
    with pytest.raises(ValueError, match="not monotone"):
        choquet.check_capacity([0, 0.8, 0.5, 0.7, 0.2, 0.9, 0.6, 1])
    with pytest.raises(ValueError, match="2\\*\\*n"):
        choquet.check_capacity([0, 0.5, 1])


def test_closed_form_matches_the_sorting_definition_and_its_bounds():
    node = _random_node(n=5, seed=1)
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.random((50, 5)), dtype=torch.float32)
    fast = node(x[:, None, :].expand(-1, 3, -1)).detach()  # [50, 3]
    for c in range(3):
        mu = node.capacity(c)
        slow = [choquet.choquet_integral(row, mu) for row in x.numpy()]
        np.testing.assert_allclose(fast[:, c].numpy(), slow, atol=1e-5)
    assert (fast >= x.min(1).values[:, None] - 1e-6).all() and (fast <= x.max(1).values[:, None] + 1e-6).all()
    const = node(torch.full((1, 3, 5), 0.37)).detach()
    np.testing.assert_allclose(const.numpy(), 0.37, atol=1e-6)


def test_shapley_and_interactions_match_brute_force():
    node = _random_node(n=4, seed=2)
    phi, inter = node.shapley().detach(), node.interactions().detach()
    for c in range(3):
        mu = node.capacity(c)
        np.testing.assert_allclose(phi[c].numpy(), choquet.shapley_values(mu), atol=1e-6)
        np.testing.assert_allclose(inter[c].numpy(), choquet.interaction_indices(mu), atol=1e-6)
        assert phi[c].sum().item() == pytest.approx(1, abs=1e-6)
        m = choquet.mobius_from_capacity(mu)
        higher = [m[s] for s in range(16) if bin(s).count("1") > 2]
        np.testing.assert_allclose(higher, 0, atol=1e-9)  # 2-additive: no mass beyond pairs
        np.testing.assert_allclose(choquet.capacity_from_mobius(m), mu, atol=1e-12)


def test_known_capacities():
    # minimum, maximum and mean of two criteria
    assert choquet.choquet_integral([0.2, 0.7], [0, 0, 0, 1]) == pytest.approx(0.2)
    assert choquet.choquet_integral([0.2, 0.7], [0, 1, 1, 1]) == pytest.approx(0.7)
    assert choquet.choquet_integral([0.2, 0.7], [0, 0.5, 0.5, 1]) == pytest.approx(0.45)
    np.testing.assert_allclose(choquet.interaction_indices([0, 0, 0, 1]), [[0, 1], [1, 0]])   # complementary
    np.testing.assert_allclose(choquet.interaction_indices([0, 1, 1, 1]), [[0, -1], [-1, 0]])  # redundant
    # a symmetric capacity on 3 criteria: every Shapley value is 1/3
    mu = [0, 0.2, 0.2, 0.6, 0.2, 0.6, 0.6, 1]
    np.testing.assert_allclose(choquet.shapley_values(mu), [1 / 3] * 3)


def test_node_decomposition_sums_to_the_output():
    node = _random_node(n=6, seed=3)
    x = torch.rand(20, 3, 6)
    parts = choquet.node_contributions(x, node.weights().detach())
    np.testing.assert_allclose(parts.sum(-1).numpy(), node(x).detach().numpy(), atol=1e-5)


def _student(utility="signed"):
    torch.manual_seed(0)
    student = choquet.ChoquetStudent([[0, 1, 2], [3, 4], [5]], 4, utility=utility)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return student


def test_hierarchy_global_and_local_explanations():
    student = _student()
    z = torch.randn(30, 6)
    values = student.scores(z)
    assert values.shape == (30, 4) and (values >= 0).all() and (values <= 1).all()
    phi = student.choquet.shapley()
    np.testing.assert_allclose(phi.sum(1).numpy(), 1, atol=1e-6)
    assert (phi >= -1e-9).all()
    local = student.choquet.local_contributions(z)
    np.testing.assert_allclose(local.sum(-1).numpy(), values.numpy(), atol=1e-5)
    inter = student.choquet.interactions()
    assert inter.shape == (4, 6, 6) and torch.allclose(inter, inter.transpose(1, 2))
    assert (inter[:, 0, 3] == 0).all()  # different groups interact only at the root


def test_utilities_are_monotone_in_the_score():
    student = _student("increasing")
    z = torch.zeros(2, 6)
    z[1, 2] = 1.0  # raise one concept's score
    values = student.scores(z)
    assert (values[1] >= values[0] - 1e-7).all()


def test_distillation_recovers_a_choquet_teacher():
    teacher = _student()
    z = torch.randn(2000, 6)
    logits = teacher(z).detach()
    fresh = choquet.ChoquetStudent([[0, 1, 2], [3, 4], [5]], 4)
    before = choquet.agreement(fresh(z).detach(), logits)
    losses = choquet.distil(fresh, z, logits, epochs=40, batch_size=256, lr=0.05)
    assert losses[-1] < losses[0]
    assert choquet.agreement(fresh(z).detach(), logits) > max(0.9, before)


def test_concepts_for_mass():
    phi = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert choquet.concepts_for_mass(phi, 0.8).tolist() == [2, 4]


def test_bad_input_gives_clear_errors():
    student = _student()
    with pytest.raises(ValueError, match="one score per concept"):
        student(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="NaN"):
        student(torch.tensor([[math.nan] * 6]))
    with pytest.raises(ValueError, match="pass a batch"):
        student(torch.zeros(6))
    with pytest.raises(ValueError, match="non-empty"):
        choquet.ChoquetStudent([], 3)
    with pytest.raises(ValueError, match="exactly one group"):
        choquet.ChoquetStudent([[0, 1], [1, 2]], 3)
    with pytest.raises(ValueError, match="utility"):
        choquet.ChoquetStudent([[0]], 3, utility="concave")
    with pytest.raises(ValueError, match="temperature"):
        choquet.distil(student, torch.zeros(4, 6), torch.zeros(4, 4), temperature=0)
    weights = torch.tensor([0.5, 0.0, 0.5, 0.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        choquet.two_additive_choquet(torch.tensor([0.2, 1.5]), weights)
    with pytest.raises(ValueError, match="finite"):
        choquet.two_additive_choquet(torch.tensor([0.2, math.nan]), weights)
    with pytest.raises(ValueError, match="non-negative"):
        choquet.two_additive_choquet(torch.tensor([0.2, 0.6]), -weights)


# --- the tree's path product vs the Shapley value of the induced capacity (Labreuche & Fossier 2018) ---


def test_path_product_is_not_the_shapley_value_of_the_induced_capacity():
    # max(min(x0, x1), x2): a min node over leaves 0, 1 and a max root over (that node, leaf 2)
    root, nodes, groups = [0, 1, 1, 1], [[0, 0, 0, 1], [0, 1]], [[0, 1], [2]]
    mu = choquet.tree_capacity(root, nodes, groups)
    # mu(A) = 1 exactly when A contains leaf 2 or both leaves 0 and 1
    assert mu.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(choquet.path_product_shapley(root, nodes, groups), [1 / 4, 1 / 4, 1 / 2])
    np.testing.assert_allclose(choquet.shapley_values(mu), [1 / 6, 1 / 6, 2 / 3])
    x = np.array([0.3, 0.8, 0.5])
    assert choquet.choquet_integral(x, mu) == pytest.approx(max(min(0.3, 0.8), 0.5))


def test_path_product_equals_the_student_readout_and_its_alias():
    student = _student()
    np.testing.assert_array_equal(student.choquet.path_shapley().numpy(), student.choquet.shapley().numpy())
    c = 1
    root = choquet.two_additive_capacity(student.choquet.root.weights()[c], 3)
    nodes = [choquet.two_additive_capacity(node.weights()[c], len(g))
             for node, g in zip(student.choquet.nodes, student.choquet.groups, strict=True)]
    expected = choquet.path_product_shapley(root, nodes, student.choquet.groups)
    np.testing.assert_allclose(student.choquet.path_shapley()[c].numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="one node capacity per group"):
        choquet.tree_capacity(root, nodes[:2], student.choquet.groups)


# --- CB2's objective: distillation on logits + alignment with the teacher's latent space ---


def test_distillation_losses_known_answers():
    t = torch.tensor([[2.0, 0.0, 1.0], [0.0, 4.0, -1.0]])
    assert float(choquet.distillation_loss(t + torch.tensor([[3.0], [-7.0]]), t)) == pytest.approx(0, abs=1e-12)
    # centred rows (1, -1, 0) and (-1, 3, -2) against zeros: (1 + 1 + 0 + 1 + 9 + 4) / 6
    assert float(choquet.distillation_loss(torch.zeros(2, 3), t)) == pytest.approx(16 / 6)
    s = torch.tensor([[0.5, 0.1, 0.2], [1.0, 0.0, 0.3]])
    p, q = (t / 2).softmax(-1), (s / 2).softmax(-1)
    expected = 4 * float((p * (p.log() - q.log())).sum(-1).mean())
    assert float(choquet.distillation_loss(s, t, kind="kl", temperature=2.0)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="kind"):
        choquet.distillation_loss(s, t, kind="l1")


def test_weighted_distillation_counts_each_example_by_its_weight_and_adds_the_extra_loss():
    torch.manual_seed(0)
    x, t = torch.rand(64, 3), torch.randn(64, 2)
    keep = torch.arange(64) % 2 == 0

    def run(inputs, logits, **kw):
        s = torch.nn.Linear(3, 2)
        with torch.no_grad():
            s.weight.fill_(0.1)
            s.bias.zero_()
        return choquet.distil(s, inputs, logits, epochs=1, batch_size=64, lr=0.1, **kw), s

    (h_w, s_w), (h_k, s_k) = run(x, t, weights=2.0 * keep.float()), run(x[keep], t[keep])
    # one full batch: weights 2 on half the examples over 64 = the plain loss on that half over 32
    assert h_w[0] == pytest.approx(h_k[0], rel=1e-5)
    assert torch.allclose(s_w.weight, s_k.weight, atol=1e-6)
    h_e, _ = run(x, t, extra_loss=lambda student: torch.tensor(1.5))
    h_0, _ = run(x, t)
    assert h_e[0] == pytest.approx(h_0[0] + 1.5, rel=1e-6)
    with pytest.raises(ValueError, match="weights must be finite"):
        run(x, t, weights=-torch.ones(64))


def test_alignment_terms_known_answer():
    latent = torch.tensor([1.0, -0.5, 2.0, 0.0])
    aligner = choquet.Aligner(3, 4, hidden=5)
    with torch.no_grad():  # an entangler that ignores its input and outputs `latent`
        aligner.entangler[0].weight.zero_()
        aligner.entangler[0].bias.zero_()
        aligner.entangler[2].bias.copy_(latent + 3.0)  # a shift: same softmax
    nodes = torch.rand(6, 3)
    target = latent.expand(6, -1)
    np.testing.assert_allclose(choquet.latent_gap(aligner, nodes, target).numpy(), 0, atol=1e-6)
    align, ae = choquet.alignment_loss(aligner, nodes, target)
    p = latent.softmax(-1)
    assert align.item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)  # CE = entropy of the target
    assert ae.item() >= 0


def test_aligned_distillation_grounds_the_nodes_in_a_teacher_latent():
    teacher = _student()
    z = torch.randn(1500, 6)
    logits = teacher(z).detach()
    latent = 3 * teacher.node_outputs(z).detach()[:, :5]  # the teacher's latent: a function of its node outputs
    torch.manual_seed(0)
    student = choquet.ChoquetStudent([[0, 1, 2], [3, 4], [5]], 4)
    aligner = choquet.Aligner(12, 5)
    before = float(choquet.latent_gap(aligner, student.node_outputs(z).detach(), latent).mean())
    history = choquet.distil_cb2(student, z, logits, teacher_latent=latent, aligner=aligner, epochs=30,
                                 batch_size=256, lr=0.05)
    assert history["align"][-1] < history["align"][0] and history["pred"][-1] < history["pred"][0]
    after = float(choquet.latent_gap(aligner, student.node_outputs(z).detach(), latent).mean())
    assert after < before / 3
    assert choquet.agreement(student(z).detach(), logits) > 0.9


def test_cb2_objective_bad_input():
    student = _student()
    z, logits = torch.zeros(4, 6), torch.zeros(4, 4)
    with pytest.raises(ValueError, match="both teacher_latent and aligner"):
        choquet.distil_cb2(student, z, logits, teacher_latent=torch.zeros(4, 3))
    with pytest.raises(ValueError, match="node_outputs"):
        choquet.distil_cb2(torch.nn.Linear(6, 4), z, logits, teacher_latent=torch.zeros(4, 3),
                           aligner=choquet.Aligner(12, 3))
    with pytest.raises(ValueError, match="distillation"):
        choquet.distil_cb2(student, z, logits, distillation="l2")
    with pytest.raises(ValueError, match="one teacher latent vector per input"):
        choquet.distil_cb2(student, z, logits, teacher_latent=torch.zeros(3, 3), aligner=choquet.Aligner(12, 3))
    with pytest.raises(ValueError, match="family"):
        choquet.make_student("forest", [[0]], 2, 3)
    with pytest.raises(ValueError, match="n_nodes"):
        choquet.Aligner(0, 3)
    with pytest.raises(ValueError, match="nodes"):
        choquet.fit_aligner(choquet.Aligner(12, 3), torch.zeros(4, 12), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="one latent vector per example"):
        choquet.latent_gap(choquet.Aligner(12, 3), torch.zeros(4, 12), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="one shape"):
        choquet.distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_seed_study_protocol_on_a_tiny_problem():
    teacher = _student()
    splits = {}
    for name, n in (("fit", 300), ("val", 100), ("test", 120)):
        z = torch.randn(n, 6)
        splits[name] = (z, teacher(z).detach(), teacher.node_outputs(z).detach()[:, :5])
    out = choquet.seed_study([[0, 1, 2], [3, 4], [5]], splits, families=choquet.STUDENT_FAMILIES[:2] + ("linear, MSE",),
                             lrs=(0.01, 0.05), seeds=(0, 1), epochs=2, batch_size=128)
    cb2 = out["CB2: Choquet + alignment, MSE"]
    assert cb2["lr"] in (0.01, 0.05) and cb2["val_agreement"][0] == cb2["val_by_lr"][cb2["lr"]]
    assert cb2["pred"].shape == (2, 120) and cb2["phi"].shape == (2, 4, 6) and cb2["latent_gap"].shape == (2, 120)
    assert cb2["state"]["aligner"] is not None and out["Choquet, MSE"]["state"]["aligner"] is None
    assert "phi" not in out["linear, MSE"]


def test_committed_student_study_verifies():
    """Chapter 10's committed comparison of students (helpers/weights/results/ch10) matches its sidecar."""
    from helpers import common

    for path in (common.WEIGHTS_DIR / "results" / "ch10").glob("students-*.pt"):
        assert common.verified(path), f"{path} does not match its .sha256 sidecar"
        study = torch.load(path, weights_only=True)
        assert set(study) == set(choquet.STUDENT_FAMILIES)
        assert all(r["pred"].shape[0] == 3 for r in study.values())
