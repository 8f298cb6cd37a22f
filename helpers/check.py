"""Automatic checks for the book's exercises: the book's one place for them.

Each function takes the reader's implementation, runs it on known-answer and random cases against the
book's reference, prints ``pass`` or what differs with a hint, and returns ``True``/``False``. Checks run
on small synthetic inputs and tiny models built here, so they take well under a second and need no asset.

- :func:`rollout` — Chapter 1, attention rollout of one sentence (``attention.rollout``);
- :func:`grad_rollout` — Chapter 1, gradient-weighted rollout (``attention.grad_rollout``);
- :func:`node_recall` — Chapter 2, SINr's node recall (``sinr.node_recall``);
- :func:`pmi` — Chapter 2, the PMI of every edge (``sinr.pmi``);
- :func:`document_vector` — Chapter 3, task-vector attention pooling
  (``interpretable_classifier.TaskAttentionClassifier``);
- :func:`leave_one_out` — Chapter 3, leave-one-out importance (``interpretable_classifier.leave_one_out``);
- :func:`attention_entropy` — Chapter 4, smoothed mean row entropy (``heads.attention_entropy``);
- :func:`word_attention` — Chapter 4, word-piece to word attention (``heads.word_attention``);
- :func:`ffn_coefficients` — Chapter 5, the memory coefficients of a gated FFN (``ffn.coefficients``);
- :func:`value_logits` — Chapter 5, a value vector read in the vocabulary (``ffn.value_logits``);
- :func:`term_importance` — Chapter 6, the importance of each term of the decomposition (``dissect.importance``);
- :func:`push_layer_norm_mickus` — Chapter 6, additive terms sent through a LayerNorm in the paper's split
  (``dissect.push_layer_norm``, ``convention="mickus"``);
- :func:`patch_metric` — Chapter 6b, the normalised patching metric (``causal.normalised``);
- :func:`logit_lens` — Chapter 6b, the logit lens of one residual-stream vector (``causal.unembed``);
- :func:`topk_activation` — Chapter 6c, the TopK activation of a sparse autoencoder
  (``dictionaries.topk_activation``);
- :func:`fvu` — Chapter 6c, the fraction of variance unexplained (``dictionaries.fvu``);
- :func:`rationale_mask` — Chapter 7, the top tokens of an attribution (``evaluation.rationale_mask``);
- :func:`comprehensiveness` — Chapter 7, ERASER comprehensiveness (``evaluation.comprehensiveness``);
- :func:`deletion_curve` — Chapter 8, the deletion curve of a saliency map (``vision.perturbation_curve``);
- :func:`map_rank_correlation` — Chapter 8, the Spearman correlation of two maps (``stats.rank_correlations``);
- :func:`prototype_similarity` — Chapter 9, ProtoPNet's similarity of a prototype to an image
  (``prototypes.log_similarity``);
- :func:`hit_rate_ndcg` — Chapter 9, HitRate@k and NDCG@k (``prototypes.hit_rate_ndcg``);
- :func:`contrastive_loss` — Chapter 10, CLIP's symmetric InfoNCE (``clip.contrastive_loss``);
- :func:`choquet_integral` — Chapter 10, the discrete Choquet integral of a capacity (``choquet.choquet_integral``);
- :func:`concept_auc` — Chapter 11, the grounding AUC of each concept (``rare.concept_auc``);
- :func:`within_class_auc` — Chapter 11, the AUC inside each class, averaged (``rare.within_class_auc``);
- :func:`stream_metrics` — Chapter 12, Transfer, Avg, Last and forgetting (``continual.stream_metrics``);
- :func:`wise_ft` — Chapter 12, the WiSE-FT weight blend (``continual.wise_ft``);
- :func:`nrg` — Chapter 13, the "headroom" normalised relative gain (``transfer.nrg``);
- :func:`dimension_purity` — Chapter 13, the class purity of a feature dimension (``transfer.dimension_purity``);
- :func:`ground_truth_auc` — Chapter 14, plausibility against known features (``evaluation.ground_truth_auc``);
- :func:`sanity_distance` — Chapter 14, ``1 - |rho|`` of the model-randomisation test (``evaluation.sanity_distance``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch


def _report(failures: list[str], hint: str) -> bool:
    if not failures:
        print("pass")
        return True
    print("not yet:\n- " + "\n- ".join(failures[:3]) + f"\nhint: {hint}")
    return False


_RAISED = object()  # what _call returns when the reader's function raised


def _call(failures: list[str], name: str, fn: Callable, *args, post: Callable | None = None, no_grad: bool = False,
          **kwargs):  # fmt: skip
    """``post(fn(*args, **kwargs))`` (``post`` optional; under ``torch.no_grad()`` if asked): the reader's code
    run on one case; on an exception, record it under the case's ``name`` and return ``_RAISED``."""
    try:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            out = fn(*args, **kwargs)
            return post(out) if post is not None else out
    except Exception as err:  # noqa: BLE001 - the reader's code may raise anything
        failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
        return _RAISED


def patch_metric(fn: Callable) -> bool:
    """Check ``fn(patched, clean, corrupted)``: 0 for the corrupted run, 1 for the clean run, linear between.

    Args:
        fn: the reader's function of three tensors (or floats) of the same shape, returning that shape.

    Returns:
        True when it matches ``causal.normalised`` on every case (it prints ``pass``).

    >>> patch_metric(lambda p, c, x: (p - x) / (c - x))
    pass
    True
    """
    from helpers.causal import normalised

    g = torch.Generator().manual_seed(0)
    cases = [  # (name, patched, clean, corrupted)
        ("patched = clean", torch.tensor([2.5]), torch.tensor([2.5]), torch.tensor([-1.0])),
        ("patched = corrupted", torch.tensor([-1.0]), torch.tensor([2.5]), torch.tensor([-1.0])),
        ("half way", torch.tensor([0.75]), torch.tensor([2.5]), torch.tensor([-1.0])),
        ("corrupted above clean", torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([2.0])),
        ("random batch", torch.randn(8, generator=g), torch.randn(8, generator=g) + 3, torch.randn(8, generator=g) - 3),
    ]
    failures = []
    for name, p, c, x in cases:
        got = _call(
            failures, name, fn, p.clone(), c.clone(), x.clone(), post=lambda r: torch.as_tensor(r, dtype=torch.float32)
        )
        if got is _RAISED:
            continue
        want = normalised(p, clean=c, corrupted=x)
        if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5):
            failures.append(f"{name}: expected {want.tolist()}, got {got.tolist()}")
    return _report(
        failures,
        "measure how far the patch moved the metric from the corrupted run, as a share of "
        "the whole clean-minus-corrupted gap: (patched - corrupted) / (clean - corrupted)",
    )


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        vocab_size=50,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a norm gain far from 1, so that skipping the gain shows
        model.model.norm.weight.copy_(torch.rand(16, generator=torch.Generator().manual_seed(1)) * 3 + 0.1)
    return model


def logit_lens(fn: Callable) -> bool:
    """Check ``fn(model, resid) -> logits``: one residual-stream vector read as next-token logits.

    Args:
        fn: the reader's function; ``resid`` is ``[batch, pos, d_model]`` (a Llama-style model's
            residual stream after some block), the result ``[batch, pos, vocab]``.

    Returns:
        True when it matches the final RMSNorm followed by the unembedding (it prints ``pass``).

    >>> logit_lens(lambda model, resid: model.lm_head(model.model.norm(resid)))
    pass
    True
    """
    from helpers.causal import residual_stream, unembed

    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        resid, logits = residual_stream(model, ids)
        cases = [
            ("last layer (must equal the model's logits)", resid[-1], logits),
            ("first layer", resid[0], unembed(model, resid[0])),
            ("a scaled vector", 7 * resid[0], unembed(model, 7 * resid[0])),
        ]
    failures = []
    for name, r, want in cases:
        got = _call(failures, name, fn, model, r.clone(), no_grad=True)
        if got is _RAISED:
            continue
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            failures.append(f"{name}: largest difference {float((got - want).abs().max()):.3g} from the reference")
    return _report(
        failures,
        "apply the final RMSNorm (model.model.norm, with its gain) before the unembedding "
        "(model.lm_head); the residual stream is never unembedded raw",
    )


def topk_activation(fn: Callable) -> bool:
    """Check ``fn(pre, k) -> z``: the TopK activation of a sparse autoencoder (Chapter 6c).

    Keep the ``k`` largest entries of each row of ``pre`` (``[token, d_sae]``), pass them through a ReLU,
    and set every other entry to 0 (``dictionaries.topk_activation``).

    Args:
        fn: the reader's function of a ``[token, d_sae]`` tensor and an int.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import dictionaries
    >>> topk_activation(dictionaries.topk_activation)
    pass
    True
    """
    from helpers.dictionaries import topk_activation as reference

    g = torch.Generator().manual_seed(0)
    cases = [  # (name, pre, k)
        ("one row, k = 2", torch.tensor([[3.0, -1.0, 2.0, 0.5]]), 2),
        ("negatives among the k largest", torch.tensor([[-3.0, -1.0, -2.0, 0.5]]), 2),
        ("large negative entries", torch.tensor([[-9.0, 1.0, 0.2, -8.0, 0.1]]), 1),
        ("random batch, k = 5", torch.randn(6, 20, generator=g), 5),
        ("k = all latents", torch.randn(3, 4, generator=g), 4),
    ]
    failures = []
    for name, pre, k in cases:
        got = _call(failures, name, fn, pre.clone(), k)
        if got is _RAISED:
            continue
        want = reference(pre, k)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got.float(), want, atol=1e-6):
            failures.append(f"{name}: expected {want.tolist()}, got {got.tolist()}")
    return _report(
        failures,
        "take pre.topk(k, dim=-1) (the largest values, not the largest absolute values), "
        "put relu(values) back at their indices in a tensor of zeros (scatter)",
    )


def rollout(fn: Callable) -> bool:
    """Check ``fn(attn, residual=0.5) -> R``: attention rollout of one sentence (Chapter 1).

    ``attn`` is ``[layer, head, query, key]`` (no padding); average the heads, mix in the identity as
    ``(1 - residual) * A + residual * I`` with rows re-normalised, and multiply the layers from the top
    down, ``R = Â_L ... Â_1`` (``attention.rollout``).

    Args:
        fn: the reader's function of a ``[layer, head, query, key]`` tensor and the residual weight.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import attention
    >>> rollout(lambda attn, residual=0.5: attention.rollout(attn[:, None], residual=residual)[0])
    pass
    True
    """
    from helpers.attention import rollout as reference

    g = torch.Generator().manual_seed(0)
    to_first = torch.tensor([[1.0, 0.0, 0.0]] * 3)  # every query reads token 0
    to_last = torch.tensor([[0.0, 0.0, 1.0]] * 3)  # every query reads token 2
    cases = [  # (name, attn [layer, head, query, key], residual)
        ("identity attention, 2 layers", torch.eye(3).expand(2, 2, 3, 3).clone(), 0.5),
        ("one layer reading token 0", to_first[None, None].clone(), 0.5),
        ("layer 1 reads token 0, layer 2 token 2 (order matters)", torch.stack([to_first, to_last])[:, None], 0.5),
        ("two heads that disagree, residual = 0", torch.stack([to_first, to_last])[None], 0.0),
        ("residual = 0.2", torch.stack([to_first, to_last])[:, None], 0.2),
        ("random, 3 layers x 4 heads, residual = 0.3", torch.randn(3, 4, 5, 5, generator=g).softmax(-1), 0.3),
    ]
    failures = []
    for name, attn, residual in cases:
        got = _call(failures, name, fn, attn.clone(), residual=residual)
        if got is _RAISED:
            continue
        want = reference(attn[:, None], residual=residual)[0]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got.float(), want, atol=1e-5):
            failures.append(
                f"{name}: expected {want.double().numpy().round(3).tolist()}, "
                f"got {got.double().numpy().round(3).tolist()}"
            )
    return _report(
        failures,
        "average the heads first, then Â = (1 - residual) * Ā + residual * I (rows divided by "
        "their sums), and put each new layer on the left: R = Â_l @ R, starting from R = Â_1",
    )


def grad_rollout(fn: Callable) -> bool:
    """Check ``fn(attn, grad) -> R``: gradient-weighted rollout of one sentence (Chapter 1, Chefer et al.).

    ``attn`` and ``grad`` are ``[layer, head, query, key]``; each layer gives
    ``Ā = mean over heads of (grad * attn)^+`` and the relevance grows as ``R <- R + Ā @ R`` from
    ``R = I`` (``attention.grad_rollout``).

    Args:
        fn: the reader's function of two ``[layer, head, query, key]`` tensors, returning ``[query, key]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import attention
    >>> grad_rollout(lambda attn, grad: attention.grad_rollout(attn[:, None], grad[:, None])[0])
    pass
    True
    """
    from helpers.attention import grad_rollout as reference

    g = torch.Generator().manual_seed(0)
    to_first = torch.tensor([[1.0, 0.0, 0.0]] * 3)
    to_last = torch.tensor([[0.0, 0.0, 1.0]] * 3)
    eye3 = torch.eye(2).expand(3, 1, 2, 2).clone()
    two = torch.stack([to_first, to_last])[:, None]  # [layer 2, head 1, 3, 3]
    heads2 = torch.stack([to_first, torch.full((3, 3), 1 / 3)])[None]  # [layer 1, head 2, 3, 3]
    cases = [  # (name, attn, grad)
        ("three self-attending layers, gradient 1 (R = 8 I)", eye3, torch.ones_like(eye3)),
        ("negative gradient: the layer counts for nothing (R = I)", eye3[:1], -torch.ones_like(eye3[:1])),
        ("layer 1 reads token 0, layer 2 token 2 (order matters)", two, torch.ones_like(two)),
        ("two heads, one with a negative gradient", heads2, torch.stack([torch.ones(3, 3), -torch.ones(3, 3)])[None]),
        (
            "random, 2 layers x 3 heads",
            torch.randn(2, 3, 4, 4, generator=g).softmax(-1),
            torch.randn(2, 3, 4, 4, generator=g),
        ),
    ]
    failures = []
    for name, attn, grad in cases:
        got = _call(failures, name, fn, attn.clone(), grad.clone())
        if got is _RAISED:
            continue
        want = reference(attn[:, None], grad[:, None])[0]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got.float(), want, atol=1e-5):
            failures.append(
                f"{name}: expected {want.double().numpy().round(3).tolist()}, "
                f"got {got.double().numpy().round(3).tolist()}"
            )
    return _report(
        failures,
        "per layer, clamp (grad * attn) at 0 for every head *before* averaging the heads; start "
        "from R = I and update R = R + Ā @ R layer by layer, with no row re-normalisation",
    )


def node_recall(fn: Callable) -> bool:
    """Check ``fn(adjacency, membership) -> NR``: SINr's node recall ``NR(u, C) = Σ_{v∈C} A_uv / d(u)`` (Chapter 2).

    Args:
        fn: the reader's function of a ``[word, word]`` scipy.sparse matrix of edge weights and a
            ``[word]`` int array of community ids; it returns ``[word, community]`` (dense or sparse).

    Returns:
        True when it matches ``sinr.node_recall`` on every case (it prints ``pass``).

    >>> from helpers import sinr
    >>> node_recall(sinr.node_recall)
    pass
    True
    """
    import numpy as np
    from scipy import sparse

    from helpers.sinr import node_recall as reference

    rng = np.random.default_rng(0)
    upper = np.triu(rng.integers(0, 4, (8, 8)) * (rng.random((8, 8)) < 0.5), 1).astype(float)
    upper[7] = upper[:, 7] = 0  # word 7 has no edge
    cases = [  # (name, dense adjacency, membership)
        ("three words, weights 2 and 1", np.array([[0, 2, 1], [2, 0, 0], [1, 0, 0]], float), np.array([0, 0, 1])),
        (
            "a community the word has no edge to",
            np.array([[0, 3, 0, 0], [3, 0, 1, 0], [0, 1, 0, 5], [0, 0, 5, 0]], float),
            np.array([0, 0, 1, 2]),
        ),
        (
            "unequal weights and community sizes",
            np.array([[0, 1, 1, 4], [1, 0, 0, 0], [1, 0, 0, 0], [4, 0, 0, 0]], float),
            np.array([0, 1, 1, 0]),
        ),
        ("random graph with an isolated word", upper + upper.T, rng.integers(0, 3, 8)),
    ]
    failures = []
    for name, dense, membership in cases:
        adjacency = sparse.csr_matrix(dense)
        try:
            got = fn(adjacency.copy(), membership.copy())
            got = np.asarray(got.toarray() if sparse.issparse(got) else got, dtype=float) if got is not None else got
        except Exception as err:  # noqa: BLE001 - the reader's code may raise anything
            failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
            continue
        want = reference(adjacency, membership).toarray()
        if got is None:
            failures.append(f"{name}: your function returned None")
        elif got.shape != want.shape:
            failures.append(f"{name}: expected shape {want.shape} ([word, community]), got {got.shape}")
        elif not np.allclose(got, want, atol=1e-6):  # NaN (0 / 0) never passes
            failures.append(f"{name}: expected {want.round(3).tolist()}, got {got.round(3).tolist()}")
    return _report(
        failures,
        "sum the word's edge weights to the members of C and divide by its weighted degree d(u) "
        "(the sum of its row, not its number of neighbours nor the size of C); a word with no "
        "edge gets a row of zeros, not 0 / 0",
    )


def pmi(fn: Callable) -> bool:
    """Check ``fn(adjacency) -> PMI``: the PMI of every edge, ``log(c(u,v) W / (d(u) d(v)))`` with
    ``W = Σ_{u<v} c(u,v)`` (Chapter 2, ``sinr.pmi``).

    Args:
        fn: the reader's function of a symmetric ``[word, word]`` scipy.sparse matrix of counts; it
            returns a ``[word, word]`` matrix (dense or sparse) whose entries on the edges are their PMI.

    Returns:
        True when it matches ``sinr.pmi`` on the edges of every case (it prints ``pass``).

    >>> from helpers import sinr
    >>> pmi(sinr.pmi)
    pass
    True
    """
    import numpy as np
    from scipy import sparse

    from helpers.sinr import pmi as reference

    rng = np.random.default_rng(0)
    upper = np.triu(rng.integers(1, 9, (7, 7)) * (rng.random((7, 7)) < 0.6), 1).astype(float)
    cases = [  # (name, dense symmetric counts)
        ("one edge (W = 4, d = 4 and 4: PMI = log 1 = 0)", np.array([[0, 4], [4, 0]], float)),
        ("a path a - b - c (W = 3)", np.array([[0, 1, 0], [1, 0, 2], [0, 2, 0]], float)),
        (
            "two separate pairs (W = 4: PMI = log 4 and log 4/3)",
            np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 3], [0, 0, 3, 0]], float),
        ),
        ("random counts", upper + upper.T),
    ]
    failures = []
    for name, dense in cases:
        adjacency = sparse.csr_matrix(dense)
        try:
            got = fn(adjacency.copy())
            got = np.asarray(got.toarray() if sparse.issparse(got) else got, dtype=float) if got is not None else got
        except Exception as err:  # noqa: BLE001 - the reader's code may raise anything
            failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
            continue
        want = reference(adjacency).toarray()
        edges = dense > 0
        if got is None:
            failures.append(f"{name}: your function returned None")
        elif got.shape != want.shape:
            failures.append(f"{name}: expected shape {want.shape} ([word, word]), got {got.shape}")
        elif not np.allclose(got[edges], want[edges], atol=1e-6):
            failures.append(
                f"{name}: on the edges expected {want[edges].round(3).tolist()}, got {got[edges].round(3).tolist()}"
            )
    return _report(
        failures,
        "W counts each edge once (sum the upper triangle, i.e. half of adjacency.sum()); d(u) "
        "is the row sum; PMI(u, v) = log(c(u, v) * W / (d(u) * d(v))), the natural log",
    )


def document_vector(fn: Callable) -> bool:
    """Check ``fn(x, mask, u, tau) -> z``: task-vector attention pooling (Chapter 3, eq. ch3-attention).

    ``α = softmax over the real words of <x_t, u> / tau`` and ``z = Σ_t α_t x_t``, as in
    ``interpretable_classifier.TaskAttentionClassifier`` (a text with no real word gets ``z = 0``).

    Args:
        fn: the reader's function of ``x`` ``[batch, pos, dim]``, ``mask`` ``[batch, pos]`` bool (False on
            padding), ``u`` ``[dim]`` and a float ``tau``; it returns ``z``, ``[batch, dim]``.

    Returns:
        True when it matches the chapter's model on every case (it prints ``pass``).

    >>> def z(x, mask, u, tau):
    ...     scores = (x @ u / tau).masked_fill(~mask, float("-inf"))
    ...     return torch.nan_to_num(scores.softmax(-1))[..., None].mul(x).sum(1)
    >>> document_vector(z)
    pass
    True
    """
    from helpers.interpretable_classifier import TaskAttentionClassifier

    def reference(x, mask, u, tau):  # the chapter's model with x as its word table (word t of text b: id 1 + b*pos + t)
        model = TaskAttentionClassifier(x.reshape(-1, x.shape[-1]).numpy(), 2, tau=tau)
        with torch.no_grad():
            model.query.copy_(u)
        ids = torch.arange(1, x.shape[0] * x.shape[1] + 1).view(x.shape[:2])
        with torch.no_grad():
            return model.explain(ids, mask).z

    g = torch.Generator().manual_seed(0)
    x2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    pad = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    cases = [  # (name, x, mask, u, tau)
        ("one word: z is its vector", torch.tensor([[[0.2, 0.7, 0.1]]]), torch.tensor([[True]]), torch.ones(3), 0.1),
        ("u = 0: plain mean of the words", x2, torch.ones(1, 2, dtype=torch.bool), torch.zeros(2), 0.1),
        ("padding gets no weight", pad, torch.tensor([[True, True, False]]), torch.zeros(2), 0.1),
        ("u favours dimension 0, tau = 1", x2, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), 1.0),
        ("same u, tau = 0.1 (sharper)", x2, torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), 0.1),
        ("a text with no word: z = 0", x2, torch.zeros(1, 2, dtype=torch.bool), torch.ones(2), 0.1),
        (
            "random batch with padding",
            torch.rand(3, 5, 4, generator=g),
            torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool(),
            torch.randn(4, generator=g),
            0.3,
        ),
    ]
    failures = []
    for name, x, mask, u, tau in cases:
        got = _call(failures, name, fn, x.clone(), mask.clone(), u.clone(), tau)
        if got is _RAISED:
            continue
        want = reference(x, mask, u, tau)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got.detach().float(), want, atol=1e-5):
            failures.append(
                f"{name}: expected {want.double().numpy().round(3).tolist()}, "
                f"got {got.detach().double().numpy().round(3).tolist()}"
            )
    return _report(
        failures,
        "score every word by (x @ u) / tau, set the scores of padding to -inf before the softmax "
        "over positions (a row with no word gives α = 0, not NaN), then z = Σ_t α_t x_t",
    )


def leave_one_out(fn: Callable) -> bool:
    """Check ``fn(model, input_ids, attention_mask, target) -> [batch, pos]``: leave-one-out importance
    ``p(target | text) - p(target | text without token t)`` (Chapter 3, ``interpretable_classifier.leave_one_out``).

    Deleting a token removes it from the attention (the other weights renormalise); padding scores 0.

    Args:
        fn: the reader's function of a ``TaskAttentionClassifier``, ``[batch, pos]`` ids and mask, and a
            ``[batch]`` tensor of target classes.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import interpretable_classifier as ic
    >>> leave_one_out(ic.leave_one_out)
    pass
    True
    """
    from helpers.interpretable_classifier import TaskAttentionClassifier
    from helpers.interpretable_classifier import leave_one_out as reference

    g = torch.Generator().manual_seed(0)
    model = TaskAttentionClassifier(torch.rand(6, 4, generator=g).numpy(), 3, tau=0.5)
    with torch.no_grad():
        model.query.copy_(torch.randn(4, generator=g))
        model.linear.weight.copy_(3 * torch.randn(3, 4, generator=g))
        model.linear.bias.copy_(torch.randn(3, generator=g))
    cases = [  # (name, input_ids, attention_mask, target)
        ("one word (deleting it leaves the bias)", torch.tensor([[3]]), torch.tensor([[1]]), torch.tensor([0])),
        ("the same word twice", torch.tensor([[2, 2]]), torch.tensor([[1, 1]]), torch.tensor([1])),
        ("a target that is not the prediction", torch.tensor([[1, 4, 6]]), torch.tensor([[1, 1, 1]]), None),
        (
            "random batch with padding",
            torch.randint(1, 7, (3, 5), generator=g),
            torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]),
            torch.tensor([0, 1, 2]),
        ),
    ]
    failures = []
    for name, ids, mask, target in cases:
        if target is None:  # the class the model finds least likely
            target = model.predict_proba(ids, mask).argmin(1)
        got = _call(failures, name, fn, model, ids.clone(), mask.clone(), target.clone(), no_grad=True)
        if got is _RAISED:
            continue
        want = reference(model, ids, mask, target)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got.detach().float(), want, atol=1e-5):
            failures.append(
                f"{name}: expected {want.double().numpy().round(3).tolist()}, "
                f"got {got.detach().double().numpy().round(3).tolist()}"
            )
    return _report(
        failures,
        "for each real position t, set attention_mask[:, t] = 0 and take p(target) from "
        "model.predict_proba (probabilities of the given target, not logits nor the predicted "
        "class); the importance is full minus deleted, and 0 on padding",
    )


def attention_entropy(fn: Callable) -> bool:
    """Check ``fn(attn, mask) -> [layer, batch, head]``: each head's mean row entropy with Clark's smoothing
    (Chapter 4, eq. ch4-entropy, ``heads.attention_entropy``).

    Each row is smoothed over the sentence's ``n`` real keys as ``(1 - 1e-4) a + 1e-4 / n``, its entropy
    (natural log) taken, and the entropies averaged over the ``n`` real queries.

    Args:
        fn: the reader's function of ``attn`` ``[layer, batch, head, query, key]`` (padding zeroed) and
            ``mask`` ``[batch, pos]`` bool.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import heads
    >>> attention_entropy(heads.attention_entropy)
    pass
    True
    """
    from helpers.heads import attention_entropy as reference

    def padded(attn, lengths):  # zero the padding of random attention, rows re-normalised over real keys
        real = torch.arange(attn.shape[-1])[None, :] < torch.tensor(lengths)[:, None]  # [batch, pos]
        keep = (real[:, :, None] & real[:, None, :])[None, :, None].float()
        attn = attn * keep
        return attn / attn.sum(-1, keepdim=True).clamp_min(1e-12), real

    g = torch.Generator().manual_seed(0)
    uniform = torch.full((1, 1, 1, 4, 4), 0.25)
    onehot = torch.eye(3)[None, None, None]
    rand_attn, rand_mask = padded(torch.rand(2, 3, 2, 6, 6, generator=g), [6, 4, 2])
    cases = [  # (name, attn, mask)
        ("uniform over 4 tokens (entropy log 4)", uniform, torch.ones(1, 4, dtype=torch.bool)),
        ("one-hot rows (entropy near 0, needs the smoothing)", onehot, torch.ones(1, 3, dtype=torch.bool)),
        (
            "uniform over 2 real tokens out of 4 (padding)",
            padded(torch.ones(1, 1, 1, 4, 4), [2])[0],
            torch.tensor([[True, True, False, False]]),
        ),
        ("random batch of lengths 6, 4, 2", rand_attn, rand_mask),
    ]
    failures = []
    for name, attn, mask in cases:
        got = _call(failures, name, fn, attn.clone(), mask.clone())
        if got is _RAISED:
            continue
        want = reference(attn, mask)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got.float(), want, atol=1e-4):  # NaN (0 * log 0) never passes
            failures.append(
                f"{name}: expected {want.flatten().double().numpy().round(4).tolist()}, "
                f"got {got.flatten().double().numpy().round(4).tolist()}"
            )
    return _report(
        failures,
        "smooth only over the n real keys, (1 - 1e-4) * a + 1e-4 / n on real keys and 0 on "
        "padding, take -Σ p log p with the natural log, and average over the n real queries "
        "(not over the padded width)",
    )


def word_attention(fn: Callable) -> bool:
    """Check ``fn(attn, word_index) -> word attention``: word-piece attention turned into word attention
    (Chapter 4, eq. ch4-words, ``heads.word_attention``).

    Attention *to* a word is the sum over its pieces, attention *from* a word the mean over its pieces.

    Args:
        fn: the reader's function of ``attn`` ``[layer, batch, head, query, key]`` and ``word_index``
            ``[batch, pos]`` (the word of each piece, -1 on padding); it returns
            ``[layer, batch, head, word, word]`` with ``word_index.max() + 1`` words.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import heads
    >>> word_attention(heads.word_attention)
    pass
    True
    """
    from helpers.heads import word_attention as reference

    g = torch.Generator().manual_seed(0)
    rand = torch.rand(2, 2, 3, 6, 6, generator=g)
    index = torch.tensor([[0, 1, 1, 2, 3, 3], [0, 1, 2, 2, 2, -1]])
    rand[:, 1, :, 5] = 0  # padding query and key of sentence 1
    rand[:, 1, :, :, 5] = 0
    rand = rand / rand.sum(-1, keepdim=True).clamp_min(1e-12)
    small = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.4, 0.4], [0.0, 1.0, 0.0]])[None, None, None]
    cases = [  # (name, attn, word_index)
        ("pieces 1 and 2 form word 1", small, torch.tensor([[0, 1, 1]])),
        (
            "one piece per word (nothing changes)",
            torch.rand(1, 1, 2, 3, 3, generator=g).softmax(-1),
            torch.tensor([[0, 1, 2]]),
        ),
        ("random batch with split words and padding", rand, index),
    ]
    failures = []
    for name, attn, word_index in cases:
        got = _call(failures, name, fn, attn.clone(), word_index.clone())
        if got is _RAISED:
            continue
        want = reference(attn, word_index)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got.float(), want, atol=1e-5):
            diff = float((got.float() - want).abs().max())
            failures.append(
                f"{name}: largest difference {diff:.3g} from the reference"
                + (
                    f"; expected {want[0, 0, 0].double().numpy().round(3).tolist()}, got "
                    f"{got[0, 0, 0].double().numpy().round(3).tolist()}"
                    if want.shape[-1] <= 3
                    else ""
                )
            )
    return _report(
        failures,
        "attention *to* a word sums its pieces' columns, attention *from* a word averages its "
        "pieces' rows (so word rows still sum to 1); padding pieces (-1) belong to no word",
    )


def _compare(
    failures: list[str],
    name: str,
    got,
    want: torch.Tensor,
    *,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    show: bool = True,
) -> None:
    """Append to ``failures`` how ``got`` differs from ``want`` (shape, then values); nothing when they match.

    Small results are printed in full, larger ones (or ``show=False``) as their largest difference.
    """
    if not isinstance(got, torch.Tensor):
        try:
            got = torch.as_tensor(got)
        except Exception:  # noqa: BLE001 - anything that is not a tensor-like
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {type(got).__name__}")
            return
    if got.shape != want.shape:
        failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {tuple(got.shape)}")
    elif want.dtype == torch.bool:
        if not torch.equal(got.bool(), want):
            failures.append(f"{name}: expected {want.tolist()}, got {got.tolist()}")
    elif not torch.allclose(got.detach().to(want.dtype), want, atol=atol, rtol=rtol):
        if show and want.numel() <= 12:
            failures.append(
                f"{name}: expected {[round(v, 4) for v in want.flatten().tolist()]}, "
                f"got {[round(v, 4) for v in got.detach().double().flatten().tolist()]}"
            )
        else:
            diff = float((got.detach().to(want.dtype) - want).abs().max())
            failures.append(f"{name}: largest difference {diff:.3g} from the reference")


def _tiny_mlp(d: int, d_mlp: int, seed: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=d, intermediate_size=d_mlp, num_attention_heads=1, num_key_value_heads=1)
    return LlamaMLP(config).eval()


def ffn_coefficients(fn: Callable) -> bool:
    """Check ``fn(mlp, x) -> m``: the memory coefficients of a gated feed-forward layer (Chapter 5).

    ``m = silu(gate_proj(x)) * up_proj(x)``, one coefficient per memory, so that ``mlp(x) = down_proj(m)``
    (``ffn.coefficients``).

    Args:
        fn: the reader's function of a ``LlamaMLP`` and its input ``[..., d]``, returning ``[..., d_mlp]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> ffn_coefficients(lambda mlp, x: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    pass
    True
    """
    from helpers.ffn import coefficients as reference

    hand = _tiny_mlp(2, 2, 0)
    with torch.no_grad():  # gate reads x as it is, up swaps its two entries: hand-computable
        hand.gate_proj.weight.copy_(torch.eye(2))
        hand.up_proj.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    rand = _tiny_mlp(8, 16, 1)
    cases = [  # (name, mlp, x)
        ("hand-made layer, x = [1, -2]", hand, torch.tensor([[1.0, -2.0]])),
        ("hand-made layer, x = [0, 3]", hand, torch.tensor([[0.0, 3.0]])),
        ("random layer, x [2, 3, 8]", rand, torch.randn(2, 3, 8, generator=g)),
    ]
    failures = []
    for name, mlp, x in cases:
        got = _call(failures, name, fn, mlp, x.clone(), no_grad=True)
        if got is _RAISED:
            continue
        with torch.no_grad():
            want = reference(mlp, x)
        _compare(failures, name, got, want)
    return _report(
        failures,
        "m = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x): the SiLU goes on the gate only, "
        "the product is element-wise, and you stop before down_proj (m has d_mlp entries)",
    )


def value_logits(fn: Callable) -> bool:
    """Check ``fn(model, layer, dims) -> logits``: values of a layer's memories read in the vocabulary (Chapter 5).

    Value ``i`` is column ``i`` of the layer's ``down_proj``; it reaches the logits through the final
    RMSNorm's gain and the unembedding, ``E (gamma * v_i)`` (``ffn.value_logits``).

    Args:
        fn: the reader's function of a Llama-style model, a layer index and a list of memory indices,
            returning ``[len(dims), vocab]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> value_logits(lambda model, layer, dims: (model.model.layers[layer].mlp.down_proj.weight[:, dims].T
    ...                                          * model.model.norm.weight) @ model.lm_head.weight.T)
    pass
    True
    """
    from helpers.ffn import value_logits as reference

    model = _tiny_llama()
    cases = [
        ("layer 0, memories [0, 5]", 0, [0, 5]),
        ("layer 1, memory [31]", 1, [31]),
        ("layer 1, every memory", 1, list(range(32))),
    ]
    failures = []
    for name, layer, dims in cases:
        got = _call(failures, name, fn, model, layer, list(dims), no_grad=True)
        if got is _RAISED:
            continue
        want = reference(model, layer=layer, dims=dims)
        _compare(failures, name, got, want, atol=1e-4, rtol=1e-4, show=False)
    return _report(
        failures,
        "a value is a column of down_proj.weight ([d, d_mlp], so weight[:, dims].T); multiply "
        "it by the final norm's gain (model.model.norm.weight), not by a whole RMSNorm, then by "
        "the unembedding (model.lm_head.weight.T)",
    )


def term_importance(fn: Callable) -> bool:
    """Check ``fn(terms) -> shares``: each term's share ``<e, t> / ||e||^2`` of the hidden state (Chapter 6).

    ``terms`` is ``[..., term, batch, pos, d]`` and ``e`` their sum over the term axis (``dissect.importance``).

    Args:
        fn: the reader's function, returning ``[..., term, batch, pos]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> def shares(terms):
    ...     e = terms.sum(-4, keepdim=True)
    ...     return (terms * e).sum(-1) / (e * e).sum(-1)
    >>> term_importance(shares)
    pass
    True
    """
    from helpers.dissect import importance as reference

    g = torch.Generator().manual_seed(0)
    cases = [  # (name, terms)
        ("two terms, one token: [1, 0] and [1, 2]", torch.tensor([[[[1.0, 0.0]]], [[[1.0, 2.0]]]])),
        ("a term pointing away: [2, 0] and [-1, 0]", torch.tensor([[[[2.0, 0.0]]], [[[-1.0, 0.0]]]])),
        ("orthogonal terms [3, 0] and [0, 4]", torch.tensor([[[[3.0, 0.0]]], [[[0.0, 4.0]]]])),
        ("random [term 4, batch 2, pos 3, d 5]", torch.randn(4, 2, 3, 5, generator=g)),
        ("random with a layer axis [3, 4, 2, 3, 5]", torch.randn(3, 4, 2, 3, 5, generator=g)),
    ]
    failures = []
    for name, terms in cases:
        got = _call(failures, name, fn, terms.clone())
        if got is _RAISED:
            continue
        _compare(failures, name, got, reference(terms), show=terms.numel() <= 8)
    return _report(
        failures,
        "sum the terms over the term axis (dim -4, so that a leading layer axis works) to get e, "
        "then divide <e, t> by ||e||^2 (not by ||e|| ||t||, a cosine): the shares add up to 1 "
        "and a term pointing away from e gets a negative share",
    )


def push_layer_norm_mickus(fn: Callable) -> bool:
    """Check ``fn(terms, ln) -> terms``: additive terms sent through a LayerNorm in the paper's split (Chapter 6).

    With ``z`` the sum of the terms and ``sigma = sqrt(Var(z) + eps)`` held fixed, term ``k`` becomes
    ``gamma * t_k / sigma`` (uncentred), and the last term (the correction term) also receives the whole
    mean correction ``-gamma * mean(z) / sigma`` and ``beta``, so that the new terms add up to ``ln(z)``
    (``dissect.push_layer_norm`` with ``convention="mickus"``, Mickus et al. 2022).

    Args:
        fn: the reader's function of ``[term, batch, pos, d]`` terms and an ``nn.LayerNorm``,
            returning ``[term, batch, pos, d]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> def push(terms, ln):
    ...     z = terms.sum(0)
    ...     sigma = torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + ln.eps)
    ...     out = ln.weight * terms / sigma
    ...     out[-1] = out[-1] - ln.weight * z.mean(-1, keepdim=True) / sigma + ln.bias
    ...     return out
    >>> push_layer_norm_mickus(push)
    pass
    True
    """
    from helpers.dissect import push_layer_norm as reference

    g = torch.Generator().manual_seed(0)
    plain = torch.nn.LayerNorm(4).double()  # gamma = 1, beta = 0
    shifted = torch.nn.LayerNorm(4).double()
    learned = torch.nn.LayerNorm(6).double()
    with torch.no_grad():
        shifted.bias.copy_(torch.tensor([1.0, -1.0, 0.5, 2.0]))
        learned.weight.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
        learned.bias.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    cases = [  # (name, terms, ln)
        (
            "two terms, plain LayerNorm",
            torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]], [[[0.0, 2.0, 3.0, 6.0]]]], dtype=torch.float64),
            plain,
        ),
        (
            "two terms, beta = [1, -1, 0.5, 2]",
            torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]], [[[0.0, 2.0, 3.0, 6.0]]]], dtype=torch.float64),
            shifted,
        ),
        (
            "four random terms [4, 2, 3, 6], learned gamma and beta",
            torch.randn(4, 2, 3, 6, generator=g, dtype=torch.float64) + torch.arange(4.0).double().reshape(4, 1, 1, 1),
            learned,
        ),
    ]
    failures = []
    for name, terms, ln in cases:
        got = _call(failures, name, fn, terms.clone(), ln, no_grad=True)
        if got is _RAISED:
            continue
        with torch.no_grad():
            want = reference(terms, ln, convention="mickus")
            whole = ln(terms.sum(0))
        if (
            isinstance(got, torch.Tensor)
            and got.shape == want.shape
            and not torch.allclose(got.double(), want, atol=1e-6)
        ):
            if torch.allclose(got.double().sum(0), whole, atol=1e-6):
                failures.append(
                    f"{name}: your terms add up to ln(terms.sum(0)) but are shared out differently "
                    f"(largest difference {float((got.double() - want).abs().max()):.3g} per term)"
                )
            else:
                failures.append(
                    f"{name}: your terms do not add up to ln(terms.sum(0)) (largest difference "
                    f"{float((got.double().sum(0) - whole).abs().max()):.3g})"
                )
            continue
        _compare(failures, name, got, want, atol=1e-6, show=False)
    return _report(
        failures,
        "hold the sigma of the whole sum fixed (z = terms.sum(0); sigma = sqrt(z.var(-1, "
        "unbiased=False) + ln.eps)), multiply every uncentred term by ln.weight / sigma, and "
        "give the last term alone the mean correction -ln.weight * z.mean(-1) / sigma and "
        "ln.bias (centring each term on its own is the other, centred split)",
    )


def fvu(fn: Callable) -> bool:
    """Check ``fn(x, x_hat) -> float``: the fraction of variance unexplained of a reconstruction (Chapter 6c).

    ``sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2`` over the tokens of ``[token, d]`` activations
    (``dictionaries.fvu``).

    Args:
        fn: the reader's function of two ``[token, d]`` tensors, returning a number (or 0-d tensor).

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> fvu(lambda x, x_hat: (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    pass
    True
    """
    from helpers.dictionaries import fvu as reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=g) * torch.linspace(0.5, 3, 8) + 5
    cases = [  # (name, x, x_hat)
        ("zero reconstruction of centred x", torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.zeros(2, 2)),
        ("perfect reconstruction", torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]])),
        (
            "x far from 0: [[11, 0], [9, 0]] reconstructed as [[10, 0], [10, 0]]",
            torch.tensor([[11.0, 0.0], [9.0, 0.0]]),
            torch.tensor([[10.0, 0.0], [10.0, 0.0]]),
        ),
        ("random x with a mean of 5, noisy reconstruction", x, x + 0.7 * torch.randn(50, 8, generator=g)),
        ("random x, one token badly reconstructed", x, torch.cat([x[:1] * 0, x[1:]])),
    ]
    failures = []
    for name, a, b in cases:
        got = _call(failures, name, fn, a.clone(), b.clone())
        if got is _RAISED:
            continue
        try:
            got = float(got)
        except Exception:  # noqa: BLE001 - None, a tensor of several values, ...
            failures.append(f"{name}: expected one number, got {type(got).__name__} {getattr(got, 'shape', '')}")
            continue
        want = float(reference(a, b))
        if abs(got - want) > 1e-5 * max(1.0, abs(want)):
            failures.append(f"{name}: expected {want:.4g}, got {got:.4g}")
    return _report(
        failures,
        "divide the summed squared error by the summed squared distance of x to its mean "
        "over tokens, x.mean(0) (not by ||x||^2, which is huge when the activations have a "
        "large mean); take the ratio of the two sums, not the mean of per-token ratios",
    )


def rationale_mask(fn: Callable) -> bool:
    """Check ``fn(attributions, candidates, fraction) -> mask``: the top tokens of an attribution (Chapter 7).

    Of each sequence's ``n`` candidate tokens keep the ``ceil(fraction * n)`` (at least 1) with the highest
    attribution, ties broken by position (``evaluation.rationale_mask``).

    Args:
        fn: the reader's function of ``[batch, pos]`` scores, a ``[batch, pos]`` bool mask and a float in
            (0, 1], returning a ``[batch, pos]`` bool mask.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import evaluation
    >>> rationale_mask(evaluation.rationale_mask)
    pass
    True
    """
    from helpers.evaluation import rationale_mask as reference

    g = torch.Generator().manual_seed(0)
    t, f = True, False
    pad = torch.tensor([[t, t, t, t, t, t], [t, t, t, f, f, f]])
    cases = [  # (name, attributions, candidates, fraction)
        ("one sequence, half of 4 tokens", torch.tensor([[0.1, 0.9, 0.5, 0.2]]), torch.tensor([[t, t, t, t]]), 0.5),
        (
            "[CLS] and [SEP] are not candidates",
            torch.tensor([[5.0, 0.1, 0.9, 0.5, 4.0]]),
            torch.tensor([[f, t, t, t, f]]),
            0.5,
        ),
        (
            "fraction 0.2 of 3 candidates rounds up to 1 token",
            torch.tensor([[0.3, 0.1, 0.2]]),
            torch.tensor([[t, t, t]]),
            0.2,
        ),
        ("ties: the first positions win", torch.tensor([[1.0, 1.0, 1.0, 1.0]]), torch.tensor([[t, t, t, t]]), 0.5),
        ("two sequences of 6 and 3 candidates, fraction 0.5", torch.randn(2, 6, generator=g), pad, 0.5),
        (
            "random batch [4, 10], fraction 0.3",
            torch.randn(4, 10, generator=g),
            torch.rand(4, 10, generator=g) > 0.3,
            0.3,
        ),
    ]
    failures = []
    for name, scores, cand, fraction in cases:
        got = _call(failures, name, fn, scores.clone(), cand.clone(), fraction)
        if got is _RAISED:
            continue
        _compare(failures, name, got, reference(scores, cand, fraction))
    return _report(
        failures,
        "count the candidates of each sequence (candidates.sum(1)), keep k = ceil(fraction * n) "
        "of them (at least 1), rank only candidates (set the others' scores to -inf), and sort "
        "with argsort(descending=True, stable=True) so that ties keep the first positions",
    )


def _bag_of_words():
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0, 0.5, -2.0, 1.5])  # token 0 is [PAD]

    def predict(ids, am):  # p(class 1) = sigmoid(sum of the word weights), a 2-class bag of words
        s = (w[ids] * am).sum(1)
        return torch.stack([1 - s.sigmoid(), s.sigmoid()], 1)

    return w, predict


def comprehensiveness(fn: Callable) -> bool:
    """Check ``fn(predict, input_ids, attention_mask, attributions, target, fraction) -> [batch]`` (Chapter 7).

    ERASER comprehensiveness: the drop ``p(x)_c - p(x without r)_c`` of the target class's probability when
    the rationale ``r`` (the top ``fraction`` of real tokens by attribution) is deleted
    (``evaluation.comprehensiveness``).

    Args:
        fn: the reader's function; ``predict(input_ids, attention_mask)`` returns ``[batch, class]``
            probabilities, ``target`` is a ``[batch]`` tensor of classes.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import evaluation
    >>> comprehensiveness(lambda predict, ids, am, a, target, fraction: evaluation.comprehensiveness(
    ...     predict, ids, am, a, target=target, fraction=fraction))
    pass
    True
    """
    from helpers.evaluation import comprehensiveness as reference

    w, predict = _bag_of_words()
    g = torch.Generator().manual_seed(0)
    ids_r = torch.randint(1, 8, (5, 7), generator=g)
    am_r = torch.ones(5, 7, dtype=torch.long)
    am_r[1, 4:] = 0
    am_r[3, 2:] = 0
    ids_r = ids_r * am_r
    cases = [  # (name, input_ids, attention_mask, attributions, target, fraction)
        (
            "tokens [3, 1, 5], fraction 0.3 deletes token 3",
            torch.tensor([[3, 1, 5]]),
            torch.ones(1, 3, dtype=torch.long),
            w[torch.tensor([[3, 1, 5]])],
            torch.tensor([1]),
            0.3,
        ),
        (
            "same passage, target class 0",
            torch.tensor([[3, 1, 5]]),
            torch.ones(1, 3, dtype=torch.long),
            -w[torch.tensor([[3, 1, 5]])],
            torch.tensor([0]),
            0.3,
        ),
        (
            "a padded sequence: padding is never deleted",
            torch.tensor([[5, 2, 0, 0]]),
            torch.tensor([[1, 1, 0, 0]]),
            torch.tensor([[0.1, 0.2, 9.0, 9.0]]),
            torch.tensor([1]),
            0.5,
        ),
        (
            "random batch [5, 7] with padding, fraction 0.4",
            ids_r,
            am_r,
            torch.randn(5, 7, generator=g),
            torch.randint(0, 2, (5,), generator=g),
            0.4,
        ),
    ]
    failures = []
    for name, ids, am, attr, target, fraction in cases:
        got = _call(failures, name, fn, predict, ids.clone(), am.clone(), attr.clone(), target.clone(), fraction)
        if got is _RAISED:
            continue
        want = reference(predict, ids, am, attr, target=target, fraction=fraction)
        _compare(failures, name, got, want)
    return _report(
        failures,
        "compute p = predict(ids, am) on the full passage, build the rationale with "
        "evaluation.rationale_mask(attributions, am.bool(), fraction), delete it with "
        "evaluation.delete_tokens(ids, am, rationale), and return p[target] minus the "
        "probability of the same class on what is left (deleting the rationale, not keeping it)",
    )


def deletion_curve(fn: Callable) -> bool:
    """Check ``fn(predict, images, saliency, target, steps) -> [batch, steps + 1]``: a deletion curve (Chapter 8).

    Delete pixels (all channels together, set to 0), most salient first, in ``steps`` equal steps of
    ``round(i * n_pixels / steps)`` pixels, and record the target class's probability after each step,
    starting with the intact image (``vision.perturbation_curve`` with ``mode="deletion"``, canvas 0).

    Args:
        fn: the reader's function; ``predict(images)`` returns ``[n, class]`` probabilities, ``images`` is
            ``[batch, C, H, W]``, ``saliency`` ``[batch, H, W]``, ``target`` a ``[batch]`` tensor of classes.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import vision
    >>> deletion_curve(lambda predict, images, saliency, target, steps: vision.perturbation_curve(
    ...     predict, images, saliency, target=target, steps=steps))
    pass
    True
    """
    from helpers.vision import perturbation_curve as reference

    def share(images):  # p(class 0) = sum of the pixels / 10, a hand-computable "model"
        s = images.flatten(1).sum(1) / 10
        return torch.stack([s, 1 - s], 1)

    g = torch.Generator().manual_seed(0)
    weights = torch.randn(2 * 4 * 4, 3, generator=g)

    def linear(images):  # a random linear classifier of [n, 2, 4, 4] images
        return (images.flatten(1) @ weights).softmax(-1)

    square = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    images = torch.rand(3, 2, 4, 4, generator=g)
    cases = [  # (name, predict, images, saliency, target, steps)
        ("pixels [[1, 2], [3, 4]], saliency = pixel, 4 steps", share, square, square[:, 0], torch.tensor([0]), 4),
        (
            "same image, saliency favours the dark pixel",
            share,
            square,
            torch.tensor([[[9.0, 0.0], [1.0, 2.0]]]),
            torch.tensor([0]),
            4,
        ),
        ("4 pixels in 3 steps (round the counts)", share, square, square[:, 0], torch.tensor([0]), 3),
        (
            "random 2-channel images [3, 2, 4, 4], 8 steps",
            linear,
            images,
            torch.randn(3, 4, 4, generator=g),
            torch.tensor([0, 1, 2]),
            8,
        ),
    ]
    failures = []
    for name, predict, x, sal, target, steps in cases:
        got = _call(failures, name, fn, predict, x.clone(), sal.clone(), target.clone(), steps, no_grad=True)
        if got is _RAISED:
            continue
        want = reference(predict, x, sal, target=target, steps=steps)
        _compare(failures, name, got, want, atol=1e-5)
    return _report(
        failures,
        "sort each image's pixels by saliency, highest first (argsort(descending=True, "
        "stable=True)); at step i set the first round(i * n_pixels / steps) of them to 0 in "
        "every channel, and read predict(...)[b, target[b]]; the curve starts with the intact "
        "image (step 0) and has steps + 1 points",
    )


def map_rank_correlation(fn: Callable) -> bool:
    """Check ``fn(a, b) -> [batch]``: the Spearman rank correlation of two batches of maps (Chapter 8).

    Rank the entries of each map (ties get their average rank), then take the Pearson correlation of
    the ranks, one number per image (``stats.rank_correlations``).

    Args:
        fn: the reader's function of two ``[batch, ...]`` tensors of the same shape, returning ``[batch]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import stats
    >>> map_rank_correlation(lambda a, b: torch.from_numpy(stats.rank_correlations(a, b)))
    pass
    True
    """
    from helpers.stats import rank_correlations

    def reference(a, b):
        return torch.from_numpy(rank_correlations(a.numpy(), b.numpy()))

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 4, generator=g)
    cases = [  # (name, a, b)
        ("identical maps", a[:1], a[:1].clone()),
        ("reversed order", torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([[8.0, 6.0, 4.0, 2.0]])),
        (
            "b = a cubed (same order, not linear)",
            torch.tensor([[0.1, 0.5, 2.0, 3.0, 10.0]]),
            torch.tensor([[0.1, 0.5, 2.0, 3.0, 10.0]]) ** 3,
        ),
        ("ties get their average rank", torch.tensor([[1.0, 1.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0, 4.0]])),
        ("random batch of 3 maps [4, 4]", a, a + torch.randn(3, 4, 4, generator=g)),
    ]
    failures = []
    for name, x, y in cases:
        got = _call(failures, name, fn, x.clone(), y.clone())
        if got is _RAISED:
            continue
        _compare(failures, name, got, reference(x, y).double())
    return _report(
        failures,
        "correlate ranks, not values: rank the entries of each flattened map "
        "(scipy.stats.rankdata(..., axis=1) gives ties their average rank; a single argsort "
        "gives an order, not ranks), centre the ranks and take the Pearson correlation per map",
    )


def prototype_similarity(fn: Callable) -> bool:
    """Check ``fn(latent, prototypes) -> s``: ProtoPNet's similarity of each prototype to an image (Chapter 9).

    ``latent`` is ``[batch, patch, dim]`` (the add-on layers' output), ``prototypes`` is ``[P, dim]``; ``s``
    is ``[batch, P]``, the log-similarity ``log((d + 1) / (d + eps))`` with ``eps = 1e-4`` of the squared
    distance ``d`` from the prototype to its *closest* patch (``prototypes.log_similarity``).

    >>> import torch
    >>> def reference(z, p):
    ...     d = ((z[:, None] - p[None, :, None]) ** 2).sum(-1).min(-1).values
    ...     return torch.log((d + 1) / (d + 1e-4))
    >>> prototype_similarity(reference)
    pass
    True
    """
    from helpers.prototypes import log_similarity

    g = torch.Generator().manual_seed(0)
    z_one = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]]])  # 1 image, 3 patches, dim 2
    cases = [  # (name, latent, prototypes)
        ("a prototype on a patch (d = 0)", z_one, torch.tensor([[1.0, 1.0]])),
        ("a prototype between patches", z_one, torch.tensor([[2.0, 0.0], [0.0, 2.0]])),
        ("random batch", torch.rand(4, 16, 8, generator=g), torch.rand(5, 8, generator=g)),
    ]
    failures = []
    for name, z, p in cases:
        want = log_similarity(((z[:, None] - p[None, :, None]) ** 2).sum(-1).min(-1).values)
        got = _call(failures, name, fn, z.clone(), p.clone(), no_grad=True)
        if got is _RAISED:
            continue
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(
                f"{name}: expected a tensor of shape {tuple(want.shape)} [batch, P], got {getattr(got, 'shape', got)}"
            )
        elif not torch.allclose(got.float(), want, atol=1e-3, rtol=1e-4):
            failures.append(f"{name}: expected {want.flatten()[:3].tolist()}, got {got.flatten()[:3].tolist()}")
    return _report(
        failures,
        "take the squared L2 distance to every patch, keep the closest patch (min over "
        "patches, before the log), then log((d + 1) / (d + 1e-4))",
    )


def hit_rate_ndcg(fn: Callable) -> bool:
    """Check ``fn(scores, targets, k) -> (hr, ndcg)``: HitRate@k and NDCG@k of one held-out item per row (Chapter 9).

    ``scores`` is ``[users, items]``, ``targets`` ``[users]``; a target's rank counts the items scored
    strictly higher plus its ties (ties count against it); ``ndcg = mean 1[rank < k] / log2(rank + 2)``
    with 0-based ranks (``prototypes.hit_rate_ndcg``).

    >>> from helpers import prototypes
    >>> hit_rate_ndcg(lambda s, t, k: prototypes.hit_rate_ndcg(s, t, k=k))
    pass
    True
    """
    from helpers.prototypes import hit_rate_ndcg as reference

    g = torch.Generator().manual_seed(0)
    cases = [  # (name, scores, targets, k)
        ("target ranked first", torch.tensor([[0.1, 0.9, 0.3]]), torch.tensor([1]), 1),
        ("target ranked second, k = 2", torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([2]), 2),
        ("target just outside the top k", torch.tensor([[0.9, 0.1, 0.5]]), torch.tensor([2]), 1),
        ("a tie with the target", torch.tensor([[0.5, 0.5, 0.1]]), torch.tensor([1]), 1),
        ("random batch, k = 10", torch.randn(50, 40, generator=g), torch.randint(0, 40, (50,), generator=g), 10),
    ]
    failures = []
    for name, s, t, k in cases:
        want = reference(s, t, k=k)
        try:
            got = fn(s.clone(), t.clone(), k)
            got = (float(got[0]), float(got[1]))
        except Exception as err:  # noqa: BLE001
            failures.append(
                f"{name}: your function raised or returned something else than (hr, ndcg): {type(err).__name__}: {err}"
            )
            continue
        if abs(got[0] - want[0]) > 1e-6 or abs(got[1] - want[1]) > 1e-6:
            failures.append(
                f"{name}: expected (hr, ndcg) = ({want[0]:.4f}, {want[1]:.4f}), got ({got[0]:.4f}, {got[1]:.4f})"
            )
    return _report(
        failures,
        "rank = number of items scored higher than the target plus its ties (0-based); "
        "a hit is rank < k; the discount is 1 / log2(rank + 2), so the first place counts 1",
    )


def contrastive_loss(fn: Callable) -> bool:
    """Check ``fn(image_emb, text_emb, logit_scale) -> loss``: CLIP's symmetric InfoNCE (Chapter 10).

    Row ``i`` of ``image_emb`` and of ``text_emb`` (both ``[batch, d]``, L2-normalised) is a matching pair;
    the loss averages the cross-entropy of the image→text logits and of the text→image logits
    (``clip.contrastive_loss``).

    Args:
        fn: the reader's function of two ``[batch, d]`` tensors and a float, returning a scalar.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import clip
    >>> contrastive_loss(clip.contrastive_loss)
    pass
    True
    """
    import math

    from torch.nn import functional as F

    from helpers.clip import contrastive_loss as reference

    g = torch.Generator().manual_seed(0)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)

    e2 = torch.eye(2)
    cases = [  # (name, image_emb, text_emb, logit_scale, hand-computed answer or None)
        ("two orthogonal pairs, scale 1", e2, e2, 1.0, math.log(1 + math.exp(-1))),
        ("two swapped pairs, scale 1", e2, e2[[1, 0]], 1.0, math.log(1 + math.exp(1))),
        ("random batch of 6, d = 8, scale 10 (image→text differs from text→image)", unit(6, 8), unit(6, 8), 10.0, None),
        ("random batch of 3, d = 16, scale 2.5", unit(3, 16), unit(3, 16), 2.5, None),
    ]
    failures = []
    for name, img, txt, scale, hand in cases:
        want = float(reference(img, txt, scale)) if hand is None else hand
        try:
            got = fn(img.clone(), txt.clone(), scale)
            got = float(torch.as_tensor(got).detach().reshape(()))
        except Exception as err:  # noqa: BLE001 - the reader's code may raise anything
            failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
            continue
        if not abs(got - want) <= 1e-4 * max(1.0, abs(want)):
            failures.append(f"{name}: expected {want:.5f}, got {got:.5f}")
    return _report(
        failures,
        "logits = logit_scale * image_emb @ text_emb.T; the target of row i is i; average the "
        "cross-entropy over the rows (image→text) and over the columns (text→image, "
        "logits.T): (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2",
    )


def choquet_integral(fn: Callable) -> bool:
    """Check ``fn(x, mu) -> float``: the discrete Choquet integral of ``x`` w.r.t. a capacity (Chapter 10).

    ``x`` is a numpy array ``[n]``, ``mu`` a numpy array ``[2**n]`` indexed by bit mask (criterion ``i`` is in
    the set ``s`` when bit ``i`` of ``s`` is set), with ``mu[0] = 0`` and ``mu[-1] = 1``
    (``choquet.choquet_integral``).

    Args:
        fn: the reader's function of two numpy arrays, returning a number.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import choquet
    >>> choquet_integral(choquet.choquet_integral)
    pass
    True
    """
    import numpy as np

    from helpers.choquet import capacity_from_mobius
    from helpers.choquet import choquet_integral as reference

    rng = np.random.default_rng(0)

    def random_capacity(n):  # non-negative Möbius masses give a monotone capacity
        m = np.concatenate([[0.0], rng.random(2**n - 1)])
        mu = capacity_from_mobius(m)
        return mu / mu[-1]

    cases = [  # (name, x, mu, hand-computed answer or None)
        ("mu = 1 only on {0, 1}: the minimum", [0.2, 0.8], [0, 0, 0, 1], 0.2),
        ("mu = 1 on every non-empty set: the maximum", [0.2, 0.8], [0, 1, 1, 1], 0.8),
        ("additive mu({0}) = 0.3, mu({1}) = 0.7: a weighted mean", [0.4, 0.9], [0, 0.3, 0.7, 1], 0.75),
        ("x[1] < x[0], mu({0}) = 0.6, mu({1}) = 0.1", [1.0, 0.5], [0, 0.6, 0.1, 1], 0.5 + 0.5 * 0.6),
        ("3 criteria, random capacity", rng.random(3), random_capacity(3), None),
        ("4 criteria, random capacity and negative x", rng.normal(size=4), random_capacity(4), None),
    ]
    failures = []
    for name, x, mu, hand in cases:
        x, mu = np.asarray(x, dtype=float), np.asarray(mu, dtype=float)
        want = reference(x, mu) if hand is None else hand
        got = _call(
            failures, name, fn, x.copy(), mu.copy(), post=lambda r: float(np.asarray(r, dtype=float).reshape(()))
        )
        if got is _RAISED:
            continue
        if not abs(got - want) <= 1e-6:
            failures.append(f"{name}: expected {want:.4f}, got {got:.4f}")
    return _report(
        failures,
        "sort x increasingly; the step from the previous value to x_(k) is weighted by mu of "
        "the criteria whose value is at least x_(k) (those not passed yet, bit mask of "
        "{(k), ..., (n)}), starting from 0: sum_k (x_(k) - x_(k-1)) mu(A_(k))",
    )


def concept_auc(fn: Callable) -> bool:
    """Check ``fn(scores, positives) -> [K]``: each concept's ROC AUC, ties one half (Chapter 11).

    ``scores`` is a numpy array ``[N, K]`` (images × concepts), ``positives`` a bool array of the same shape;
    the answer is the probability that a positive image outscores a negative one, column by column, and
    ``nan`` for a column with no positive or no negative image (``rare.concept_auc``).

    Args:
        fn: the reader's function of two ``[N, K]`` arrays, returning ``[K]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import rare
    >>> concept_auc(rare.concept_auc)
    pass
    True
    """
    import numpy as np

    from helpers.rare import concept_auc as reference

    rng = np.random.default_rng(0)
    random_scores = rng.normal(size=(40, 4))
    cases = [  # (name, scores, positives)
        ("one concept, 4 images", [[0.1], [0.4], [0.35], [0.8]], [[0], [0], [1], [1]]),
        ("perfect and reversed concepts", [[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]], [[1, 1], [1, 1], [0, 0]]),
        ("ties count one half", [[0.5], [0.5], [0.5], [0.9]], [[1], [0], [0], [1]]),
        ("a concept with no positive image (nan)", [[0.3, 0.1], [0.6, 0.2], [0.1, 0.4]], [[1, 0], [0, 0], [0, 0]]),
        ("random 40 images x 4 concepts", random_scores, random_scores + rng.normal(size=(40, 4)) > 0.5),
        ("random scores rounded to 1 decimal (many ties)", random_scores.round(1), rng.random((40, 4)) < 0.3),
    ]
    failures = []
    for name, s, p in cases:
        s, p = np.asarray(s, dtype=float), np.asarray(p, dtype=bool)
        want = reference(s, p)
        got = _call(failures, name, fn, s.copy(), p.copy(), post=lambda r: np.asarray(r, dtype=float))
        if got is _RAISED:
            continue
        if got.shape != want.shape:
            failures.append(f"{name}: expected shape {want.shape} (one AUC per concept), got {got.shape}")
        elif not np.allclose(got, want, atol=1e-6, equal_nan=True):
            failures.append(f"{name}: expected {want.round(4).tolist()}, got {got.round(4).tolist()}")
    return _report(
        failures,
        "for each column, AUC = (sum of the positives' ranks - n_pos (n_pos + 1) / 2) / "
        "(n_pos n_neg) with *average* ranks for ties (scipy.stats.rankdata(scores, axis=0)); "
        "nan where n_pos or n_neg is 0",
    )


def within_class_auc(fn: Callable) -> bool:
    """Check ``fn(scores, positives, labels) -> [K]``: concept AUC inside each class, averaged (Chapter 11).

    ``scores`` and ``positives`` are ``[N, K]`` numpy arrays, ``labels`` ``[N]``; for each concept, the AUC
    is computed among the images of one class at a time and averaged over the classes where it is defined
    (both positive and negative images); ``nan`` where no class qualifies (``rare.within_class_auc``).

    Args:
        fn: the reader's function of three arrays, returning ``[K]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import rare
    >>> within_class_auc(rare.within_class_auc)
    pass
    True
    """
    import numpy as np

    from helpers.rare import within_class_auc as reference

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    truth = rng.random((60, 3)) < 0.4
    class_detector = np.stack([labels == 1] * 3, 1).astype(float) + 0.01 * rng.normal(size=(60, 3))
    cases = [  # (name, scores, positives, labels)
        (
            "two classes, right in class 0 and wrong in class 1",
            [[0.9], [0.1], [0.2], [0.8]],
            [[1], [0], [1], [0]],
            [0, 0, 1, 1],
        ),
        (
            "a class detector: the positives score high because they are in class 1",
            [[0.8], [0.9], [0.85], [0.1], [0.2]],
            [[1], [0], [1], [0], [0]],
            [1, 1, 1, 0, 0],
        ),
        (
            "class 1 has only positives (left out of the mean)",
            [[0.9], [0.1], [0.3], [0.4]],
            [[1], [0], [1], [1]],
            [0, 0, 1, 1],
        ),
        ("random, 3 classes x 20 images, 3 concepts", rng.normal(size=(60, 3)) + truth, truth, labels),
        ("random class detector (about 0.5 within classes)", class_detector, truth, labels),
    ]
    failures = []
    for name, s, p, y in cases:
        s, p, y = np.asarray(s, dtype=float), np.asarray(p, dtype=bool), np.asarray(y)
        want = reference(s, p, y)
        got = _call(failures, name, fn, s.copy(), p.copy(), y.copy(), post=lambda r: np.asarray(r, dtype=float))
        if got is _RAISED:
            continue
        if got.shape != want.shape:
            failures.append(f"{name}: expected shape {want.shape} (one AUC per concept), got {got.shape}")
        elif not np.allclose(got, want, atol=1e-6, equal_nan=True):
            failures.append(f"{name}: expected {want.round(4).tolist()}, got {got.round(4).tolist()}")
    return _report(
        failures,
        "compute the AUC on the images of each class separately (rare.concept_auc on "
        "scores[labels == c]), then average over the classes where it is not nan (np.nanmean "
        "over classes); an AUC over all images at once rewards telling classes apart",
    )


def stream_metrics(fn: Callable) -> bool:
    """Check ``fn(matrix) -> dict``: Transfer, Avg, Last and forgetting of a task stream (Chapter 12).

    ``matrix[t, j]`` (a numpy array ``[T, T]``) is the accuracy on task ``j`` after training step ``t``; the
    answer is a dict with keys ``"transfer"``, ``"avg"``, ``"last"`` and ``"forgetting"``
    (``continual.stream_metrics``).

    Args:
        fn: the reader's function of a square numpy array, returning a dict of four floats.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import continual
    >>> stream_metrics(continual.stream_metrics)
    pass
    True
    """
    import numpy as np

    from helpers.continual import stream_metrics as reference

    rng = np.random.default_rng(0)
    cases = [  # (name, matrix)
        ("2 tasks [[0.9, 0.2], [0.6, 0.8]]", [[0.9, 0.2], [0.6, 0.8]]),
        ("3 tasks, task 0 peaks after step 1", [[0.5, 0.1, 0.2], [0.8, 0.9, 0.3], [0.6, 0.7, 0.8]]),
        ("3 tasks, no forgetting", [[0.7, 0.3, 0.1], [0.7, 0.8, 0.2], [0.9, 0.8, 0.6]]),
        ("random 5 tasks", rng.random((5, 5))),
    ]
    failures = []
    for name, m in cases:
        m = np.asarray(m, dtype=float)
        want = reference(m)
        try:
            got = fn(m.copy())
            got = {k: float(got[k]) for k in want}
        except Exception as err:  # noqa: BLE001 - the reader's code may raise anything
            failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
            continue
        for k in want:
            if not abs(got[k] - want[k]) <= 1e-6:
                failures.append(f"{name}, {k}: expected {want[k]:.4f}, got {got[k]:.4f}")
    return _report(
        failures,
        "transfer: for each task j >= 1, the mean of column j above the diagonal (rows t < j), "
        "then the mean over tasks; avg: the mean of all entries; last: the mean of the last row; "
        "forgetting: for each task j < T - 1, the best accuracy from step j on (rows j .. T-2) "
        "minus the final one, averaged",
    )


def wise_ft(fn: Callable) -> bool:
    """Check ``fn(zero_shot, fine_tuned, alpha) -> model``: the WiSE-FT weight blend (Chapter 12).

    The answer is a *new* model whose floating-point weights and buffers are
    ``(1 - alpha) * zero_shot + alpha * fine_tuned``; the two input models must not change
    (``continual.wise_ft``).

    Args:
        fn: the reader's function of two ``nn.Module`` of the same architecture and a float in [0, 1].

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import continual
    >>> wise_ft(continual.wise_ft)
    pass
    True
    """
    from torch import nn

    from helpers.continual import wise_ft as reference

    def make(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
        model.train()
        with torch.no_grad():
            model(torch.randn(16, 4, generator=torch.Generator().manual_seed(seed)))  # running statistics != 0, 1
        return model.eval()

    zero, tuned = make(0), make(1)
    before = {
        k: v.clone()
        for k, v in {
            **{"z." + k: v for k, v in zero.state_dict().items()},
            **{"f." + k: v for k, v in tuned.state_dict().items()},
        }.items()
    }
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    failures = []
    for alpha in (0.0, 1.0, 0.5, 0.3):
        name = f"alpha = {alpha}"
        want = reference(zero, tuned, alpha)
        try:
            got = fn(zero, tuned, alpha)
            got_state = got.state_dict()
        except Exception as err:  # noqa: BLE001 - the reader's code may raise anything
            failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
            continue
        if got is zero or got is tuned:
            failures.append(f"{name}: you returned one of the input models; return a new model (copy.deepcopy)")
        for k, w in want.state_dict().items():
            if not w.is_floating_point():
                continue
            g = got_state.get(k)
            if g is None or g.shape != w.shape:
                failures.append(f"{name}: '{k}' missing or of the wrong shape in your model")
            elif not torch.allclose(g.float(), w, atol=1e-6):
                failures.append(f"{name}: '{k}' differs from the reference by up to {float((g - w).abs().max()):.3g}")
        try:
            with torch.no_grad():
                same_output = torch.allclose(got.eval()(x), want(x), atol=1e-5)
        except Exception as err:  # noqa: BLE001
            failures.append(f"{name}: running your model raised {type(err).__name__}: {err}")
            same_output = True
        if not same_output:
            failures.append(f"{name}: the blended model's outputs differ from the reference's")
        for k, v in {
            **{"z." + k: v for k, v in zero.state_dict().items()},
            **{"f." + k: v for k, v in tuned.state_dict().items()},
        }.items():
            if not torch.equal(v, before[k]):
                failures.append(f"{name}: your function changed the input model's '{k[2:]}' in place")
                break
    return _report(
        failures,
        "start from copy.deepcopy(fine_tuned) and load a state dict in which every floating-point "
        "tensor (weights *and* buffers such as BatchNorm's running_mean) is "
        "(1 - alpha) * zero_shot + alpha * fine_tuned: alpha = 0 gives the zero-shot model",
    )


def nrg(fn: Callable) -> bool:
    """Check ``fn(scores, reference) -> dict``: the normalised relative gain, "headroom" version (Chapter 13).

    ``scores`` maps a representation's name to one accuracy per target (a list of floats in [0, 1]); the
    answer maps each name to a numpy array of ``(s(r) - s(ref)) / (1 - s(ref))``, target by target
    (``transfer.nrg(..., normalisation="headroom")``).

    Args:
        fn: the reader's function of a dict and the reference's name, returning a dict of arrays.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import transfer
    >>> nrg(lambda scores, reference: transfer.nrg(scores, reference=reference))
    pass
    True
    """
    import numpy as np

    from helpers.transfer import nrg as reference_nrg

    rng = np.random.default_rng(0)
    random_scores = {name: (0.5 + 0.45 * rng.random(5)).tolist() for name in ("S", "G", "S+G", "MT")}
    cases = [  # (name, scores, reference)
        ("S [0.8, 0.5] vs M [0.9, 0.6]", {"S": [0.8, 0.5], "M": [0.9, 0.6]}, "S"),
        ("a representation worse than the reference", {"S": [0.6, 0.9], "W": [0.4, 0.8]}, "S"),
        ("the reference is not the first key", {"A": [0.7], "B": [0.75], "S": [0.5]}, "S"),
        ("random, 4 representations x 5 targets", random_scores, "G"),
    ]
    failures = []
    for name, scores, ref in cases:
        want = reference_nrg(scores, reference=ref)
        try:
            got = fn({k: list(v) for k, v in scores.items()}, ref)
            got = {k: np.asarray(got[k], dtype=float).reshape(-1) for k in want}
        except Exception as err:  # noqa: BLE001 - the reader's code may raise anything
            failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
            continue
        for k, w in want.items():
            if got[k].shape != w.shape or not np.allclose(got[k], w, atol=1e-6):
                failures.append(f"{name}, {k}: expected {w.round(4).tolist()}, got {got[k].round(4).tolist()}")
    return _report(
        failures,
        "the gain over the reference as a share of the reference's remaining error, target by "
        "target: (s(r) - s(ref)) / (1 - s(ref)); the reference itself gets 0, a worse "
        "representation a negative value",
    )


def dimension_purity(fn: Callable) -> bool:
    """Check ``fn(feats, labels, top) -> [dim]``: the class purity of each feature dimension (Chapter 13).

    For each column of ``feats`` (numpy ``[item, dim]``): the ``top`` items with the *highest* values, and the
    share of them that carry their most common label (``transfer.dimension_purity``).

    Args:
        fn: the reader's function of a ``[item, dim]`` array, ``[item]`` labels and an int.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import transfer
    >>> dimension_purity(transfer.dimension_purity)
    pass
    True
    """
    import numpy as np

    from helpers.transfer import dimension_purity as reference

    rng = np.random.default_rng(0)
    random_labels = rng.integers(0, 4, 50)
    cases = [  # (name, feats, labels, top)
        ("4 items, 2 dimensions, top 2", [[3.0, 0.0], [2.0, 1.0], [0.0, 2.0], [1.0, 3.0]], [0, 0, 1, 2], 2),
        ("the top item's label is not the most common", [[5.0], [4.0], [3.0], [-1.0]], [0, 1, 1, 0], 3),
        ("large negative values are not top items", [[-9.0], [-8.0], [1.0], [0.5], [0.2]], [0, 1, 2, 2, 1], 2),
        ("top 1", [[0.1, 0.7], [0.9, 0.2], [0.5, 0.4]], [2, 0, 1], 1),
        (
            "random 50 items x 6 dimensions, top 10",
            rng.normal(size=(50, 6)) + np.eye(4)[random_labels] @ rng.normal(size=(4, 6)),
            random_labels,
            10,
        ),
    ]
    failures = []
    for name, f, y, top in cases:
        f, y = np.asarray(f, dtype=float), np.asarray(y)
        want = reference(f, y, top=top)
        got = _call(failures, name, fn, f.copy(), y.copy(), top=top, post=lambda r: np.asarray(r, dtype=float))
        if got is _RAISED:
            continue
        if got.shape != want.shape:
            failures.append(f"{name}: expected shape {want.shape} (one purity per dimension), got {got.shape}")
        elif not np.allclose(got, want, atol=1e-6):
            failures.append(f"{name}: expected {want.round(4).tolist()}, got {got.round(4).tolist()}")
    return _report(
        failures,
        "for each column, take the indices of the top largest values (np.argsort(-feats, axis=0)"
        "[:top]), look up their labels, and divide the count of the most common one by top "
        "(np.unique(..., return_counts=True)[1].max() / top)",
    )


def ground_truth_auc(fn: Callable) -> bool:
    """Check ``fn(scores, truth) -> [batch]``: plausibility as a ROC AUC against known features (Chapter 14).

    ``scores`` is a ``[batch, feature]`` float tensor, ``truth`` a bool tensor of the same shape; for each item,
    the probability that a known-relevant feature outscores another feature, ties one half, ``nan`` for an
    item with no relevant or no irrelevant feature (``evaluation.ground_truth_auc``).

    Args:
        fn: the reader's function of two ``[batch, feature]`` tensors, returning ``[batch]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import evaluation
    >>> ground_truth_auc(evaluation.ground_truth_auc)
    pass
    True
    """
    from helpers.evaluation import ground_truth_auc as reference

    g = torch.Generator().manual_seed(0)
    truth = torch.rand(6, 30, generator=g) < 0.3
    cases = [  # (name, scores, truth)
        (
            "one item, a tie between a relevant and an irrelevant feature",
            torch.tensor([[0.9, 0.1, 0.5, 0.5]]),
            torch.tensor([[True, False, True, False]]),
        ),
        (
            "perfect and reversed rankings",
            torch.tensor([[4.0, 3, 2, 1], [1.0, 2, 3, 4]]),
            torch.tensor([[True, True, False, False], [True, True, False, False]]),
        ),
        (
            "an item with no relevant feature (nan)",
            torch.tensor([[0.2, 0.7, 0.1], [0.3, 0.9, 0.4]]),
            torch.tensor([[False, False, False], [False, True, False]]),
        ),
        ("random 6 items x 30 features", torch.randn(6, 30, generator=g) + truth, truth),
        ("random scores with many ties", torch.randint(0, 3, (6, 30), generator=g).float(), truth),
    ]
    failures = []
    for name, s, t in cases:
        want = reference(s, t)
        got = _call(
            failures, name, fn, s.clone(), t.clone(), post=lambda r: torch.as_tensor(r, dtype=torch.float64).reshape(-1)
        )
        if got is _RAISED:
            continue
        if got.shape != want.shape:
            failures.append(f"{name}: expected shape {tuple(want.shape)} (one AUC per item), got {tuple(got.shape)}")
        elif not torch.allclose(got, want, atol=1e-6, equal_nan=True):
            failures.append(
                f"{name}: expected {[round(v, 4) for v in want.tolist()]}, got {[round(v, 4) for v in got.tolist()]}"
            )
    return _report(
        failures,
        "for each item (row), AUC = (sum of the relevant features' ranks - n_pos (n_pos + 1) / 2) "
        "/ (n_pos n_neg) with *average* ranks for ties (scipy.stats.rankdata); nan where an "
        "item has no relevant or no irrelevant feature",
    )


def sanity_distance(fn: Callable) -> bool:
    """Check ``fn(reference, randomised) -> [batch]``: the model-randomisation sanity distance (Chapter 14).

    Both arguments are ``[batch, feature]`` float tensors, the explanations of the same inputs by the trained
    and by the randomised model; the answer is ``1 - |rho|`` per item, ``rho`` the Spearman correlation of
    the *absolute* scores (``evaluation.sanity_distance``).

    Args:
        fn: the reader's function of two ``[batch, feature]`` tensors, returning ``[batch]``.

    Returns:
        True when it matches the reference on every case (it prints ``pass``).

    >>> from helpers import evaluation
    >>> sanity_distance(evaluation.sanity_distance)
    pass
    True
    """
    from helpers.evaluation import sanity_distance as reference

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 20, generator=g)
    cases = [  # (name, reference map, randomised map)
        ("signs flipped (unchanged: 0)", torch.tensor([[1.0, -2, 3, -4]]), torch.tensor([[-1.0, 2, -3, 4]])),
        (
            "ranking of |scores| reversed (unchanged up to sign: 0)",
            torch.tensor([[1.0, 2, 3, 4]]),
            torch.tensor([[4.0, 3, 2, 1]]),
        ),
        ("no rank relation left (1)", torch.tensor([[1.0, 2, 3, 4]]), torch.tensor([[2.0, 4, 1, 3]])),
        (
            "monotone but not linear (0)",
            torch.tensor([[0.1, 0.5, 1.0, 2.0, 4.0]]),
            torch.tensor([[0.1, 0.5, 1.0, 2.0, 4.0]]) ** 4,
        ),
        ("random 5 items x 20 features", a, a + torch.randn(5, 20, generator=g)),
    ]
    failures = []
    for name, r, x in cases:
        want = reference(r, x)
        got = _call(
            failures,
            name,
            fn,
            r.clone(),
            x.clone(),
            post=lambda out: torch.as_tensor(out, dtype=torch.float64).reshape(-1),
        )
        if got is _RAISED:
            continue
        if got.shape != want.shape:
            failures.append(
                f"{name}: expected shape {tuple(want.shape)} (one distance per item), got {tuple(got.shape)}"
            )
        elif not torch.allclose(got, want, atol=1e-6, equal_nan=True):
            failures.append(
                f"{name}: expected {[round(v, 4) for v in want.tolist()]}, got {[round(v, 4) for v in got.tolist()]}"
            )
    return _report(
        failures,
        "rank the absolute scores of each item (scipy.stats.rankdata on x.abs()), take the "
        "Pearson correlation of the two rank vectors (Spearman's rho), and return 1 - |rho|: a "
        "flipped sign or a reversed ranking means the map did not change",
    )


__all__ = [
    "attention_entropy",
    "choquet_integral",
    "comprehensiveness",
    "concept_auc",
    "contrastive_loss",
    "deletion_curve",
    "dimension_purity",
    "document_vector",
    "ffn_coefficients",
    "fvu",
    "grad_rollout",
    "ground_truth_auc",
    "hit_rate_ndcg",
    "leave_one_out",
    "logit_lens",
    "map_rank_correlation",
    "node_recall",
    "nrg",
    "patch_metric",
    "pmi",
    "prototype_similarity",
    "push_layer_norm_mickus",
    "rationale_mask",
    "rollout",
    "sanity_distance",
    "stream_metrics",
    "term_importance",
    "topk_activation",
    "value_logits",
    "wise_ft",
    "within_class_auc",
    "word_attention",
]
