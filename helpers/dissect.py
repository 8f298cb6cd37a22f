"""Dissecting a post-LayerNorm transformer encoder into additive terms, ``e = i + h + f + c``.

Every hidden state of a BERT-style encoder is an exact sum of four vectors (Mickus, Paperno &
Constant 2022, "How to Dissect a Muppet", TACL): the input embedding ``i`` (word + position +
segment), the multi-head attention outputs ``h``, the feed-forward outputs ``f`` and a correction
``c`` that gathers every bias and LayerNorm shift. The trick is that a LayerNorm is *linear* once
the token's standard deviation is known: ``LN(z) = γ ⊙ (z - mean(z)) / σ + β`` with ``σ`` a number
per token, so each term can be centred and scaled on its own and the shift ``β`` added to ``c``
(``convention="centred"``, the default), or, as in the paper's reference code, scaled uncentred
with the mean correction ``-γ ⊙ μ(z) / σ`` added to ``c`` as well (``convention="mickus"``).

Introduced in nbs/06_dissecting_transformer.ipynb, where the recursion is derived and written out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from helpers import hooks

TERMS = ("i", "h", "f", "c")
"""Names of the four terms, in the order of the ``term`` axis: input, attention, feed-forward, correction."""

CONVENTIONS = ("centred", "mickus")
"""How a LayerNorm's centring is shared out (see :func:`push_layer_norm`): ``"centred"`` centres each
term on its own; ``"mickus"`` follows Mickus et al.'s reference code (uncentred terms scaled by γ/σ,
the mean correction ``-γ ⊙ μ(z) / σ`` put into ``c``). Both sum exactly to the hidden state."""


class Decomposition(NamedTuple):
    """Result of :func:`decompose`.

    Attributes:
        terms: [layer + 1, term, batch, pos, d]; entry ``l`` decomposes hidden state ``l`` (0 = the
            embedding output, ``l`` = output of block ``l``); the term axis follows :data:`TERMS`.
        hidden: [layer + 1, batch, pos, d], the model's own hidden states (for checking).
        mask: [batch, pos], True on real tokens.
    """

    terms: Tensor
    hidden: Tensor
    mask: Tensor


def push_layer_norm(terms: Tensor, ln: nn.LayerNorm, *, convention: str = "centred") -> Tensor:
    """Send additive terms through a LayerNorm, keeping them additive.

    With ``z = Σ_k t_k`` and the token's ``σ = sqrt(Var(z) + eps)`` held fixed, the LayerNorm's
    output ``γ ⊙ (z - μ(z)) / σ + β`` can be shared out in two exact ways:

    - ``"centred"`` (default): ``Σ_k γ ⊙ (t_k - μ(t_k)) / σ + β``, each term centred on its own;
    - ``"mickus"`` (Mickus et al. 2022, as in their reference code): ``Σ_k γ ⊙ t_k / σ`` uncentred,
      and the whole mean correction ``-γ ⊙ μ(z) / σ`` goes to the correction term with ``β``.

    In both, the shift ``β`` goes to the correction term (the last entry of the term axis).

    Args:
        terms: [term, batch, pos, d] whose sum is the LayerNorm's input.
        ln: the ``nn.LayerNorm`` (its ``weight`` γ, ``bias`` β and ``eps``).
        convention: one of :data:`CONVENTIONS`.

    Returns:
        [term, batch, pos, d] whose sum is ``ln(terms.sum(0))``.

    >>> ln = nn.LayerNorm(4); t = torch.randn(4, 1, 2, 4, dtype=torch.float64)
    >>> torch.allclose(push_layer_norm(t, ln.double()).sum(0), ln.double()(t.sum(0)))
    True
    >>> torch.allclose(push_layer_norm(t, ln.double(), convention="mickus").sum(0), ln.double()(t.sum(0)))
    True
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    z = terms.sum(0)  # [batch, pos, d]
    sigma = torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + ln.eps)  # [batch, pos, 1]
    gamma = ln.weight.to(terms.dtype)
    if convention == "centred":
        out = gamma * (terms - terms.mean(-1, keepdim=True)) / sigma
    else:
        out = gamma * terms / sigma
        out[-1] = out[-1] - gamma * z.mean(-1, keepdim=True) / sigma  # the mean correction, into c
    if ln.bias is not None:
        out[-1] = out[-1] + ln.bias.to(terms.dtype)
    return out


def _check_model(model: nn.Module) -> None:
    try:
        layers = model.encoder.layer
        layer = layers[0]
        _ = (model.embeddings.LayerNorm, layer.attention.output.dense, layer.attention.output.LayerNorm)
        _ = (layer.attention.self.value, layer.output.dense, layer.output.LayerNorm)
    except (AttributeError, IndexError, TypeError) as err:
        raise ValueError(
            "model must be a post-LayerNorm BERT-style encoder laid out like transformers' BertModel "
            "(embeddings.LayerNorm, encoder.layer[i].attention.output.dense, ...); pass the bare encoder, "
            "e.g. the first value of helpers.assets.minilm()"
        ) from err
    if model.training:
        raise ValueError("model is in training mode (dropout would break the sum); call model.eval() first")


@torch.no_grad()
def decompose(
    model: nn.Module,
    *,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    convention: str = "centred",
) -> Decomposition:
    """Decompose every hidden state of a post-LN BERT encoder into ``i + h + f + c``.

    One forward pass records, with hooks, the input of each LayerNorm-free sub-layer output:
    the attention context (before the output projection ``W_O``) and the feed-forward output.
    Then, block by block (Mickus et al. 2022, §3),

    - attention: ``h += W_O (context - b_V)``, ``c += W_O b_V + b_O`` (each row of attention sums
      to 1, so the value bias passes through unchanged);
    - feed-forward: ``f += W_2 GELU(W_1 y + b_1)``, ``c += b_2`` (``b_1`` is inside the
      non-linearity and stays in ``f``);
    - each LayerNorm: :func:`push_layer_norm` with the chosen ``convention``.

    Args:
        model: a ``BertModel``-like encoder in eval mode (e.g. MiniLM-L6 from ``helpers.assets``).
        input_ids: [batch, pos] token ids.
        attention_mask: [batch, pos], 1 on real tokens (all ones if omitted).
        token_type_ids: [batch, pos] segment ids (zeros if omitted).
        dtype: precision of the recursion (float64 keeps the sum exact to the model's own rounding).
        convention: how each LayerNorm's centring is shared out, one of :data:`CONVENTIONS`;
            ``"mickus"`` reproduces the split of Mickus et al.'s reference code.

    Returns:
        a :class:`Decomposition`; ``terms.sum(1)`` equals ``hidden`` to float tolerance.

    >>> from transformers import BertConfig, BertModel
    >>> cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
    ...                  intermediate_size=16, max_position_embeddings=8)
    >>> model = BertModel(cfg, add_pooling_layer=False).eval()
    >>> dec = decompose(model, input_ids=torch.tensor([[1, 5, 7, 2]]))
    >>> tuple(dec.terms.shape), float((dec.terms.sum(1) - dec.hidden).abs().max()) < 1e-5
    ((3, 4, 1, 4, 8), True)
    """
    _check_model(model)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    input_ids, attention_mask = _check_inputs(input_ids, attention_mask, token_type_ids)
    record, hidden = _record(model, input_ids, attention_mask, token_type_ids)
    return Decomposition(_recurse(model, record, dtype, convention), hidden, attention_mask.bool().to(hidden.device))


@torch.no_grad()
def decompose_conventions(
    model: nn.Module,
    *,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    token_type_ids: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    conventions: tuple[str, ...] = CONVENTIONS,
) -> dict[str, Decomposition]:
    """:func:`decompose` under several conventions from one forward pass (half the cost of two calls).

    Returns:
        ``{convention: Decomposition}``, each equal to ``decompose(..., convention=convention)``.

    >>> from transformers import BertConfig, BertModel
    >>> cfg = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                  intermediate_size=16, max_position_embeddings=8)
    >>> model = BertModel(cfg, add_pooling_layer=False).eval()
    >>> both = decompose_conventions(model, input_ids=torch.tensor([[1, 5, 7, 2]]))
    >>> sorted(both), bool(torch.allclose(both["mickus"].terms.sum(1), both["centred"].terms.sum(1)))
    (['centred', 'mickus'], True)
    """
    _check_model(model)
    bad = [cv for cv in conventions if cv not in CONVENTIONS]
    if bad or not conventions:
        raise ValueError(f"conventions must be a non-empty tuple drawn from {CONVENTIONS}, got {conventions!r}")
    input_ids, attention_mask = _check_inputs(input_ids, attention_mask, token_type_ids)
    record, hidden = _record(model, input_ids, attention_mask, token_type_ids)
    mask = attention_mask.bool().to(hidden.device)
    return {cv: Decomposition(_recurse(model, record, dtype, cv), hidden, mask) for cv in conventions}


def _check_inputs(input_ids, attention_mask, token_type_ids) -> tuple[Tensor, Tensor]:
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, pos], got {tuple(input_ids.shape)}; wrap one sentence in a list")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must match input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
        raise ValueError(
            f"token_type_ids must match input_ids {tuple(input_ids.shape)}, got {tuple(token_type_ids.shape)}"
        )
    return input_ids, attention_mask


@torch.no_grad()
def _record(model, input_ids, attention_mask, token_type_ids) -> tuple[dict[str, Tensor], Tensor]:
    record: dict[str, Tensor] = {}
    sites = [f"blocks.{n}.{site}" for n in range(len(model.encoder.layer)) for site in ("attn.hook_z", "hook_mlp_out")]

    def keep_embed(_module, args) -> None:  # word + position + segment embeddings, before their LayerNorm
        record["embed"] = args[0].detach()

    device = next(model.parameters()).device
    with hooks.on_modules([(model.embeddings.LayerNorm, "input", keep_embed)]), hooks.capture(model, sites) as cache:
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            token_type_ids=None if token_type_ids is None else token_type_ids.to(device),
            output_hidden_states=True,
        )
    for n in range(len(model.encoder.layer)):
        record[f"context{n}"] = cache[f"blocks.{n}.attn.hook_z"].flatten(-2)  # [batch, pos, d], heads concatenated
        record[f"ffn{n}"] = cache[f"blocks.{n}.hook_mlp_out"]

    hidden = torch.stack(out.hidden_states).detach()  # [layer + 1, batch, pos, d]
    return record, hidden


def _recurse(model, record: dict[str, Tensor], dtype: torch.dtype, convention: str) -> Tensor:
    layers = model.encoder.layer
    embed = record["embed"].to(dtype)  # [batch, pos, d]: word + position + segment embeddings
    terms = torch.zeros((4, *embed.shape), dtype=dtype, device=embed.device)  # [term, batch, pos, d]
    terms[0] = embed
    terms = push_layer_norm(terms, model.embeddings.LayerNorm, convention=convention)
    history = [terms]
    for n, layer in enumerate(layers):
        w_o, b_o = layer.attention.output.dense.weight.to(dtype), layer.attention.output.dense.bias.to(dtype)
        b_v = layer.attention.self.value.bias.to(dtype)
        context = record[f"context{n}"].to(dtype)  # [batch, pos, d], heads concatenated
        terms = terms.clone()
        terms[1] += (context - b_v) @ w_o.T
        terms[3] += b_v @ w_o.T + b_o
        terms = push_layer_norm(terms, layer.attention.output.LayerNorm, convention=convention)
        b_2 = layer.output.dense.bias.to(dtype)
        terms[2] += record[f"ffn{n}"].to(dtype) - b_2
        terms[3] += b_2
        terms = push_layer_norm(terms, layer.output.LayerNorm, convention=convention)
        history.append(terms)
    return torch.stack(history)


def relative_error(dec: Decomposition) -> Tensor:
    """Largest relative error ``‖Σ terms - e‖ / ‖e‖`` over the real tokens, per layer.

    Returns:
        [layer + 1] float64 tensor.
    """
    diff = (dec.terms.sum(1) - dec.hidden.to(dec.terms.dtype)).norm(dim=-1)  # [layer + 1, batch, pos]
    rel = diff / dec.hidden.to(dec.terms.dtype).norm(dim=-1)
    return rel[:, dec.mask].amax(-1)


def importance(terms: Tensor) -> Tensor:
    """Share of each term in the hidden state: ``⟨e, t⟩ / ‖e‖²`` with ``e = Σ_t t``.

    Mickus et al. (2022, §4, eq. 10). The shares of the four terms sum to 1 for every token (a
    term can be negative when it points away from ``e``).

    Args:
        terms: [..., term, batch, pos, d], e.g. ``Decomposition.terms``.

    Returns:
        [..., term, batch, pos].

    >>> t = torch.tensor([[[[1.0, 0.0]]], [[[1.0, 2.0]]]])  # two terms, one token
    >>> importance(t).flatten().tolist()
    [0.25, 0.75]
    """
    if terms.ndim < 4:
        raise ValueError(f"terms must be [..., term, batch, pos, d], got shape {tuple(terms.shape)}")
    e = terms.sum(-4, keepdim=True)  # [..., 1, batch, pos, d]
    norm2 = (e * e).sum(-1)
    if bool((norm2 == 0).any()):
        raise ValueError("some hidden state is exactly zero, so its shares are undefined; drop that token")
    return (terms * e).sum(-1) / norm2
