"""Attention read as a graph: attention maps, one BERT layer by hand, attention rollout and flow.

Introduced in nbs/01_attention_as_graph.ipynb (Chapter 1); Chapter 4 (head specialisation) and
Chapter 8 (rollout on a vision transformer) import it. Everything works on the stacked tensor of
attention probabilities ``attn  # [layer, batch, head, query, key]`` with padding zeroed, so it
applies to any BERT-like Hugging Face encoder and to any mask.

References: Vaswani et al. (2017) for the attention block; Abnar & Zuidema (2020), "Quantifying
Attention Flow in Transformers", for rollout (their eq. 1) and flow (their §3).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_REDUCTIONS = ("mean", "max", "min")
ROW_TOL = 1e-3  # attention rows must sum to 1 (or 0 on padding) within this tolerance

__all__ = [
    "AttentionMaps",
    "attention_maps",
    "capture",
    "encode_batches",
    "manual_bert_layer",
    "output_weights",
    "read_out",
    "rollout",
    "flow_network",
    "attention_flow",
    "attention_graph",
    "draw_attention_graph",
    "sentence_embedding",
    "blank_out",
    "input_x_gradient",
]


# ---------------------------------------------------------------------------------------------
# Input validation shared by the public functions
# ---------------------------------------------------------------------------------------------


def _as_tensor(x, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must hold floating-point attention probabilities, got dtype {x.dtype}")
    return x


def _check_probabilities(attn: Tensor, name: str, *, allow_zero_rows: bool = True) -> None:
    """Rows of attention probabilities are non-negative and sum to 1 (0 for padding queries)."""
    if attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"{name} must be square in its last two axes (query, key), got shape {tuple(attn.shape)}")
    if attn.numel() and attn.min() < -ROW_TOL:
        raise ValueError(f"{name} has negative entries; pass attention probabilities (after softmax), not scores")
    sums = attn.sum(-1)
    ok = (sums - 1).abs() <= ROW_TOL
    if allow_zero_rows:
        ok |= sums.abs() <= ROW_TOL
    if not bool(ok.all()):
        bad = sums[~ok].flatten()[0].item()
        raise ValueError(
            f"rows of {name} must sum to 1 (attention probabilities over keys; padding rows may be all 0), "
            f"found a row summing to {bad:.4f}: pass softmax outputs, not scores or a thresholded matrix"
        )


def _check_residual(residual: float) -> None:
    if not 0.0 <= float(residual) <= 1.0:
        raise ValueError(f"residual must lie in [0, 1] (Abnar & Zuidema use 0.5), got {residual}")


def _reduce_heads(attn: Tensor, head_reduce: str, head_dim: int) -> Tensor:
    if head_reduce == "mean":
        return attn.mean(head_dim)
    if head_reduce == "max":
        return attn.amax(head_dim)
    if head_reduce == "min":
        return attn.amin(head_dim)
    raise ValueError(f"head_reduce must be one of {HEAD_REDUCTIONS}, got {head_reduce!r}")


def _with_residual(attn: Tensor, residual: float) -> Tensor:
    """(1 - residual) * attn + residual * I, rows re-normalised (Abnar & Zuidema §3)."""
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    mixed = (1 - residual) * attn + residual * eye
    sums = mixed.sum(-1, keepdim=True)
    # a padding row (all zero attention) with residual 0 stays zero instead of dividing by zero
    return torch.where(sums > 0, mixed / sums.clamp_min(1e-12), mixed)


# ---------------------------------------------------------------------------------------------
# Attention maps of a batch of sentences
# ---------------------------------------------------------------------------------------------


class AttentionMaps(NamedTuple):
    """Attention probabilities of a batch of sentences, with their word pieces and padding mask."""

    attn: Tensor  # [layer, batch, head, query, key], rows of padding queries and columns of padding keys are 0
    tokens: list[list[str]]  # word pieces per sentence, padding removed
    mask: Tensor  # [batch, pos] bool, True on real tokens


def attention_maps(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 64,
) -> AttentionMaps:
    """Attention probabilities of every layer and head for a list of sentences.

    Args:
        model: a Hugging Face encoder loaded with ``attn_implementation="eager"`` (other
            implementations do not return attention probabilities).
        tokenizer: its tokenizer.
        sentences: the texts; each is truncated to ``max_length`` word pieces.
        max_length: padding/truncation length, special tokens included.
        batch_size: sentences per forward pass (bounds peak memory).

    Returns:
        ``AttentionMaps(attn, tokens, mask)``: ``attn`` is [layer, batch, head, query, key] padded to
        the longest sentence, with padding rows and columns set to 0; ``tokens`` the word pieces of
        each sentence; ``mask`` [batch, pos] (True on real tokens).

    Introduced in nbs/01_attention_as_graph.ipynb.
    """
    if isinstance(sentences, str) or not isinstance(sentences, Sequence) or len(sentences) == 0:
        raise ValueError("sentences must be a non-empty list of strings (wrap a single sentence in a list)")
    if not all(isinstance(s, str) and s.strip() for s in sentences):
        raise ValueError("every sentence must be a non-empty string")
    if max_length < 2 or batch_size < 1:
        raise ValueError(f"need max_length >= 2 and batch_size >= 1, got {max_length}, {batch_size}")
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise ValueError(
            "the model must return attention probabilities: load it with attn_implementation='eager' "
            "(helpers.assets.minilm() does)"
        )
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    mask = enc["attention_mask"].bool()  # [batch, pos]
    device = next(model.parameters()).device
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            part = {k: v[start : start + batch_size].to(device) for k, v in enc.items()}
            out = model(**part, output_attentions=True)
            chunks.append(torch.stack(out.attentions).float().cpu())  # [layer, chunk, head, query, key]
    attn = torch.cat(chunks, dim=1)
    pair = (mask[:, :, None] & mask[:, None, :])[None, :, None]  # [1, batch, 1, query, key]
    attn = attn * pair
    tokens = [tokenizer.convert_ids_to_tokens(ids[m].tolist()) for ids, m in zip(enc["input_ids"], mask, strict=True)]
    return AttentionMaps(attn, tokens, mask)


# ---------------------------------------------------------------------------------------------
# Activations and one layer by hand
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of named sub-modules during the forward passes run inside the block.

    Hooks are always removed on exit, even when the forward pass raises.

    Args:
        modules: ``{name: module}``, e.g. ``{"ffn_act": model.encoder.layer[0].intermediate}``.

    Yields:
        a dict filled as the modules run: ``name -> output`` (the first element when a module returns
        a tuple; a later call of the same module overwrites an earlier one).

    >>> lin = nn.Linear(2, 3)
    >>> with capture({"lin": lin}) as cache:
    ...     _ = lin(torch.zeros(1, 2))
    >>> tuple(cache["lin"].shape), len(lin._forward_hooks)
    ((1, 3), 0)
    """
    if not isinstance(modules, Mapping) or not all(isinstance(m, nn.Module) for m in modules.values()):
        raise ValueError("modules must be a mapping {name: torch.nn.Module}")
    cache: dict[str, Tensor] = {}
    handles = []

    def hook_for(name):
        def hook(_module, _inputs, output):
            cache[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield cache
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def manual_bert_layer(layer: nn.Module, hidden: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Recompute one post-LayerNorm BERT block from its weights, returning every intermediate.

    Multi-head scaled dot-product attention, output projection, residual + LayerNorm, then the
    feed-forward network and its residual + LayerNorm (Vaswani et al. 2017; Devlin et al. 2019).
    Works for layers laid out like ``BertLayer`` (BERT, RoBERTa, ELECTRA, MiniLM).

    Args:
        layer: one block, e.g. ``model.encoder.layer[2]``.
        hidden: its input hidden states, [batch, pos, d].
        mask: [batch, pos], True (or 1) on real tokens, False (0) on padding.

    Returns:
        dict with ``q``, ``k``, ``v`` [batch, head, pos, d_head]; ``scores`` and ``probs``
        [batch, head, query, key]; ``context`` (heads concatenated) and ``attn_out`` (after W_O)
        [batch, pos, d]; ``resid_mid`` (after the first LayerNorm) [batch, pos, d]; ``ffn_pre`` and
        ``ffn_act`` [batch, pos, d_ff]; ``ffn_out`` and ``out`` (the block's output) [batch, pos, d].
        Computed without gradients (inference tensors are accepted).

    Introduced in nbs/01_attention_as_graph.ipynb, where each step is written out.
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [batch, pos, d], got shape {tuple(hidden.shape)}")
    if mask.shape != hidden.shape[:2]:
        raise ValueError(f"mask must be [batch, pos] = {tuple(hidden.shape[:2])}, got {tuple(mask.shape)}")
    try:
        sa, so = layer.attention.self, layer.attention.output
        ffn_in, ffn_out_mod = layer.intermediate, layer.output
    except AttributeError as err:
        raise ValueError(
            "layer must be laid out like transformers' BertLayer (attention.self.query, attention.output.dense, "
            "intermediate.dense, output.dense); pass model.encoder.layer[i] of a BERT-family model"
        ) from err
    batch, pos, d = hidden.shape
    n_heads = sa.num_attention_heads if hasattr(sa, "num_attention_heads") else sa.config.num_attention_heads
    d_head = d // n_heads

    def split(x: Tensor) -> Tensor:  # [batch, pos, d] -> [batch, head, pos, d_head]
        return x.view(batch, pos, n_heads, d_head).transpose(1, 2)

    q, k, v = split(sa.query(hidden)), split(sa.key(hidden)), split(sa.value(hidden))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d_head)  # [batch, head, query, key]
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1)  # [batch, head, query, key]
    context = (probs @ v).transpose(1, 2).reshape(batch, pos, d)  # [batch, pos, d]
    attn_out = so.dense(context)
    resid_mid = so.LayerNorm(hidden + attn_out)
    ffn_pre = ffn_in.dense(resid_mid)  # [batch, pos, d_ff]
    ffn_act = ffn_in.intermediate_act_fn(ffn_pre)
    ffn_out = ffn_out_mod.dense(ffn_act)  # [batch, pos, d]
    out = ffn_out_mod.LayerNorm(resid_mid + ffn_out)
    return dict(
        q=q,
        k=k,
        v=v,
        scores=scores,
        probs=probs,
        context=context,
        attn_out=attn_out,
        resid_mid=resid_mid,
        ffn_pre=ffn_pre,
        ffn_act=ffn_act,
        ffn_out=ffn_out,
        out=out,
    )


# ---------------------------------------------------------------------------------------------
# Reading a [batch, query, key] matrix at the model's output
# ---------------------------------------------------------------------------------------------


def output_weights(mask: Tensor, *, output: int | str = "mean") -> Tensor:
    """Weights of the positions that form the model's output: one position, or mean pooling.

    Args:
        mask: [batch, pos], True on real tokens.
        output: a position (``0`` for ``[CLS]``) or ``"mean"`` for the average over real tokens
            (mean pooling, how sentence-embedding models such as MiniLM read their output).

    Returns:
        [batch, query] non-negative weights summing to 1 per sentence.

    >>> output_weights(torch.tensor([[1, 1, 1, 0]]).bool())
    tensor([[0.3333, 0.3333, 0.3333, 0.0000]])
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be [batch, pos], got shape {tuple(mask.shape)}")
    mask = mask.bool()
    if output == "mean":
        weights = mask.float()
        return weights / weights.sum(-1, keepdim=True).clamp_min(1)
    if isinstance(output, int) and not isinstance(output, bool):
        if not 0 <= output < mask.shape[1] or not bool(mask[:, output].all()):
            raise ValueError(f"output position {output} is padding or out of range for some sentence; use 0 ([CLS])")
        weights = torch.zeros(mask.shape)
        weights[:, output] = 1.0
        return weights
    raise ValueError(f"output must be a position (int) or 'mean', got {output!r}")


def read_out(matrix: Tensor, mask: Tensor, *, output: int | str = "mean") -> Tensor:
    """Token importance seen from the output: ``w^T M`` for each sentence.

    Args:
        matrix: [batch, query, key] (head-averaged attention of one layer, or a rollout), or
            [layer, batch, query, key] to read every layer at once.
        mask: [batch, pos], True on real tokens.
        output: a position or ``"mean"``, as in :func:`output_weights`.

    Returns:
        [batch, key] (or [layer, batch, key]): how much of the output comes from each key.

    >>> read_out(torch.eye(3)[None], torch.ones(1, 3).bool())
    tensor([[0.3333, 0.3333, 0.3333]])
    """
    if matrix.ndim not in (3, 4) or matrix.shape[-2:] != (mask.shape[1], mask.shape[1]):
        raise ValueError(
            f"matrix must be [batch, query, key] or [layer, batch, query, key] matching mask {tuple(mask.shape)}, "
            f"got {tuple(matrix.shape)}"
        )
    weights = output_weights(mask, output=output).to(matrix.dtype)  # [batch, query]
    return torch.einsum("bq,...bqk->...bk", weights, matrix)


# ---------------------------------------------------------------------------------------------
# Attention rollout and attention flow (Abnar & Zuidema 2020)
# ---------------------------------------------------------------------------------------------


def rollout(
    attn: Tensor,
    *,
    residual: float = 0.5,
    head_reduce: str = "mean",
    all_layers: bool = False,
) -> Tensor:
    """Attention rollout: multiply the residual-augmented attention of every layer.

    Each layer's heads are reduced (averaged by default), the residual connection is modelled as
    ``(1 - residual) * A + residual * I`` with rows re-normalised, and the layers are multiplied
    from the top down: ``R = Â_L ... Â_1``. Row ``t`` of ``R`` says how much of the output at
    position ``t`` comes from each input token.

    Args:
        attn: [layer, batch, head, query, key] attention probabilities (rows sum to 1; padding rows 0).
        residual: weight of the identity (0.5 in the paper; 0 ignores the residual stream).
        head_reduce: ``"mean"`` (paper), ``"max"`` or ``"min"`` over heads.
        all_layers: also return the rollout up to every intermediate layer.

    Returns:
        [batch, query, key], or [layer, batch, query, key] when ``all_layers`` (entry ``l`` is the
        rollout through layers ``1..l+1``). Rows of real tokens sum to 1; padding rows are 0.

    >>> rollout(torch.eye(3).expand(2, 1, 1, 3, 3)).squeeze(0)  # identity attention: nothing mixes
    tensor([[1., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]])

    Abnar & Zuidema (2020), eq. 1. Introduced in nbs/01_attention_as_graph.ipynb.
    """
    attn = _as_tensor(attn, "attn")
    if attn.ndim != 5:
        raise ValueError(
            f"attn must be [layer, batch, head, query, key], got shape {tuple(attn.shape)}; "
            "for one sentence use attn[:, None] to add the batch axis"
        )
    _check_probabilities(attn, "attn")
    _check_residual(residual)
    real = attn[0].sum(-1).amax(1) > 0.5  # [batch, query]: padding rows are all 0
    layers = _with_residual(_reduce_heads(attn, head_reduce, head_dim=2), residual)  # [layer, batch, query, key]
    result = layers[0]
    history = [result]
    for layer in layers[1:]:
        result = layer @ result
        history.append(result)
    keep = (real[:, :, None] & real[:, None, :]).to(attn.dtype)
    if all_layers:
        return torch.stack(history) * keep
    return result * keep


def _layer_capacities(attn: Tensor, residual: float, head_reduce: str) -> Tensor:
    attn = _as_tensor(attn, "attn")
    if attn.ndim != 4:
        raise ValueError(
            f"attn must be one sentence's [layer, head, query, key] without padding, got shape {tuple(attn.shape)}; "
            "slice a batch with attn[:, b, :, :n, :n] (n = real tokens of sentence b)"
        )
    _check_probabilities(attn, "attn", allow_zero_rows=False)
    _check_residual(residual)
    return _with_residual(_reduce_heads(attn, head_reduce, head_dim=1), residual).double()  # [layer, query, key]


def _source_capacities(output: int | str | Tensor, n: int) -> Tensor:
    if isinstance(output, Tensor):
        if output.shape != (n,) or bool((output < 0).any()):
            raise ValueError(f"an output weight vector must be non-negative with shape ({n},), got {output}")
        return output.double()
    return output_weights(torch.ones(1, n, dtype=torch.bool), output=output)[0].double()


def flow_network(
    attn: Tensor,
    *,
    output: int | str | Tensor = 0,
    residual: float = 0.5,
    head_reduce: str = "mean",
) -> nx.DiGraph:
    """The layered attention graph of one sentence as a flow network.

    Nodes are ``(layer, position)`` for layers ``0..L`` (0 = input embeddings) plus ``"output"``.
    An edge ``(l, t) -> (l - 1, s)`` has capacity ``Â_l[t, s]``, the residual-augmented attention of
    layer ``l``; ``"output" -> (L, t)`` carries the output weight of position ``t``.

    Args:
        attn: [layer, head, query, key] for one sentence, padding removed.
        output: position read at the top (``0`` = ``[CLS]``), ``"mean"`` (mean pooling) or a
            [query] tensor of non-negative weights.
        residual, head_reduce: as in :func:`rollout`.

    Returns:
        ``networkx.DiGraph`` with a ``capacity`` on every edge (zero-capacity edges omitted).

    >>> g = flow_network(torch.eye(2).expand(1, 1, 2, 2))  # one layer that attends to itself only
    >>> list(g.edges(data="capacity"))
    [((1, 0), (0, 0), 1.0), ((1, 1), (0, 1), 1.0), ('output', (1, 0), 1.0)]

    Abnar & Zuidema (2020), §3. Introduced in nbs/01_attention_as_graph.ipynb.
    """
    caps = _layer_capacities(attn, residual, head_reduce)  # [layer, query, key]
    n_layers, n, _ = caps.shape
    source = _source_capacities(output, n)
    graph = nx.DiGraph()
    graph.add_nodes_from((layer, pos) for layer in range(n_layers + 1) for pos in range(n))
    for layer in range(1, n_layers + 1):
        for t, s in zip(*torch.nonzero(caps[layer - 1] > 0, as_tuple=True), strict=True):
            graph.add_edge((layer, int(t)), (layer - 1, int(s)), capacity=float(caps[layer - 1, t, s]))
    for t in torch.nonzero(source > 0).flatten().tolist():
        graph.add_edge("output", (n_layers, t), capacity=float(source[t]))
    return graph


def _flow_scipy(caps: Tensor, source: Tensor, resolution: float) -> Tensor:
    """Max-flow from the output to each input token with scipy's Dinic solver on integer capacities."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    n_layers, n, _ = caps.shape
    top = n_layers * n  # node id of (layer, pos) is layer * n + pos; the source comes last
    rows, cols, vals = [], [], []
    for layer in range(1, n_layers + 1):
        t, s = np.nonzero(caps[layer - 1].numpy() > 0)
        rows.append(layer * n + t)
        cols.append((layer - 1) * n + s)
        vals.append(caps[layer - 1].numpy()[t, s])
    t = np.nonzero(source.numpy() > 0)[0]
    rows.append(np.full(len(t), top + n))
    cols.append(top + t)
    vals.append(source.numpy()[t])
    scaled = np.rint(np.concatenate(vals) / resolution)
    # every flow is bounded by the capacity leaving the source, so that total must fit in int32
    if np.rint(source.numpy() / resolution).sum() >= np.iinfo(np.int32).max:
        raise ValueError(f"resolution {resolution} is too fine for int32 capacities; use a coarser one (e.g. 1e-7)")
    size = top + n + 1
    graph = csr_array((scaled.astype(np.int32), (np.concatenate(rows), np.concatenate(cols))), shape=(size, size))
    flows = [maximum_flow(graph, top + n, sink, method="dinic").flow_value for sink in range(n)]
    return torch.tensor(flows, dtype=torch.float64) * resolution


def attention_flow(
    attn: Tensor,
    *,
    output: int | str | Tensor = 0,
    residual: float = 0.5,
    head_reduce: str = "mean",
    mask: Tensor | None = None,
    solver: str = "scipy",
    resolution: float = 1e-7,
) -> Tensor:
    """Attention flow: the maximum flow from the output to each input token in the attention graph.

    Where rollout multiplies edge weights along a path and sums over paths, flow treats weights
    as capacities: a path carries at most its weakest edge, and paths compete for shared edges.

    Args:
        attn: one sentence's [layer, head, query, key] (padding removed), or a batch
            [layer, batch, head, query, key] together with ``mask``.
        output: position read at the top (``0`` = ``[CLS]``), ``"mean"`` or a [query] weight vector.
        residual, head_reduce: as in :func:`rollout`.
        mask: [batch, pos] for a batch; each sentence is cut to its real tokens.
        solver: ``"scipy"`` (Dinic on capacities rounded to ``resolution``; fast) or
            ``"networkx"`` (preflow-push on exact floats; slow, the reference).
        resolution: capacity quantum of the scipy solver; flows are exact to about
            ``resolution`` times the number of edges in the minimum cut.

    Returns:
        [key] flows for one sentence, or [batch, key] (0 on padding) for a batch, in float64.

    >>> a = torch.tensor([[[[0.5, 0.5], [0.0, 1.0]]]])  # one layer, one head: [CLS] reads both tokens
    >>> attention_flow(a, output=0)
    tensor([0.7500, 0.2500], dtype=torch.float64)

    Abnar & Zuidema (2020), §3. Introduced in nbs/01_attention_as_graph.ipynb.
    """
    if solver not in ("scipy", "networkx"):
        raise ValueError(f"solver must be 'scipy' or 'networkx', got {solver!r}")
    if not 1e-9 <= resolution <= 1e-2:
        raise ValueError(f"resolution must lie in [1e-9, 1e-2], got {resolution}")
    attn = _as_tensor(attn, "attn")
    if attn.ndim == 5:
        if mask is None or mask.ndim != 2 or mask.shape[0] != attn.shape[1]:
            raise ValueError("a batched attn [layer, batch, head, query, key] needs mask [batch, pos]")
        result = torch.zeros(attn.shape[1], attn.shape[-1], dtype=torch.float64)
        for b in range(attn.shape[1]):
            kept = mask[b].bool()
            one = attn[:, b][:, :, kept][:, :, :, kept]
            out = output[b][kept] if isinstance(output, Tensor) and output.ndim == 2 else output
            result[b, kept] = attention_flow(
                one, output=out, residual=residual, head_reduce=head_reduce, solver=solver, resolution=resolution
            )
        return result
    if mask is not None:
        raise ValueError("mask is only used with a batched attn [layer, batch, head, query, key]")
    if solver == "networkx":
        graph = flow_network(attn, output=output, residual=residual, head_reduce=head_reduce)
        flow_func = nx.algorithms.flow.preflow_push
        n = attn.shape[-1]
        return torch.tensor(
            [nx.maximum_flow_value(graph, "output", (0, s), flow_func=flow_func) for s in range(n)],
            dtype=torch.float64,
        )
    caps = _layer_capacities(attn, residual, head_reduce)
    return _flow_scipy(caps, _source_capacities(output, caps.shape[-1]), resolution)


# ---------------------------------------------------------------------------------------------
# One head as a weighted directed graph
# ---------------------------------------------------------------------------------------------


def attention_graph(attn: Tensor, tokens: Sequence[str], *, threshold: float = 0.05) -> nx.DiGraph:
    """One attention matrix as a weighted directed graph on the tokens.

    Node ``i`` carries ``token`` (its word piece) and ``received`` (the attention it receives,
    the column sum). Edge ``t -> s`` with ``weight`` ``a_ts`` means query ``t`` attends to key ``s``
    (information flows from ``s`` into ``t``). Edges below ``threshold`` (and zero edges) are
    dropped; self-loops are kept. Because rows sum to 1, the matrix is the transition matrix of a random walk.

    Args:
        attn: [query, key] probabilities of one head (or a head average, or a rollout) for one
            sentence with padding removed.
        tokens: the word pieces, one per position.
        threshold: smallest weight kept, in [0, 1).

    Returns:
        ``networkx.DiGraph`` with ``len(tokens)`` nodes.

    >>> g = attention_graph(torch.tensor([[0.9, 0.1], [0.5, 0.5]]), ["[CLS]", "hi"], threshold=0.2)
    >>> [(t, s, round(w, 2)) for t, s, w in g.edges(data="weight")]
    [(0, 0, 0.9), (1, 0, 0.5), (1, 1, 0.5)]

    Introduced in nbs/01_attention_as_graph.ipynb.
    """
    attn = _as_tensor(attn, "attn")
    if attn.ndim != 2:
        raise ValueError(
            f"attn must be one [query, key] matrix, got shape {tuple(attn.shape)}; "
            "select a layer, sentence and head first, e.g. maps.attn[layer, b, head, :n, :n]"
        )
    if len(tokens) != attn.shape[0]:
        raise ValueError(f"got {len(tokens)} tokens for a {tuple(attn.shape)} matrix; cut padding with [:n, :n]")
    _check_probabilities(attn, "attn", allow_zero_rows=False)
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    received = attn.sum(0)
    graph = nx.DiGraph()
    for i, token in enumerate(tokens):
        graph.add_node(i, token=token, received=float(received[i]))
    for t, s in zip(*torch.nonzero((attn >= threshold) & (attn > 0), as_tuple=True), strict=True):
        graph.add_edge(int(t), int(s), weight=float(attn[t, s]))
    return graph


def draw_attention_graph(graph: nx.DiGraph, *, ax=None, title: str | None = None, max_width: float = 6.0):
    """Draw an attention graph as an arc diagram: tokens left to right, one arc per edge.

    An arc joins a query to a key it reads from: above the line when the key comes later in the
    sentence (blue), below when it comes earlier (orange). Width and opacity grow with the weight,
    a node's size with the attention it receives, the width of its ring with its self-attention.
    Arcs are drawn in data coordinates, so they fit any axes shape.

    Args:
        graph: from :func:`attention_graph`.
        ax: matplotlib axes (a new figure when ``None``).
        title: axes title.
        max_width: line width of an edge of weight 1.

    Returns:
        the axes.
    """
    import matplotlib.pyplot as plt

    if not isinstance(graph, nx.DiGraph) or not all("token" in data for _, data in graph.nodes(data=True)):
        raise ValueError("graph must come from attention_graph (a DiGraph whose nodes carry a 'token')")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.55 * graph.number_of_nodes()), 3.2))
    n = graph.number_of_nodes()
    theta = np.linspace(0, np.pi, 40)
    for t, s, w in sorted(graph.edges(data="weight"), key=lambda e: e[2]):  # strongest arcs on top
        if t == s:
            continue
        later = s > t
        height = np.sqrt(abs(s - t) / max(n - 1, 1))  # sqrt: short arcs stay visible next to long ones
        xs = (t + s) / 2 + (t - s) / 2 * np.cos(theta)
        ys = (1 if later else -1) * height * np.sin(theta)
        ax.plot(xs, ys, color="C0" if later else "C1", lw=max_width * w, alpha=0.3 + 0.7 * w, solid_capstyle="round")
    received = np.array([graph.nodes[i]["received"] for i in range(n)])
    self_w = np.array([graph.edges[i, i]["weight"] if graph.has_edge(i, i) else 0.0 for i in range(n)])
    ax.scatter(
        np.arange(n),
        np.zeros(n),
        s=30 + 90 * received,
        c="white",
        edgecolors="k",
        linewidths=0.5 + 3 * self_w,
        zorder=3,
    )
    ax.set_xticks(np.arange(n), [graph.nodes[i]["token"] for i in range(n)], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(-1.1, 1.1)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_yticks([])
    ax.grid(False)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title)
    return ax


def show_head(maps: AttentionMaps, index: int, layer: int, head: int, view: str = "heat map", *, label: str = ""):
    """Draw one head's attention on one sentence, as a matrix or as an arc graph (the chapters' widget).

    Args:
        maps: from :func:`attention_maps`.
        index: which sentence of ``maps``.
        layer, head: numbered from 1, as the book writes "L2·H9".
        view: ``"heat map"`` (queries in rows, keys in columns; ``"matrix"`` is the same) or ``"graph"``
            (:func:`draw_attention_graph`).
        label: appended to the title in brackets (e.g. the head's behaviour in Chapter 4).

    Introduced in nbs/01_attention_as_graph.ipynb; reused by nbs/04_head_specialisation.ipynb.
    """
    import matplotlib.pyplot as plt

    n_layers, batch, n_heads = maps.attn.shape[:3]
    if not 0 <= index < batch or not 1 <= layer <= n_layers or not 1 <= head <= n_heads:
        raise ValueError(f"need 0 <= index < {batch}, 1 <= layer <= {n_layers}, 1 <= head <= {n_heads}; "
                         f"got index={index}, layer={layer}, head={head}")
    if view not in ("heat map", "matrix", "graph"):
        raise ValueError(f"view must be 'heat map' or 'graph', got {view!r}")
    tokens = maps.tokens[index]
    n = len(tokens)
    matrix = maps.attn[layer - 1, index, head - 1, :n, :n]
    title = f"Layer {layer}, head {head}" + (f" ({label})" if label else "")
    if view == "graph":
        draw_attention_graph(attention_graph(matrix, tokens, threshold=0.1), title=title)
    else:
        _, ax = plt.subplots(figsize=(6, 5))
        ax.imshow(matrix, vmin=0, vmax=1, cmap="Blues")
        ax.set_xticks(range(n), tokens, rotation=90, fontsize=8)
        ax.set_yticks(range(n), tokens, fontsize=8)
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query (attending)")
        ax.set_title(title)
        ax.grid(False)
    plt.show()


# ---------------------------------------------------------------------------------------------
# Baselines for token importance: blank-out and input x gradient of a sentence embedding
# ---------------------------------------------------------------------------------------------


def sentence_embedding(model: nn.Module, *, input_ids=None, inputs_embeds=None, attention_mask: Tensor) -> Tensor:
    """Mean-pooled last hidden state over real tokens (not normalised), [batch, d].

    This is how MiniLM-L6 (all-MiniLM-L6-v2) embeds a sentence (Reimers & Gurevych 2019); the
    sentence-transformers package then divides by the norm.
    """
    out = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
    weights = attention_mask.to(out.last_hidden_state.dtype)[..., None]  # [batch, pos, 1]
    return (out.last_hidden_state * weights).sum(1) / weights.sum(1)


def encode_batches(tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 64, device=None):
    """Tokenise ``texts`` in padded, truncated batches.

    Yields:
        ``(start, enc)``: the index of the batch's first text and its ``BatchEncoding``
        (``input_ids``/``attention_mask`` [batch, pos]), moved to ``device`` when given.

    Shared by the chapters that stream a corpus through an encoder (Chapters 4 and 7).
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings (wrap a single text in a list)")
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield start, (enc if device is None else enc.to(device))


def _encode(tokenizer, sentences, max_length):
    if isinstance(sentences, str) or not isinstance(sentences, Sequence) or len(sentences) == 0:
        raise ValueError("sentences must be a non-empty list of strings (wrap a single sentence in a list)")
    return tokenizer(
        list(sentences),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_special_tokens_mask=True,
    )


def blank_out(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    replacement: str = "[UNK]",
    max_length: int = 64,
    batch_size: int = 128,
) -> Tensor:
    """Blank-out importance: how far the sentence embedding turns when one token is replaced.

    For each sentence ``x`` and each non-special position ``s``, replace the word piece at ``s``
    by ``replacement`` (positions stay aligned) and score ``1 - cos(e(x), e(x_s))`` with ``e`` the
    mean-pooled embedding. Abnar & Zuidema (2020, §2) blank tokens out with ``UNK``.

    Args:
        model, tokenizer: a Hugging Face encoder and its tokenizer.
        sentences: the texts (tokenised exactly as in :func:`attention_maps`).
        replacement: a token of the vocabulary.
        max_length: truncation length; must match the one used for the attention maps.
        batch_size: perturbed sentences per forward pass.

    Returns:
        [batch, pos] importance, 0 on special tokens and padding.
    """
    enc = _encode(tokenizer, sentences, max_length)
    rep_id = tokenizer.convert_tokens_to_ids(replacement)
    if rep_id is None or rep_id == tokenizer.unk_token_id and replacement != tokenizer.unk_token:
        raise ValueError(f"replacement {replacement!r} is not a token of the vocabulary; use '[UNK]' or '[MASK]'")
    mask = enc["attention_mask"].bool()
    content = mask & ~enc["special_tokens_mask"].bool()  # [batch, pos]
    device = next(model.parameters()).device
    jobs = [(b, s) for b, s in zip(*torch.nonzero(content, as_tuple=True), strict=True)]
    lengths = mask.sum(1)
    # sort by sentence length so each forward pass pads as little as possible
    jobs.sort(key=lambda bs: int(lengths[bs[0]]))
    importance = torch.zeros(mask.shape)
    with torch.inference_mode():
        base = torch.cat(
            [
                sentence_embedding(
                    model,
                    input_ids=enc["input_ids"][i : i + batch_size].to(device),
                    attention_mask=enc["attention_mask"][i : i + batch_size].to(device),
                )
                for i in range(0, len(sentences), batch_size)
            ]
        ).cpu()
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            rows = torch.stack([b for b, _ in chunk])
            cols = torch.stack([s for _, s in chunk])
            width = int(lengths[rows].max())
            ids = enc["input_ids"][rows, :width].clone()
            ids[torch.arange(len(chunk)), cols] = rep_id
            emb = sentence_embedding(
                model, input_ids=ids.to(device), attention_mask=enc["attention_mask"][rows, :width].to(device)
            ).cpu()
            importance[rows, cols] = 1 - F.cosine_similarity(emb, base[rows], dim=-1)
    return importance


def input_x_gradient(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 64,
) -> Tensor:
    """Input x gradient importance of each word piece for the norm of the sentence embedding.

    The scalar explained is ``f(x) = ||e(x)||`` with ``e`` the mean-pooled (un-normalised) embedding;
    its gradient is ``J^T e / ||e||``, the sensitivity of the embedding along its own direction.
    Attributions come from Captum's ``InputXGradient`` on the word embeddings and are aggregated
    per token with the L2 norm over the embedding dimension.

    Returns:
        [batch, pos] non-negative importance, 0 on padding (special tokens are included).
    """
    from captum.attr import InputXGradient

    enc = _encode(tokenizer, sentences, max_length)
    device = next(model.parameters()).device
    word_embeddings = model.get_input_embeddings()

    def f(embeds, attention_mask):
        return sentence_embedding(model, inputs_embeds=embeds, attention_mask=attention_mask).norm(dim=-1)

    explainer = InputXGradient(f)
    parts = []
    for start in range(0, len(sentences), batch_size):
        ids = enc["input_ids"][start : start + batch_size].to(device)
        am = enc["attention_mask"][start : start + batch_size].to(device)
        embeds = word_embeddings(ids).detach().requires_grad_(True)  # [batch, pos, d]
        attributions = explainer.attribute(embeds, additional_forward_args=(am,))
        parts.append((attributions.norm(dim=-1) * am).detach().cpu())
    return torch.cat(parts)
