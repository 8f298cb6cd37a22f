"""Capacities, the Choquet integral, and a hierarchical 2-additive Choquet student (chapter 10).

A *capacity* on criteria ``N = {0, ..., n-1}`` is a set function ``mu`` with ``mu(∅) = 0``,
``mu(N) = 1`` and ``S ⊆ T ⇒ mu(S) <= mu(T)``. Small capacities are stored as arrays of ``2**n``
values indexed by bitmask (bit ``i`` set ⇔ criterion ``i`` in the set). The Choquet integral of
``x ∈ [0, 1]^n`` is ``C_mu(x) = Σ_k (x_(k) - x_(k-1)) mu({(k), ..., (n)})`` with ``x`` sorted
increasingly (Grabisch 1997; Grabisch & Labreuche 2010).

A *2-additive* capacity has Möbius masses on singletons and pairs only. Its Choquet integral is
exactly a convex combination of the inputs, their pairwise minima and pairwise maxima::

    C(x) = Σ_i w_i x_i + Σ_{i<j} (w⁻_ij min(x_i, x_j) + w⁺_ij max(x_i, x_j)),  all w >= 0, Σ w = 1,

which is monotone and normalised by construction; we parametrise the weights with a softmax
(NeurHCI-style, Bresson et al. 2020). Then

* Möbius: ``m({i}) = w_i + Σ_j w⁺_ij`` and ``m({i, j}) = w⁻_ij - w⁺_ij``;
* Shapley value: ``φ_i = w_i + ½ Σ_j (w⁻_ij + w⁺_ij)`` (they sum to 1);
* interaction index: ``I_ij = m({i, j})`` (> 0 complementary, < 0 redundant);
* ``C(x) = Σ_i φ_i x_i - ½ Σ_{i<j} I_ij |x_i - x_j|``, the per-image decomposition.

:class:`HierarchicalChoquet` stacks such nodes (concepts → groups → class score), one tree per
class; :class:`ChoquetStudent` adds learned monotone marginal utilities and is distilled from a
black box's outputs as in CB2 (Atienza et al., IJCAI 2024). Introduced in nbs/10_clip_concepts.ipynb;
reused by chapters 11 and 12.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helpers import common

# ---------------------------------------------------------------------------------------------
# General capacities on a few criteria (brute force over all 2**n subsets)
# ---------------------------------------------------------------------------------------------


def _n_criteria(mu: np.ndarray) -> int:
    n = int(round(math.log2(len(mu)))) if len(mu) > 0 else -1
    if n < 1 or 2**n != len(mu):
        raise ValueError(f"a capacity on n criteria has 2**n values (bitmask index), got {len(mu)}")
    return n


def check_capacity(mu, *, atol: float = 1e-9) -> np.ndarray:
    """Return ``mu`` as a float array after checking ``mu(∅) = 0``, ``mu(N) = 1`` and monotonicity.

    >>> check_capacity([0, 0.3, 0.5, 1]).tolist()
    [0.0, 0.3, 0.5, 1.0]
    """
    mu = np.asarray(mu, dtype=float)
    n = _n_criteria(mu)
    if abs(mu[0]) > atol:
        raise ValueError(f"a capacity needs mu(empty set) = 0, got {mu[0]}")
    if abs(mu[-1] - 1) > atol:
        raise ValueError(f"a normalised capacity needs mu(N) = 1, got {mu[-1]}")
    for s in range(len(mu)):
        for i in range(n):
            if not s & (1 << i) and mu[s | (1 << i)] < mu[s] - atol:
                raise ValueError(f"capacity is not monotone: adding criterion {i} to set {s:0{n}b} lowers mu")
    return mu


def mobius_from_capacity(mu) -> np.ndarray:
    """Möbius transform ``m(S) = Σ_{T ⊆ S} (-1)^{|S \\ T|} mu(T)``, same bitmask layout."""
    m = np.asarray(mu, dtype=float).copy()
    n = _n_criteria(m)
    for i in range(n):  # fast zeta inversion, one criterion at a time
        for s in range(len(m)):
            if s & (1 << i):
                m[s] -= m[s ^ (1 << i)]
    return m


def capacity_from_mobius(m) -> np.ndarray:
    """Inverse of :func:`mobius_from_capacity`: ``mu(S) = Σ_{T ⊆ S} m(T)``."""
    mu = np.asarray(m, dtype=float).copy()
    n = _n_criteria(mu)
    for i in range(n):
        for s in range(len(mu)):
            if s & (1 << i):
                mu[s] += mu[s ^ (1 << i)]
    return mu


def choquet_integral(x, mu) -> float:
    """Choquet integral of ``x`` (``[n]``) with respect to the capacity ``mu`` (``[2**n]``), by sorting.

    >>> choquet_integral([0.2, 0.8], [0, 0, 0, 1])   # mu = 1 only on N: the minimum
    0.2
    """
    mu = np.asarray(mu, dtype=float)
    x = np.asarray(x, dtype=float)
    n = _n_criteria(mu)
    if x.shape != (n,):
        raise ValueError(f"x must have one value per criterion ({n}), got shape {x.shape}")
    order = np.argsort(x, kind="stable")
    total, previous, remaining = 0.0, 0.0, (1 << n) - 1
    for i in order:
        total += (x[i] - previous) * mu[remaining]
        previous = x[i]
        remaining &= ~(1 << int(i))
    return float(total)


def shapley_values(mu) -> np.ndarray:
    """Shapley value of each criterion, ``Σ_{S ∌ i} |S|!(n-|S|-1)!/n! (mu(S ∪ i) - mu(S))``, by brute force.

    >>> shapley_values([0, 0, 0, 1]).tolist()
    [0.5, 0.5]
    """
    mu = np.asarray(mu, dtype=float)
    n = _n_criteria(mu)
    phi = np.zeros(n)
    for i in range(n):
        for s in range(len(mu)):
            if not s & (1 << i):
                k = bin(s).count("1")
                phi[i] += math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) * (mu[s | (1 << i)] - mu[s])
    return phi


def interaction_indices(mu) -> np.ndarray:
    """Shapley interaction index of every pair, ``[n, n]`` (zero diagonal), by brute force.

    ``I_ij = Σ_{S ⊆ N \\ {i,j}} |S|!(n-|S|-2)!/(n-1)! (mu(S∪ij) - mu(S∪i) - mu(S∪j) + mu(S))``.
    """
    mu = np.asarray(mu, dtype=float)
    n = _n_criteria(mu)
    out = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        bi, bj = 1 << i, 1 << j
        for s in range(len(mu)):
            if not s & (bi | bj):
                k = bin(s).count("1")
                w = math.factorial(k) * math.factorial(n - k - 2) / math.factorial(n - 1)
                out[i, j] += w * (mu[s | bi | bj] - mu[s | bi] - mu[s | bj] + mu[s])
        out[j, i] = out[i, j]
    return out


# ---------------------------------------------------------------------------------------------
# 2-additive Choquet integrals in closed form (batched over classes)
# ---------------------------------------------------------------------------------------------


def pairs(n: int) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)`` of the ``n(n-1)/2`` pairs ``i < j``, in row-major order.

    >>> [t.tolist() for t in pairs(3)]
    [[0, 0, 1], [1, 2, 2]]
    """
    i, j = torch.triu_indices(n, n, offset=1)
    return i, j


def split_weights(weights: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[..., n + 2P]`` → ``(w [..., n], w_min [..., P], w_max [..., P])`` with ``P = n(n-1)/2``."""
    p = n * (n - 1) // 2
    if weights.shape[-1] != n + 2 * p:
        raise ValueError(f"a 2-additive node on {n} inputs has {n + 2 * p} weights, got {weights.shape[-1]}")
    return weights[..., :n], weights[..., n : n + p], weights[..., n + p :]


def two_additive_choquet(x: Tensor, weights: Tensor) -> Tensor:
    """``Σ w_i x_i + Σ_{i<j} (w⁻_ij min + w⁺_ij max)``: ``x [..., n]``, ``weights [..., n + 2P]`` → ``[...]``.

    ``x`` are utilities in [0, 1] and ``weights`` non-negative masses summing to 1 (a capacity's
    2-additive parametrisation), so the output lies in [0, 1] too.

    >>> round(two_additive_choquet(torch.tensor([0.2, 0.6]), torch.tensor([0.5, 0.0, 0.5, 0.0])).item(), 6)
    0.2
    """
    x, weights = torch.as_tensor(x), torch.as_tensor(weights)
    if not (torch.isfinite(x).all() and torch.isfinite(weights).all()):
        raise ValueError("x and weights must be finite (no NaN or inf)")
    if x.numel() and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise ValueError(f"x must hold utilities in [0, 1], got values in [{x.min():.3g}, {x.max():.3g}]; "
                         "map scores to [0, 1] first (e.g. a sigmoid utility)")
    if weights.numel() and weights.min() < -1e-6:
        raise ValueError("weights must be non-negative masses (e.g. a softmax of free logits)")
    return _choquet(x, weights)


def _choquet(x: Tensor, weights: Tensor) -> Tensor:
    n = x.shape[-1]
    w, w_min, w_max = split_weights(weights, n)
    i, j = pairs(n)
    xi, xj = x[..., i], x[..., j]  # [..., P]
    return (w * x).sum(-1) + (w_min * torch.minimum(xi, xj)).sum(-1) + (w_max * torch.maximum(xi, xj)).sum(-1)


def two_additive_mobius(weights: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Möbius masses ``(m({i}) [..., n], m({i,j}) [..., n, n] symmetric, zero diagonal)``."""
    w, w_min, w_max = split_weights(weights, n)
    i, j = pairs(n)
    single = w.clone()
    single.index_add_(-1, i, w_max)
    single.index_add_(-1, j, w_max)
    pair = weights.new_zeros(*weights.shape[:-1], n, n)
    pair[..., i, j] = w_min - w_max
    pair[..., j, i] = w_min - w_max
    return single, pair


def two_additive_shapley(weights: Tensor, n: int) -> Tensor:
    """Shapley values ``φ_i = m({i}) + ½ Σ_j m({i,j})`` of a 2-additive node, ``[..., n]`` (sum to 1)."""
    single, pair = two_additive_mobius(weights, n)
    return single + pair.sum(-1) / 2


def two_additive_capacity(weights: Tensor, n: int) -> np.ndarray:
    """The full capacity ``[2**n]`` (bitmask index) of one 2-additive node with 1-D ``weights`` (small ``n``)."""
    if weights.ndim != 1:
        raise ValueError("pass the weights of one node (1-D); index the class first")
    weights = weights.detach().double()
    weights = weights / weights.sum()  # exact normalisation in float64
    single, pair = (t.numpy() for t in two_additive_mobius(weights, n))
    m = np.zeros(2**n)
    for i in range(n):
        m[1 << i] = single[i]
    for i, j in itertools.combinations(range(n), 2):
        m[(1 << i) | (1 << j)] = pair[i, j]
    return capacity_from_mobius(m)


def node_contributions(x: Tensor, weights: Tensor) -> Tensor:
    """Per-input share of a 2-additive node's output, ``[..., n]``, summing exactly to the output.

    ``c_i = φ_i x_i - ¼ Σ_{j≠i} I_ij |x_i - x_j|``: the Shapley weight times the input, minus half of
    each interaction term the input takes part in (the decomposition above, split between the pair).
    """
    n = x.shape[-1]
    phi = two_additive_shapley(weights, n)  # [..., n]
    _, inter = two_additive_mobius(weights, n)  # [..., n, n]
    gap = (x[..., :, None] - x[..., None, :]).abs()  # [..., n, n]
    return phi * x - (inter * gap).sum(-1) / 4


# ---------------------------------------------------------------------------------------------
# Learnable nodes and the hierarchical student
# ---------------------------------------------------------------------------------------------


class ChoquetNode(nn.Module):
    """One 2-additive Choquet integral per output (class), weights = softmax of free logits.

    ``forward(x [batch, out, n]) -> [batch, out]``. At initialisation half of the mass is on the
    singletons (a weighted mean) and half on the min/max terms.
    """

    def __init__(self, n_inputs: int, n_outputs: int):
        super().__init__()
        if n_inputs < 1 or n_outputs < 1:
            raise ValueError(f"need n_inputs >= 1 and n_outputs >= 1, got {n_inputs}, {n_outputs}")
        self.n = n_inputs
        p = n_inputs * (n_inputs - 1) // 2
        init = torch.zeros(n_outputs, n_inputs + 2 * p)
        if p:
            init[:, n_inputs:] = math.log(n_inputs / (2 * p))  # singletons and pair terms get equal mass
        self.logits = nn.Parameter(init)

    def weights(self) -> Tensor:
        """``[out, n + 2P]`` non-negative weights summing to 1 per output."""
        return self.logits.softmax(-1)

    def forward(self, x: Tensor) -> Tensor:
        return _choquet(x, self.weights())

    def shapley(self) -> Tensor:
        """``[out, n]`` Shapley values."""
        return two_additive_shapley(self.weights(), self.n)

    def interactions(self) -> Tensor:
        """``[out, n, n]`` interaction indices (= pair Möbius masses for a 2-additive capacity)."""
        return two_additive_mobius(self.weights(), self.n)[1]

    def capacity(self, output: int = 0) -> np.ndarray:
        """The full capacity ``[2**n]`` of one output's node (small ``n`` only)."""
        return two_additive_capacity(self.weights()[output], self.n)


def check_scores(scores: Tensor, n_concepts: int, *, name: str = "concept scores") -> Tensor:
    """Validate ``[batch, n_concepts]`` finite concept scores and return them as float32."""
    if not isinstance(scores, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [batch, {n_concepts}], got {type(scores).__name__}")
    if scores.ndim == 1:
        raise ValueError(f"{name} has shape {tuple(scores.shape)}: pass a batch, e.g. scores[None]")
    if scores.ndim != 2 or scores.shape[1] != n_concepts:
        raise ValueError(f"{name} must be [batch, {n_concepts}] (one score per concept of the bank), got shape "
                         f"{tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} contain NaN or infinite values; check the concept prompts and the standardiser")
    return scores.float()


UTILITIES = ("signed", "increasing", "sigmoid")


class HierarchicalChoquet(nn.Module):
    """Per class: marginal utilities → one 2-additive Choquet node per concept group → a root node over groups.

    Args:
        groups: concept indices of each group (every concept in exactly one group).
        n_classes: one tree of nodes (own weights) per class.
        utility: how standardised scores ``z`` become values in [0, 1]:
            ``"signed"`` (default) ``u = sigmoid(a (z - t))`` with a learned slope of either sign per
            (class, concept), monotone in ``z`` — a decreasing utility makes the *absence* of a
            concept count as evidence; ``"increasing"`` forces ``a > 0``; ``"sigmoid"`` is the fixed
            ``sigmoid(z)``.

    ``forward(z [batch, K]) -> [batch, classes]`` in [0, 1]; monotone in every utility.
    """

    def __init__(self, groups: Sequence[Sequence[int]], n_classes: int, *, utility: str = "signed"):
        super().__init__()
        if len(groups) == 0 or any(len(g) == 0 for g in groups):
            raise ValueError("groups must be a non-empty list of non-empty lists of concept indices")
        flat = sorted(int(i) for g in groups for i in g)
        if flat != list(range(len(flat))):
            raise ValueError("every concept index 0..K-1 must appear in exactly one group")
        if utility not in UTILITIES:
            raise ValueError(f"utility must be one of {UTILITIES}, got {utility!r}")
        self.groups = [list(map(int, g)) for g in groups]
        self.n_concepts, self.n_classes, self.utility = len(flat), n_classes, utility
        self.slope = nn.Parameter(torch.ones(n_classes, self.n_concepts), requires_grad=utility != "sigmoid")
        self.threshold = nn.Parameter(torch.zeros(n_classes, self.n_concepts), requires_grad=utility != "sigmoid")
        self.nodes = nn.ModuleList([ChoquetNode(len(g), n_classes) for g in self.groups])
        self.root = ChoquetNode(len(self.groups), n_classes)

    def slopes(self) -> Tensor:
        """``[classes, K]`` slopes of the marginal utilities (sign = direction)."""
        if self.utility == "increasing":
            return F.softplus(self.slope) + 1e-3
        return self.slope

    def utilities(self, z: Tensor) -> Tensor:
        """``[batch, classes, K]`` marginal utilities in [0, 1]."""
        z = check_scores(z, self.n_concepts)
        return torch.sigmoid(self.slopes() * (z[:, None, :] - self.threshold))

    def group_values(self, u: Tensor) -> Tensor:
        """``[batch, classes, G]`` outputs of the group nodes, from utilities ``[batch, classes, K]``."""
        return torch.stack([node(u[..., g]) for node, g in zip(self.nodes, self.groups, strict=True)], -1)

    def forward(self, z: Tensor) -> Tensor:
        return self.root(self.group_values(self.utilities(z)))

    # -- global explanations -----------------------------------------------------------------
    @torch.no_grad()
    def group_shapley(self) -> Tensor:
        """``[classes, G]`` Shapley values of the groups at the root."""
        return self.root.shapley()

    @torch.no_grad()
    def shapley(self) -> Tensor:
        """``[classes, K]`` global importance of each concept: root Shapley of its group × its Shapley value
        in the group node (sums to 1 per class; the Shapley value of the tree read along the path)."""
        out = torch.zeros(self.n_classes, self.n_concepts)
        root = self.root.shapley()
        for k, (node, g) in enumerate(zip(self.nodes, self.groups, strict=True)):
            out[:, g] = root[:, k : k + 1] * node.shapley()
        return out

    @torch.no_grad()
    def interactions(self) -> Tensor:
        """``[classes, K, K]`` interaction indices between concepts of the same group, scaled by the group's
        root Shapley value (pairs across groups interact through :meth:`group_interactions`)."""
        out = torch.zeros(self.n_classes, self.n_concepts, self.n_concepts)
        root = self.root.shapley()
        for k, (node, g) in enumerate(zip(self.nodes, self.groups, strict=True)):
            idx = torch.tensor(g)
            out[:, idx[:, None], idx[None, :]] = root[:, k, None, None] * node.interactions()
        return out

    @torch.no_grad()
    def group_interactions(self) -> Tensor:
        """``[classes, G, G]`` interaction indices between groups at the root."""
        return self.root.interactions()

    # -- local explanations ------------------------------------------------------------------
    @torch.no_grad()
    def local_contributions(self, z: Tensor) -> Tensor:
        """``[batch, classes, K]`` share of each concept in each class score; sums to ``forward(z)`` exactly.

        Within a node, :func:`node_contributions` (Shapley decomposition of a 2-additive integral);
        a group's share of the root output is then split among its concepts in proportion to their
        shares of the group's output (equally when that output is 0).
        """
        u = self.utilities(z)
        values = self.group_values(u)  # [batch, classes, G]
        root_share = node_contributions(values, self.root.weights())  # [batch, classes, G]
        out = torch.zeros_like(u)
        for k, (node, g) in enumerate(zip(self.nodes, self.groups, strict=True)):
            inner = node_contributions(u[..., g], node.weights())  # [batch, classes, |g|]
            total = values[..., k : k + 1]
            frac = torch.where(total.abs() > 1e-9, inner / total.clamp_min(1e-9), torch.full_like(inner, 1 / len(g)))
            out[..., g] = root_share[..., k : k + 1] * frac
        return out


class ChoquetStudent(nn.Module):
    """CB2's student: logits ``= s · C_c(z)`` for each class ``c``, with a learned scale ``s`` (inverse temperature).

    Args:
        groups, n_classes, utility: as :class:`HierarchicalChoquet`.
    """

    def __init__(self, groups: Sequence[Sequence[int]], n_classes: int, *, utility: str = "signed"):
        super().__init__()
        self.choquet = HierarchicalChoquet(groups, n_classes, utility=utility)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, z: Tensor) -> Tensor:
        return self.log_scale.exp() * self.choquet(z)

    def scores(self, z: Tensor) -> Tensor:
        """``[batch, classes]`` Choquet values in [0, 1] (what the logits are a multiple of)."""
        with torch.no_grad():
            return self.choquet(z)


# ---------------------------------------------------------------------------------------------
# Distillation and faithfulness
# ---------------------------------------------------------------------------------------------


def distil(student: nn.Module, inputs: Tensor, teacher_logits: Tensor, *, temperature: float = 2.0,
           epochs: int = 20, batch_size: int = 512, lr: float = 0.02, weight_decay: float = 0.0,
           seed: int = 0) -> list[float]:
    """Fit ``student(inputs)`` to a teacher's logits by knowledge distillation (Hinton et al. 2015).

    Minimises ``T² KL(softmax(teacher / T) || softmax(student / T))`` with Adam over mini-batches.

    Args:
        student: any module mapping ``inputs [N, ...]`` to logits ``[N, classes]``.
        inputs: ``[N, ...]`` (concept scores for CB2).
        teacher_logits: ``[N, classes]``.
        temperature: ``T``; larger values transfer more of the teacher's "dark knowledge".

    Returns:
        the mean loss of each epoch.
    """
    if len(inputs) != len(teacher_logits) or teacher_logits.ndim != 2:
        raise ValueError(f"need inputs [N, ...] and teacher_logits [N, classes], got {tuple(inputs.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with common.torch_threads(1):  # small dense ops: one thread is faster, and immune to a busy machine
        return _distil(student, inputs, teacher_logits, temperature=temperature, epochs=epochs,
                       batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed)


def _distil(student, inputs, teacher_logits, *, temperature, epochs, batch_size, lr, weight_decay, seed):
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)
    target = (teacher_logits / temperature).log_softmax(-1)
    history = []
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            log_p = (student(inputs[b]) / temperature).log_softmax(-1)
            loss = F.kl_div(log_p, target[b], log_target=True, reduction="batchmean") * temperature**2
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(b)
        history.append(total / len(inputs))
    student.eval()
    return history


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Faithfulness: fraction of inputs where the student's class is the teacher's.

    >>> agreement(torch.tensor([[2., 1.], [0., 3.]]), torch.tensor([[5., 0.], [1., 0.]]))
    0.5
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logits must have the same shape, got {tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    return float((student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean())


def concepts_for_mass(phi: Tensor, fraction: float = 0.8) -> Tensor:
    """How many concepts (largest first) carry ``fraction`` of the Shapley mass, per row of ``phi [..., K]``.

    >>> concepts_for_mass(torch.tensor([[0.5, 0.3, 0.1, 0.1]]), 0.8).tolist()
    [2]
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    mass = phi.abs().sort(-1, descending=True).values
    cum = mass.cumsum(-1) / mass.sum(-1, keepdim=True)
    return (cum < fraction - 1e-9).sum(-1) + 1
