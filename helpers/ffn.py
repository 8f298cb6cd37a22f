"""Feed-forward layers read as key-value memories (Geva et al. 2021, 2022), on gated (SwiGLU) decoders.

Geva, Schuster, Berant & Levy (2021, "Transformer Feed-Forward Layers Are Key-Value Memories") write
a ReLU feed-forward layer as ``FF(x) = sum_i ReLU(x . k_i) v_i``: row ``i`` of the first matrix is a
*key* that detects a pattern in the input, column ``i`` of the second matrix is a *value* that the
layer adds to the residual stream, weighted by the *memory coefficient* ``m_i = ReLU(x . k_i)``.
Llama-style models (SmolLM2) use a gated unit, ``FF(x) = W_down (silu(W_gate x) * W_up x)``, so here

    m_i = silu(g_i . x) * (u_i . x),        FF(x) = sum_i m_i v_i,   v_i = W_down[:, i],

with two keys per memory (a gate and an "up" key) and a coefficient that can be negative. The input of
``down_proj`` is exactly the vector ``m`` (``[batch, pos, d_mlp]``): the hook layer's
``blocks.{l}.mlp.hook_post`` site (:mod:`helpers.hooks`).

Geva, Caciularu, Wang & Goldberg (2022, "Transformer Feed-Forward Layers Build Predictions by
Promoting Concepts in the Vocabulary Space") read each ``m_i v_i`` as a sub-update promoting tokens
``E v_i`` and steer generation by setting chosen coefficients.

Introduced in nbs/05_ffn_memories.ipynb (Chapter 5), which derives and uses every function here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from helpers import hooks

__all__ = [
    "Triggers",
    "greedy_ids",
    "held_out_mass",
    "knockout_logprobs",
    "knockout_results",
    "knockout_study",
    "model_key",
    "rounding_noise_results",
    "rounding_noise_study",
    "steering_results",
    "steering_study",
    "tokens_key",
    "trigger_coefficients",
    "trigger_results",
    "trigger_study",
    "window_losses",
    "TopK",
    "capture_coefficients",
    "coefficients",
    "concept_scores",
    "feed_forward_layers",
    "intervene",
    "grid_share",
    "load_value_summary",
    "next_token_losses",
    "next_token_probs",
    "quantisation_steps",
    "random_memories",
    "rounding_noise",
    "value_logits_at",
    "value_summary",
    "mine_triggers",
    "token_windows",
    "value_logits",
    "value_tokens",
]


# ---------------------------------------------------------------------------------------------
# The model's feed-forward layers and their memory coefficients
# ---------------------------------------------------------------------------------------------


def _decoder(model: nn.Module) -> nn.Module:
    """The bare decoder (``LlamaModel``) of a causal LM, or the model itself when it is already bare."""
    inner = getattr(model, "model", None)
    base = inner if inner is not None and hasattr(inner, "layers") else model
    layers = getattr(base, "layers", None)
    ok = layers is not None and len(layers) > 0
    ok = ok and all(hasattr(getattr(layer, "mlp", None), n) for layer in layers for n in ("gate_proj", "up_proj"))
    ok = ok and all(hasattr(layer.mlp, n) for layer in layers for n in ("down_proj", "act_fn"))
    if not ok:
        raise ValueError(
            "model must be a Llama-style decoder with gated feed-forward layers (model.layers[i].mlp with "
            "gate_proj, up_proj, down_proj, act_fn), e.g. the first value of helpers.assets.smollm2()"
        )
    return base


def feed_forward_layers(model: nn.Module) -> list[nn.Module]:
    """The gated feed-forward modules (``LlamaMLP``) of a Llama-style model, first layer first.

    Args:
        model: a ``LlamaForCausalLM`` or a bare ``LlamaModel``.

    Returns:
        one module per layer, each with ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn``.

    Introduced in nbs/05_ffn_memories.ipynb.
    """
    return [layer.mlp for layer in _decoder(model).layers]


def _check_layers(model: nn.Module, layers: Sequence[int] | None) -> tuple[int, ...]:
    n = len(_decoder(model).layers)
    if layers is None:
        return tuple(range(n))
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise ValueError("layers is empty: pass None for every layer, or a list of layer indices")
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise ValueError(f"layer {bad[0]} out of range: this model has layers 0..{n - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat, got {list(layers)}")
    return layers


def coefficients(mlp: nn.Module, x: Tensor) -> Tensor:
    """Memory coefficients of a gated feed-forward layer, ``m = act(gate(x)) * up(x)``.

    The layer's output is ``down_proj(m) = sum_i m_i v_i`` with ``v_i`` column ``i`` of ``down_proj``.

    Args:
        mlp: one ``LlamaMLP`` (see :func:`feed_forward_layers`).
        x: its input, ``[..., d]`` (the residual stream after the layer's RMSNorm).

    Returns:
        ``[..., d_mlp]``, the coefficient of every memory at every position.

    >>> from transformers import LlamaConfig
    >>> from transformers.models.llama.modeling_llama import LlamaMLP
    >>> cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1)
    >>> mlp = LlamaMLP(cfg); x = torch.randn(2, 8)
    >>> torch.allclose(mlp.down_proj(coefficients(mlp, x)), mlp(x), atol=1e-6)
    True

    Geva et al. (2021), eq. 2, with the SwiGLU gate of Shazeer (2020).
    """
    if x.shape[-1] != mlp.gate_proj.in_features:
        raise ValueError(f"x must end with the model width {mlp.gate_proj.in_features}, got shape {tuple(x.shape)}")
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


@contextlib.contextmanager
def capture_coefficients(model: nn.Module, *, layers: Sequence[int] | None = None) -> Iterator[dict[int, Tensor]]:
    """Record the memory coefficients of chosen layers during the forward passes run inside the block.

    The hook layer's ``blocks.{l}.mlp.hook_post`` site, the input of ``down_proj``, is exactly ``m``
    (:func:`helpers.hooks.observe`). Hooks are always removed on exit, even when the forward pass raises.

    Args:
        model: a Llama-style causal LM or decoder.
        layers: layer indices (``None``: all).

    Yields:
        ``{layer: m}`` with ``m`` of shape ``[batch, pos, d_mlp]`` (a later forward pass overwrites it).

    Introduced in nbs/05_ffn_memories.ipynb.
    """
    layers = _check_layers(model, layers)
    cache: dict[int, Tensor] = {}

    def keep(site: str, m: Tensor) -> None:
        cache[int(site.split(".")[1])] = m.detach()

    with hooks.observe(model, [_coefficient_site(layer) for layer in layers], keep):
        yield cache


def _coefficient_site(layer: int) -> str:
    """The hook layer's name for the memory coefficients of ``layer`` (the input of ``down_proj``)."""
    return f"blocks.{layer}.mlp.hook_post"


# ---------------------------------------------------------------------------------------------
# Trigger examples: a streaming top-k over a corpus
# ---------------------------------------------------------------------------------------------


def token_windows(
    tokenizer, texts: Sequence[str], *, length: int = 64, start_token: str | None = None, per_text: int | None = None
) -> Tensor:
    """Cut texts into windows of ``length`` tokens, each opened by a start-of-document token.

    The texts are tokenised in one call and each is cut into consecutive, non-overlapping windows
    (a short tail is dropped). The start token (by default ``<|endoftext|>`` when the vocabulary has
    it, else the tokenizer's ``eos_token``) gives every window the same first position, which
    language models use as an attention sink; :func:`mine_triggers` skips it by default.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: non-empty strings (articles, novels, passages).
        length: tokens per window, start token excluded.
        start_token: the token put first; ``None`` for the default above, ``""`` for none.
        per_text: keep at most this many windows of each text (``None``: all).

    Returns:
        ``[window, length + 1]`` token ids (``[window, length]`` without a start token), windows of
        the first text first.

    Introduced in nbs/05_ffn_memories.ipynb.
    """
    if isinstance(texts, str) or not texts or not any(t.strip() for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings (e.g. Wikipedia articles)")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if per_text is not None and (not isinstance(per_text, int) or per_text < 1):
        raise ValueError(f"per_text must be a positive int or None, got {per_text!r}")
    if start_token is None:
        # round trip through the vocabulary: a token missing from it comes back as the unknown token
        eot = "<|endoftext|>"
        known = tokenizer.convert_ids_to_tokens(tokenizer.convert_tokens_to_ids(eot)) == eot
        start_token = eot if known else tokenizer.eos_token
    head = [tokenizer.convert_tokens_to_ids(start_token)] if start_token else []
    rows = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        starts = list(range(0, len(ids) - length + 1, length))[:per_text]
        rows += [head + ids[s : s + length] for s in starts]
    if not rows:
        raise ValueError(f"no text is {length} tokens long: pass longer texts or a smaller length")
    return torch.tensor(rows, dtype=torch.long)


class Triggers(NamedTuple):
    """Result of :func:`mine_triggers`: the top-k trigger examples of every memory of chosen layers.

    Attributes:
        coef: ``[layer, d_mlp, k]`` memory coefficients, largest first (``-inf`` where fewer than k
            candidates were seen).
        doc: ``[layer, d_mlp, k]`` index of the window (row of the ``windows`` tensor), ``-1`` if none.
        pos: ``[layer, d_mlp, k]`` position in that window; the trigger prefix is ``windows[doc, :pos + 1]``.
        layers: the model layer of each entry of the layer axis.
        n_tokens: how many token positions were scored (eligible positions of all windows).
    """

    coef: Tensor
    doc: Tensor
    pos: Tensor
    layers: tuple[int, ...]
    n_tokens: int


class TopK:
    """Streaming top-k of memory coefficients per (layer, memory), keeping (coefficient, window, position).

    Memory is fixed at creation, ``O(layer x d_mlp x (k + capacity))`` whatever the corpus size:
    each batch's candidates are copied into free columns after the current best ``k`` and merged
    (one ``topk``) when the columns are full, so no allocation survives a batch.

    Args:
        n_layers, d_mlp: buffer shape.
        k: trigger examples kept per memory.
        per_document: keep at most one position per window (its largest coefficient), so that the k
            examples come from k different windows; otherwise rank every token position.
        capacity: candidate columns per memory between merges.

    >>> top = TopK(1, 2, k=2)
    >>> top.update(0, torch.tensor([[[1., 5.], [3., 0.]]]), docs=torch.tensor([7]))
    >>> top.coef[0].tolist(), top.pos[0].tolist()
    ([[3.0, -inf], [5.0, -inf]], [[1, -1], [0, -1]])
    """

    def __init__(self, n_layers: int, d_mlp: int, *, k: int = 25, per_document: bool = True, capacity: int = 128):
        if not isinstance(k, int) or k <= 0:
            raise ValueError(f"k must be a positive int (trigger examples per memory), got {k!r}")
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.k, self.per_document, self.capacity = k, per_document, capacity
        self._coef = torch.full((n_layers, d_mlp, k + capacity), float("-inf"))
        self._doc = torch.full((n_layers, d_mlp, k + capacity), -1, dtype=torch.int32)
        self._pos = torch.full((n_layers, d_mlp, k + capacity), -1, dtype=torch.int32)
        self._fill = [k] * n_layers  # first free column of each slot

    def update(self, slot: int, m: Tensor, *, docs: Tensor, min_position: int = 0) -> None:
        """Add one batch of coefficients ``m`` [batch, pos, d_mlp] of windows ``docs`` [batch] to ``slot``."""
        m = m.detach()[:, min_position:].float()  # positions before min_position never trigger
        batch, n_pos, d_mlp = m.shape
        if self.per_document:
            cand, where = m.max(dim=1)  # [batch, d_mlp]: the best position of each window
            self._add(slot, cand, docs.view(batch, 1), where + min_position)
        else:
            flat = m.reshape(batch * n_pos, d_mlp)  # [batch * pos, d_mlp]
            where = (torch.arange(n_pos) + min_position).repeat(batch).view(-1, 1)
            doc = docs.repeat_interleave(n_pos).view(-1, 1)
            for s in range(0, flat.shape[0], self.capacity):
                self._add(slot, flat[s : s + self.capacity], doc[s : s + self.capacity], where[s : s + self.capacity])

    def _add(self, slot: int, cand: Tensor, doc: Tensor, where: Tensor) -> None:
        """Copy candidates [n, d_mlp] (with their window [n, 1] and position [n, 1 or d_mlp]) into free columns."""
        n = cand.shape[0]
        if self._fill[slot] + n > self.k + self.capacity:
            self._merge(slot)
        at = slice(self._fill[slot], self._fill[slot] + n)
        self._coef[slot, :, at] = cand.T
        self._doc[slot, :, at] = doc.T.to(torch.int32)
        self._pos[slot, :, at] = where.T.to(torch.int32)
        self._fill[slot] += n

    def _merge(self, slot: int) -> None:
        fill = self._fill[slot]
        if fill == self.k:
            return
        best, idx = self._coef[slot, :, :fill].topk(self.k, dim=1)
        missing = best == float("-inf")
        self._doc[slot, :, : self.k] = self._doc[slot, :, :fill].gather(1, idx).masked_fill(missing, -1)
        self._pos[slot, :, : self.k] = self._pos[slot, :, :fill].gather(1, idx).masked_fill(missing, -1)
        self._coef[slot, :, : self.k] = best
        self._fill[slot] = self.k

    def _flush(self) -> None:
        for slot in range(len(self._fill)):
            self._merge(slot)

    @property
    def coef(self) -> Tensor:
        """[layer, d_mlp, k] coefficients, largest first (``-inf`` where fewer than k candidates were seen)."""
        self._flush()
        return self._coef[:, :, : self.k].clone()

    @property
    def doc(self) -> Tensor:
        """[layer, d_mlp, k] window indices (``-1`` where missing)."""
        self._flush()
        return self._doc[:, :, : self.k].long()

    @property
    def pos(self) -> Tensor:
        """[layer, d_mlp, k] positions in the window (``-1`` where missing)."""
        self._flush()
        return self._pos[:, :, : self.k].long()


@torch.inference_mode()
def mine_triggers(
    model: nn.Module,
    windows: Tensor,
    *,
    k: int = 25,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    min_position: int = 1,
    per_document: bool = True,
    progress: bool = False,
) -> Triggers:
    """Top-k trigger examples of every memory: the prefixes on which its coefficient is largest.

    Runs the decoder (without its vocabulary head) over ``windows`` in batches, stopping after the last
    mined layer; a hook (:func:`helpers.hooks.observe`) at each ``down_proj`` input merges the batch's
    coefficients into a :class:`TopK` buffer, so no activation tensor of the corpus is ever held in memory.

    Args:
        model: a Llama-style causal LM in eval mode (e.g. SmolLM2 from ``helpers.assets.smollm2``).
        windows: ``[window, pos]`` token ids of equal length, e.g. from :func:`token_windows`.
        k: trigger examples per memory (Geva et al. use 25).
        layers: layers to mine (``None``: all).
        batch_size: windows per forward pass.
        min_position: positions before this one are never triggers (1 skips the start token).
        per_document: at most one trigger per window (see :class:`TopK`).
        progress: show a tqdm bar.

    Returns:
        a :class:`Triggers`; ``coef`` is ``[len(layers), d_mlp, k]``.

    Introduced in nbs/05_ffn_memories.ipynb (Geva et al. 2021, §3.1).
    """
    layers = _check_layers(model, layers)
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int (trigger examples per memory), got {k!r}")
    if not isinstance(windows, Tensor) or windows.ndim != 2 or windows.dtype not in (torch.long, torch.int):
        raise ValueError("windows must be a [window, pos] tensor of token ids (see ffn.token_windows)")
    if windows.shape[0] == 0 or windows.shape[1] <= min_position:
        raise ValueError(
            f"windows is empty or too short (shape {tuple(windows.shape)}, min_position {min_position}): "
            "pass at least one window longer than min_position"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if model.training:
        raise ValueError("model is in training mode; call model.eval() first")
    decoder = _decoder(model)
    mlps = feed_forward_layers(model)
    top = TopK(len(layers), mlps[0].down_proj.in_features, k=k, per_document=per_document)
    current = {"docs": torch.zeros(0, dtype=torch.long)}

    slot_of = {_coefficient_site(layer): slot for slot, layer in enumerate(layers)}

    def update(site: str, m: Tensor) -> None:
        top.update(slot_of[site], m, docs=current["docs"], min_position=min_position)

    starts = range(0, windows.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="mining", unit="batch")
    device = next(model.parameters()).device
    with hooks.observe(decoder, list(slot_of), update):
        for s in starts:
            current["docs"] = torch.arange(s, min(s + batch_size, windows.shape[0]))
            hooks.run_until(decoder, max(layers), input_ids=windows[s : s + batch_size].to(device), use_cache=False)
    n_tokens = windows.shape[0] * (windows.shape[1] - min_position)
    return Triggers(top.coef, top.doc, top.pos, layers, n_tokens)


# ---------------------------------------------------------------------------------------------
# Values in the vocabulary space
# ---------------------------------------------------------------------------------------------


def _unembedding(model: nn.Module, final_norm: bool) -> tuple[Tensor, Tensor | None]:
    decoder = _decoder(model)
    head = getattr(model, "lm_head", None)
    E = (head.weight if head is not None else decoder.embed_tokens.weight).detach()  # [vocab, d]
    gamma = decoder.norm.weight.detach() if final_norm and hasattr(decoder, "norm") else None  # [d]
    return E, gamma


def _values(model: nn.Module, layer: int, dims: Sequence[int] | Tensor | None) -> Tensor:
    (layer,) = _check_layers(model, [layer])
    W = feed_forward_layers(model)[layer].down_proj.weight.detach()  # [d, d_mlp]
    if dims is None:
        return W.T
    dims = torch.as_tensor(dims, dtype=torch.long).reshape(-1)
    if dims.numel() == 0:
        raise ValueError("dims is empty: pass memory indices, or None for all of them")
    if int(dims.min()) < 0 or int(dims.max()) >= W.shape[1]:
        raise ValueError(f"dims must lie in 0..{W.shape[1] - 1} (this layer has {W.shape[1]} memories)")
    return W.T[dims]  # [n, d]


@torch.no_grad()
def value_logits(
    model: nn.Module, *, layer: int, dims: Sequence[int] | Tensor | None = None, final_norm: bool = True
) -> Tensor:
    """Project values onto the vocabulary: ``E (gamma * v_i)`` for each chosen memory ``i`` of a layer.

    ``gamma`` is the gain of the model's final RMSNorm: a value added to the residual stream reaches
    the logits as ``E (gamma * v) / rms(x)``, and the per-token ``1 / rms(x)`` does not change the
    ranking of tokens. Geva et al. (2021) project without a final norm (their model has none before
    the output embedding); pass ``final_norm=False`` for that.

    Args:
        model: a Llama-style causal LM.
        layer: which layer's values.
        dims: memory indices (``None``: all ``d_mlp`` of them).
        final_norm: multiply by the final norm's gain first.

    Returns:
        ``[len(dims), vocab]`` logits (unnormalised) that each value adds, per unit of coefficient.

    Introduced in nbs/05_ffn_memories.ipynb (Geva et al. 2021, §4; Geva et al. 2022, §3).
    """
    E, gamma = _unembedding(model, final_norm)
    v = _values(model, layer, dims)  # [n, d]
    if gamma is not None:
        v = v * gamma
    return v @ E.T


@torch.no_grad()
def value_tokens(
    model: nn.Module, *, layer: int, dims: Sequence[int] | Tensor, k: int = 10, final_norm: bool = True
) -> tuple[Tensor, Tensor]:
    """The ``k`` tokens each value promotes most (top of :func:`value_logits`).

    Args:
        model, layer, dims, final_norm: as for :func:`value_logits`.
        k: tokens per value.

    Returns:
        ``(logits, token_ids)``, both ``[len(dims), k]``, highest first.

    Introduced in nbs/05_ffn_memories.ipynb.
    """
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return value_logits(model, layer=layer, dims=dims, final_norm=final_norm).topk(k, dim=-1)


@torch.no_grad()
def concept_scores(
    model: nn.Module, token_ids: Sequence[int] | Tensor, *, layers: Sequence[int] | None = None, final_norm: bool = True
) -> Tensor:
    """How strongly each value promotes a set of tokens: the z-score of their mean logit.

    For value ``v`` with logits ``z = E (gamma * v)`` over the vocabulary, the score is
    ``(mean_{t in tokens} z_t - mean(z)) / std(z)``. The mean and standard deviation over the whole
    vocabulary come from the mean and covariance of the rows of ``E``, so no ``[value, vocab]``
    matrix is ever formed: scoring all 30 x 1,536 values of SmolLM2 costs a few small matrix products.

    Args:
        model: a Llama-style causal LM.
        token_ids: the concept's token ids (e.g. ``" music"``, ``" song"``, ...).
        layers: layers to score (``None``: all).
        final_norm: as for :func:`value_logits`.

    Returns:
        ``[len(layers), d_mlp]`` scores; large positive = promotes the concept, negative = suppresses it.

    Introduced in nbs/05_ffn_memories.ipynb (Geva et al. 2022, §5).
    """
    layers = _check_layers(model, layers)
    E, gamma = _unembedding(model, final_norm)
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("token_ids is empty: pass the token ids of the concept's words")
    if int(ids.min()) < 0 or int(ids.max()) >= E.shape[0]:
        raise ValueError(f"token_ids must lie in 0..{E.shape[0] - 1}")
    E64 = E.double()
    mu = E64.mean(0)  # [d]
    cov = torch.cov(E64.T, correction=0)  # [d, d]
    concept = E64[ids].mean(0)  # [d]
    out = []
    for layer in layers:
        v = _values(model, layer, None).double()  # [d_mlp, d]
        if gamma is not None:
            v = v * gamma.double()
        std = ((v @ cov) * v).sum(-1).clamp_min(1e-30).sqrt()
        out.append((v @ (concept - mu)) / std)
    return torch.stack(out).float()


# ---------------------------------------------------------------------------------------------
# Intervening on memory coefficients
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def intervene(
    model: nn.Module,
    memories: Mapping[int, Sequence[int]],
    *,
    scale: float | None = None,
    value: float | None = None,
) -> Iterator[None]:
    """Inside the block, overwrite chosen memory coefficients at every position of every forward pass.

    Either multiply them (``scale``: 0 switches the memories off, 2 doubles them) or set them to a
    constant (``value``: Geva et al. 2022 "turn on" values by setting their coefficient). Hooks are
    always removed on exit.

    Args:
        model: a Llama-style causal LM.
        memories: ``{layer: [memory indices]}``.
        scale: factor applied to the coefficients (exclusive with ``value``).
        value: constant the coefficients are set to.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(cfg).eval(); ids = torch.tensor([[1, 2, 3]])
    >>> with intervene(model, {0: [0, 1]}, value=0.0), capture_coefficients(model) as m:
    ...     _ = model(ids)
    >>> float(m[0][..., :2].abs().max()), len(feed_forward_layers(model)[0].down_proj._forward_pre_hooks)
    (0.0, 0)

    Introduced in nbs/05_ffn_memories.ipynb (Geva et al. 2022, §5).
    """
    if (scale is None) == (value is None):
        raise ValueError("pass exactly one of scale= (multiply the coefficients) or value= (set them)")
    if not isinstance(memories, Mapping) or not memories:
        raise ValueError("memories must be a non-empty mapping {layer: [memory indices]}")
    mlps = feed_forward_layers(model)
    _check_layers(model, list(memories))
    index = {}
    for layer, dims in memories.items():
        dims = torch.as_tensor(list(dims), dtype=torch.long)
        d_mlp = mlps[layer].down_proj.in_features
        if dims.numel() == 0 or int(dims.min()) < 0 or int(dims.max()) >= d_mlp:
            raise ValueError(f"memories[{layer}] must be a non-empty list of indices in 0..{d_mlp - 1}")
        index[layer] = dims

    def edit_for(dims: Tensor):
        def edit(m: Tensor) -> Tensor:  # [batch, pos, d_mlp]
            m = m.clone()
            m[..., dims] = m[..., dims] * scale if scale is not None else value
            return m

        return edit

    with hooks.patches(hooks.patch(model, _coefficient_site(layer), fn=edit_for(d)) for layer, d in index.items()):
        yield


def random_memories(
    memories: Mapping[int, Sequence[int]], d_mlp: int, *, seed: int = 0
) -> dict[int, list[int]]:
    """A control for :func:`intervene`: as many random memories in the same layers, none of the chosen ones.

    Args:
        memories: ``{layer: [memory indices]}`` of the edit to control for.
        d_mlp: memories per layer.
        seed: seed of the draw.

    Returns:
        ``{layer: [indices]}`` with the same layers and counts, drawn without replacement among the
        memories of that layer that are not in ``memories[layer]``, sorted.

    >>> random_memories({3: [0, 1], 7: [5]}, 6, seed=0)
    {3: [2, 3], 7: [0]}

    Introduced in nbs/05_ffn_memories.ipynb (the random-memory control of the steering experiment).
    """
    if not isinstance(memories, Mapping) or not memories:
        raise ValueError("memories must be a non-empty mapping {layer: [memory indices]}")
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer, dims in memories.items():
        chosen = set(int(d) for d in dims)
        if not chosen or min(chosen) < 0 or max(chosen) >= d_mlp:
            raise ValueError(f"memories[{layer}] must be a non-empty list of indices in 0..{d_mlp - 1}")
        free = torch.tensor([i for i in range(d_mlp) if i not in chosen], dtype=torch.long)
        if len(free) < len(chosen):
            raise ValueError(f"layer {layer}: only {len(free)} memories are left to draw {len(chosen)} from")
        pick = free[torch.randperm(len(free), generator=gen)[: len(chosen)]]
        out[layer] = sorted(pick.tolist())
    return out


@torch.no_grad()
def next_token_probs(model: nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int = 0,
                     batch_size: int = 16) -> Tensor:
    """Next-token distribution after each prompt, batched with left padding (same numbers as one at a time).

    Padding goes on the left with an attention mask, and positions are counted from each prompt's
    first real token, so a padded prompt sees exactly what it would see alone.

    Args:
        model: a causal LM (hooks such as :func:`intervene` stay active).
        prompts: token ids of each prompt (e.g. ``tokenizer(p).input_ids``), at least one id each.
        pad_id: the id written in the padding (masked, so its value does not matter).
        batch_size: prompts per forward pass.

    Returns:
        ``[prompt, vocab]`` probabilities of the token that follows each prompt.

    Introduced in nbs/05_ffn_memories.ipynb.
    """
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[s : s + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits[:, -1]
        out.append(logits.float().softmax(-1))
    return torch.cat(out)


@torch.no_grad()
def next_token_losses(model: nn.Module, input_ids: Tensor, *, first: int = 1, batch_size: int = 8
                      ) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy and top prediction at every scored position of unpadded windows.

    Args:
        model: a causal LM (hooks such as :func:`intervene` stay active).
        input_ids: ``[window, pos]`` token ids, e.g. from :func:`token_windows`.
        first: predictions made before position ``first`` are not scored (1 skips the prediction made on
            the start token).

    Returns:
        ``(loss, top)``, both ``[window, pos - first - 1]``: the cross-entropy (nats) of the true next
        token and the model's most likely next token. ``exp(loss.mean())`` is the perplexity.

    Introduced in nbs/05_ffn_memories.ipynb (perplexity of edited and perturbed models).
    """
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < first + 2:
        raise ValueError(f"input_ids must be a [window, pos] tensor with pos >= {first + 2}, "
                         f"got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
    losses, tops = [], []
    for s in range(0, len(input_ids), batch_size):
        ids = input_ids[s : s + batch_size]
        logits = model(input_ids=ids).logits[:, first:-1].float()  # [batch, n, vocab]
        losses.append(nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, first + 1 :], reduction="none"))
        tops.append(logits.argmax(-1))
    return torch.cat(losses), torch.cat(tops)


# ---------------------------------------------------------------------------------------------
# What 4-bit de-quantisation does: the rounding grid and a perturbation of the same size
# ---------------------------------------------------------------------------------------------

QUANT_BLOCK = 32
"""Weights per block in the GGUF formats Q4_1 and Q8_0 (one scale, and for Q4_1 one minimum, per block)."""


def _blocks(weight: Tensor, block: int) -> Tensor:
    if weight.ndim != 2 or weight.shape[1] % block:
        raise ValueError(f"weight must be 2-D with a last dimension divisible by {block}, got {tuple(weight.shape)}")
    return weight.detach().float().reshape(weight.shape[0], -1, block)  # [row, block, weight]


def quantisation_steps(weight: Tensor, *, scheme: str = "Q4_1", block: int = QUANT_BLOCK) -> Tensor:
    """The rounding step of each block of a weight matrix de-quantised from a GGUF block format.

    In Q4_1 each block of 32 consecutive weights of a row is stored as ``d * q + m`` with ``q`` in
    0..15, ``m`` the block's minimum and ``d = (max - min) / 15``; in Q8_0 as ``d * q`` with ``q`` in
    -127..127 and ``d = max |w| / 127``. Rounding to the grid moved each original weight by at most
    ``d / 2``.

    Args:
        weight: ``[rows, cols]`` de-quantised weights, ``cols`` divisible by ``block``.
        scheme: ``"Q4_1"`` or ``"Q8_0"``.
        block: weights per block.

    Returns:
        ``[rows, cols // block]`` steps ``d``.

    >>> w = torch.tensor([[0.0, 1.5, -3.0, 0.0]])
    >>> quantisation_steps(w, block=2).mul(1e4).round().div(1e4).tolist()
    [[0.10000000149011612, 0.20000000298023224]]
    >>> quantisation_steps(w, scheme="Q8_0", block=2).mul(127).tolist()
    [[1.5, 3.0]]

    Introduced in nbs/05_ffn_memories.ipynb (llama.cpp's block formats; Dettmers & Zettlemoyer 2023).
    """
    b = _blocks(weight, block)
    if scheme == "Q4_1":
        return (b.max(-1).values - b.min(-1).values) / 15
    if scheme == "Q8_0":
        return b.abs().max(-1).values / 127
    raise ValueError(f"scheme must be 'Q4_1' or 'Q8_0', got {scheme!r}")


def grid_share(weight: Tensor, *, scheme: str = "Q4_1", block: int = QUANT_BLOCK, tol: float = 1e-3) -> float:
    """Share of weights that sit on their block's rounding grid (1.0 for a de-quantised matrix).

    Args:
        weight, scheme, block: as for :func:`quantisation_steps`.
        tol: allowed distance to the nearest grid point, in units of the block's step.

    Returns:
        a share in [0, 1]; a full-precision matrix gives about ``2 * tol``.

    >>> grid_share(torch.tensor([[0.0, 0.6, 1.4, 3.0]]), block=4)   # step 0.2: levels 0, 3, 7, 15
    1.0
    >>> grid_share(torch.tensor([[0.0, 0.61, 1.4, 3.0]]), block=4)
    0.75
    """
    b = _blocks(weight, block)
    d = quantisation_steps(weight, scheme=scheme, block=block).clamp_min(1e-30)[..., None]
    q = (b - b.min(-1, keepdim=True).values) / d if scheme == "Q4_1" else b / d
    return float(((q - q.round()).abs() <= tol).float().mean())


GGUF_SCHEMES = {"embed_tokens.weight": "Q8_0", "_proj.weight": "Q4_1"}
"""Which parameters of SmolLM2's GGUF file are stored in which block format (by name suffix); the
RMSNorm gains are stored in float32 and are not perturbed."""


@contextlib.contextmanager
def rounding_noise(model: nn.Module, *, seed: int = 0, scale: float = 1.0,
                   schemes: Mapping[str, str] | None = None, block: int = QUANT_BLOCK) -> Iterator[dict[str, float]]:
    """Inside the block, add to every quantised weight a fresh rounding error of its block's size.

    Each weight gets ``scale * d * u`` with ``u`` uniform in [-1/2, 1/2] and ``d`` its block's step
    (:func:`quantisation_steps`): a second rounding error, drawn like the one that de-quantisation
    left in the weights. Comparing the model with and without it measures how much an error of that
    size changes what the chapter measures; the weights are restored exactly on exit.

    Args:
        model: a model whose weights were de-quantised from GGUF blocks.
        seed: seed of the noise.
        scale: noise size in units of one rounding error (0 leaves the model unchanged).
        schemes: ``{parameter-name suffix: "Q4_1" | "Q8_0"}``; default :data:`GGUF_SCHEMES`.
        block: weights per block.

    Yields:
        ``{"relative_rms": ...}``: RMS of the added noise over RMS of the perturbed weights.

    Introduced in nbs/05_ffn_memories.ipynb.
    """
    schemes = dict(GGUF_SCHEMES if schemes is None else schemes)
    targets = [(name, p, scheme) for name, p in model.named_parameters()
               for suffix, scheme in schemes.items() if name.endswith(suffix)]
    if not targets:
        raise ValueError(f"no parameter name ends with any of {list(schemes)}: pass schemes= for this model")
    gen = torch.Generator().manual_seed(seed)
    saved, noise_sq, weight_sq = [], 0.0, 0.0
    try:
        with torch.no_grad():
            for _name, p, scheme in targets:
                d = quantisation_steps(p, scheme=scheme, block=block)            # [row, block]
                u = torch.rand(p.shape, generator=gen, dtype=torch.float32) - 0.5
                noise = (scale * u.reshape(d.shape[0], d.shape[1], -1) * d[..., None]).reshape(p.shape)
                saved.append((p, p.detach().clone()))
                noise_sq += float(noise.double().pow(2).sum())
                weight_sq += float(p.double().pow(2).sum())
                p.add_(noise.to(p.dtype))
        yield {"relative_rms": (noise_sq / weight_sq) ** 0.5}
    finally:
        with torch.no_grad():
            for p, original in saved:
                p.copy_(original)


# ---------------------------------------------------------------------------------------------
# Every value's top token and top-k threshold, for key-value agreement on all memories
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def value_summary(model: nn.Module, *, k: int = 50, chunk: int = 512, final_norm: bool = True) -> dict[str, Tensor]:
    """For every value of every layer: its top token and its ``k``-th largest logit.

    With these two numbers per memory, whether a token ``t`` is among a value's top ``k`` is
    ``logit_t >= kth``, which needs one dot product instead of a ``[value, vocab]`` matrix.

    Args:
        model: a Llama-style causal LM.
        k: the rank of the threshold.
        chunk: values projected at a time (memory: ``chunk x vocab`` floats).
        final_norm: as for :func:`value_logits`.

    Returns:
        ``{"top1": [layer, d_mlp] long, "kth": [layer, d_mlp] float}``.

    Introduced in nbs/05_ffn_memories.ipynb (key-value agreement of all 46,080 memories).
    """
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    E, gamma = _unembedding(model, final_norm)
    top1, kth = [], []
    for layer in range(len(feed_forward_layers(model))):
        v = _values(model, layer, None)                                          # [d_mlp, d]
        if gamma is not None:
            v = v * gamma
        best = [(c @ E.T).topk(k, dim=-1) for c in v.split(chunk)]
        top1.append(torch.cat([b.indices[:, 0] for b in best]))
        kth.append(torch.cat([b.values[:, -1] for b in best]))
    return {"top1": torch.stack(top1), "kth": torch.stack(kth)}


def value_logits_at(model: nn.Module, *, layer: int, tokens: Tensor, final_norm: bool = True) -> Tensor:
    """The logit that each value of a layer gives to chosen tokens, without the full projection.

    Args:
        model: a Llama-style causal LM.
        layer: which layer's values.
        tokens: ``[d_mlp, n]`` token ids, one row per memory of the layer.
        final_norm: as for :func:`value_logits`.

    Returns:
        ``[d_mlp, n]``: entry ``(i, j)`` equals ``value_logits(model, layer=layer)[i, tokens[i, j]]``.

    Introduced in nbs/05_ffn_memories.ipynb.
    """
    E, gamma = _unembedding(model, final_norm)
    v = _values(model, layer, None)                                              # [d_mlp, d]
    if gamma is not None:
        v = v * gamma
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.ndim != 2 or tokens.shape[0] != v.shape[0]:
        raise ValueError(f"tokens must be [d_mlp={v.shape[0]}, n], got {tuple(tokens.shape)}")
    with torch.no_grad():
        return torch.einsum("md,mnd->mn", v, E[tokens])


def _weights_key(model: nn.Module) -> str:
    """Content hash of what :func:`value_summary` depends on: every value, the final gain, the unembedding."""
    import hashlib

    digest = hashlib.sha256()
    E, gamma = _unembedding(model, True)
    tensors = [mlp.down_proj.weight for mlp in feed_forward_layers(model)] + [E]
    for t in tensors + ([gamma] if gamma is not None else []):
        digest.update(t.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_value_summary(model: nn.Module, *, k: int = 50) -> dict[str, Tensor]:
    """:func:`value_summary`, committed with the book for SmolLM2 (about 2 min to rebuild on 2 cores).

    The file is named by a hash of the weights it was computed from, so another model (or other
    weights) gets its own file; it is verified by SHA-256 on load and rebuilt when missing or altered.
    """
    from helpers import common

    path = common.cache_dir("results", "ch5") / f"value-summary-k{k}-{_weights_key(model)}.pt"

    def build(target) -> None:
        with common.torch_threads(common.free_cores()):
            torch.save(value_summary(model, k=k), target)

    return torch.load(common.cached_file(path, build, committed=True), weights_only=True)


# ---------------------------------------------------------------------------------------------
# The chapter's heavy studies, committed with the book (small results, named by their recipe)
# ---------------------------------------------------------------------------------------------


def model_key(model: nn.Module) -> str:
    """Content hash (16 hex digits) of every parameter of a model, in name order: part of a study's recipe.

    SmolLM2's weights are de-quantised from a GGUF file, so they are the same bits on every machine.
    """
    import hashlib

    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode() + str(tuple(p.shape)).encode())
        digest.update(p.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def tokens_key(*tensors: Tensor) -> str:
    """Content hash (16 hex digits) of integer tensors (token windows, prompt ids), shapes included."""
    import hashlib

    digest = hashlib.sha256()
    for t in tensors:
        t = torch.as_tensor(t)
        digest.update(str(tuple(t.shape)).encode() + t.detach().long().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _save_result(result: Mapping, target) -> None:
    """Write a dict of tensors, numbers and ``{name: list of ints}`` dicts as a compressed ``.npz``."""
    import numpy as np

    arrays = {}
    for key, value in result.items():
        if isinstance(value, Mapping):
            arrays.update({f"{key}/{name}": np.asarray(v) for name, v in value.items()})
        else:
            arrays[key] = value.numpy() if isinstance(value, Tensor) else np.asarray(value)
    with open(target, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _load_result(path) -> dict:
    """The dict that :func:`_save_result` wrote: arrays as tensors, 0-d arrays as numbers, ``a/b`` keys nested."""
    import numpy as np

    out: dict = {}
    with np.load(path, allow_pickle=False) as data:
        for key in data.files:
            value = data[key]
            if "/" in key:
                outer, name = key.split("/", 1)
                out.setdefault(outer, {})[name] = value.tolist()
            else:
                out[key] = value.item() if value.ndim == 0 else torch.from_numpy(value)
    return out


def _committed_result(name: str, recipe: Mapping, build) -> dict:
    """``build()``'s dict, stored as a compressed ``.npz`` under ``results/ch5``, named by a hash of ``recipe``."""
    from helpers import common

    path = common.cache_dir("results", "ch5") / f"{name}-{common.content_hash(dict(recipe))}.npz"
    return _load_result(common.cached_file(path, lambda target: _save_result(build(), target), committed=True))


def trigger_study(model: nn.Module, windows: Tensor, *, k: int = 25, batch_size: int = 20, min_position: int = 1,
                  layers: Sequence[int] | None = None) -> dict:
    """The chapter's trigger mining (:func:`mine_triggers`, one trigger per window) over all windows.

    Returns:
        a dict of ``doc`` ``[layer, d_mlp, k]`` (int16), ``pos`` ``[layer, d_mlp, k]`` (int8), ``kth``
        ``[layer, d_mlp]`` (float32, the k-th largest coefficient) and ``n_tokens`` (int); the
        coefficients of single triggers are recomputed on demand (:func:`trigger_coefficients`).

    Introduced in nbs/05_ffn_memories.ipynb (the full mining is committed; the notebook re-mines layer 1).
    """
    from helpers import common

    if windows.shape[0] >= 2**15 or windows.shape[1] >= 2**7:
        raise ValueError(f"windows {tuple(windows.shape)} do not fit the int16 / int8 result")
    with common.torch_threads(common.free_cores()):
        t = mine_triggers(model, windows, k=k, layers=layers, batch_size=batch_size, min_position=min_position)
    return {"doc": t.doc.to(torch.int16), "pos": t.pos.to(torch.int8), "kth": t.coef[..., -1].clone(),
            "n_tokens": t.n_tokens}


def trigger_results(model: nn.Module, windows: Tensor, *, k: int = 25, batch_size: int = 20,
                    min_position: int = 1, key: str | None = None, blocks: int = 2) -> dict:
    """:func:`trigger_study` for every layer, committed with the book and verified by SHA-256.

    Stored in ``blocks`` files of consecutive layers (each mined on its own, which gives the same
    triggers as one pass over all layers: the layers are independent) so that each file stays small
    (about 1 MB for SmolLM2's 15 layers x 1,536 memories x 25 triggers). Each file is named by a hash of
    the model's weights (``key``: :func:`model_key`, computed when ``None``), the token windows, its
    layers and the options; rebuilt when missing or altered. ``doc`` and ``pos`` come back as ``long``.
    """
    n = len(_decoder(model).layers)
    if not isinstance(blocks, int) or not 1 <= blocks <= n:
        raise ValueError(f"blocks must be an int in 1..{n}, got {blocks!r}")
    key = key or model_key(model)
    parts = []
    for chunk in torch.arange(n).tensor_split(blocks):
        layers = chunk.tolist()
        recipe = {"study": "triggers", "model": key, "windows": tokens_key(windows), "k": k, "layers": layers,
                  "min_position": min_position, "per_document": True, "batch_size": batch_size}

        def build(layers=layers) -> dict:
            return trigger_study(model, windows, k=k, batch_size=batch_size, min_position=min_position, layers=layers)

        parts.append(_committed_result("triggers", recipe, build))
    return {"doc": torch.cat([p["doc"] for p in parts]).long(), "pos": torch.cat([p["pos"] for p in parts]).long(),
            "kth": torch.cat([p["kth"] for p in parts]), "n_tokens": parts[0]["n_tokens"]}


@torch.inference_mode()
def trigger_coefficients(model: nn.Module, windows: Tensor, *, layer: int, dims: Sequence[int] | Tensor,
                         docs: Sequence[int] | Tensor, positions: Sequence[int] | Tensor) -> Tensor:
    """The coefficient of memory ``dims[i]`` of ``layer`` at position ``positions[i]`` of window ``docs[i]``.

    Runs the windows involved once, stopping after ``layer``: the values :func:`mine_triggers` ranked.

    Returns:
        ``[n]`` float32 coefficients.

    Introduced in nbs/05_ffn_memories.ipynb (the trigger tables).
    """
    (layer,) = _check_layers(model, [layer])
    dims, docs, positions = (torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in (dims, docs, positions))
    if not len(dims) == len(docs) == len(positions) or len(dims) == 0:
        raise ValueError("dims, docs and positions must be non-empty and of the same length")
    uniq, row = docs.unique(return_inverse=True)
    decoder, got = _decoder(model), {}
    device = next(model.parameters()).device
    with hooks.observe(decoder, [_coefficient_site(layer)], lambda site, m: got.__setitem__("m", m.detach())):
        hooks.run_until(decoder, layer, input_ids=windows[uniq].to(device), use_cache=False)
    return got["m"][row, positions, dims].float().cpu()


@torch.no_grad()
def knockout_logprobs(model: nn.Module, windows: Tensor, *, layer: int, dims: Sequence[int] | Tensor,
                      docs: Sequence[int] | Tensor, positions: Sequence[int] | Tensor, tokens: Tensor,
                      batch_size: int = 32) -> Tensor:
    """Next-token log-probabilities at single positions, with one memory knocked out at that position only.

    Row ``i`` runs window ``docs[i]`` up to ``positions[i]`` with memory ``dims[i]`` of ``layer`` set to 0 at
    ``positions[i]`` (every other position and memory untouched; ``dims[i] = -1``: nothing knocked out) and
    scores ``tokens[i]`` in the distribution predicted there, i.e. for the token at ``positions[i] + 1``.

    Args:
        windows: ``[window, pos]`` token ids.
        tokens: ``[n, t]`` token ids to score for each row.

    Returns:
        ``[n, t]`` float64 log-probabilities.

    Introduced in nbs/05_ffn_memories.ipynb (a causal test of the memories where they fire).
    """
    (layer,) = _check_layers(model, [layer])
    dims, docs, positions = (torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in (dims, docs, positions))
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    n = len(dims)
    if n == 0 or not n == len(docs) == len(positions) or tokens.ndim != 2 or len(tokens) != n:
        raise ValueError("dims, docs, positions and tokens ([n, t]) must be non-empty with the same n")
    d_mlp = feed_forward_layers(model)[layer].down_proj.in_features
    if int(dims.min()) < -1 or int(dims.max()) >= d_mlp:
        raise ValueError(f"dims must be memory indices in 0..{d_mlp - 1} (or -1 for none)")
    if int(docs.min()) < 0 or int(docs.max()) >= len(windows):
        raise ValueError(f"docs must index the {len(windows)} windows")
    if int(positions.min()) < 0 or int(positions.max()) >= windows.shape[1]:
        raise ValueError(f"positions must lie in 0..{windows.shape[1] - 1}")
    order = positions.argsort()                                   # similar lengths together: shorter batches
    out = torch.empty(n, tokens.shape[1], dtype=torch.float64)
    device = next(model.parameters()).device
    for chunk in order.split(batch_size):
        pos, dim = positions[chunk], dims[chunk]
        ids = windows[docs[chunk], : int(pos.max()) + 1].to(device)
        rows = torch.nonzero(dim >= 0)[:, 0]

        def knock(m: Tensor, rows=rows, pos=pos, dim=dim) -> Tensor:  # [batch, pos, d_mlp]
            m = m.clone()
            m[rows, pos[rows], dim[rows]] = 0.0
            return m

        with hooks.patch(model, _coefficient_site(layer), fn=knock):
            logits = model(input_ids=ids, use_cache=False).logits
        logp = logits[torch.arange(len(chunk)), pos].double().log_softmax(-1).cpu()
        out[chunk] = logp.gather(1, tokens[chunk])
    return out


def knockout_study(model: nn.Module, windows: Tensor, triggers: Mapping[str, Tensor], *, per_layer: int = 6,
                   n_triggers: int = 5, top_tokens: int = 10, seed: int = 0) -> dict:
    """Knock memories out where they fire: the causal counterpart of reading values in the vocabulary.

    In every layer, ``per_layer`` memories drawn at random (no selection on any outcome) and, for each, a
    random *control* memory of the same layer. At each of a memory's ``n_triggers`` strongest triggers that
    have a next token in the window, the clean run, the memory knocked out at the trigger position, and the
    control knocked out at the same position; scored: the actual next token and the memory's ``top_tokens``
    value tokens (:func:`value_tokens`).

    Returns:
        ``layer``, ``dim``, ``control`` ``[memory]``; ``doc``, ``pos`` ``[memory, trigger]``; ``clean``,
        ``knocked``, ``control_knocked`` ``[memory, trigger, 1 + top_tokens]`` log-probabilities (column 0:
        the next token).

    Introduced in nbs/05_ffn_memories.ipynb.
    """
    n_layers = len(_decoder(model).layers)
    d_mlp = feed_forward_layers(model)[0].down_proj.in_features
    gen = torch.Generator().manual_seed(seed)
    ok = (triggers["doc"] >= 0) & (triggers["pos"] + 1 < windows.shape[1])             # [layer, d_mlp, k]
    out: dict = {k: [] for k in ("layer", "dim", "control", "doc", "pos", "clean", "knocked", "control_knocked")}
    for layer in range(n_layers):
        eligible = torch.nonzero(ok[layer].sum(-1) >= n_triggers)[:, 0]
        dims = eligible[torch.randperm(len(eligible), generator=gen)[:per_layer]]
        controls = torch.stack([torch.randint(0, d_mlp - 1, (1,), generator=gen)[0] for _ in dims])
        controls = controls + (controls >= dims).long()                                   # never the memory itself
        slots = torch.stack([torch.nonzero(ok[layer, d])[:n_triggers, 0] for d in dims])   # [memory, trigger]
        doc = triggers["doc"][layer, dims[:, None], slots]
        pos = triggers["pos"][layer, dims[:, None], slots]
        nxt = windows[doc, pos + 1]                                                       # [memory, trigger]
        vals = value_tokens(model, layer=layer, dims=dims, k=top_tokens)[1]               # [memory, top]
        toks = torch.cat([nxt[..., None], vals[:, None, :].expand(-1, n_triggers, -1)], -1).flatten(0, 1)
        per_row = dims.repeat_interleave(n_triggers)                                      # [memory * trigger]
        for key, which in (("clean", torch.full_like(per_row, -1)), ("knocked", per_row),
                           ("control_knocked", controls.repeat_interleave(n_triggers))):
            lp = knockout_logprobs(model, windows, layer=layer, dims=which, docs=doc.flatten(), positions=pos.flatten(),
                                   tokens=toks)
            out[key].append(lp.view(len(dims), n_triggers, -1))
        out["layer"].append(torch.full_like(dims, layer))
        out["dim"].append(dims)
        out["control"].append(controls)
        out["doc"].append(doc)
        out["pos"].append(pos)
    return {k: torch.cat(v) for k, v in out.items()}


def knockout_results(model: nn.Module, windows: Tensor, triggers: Mapping[str, Tensor], *, key: str | None = None,
                     **options) -> dict:
    """:func:`knockout_study` committed with the book (named by the model, the windows and the options)."""
    from helpers import common

    recipe = {"study": "knockout", "model": key or model_key(model), "windows": tokens_key(windows),
              "triggers": tokens_key(triggers["doc"], triggers["pos"]), **options}

    def build() -> dict:
        with common.torch_threads(common.free_cores()):
            return knockout_study(model, windows, triggers, **options)

    return _committed_result("knockout", recipe, build)


def rounding_noise_study(model: nn.Module, windows: Tensor, *, seeds: Sequence[int] = (0, 1, 2), k: int = 10,
                         batch_size: int = 16, schemes: Mapping[str, str] | None = None,
                         block: int = QUANT_BLOCK) -> dict:
    """What a second rounding error does (:func:`rounding_noise`), for each seed, against the model as it is.

    For every seed: each window's mean next-token cross-entropy, the share of its positions whose top
    prediction changes, and the share of every memory's top-``k`` trigger positions (among all positions
    of ``windows``, :func:`mine_triggers` with ``per_document=False``) that the perturbed model keeps.
    ``schemes`` and ``block`` are passed to :func:`rounding_noise`.

    Returns:
        a dict of ``base_ce`` ``[window, pos - 2]``, ``noisy_ce`` ``[seed, window]``, ``flipped``
        ``[seed, window]`` (float32) and ``kept`` ``[seed]`` (float64).

    Introduced in nbs/05_ffn_memories.ipynb (the notebook recomputes seed 0's losses live).
    """
    from helpers import common

    def top_positions():
        t = mine_triggers(model, windows, k=k, per_document=False, batch_size=batch_size)
        return t.doc * windows.shape[1] + t.pos

    with common.torch_threads(common.free_cores()):
        base_ce, base_top = next_token_losses(model, windows)
        base_keys = top_positions()
        noisy_ce, flipped, kept = [], [], []
        for seed in seeds:
            with rounding_noise(model, seed=seed, schemes=schemes, block=block):
                ce, top_ = next_token_losses(model, windows)
                keys = top_positions()
            noisy_ce.append(ce.mean(1))
            flipped.append((top_ != base_top).float().mean(1))
            kept.append(float((base_keys[..., :, None] == keys[..., None, :]).any(-1).float().mean()))
    return {"base_ce": base_ce.float(), "noisy_ce": torch.stack(noisy_ce).float(),
            "flipped": torch.stack(flipped).float(), "kept": torch.tensor(kept, dtype=torch.float64)}


def rounding_noise_results(model: nn.Module, windows: Tensor, *, seeds: Sequence[int] = (0, 1, 2), k: int = 10,
                           key: str | None = None) -> dict:
    """:func:`rounding_noise_study`, committed with the book and verified by SHA-256 (named by its recipe)."""
    recipe = {"study": "rounding-noise", "model": key or model_key(model), "windows": tokens_key(windows),
              "seeds": list(seeds), "k": k, "schemes": GGUF_SCHEMES, "block": QUANT_BLOCK}
    return _committed_result("rounding-noise", recipe,
                             lambda: rounding_noise_study(model, windows, seeds=seeds, k=k))


def top1_agreement(model: nn.Module, windows: Tensor, *, batch_size: int = 20, min_position: int = 1) -> dict:
    """Geva et al.'s key-value agreement of every memory: does its value's top token equal the token that follows
    its top trigger? Mines the top trigger of every memory over ``windows`` (:func:`mine_triggers`, one trigger
    per window) and projects every value (:func:`value_summary`).

    Returns:
        ``{"hit": [layer, d_mlp] bool, "valid": [layer, d_mlp] bool}`` (valid: the top trigger is not a window's
        last token).
    """
    t = mine_triggers(model, windows, k=1, batch_size=batch_size, min_position=min_position)
    top1 = value_summary(model, k=1)["top1"]                                          # [layer, d_mlp]
    pos = t.pos[..., 0]
    valid = pos + 1 < windows.shape[1]
    following = windows[t.doc[..., 0], (pos + 1).clamp(max=windows.shape[1] - 1)]     # [layer, d_mlp]
    return {"hit": (top1 == following) & valid, "valid": valid}


def rounding_agreement_study(model: nn.Module, windows: Tensor, *, seeds: Sequence[int] = (0, 1, 2),
                             batch_size: int = 20, min_position: int = 1, schemes: Mapping[str, str] | None = None,
                             block: int = QUANT_BLOCK) -> dict:
    """Key-value agreement by layer (:func:`top1_agreement`) on the model as it is and with a second rounding
    error (:func:`rounding_noise`) of each seed: does the chapter's layer curve survive an error of the size
    de-quantisation left? Per memory, so the two can be paired. ``schemes`` and ``block`` are passed to
    :func:`rounding_noise`.

    Returns:
        ``{"base": {"hit", "valid"}, "noisy": {"hit", "valid"}}``, the noisy ones ``[seed, layer, d_mlp]``.
    """
    from helpers import common

    with common.torch_threads(common.free_cores()):
        base = top1_agreement(model, windows, batch_size=batch_size, min_position=min_position)
        noisy = []
        for seed in seeds:
            with rounding_noise(model, seed=seed, schemes=schemes, block=block):
                noisy.append(top1_agreement(model, windows, batch_size=batch_size, min_position=min_position))
    return {"base": base, "noisy": {k: torch.stack([n[k] for n in noisy]) for k in ("hit", "valid")}}


def rounding_agreement_results(model: nn.Module, windows: Tensor, *, seeds: Sequence[int] = (0, 1, 2),
                               key: str | None = None) -> dict:
    """:func:`rounding_agreement_study`, committed with the book and verified by SHA-256 (named by its recipe)."""
    recipe = {"study": "rounding-agreement", "model": key or model_key(model), "windows": tokens_key(windows),
              "seeds": list(seeds), "schemes": GGUF_SCHEMES, "block": QUANT_BLOCK, "min_position": 1}
    return _committed_result("rounding-agreement", recipe,
                             lambda: rounding_agreement_study(model, windows, seeds=seeds))


def held_out_mass(model: nn.Module, prompts: Sequence[Sequence[int]], token_ids: Sequence[int], *, pad_id: int = 0,
                  edit=None) -> Tensor:
    """P(the next token is one of ``token_ids``) after each prompt, in %, with ``edit`` (a context manager) active.

    Returns:
        ``[prompt]`` float64 percentages.

    Introduced in nbs/05_ffn_memories.ipynb (the steering experiment).
    """
    with edit if edit is not None else contextlib.nullcontext():
        return next_token_probs(model, prompts, pad_id=pad_id)[:, list(token_ids)].sum(-1).double() * 100


def window_losses(model: nn.Module, windows: Tensor, *, edit=None) -> Tensor:
    """Mean next-token cross-entropy of each window (nats, :func:`next_token_losses`), with ``edit`` active.

    Returns:
        ``[window]`` float64.

    Introduced in nbs/05_ffn_memories.ipynb (the cost of an edit in perplexity).
    """
    from helpers import common

    with edit if edit is not None else contextlib.nullcontext(), common.torch_threads(common.free_cores()):
        return next_token_losses(model, windows)[0].mean(1).double()


@torch.no_grad()
def greedy_ids(model: nn.Module, prompt: Sequence[int], *, n: int = 14, eos_id: int = 0, edit=None) -> list[int]:
    """The ``n`` tokens a causal LM generates greedily after ``prompt`` (token ids), with ``edit`` active."""
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with edit if edit is not None else contextlib.nullcontext():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=eos_id)
    return out[0, ids.shape[1]:].tolist()


def steering_study(model: nn.Module, memories: Mapping[int, Sequence[int]],
                   controls: Sequence[Mapping[int, Sequence[int]]], *, strengths: Sequence[float],
                   neutral: Sequence[Sequence[int]], musical: Sequence[Sequence[int]], held_ids: Sequence[int],
                   windows: Tensor, set_to: float, pad_id: int = 0, eos_id: int = 0, n_new: int = 14) -> dict:
    """The chapter's intervention sweep (Geva et al. 2022): promote and suppress chosen memories, against controls.

    For each strength ``v``: P(held-out word) on the ``neutral`` prompts with the chosen memories set to
    ``v`` (``chosen``) and the mean over the random ``controls`` (``random``), and each window's
    cross-entropy with the chosen memories and with ``controls[0]``. On the ``musical`` prompts: unedited,
    chosen memories x 0, x (-1), and the controls x (-1). Greedy continuations (token ids) of the first
    prompt of each list, unedited and edited.

    Returns:
        a dict of float64 tensors ``base_n``, ``chosen`` ``[strength, prompt]``, ``random``, ``ce_chosen``
        ``[strength, window]``, ``ce_random``, ``base_m``, ``off_m``, ``down_m``, ``down_ctrl``, and ``gens``
        (``{name: [ids]}``).

    Introduced in nbs/05_ffn_memories.ipynb (the notebook recomputes m = ``set_to`` for the chosen memories live).
    """
    def mass(prompts, edit=None):
        return held_out_mass(model, prompts, held_ids, pad_id=pad_id, edit=edit)

    out = {"base_n": mass(neutral), "chosen": [], "random": [], "ce_chosen": [], "ce_random": []}
    for v in strengths:
        out["chosen"].append(mass(neutral, intervene(model, memories, value=v)))
        out["random"].append(torch.stack([mass(neutral, intervene(model, c, value=v)) for c in controls]).mean(0))
        out["ce_chosen"].append(window_losses(model, windows, edit=intervene(model, memories, value=v)))
        out["ce_random"].append(window_losses(model, windows, edit=intervene(model, controls[0], value=v)))
    out = {k: torch.stack(v) if isinstance(v, list) else v for k, v in out.items()}
    out["base_m"] = mass(musical)
    out["down_m"] = mass(musical, intervene(model, memories, scale=-1.0))
    out["off_m"] = mass(musical, intervene(model, memories, scale=0.0))
    out["down_ctrl"] = torch.stack([mass(musical, intervene(model, c, scale=-1.0)) for c in controls]).mean(0)

    def gen(prompt, edit=None):
        return greedy_ids(model, prompt, n=n_new, eos_id=eos_id, edit=edit)

    out["gens"] = {"unedited": gen(neutral[0]), "chosen": gen(neutral[0], intervene(model, memories, value=set_to)),
                   "random": gen(neutral[0], intervene(model, controls[0], value=set_to)),
                   "unedited musical": gen(musical[0]),
                   "chosen x (-1)": gen(musical[0], intervene(model, memories, scale=-1.0))}
    return out


def steering_results(model: nn.Module, memories: Mapping[int, Sequence[int]],
                     controls: Sequence[Mapping[int, Sequence[int]]], *, key: str | None = None, **options) -> dict:
    """:func:`steering_study` (``options``: its keyword arguments), committed with the book, verified by SHA-256.

    Named by a hash of the model's weights, the chosen and control memories, the prompts' and windows'
    token ids and the other options; rebuilt when missing or altered.
    """
    def plain(mem):
        return {str(int(layer)): sorted(int(d) for d in dims) for layer, dims in mem.items()}

    recipe = {"study": "steering", "model": key or model_key(model), "memories": plain(memories),
              "controls": [plain(c) for c in controls], "windows": tokens_key(options["windows"]),
              "neutral": [list(map(int, p)) for p in options["neutral"]],
              "musical": [list(map(int, p)) for p in options["musical"]],
              **{k: v for k, v in options.items() if k not in ("windows", "neutral", "musical")}}
    recipe["held_ids"] = [int(i) for i in recipe["held_ids"]]
    recipe["strengths"] = [float(v) for v in recipe["strengths"]]
    return _committed_result("steering", recipe, lambda: steering_study(model, memories, controls, **options))
