"""Causal interventions on a Llama-style language model: lenses, direct logit attribution, patching, circuits.

Every function takes the model first (bound once), does one thing, and takes its options by keyword.
They sit on the book's one hook layer, :mod:`helpers.hooks` (site names as in TransformerLens):

- :func:`logit_lens` / :func:`lens_stats` read the residual stream after every block through the final
  RMSNorm and the unembedding (nostalgebraist 2020); :class:`TunedLens` and :func:`train_tuned_lens` add
  one learned affine translator per block (Belrose et al. 2023);
- :func:`direct_logit_attribution` splits a logit difference exactly over the embedding, every head and
  every MLP, with the final RMSNorm scale frozen (Elhage et al. 2021);
- :func:`patching_sweep` patches clean activations into a corrupted run, one site at a time (Vig et al.
  2020; Meng et al. 2022); :func:`attribution_patching` is its first-order approximation (Nanda 2023;
  Syed et al. 2023); :func:`site_grid` builds the usual site lists;
- :func:`path_patching` measures a head's effect along one path (to the logits, or into other heads'
  queries, keys or values; Wang et al. 2022), :func:`expand_kv_heads` gives each query head its own
  keys and values for it;
- :func:`induction_scores` scores heads on repeated random tokens (Olsson et al. 2022) and
  :func:`circuit_logit_diff` measures a circuit with every other head mean-ablated (Wang et al. 2022).

Introduced in nbs/06b_causal_interventions.ipynb (Chapter 6b).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from helpers import hooks

Metric = Callable[[Tensor], Tensor]  # logits [batch, pos, vocab] -> [batch] (or a scalar)


@dataclass(frozen=True)
class Site:
    """One place to patch: a hook site name, optionally restricted to one position and/or one head."""

    name: str
    position: int | None = None
    head: int | None = None

    def __str__(self) -> str:
        extra = "" if self.position is None else f" pos {self.position}"
        return self.name + extra + ("" if self.head is None else f" head {self.head}")


# ----------------------------------------------------------------------------------------------- checks
def _base(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm")):
        raise ValueError(f"expected a Llama-style causal LM (model.model.norm, lm_head), got {type(model).__name__}")
    return base


def _ids(input_ids: Tensor, name: str = "input_ids", vocab: int | None = None) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
        got = getattr(input_ids, "shape", input_ids)
        raise ValueError(f"{name} must be a [batch, pos] integer tensor, got {got!r}")
    if input_ids.numel() == 0:
        raise ValueError(f"{name} is empty")
    if vocab is not None and (input_ids.min() < 0 or input_ids.max() >= vocab):
        raise ValueError(f"{name} has token ids outside the vocabulary 0..{vocab - 1}")
    return input_ids.long()


def _pair(model: nn.Module, clean: Tensor, corrupted: Tensor) -> tuple[Tensor, Tensor]:
    vocab = model.config.vocab_size
    clean, corrupted = _ids(clean, "clean", vocab), _ids(corrupted, "corrupted", vocab)
    if clean.shape != corrupted.shape:
        raise ValueError(
            f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} must have the same [batch, pos]: "
            "patching copies position p of one run into position p of the other, so prompts need equal token lengths"
        )
    return clean, corrupted


def _check_sites(model: nn.Module, sites: Sequence[Site], n_pos: int) -> list[Site]:
    if not sites:
        raise ValueError("sites is empty: give a list of Site(name, position, head), e.g. from site_grid")
    valid = set(hooks.site_names(model))
    n_heads = model.config.num_attention_heads
    out = []
    for s in sites:
        s = Site(s) if isinstance(s, str) else Site(*s) if isinstance(s, tuple) else s
        if s.name not in valid:
            raise ValueError(f"unknown site {s.name!r}; see hooks.site_names(model), e.g. 'blocks.0.attn.hook_z'")
        if s.name.endswith("hook_pattern"):
            raise ValueError(f"{s.name} cannot be patched; patch attn.hook_z (the heads' outputs) instead")
        if s.position is not None and not -n_pos <= s.position < n_pos:
            raise ValueError(f"{s}: position {s.position} out of range for prompts of {n_pos} tokens")
        if s.head is not None and (not s.name.endswith("attn.hook_z") or not 0 <= s.head < n_heads):
            raise ValueError(f"{s}: head= needs an attn.hook_z site and 0 <= head < {n_heads}")
        out.append(s)
    return out


# ------------------------------------------------------------------------------------------------ lenses
def unembed(model: nn.Module, resid: Tensor) -> Tensor:
    """Logits from a residual-stream vector: the final RMSNorm, then the (tied) unembedding.

    Args:
        model: a Llama-style causal LM.
        resid: ``[..., d_model]`` residual stream.

    Returns:
        ``[..., vocab]`` logits.
    """
    return model.lm_head(_base(model).norm(resid))


def residual_stream(model: nn.Module, input_ids: Tensor, *,
                    attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The residual stream after every block and the model's logits, in one forward pass.

    Returns:
        ``(resid [layer, batch, pos, d_model], logits [batch, pos, vocab])``; ``resid[-1]`` feeds the final norm.
    """
    input_ids = _ids(input_ids, vocab=model.config.vocab_size)
    out, cache = hooks.run_with_cache(model, input_ids, attention_mask=attention_mask, sites="blocks.*.hook_resid_post")
    resid = torch.stack([cache[f"blocks.{l}.hook_resid_post"] for l in range(model.config.num_hidden_layers)])
    return resid, out.logits


def logit_lens(model: nn.Module, input_ids: Tensor, *, lens: TunedLens | None = None) -> Tensor:
    """The model's next-token logits read off the residual stream after every block (nostalgebraist 2020).

    Args:
        model: a Llama-style causal LM in eval mode.
        input_ids: ``[batch, pos]`` token ids (keep it small: the output holds ``layer x vocab`` per token).
        lens: ``None`` for the logit lens; a :class:`TunedLens` to translate each layer first.

    Returns:
        ``[layer, batch, pos, vocab]`` logits; the last layer equals the model's own logits.
    """
    resid, _ = residual_stream(model, input_ids)
    return torch.stack([unembed(model, resid[l] if lens is None else lens(resid[l], l)) for l in range(len(resid))])


def lens_stats(model: nn.Module, input_ids: Tensor, *, attention_mask: Tensor | None = None,
               lens: TunedLens | None = None) -> dict[str, Tensor]:
    """Per layer and token: KL(final ‖ lens) in nats, and the lens's rank of the model's top token.

    Args:
        model: a Llama-style causal LM in eval mode.
        input_ids: ``[batch, pos]`` token ids; attention_mask: ``[batch, pos]`` (1 = real token), optional.
        lens: ``None`` for the logit lens, or a :class:`TunedLens`.

    Returns:
        ``{"kl": [layer, token], "rank": [layer, token]}`` over the real tokens after the first of each row
        (mask applied, row-major; the first token has no context and an outlier stream, as in Belrose et al.);
        rank 0 means the lens's top token is the model's.
    """
    resid, logits = residual_stream(model, input_ids, attention_mask=attention_mask)
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    keep[:, 0] = False
    final = logits[keep].log_softmax(-1)                          # [token, vocab]
    top = final.argmax(-1)                                        # [token]
    kls, ranks = [], []
    for l in range(len(resid)):
        h = resid[l][keep]                                        # [token, d_model]
        lp = unembed(model, h if lens is None else lens(h, l)).log_softmax(-1)
        kls.append((final.exp() * (final - lp)).sum(-1))
        ranks.append((lp > lp.gather(-1, top[:, None])).sum(-1))
    return {"kl": torch.stack(kls), "rank": torch.stack(ranks)}


class TunedLens(nn.Module):
    """One affine translator per block, ``h -> h + (h V) Uᵀ + b``, then the model's own unembedding.

    Belrose et al. (2023) use a full ``d x d`` matrix per layer; here it is the identity plus a rank-``rank``
    update, so the 30 translators of SmolLM2 fit in about 2 MB. ``U = 0`` at initialisation: an untrained
    tuned lens is the logit lens. The last block needs no translator (its lens is the model itself).

    Args:
        n_layers: number of blocks; d_model: residual width; rank: rank of each update.
    """

    def __init__(self, n_layers: int, d_model: int, *, rank: int = 16):
        super().__init__()
        if min(n_layers, d_model, rank) < 1:
            raise ValueError(f"n_layers, d_model and rank must be positive, got {n_layers}, {d_model}, {rank}")
        g = torch.Generator().manual_seed(0)
        self.V = nn.Parameter(torch.randn(n_layers, d_model, rank, generator=g) / math.sqrt(d_model))
        self.U = nn.Parameter(torch.zeros(n_layers, d_model, rank))
        self.b = nn.Parameter(torch.zeros(n_layers, d_model))

    def forward(self, resid: Tensor, layer: int) -> Tensor:
        """Translate ``resid [..., d_model]`` of block ``layer`` into the last block's basis."""
        if not 0 <= layer < self.b.shape[0]:
            raise ValueError(f"layer {layer} out of range 0..{self.b.shape[0] - 1}")
        return resid + (resid @ self.V[layer]) @ self.U[layer].T + self.b[layer]


def train_tuned_lens(model: nn.Module, input_ids: Tensor, *, attention_mask: Tensor | None = None, rank: int = 16,
                     steps: int = 60, batch_tokens: int = 64, top_k: int = 64, lr: float = 3e-3,
                     seed: int = 0) -> tuple[TunedLens, list[float]]:
    """Fit a :class:`TunedLens` by minimising KL(final ‖ lens) summed over layers (Belrose et al. 2023, §3).

    To fit a CPU budget the KL of each step is computed on a restricted vocabulary: the union of the
    model's top-``top_k`` tokens over the step's batch, both distributions renormalised on it. Evaluate
    with :func:`lens_stats`, which uses the full vocabulary.

    Args:
        model: a Llama-style causal LM in eval mode (left frozen).
        input_ids: ``[batch, pos]`` training text; attention_mask: ``[batch, pos]`` (padding = 0), optional.
        rank, steps, batch_tokens, top_k, lr, seed: size and schedule (Adam, cosine decay).

    Returns:
        ``(lens, losses)``: the trained lens in eval mode and the training loss per step.
    """
    if min(steps, batch_tokens, top_k) < 1:
        raise ValueError(f"steps, batch_tokens and top_k must be positive, got {steps}, {batch_tokens}, {top_k}")
    input_ids = _ids(input_ids, vocab=model.config.vocab_size)
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool().clone()
    keep[:, 0] = False                                             # the first token's stream is an outlier (no context)
    h = []
    with torch.no_grad():
        for c in _chunks(len(input_ids), 16):                      # the body only: no [token, vocab] logits kept
            with hooks.capture(model, "blocks.*.hook_resid_post") as cache:
                _base(model)(input_ids[c], attention_mask=None if attention_mask is None else attention_mask[c])
            h.append(torch.stack([cache[f"blocks.{l}.hook_resid_post"][keep[c]] for l in range(len(cache))]))
    h = torch.cat(h, 1)                                            # [layer, token, d_model]
    n_layers, n_tok = h.shape[0], h.shape[1]
    lens = TunedLens(n_layers, h.shape[-1], rank=rank)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(lens.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(n_tok, (min(batch_tokens, n_tok),), generator=g)
        with torch.no_grad():
            final = unembed(model, h[-1, idx])                     # [batch, vocab]
            vocab = final.topk(top_k, dim=-1).indices.unique()     # [v]
            target = final[:, vocab].log_softmax(-1)               # [batch, v]
        w = model.lm_head.weight[vocab]                            # [v, d_model]
        loss = 0.0
        for l in range(n_layers - 1):
            lp = (_base(model).norm(lens(h[l, idx], l)) @ w.T).log_softmax(-1)
            loss = loss + (target.exp() * (target - lp)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item() / (n_layers - 1))
    return lens.eval().requires_grad_(False), losses


# ------------------------------------------------------------------------------ direct logit attribution
def direct_logit_attribution(model: nn.Module, input_ids: Tensor, *, target: int | Tensor, foil: int | Tensor,
                             position: int = -1) -> dict[str, Tensor]:
    """Split ``logit[target] - logit[foil]`` exactly over the embedding, every head and every MLP.

    The residual stream entering the final RMSNorm is a plain sum (pre-norm blocks only *add*), and the
    norm is linear once its per-token scale ``1 / rms`` is frozen at the value of this very run, so the
    split is exact (Elhage et al. 2021, "direct path"); it ignores what a part does through later layers.

    Args:
        model: a Llama-style causal LM in eval mode (no biases in ``o_proj``/``down_proj``).
        input_ids: ``[batch, pos]``; target, foil: token ids, an int or ``[batch]``.
        position: the position whose next-token logits are split.

    Returns:
        ``{"embed": [batch], "heads": [batch, layer, head], "mlps": [batch, layer], "logit_diff": [batch]}``
        with ``embed + heads.sum((1, 2)) + mlps.sum(1) == logit_diff`` to float tolerance.
    """
    base = _base(model)
    input_ids = _ids(input_ids, vocab=model.config.vocab_size)
    batch, n_pos = input_ids.shape
    if not -n_pos <= position < n_pos:
        raise ValueError(f"position {position} out of range for prompts of {n_pos} tokens")
    target, foil = (torch.as_tensor(t).long().expand(batch) for t in (target, foil))
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    sites = ["hook_embed", "blocks.*.attn.hook_z", "blocks.*.hook_mlp_out", f"blocks.{n_layers - 1}.hook_resid_post"]
    out, cache = hooks.run_with_cache(model, input_ids, sites=sites)
    final = cache[f"blocks.{n_layers - 1}.hook_resid_post"][:, position]            # [batch, d_model]
    norm = base.norm
    scale = norm.weight * torch.rsqrt(final.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)  # frozen
    w_u = model.lm_head.weight
    direction = scale * (w_u[target] - w_u[foil])                                      # [batch, d_model]
    heads = []
    for l in range(n_layers):
        z = cache[f"blocks.{l}.attn.hook_z"][:, position]                              # [batch, head, d_head]
        w_o = base.layers[l].self_attn.o_proj.weight.unflatten(1, (n_heads, -1))       # [d_model, head, d_head]
        heads.append(torch.einsum("bhk,dhk,bd->bh", z, w_o, direction))
    mlp_out = [cache[f"blocks.{l}.hook_mlp_out"][:, position] for l in range(n_layers)]  # each [batch, d_model]
    mlps = torch.stack([(m * direction).sum(-1) for m in mlp_out], 1)
    logits = out.logits[:, position]
    return {
        "embed": (cache["hook_embed"][:, position] * direction).sum(-1),
        "heads": torch.stack(heads, 1),
        "mlps": mlps,
        "logit_diff": logits.gather(1, target[:, None])[:, 0] - logits.gather(1, foil[:, None])[:, 0],
    }


# ------------------------------------------------------------------------------------------- patching
def logit_diff_metric(target: Tensor, foil: Tensor, *, position: int = -1) -> Metric:
    """``metric(logits) -> [batch]``: ``logit[target] - logit[foil]`` at ``position`` for every prompt."""
    target, foil = torch.as_tensor(target).long(), torch.as_tensor(foil).long()

    def metric(logits: Tensor) -> Tensor:
        last = logits[:, position]
        b = torch.arange(last.shape[0])
        return last[b, target.expand(len(b))] - last[b, foil.expand(len(b))]

    return metric


def normalised(patched: Tensor | float, *, clean: Tensor | float, corrupted: Tensor | float) -> Tensor:
    """``(patched - corrupted) / (clean - corrupted)``: 0 = the corrupted run, 1 = the clean run.

    >>> float(normalised(torch.tensor(1.0), clean=3.0, corrupted=-1.0))
    0.5
    """
    patched, clean, corrupted = (torch.as_tensor(x, dtype=torch.float32) for x in (patched, clean, corrupted))
    gap = clean - corrupted
    if (gap.abs() < 1e-9).any():
        raise ValueError("clean and corrupted metrics are equal: the corruption changes nothing to normalise by")
    return (patched - corrupted) / gap


def site_grid(model: nn.Module, kind: str, *, n_pos: int | None = None) -> tuple[list[Site], tuple[int, ...]]:
    """The usual sweep: ``"resid"`` per (layer, position), ``"heads"`` per (layer, head), ``"mlp"`` per layer.

    Returns:
        ``(sites, shape)``: reshape a sweep's ``[site]`` axis to ``shape`` (``[layer, pos]``, ``[layer, head]``,
        ``[layer]``).
    """
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    if kind == "resid":
        if not n_pos or n_pos < 1:
            raise ValueError("kind='resid' needs n_pos=, the prompts' token length")
        sites = [Site(f"blocks.{l}.hook_resid_pre", p) for l in range(n_layers) for p in range(n_pos)]
        return sites, (n_layers, n_pos)
    if kind == "heads":
        sites = [Site(f"blocks.{l}.attn.hook_z", None, h) for l in range(n_layers) for h in range(n_heads)]
        return sites, (n_layers, n_heads)
    if kind == "mlp":
        return [Site(f"blocks.{l}.hook_mlp_out") for l in range(n_layers)], (n_layers,)
    raise ValueError(f"kind must be 'resid', 'heads' or 'mlp', got {kind!r}")


def _patch(model: nn.Module, site: Site, value: Tensor | None = None, fn=None):
    return hooks.patch(model, site.name, value, fn=fn, positions=site.position, heads=site.head)


@torch.no_grad()
def patching_sweep(model: nn.Module, clean: Tensor, corrupted: Tensor, *, sites: Sequence[Site], metric: Metric,
                   progress: bool = False) -> Tensor:
    """Activation patching: run ``corrupted`` with one site at a time set to its value on ``clean``.

    Args:
        model: a causal LM in eval mode.
        clean, corrupted: ``[batch, pos]`` token ids of equal shape (prompt pairs of equal token length).
        sites: the :class:`Site` list (e.g. from :func:`site_grid`).
        metric: ``metric(logits [batch, pos, vocab]) -> [batch]`` (or a scalar), e.g. :func:`logit_diff_metric`.
        progress: show a tqdm bar.

    Returns:
        ``[site, *metric shape]`` the metric of each patched run (normalise with :func:`normalised`).
    """
    clean, corrupted = _pair(model, clean, corrupted)
    sites = _check_sites(model, sites, clean.shape[1])
    _, cache = hooks.run_with_cache(model, clean, sites=sorted({s.name for s in sites}))
    out = []
    iterator = sites
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(sites, desc="patching", leave=False)
    for site in iterator:
        with _patch(model, site, cache[site.name]):
            out.append(metric(model(corrupted).logits))
    return torch.stack(out)


def attribution_patching(model: nn.Module, clean: Tensor, corrupted: Tensor, *, sites: Sequence[Site],
                         metric: Metric) -> Tensor:
    """First-order estimate of :func:`patching_sweep`: ``(a_clean - a_corrupted) · ∂metric/∂a`` at the corrupted run.

    Two forward passes and one backward pass for every site at once (Nanda 2023; Syed et al. 2023),
    instead of one forward pass per site. Exact for a metric linear in the site; a guess elsewhere.

    Returns:
        ``[site, batch]`` estimated metric change (add the corrupted metric to compare with a sweep).
    """
    clean, corrupted = _pair(model, clean, corrupted)
    sites = _check_sites(model, sites, clean.shape[1])
    names = sorted({s.name for s in sites})
    with torch.no_grad():
        _, clean_cache = hooks.run_with_cache(model, clean, sites=names)
        _, corr_cache = hooks.run_with_cache(model, corrupted, sites=names)
    deltas = {n: torch.zeros_like(corr_cache[n], requires_grad=True) for n in names}

    def adder(n):
        return lambda x: x + deltas[n].view_as(x)

    with torch.enable_grad(), hooks.patches([hooks.patch(model, n, fn=adder(n)) for n in names]):
        value = metric(model(corrupted).logits)
        grads = dict(zip(names, torch.autograd.grad(value.sum(), [deltas[n] for n in names]), strict=True))
    out = []
    for s in sites:
        effect = (clean_cache[s.name] - corr_cache[s.name]) * grads[s.name]     # [batch, pos, *features]
        if s.head is not None:
            effect = effect[:, :, s.head]
        if s.position is not None:
            effect = effect[:, s.position]
        out.append(effect.flatten(1).sum(1))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ path patching
def expand_kv_heads(model: nn.Module) -> nn.Module:
    """A copy of a grouped-query-attention Llama with one key/value head per query head: the same function.

    With grouped-query attention ``n_heads // n_kv_heads`` query heads read the same keys and values, so
    ``hooks.patch(model, "blocks.l.attn.hook_v", heads=[g])`` changes several heads at once. Repeating each
    key/value projection's rows (as ``repeat_kv`` repeats its output) gives every query head its own copy,
    which path patching into one head's keys or values needs.

    Returns:
        a new model (the input is left as it is); its logits equal the input's to float tolerance.
    """
    import copy

    _base(model)
    n_heads, n_kv = model.config.num_attention_heads, hooks._n_kv_heads(model)
    out = copy.deepcopy(model)
    if n_kv == n_heads:
        return out
    groups = n_heads // n_kv
    for layer in _base(out).layers:
        attn = layer.self_attn
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            new = nn.Linear(old.in_features, old.out_features * groups, bias=old.bias is not None)
            new.weight.data = old.weight.data.unflatten(0, (n_kv, -1)).repeat_interleave(groups, 0).flatten(0, 1)
            if old.bias is not None:
                new.bias.data = old.bias.data.unflatten(0, (n_kv, -1)).repeat_interleave(groups, 0).flatten()
            setattr(attn, name, new.to(old.weight))
        attn.num_key_value_groups = 1
    out.config.num_key_value_heads = n_heads
    return out


def _heads(model: nn.Module, heads: Sequence[tuple[int, int]], what: str) -> list[tuple[int, int]]:
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    try:
        out = [(int(l), int(h)) for l, h in heads]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a list of (layer, head) pairs, got {heads!r}") from err
    if not out:
        raise ValueError(f"{what} is empty: give (layer, head) pairs")
    bad = [c for c in out if not (0 <= c[0] < n_layers and 0 <= c[1] < n_heads)]
    if bad:
        raise ValueError(f"{what} {bad} out of range ({n_layers} layers x {n_heads} heads)")
    return out


@torch.no_grad()
def path_patching(model: nn.Module, orig: Tensor, new: Tensor, *, senders: Sequence[tuple[int, int]], metric: Metric,
                  receivers: Sequence[tuple[int, int]] | None = None, receiver_input: str = "q",
                  progress: bool = False) -> Tensor:
    """Path patching (Wang et al. 2022, §3.1 and App. B): a sender head's effect along one path only.

    For each sender head on its own: (1) run ``orig`` with the sender's output taken from ``new`` and every
    other head of later blocks frozen at its ``orig`` output (MLPs are recomputed, so they are part of every
    path); (2) with ``receivers=None`` the metric of that run is the answer (the path sender → MLPs → logits);
    otherwise record the receivers' ``receiver_input`` (their query, key or value projection, all positions)
    in that run and (3) run ``orig`` again with only those inputs of only those heads replaced (the path
    sender → receivers → logits, everything after the receivers recomputed).

    Args:
        model: a Llama-style causal LM in eval mode; for ``receiver_input`` ``"k"``/``"v"`` one key/value head
            per query head (:func:`expand_kv_heads`), so that one head's keys or values can be patched alone.
        orig, new: ``[batch, pos]`` token ids of equal shape: the run measured and the run the senders come from
            (Wang et al.: the IOI prompts and the same prompts with three unrelated names).
        senders: ``(layer, head)`` pairs, each patched on its own.
        metric: ``metric(logits [batch, pos, vocab]) -> [batch]`` on ``orig``'s targets, e.g. :func:`logit_diff_metric`.
        receivers: ``(layer, head)`` pairs whose input carries the path, or ``None`` for the logits directly.
        receiver_input: ``"q"``, ``"k"`` or ``"v"``.
        progress: show a tqdm bar over blocks.

    Returns:
        ``[sender, batch]`` the metric of each path-patched run (compare with ``metric`` of ``orig``).
    """
    orig, new = _pair(model, orig, new)
    senders = _heads(model, senders, "senders")
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    if receiver_input not in ("q", "k", "v"):
        raise ValueError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}")
    if receivers is not None:
        receivers = _heads(model, receivers, "receivers")
        if receiver_input != "q" and hooks._n_kv_heads(model) != n_heads:
            raise ValueError(
                f"receiver_input={receiver_input!r} with grouped-query attention ({hooks._n_kv_heads(model)} key/value "
                f"heads for {n_heads} query heads) would patch several heads at once: pass expand_kv_heads(model)"
            )
    z_sites = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    _, z_orig = hooks.run_with_cache(model, orig, sites=z_sites)
    _, z_new = hooks.run_with_cache(model, new, sites=z_sites)
    by_layer: dict[int, list[int]] = {}
    for i, (l, _) in enumerate(senders):
        by_layer.setdefault(l, []).append(i)
    b = orig.shape[0]
    out: list[Tensor | None] = [None] * len(senders)
    if receivers is not None:  # a sender in a receiver's block or later cannot reach it: the run is orig itself
        last = max(l for l, _ in receivers)
        late = [i for i, (l, _) in enumerate(senders) if l >= last]
        if late:
            unchanged = metric(model(orig).logits)
            for i in late:
                out[i] = unchanged.clone()
        by_layer = {l: idx for l, idx in by_layer.items() if l < last}
    layers = sorted(by_layer)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="path patching", leave=False)
    for layer in layers:
        idx = by_layer[layer]
        k = len(idx)
        heads_here = [senders[i][1] for i in idx]
        batch = orig.repeat(k, 1)                                                           # [k * batch, pos]

        def put_senders(z, layer=layer, heads_here=heads_here):
            z = z.clone()
            for j, h in enumerate(heads_here):
                z[j * b : (j + 1) * b, :, h] = z_new[f"blocks.{layer}.attn.hook_z"][:, :, h]
            return z

        frozen = [hooks.patch(model, f"blocks.{layer}.attn.hook_z", fn=put_senders)]
        frozen += [hooks.patch(model, z_sites[l], z_orig[z_sites[l]].repeat(k, 1, 1, 1))
                   for l in range(layer + 1, n_layers)]
        if receivers is None:
            with hooks.patches(frozen):
                logits = model(batch).logits
        else:
            r_sites = sorted({f"blocks.{l}.attn.hook_{receiver_input}" for l, _ in receivers})
            with hooks.patches(frozen), hooks.capture(model, r_sites) as recorded:
                model(batch)
            heads_at = {site: sorted({h for l, h in receivers if site == f"blocks.{l}.attn.hook_{receiver_input}"})
                        for site in r_sites}
            writes = [hooks.patch(model, site, recorded[site], heads=heads_at[site]) for site in r_sites]
            with hooks.patches(writes):
                logits = model(batch).logits
        for j, i in enumerate(idx):
            out[i] = metric(logits[j * b : (j + 1) * b])
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ causal tracing
TRACE_KINDS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


@torch.no_grad()
def causal_trace(model: nn.Module, input_ids: Tensor, *, subject: Sequence[int], target: int, noise: Tensor,
                 positions: Sequence[int], kinds: Sequence[str] = ("resid", "mlp", "attn"), window: int = 10) -> dict:
    """Causal tracing (Meng et al. 2022, §2.1): noise the subject, restore one clean state, read P(target).

    The subject's token embeddings get ``noise`` added (the corrupted run); then, one (layer, position) at a
    time, a clean state is written back: ``"resid"`` the residual stream after block ``l``; ``"mlp"`` /
    ``"attn"`` the MLP / attention outputs of the ``window`` blocks around ``l`` (``l - window // 2`` to
    ``l + window // 2 - 1``, clipped, as in the paper's code). Every restored run uses the same noise samples,
    so restored and corrupted runs are paired.

    Args:
        model: a Llama-style causal LM in eval mode.
        input_ids: ``[1, pos]`` one prompt.
        subject: positions of the subject's tokens.
        target: the answer's token id (the probability read at the last position).
        noise: ``[n_noise, len(subject), d_model]`` added to the subject's embeddings.
        positions: positions to restore (e.g. the subject's last token and the prompt's last token).
        kinds: which states to restore, keys of :data:`TRACE_KINDS`.
        window: blocks restored together for ``"mlp"`` and ``"attn"``.

    Returns:
        ``{"clean": P in the clean run, "corrupted": [n_noise], kind: [position, layer, n_noise]}``.
    """
    input_ids = _ids(input_ids, vocab=model.config.vocab_size)
    n_layers, n_pos = model.config.num_hidden_layers, input_ids.shape[1]
    if input_ids.shape[0] != 1:
        raise ValueError(f"causal_trace takes one prompt, [1, pos]; got {tuple(input_ids.shape)}")
    subject, positions = list(subject), list(positions)
    if not subject or not positions or any(not 0 <= p < n_pos for p in subject + positions):
        raise ValueError(f"subject and positions must be non-empty positions in 0..{n_pos - 1}")
    if noise.ndim != 3 or noise.shape[1] != len(subject) or noise.shape[2] != model.config.hidden_size:
        want = f"[n_noise, {len(subject)}, {model.config.hidden_size}]"
        raise ValueError(f"noise must be {want}, got {tuple(noise.shape)}")
    bad = [k for k in kinds if k not in TRACE_KINDS]
    if bad or not 0 < window:
        raise ValueError(f"kinds must come from {sorted(TRACE_KINDS)} and window > 0; got {bad}, window={window}")
    n = len(noise)
    sites = sorted({f"blocks.{l}.{TRACE_KINDS[k]}" for k in kinds for l in range(n_layers)})
    out_clean, clean = hooks.run_with_cache(model, input_ids, sites=sites)
    out = {"clean": float(out_clean.logits[0, -1].softmax(-1)[target])}
    subj = torch.tensor(subject)

    def noised(rows: int):
        def add(x: Tensor) -> Tensor:
            x = x.clone()
            x[:, subj] = x[:, subj] + noise.to(x).repeat(rows // n, 1, 1)
            return x

        return hooks.patch(model, "hook_embed", fn=add)

    with noised(n):
        out["corrupted"] = model(input_ids.expand(n, -1)).logits[:, -1].softmax(-1)[:, target]
    batch = input_ids.expand(n_layers * n, -1)
    for kind in kinds:
        per_pos = []
        for p in positions:
            writes = []
            for j in range(n_layers):  # site j is restored in the row blocks of the layers l whose window holds it
                if kind == "resid":
                    blocks = [j]
                else:
                    blocks = [l for l in range(n_layers) if l - window // 2 <= j < l + window - window // 2]
                rows = torch.cat([torch.arange(l * n, (l + 1) * n) for l in blocks])
                site = f"blocks.{j}.{TRACE_KINDS[kind]}"

                def restore(x: Tensor, rows=rows, p=p, value=clean[site][0, p]) -> Tensor:
                    x = x.clone()
                    x[rows, p] = value
                    return x

                writes.append(hooks.patch(model, site, fn=restore))
            with noised(len(batch)), hooks.patches(writes):
                probs = model(batch).logits[:, -1].softmax(-1)[:, target]
            per_pos.append(probs.view(n_layers, n))
        out[kind] = torch.stack(per_pos)                                            # [position, layer, noise]
    return out


# ----------------------------------------------------------------------------------------------- circuits
def induction_scores(pattern: Tensor, *, period: int, start: int = 0) -> dict[str, Tensor]:
    """Induction and previous-token scores of every head on sequences that repeat after ``period`` tokens.

    Args:
        pattern: attention probabilities ``[layer, batch, head, query, key]`` on sequences whose tokens
            ``start .. start + period - 1`` repeat at ``start + period ..``.
        period: length of the repeated block; start: where the first copy begins (e.g. 1 after a BOS token).

    Returns:
        ``{"induction": [layer, head], "previous": [layer, head]}``: mean attention from each query of the
        second copy to the token after its earlier copy (``q - period + 1``), and to ``q - 1`` (Olsson et al.
        2022, "Induction heads" §2; previous-token heads: Elhage et al. 2021).

    >>> p = torch.zeros(1, 1, 1, 6, 6); q = torch.arange(6)
    >>> p[..., q[3:], q[3:] - 2] = 1.0                    # period 3: every second-copy query on q - 3 + 1
    >>> induction_scores(p, period=3)["induction"]
    tensor([[1.]])
    """
    if pattern.ndim != 5 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(f"pattern must be [layer, batch, head, query, key], got {tuple(pattern.shape)}")
    n = pattern.shape[-1]
    if period < 1 or start < 0 or start + 2 * period > n:
        raise ValueError(f"need period >= 1 and start + 2 * period <= {n} positions, got {period=}, {start=}")
    q = torch.arange(start + period, start + 2 * period)
    q_prev = torch.arange(start + 1, start + 2 * period)
    return {
        "induction": pattern[..., q, q - period + 1].mean(dim=(1, 3)),
        "previous": pattern[..., q_prev, q_prev - 1].mean(dim=(1, 3)),
    }


@torch.no_grad()
def circuit_logit_diff(model: nn.Module, input_ids: Tensor, *, circuit: Sequence[tuple[int, int]], mean_z: Tensor,
                       metric: Metric) -> Tensor:
    """The metric with every head *outside* ``circuit`` mean-ablated (Wang et al. 2022, §4 "faithfulness").

    Args:
        model: a causal LM in eval mode.
        input_ids: ``[batch, pos]`` prompts.
        circuit: ``(layer, head)`` pairs that keep their own output.
        mean_z: ``[layer, pos, head, d_head]`` mean head outputs over a reference distribution of prompts of
            the same length (e.g. the same templates with three unrelated names).
        metric: ``metric(logits) -> [batch]``.

    Returns:
        ``[batch]`` metric of the ablated model; divide by the full model's to get the share recovered.
    """
    input_ids = _ids(input_ids, vocab=model.config.vocab_size)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    if mean_z.ndim != 4 or mean_z.shape[0] != n_layers or mean_z.shape[1] != input_ids.shape[1]:
        want = f"[layer={n_layers}, pos={input_ids.shape[1]}, head, d_head]"
        raise ValueError(f"mean_z must be {want}, got {tuple(mean_z.shape)}")
    keep = set(map(tuple, circuit))
    bad = [c for c in keep if not (0 <= c[0] < n_layers and 0 <= c[1] < n_heads)]
    if bad:
        raise ValueError(f"circuit heads {bad} out of range ({n_layers} layers x {n_heads} heads)")
    patches = []
    for l in range(n_layers):
        ablated = [h for h in range(n_heads) if (l, h) not in keep]
        if ablated:
            patches.append(hooks.patch(model, f"blocks.{l}.attn.hook_z", mean_z[l][None], heads=ablated))
    with hooks.patches(patches):
        return metric(model(input_ids).logits)


__all__ = [
    "Site", "TunedLens", "attribution_patching", "circuit_logit_diff", "direct_logit_attribution", "expand_kv_heads",
    "induction_scores", "lens_stats", "logit_diff_metric", "logit_lens", "normalised", "path_patching",
    "patching_sweep", "pick_heads", "residual_stream", "site_grid", "train_tuned_lens", "unembed",
]


# ------------------------------------------------------------------- the chapter's task and its recipe
NAMES = ("John", "Mary", "Tom", "James", "Paul", "Sarah", "David", "Michael", "Peter", "Alice", "Mark", "Jack",
         "Anna", "Lucy", "Emma", "Kate", "Daniel", "Laura", "Robert", "George")
TEMPLATES = (
    "When{A} and{B} went to the store,{C} gave a drink to",
    "After{A} and{B} went to the park,{C} gave a ball to",
    "Then,{A} and{B} had a long argument. Afterwards{C} said to",
)


@dataclass(frozen=True)
class IOIPrompts:
    """Indirect-object prompts (Wang et al. 2022) of one template: clean, corrupted and reference runs.

    ``clean``: "When IO and S ..., S gave a drink to" (answer IO); ``corrupted``: the second S replaced by
    IO (answer S, same length); ``reference``: three different names, for mean ablation. Token ids are
    ``[prompt, pos]``; ``io`` and ``s`` are ``[prompt]`` token ids of the two names.
    """

    template: str
    clean: Tensor
    corrupted: Tensor
    reference: Tensor
    io: Tensor
    s: Tensor


def ioi_prompts(tokenizer, *, n_per_template: int = 16, seed: int = 0) -> list[IOIPrompts]:
    """Templated IOI prompts with single-token names, half "IO and S", half "S and IO".

    Returns:
        one :class:`IOIPrompts` per template of :data:`TEMPLATES` (each of equal token length inside).
    """
    import random

    if n_per_template < 2:
        raise ValueError(f"n_per_template must be >= 2, got {n_per_template}")
    ids = {n: tokenizer(" " + n, add_special_tokens=False)["input_ids"] for n in NAMES}
    names = [n for n in NAMES if len(ids[n]) == 1]
    rng = random.Random(seed)
    out = []
    for template in TEMPLATES:
        rows: dict[str, list] = {"clean": [], "corrupted": [], "reference": [], "io": [], "s": []}
        for i in range(n_per_template):
            io, s, c = rng.sample(names, 3)
            a, b = (io, s) if i % 2 == 0 else (s, io)
            for key, third in (("clean", s), ("corrupted", io)):
                rows[key].append(template.format(A=" " + a, B=" " + b, C=" " + third))
            d1, d2 = rng.sample([n for n in names if n not in (io, s, c)], 2)
            rows["reference"].append(template.format(A=" " + d1, B=" " + d2, C=" " + c))
            rows["io"].append(ids[io][0])
            rows["s"].append(ids[s][0])
        enc = {k: tokenizer(rows[k], return_tensors="pt", add_special_tokens=False)["input_ids"]
               for k in ("clean", "corrupted", "reference")}
        out.append(IOIPrompts(template, enc["clean"], enc["corrupted"], enc["reference"],
                              torch.tensor(rows["io"]), torch.tensor(rows["s"])))
    return out


RECIPE = {
    "version": 1, "ioi_per_template": 16, "ioi_seed": 0, "select_fraction": 0.5, "circuit_sizes": [5, 10, 26, 50, 100],
    "random_circuits": 20, "lens_train_sentences": 160, "lens_eval_sentences": 20, "lens_eval_austen": 10,
    "lens_rank": 16, "lens_steps": 60, "lens_batch_tokens": 64, "lens_top_k": 32, "max_words": 30,
}
"""What :func:`chapter_results` computes; its content hash names the committed artefact."""


def lens_corpus(tokenizer, recipe: dict = RECIPE) -> dict[str, tuple[Tensor, Tensor]]:
    """The tuned lens's training slice and two held-out slices: ``{name: (input_ids, attention_mask)}``.

    Training: Wikipedia sentences from the first half of the subset; held out: sentences from its second half
    (other articles) and Austen passages (another domain).
    """
    from helpers.assets import austen_novels, wikipedia_sentences

    wiki = wikipedia_sentences(max_words=recipe["max_words"])
    half = len(wiki) // 2
    train = wiki[: half : half // recipe["lens_train_sentences"]][: recipe["lens_train_sentences"]]
    held = wiki[half :: half // recipe["lens_eval_sentences"]][: recipe["lens_eval_sentences"]]
    text = " ".join(austen_novels()["Persuasion"].split())
    words = text.split(" ")
    step = len(words) // recipe["lens_eval_austen"]
    austen = [" ".join(words[i * step : i * step + recipe["max_words"]]) for i in range(recipe["lens_eval_austen"])]
    out = {}
    for name, texts in (("train", train), ("wikipedia", held), ("austen", austen)):
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out[name] = (enc["input_ids"], enc["attention_mask"])
    return out


def _chunks(n: int, size: int):
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def _report_circuit(model: nn.Module, groups: Sequence[IOIPrompts], report) -> Callable[[Sequence], Tensor]:
    """``circuit -> [report prompt]`` IO − S logit difference with every other head mean-ablated (means over each
    template's reference prompts, per position), on the prompts ``report`` (global indices, template order)."""
    n_layers = model.config.num_hidden_layers
    mean_z, rows, start = [], [], 0
    for p in groups:
        _, cache = hooks.run_with_cache(model, p.reference, sites="blocks.*.attn.hook_z")
        mean_z.append(torch.stack([cache[f"blocks.{l}.attn.hook_z"].mean(0) for l in range(n_layers)]))
        rows.append(torch.tensor([i - start for i in report if start <= i < start + len(p.io)], dtype=torch.long))
        start += len(p.io)

    def circuit_ld(circuit) -> Tensor:
        return torch.cat([circuit_logit_diff(model, p.clean[r], circuit=circuit, mean_z=z,
                                             metric=logit_diff_metric(p.io[r], p.s[r]))
                          for p, r, z in zip(groups, rows, mean_z, strict=True)])

    return circuit_ld


def chapter_results(model: nn.Module, tokenizer, *, recipe: dict = RECIPE, progress: bool = True) -> dict:
    """Everything Chapter 6b is too slow to compute live (about 20 min on 2 shared cores), as plain tensors.

    The tuned lens (trained on the training slice) and both lenses' per-token KL and rank on the held-out
    slices; on the IOI task: full patching sweeps (residual stream per layer and position on the first
    template, every head and every MLP on the selection prompts), attribution patching on the same sites with
    timings, the heads ranked on the selection prompts, and the faithfulness of top-k and random circuits
    measured on the report prompts.
    """
    import time

    import numpy as np

    from helpers import stats

    out: dict = {"recipe": recipe}
    corpus = lens_corpus(tokenizer, recipe)
    ids, mask = corpus["train"]
    t0 = time.perf_counter()
    lens, losses = train_tuned_lens(model, ids, attention_mask=mask, rank=recipe["lens_rank"],
                                    steps=recipe["lens_steps"], batch_tokens=recipe["lens_batch_tokens"],
                                    top_k=recipe["lens_top_k"])
    out["lens_state"], out["lens_losses"] = lens.state_dict(), torch.tensor(losses)
    out["lens_train_s"], out["lens_train_tokens"] = time.perf_counter() - t0, int(mask[:, 1:].sum())
    with torch.no_grad():
        for name in ("wikipedia", "austen"):
            ids, mask = corpus[name]
            for which, l in (("logit", None), ("tuned", lens)):
                parts = [lens_stats(model, ids[c], attention_mask=mask[c], lens=l) for c in _chunks(len(ids), 8)]
                for key in ("kl", "rank"):
                    out[f"{which}_{name}_{key}"] = torch.cat([p[key] for p in parts], 1)   # [layer, token]

    groups = ioi_prompts(tokenizer, n_per_template=recipe["ioi_per_template"], seed=recipe["ioi_seed"])
    labels = np.concatenate([[g] * len(p.io) for g, p in enumerate(groups)])
    select, report = stats.split_indices(len(labels), fraction=recipe["select_fraction"], seed=0, labels=labels)
    out["select"], out["report"] = torch.tensor(select), torch.tensor(report)
    offsets = np.cumsum([0] + [len(p.io) for p in groups])

    def rows(g: int, idx) -> Tensor:
        return torch.tensor([i - offsets[g] for i in idx if offsets[g] <= i < offsets[g + 1]], dtype=torch.long)

    heads, head_shape = site_grid(model, "heads")
    mlps, _ = site_grid(model, "mlp")
    sweeps: dict[str, list] = {k: [] for k in ("heads", "mlp", "heads_attr", "clean", "corrupted")}
    exact_s = attr_s = 0.0
    for g, p in enumerate(groups):
        r = rows(g, select)
        metric = logit_diff_metric(p.io[r], p.s[r])
        with torch.no_grad():
            sweeps["clean"].append(metric(model(p.clean[r]).logits))
            sweeps["corrupted"].append(metric(model(p.corrupted[r]).logits))
        t0 = time.perf_counter()
        sweeps["heads"].append(patching_sweep(model, p.clean[r], p.corrupted[r], sites=heads, metric=metric,
                                              progress=progress))
        exact_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        sweeps["heads_attr"].append(attribution_patching(model, p.clean[r], p.corrupted[r], sites=heads, metric=metric))
        attr_s += time.perf_counter() - t0
        sweeps["mlp"].append(patching_sweep(model, p.clean[r], p.corrupted[r], sites=mlps, metric=metric))
    for k, v in sweeps.items():
        out[f"ioi_select_{k}"] = torch.cat(v, -1)             # [site, prompt] or [prompt], selection prompts
    out["heads_exact_s"], out["heads_attr_s"] = exact_s, attr_s
    out["head_shape"] = torch.tensor(head_shape)

    p, r = groups[0], rows(0, select)  # residual stream per (layer, position): first template, selection prompts
    metric = logit_diff_metric(p.io[r], p.s[r])
    resid, resid_shape = site_grid(model, "resid", n_pos=p.clean.shape[1])
    t0 = time.perf_counter()
    out["resid"] = patching_sweep(model, p.clean[r], p.corrupted[r], sites=resid, metric=metric, progress=progress)
    out["resid_exact_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out["resid_attr"] = attribution_patching(model, p.clean[r], p.corrupted[r], sites=resid, metric=metric)
    out["resid_attr_s"] = time.perf_counter() - t0
    out["resid_rows"], out["resid_shape"] = r, torch.tensor(resid_shape)

    # rank heads on the selection prompts by |normalised effect| of the mean logit difference
    clean_m, corr_m = out["ioi_select_clean"].mean(), out["ioi_select_corrupted"].mean()
    effect = normalised(out["ioi_select_heads"].mean(-1), clean=clean_m, corrupted=corr_m)     # [site]
    order = effect.abs().argsort(descending=True)
    out["head_order"] = order
    n_heads = head_shape[1]
    circuit_ld = _report_circuit(model, groups, report)

    every = [(l, h) for l in range(head_shape[0]) for h in range(n_heads)]
    out["report_full"] = circuit_ld(every)
    out["report_empty"] = circuit_ld([])
    gen = torch.Generator().manual_seed(0)
    for k in recipe["circuit_sizes"]:
        top = [divmod(int(i), n_heads) for i in order[:k]]
        out[f"report_top{k}"] = circuit_ld(top)
        rand = []
        for _ in range(recipe["random_circuits"] if k == 26 else 5):
            pick = torch.randperm(len(every), generator=gen)[:k]
            rand.append(circuit_ld([every[int(i)] for i in pick]))
        out[f"report_random{k}"] = torch.stack(rand)                                             # [draw, prompt]
    return out


PATH_RECIPE = {"version": 1, "ioi_per_template": 16, "ioi_seed": 0, "select_fraction": 0.5, "threshold": 0.05,
               "random_circuits": 20}
"""What :func:`path_results` computes; ``threshold``: a head joins a class when its path-patching effect on the
selection prompts is at least this share of the logit difference (fixed before the effects were looked at)."""


def pick_heads(effect: Tensor, *, threshold: float, sign: int) -> list[tuple[int, int]]:
    """Heads whose relative effect is beyond ``threshold`` in the direction ``sign`` (-1: lowers the metric).

    Args:
        effect: ``[layer, head]`` mean relative change of the metric when the head's path is patched.

    Returns:
        ``(layer, head)`` pairs, strongest first.
    """
    if sign not in (-1, 1) or not threshold > 0:
        raise ValueError(f"sign must be -1 or 1 and threshold > 0, got sign={sign}, threshold={threshold}")
    flat = effect.flatten() * sign
    order = flat.argsort(descending=True)
    return [divmod(int(i), effect.shape[1]) for i in order if flat[i] >= threshold]


def path_results(model: nn.Module, tokenizer, *, recipe: dict = PATH_RECIPE, progress: bool = True) -> dict:
    """Wang et al.'s path-patching search on the chapter's IOI prompts (about 25 min on 2 cores), as tensors.

    The "new" run of every path is the reference prompt of the same row (same template, three unrelated
    names: Wang et al.'s ABC distribution). Three steps, each on every prompt of both halves, with the
    classes chosen on the selection half by :func:`pick_heads`: (1) every head → logits: name movers lower
    the IO − S logit difference, negative name movers raise it; (2) every head → the name movers' queries:
    S-inhibition heads; (3) every head → the S-inhibition heads' values (on :func:`expand_kv_heads`):
    induction and duplicate-token heads. Then the circuit (the union) with every other head mean-ablated
    on the report prompts, and as many random sets of the same size.

    Returns:
        ``{"base": [prompt], "direct"/"to_nm_q"/"to_sinh_v": [layer, head, prompt] metric of the patched
        run, "name_movers"/"negative"/"s_inhibition"/"induction_duplicate": [k, 2] heads, "report_circuit":
        [report prompt], "report_random": [draw, report prompt], ...}``; prompts in template order.
    """
    import time

    import numpy as np

    from helpers import stats

    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    groups = ioi_prompts(tokenizer, n_per_template=recipe["ioi_per_template"], seed=recipe["ioi_seed"])
    labels = np.concatenate([[g] * len(p.io) for g, p in enumerate(groups)])
    select, report = stats.split_indices(len(labels), fraction=recipe["select_fraction"], seed=0, labels=labels)
    every = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    out: dict = {"recipe": recipe, "select": torch.tensor(select), "report": torch.tensor(report)}
    with torch.no_grad():
        out["base"] = torch.cat([logit_diff_metric(p.io, p.s)(model(p.clean).logits) for p in groups])
    sel = torch.tensor(select)

    def sweep(name: str, net: nn.Module, receivers, receiver_input: str = "q") -> Tensor:
        if receivers is not None and not receivers:  # an empty class upstream: no path to patch
            out[name], out[f"{name}_s"] = out["base"].expand(n_layers, n_heads, -1).clone(), 0.0
            return torch.zeros(n_layers, n_heads)
        t0 = time.perf_counter()
        runs = [path_patching(net, p.clean, p.reference, senders=every, metric=logit_diff_metric(p.io, p.s),
                              receivers=receivers, receiver_input=receiver_input, progress=progress) for p in groups]
        out[f"{name}_s"] = time.perf_counter() - t0
        out[name] = torch.cat(runs, 1).view(n_layers, n_heads, -1)                           # [layer, head, prompt]
        base = out["base"]
        return (out[name][..., sel] - base[sel]).mean(-1) / base[sel].mean()                  # [layer, head]

    thr = recipe["threshold"]

    def heads(effect: Tensor, sign: int) -> Tensor:
        return torch.tensor(pick_heads(effect, threshold=thr, sign=sign), dtype=torch.long).view(-1, 2)

    effect = sweep("direct", model, None)
    out["name_movers"], out["negative"] = heads(effect, -1), heads(effect, 1)
    effect = sweep("to_nm_q", model, out["name_movers"].tolist(), "q")
    out["s_inhibition"] = heads(effect, -1)
    effect = sweep("to_sinh_v", expand_kv_heads(model), out["s_inhibition"].tolist(), "v")
    out["induction_duplicate"] = heads(effect, -1)

    circuit = sorted({tuple(h) for k in ("name_movers", "negative", "s_inhibition", "induction_duplicate")
                      for h in out[k].tolist()})
    out["circuit"] = torch.tensor(circuit, dtype=torch.long).view(-1, 2)
    circuit_ld = _report_circuit(model, groups, report)
    out["report_circuit"] = circuit_ld(circuit)
    gen = torch.Generator().manual_seed(1)
    out["report_random"] = torch.stack([circuit_ld([every[int(i)] for i in torch.randperm(len(every), generator=gen)
                                                    [: len(circuit)]]) for _ in range(recipe["random_circuits"])])
    return out


def _result_path(prefix: str, key: dict):
    """Where a committed result of this chapter lives: ``results/ch6b/<prefix>-<content hash of key>.pt``."""
    from helpers import common

    return common.cache_dir("results", "ch6b") / f"{prefix}-{common.content_hash(key)}.pt"


def _load_committed(path, compute: Callable[[nn.Module, object], dict], model: nn.Module | None, tokenizer) -> dict:
    """``compute(model, tokenizer)``'s dict from the committed copy at ``path`` (verified by SHA-256), rebuilt
    when missing or altered (loading SmolLM2 with eager attention when no model is given)."""
    from helpers import common

    def build(target) -> None:
        nonlocal model, tokenizer
        if model is None:
            from helpers.assets import smollm2

            model, tokenizer = smollm2(attn_implementation="eager")
        with common.torch_threads(common.free_cores()):
            torch.save(compute(model.eval(), tokenizer), target)

    return torch.load(common.cached_file(path, build, committed=True), weights_only=True)


def path_results_path():
    """Where :func:`load_path_results` keeps the artefact (named by the recipe's content hash)."""
    return _result_path("paths", PATH_RECIPE)


def load_path_results(model: nn.Module | None = None, tokenizer=None) -> dict:
    """The committed results of :func:`path_results` (verified by SHA-256), rebuilt when missing or altered."""
    return _load_committed(path_results_path(), path_results, model, tokenizer)


_FACT_TEMPLATES = {  # relation template: (subject, answer) pairs; the answer's first token is scored
    'The capital city of {} is': (
        ('France', 'Paris'), ('Germany', 'Berlin'), ('Italy', 'Rome'), ('Spain', 'Madrid'), ('Japan', 'Tokyo'),
        ('Russia', 'Moscow'), ('Egypt', 'Cairo'), ('Greece', 'Athens'), ('Portugal', 'Lisbon'),
        ('Ireland', 'Dublin'), ('Austria', 'Vienna'), ('Norway', 'Oslo'), ('Sweden', 'Stockholm'),
        ('Poland', 'Warsaw'), ('Hungary', 'Budapest'), ('Kenya', 'Nairobi'), ('Thailand', 'Bangkok'),
        ('Peru', 'Lima'), ('Cuba', 'Havana'), ('Iran', 'Tehran'), ('Iraq', 'Baghdad'), ('Argentina', 'Buenos'),
        ('Canada', 'Ottawa'), ('Australia', 'Canberra'), ('China', 'Beijing'), ('England', 'London'),
        ('Denmark', 'Copenhagen'), ('Finland', 'Helsinki'), ('Belgium', 'Brussels'), ('South Korea', 'Seoul'),
        ('Turkey', 'Ankara'), ('Mexico', 'Mexico'), ('Chile', 'Santiago'), ('Syria', 'Damascus'),
    ),
    'The official language of {} is': (
        ('Brazil', 'Portuguese'), ('France', 'French'), ('Germany', 'German'), ('Italy', 'Italian'),
        ('Japan', 'Japanese'), ('Russia', 'Russian'), ('Greece', 'Greek'), ('Poland', 'Polish'),
        ('Turkey', 'Turkish'), ('Sweden', 'Swedish'), ('China', 'Chinese'), ('Spain', 'Spanish'),
        ('Mexico', 'Spanish'), ('Egypt', 'Arabic'), ('Israel', 'Hebrew'), ('Iran', 'Persian'),
        ('the Netherlands', 'Dutch'), ('Finland', 'Finnish'), ('Hungary', 'Hungarian'),
    ),
    '{} is located in the city of': (
        ('The Eiffel Tower', 'Paris'), ('The Colosseum', 'Rome'), ('Big Ben', 'London'),
        ('The Brandenburg Gate', 'Berlin'), ('The Statue of Liberty', 'New'), ('The Golden Gate Bridge', 'San'),
        ('The Kremlin', 'Moscow'), ('The Sydney Opera House', 'Sydney'), ('The Acropolis', 'Athens'),
        ('The Louvre', 'Paris'), ('The Vatican', 'Rome'), ('Times Square', 'New'), ('The Space Needle', 'Seattle'),
        ('Buckingham Palace', 'London'),
    ),
    '{} is headquartered in the country of': (
        ('Toyota', 'Japan'), ('Volkswagen', 'Germany'), ('Samsung', 'South'), ('Nokia', 'Finland'),
        ('IKEA', 'Sweden'), ('Sony', 'Japan'), ('BMW', 'Germany'), ('Nestlé', 'Switzerland'), ('Fiat', 'Italy'),
        ('Honda', 'Japan'), ('Siemens', 'Germany'), ('Renault', 'France'), ('Volvo', 'Sweden'),
        ('Nintendo', 'Japan'),
    ),
    '{} was born in the country of': (
        ('Albert Einstein', 'Germany'), ('Mozart', 'Austria'), ('Napoleon', 'France'), ('Picasso', 'Spain'),
        ('Leonardo da Vinci', 'Italy'), ('Frida Kahlo', 'Mexico'), ('Tolstoy', 'Russia'), ('Gandhi', 'India'),
        ('Shakespeare', 'England'), ('Beethoven', 'Germany'), ('Chopin', 'Poland'), ('Confucius', 'China'),
    ),
    '{} plays the sport of': (
        ('Lionel Messi', 'football'), ('Roger Federer', 'tennis'), ('Michael Jordan', 'basketball'),
        ('Tiger Woods', 'golf'), ('Serena Williams', 'tennis'), ('LeBron James', 'basketball'),
        ('Cristiano Ronaldo', 'football'), ('Rafael Nadal', 'tennis'),
    ),
}
FACTS = tuple((t.replace("{}", "{" + s + "}"), " " + a) for t, pairs in _FACT_TEMPLATES.items() for s, a in pairs)
"""Factual prompts for causal tracing, written for this book (Meng et al.'s CounterFact/known-facts sets are not
available offline): six relations; :func:`trace_results` keeps those SmolLM2 completes correctly."""

TRACE_RECIPE = {"version": 1, "n_noise": 5, "noise_scale": 3.0, "window": 10, "seed": 0, "select_fraction": 0.5}
"""What :func:`trace_results` computes (Meng et al. 2022 use 10 noise samples; 5 here, for CPU time)."""


def fact_prompt(tokenizer, prompt: str) -> tuple[Tensor, list[int]]:
    """``(input_ids [1, pos], subject positions)`` of a :data:`FACTS` prompt ("... {subject} ...")."""
    pre, rest = prompt.split("{")
    subject, post = rest.split("}")
    text = pre + subject + post
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    upto = tokenizer(pre + subject, add_special_tokens=False).input_ids
    start = len(tokenizer(pre.rstrip(), add_special_tokens=False).input_ids) if pre.strip() else 0
    if ids[0, : len(upto)].tolist() != upto or start >= len(upto):
        raise ValueError(f"the subject of {prompt!r} does not tokenize on its own")
    return ids, list(range(start, len(upto)))


def trace_results(model: nn.Module, tokenizer, *, recipe: dict = TRACE_RECIPE, progress: bool = True) -> dict:
    """Causal tracing of every :data:`FACTS` prompt the model knows (its top-1 next token is the answer).

    Noise: ``noise_scale`` times the standard deviation of the known subjects' token embeddings (Meng et al.
    use 3), ``n_noise`` Gaussian samples per prompt; restored positions: the subject's last token and the
    prompt's last token.

    Returns:
        ``relation`` / ``fact`` ``[prompt]`` (indices into the relations and :data:`FACTS`); ``clean``,
        ``corrupted`` ``[prompt]``; ``restored`` ``[prompt, kind, position, layer]``, the mean P(answer) over
        the noise samples (kinds: the recipe's, by default resid, mlp, attn; positions: the subject's last
        token and the last token, only the first with the recipe's subject_only); ``sigma``; the
        ``select`` / ``report`` splits; ``seconds``.
    """
    import time

    from helpers import stats

    known, ids_all, subjects, answers = [], [], [], []
    def relation(prompt: str) -> str:  # the template's text around the subject
        return prompt.split("}", 1)[1] if prompt.startswith("{") else prompt.split("{", 1)[0]

    relations = sorted({relation(p) for p, _ in FACTS})
    for i, (prompt, answer) in enumerate(FACTS):
        ids, subject = fact_prompt(tokenizer, prompt)
        target = tokenizer(answer, add_special_tokens=False).input_ids[0]
        with torch.no_grad():
            if int(model(ids).logits[0, -1].argmax()) == target:
                known.append(i)
                ids_all.append(ids)
                subjects.append(subject)
                answers.append(target)
    emb = model.get_input_embeddings().weight
    sigma = float(torch.cat([emb[ids[0, s]] for ids, s in zip(ids_all, subjects, strict=True)]).detach().std())
    gen = torch.Generator().manual_seed(recipe["seed"])
    rel = [relations.index(relation(FACTS[i][0])) for i in known]
    out: dict = {"fact": torch.tensor(known), "relation": torch.tensor(rel), "sigma": sigma, "clean": [],
                 "corrupted": [], "restored": []}
    t0 = time.perf_counter()
    iterator = range(len(known))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="causal tracing", leave=False)
    for j in iterator:
        ids, subject = ids_all[j], subjects[j]
        shape = (recipe["n_noise"], len(subject), emb.shape[1])
        noise = recipe["noise_scale"] * sigma * torch.randn(*shape, generator=gen)
        kinds = recipe.get("kinds", ("resid", "mlp", "attn"))
        positions = [subject[-1], ids.shape[1] - 1][: 1 if recipe.get("subject_only") else 2]
        r = causal_trace(model, ids, subject=subject, target=answers[j], noise=noise, positions=positions,
                         kinds=kinds, window=recipe["window"])
        out["clean"].append(r["clean"])
        out["corrupted"].append(float(r["corrupted"].mean()))
        out["restored"].append(torch.stack([r[k].mean(-1) for k in kinds]))
    out["seconds"] = time.perf_counter() - t0
    out["clean"], out["corrupted"] = torch.tensor(out["clean"]), torch.tensor(out["corrupted"])
    out["restored"] = torch.stack(out["restored"])
    select, report = stats.split_indices(len(known), fraction=recipe["select_fraction"], seed=0, labels=rel)
    out["select"], out["report"] = torch.tensor(select), torch.tensor(report)
    return out


TRACE_FIRST_MLP_RECIPE = {**TRACE_RECIPE, "window": 1, "kinds": ["mlp"], "subject_only": True}
"""One block's MLP at a time, at the subject's last token only: tells the first MLP's share from the others'."""


def trace_results_path(recipe: dict = TRACE_RECIPE):
    """Where :func:`load_trace_results` keeps the artefact (named by the recipe's and the facts' content hash)."""
    return _result_path("trace", {**recipe, "facts": FACTS})


def load_trace_results(model: nn.Module | None = None, tokenizer=None, *, recipe: dict = TRACE_RECIPE) -> dict:
    """The committed results of :func:`trace_results` (verified by SHA-256), rebuilt when missing or altered."""
    return _load_committed(trace_results_path(recipe), lambda m, t: trace_results(m, t, recipe=recipe), model,
                           tokenizer)


def results_path():
    """Where :func:`load_results` keeps the artefact (named by the recipe's content hash)."""
    return _result_path("causal", RECIPE)


def load_results(model: nn.Module | None = None, tokenizer=None) -> dict:
    """The committed results of :func:`chapter_results` (verified by SHA-256), rebuilt when missing or altered."""
    return _load_committed(results_path(), chapter_results, model, tokenizer)
