"""Attention read as a graph: attention maps, one BERT layer by hand, attention rollout and flow.

Introduced in nbs/01_attention_as_graph.ipynb (Chapter 1); Chapter 4 (head specialisation) and
Chapter 8 (rollout on a vision transformer) import it. Everything works on the stacked tensor of
attention probabilities ``attn  # [layer, batch, head, query, key]`` with padding zeroed, so it
applies to any BERT-like Hugging Face encoder and to any mask.

References: Vaswani et al. (2017) for the attention block; Abnar & Zuidema (2020), "Quantifying
Attention Flow in Transformers", for rollout (their eq. 1), flow (their §3) and the verb-number
setting (a ``[CLS]`` classifier explained by blank-out on the class probability); Kobayashi et al.
(2020) for value norms; Chefer, Gur & Wolf (2021) for gradient-weighted rollout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    "blank_out_outputs",
    "input_x_gradient",
    "value_norms",
    "GradientMaps",
    "attention_gradients",
    "grad_rollout",
    "VerbNumber",
    "verb_number_task",
    "SETTINGS",
    "probe_logits",
    "setting_target",
    "setting_importance",
    "contribution_maps",
    "contribution_rollout",
    "verb_number_importance",
    "NORM_READINGS",
    "norm_readings",
    "verb_number_readings",
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
    return_last_hidden: bool = False,
) -> AttentionMaps | tuple[AttentionMaps, Tensor]:
    """Attention probabilities of every layer and head for a list of sentences.

    Args:
        model: a Hugging Face encoder loaded with ``attn_implementation="eager"`` (other
            implementations do not return attention probabilities).
        tokenizer: its tokenizer.
        sentences: the texts; each is truncated to ``max_length`` word pieces.
        max_length: padding/truncation length, special tokens included.
        batch_size: sentences per forward pass (bounds peak memory).
        return_last_hidden: also return the last hidden states of the same forward passes, so that
            a reading of the model's output needs no second pass.

    Returns:
        ``AttentionMaps(attn, tokens, mask)``: ``attn`` is [layer, batch, head, query, key] padded to
        the longest sentence, with padding rows and columns set to 0; ``tokens`` the word pieces of
        each sentence; ``mask`` [batch, pos] (True on real tokens). With ``return_last_hidden``, the
        pair ``(maps, last_hidden)``, ``last_hidden`` [batch, pos, d] in float32.

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
    chunks, last = [], []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            part = {k: v[start : start + batch_size].to(device) for k, v in enc.items()}
            out = model(**part, output_attentions=True)
            chunks.append(torch.stack(out.attentions).float().cpu())  # [layer, chunk, head, query, key]
            if return_last_hidden:
                last.append(out.last_hidden_state.float().cpu())  # [chunk, pos, d]
    attn = torch.cat(chunks, dim=1)
    pair = (mask[:, :, None] & mask[:, None, :])[None, :, None]  # [1, batch, 1, query, key]
    attn = attn * pair
    tokens = [tokenizer.convert_ids_to_tokens(ids[m].tolist()) for ids, m in zip(enc["input_ids"], mask, strict=True)]
    maps = AttentionMaps(attn, tokens, mask)
    return (maps, torch.cat(last)) if return_last_hidden else maps


# ---------------------------------------------------------------------------------------------
# Activations and one layer by hand
# ---------------------------------------------------------------------------------------------


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


def blank_out_outputs(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    readout=None,
    replacement: str = "[UNK]",
    max_length: int = 64,
    batch_size: int = 128,
) -> tuple[Tensor, Tensor]:
    """The model's outputs for each sentence and for each copy with one word piece blanked out.

    For each sentence ``x`` and each non-special position ``s`` other than ``[MASK]``, the word piece
    at ``s`` is replaced by ``replacement`` (positions stay aligned) and ``readout`` is applied to
    the last hidden states. Comparing the two outputs gives blank-out importance for any output:
    a cosine between sentence vectors (:func:`blank_out`), or the drop in a probe's class probability.

    Args:
        model, tokenizer: a Hugging Face encoder and its tokenizer.
        sentences: the texts (tokenised exactly as in :func:`attention_maps`).
        readout: ``f(last_hidden [batch, pos, d], attention_mask [batch, pos]) -> [batch, k]``;
            ``None`` is the mean-pooled sentence vector (:func:`sentence_embedding`).
        replacement: a token of the vocabulary (Abnar & Zuidema 2020, §2, use ``UNK``).
        max_length: truncation length; must match the one used for the attention maps.
        batch_size: perturbed sentences per forward pass.

    Returns:
        ``(base, blanked)``: ``base`` [batch, k] the outputs of the sentences; ``blanked``
        [batch, pos, k] the outputs with position ``pos`` blanked out, equal to ``base`` where nothing
        was blanked (special tokens, ``[MASK]``, padding).

    Introduced in nbs/01_attention_as_graph.ipynb.
    """
    enc = _encode(tokenizer, sentences, max_length)
    rep_id = tokenizer.convert_tokens_to_ids(replacement)
    if rep_id is None or rep_id == tokenizer.unk_token_id and replacement != tokenizer.unk_token:
        raise ValueError(f"replacement {replacement!r} is not a token of the vocabulary; use '[UNK]' or '[MASK]'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if readout is None:
        def readout(hidden, attention_mask):
            weights = attention_mask.to(hidden.dtype)[..., None]  # [batch, pos, 1]
            return (hidden * weights).sum(1) / weights.sum(1)
    elif not callable(readout):
        raise ValueError("readout must be a function (last_hidden, attention_mask) -> [batch, k], or None")
    mask = enc["attention_mask"].bool()
    content = mask & ~enc["special_tokens_mask"].bool()  # [batch, pos]
    if tokenizer.mask_token_id is not None:
        content &= enc["input_ids"] != tokenizer.mask_token_id
    device = next(model.parameters()).device

    def run(ids, am):
        out = model(input_ids=ids.to(device), attention_mask=am.to(device))
        return readout(out.last_hidden_state, am.to(device)).float().cpu()

    jobs = [(b, s) for b, s in zip(*torch.nonzero(content, as_tuple=True), strict=True)]
    lengths = mask.sum(1)
    # sort by sentence length so each forward pass pads as little as possible
    jobs.sort(key=lambda bs: int(lengths[bs[0]]))
    with torch.inference_mode():
        base = torch.cat(
            [
                run(enc["input_ids"][i : i + batch_size], enc["attention_mask"][i : i + batch_size])
                for i in range(0, len(sentences), batch_size)
            ]
        )
        if base.ndim != 2 or base.shape[0] != len(sentences):
            raise ValueError(f"readout must return [batch, k], got shape {tuple(base.shape)}")
        blanked = base[:, None, :].repeat(1, mask.shape[1], 1)  # [batch, pos, k]
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            rows = torch.stack([b for b, _ in chunk])
            cols = torch.stack([s for _, s in chunk])
            width = int(lengths[rows].max())
            ids = enc["input_ids"][rows, :width].clone()
            ids[torch.arange(len(chunk)), cols] = rep_id
            blanked[rows, cols] = run(ids, enc["attention_mask"][rows, :width])
    return base, blanked


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
        [batch, pos] importance, 0 on special tokens, ``[MASK]`` and padding.
    """
    base, blanked = blank_out_outputs(
        model, tokenizer, sentences, replacement=replacement, max_length=max_length, batch_size=batch_size
    )
    untouched = (blanked == base[:, None, :]).all(-1)  # [batch, pos]: special tokens, [MASK], padding
    importance = 1 - F.cosine_similarity(blanked, base[:, None, :].expand_as(blanked), dim=-1)
    return importance.masked_fill(untouched, 0.0)


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


# ---------------------------------------------------------------------------------------------
# Two more readings of the layered graph: value norms (Kobayashi et al. 2020) and gradient-weighted
# rollout (Chefer et al. 2021)
# ---------------------------------------------------------------------------------------------


def _eager_encoding(model: nn.Module, tokenizer, sentences: Sequence[str], max_length: int, batch_size: int) -> dict:
    """Check the inputs of a per-layer reading of an eager-attention encoder and tokenise the sentences
    (padded, truncated at ``max_length``), as :func:`attention_maps` does."""
    if isinstance(sentences, str) or not isinstance(sentences, Sequence) or len(sentences) == 0:
        raise ValueError("sentences must be a non-empty list of strings (wrap a single sentence in a list)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise ValueError("the model must return attention probabilities: load it with attn_implementation='eager'")
    return tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def value_norms(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 64,
) -> Tensor:
    """Norm-based attention: how large a vector each key actually sends to each query, per layer.

    For layer ``l``, query ``t`` and key ``s`` the entry is ``|| sum_h a^h_ts f^h(x_s) ||`` with
    ``f^h(x) = (x W_V^h + b_V^h) W_O^h`` the value vector of head ``h`` after its slice of the output
    projection: the attention weight times the size of what it moves (Kobayashi et al. 2020, eq. 6,
    the heads summed as in their §5). A large weight on a small vector (a sink) scores low.

    Args:
        model: a BERT-family encoder loaded with eager attention (``BertSelfAttention`` layout).
        tokenizer: its tokenizer.
        sentences: the texts, tokenised as in :func:`attention_maps` (same padding, same order).
        max_length: truncation length.
        batch_size: sentences per forward pass.

    Returns:
        [layer, batch, query, key] non-negative, 0 on padding rows and columns.

    Introduced in nbs/01_attention_as_graph.ipynb (Kobayashi et al. 2020, "Attention is not only a weight").
    """
    enc = _eager_encoding(model, tokenizer, sentences, max_length, batch_size)
    mask = enc["attention_mask"].bool()  # [batch, pos]
    device = next(model.parameters()).device
    n_heads = model.config.num_attention_heads
    parts = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            part = {k: v[start : start + batch_size].to(device) for k, v in enc.items()}
            out = model(**part, output_attentions=True, output_hidden_states=True)
            layers = []
            for layer, probs, x in zip(model.encoder.layer, out.attentions, out.hidden_states, strict=False):
                batch, pos, d = x.shape
                d_head = d // n_heads
                value = layer.attention.self.value(x).view(batch, pos, n_heads, d_head)  # [batch, key, head, d_head]
                w_o = layer.attention.output.dense.weight.view(d, n_heads, d_head)  # [d_out, head, d_head]
                fx = torch.einsum("bshe,dhe->bshd", value, w_o)  # [batch, key, head, d]
                gram = fx @ fx.transpose(-1, -2)  # [batch, key, head, head]: <f^h(x_s), f^g(x_s)>
                # ||sum_h a^h_ts f^h(x_s)||^2 = sum_{h,g} a^h_ts a^g_ts <f^h(x_s), f^g(x_s)>, without [.., d]
                squared = torch.einsum("bhts,bgts,bshg->bts", probs, probs, gram)
                layers.append(squared.clamp_min(0).sqrt().float().cpu())  # [batch, query, key]
            parts.append(torch.stack(layers))  # [layer, chunk, query, key]
    norms = torch.cat(parts, dim=1)
    return norms * (mask[:, :, None] & mask[:, None, :])[None]


def _linear_layer_norm(v: Tensor, ln: nn.LayerNorm, states: Tensor) -> Tensor:
    """LayerNorm applied to each part ``v`` [..., part, d] of a sum: centred, scaled by gamma / sigma(states).

    The parts sum to the normalised states minus beta; ``states`` [..., d] is what the LayerNorm sees.
    """
    sigma = (states.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()  # [..., 1]
    return ln.weight * (v - v.mean(-1, keepdim=True)) / sigma[..., None, :]


def contribution_maps(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    method: str = "alti",
    max_length: int = 64,
    batch_size: int = 8,
) -> Tensor:
    """Per-layer token-to-token contributions that include the residual stream and the LayerNorms.

    Each BERT block's attention sub-layer writes ``s_i = x_i + sum_j sum_h a^h_ij f^h(x_j) + b_O`` into
    its first LayerNorm; splitting the sum by source token ``j`` and pushing every part through the
    LayerNorm as a linear map (centre, scale by ``gamma / sigma(s_i)``) gives vectors ``T_i(x_j)`` that
    add up, with the biases, to the LayerNorm's output ``y_i``.

    - ``"alti"`` (Ferrando, Gállego & Costa-jussà 2022): ``c_ij = max(0, ||y_i||_1 - ||y_i - T_i(x_j)||_1)``,
      rows normalised to sum to 1 (the reference code's ``min_sum`` scaling);
    - ``"globenc"`` (Modarressi et al. 2022, N_Enc): ``||LN2(T_i(x_j))||_2``, each part pushed through the
      second LayerNorm the same way (the feed-forward network itself is left out, as in the paper);
      not normalised (the reference code rolls out the raw norms).

    Args:
        model: a BERT-family encoder loaded with eager attention (``BertSelfAttention`` layout).
        tokenizer: its tokenizer; sentences are tokenised as in :func:`attention_maps`.
        sentences: the texts.
        method: ``"alti"`` or ``"globenc"``.
        max_length: truncation length.
        batch_size: sentences per forward pass (the parts take ``batch * pos^2 * d`` floats per layer).

    Returns:
        [layer, batch, query, key] non-negative, 0 on padding rows and columns; roll them out over
        layers with :func:`contribution_rollout`.

    Reference code: mt-upc/transformer-contributions (``src/contributions.py``) and
    mohsenfayyaz/GlobEnc (``src/modeling/modeling_bert.py``). Introduced in nbs/01_attention_as_graph.ipynb.
    """
    from helpers import hooks

    if method not in ("alti", "globenc"):
        raise ValueError(f"method must be 'alti' or 'globenc', got {method!r}")
    enc = _eager_encoding(model, tokenizer, sentences, max_length, batch_size)
    mask = enc["attention_mask"].bool()
    device = next(model.parameters()).device
    n_heads = model.config.num_attention_heads
    layers = model.encoder.layer
    n, width = mask.shape
    maps = torch.zeros(len(layers), n, width, width)
    order = torch.argsort(mask.sum(1), stable=True)  # shortest first: a batch is padded only to its longest
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            length = int(mask[rows].sum(1).max())
            part = {k: v[rows, :length].to(device) for k, v in enc.items()}
            seen: dict[str, Tensor] = {}

            def keep_input(name, store=seen):
                return lambda _m, args: store.__setitem__(name, args[0])

            watch = [(layer.attention.output.LayerNorm, "input", keep_input(f"ln1_in{n}"))
                     for n, layer in enumerate(layers)]  # fmt: skip
            watch += [(layer.output.LayerNorm, "input", keep_input(f"ln2_in{n}")) for n, layer in enumerate(layers)]
            outputs = {f"ln1_out{n}": layer.attention.output.LayerNorm for n, layer in enumerate(layers)}
            outputs |= {f"value{n}": layer.attention.self.value for n, layer in enumerate(layers)}
            with hooks.on_modules(watch), hooks.capture_modules(outputs) as cache:
                out = model(**part, output_attentions=True, output_hidden_states=True)
            per_layer = []
            for n, layer in enumerate(layers):
                x, probs = out.hidden_states[n], out.attentions[n]  # [batch, pos, d], [batch, head, q, k]
                batch, pos, d = x.shape
                value = cache[f"value{n}"].view(batch, pos, n_heads, d // n_heads)  # with its bias b_V
                w_o = layer.attention.output.dense.weight.view(d, n_heads, d // n_heads)
                fx = torch.einsum("bshe,dhe->bhsd", value, w_o)  # f^h(x_s): [batch, head, key, d]
                mixed = torch.einsum("bhts,bhsd->btsd", probs, fx)  # sum_h a^h_ts f^h(x_s): [batch, q, k, d]
                mixed = mixed + torch.diag_embed(x.transpose(1, 2)).permute(0, 2, 3, 1)  # + x_t on the diagonal
                ln1 = layer.attention.output.LayerNorm
                t = _linear_layer_norm(mixed, ln1, seen[f"ln1_in{n}"])  # T_t(x_s): [batch, q, k, d]
                if method == "alti":
                    y = cache[f"ln1_out{n}"]  # [batch, q, d] = sum_s T_t(x_s) + LN-mapped b_O + beta
                    c = (y.abs().sum(-1)[..., None] - (y[:, :, None] - t).abs().sum(-1)).clamp_min(0)
                    c = c * part["attention_mask"][:, None, :].to(c)
                    per_layer.append(c / c.sum(-1, keepdim=True).clamp_min(1e-12))
                else:
                    t2 = _linear_layer_norm(t, layer.output.LayerNorm, seen[f"ln2_in{n}"])
                    per_layer.append(t2.norm(dim=-1))
            maps[:, rows, :length, :length] = torch.stack(per_layer).float().cpu()  # [layer, chunk, q, k]
    return maps * (mask[:, :, None] & mask[:, None, :])[None]


def contribution_rollout(maps: Tensor) -> Tensor:
    """Roll per-layer contribution matrices out over depth: ``R_l = M_l R_{l-1}``, ``R_1 = M_1``.

    No identity is added (the residual stream is already inside ALTI's and GlobEnc's matrices) and
    nothing is re-normalised, as in both reference implementations.

    Args:
        maps: [layer, batch, query, key] from :func:`contribution_maps`.

    Returns:
        [layer, batch, query, key]; entry ``l`` is the contribution through layers ``1..l+1``.

    >>> contribution_rollout(torch.eye(2).expand(3, 1, 2, 2))[-1, 0]
    tensor([[1., 0.],
            [0., 1.]])
    """
    maps = _as_tensor(maps, "maps")
    if maps.ndim != 4 or maps.shape[-1] != maps.shape[-2]:
        raise ValueError(f"maps must be [layer, batch, query, key] with query = key, got {tuple(maps.shape)}")
    if not bool(torch.isfinite(maps).all()) or bool((maps < 0).any()):
        raise ValueError("maps must be finite and non-negative")
    history = [maps[0]]
    for layer in maps[1:]:
        history.append(layer @ history[-1])
    return torch.stack(history)


class GradientMaps(NamedTuple):
    """Attention probabilities with the gradient of one scalar output, for a batch of sentences."""

    attn: Tensor  # [layer, batch, head, query, key], 0 on padding
    grad: Tensor  # [layer, batch, head, query, key], d output / d attention, 0 on padding
    input_x_grad: Tensor  # [batch, pos], || x_s * d output / d x_s ||_2 over the embedding, 0 on padding
    mask: Tensor  # [batch, pos] bool, True on real tokens


def attention_gradients(
    model: nn.Module,
    tokenizer,
    sentences: Sequence[str],
    *,
    target,
    max_length: int = 64,
    batch_size: int = 32,
) -> GradientMaps:
    """Attention probabilities and the gradient of a scalar output with respect to them and to the input.

    One forward and one backward pass per batch give what gradient-weighted rollout
    (:func:`grad_rollout`) and input x gradient need.

    Args:
        model: a Hugging Face encoder loaded with eager attention.
        tokenizer: its tokenizer.
        sentences: the texts, tokenised as in :func:`attention_maps`.
        target: ``f(last_hidden [batch, pos, d], attention_mask [batch, pos], index [batch]) -> [batch]``,
            the scalar explained for each sentence (``index`` holds the sentences' positions in
            ``sentences``, to look up a label); sentences must not interact (no batch statistics).
        max_length: truncation length.
        batch_size: sentences per forward/backward pass.

    Returns:
        :class:`GradientMaps` ``(attn, grad, input_x_grad, mask)``.

    Introduced in nbs/01_attention_as_graph.ipynb (Chefer et al. 2021).
    """
    if isinstance(sentences, str) or not isinstance(sentences, Sequence) or len(sentences) == 0:
        raise ValueError("sentences must be a non-empty list of strings (wrap a single sentence in a list)")
    if not callable(target):
        raise ValueError("target must be a function (last_hidden, attention_mask, index) -> [batch] scalars")
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise ValueError("the model must return attention probabilities: load it with attn_implementation='eager'")
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    mask = enc["attention_mask"].bool()
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    attn_parts, grad_parts, ixg_parts = [], [], []
    for start in range(0, len(sentences), batch_size):
        ids = enc["input_ids"][start : start + batch_size].to(device)
        am = enc["attention_mask"][start : start + batch_size].to(device)
        x = embed(ids).detach().requires_grad_(True)  # [batch, pos, d]
        out = model(inputs_embeds=x, attention_mask=am, output_attentions=True)
        for a in out.attentions:
            a.retain_grad()
        index = torch.arange(start, start + len(ids), device=device)
        scalars = target(out.last_hidden_state, am, index)
        if scalars.shape != (len(ids),):
            raise ValueError(
                f"target must return one scalar per sentence, shape ({len(ids)},), got {tuple(scalars.shape)}"
            )
        scalars.sum().backward()
        attn_parts.append(torch.stack([a.detach() for a in out.attentions]).float().cpu())
        grad_parts.append(torch.stack([a.grad for a in out.attentions]).float().cpu())
        ixg_parts.append((x * x.grad).norm(dim=-1).detach().float().cpu() * am.cpu())
    pair = (mask[:, :, None] & mask[:, None, :])[None, :, None]  # [1, batch, 1, query, key]
    return GradientMaps(
        torch.cat(attn_parts, dim=1) * pair, torch.cat(grad_parts, dim=1) * pair, torch.cat(ixg_parts), mask
    )


def grad_rollout(attn: Tensor, grad: Tensor, *, all_layers: bool = False) -> Tensor:
    """Gradient-weighted attention rollout (Chefer et al. 2021, eqs. 5-6).

    Each layer's heads are weighted by the gradient of the explained output, negative parts dropped
    and heads averaged, ``Ā = E_h[(∇A ⊙ A)^+]``; relevance starts as the identity and accumulates
    ``R <- R + Ā R`` from the first layer up. Unlike :func:`rollout`, rows are not re-normalised and a
    head whose weights would lower the output counts for nothing.

    Args:
        attn: [layer, batch, head, query, key] attention probabilities.
        grad: the gradient of the output with respect to ``attn``, same shape
            (:func:`attention_gradients`).
        all_layers: also return the relevance after every layer.

    Returns:
        [batch, query, key] (or [layer, batch, query, key]), 0 on padding (rows whose attention is 0).

    >>> a = torch.eye(2).expand(3, 1, 1, 2, 2)  # three layers that attend to themselves
    >>> grad_rollout(a, torch.ones_like(a))[0]  # each layer doubles the identity: 2^3
    tensor([[8., 0.],
            [0., 8.]])

    Chefer, Gur & Wolf (2021), "Generic attention-model explainability for interpreting bi-modal and
    encoder-decoder transformers". Introduced in nbs/01_attention_as_graph.ipynb.
    """
    attn, grad = _as_tensor(attn, "attn"), _as_tensor(grad, "grad")
    if attn.ndim != 5:
        raise ValueError(f"attn must be [layer, batch, head, query, key], got shape {tuple(attn.shape)}")
    if grad.shape != attn.shape:
        raise ValueError(f"grad must have the shape of attn {tuple(attn.shape)}, got {tuple(grad.shape)}")
    _check_probabilities(attn, "attn")
    real = attn[0].sum(-1).amax(1) > 0.5  # [batch, query]
    weighted = (grad * attn).clamp_min(0).mean(2)  # [layer, batch, query, key]
    eye = torch.eye(attn.shape[-1], dtype=attn.dtype, device=attn.device)
    result = eye.expand_as(weighted[0])
    history = []
    for layer in weighted:
        result = result + layer @ result
        history.append(result)
    keep = (real[:, :, None] & real[:, None, :]).to(attn.dtype)
    if all_layers:
        return torch.stack(history) * keep
    return result * keep


# ---------------------------------------------------------------------------------------------
# The paper's setting: subject-verb number agreement, read by a probe on the frozen encoder
# ---------------------------------------------------------------------------------------------


class VerbNumber(NamedTuple):
    """Sentences with one present-tense verb masked, its number, and linear probes that predict it."""

    train: list[str]  # sentences with the verb replaced by [MASK]
    train_labels: np.ndarray  # [train] 1 = plural (VBP), 0 = singular (VBZ)
    test: list[str]
    test_labels: np.ndarray  # [test]
    probes: dict[str, tuple[Tensor, Tensor]]  # readout ("cls", "mean") -> (weight [2, d], bias [2])


VERB_NUMBER_VERSION = 1


def _verb_candidates(pool: Sequence[str], tokenizer, max_tokens: int) -> list[tuple[int, int, int, int]]:
    """(pool index, verb start, verb end, label) for sentences with exactly one present-tense verb and a subject."""
    from helpers.assets import spacy_pipeline

    lengths = [len(ids) for ids in tokenizer(list(pool))["input_ids"]]
    kept = [i for i, n in enumerate(lengths) if n <= max_tokens]
    nlp = spacy_pipeline()
    found = []
    for i, doc in zip(kept, nlp.pipe([pool[i] for i in kept], batch_size=256, disable=["ner"]), strict=True):
        verbs = [t for t in doc if t.tag_ in ("VBZ", "VBP")]
        if len(verbs) != 1:
            continue
        verb = verbs[0]
        subjects = [c for c in verb.children if c.dep_ in ("nsubj", "nsubjpass")]
        if len(subjects) != 1 or subjects[0].lower_ in ("i", "you"):  # VBP without a plural subject
            continue
        found.append((i, verb.idx, verb.idx + len(verb.text), int(verb.tag_ == "VBP")))
    return found


def _mask_verb(sentence: str, start: int, end: int, mask_token: str) -> str:
    return sentence[:start] + mask_token + sentence[end:]


def _readout_features(model, tokenizer, sentences, max_length, batch_size=64) -> dict[str, Tensor]:
    feats = {"cls": [], "mean": []}
    with torch.inference_mode():
        for _, enc in encode_batches(tokenizer, sentences, batch_size=batch_size, max_length=max_length):
            hidden = model(**enc).last_hidden_state  # [batch, pos, d]
            feats["cls"].append(hidden[:, 0])
            weights = enc["attention_mask"].to(hidden.dtype)[..., None]
            feats["mean"].append((hidden * weights).sum(1) / weights.sum(1))
    return {k: torch.cat(v).float() for k, v in feats.items()}


def verb_number_task(
    model: nn.Module, tokenizer, *, n_test: int = 300, max_tokens: int = 64, seed: int = 0
) -> VerbNumber:
    """The subject-verb number task of Abnar & Zuidema (2020) on the book's Wikipedia sentences.

    Sentences with exactly one present-tense verb (spaCy tag VBZ or VBP, with one nominal subject,
    not "I"/"you") get that verb replaced by ``[MASK]``; the label is its number (1 = plural). The
    classes are balanced by subsampling the singular ones, ``n_test`` sentences are held out, and a
    logistic-regression probe is fitted on the rest for each readout of the frozen encoder's last
    layer: the ``[CLS]`` vector and the mean of all positions. The split and the probes are a small
    committed artefact (tagging the ~17k sentences takes about two minutes on 2 cores).

    Args:
        model, tokenizer: the frozen encoder (MiniLM-L6) and its tokenizer.
        n_test: held-out sentences (half of each class).
        max_tokens: longest sentence kept, in word pieces with ``[CLS]`` and ``[SEP]``.
        seed: seed of the subsampling and the split.

    Returns:
        :class:`VerbNumber`; a probe maps a readout ``h`` [batch, d] to logits ``h W^T + b`` [batch, 2].

    Introduced in nbs/01_attention_as_graph.ipynb (Abnar & Zuidema 2020, §2; Linzen et al. 2016).
    """
    from sklearn.linear_model import LogisticRegression

    from helpers import common
    from helpers.assets import wikipedia_sentences

    if n_test < 2 or n_test % 2:
        raise ValueError(f"n_test must be an even number >= 2 (half per class), got {n_test}")
    if max_tokens < 8:
        raise ValueError(f"max_tokens must be >= 8, got {max_tokens}")
    pool = wikipedia_sentences(max_words=200)
    model_name = "/".join(str(model.config.name_or_path).rstrip("/").split("/")[-2:])
    recipe = {"v": VERB_NUMBER_VERSION, "n_test": n_test, "max_tokens": max_tokens, "seed": seed,
              "pool": common.content_hash(pool), "model": model_name}
    path = common.cache_dir("ch1") / f"verb-number-{common.content_hash(recipe)}.npz"

    def build(out) -> None:
        found = np.array(_verb_candidates(pool, tokenizer, max_tokens), dtype=np.int64)  # [sentence, 4]
        rng = np.random.default_rng(seed)
        plural, singular = np.nonzero(found[:, 3] == 1)[0], np.nonzero(found[:, 3] == 0)[0]
        if min(len(plural), len(singular)) <= n_test // 2:
            raise ValueError(f"only {len(plural)} plural and {len(singular)} singular sentences; lower n_test")
        singular = rng.choice(singular, size=len(plural), replace=False)
        test = np.concatenate([rng.choice(c, n_test // 2, replace=False) for c in (plural, singular)])
        train = np.setdiff1d(np.concatenate([plural, singular]), test)
        rows = {"train": found[rng.permutation(train)], "test": found[rng.permutation(test)]}
        texts = [_mask_verb(pool[i], a, b, tokenizer.mask_token) for i, a, b, _ in rows["train"]]
        feats = _readout_features(model, tokenizer, texts, max_tokens)
        arrays = {f"{k}_rows": v for k, v in rows.items()}
        for name, x in feats.items():
            clf = LogisticRegression(C=1.0, max_iter=2000).fit(x.numpy(), rows["train"][:, 3])
            # two-class logits [-z/2, z/2] give the same probabilities as sklearn's sigmoid(z)
            w, b = clf.coef_[0], clf.intercept_[0]
            arrays[f"{name}_weight"] = np.stack([-w / 2, w / 2]).astype(np.float32)
            arrays[f"{name}_bias"] = np.array([-b / 2, b / 2], dtype=np.float32)
        with open(out, "wb") as fh:
            np.savez(fh, **arrays)

    with np.load(common.cached_file(path, build, committed=True)) as data:
        texts = {split: [_mask_verb(pool[i], a, b, tokenizer.mask_token) for i, a, b, _ in data[f"{split}_rows"]]
                 for split in ("train", "test")}
        probes = {k: (torch.from_numpy(data[f"{k}_weight"]), torch.from_numpy(data[f"{k}_bias"]))
                  for k in ("cls", "mean")}
        return VerbNumber(texts["train"], data["train_rows"][:, 3].copy(), texts["test"],
                          data["test_rows"][:, 3].copy(), probes)


SETTINGS = {  # what is explained -> (where the graph is read, probe readout or None for the sentence vector)
    "sentence vector": ("mean", None),
    "probe on [CLS]": (0, "cls"),
    "probe on mean": ("mean", "mean"),
}
"""The three settings of Chapter 1's experiment: the mean-pooled sentence vector (blank-out on its
cosine), and the verb-number probe read at ``[CLS]`` or at the mean (blank-out on the probability of
the correct class, as Abnar & Zuidema 2020 do)."""


def probe_logits(task: VerbNumber, hidden: Tensor, attention_mask: Tensor, readout: str) -> Tensor:
    """The verb-number probe's logits [batch, 2] from last hidden states [batch, pos, d] (``readout``: cls or mean)."""
    if readout not in task.probes:
        raise ValueError(f"readout must be one of {sorted(task.probes)}, got {readout!r}")
    if readout == "cls":
        features = hidden[:, 0]
    else:
        weights = attention_mask.to(hidden.dtype)[..., None]
        features = (hidden * weights).sum(1) / weights.sum(1)
    weight, bias = task.probes[readout]
    return features @ weight.to(features).T + bias.to(features)


def setting_target(task: VerbNumber, setting: str, labels: Tensor):
    """The scalar explained by gradients in a setting: ``||e(x)||``, or the correct class's probe logit.

    Returns ``f(last_hidden, attention_mask, index) -> [batch]`` for :func:`attention_gradients`.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {list(SETTINGS)}, got {setting!r}")
    readout = SETTINGS[setting][1]
    if readout is None:
        def target(hidden, attention_mask, index):
            weights = attention_mask.to(hidden.dtype)[..., None]
            return ((hidden * weights).sum(1) / weights.sum(1)).norm(dim=-1)
    else:
        def target(hidden, attention_mask, index):
            logits = probe_logits(task, hidden, attention_mask, readout)
            return logits.gather(1, labels.to(index.device)[index, None])[:, 0]
    return target


def setting_importance(
    model: nn.Module, tokenizer, task: VerbNumber, sentences: Sequence[str], labels, *, max_length: int = 64
) -> dict[str, Tensor]:
    """Blank-out, input x gradient and gradient-weighted rollout for every setting of :data:`SETTINGS`.

    Blank-out is ``1 - cos`` for the sentence vector and the drop in the correct class's probability
    for a probe; input x gradient and gradient-weighted rollout differentiate :func:`setting_target`.

    Returns:
        a dict, settings in the order of :data:`SETTINGS`:
        ``"blank"`` [setting, batch, pos], ``"input_x_grad"`` [setting, batch, pos] and
        ``"grad_rollout"`` [setting, layer, batch, key] (the rollout read at the setting's output).
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if labels.shape != (len(sentences),):
        raise ValueError(f"need one label per sentence, got {tuple(labels.shape)} for {len(sentences)} sentences")

    def outputs(hidden, attention_mask):  # sentence vector, then each probe's class probabilities
        weights = attention_mask.to(hidden.dtype)[..., None]
        parts = [(hidden * weights).sum(1) / weights.sum(1)]
        parts += [probe_logits(task, hidden, attention_mask, k).softmax(-1) for k in ("cls", "mean")]
        return torch.cat(parts, -1)

    base, blanked = blank_out_outputs(model, tokenizer, sentences, readout=outputs, max_length=max_length)
    d = base.shape[1] - 4
    untouched = (blanked == base[:, None]).all(-1)
    index = labels[:, None, None].expand(-1, blanked.shape[1], 1)
    blank = [1 - F.cosine_similarity(blanked[..., :d], base[:, None, :d].expand_as(blanked[..., :d]), dim=-1)]
    for k in (d, d + 2):
        blank.append((base[:, None, k : k + 2] - blanked[..., k : k + 2]).gather(-1, index)[..., 0])
    result = {"blank": torch.stack(blank).masked_fill(untouched, 0.0), "input_x_grad": [], "grad_rollout": []}
    for setting, (output, _) in SETTINGS.items():
        g = attention_gradients(model, tokenizer, sentences, target=setting_target(task, setting, labels),
                                max_length=max_length)
        result["input_x_grad"].append(g.input_x_grad)
        result["grad_rollout"].append(read_out(grad_rollout(g.attn, g.grad, all_layers=True), g.mask, output=output))
    result["input_x_grad"] = torch.stack(result["input_x_grad"])
    result["grad_rollout"] = torch.stack(result["grad_rollout"])
    return result


def verb_number_importance(model: nn.Module, tokenizer, task: VerbNumber, *, max_length: int = 64) -> dict[str, Tensor]:
    """:func:`setting_importance` on all of ``task.test``, as a committed artefact.

    About 8,000 blank-out passes and three backward passes per sentence cost about 100 s on
    2 cores; the result (about 1 MB) is committed and verified by hash, and rebuilt when missing.
    Chapter 1 recomputes a few sentences and checks them against it.
    """
    from helpers import common

    recipe = {"v": VERB_NUMBER_VERSION, "test": common.content_hash(task.test), "max_length": max_length,
              "probes": common.content_hash({k: [w.tolist(), b.tolist()] for k, (w, b) in task.probes.items()})}
    path = common.cache_dir("ch1") / f"verb-number-importance-{common.content_hash(recipe)}.pt"

    def build(out) -> None:
        maps = setting_importance(model, tokenizer, task, task.test, task.test_labels, max_length=max_length)
        torch.save(maps, out)

    return torch.load(common.cached_file(path, build, committed=True), weights_only=True)


NORM_READINGS = ("value norms", "GlobEnc", "ALTI")
"""The readings of Chapter 1 that need the value vectors, not only the attention probabilities."""

NORM_READINGS_VERSION = 1


def norm_readings(
    model: nn.Module, tokenizer, sentences: Sequence[str], *, max_length: int = 64
) -> dict[str, dict[int | str, Tensor]]:
    """Value norms per layer and the GlobEnc and ALTI rollouts, read at ``[CLS]`` and at the mean.

    :func:`value_norms` of every layer, and :func:`contribution_rollout` of :func:`contribution_maps`
    (``"globenc"`` and ``"alti"``) up to every layer, each read with :func:`read_out` at the two
    outputs of :data:`SETTINGS` (position ``0`` and ``"mean"``). Sentences are tokenised as in
    :func:`attention_maps` (padded to the longest, truncated at ``max_length``).

    Returns:
        ``{method: {0: [layer, batch, key], "mean": [layer, batch, key]}}`` for the methods of
        :data:`NORM_READINGS`, float32, 0 on padding keys.

    Introduced in nbs/01_attention_as_graph.ipynb (Kobayashi et al. 2020; Modarressi et al. 2022;
    Ferrando et al. 2022).
    """
    mask = _eager_encoding(model, tokenizer, sentences, max_length, 1)["attention_mask"].bool()  # [batch, pos]
    per_layer = {
        "value norms": value_norms(model, tokenizer, sentences, max_length=max_length),
        **{m: contribution_rollout(contribution_maps(model, tokenizer, sentences, method=m.lower(),
                                                     max_length=max_length))
           for m in ("GlobEnc", "ALTI")},
    }  # method -> [layer, batch, query, key]
    return {m: {out: read_out(x, mask, output=out).float() for out in (0, "mean")} for m, x in per_layer.items()}


def verb_number_readings(
    model: nn.Module, tokenizer, task: VerbNumber, *, max_length: int = 64
) -> dict[str, dict[int | str, Tensor]]:
    """:func:`norm_readings` on all of ``task.test``, as a committed artefact.

    Splitting every attention sub-layer's output by source token keeps a [batch, query, key, d]
    tensor per layer, which costs about 25 s for Chapter 1's 300 held-out sentences on 2 cores; the
    read-outs (about 1 MB: the real tokens of each sentence only, float32) are committed, verified by
    hash, and rebuilt by this function when missing. Chapter 1 recomputes the first sentences with
    :func:`norm_readings` and checks them against it.

    Returns:
        as :func:`norm_readings`, padded to the longest held-out sentence.
    """
    from helpers import common

    model_name = "/".join(str(model.config.name_or_path).rstrip("/").split("/")[-2:])
    recipe = {"v": NORM_READINGS_VERSION, "model": model_name, "test": common.content_hash(task.test),
              "max_length": max_length, "methods": list(NORM_READINGS), "outputs": [0, "mean"]}
    path = common.cache_dir("results", "ch1") / f"norm-readings-{common.content_hash(recipe)}.pt"

    def build(out) -> None:
        readings = norm_readings(model, tokenizer, task.test, max_length=max_length)
        mask = _eager_encoding(model, tokenizer, task.test, max_length, 1)["attention_mask"].bool()
        packed = {}
        for m, by_output in readings.items():
            for o, x in by_output.items():
                if bool(x[:, ~mask].any()):
                    raise RuntimeError(f"{m} read at {o!r} is not 0 on padding keys")
                packed[f"{m}/{o}"] = x[:, mask].contiguous()  # [layer, real tokens of all sentences]
        torch.save({"lengths": mask.sum(1).to(torch.int16), "packed": packed}, out)

    stored = torch.load(common.cached_file(path, build, committed=True), weights_only=True)
    lengths = stored["lengths"].long()
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]  # [batch, pos]
    result: dict[str, dict[int | str, Tensor]] = {}
    for key, values in stored["packed"].items():
        m, o = key.rsplit("/", 1)
        full = torch.zeros(values.shape[0], *mask.shape, dtype=values.dtype)
        full[:, mask] = values
        result.setdefault(m, {})[0 if o == "0" else o] = full
    return result
