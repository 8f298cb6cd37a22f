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
class, and reads a concept's importance as the product of Shapley values along its path
(:meth:`HierarchicalChoquet.path_shapley`, after Labreuche & Fossier 2018), which is not the Shapley
value of the capacity the tree induces (:func:`tree_capacity`, :func:`path_product_shapley`).
:class:`ChoquetStudent` adds marginal utilities and is trained as in CB2 (Atienza et al., IJCAI 2024):
:func:`distil_cb2` combines distillation on logits with the alignment of the student's node outputs
with the teacher's latent space (:class:`Aligner`); :func:`distil` is plain KL distillation.
:func:`seed_study` compares students under one tuning protocol over several seeds. Introduced in
nbs/10_clip_concepts.ipynb; reused by chapters 11, 12 and 14.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

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


def tree_capacity(root, nodes: Sequence, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """The capacity a two-level tree of Choquet integrals induces on its leaves, ``[2**K]`` (bitmask index).

    A tree aggregates the leaves of group ``g`` with capacity ``nodes[g]`` and the group outputs with
    ``root``; on a 0/1 vector (the indicator of a set ``A``) every Choquet integral returns its
    capacity of the set of ones, so the tree's value on ``1_A`` is the induced capacity ``mu(A)``.

    Args:
        root: capacity ``[2**G]`` over the groups; nodes: one capacity ``[2**len(g)]`` per group;
        groups: leaf indices of each group, covering ``0..K-1`` once (small ``K``: ``2**K`` sets).

    >>> tree_capacity([0, 1, 1, 1], [[0, 0, 0, 1], [0, 1]], [[0, 1], [2]]).tolist()  # max(min(x0, x1), x2)
    [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """
    root = check_capacity(root)
    nodes = [check_capacity(m) for m in nodes]
    flat = sorted(int(i) for g in groups for i in g)
    if len(groups) != _n_criteria(root) or len(nodes) != len(groups) or flat != list(range(len(flat))):
        raise ValueError(f"need one node capacity per group, a root over {len(groups)} groups and groups covering "
                         f"0..K-1 once; got {len(nodes)} nodes, a root on {_n_criteria(root)} criteria, leaves {flat}")
    for m, g in zip(nodes, groups, strict=True):
        if _n_criteria(m) != len(g):
            raise ValueError(f"the node of group {list(g)} needs a capacity on {len(g)} criteria, got {len(m)} values")
    k = len(flat)
    mu = np.zeros(2**k)
    for a in range(2**k):
        values = [m[sum(1 << j for j, leaf in enumerate(g) if a >> leaf & 1)]  # the node's capacity of A within g
                  for m, g in zip(nodes, groups, strict=True)]
        mu[a] = choquet_integral(np.array(values), root)
    return mu


def path_product_shapley(root, nodes: Sequence, groups: Sequence[Sequence[int]]) -> np.ndarray:
    """Leaf importance read along the tree: root Shapley value of the group × Shapley value in the group, ``[K]``.

    The quantity CB2's code reports for a hierarchical Choquet integral (after Labreuche & Fossier
    2018); it differs in general from ``shapley_values(tree_capacity(...))``, the Shapley value of
    the induced capacity.

    >>> path_product_shapley([0, 1, 1, 1], [[0, 0, 0, 1], [0, 1]], [[0, 1], [2]]).tolist()
    [0.25, 0.25, 0.5]
    >>> shapley_values(tree_capacity([0, 1, 1, 1], [[0, 0, 0, 1], [0, 1]], [[0, 1], [2]])).round(4).tolist()
    [0.1667, 0.1667, 0.6667]
    """
    tree_capacity(root, nodes, groups)  # validates the tree
    root_phi = shapley_values(root)
    out = np.zeros(sum(len(g) for g in groups))
    for k, (m, g) in enumerate(zip(nodes, groups, strict=True)):
        out[list(g)] = root_phi[k] * shapley_values(m)
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
    def path_shapley(self) -> Tensor:
        """``[classes, K]`` path-product importance of each concept: the root's Shapley value of its group
        times the concept's Shapley value inside the group node (sums to 1 per class).

        This is what CB2's code reads out of a tree (``get_ieow_leaf_global``), after Labreuche &
        Fossier (IJCAI 2018): a product of node Shapley values along the path from the root. It is
        *not* the Shapley value of the capacity the tree induces on the concepts; see
        :func:`tree_capacity` and :func:`path_product_shapley` for a counterexample.
        """
        out = torch.zeros(self.n_classes, self.n_concepts)
        root = self.root.shapley()
        for k, (node, g) in enumerate(zip(self.nodes, self.groups, strict=True)):
            out[:, g] = root[:, k : k + 1] * node.shapley()
        return out

    def shapley(self) -> Tensor:
        """Alias of :meth:`path_shapley` (the name chapters 11 and 14 use); a path product, not a Shapley value."""
        return self.path_shapley()

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

    def node_outputs(self, z: Tensor) -> Tensor:
        """``[batch, classes * G]`` outputs of every group node of every class (CB2's ``snz``), with gradients.

        The inputs of CB2's alignment step: what the entangler maps to the teacher's latent space.
        """
        return self.choquet.group_values(self.choquet.utilities(z)).flatten(1)


# ---------------------------------------------------------------------------------------------
# Distillation and faithfulness
# ---------------------------------------------------------------------------------------------


def distil(student: nn.Module, inputs: Tensor, teacher_logits: Tensor, *, temperature: float = 2.0,
           epochs: int = 20, batch_size: int = 512, lr: float = 0.02, weight_decay: float = 0.0,
           seed: int = 0, weights: Tensor | None = None,
           extra_loss: Callable[[nn.Module], Tensor] | None = None) -> list[float]:
    """Fit ``student(inputs)`` to a teacher's logits by knowledge distillation (Hinton et al. 2015).

    Minimises ``T² KL(softmax(teacher / T) || softmax(student / T))`` with Adam over mini-batches.

    Args:
        student: any module mapping ``inputs [N, ...]`` to logits ``[N, classes]``.
        inputs: ``[N, ...]`` (concept scores for CB2).
        teacher_logits: ``[N, classes]``.
        temperature: ``T``; larger values transfer more of the teacher's "dark knowledge".
        weights: optional ``[N]`` per-example weights (finite, >= 0): a batch ``B``'s term is then
            ``(1/|B|) Σ_i w_i T² KL_i`` (Chapter 11's weighted students, :func:`helpers.rare.distil_student`).
        extra_loss: optional ``student -> scalar`` added to every step's loss (e.g. a labelled term).

    Returns:
        the mean loss of each epoch.
    """
    if len(inputs) != len(teacher_logits) or teacher_logits.ndim != 2:
        raise ValueError(f"need inputs [N, ...] and teacher_logits [N, classes], got {tuple(inputs.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if weights is not None and (weights.shape != (len(inputs),) or not torch.isfinite(weights).all()
                                or (weights < 0).any()):
        raise ValueError(f"weights must be finite and >= 0, one per input ({len(inputs)}), got shape "
                         f"{tuple(weights.shape)}")
    with common.torch_threads(1):  # small dense ops: one thread is faster, and immune to a busy machine
        return _distil(student, inputs, teacher_logits, temperature=temperature, epochs=epochs,
                       batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed, weights=weights,
                       extra_loss=extra_loss)


def _distil(student, inputs, teacher_logits, *, temperature, epochs, batch_size, lr, weight_decay, seed,
            weights=None, extra_loss=None):
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=weight_decay)
    target = (teacher_logits / temperature).log_softmax(-1)
    history = []
    student.train()
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(inputs), generator=generator)
            total = 0.0
            for i in range(0, len(order), batch_size):
                b = order[i : i + batch_size]
                log_p = (student(inputs[b]) / temperature).log_softmax(-1)
                if weights is None:
                    loss = F.kl_div(log_p, target[b], log_target=True, reduction="batchmean") * temperature**2
                else:
                    kl = F.kl_div(log_p, target[b], log_target=True, reduction="none").sum(-1)  # [batch]
                    loss = (weights[b] * kl).sum() / len(b) * temperature**2
                if extra_loss is not None:
                    loss = loss + extra_loss(student)
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


# ---------------------------------------------------------------------------------------------
# CB2's full objective: distillation on logits + alignment with the teacher's latent space
# ---------------------------------------------------------------------------------------------

DISTILLATIONS = ("mse", "kl")


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, *, kind: str = "mse",
                      temperature: float = 2.0) -> Tensor:
    """The prediction term of CB2: ``"mse"`` on logits (CB2's code) or ``"kl"`` at temperature ``T`` (Hinton et al.).

    ``"mse"`` compares logits after removing each row's mean: a softmax ignores a per-row shift, and a
    Choquet student's logits ``s · C(x)`` are non-negative while a teacher's are not (logit matching,
    Ba & Caruana 2014). ``"kl"`` is ``T² KL(softmax(teacher / T) || softmax(student / T))``.

    >>> t = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    >>> float(distillation_loss(t + 5.0, t))            # a per-row shift costs nothing
    0.0
    >>> float(distillation_loss(torch.zeros(2, 2), t))  # centred teacher rows (1, -1) and (-2, 2)
    2.5
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"need student and teacher logits of one shape [N, classes], got {tuple(student_logits.shape)}"
                         f" and {tuple(teacher_logits.shape)}")
    if kind not in DISTILLATIONS:
        raise ValueError(f"kind must be one of {DISTILLATIONS}, got {kind!r}")
    if kind == "mse":
        centre = lambda t: t - t.mean(-1, keepdim=True)  # noqa: E731
        return F.mse_loss(centre(student_logits), centre(teacher_logits))
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    log_p = (student_logits / temperature).log_softmax(-1)
    log_q = (teacher_logits / temperature).log_softmax(-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


class Aligner(nn.Module):
    """CB2's alignment module: an entangler from the student's node outputs to the teacher's latent space
    and a disentangler back (two-layer SiLU MLPs of width ``hidden``, as in CB2's ``InterpreterCB2_HCI_CLS``).

    ``forward(nodes [batch, n_nodes]) -> (latent logits [batch, latent_dim], reconstruction [batch, n_nodes])``.
    """

    def __init__(self, n_nodes: int, latent_dim: int, *, hidden: int = 100):
        super().__init__()
        if n_nodes < 1 or latent_dim < 1 or hidden < 1:
            raise ValueError(f"need n_nodes, latent_dim, hidden >= 1, got {n_nodes}, {latent_dim}, {hidden}")
        self.entangler = nn.Sequential(nn.Linear(n_nodes, hidden), nn.SiLU(), nn.Linear(hidden, latent_dim))
        self.disentangler = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, n_nodes))

    def forward(self, nodes: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.entangler(nodes)
        return latent, self.disentangler(latent)


def alignment_loss(aligner: Aligner, nodes: Tensor, teacher_latent: Tensor, *,
                   temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """CB2's alignment and reconstruction terms, ``(CE(ent(n) / T, softmax(h / T)) / T, MSE(dis(ent(n)), n))``.

    Args:
        aligner: the entangler / disentangler pair.
        nodes: ``[batch, n_nodes]`` node outputs of the student.
        teacher_latent: ``[batch, latent_dim]`` the black box's latent vector (its CLS token here).
    """
    latent, rebuilt = aligner(nodes)
    target = (teacher_latent / temperature).softmax(-1)
    return F.cross_entropy(latent / temperature, target) / temperature, F.mse_loss(rebuilt, nodes)


def latent_gap(aligner: Aligner, nodes: Tensor, teacher_latent: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Per-example ``KL(softmax(h / T) || softmax(ent(n) / T))``, ``[N]``: 0 when the node outputs give the
    teacher's latent distribution exactly (the alignment term minus its unavoidable entropy)."""
    if len(nodes) != len(teacher_latent):
        raise ValueError(f"need one latent vector per example, got {len(nodes)} and {len(teacher_latent)}")
    with torch.no_grad():
        log_p = (aligner.entangler(nodes) / temperature).log_softmax(-1)
        log_q = (teacher_latent / temperature).log_softmax(-1)
        return (log_q.exp() * (log_q - log_p)).sum(-1)


def distil_cb2(student: nn.Module, inputs: Tensor, teacher_logits: Tensor, *, teacher_latent: Tensor | None = None,
               aligner: Aligner | None = None, distillation: str = "mse", temperature: float = 2.0,
               r_pred: float = 1.0, r_align: float = 1.0, r_ae: float = 1.0, align_temperature: float = 1.0,
               epochs: int = 15, batch_size: int = 512, lr: float = 0.02, aligner_lr: float = 0.01,
               seed: int = 0) -> dict[str, list[float]]:
    """Train a student with CB2's objective ``r_pred·L_pred + r_align·L_align + r_ae·L_ae`` (Atienza et al. 2024).

    ``L_pred`` is :func:`distillation_loss` (``"mse"`` on logits as CB2's code, or ``"kl"`` at
    ``temperature``); with ``teacher_latent`` and ``aligner`` given, the student's node outputs
    (``student.node_outputs(inputs)``, e.g. :meth:`ChoquetStudent.node_outputs`) are also pushed
    through the entangler towards the teacher's latent vector (:func:`alignment_loss`), and student
    and aligner are trained together (the aligner with its own learning rate ``aligner_lr``). Without
    them it is plain distillation, for any student.

    Returns:
        per-epoch means of ``"loss"``, ``"pred"``, ``"align"`` and ``"ae"`` (0 without alignment).
    """
    if len(inputs) != len(teacher_logits) or teacher_logits.ndim != 2:
        raise ValueError(f"need inputs [N, ...] and teacher_logits [N, classes], got {tuple(inputs.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    if (teacher_latent is None) != (aligner is None):
        raise ValueError("give both teacher_latent and aligner (the alignment step), or neither (distillation only)")
    if teacher_latent is not None:
        if len(teacher_latent) != len(inputs):
            raise ValueError(f"need one teacher latent vector per input, got {len(teacher_latent)} and {len(inputs)}")
        if not hasattr(student, "node_outputs"):
            raise ValueError("the alignment step needs a student with node_outputs(inputs), e.g. a ChoquetStudent")
    if distillation not in DISTILLATIONS:
        raise ValueError(f"distillation must be one of {DISTILLATIONS}, got {distillation!r}")
    with common.torch_threads(1):  # small dense ops: one thread is faster, and immune to a busy machine
        return _distil_cb2(student, inputs, teacher_logits, teacher_latent, aligner, distillation, temperature,
                           (r_pred, r_align, r_ae), align_temperature, epochs, batch_size, (lr, aligner_lr), seed)


def _distil_cb2(student, inputs, teacher_logits, teacher_latent, aligner, distillation, temperature, weights,
                align_temperature, epochs, batch_size, lrs, seed):
    r_pred, r_align, r_ae = weights
    generator = torch.Generator().manual_seed(seed)
    param_groups = [{"params": [p for p in student.parameters() if p.requires_grad], "lr": lrs[0]}]
    if aligner is not None:
        param_groups.append({"params": list(aligner.parameters()), "lr": lrs[1]})
    optimiser = torch.optim.Adam(param_groups)
    history: dict[str, list[float]] = {"loss": [], "pred": [], "align": [], "ae": []}
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        sums = dict.fromkeys(history, 0.0)
        for i in range(0, len(order), batch_size):
            b = order[i : i + batch_size]
            pred = distillation_loss(student(inputs[b]), teacher_logits[b], kind=distillation, temperature=temperature)
            align = ae = pred.new_zeros(())
            if aligner is not None:
                align, ae = alignment_loss(aligner, student.node_outputs(inputs[b]), teacher_latent[b],
                                           temperature=align_temperature)
            loss = r_pred * pred + r_align * align + r_ae * ae
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            for key, value in zip(history, (loss, pred, align, ae), strict=True):
                sums[key] += value.item() * len(b)
        for key in history:
            history[key].append(sums[key] / len(inputs))
    student.eval()
    return history


def fit_aligner(aligner: Aligner, nodes: Tensor, teacher_latent: Tensor, *, r_align: float = 1.0, r_ae: float = 1.0,
                temperature: float = 1.0, epochs: int = 15, batch_size: int = 512, lr: float = 0.01,
                seed: int = 0) -> list[float]:
    """Fit only the aligner on *frozen* node outputs (post hoc): what the latent space can be read from a
    student that was never trained to align. Returns the mean loss of each epoch."""
    if nodes.ndim != 2 or len(nodes) != len(teacher_latent):
        raise ValueError(f"need nodes [N, n_nodes] and teacher_latent [N, d], got {tuple(nodes.shape)} and "
                         f"{tuple(teacher_latent.shape)}")
    nodes = nodes.detach()
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(aligner.parameters(), lr=lr)
    history = []
    with common.torch_threads(1):
        for _ in range(epochs):
            order = torch.randperm(len(nodes), generator=generator)
            total = 0.0
            for i in range(0, len(order), batch_size):
                b = order[i : i + batch_size]
                align, ae = alignment_loss(aligner, nodes[b], teacher_latent[b], temperature=temperature)
                loss = r_align * align + r_ae * ae
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                total += loss.item() * len(b)
            history.append(total / len(nodes))
    aligner.eval()
    return history


# ---------------------------------------------------------------------------------------------
# One tuning protocol for every student, several seeds (chapter 10's comparison)
# ---------------------------------------------------------------------------------------------

STUDENT_FAMILIES = ("CB2: Choquet + alignment, MSE", "Choquet, MSE", "Choquet, KL (T = 2)", "linear, MSE",
                    "linear, KL (T = 2)", "MLP, MSE", "MLP, KL (T = 2)")
"""The students of chapter 10's comparison: CB2 in full, its ablations, and unconstrained concept students."""


def make_student(family: str, groups: Sequence[Sequence[int]], n_classes: int, latent_dim: int
                 ) -> tuple[nn.Module, Aligner | None, str]:
    """``(student, aligner or None, distillation kind)`` of one family of :data:`STUDENT_FAMILIES`.

    Seed torch first (``torch.manual_seed``): the aligner, linear and MLP weights are drawn here; a
    Choquet student starts from fixed weights.
    """
    if family not in STUDENT_FAMILIES:
        raise ValueError(f"family must be one of {STUDENT_FAMILIES}, got {family!r}")
    kind = "kl" if "KL" in family else "mse"
    n_concepts = sum(len(g) for g in groups)
    if family.startswith(("CB2", "Choquet")):
        student = ChoquetStudent(groups, n_classes, utility="sigmoid")
        aligner = Aligner(n_classes * len(groups), latent_dim) if family.startswith("CB2") else None
        return student, aligner, kind
    if family.startswith("linear"):
        return nn.Linear(n_concepts, n_classes), None, kind
    return nn.Sequential(nn.Linear(n_concepts, 256), nn.ReLU(), nn.Linear(256, n_classes)), None, kind


def seed_study(groups: Sequence[Sequence[int]], data: dict[str, tuple[Tensor, Tensor, Tensor]], *,
               families: Sequence[str] = STUDENT_FAMILIES, lrs: Sequence[float] = (0.003, 0.01, 0.03, 0.1),
               seeds: Sequence[int] = (0, 1, 2), epochs: int = 12, batch_size: int = 1024) -> dict:
    """Tune every student family the same way, then train it with several seeds and keep its test outputs.

    Protocol: Adam, ``epochs`` epochs, batches of ``batch_size``; the learning rate is chosen from
    ``lrs`` by agreement with the teacher on the ``"val"`` split (seed 0); then the family is trained
    with every seed at that rate. Choquet students without alignment get a post-hoc aligner
    (:func:`fit_aligner`) so that their node outputs can be compared with CB2's on the latent gap.

    Args:
        groups: concept groups of the Choquet students.
        data: ``{"fit" | "val" | "test": (concept scores [N, K], teacher logits [N, C], teacher latent [N, d])}``.

    Returns:
        ``{family: {"lr", "val_by_lr", "pred" [seed, N_test], "val_agreement" [seed], "seconds" [seed]}}``,
        plus for Choquet families ``"phi"`` [seed, C, K], ``"interactions"`` [seed, C, K, K], ``"latent_gap"``
        [seed, N_test], and ``"state"`` (seed 0's student, and aligner for CB2).
    """
    import time

    if set(data) != {"fit", "val", "test"}:
        raise ValueError(f"data needs the splits 'fit', 'val' and 'test', got {sorted(data)}")
    z_fit, t_fit, h_fit = data["fit"]
    n_classes, latent_dim = t_fit.shape[1], h_fit.shape[1]

    def train(family, lr, seed):
        torch.manual_seed(seed)
        student, aligner, kind = make_student(family, groups, n_classes, latent_dim)
        t0 = time.perf_counter()
        distil_cb2(student, z_fit, t_fit, teacher_latent=h_fit if aligner is not None else None, aligner=aligner,
                   distillation=kind, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        return student, aligner, time.perf_counter() - t0

    def agree(student, split):
        with torch.no_grad():
            return agreement(student(data[split][0]), data[split][1])

    out = {}
    for family in families:
        val_by_lr, first = {}, {}
        for lr in lrs:
            first[lr] = train(family, lr, seeds[0])
            val_by_lr[lr] = agree(first[lr][0], "val")
        best = max(lrs, key=lambda lr: val_by_lr[lr])  # max keeps the first (smallest) rate on ties
        runs = [first[best]] + [train(family, best, s) for s in seeds[1:]]
        res = {"lr": best, "val_by_lr": val_by_lr, "val_agreement": [agree(r[0], "val") for r in runs],
               "seconds": [r[2] for r in runs]}
        with torch.no_grad():
            res["pred"] = torch.stack([r[0](data["test"][0]).argmax(1) for r in runs]).to(torch.int16)
        if isinstance(runs[0][0], ChoquetStudent):
            gaps = []
            for seed, (student, aligner, _) in zip(seeds, runs, strict=True):
                with torch.no_grad():
                    nodes_fit, nodes_test = student.node_outputs(z_fit), student.node_outputs(data["test"][0])
                if aligner is None:  # post hoc: the same aligner, fitted on the frozen student's node outputs
                    torch.manual_seed(seed)
                    aligner = Aligner(nodes_fit.shape[1], latent_dim)
                    fit_aligner(aligner, nodes_fit, h_fit, epochs=epochs, batch_size=batch_size, seed=seed)
                gaps.append(latent_gap(aligner, nodes_test, data["test"][2]))
            res["latent_gap"] = torch.stack(gaps)
            res["phi"] = torch.stack([r[0].choquet.path_shapley() for r in runs])
            res["interactions"] = torch.stack([r[0].choquet.interactions() for r in runs])
            res["state"] = {"student": runs[0][0].state_dict(),
                            "aligner": runs[0][1].state_dict() if runs[0][1] is not None else None}
        out[family] = res
    return out
