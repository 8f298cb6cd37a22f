"""Sparse dictionaries inside a transformer: sparse autoencoders (TopK and L1/ReLU) and transcoders.

A sparse autoencoder (SAE) rewrites an activation ``x`` (``[token, d_in]``) as a sparse, non-negative
code ``z`` (``[token, d_sae]``, ``d_sae`` several times ``d_in``) and a decoder whose rows are unit-norm
directions, ``x ≈ b_pre + z W_dec``. Two recipes:

- **ReLU + L1** (Bricken et al. 2023, "Towards monosemanticity"): ``z = ReLU((x - b_pre) W_enc + b_enc)``,
  loss ``‖x - x̂‖² + λ‖z‖₁`` with unit-norm decoder rows;
- **TopK** (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"): keep the ``k`` largest
  pre-activations, ``z = ReLU(TopK(...))``, loss ``‖x - x̂‖²`` only; sparsity is set, not penalised.

A **transcoder** (Dunefsky, Chlenski & Nanda 2024) has the same form but reads an MLP's input and
writes the MLP's output, so its latents replace the MLP's neurons.

Quality measures: L0 (active latents per token), fraction of variance unexplained (:func:`fvu`), dead
latents (:func:`dead_latents`), and next-token loss recovered when the dictionary is spliced into the
model (:func:`loss_recovered`, :func:`next_token_loss`). :func:`build_artefacts` is the recipe that
harvests activations, trains the sweep of dictionaries and writes the committed artefacts.

Cross-checked against SAELens 6.54.12 (tests/test_dictionaries_saelens.py): in its ``TopKSAE``, ``StandardSAE``
and ``Transcoder`` the committed and small ReLU dictionaries give the same codes and reconstructions (relative
5e-7), the training loss is its ``training_forward_pass`` loss / ``d_in`` step by step, L1 warm-up included (2e-7),
and :func:`fvu` is 1 - its explained variance (7e-8). SAELens differs in weighting L1 by decoder-row norms (1 here),
scaling inputs to mean norm ``√d_in`` (here root-mean-square) and adding an AuxK loss on dead TopK latents.

Introduced in nbs/06c_sparse_dictionaries.ipynb.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from helpers import common, hooks, stats

KINDS = ("topk", "relu")


# ---------------------------------------------------------------------------------------------
# The dictionaries
# ---------------------------------------------------------------------------------------------


def topk_activation(pre: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest entries of each row of ``pre`` (``[..., d_sae]``) through a ReLU; zero the rest.

    The activation of a TopK SAE (Gao et al. 2024, §2.3): at most ``k`` non-zeros per row, exactly
    ``k`` when the ``k`` largest pre-activations are positive.

    >>> topk_activation(torch.tensor([[3.0, -1.0, 2.0, 0.5]]), 2)
    tensor([[3., 0., 2., 0.]])
    """
    if not isinstance(k, int) or not 1 <= k <= pre.shape[-1]:
        raise ValueError(f"k must be an int in 1..{pre.shape[-1]}, got {k!r}")
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder (or, with ``d_out``, a transcoder) with unit-norm decoder rows.

    Args:
        d_in: width of the activations it reads.
        d_sae: number of latents (dictionary size).
        kind: ``"topk"`` (Gao et al. 2024) or ``"relu"`` (L1-penalised ReLU, Bricken et al. 2023).
        k: active latents per token for ``"topk"`` (ignored for ``"relu"``).
        d_out: width of what it writes; ``None`` = ``d_in`` (an autoencoder).

    ``encode(x) -> z [token, d_sae]``, ``decode(z) -> x̂ [token, d_out]``, ``forward(x) -> (x̂, z)``.
    Inputs are multiplied by the fixed buffer ``scale`` before encoding and outputs divided by it, so
    that one λ means the same on models with different activation norms (``train_sae`` sets it).

    >>> sae = SparseAutoencoder(8, 32, kind="topk", k=4)
    >>> x_hat, z = sae(torch.randn(5, 8))
    >>> tuple(x_hat.shape), int((z != 0).sum(-1).max()) <= 4
    ((5, 8), True)
    """

    def __init__(self, d_in: int, d_sae: int, *, kind: str = "topk", k: int = 32, d_out: int | None = None):
        super().__init__()
        d_out = d_in if d_out is None else d_out
        for name, value in (("d_in", d_in), ("d_sae", d_sae), ("d_out", d_out)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "topk" and (not isinstance(k, int) or not 1 <= k <= d_sae):
            raise ValueError(f"k must be an int in 1..d_sae={d_sae}, got {k!r}")
        self.d_in, self.d_sae, self.d_out, self.kind, self.k = d_in, d_sae, d_out, kind, k
        self.b_pre = nn.Parameter(torch.zeros(d_in))        # pre-encoder bias (the decoder bias for an SAE)
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))        # used by a transcoder; 0 and frozen for an SAE
        self.register_buffer("scale", torch.ones(()))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit-norm decoder rows; the encoder starts as the decoder's transpose (Gao et al. §A.1)."""
        self.W_dec.normal_()
        self.normalise_decoder()
        if self.d_out == self.d_in:
            self.W_enc.copy_(self.W_dec.T)
        else:
            self.W_enc.normal_().mul_(1 / math.sqrt(self.d_in))
        self.b_enc.zero_()

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale every decoder row (one latent's direction) to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def _check(self, x: Tensor, width: int, what: str) -> None:
        if not isinstance(x, Tensor):
            raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != width:
            raise ValueError(f"{what} must be [..., {width}], got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{what} is empty: pass at least one token")
        if not torch.isfinite(x).all():
            raise ValueError(f"{what} contains NaN or inf; check the activations you harvested")

    def pre_activations(self, x: Tensor) -> Tensor:
        """``(scale·x - b_pre) W_enc + b_enc``: ``[..., d_sae]``."""
        return (x.to(self.W_enc.dtype) * self.scale - self.b_pre) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Sparse code ``z`` ``[..., d_sae]`` (non-negative) of activations ``x`` ``[..., d_in]``."""
        self._check(x, self.d_in, "x")
        pre = self.pre_activations(x)
        return torch.relu(pre) if self.kind == "relu" else topk_activation(pre, self.k)

    def decode(self, z: Tensor) -> Tensor:
        """Reconstruction ``(z W_dec + b_dec + b_pre·[SAE]) / scale``: ``[..., d_out]``."""
        self._check(z, self.d_sae, "z")
        out = z @ self.W_dec + self.b_dec
        if self.d_out == self.d_in:
            out = out + self.b_pre
        return out / self.scale

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)
        return self.decode(z), z


class Transcoder(SparseAutoencoder):
    """A sparse dictionary from an MLP's (normalised) input to the MLP's output (Dunefsky et al. 2024).

    ``forward(mlp_in) -> (mlp_out_hat, z)``; the decoder rows are the latents' *values* in the sense of
    Chapter 5's key-value memories, the encoder columns their *keys*.

    >>> tc = Transcoder(8, 16, 8, k=2)
    >>> tuple(tc(torch.randn(3, 8))[0].shape)
    (3, 8)
    """

    def __init__(self, d_in: int, d_sae: int, d_out: int, *, kind: str = "topk", k: int = 32):
        super().__init__(d_in, d_sae, kind=kind, k=k, d_out=d_out)

    def decode(self, z: Tensor) -> Tensor:
        self._check(z, self.d_sae, "z")
        return (z @ self.W_dec + self.b_dec) / self.scale


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _check_activations(x: Tensor, name: str = "activations") -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2:
        raise ValueError(f"{name} must be a [token, d] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: harvest some tokens first")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def train_sae(activations: Tensor, *, d_sae: int, kind: str = "topk", k: int = 32, l1: float = 1e-3,
              targets: Tensor | None = None, epochs: int = 3, batch_size: int = 1024, lr: float = 1e-3,
              seed: int = 0, progress: bool = False) -> tuple[SparseAutoencoder, dict]:
    """Train a TopK or L1 SAE (or, with ``targets``, a transcoder) with Adam.

    The inputs are rescaled by one scalar so their mean squared norm is ``d_in`` (targets by their
    own scalar folded into the decoder); ``b_pre`` starts at the data mean; decoder rows are renormalised
    to unit norm after every step. Loss per token: ``mean_d (x - x̂)²`` plus, for ``"relu"``,
    ``l1 · Σ_i z_i / d_in`` with the L1 weight warmed up linearly over the first 5 % of steps.

    Args:
        activations: ``[token, d_in]`` training activations.
        d_sae: number of latents; kind, k: as in :class:`SparseAutoencoder`; l1: λ for ``"relu"``.
        targets: ``[token, d_out]`` for a transcoder (the MLP's output); ``None`` for an SAE.
        epochs, batch_size, lr, seed: optimisation.

    Returns:
        ``(model, history)`` with ``history = {"loss": [...], "steps": n}``; the model is in eval mode.
    """
    x = _check_activations(activations).float()
    y = None if targets is None else _check_activations(targets, "targets").float()
    if y is not None and y.shape[0] != x.shape[0]:
        raise ValueError(f"targets must have one row per activation, got {y.shape[0]} and {x.shape[0]}")
    if kind == "relu" and not l1 > 0:
        raise ValueError(f"l1 must be > 0 for a ReLU SAE, got {l1}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d_in = x.shape[1]
    model = (SparseAutoencoder(d_in, d_sae, kind=kind, k=k) if y is None
             else Transcoder(d_in, d_sae, y.shape[1], kind=kind, k=k))
    with torch.no_grad():
        model.scale.fill_(math.sqrt(d_in / x.pow(2).sum(1).mean().item()))
        if y is None:
            model.b_pre.copy_(x.mean(0) * model.scale)
            model.b_dec.requires_grad_(False)
        else:
            model.b_dec.copy_(y.mean(0) * model.scale)
            model.b_pre.copy_(x.mean(0) * model.scale)
    target = x if y is None else y
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    n = x.shape[0]
    steps, total = 0, epochs * math.ceil(n / batch_size)
    losses = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x_hat, z = model(x[idx])
            err = ((x_hat - target[idx]) * model.scale).pow(2).mean(-1)            # [batch]
            loss = err.mean()
            if kind == "relu":
                loss = loss + l1 * min(1.0, steps / max(1, 0.05 * total)) * z.sum(-1).mean() / d_in
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            model.normalise_decoder()
            steps += 1
            losses.append(loss.item())
            if progress and steps % 50 == 0:
                print(f"step {steps}/{total} loss {float(loss):.4f}", flush=True)
    return model.eval().requires_grad_(False), {"loss": losses, "steps": steps}


# ---------------------------------------------------------------------------------------------
# Quality measures
# ---------------------------------------------------------------------------------------------


def fvu(x: Tensor, x_hat: Tensor, *, per_token: bool = False):
    """Fraction of variance unexplained: ``Σ‖x - x̂‖² / Σ‖x - mean(x)‖²`` over tokens (Gao et al. 2024, §2.1).

    Args:
        x, x_hat: ``[token, d]`` activations and their reconstructions.
        per_token: return ``[token]`` shares ``‖x_t - x̂_t‖² / mean_t ‖x - mean(x)‖²`` instead, whose
            mean is the FVU (the denominator held fixed), for intervals over tokens.

    >>> x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> float(fvu(x, torch.zeros_like(x))), float(fvu(x, x))
    (1.0, 0.0)
    """
    x, x_hat = _check_activations(x, "x").float(), _check_activations(x_hat, "x_hat").float()
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {tuple(x.shape)} and {tuple(x_hat.shape)}")
    if x.shape[0] < 2:
        raise ValueError("fvu needs at least 2 tokens (a variance)")
    err = (x - x_hat).pow(2).sum(-1)                               # [token]
    var = (x - x.mean(0)).pow(2).sum(-1).mean()
    return err / var if per_token else err.mean() / var


def dead_latents(z: Tensor | None = None, *, counts: Tensor | None = None) -> Tensor:
    """Latents never active: ``[d_sae]`` bool, from codes ``z`` ``[token, d_sae]`` or firing ``counts``."""
    if (z is None) == (counts is None):
        raise ValueError("give exactly one of z ([token, d_sae] codes) or counts ([d_sae] firing counts)")
    if counts is None:
        counts = (_check_activations(z, "z") > 0).sum(0)
    return counts == 0


def loss_recovered(clean: float | Tensor, ablated: float | Tensor, spliced: float | Tensor):
    """Share of the loss gap closed by a splice: ``(ablated - spliced) / (ablated - clean)``.

    1 means the spliced model is as good as the clean one, 0 as bad as zero-ablating the site.

    >>> loss_recovered(2.0, 6.0, 3.0)
    0.75
    """
    gap = ablated - clean
    if isinstance(gap, Tensor) and (gap <= 0).any() or not isinstance(gap, Tensor) and gap <= 0:
        raise ValueError("ablated loss must exceed the clean loss (else there is no gap to recover)")
    return (ablated - spliced) / gap


@torch.no_grad()
def next_token_loss(model: nn.Module, input_ids: Tensor, *, edits: Sequence[contextlib.AbstractContextManager] = (),
                    batch_size: int = 8, first: int = 1) -> Tensor:
    """Mean next-token cross-entropy per sequence ``[batch]``, with optional hooks.patch edits active.

    Args:
        model: a causal LM; input_ids: ``[batch, pos]`` unpadded windows.
        edits: what to change while the model runs: a function returning fresh context managers
            (:func:`splice`, :func:`splice_transcoder`), a list of context managers, or ``()`` for
            the clean model; entered around every batch.
        first: only predictions made at positions ``first`` and later are scored (the earlier ones sit
            on the attention sink, which the splices leave unedited).

    Returns:
        ``[batch]`` mean cross-entropy (nats) of predicting tokens ``first + 1 ..`` of each window.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < first + 2:
        raise ValueError(f"input_ids must be [batch, pos] with pos >= {first + 2}, got {tuple(input_ids.shape)}")
    out = []
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i:i + batch_size]
        with contextlib.ExitStack() as stack:
            for edit in edits() if callable(edits) else edits:
                stack.enter_context(edit)
            logits = model(input_ids=ids).logits[:, first:-1]
        ce = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, first + 1:], reduction="none")
        out.append(ce.mean(1))
    return torch.cat(out)


def splice(model: nn.Module, site: str, fn: Callable[[Tensor], Tensor], *, first: int = 1):
    """``() -> [hooks.patch]``: replace ``site`` at positions ``first..`` by ``fn(activation)``."""

    def edits():
        def at_positions(x):
            y = x.clone()
            y[:, first:] = fn(x[:, first:])
            return y
        return [hooks.patch(model, site, fn=at_positions)]
    return edits


def splice_transcoder(model: nn.Module, layer: int, tc: Transcoder, *, first: int = 1):
    """``() -> [capture, patch]``: the MLP of ``layer`` replaced by ``tc`` on its normalised input."""
    norm = model.model.layers[layer].post_attention_layernorm

    def edits():
        cap = hooks.capture(model, f"blocks.{layer}.hook_resid_mid")
        cache = {}

        def write(mlp_out):
            y = mlp_out.clone()
            y[:, first:] = tc(norm(cache["c"][f"blocks.{layer}.hook_resid_mid"][:, first:]))[0]
            return y

        class _Enter(contextlib.AbstractContextManager):
            def __enter__(self_inner):
                cache["c"] = cap.__enter__()
                return cache["c"]

            def __exit__(self_inner, *exc):
                return cap.__exit__(*exc)
        return [_Enter(), hooks.patch(model, f"blocks.{layer}.hook_mlp_out", fn=write)]
    return edits


# ---------------------------------------------------------------------------------------------
# Harvesting and word types
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def harvest(model: nn.Module, batches: Sequence[dict], *, site: str | Sequence[str], stop: bool = True) -> dict:
    """Activations at ``site`` for every non-padding token of ``batches``, stopping the forward pass there.

    Args:
        model: a BERT-style encoder or Llama-style decoder (the book's hook layer, ``helpers.hooks``).
        batches: tokenizer outputs (``input_ids``, ``attention_mask``), e.g. from :func:`batches_of`.
        site: one site name (or several: then a dict per site); e.g. ``"blocks.2.hook_resid_post"``.
        stop: end each forward pass after the deepest block needed (skips the rest of the model).

    Returns:
        ``{site: [token, d] float32}`` (one entry per site) plus ``"input_ids"`` ``[token]``,
        ``"seq"`` ``[token]`` (batch-global sequence index) and ``"pos"`` ``[token]``.
    """
    sites = [site] if isinstance(site, str) else list(site)
    if not batches:
        raise ValueError("batches is empty: tokenize some texts first")
    layers = [int(m[1]) for s in sites if (m := re.match(r"blocks\.(\d+)\.", s))]
    out = {s: [] for s in sites} | {"input_ids": [], "seq": [], "pos": []}
    offset = 0
    with hooks.capture(model, sites) as cache:
        for enc in batches:
            mask = enc["attention_mask"].bool()
            if stop and layers:
                hooks.run_until(model, max(layers), input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            else:
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            for s in sites:
                out[s].append(cache[s][mask].float())
            seq, pos = mask.nonzero(as_tuple=True)
            out["input_ids"].append(enc["input_ids"][mask])
            out["seq"].append(seq + offset)
            out["pos"].append(pos)
            offset += mask.shape[0]
    return {key: torch.cat(value) for key, value in out.items()}


def batches_of(tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 64) -> list[dict]:
    """Tokenised batches (padded per batch, truncated at ``max_length``)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    return [tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length) for i in range(0, len(texts), batch_size)]


def word_type_features(features: Tensor, word_index: Tensor, n_words: int, *,
                       transform: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Mean feature vector per word type: ``[n_words, F]`` from token features ``[token, F]``.

    Args:
        features: ``[token, F]`` per-token features (SAE codes, projections, ...).
        word_index: ``[token]`` word type of each token, ``-1`` for tokens that belong to no type.
        n_words: number of word types.
        transform: optional map applied to 8,192 tokens at a time before averaging (e.g. an SAE's
            ``encode``), so that the transformed features of every token are never held at once.

    Returns:
        ``[n_words, F]`` means (rows of types never seen are 0).

    >>> word_type_features(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, -1]), 2)
    tensor([[2.],
            [0.]])
    """
    if features.ndim != 2 or word_index.shape != features.shape[:1]:
        raise ValueError(f"features must be [token, F] and word_index [token], got {tuple(features.shape)} "
                         f"and {tuple(word_index.shape)}")
    if features.shape[0] == 0:
        raise ValueError("features is empty")
    keep = word_index >= 0
    if keep.any() and int(word_index.max()) >= n_words:
        raise ValueError(f"word_index holds {int(word_index.max())} but n_words is {n_words}")
    sums = None
    rows = keep.nonzero()[:, 0]
    for chunk in rows.split(8192):                       # float64 sums without a float64 copy of all features
        f = features[chunk] if transform is None else transform(features[chunk])
        if sums is None:
            sums = torch.zeros(n_words, f.shape[1], dtype=torch.float64)
        sums.index_add_(0, word_index[chunk], f.double())
    if sums is None:                                     # no token belongs to a word type
        width = features.shape[1] if transform is None else transform(features[:1]).shape[1]
        sums = torch.zeros(n_words, width, dtype=torch.float64)
    counts = torch.bincount(word_index[keep], minlength=n_words).clamp_min(1)
    return (sums / counts[:, None]).float()


def word_index_of_tokens(tokenizer, batches: Sequence[dict], vocab: dict[str, int]) -> Tensor:
    """``[token]`` word type (index into ``vocab``) of every non-padding token of ``batches``, or -1.

    A word split into several word pieces gives each of its pieces the word's type, so a word type's
    mean runs over all its pieces; special tokens and words outside ``vocab`` get -1.
    """
    pieces = [p.removeprefix("##") for p in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    out = []
    for enc in batches:
        for b in range(enc["input_ids"].shape[0]):
            ids = enc.word_ids(b)
            toks = enc["input_ids"][b].tolist()
            words: dict[int, str] = {}
            for t, w in zip(toks, ids, strict=True):
                if w is not None:
                    words[w] = words.get(w, "") + pieces[t]
            n = int(enc["attention_mask"][b].sum())
            out += [vocab.get(words[w], -1) if w is not None else -1 for w in ids[:n]]
    return torch.tensor(out, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Corpora and the recipe of the committed artefacts
# ---------------------------------------------------------------------------------------------

RECIPE = {
    "minilm": {"site": "blocks.2.hook_resid_post", "n_wiki": None, "n_austen": 10000, "max_length": 64,
               "d_sae": 1536, "ks": [16, 32, 64], "l1s": [1.0, 2.0, 4.0], "epochs": 1, "max_train": 500000},
    "smollm2": {"layer": 14, "n_wiki": 2600, "n_austen": 1400, "length": 128,
                "d_sae": 2304, "ks": [16, 32, 64], "l1s": [1.0, 2.0, 4.0], "epochs": 1, "max_train": 390000,
                "transcoder": {"d_sae": 1536, "k": 32}, "loss_windows": 24, "first": 4},
    "batch_size": 512, "lr": 2e-3,
    "split": {"test": 0, "validation": 1, "modulo": 10},
    "select_fvu": 0.3, "version": 2,
}
"""The recipe of the committed artefacts: corpora sizes (``n_wiki=None``: every Wikipedia sentence), sites,
dictionary widths, the sparsity sweep, training tokens, the split rule (unit ``i`` is test when ``i % 10 == 0``,
validation when ``i % 10 == 1``, training otherwise). The corpora hold about 1.3 M MiniLM tokens and 1.6 M
SmolLM2 tokens; the recipe trains on 500,000 and 390,000 of them."""

_SENT = re.compile(r"(?<=[.!?])\s+")


def _austen_pool(min_words: int = 6, max_words: int = 40) -> list[str]:
    """Every sentence of Austen's novels with ``min_words`` to ``max_words`` words, in order."""
    from helpers.assets import austen_novels

    sents = [s.replace("\n", " ").strip() for text in austen_novels().values() for s in _SENT.split(text)]
    return [s for s in sents if min_words <= len(s.split()) <= max_words]


def _spread(n_pool: int, n: int) -> np.ndarray:
    return np.linspace(0, n_pool - 1, n).astype(int)


def austen_sentences(n: int, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """``n`` sentences spread evenly over Austen's novels (deterministic)."""
    sents = _austen_pool(min_words, max_words)
    return [sents[i] for i in _spread(len(sents), n)]


def minilm_sentences() -> list[str]:
    """The MiniLM corpus of the recipe: Wikipedia sentences then Austen sentences, interleaved in order."""
    from helpers.assets import wikipedia_sentences

    r = RECIPE["minilm"]
    wiki = wikipedia_sentences()
    if r["n_wiki"] is not None:
        wiki = [wiki[i] for i in np.linspace(0, len(wiki) - 1, r["n_wiki"]).astype(int)]
    return wiki + austen_sentences(r["n_austen"])


def smollm2_windows(tokenizer) -> tuple[Tensor, list[str]]:
    """``[window, length]`` token windows of the SmolLM2 corpus, each opened by ``<|endoftext|>``, and sources."""
    from helpers.assets import austen_novels, wikipedia_articles

    r = RECIPE["smollm2"]
    out, source = [], []
    for name, texts, n in (("wikipedia", [t for _, t in wikipedia_articles()], r["n_wiki"]),
                           ("austen", list(austen_novels().values()), r["n_austen"])):
        ids = []
        for t in texts:
            ids += tokenizer(t, add_special_tokens=False).input_ids
        ids = torch.tensor(ids)
        starts = np.linspace(0, len(ids) - r["length"], n).astype(int)
        bos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        out += [torch.cat([torch.tensor([bos]), ids[s:s + r["length"] - 1]]) for s in starts]
        source += [name] * n
    return torch.stack(out), source


def split_of(n: int) -> np.ndarray:
    """``[n]`` split names of units ``0..n-1`` under the recipe's rule."""
    s = RECIPE["split"]
    r = np.arange(n) % s["modulo"]
    return np.where(r == s["test"], "test", np.where(r == s["validation"], "validation", "train"))


def _state(model: SparseAutoencoder) -> dict:
    return {"kind": model.kind, "k": model.k, "shape": [model.d_in, model.d_sae, model.d_out],
            "state": {k: v.half() if v.ndim == 2 else v.float() for k, v in model.state_dict().items()}}


def load_dictionary(blob: dict) -> SparseAutoencoder:
    """Rebuild an SAE or transcoder from its stored ``{"kind", "k", "shape", "state"}`` (fp16 matrices)."""
    d_in, d_sae, d_out = blob["shape"]
    cls = Transcoder(d_in, d_sae, d_out, kind=blob["kind"], k=blob["k"]) if blob.get("transcoder") else \
        SparseAutoencoder(d_in, d_sae, kind=blob["kind"], k=blob["k"])
    cls.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    return cls.eval().requires_grad_(False)


@torch.no_grad()
def _evaluate(model: SparseAutoencoder, x: Tensor, target: Tensor | None = None, chunk: int = 4096) -> dict:
    """L0, per-token FVU shares, firing counts of ``model`` on ``x`` (held out)."""
    target = x if target is None else target
    l0, err, counts = [], [], torch.zeros(model.d_sae, dtype=torch.long)
    for i in range(0, len(x), chunk):
        x_hat, z = model(x[i:i + chunk])
        l0.append((z > 0).sum(-1))
        err.append((target[i:i + chunk] - x_hat).pow(2).sum(-1))
        counts += (z > 0).sum(0)
    var = (target - target.mean(0)).pow(2).sum(-1).mean()
    return {"l0": torch.cat(l0).float(), "fvu_tok": torch.cat(err) / var, "counts": counts, "n": len(x)}


@torch.no_grad()
def top_contexts(model: SparseAutoencoder, x: Tensor, *, k: int = 8, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """The ``k`` tokens where each latent fires most: ``(values, token indices)``, both ``[d_sae, k]``."""
    best_v = torch.full((model.d_sae, k), -1.0)
    best_i = torch.zeros((model.d_sae, k), dtype=torch.long)
    for i in range(0, len(x), chunk):
        z = model.encode(x[i:i + chunk]).T                                          # [d_sae, chunk]
        v = torch.cat([best_v, z], 1)
        idx = torch.cat([best_i, torch.arange(i, i + z.shape[1]).expand(model.d_sae, -1)], 1)
        top = v.topk(k, dim=1)
        best_v, best_i = top.values, idx.gather(1, top.indices)
    return best_v, best_i


def _draw(x: Tensor, n: int) -> Tensor:
    """The recipe's fixed draw of ``n`` rows of ``x`` (a permutation seeded 0): training subsets. When ``x`` has
    fewer rows, whole further permutations (seeded 1, 2, ...) follow, cut at ``n``: every row once before any twice."""
    perms = [torch.randperm(len(x), generator=torch.Generator().manual_seed(i)) for i in range(max(1, -(-n // len(x))))]
    return x[torch.cat(perms)[:n]]


def _sweep(x_tr, x_va, x_te, r, log):
    results = {}
    x_tr = _draw(x_tr, r["max_train"])
    for kind, values in (("topk", r["ks"]), ("relu", r["l1s"])):
        for v in values:
            name = f"{kind}-{v}"
            log(f"training {name}")
            sae, hist = train_sae(x_tr, d_sae=r["d_sae"], kind=kind, k=v if kind == "topk" else 32, l1=v,
                                  epochs=r["epochs"], batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], seed=0)
            sae = load_dictionary(_state(sae))             # evaluate exactly what is stored (fp16 matrices)
            results[name] = {"model": sae, "history": hist["loss"][::10],
                             "validation": _evaluate(sae, x_va), "test": _evaluate(sae, x_te)}
            log(f"  {name}: val L0 {results[name]['validation']['l0'].mean():.1f}, "
                f"FVU {results[name]['validation']['fvu_tok'].mean():.3f}")
    return results


def select(results: dict, kind: str, *, max_fvu: float) -> str:
    """The sparsest sweep member of ``kind`` whose *validation* FVU is below ``max_fvu`` (else the best FVU)."""
    names = [n for n in results if n.startswith(kind + "-")]
    if not names:
        raise ValueError(f"no sweep member of kind {kind!r}")
    ok = [n for n in names if results[n]["validation"]["fvu"] < max_fvu]
    if ok:
        return min(ok, key=lambda n: results[n]["validation"]["l0"])
    return min(names, key=lambda n: results[n]["validation"]["fvu"])


def _summary(res: dict) -> dict:
    out = {}
    for name, r in res.items():
        out[name] = {"history": r["history"]}
        for split in ("validation", "test"):
            e = r[split]
            out[name][split] = {"l0": float(e["l0"].mean()), "fvu": float(e["fvu_tok"].mean()),
                                "counts": e["counts"].int(), "n": e["n"]}
        out[name]["test"]["fvu_tok"] = r["test"]["fvu_tok"].half()
        out[name]["test"]["l0_tok"] = r["test"]["l0"].to(torch.int16)
    return out


def _minilm_activations(log=print) -> tuple[Tensor, dict]:
    """MiniLM's recipe site on the recipe's sentences: ``([token, 384], {split: [token] bool})``, special tokens out."""
    from helpers.assets import minilm

    r = RECIPE["minilm"]
    common.set_seed(0)
    model, tok = minilm()
    texts = minilm_sentences()
    split = split_of(len(texts))
    batches = batches_of(tok, texts, batch_size=128, max_length=r["max_length"])
    log("harvesting MiniLM")
    h = harvest(model, batches, site=r["site"])
    special = torch.isin(h["input_ids"], torch.tensor(tok.all_special_ids))
    units = np.asarray(split)[h["seq"].numpy()]
    return h[r["site"]], {s: torch.from_numpy(units == s) & ~special for s in ("train", "validation", "test")}


def build_minilm(path: Path, *, log=print) -> None:
    """Recipe: harvest MiniLM-L6's middle residual stream, train the sweep, write the artefact to ``path``."""
    r = RECIPE["minilm"]
    x, keep = _minilm_activations(log)
    res = _sweep(x[keep["train"]], x[keep["validation"]], x[keep["test"]], r, log)
    summary = _summary(res)
    chosen = {kind: select(summary, kind, max_fvu=RECIPE["select_fvu"]) for kind in KINDS}
    from sklearn.decomposition import PCA, FastICA

    train_x = x[keep["train"]]
    sample = _draw(train_x, 10000)
    pca = PCA(n_components=x.shape[1], random_state=0).fit(sample.numpy())
    log("fitting ICA")
    ica = FastICA(n_components=128, random_state=0, max_iter=200, whiten="unit-variance").fit(sample.numpy())
    torch.save({"recipe": r, "summary": summary, "chosen": chosen,
                "dictionaries": {chosen["topk"]: _state(res[chosen["topk"]]["model"])},
                "pca": {"components": torch.from_numpy(pca.components_).half(),
                        "mean": torch.from_numpy(pca.mean_).float()},
                "ica": {"components": torch.from_numpy(ica.components_).float(),
                        "mean": torch.from_numpy(ica.mean_).float()}},
               path)


def _smollm2_activations(model: nn.Module, windows: Tensor, log=print) -> tuple[dict, Tensor, dict]:
    """The recipe layer's residual stream, MLP input and MLP output on ``windows``: ``(harvest, mlp_in [token, d],
    {split: [token] bool})``, positions before the recipe's ``first`` left out of every split."""
    r = RECIPE["smollm2"]
    layer = r["layer"]
    sites = [f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out"]
    log(f"harvesting SmolLM2: {windows.numel()} tokens")
    batches = [{"input_ids": windows[i:i + 16], "attention_mask": torch.ones_like(windows[i:i + 16])}
               for i in range(0, len(windows), 16)]
    h = harvest(model, batches, site=sites)
    with torch.no_grad():
        mlp_in = torch.cat([model.model.layers[layer].post_attention_layernorm(c) for c in h[sites[1]].split(8192)])
    units = split_of(len(windows))[h["seq"].numpy()]
    # positions 0..first-1 hold the attention sink: <|endoftext|> and the massive activations of the first
    # tokens after it (norms ~100x the rest, ~98 % of the variance); they are left out and never spliced
    keep = {s: torch.from_numpy(units == s) & (h["pos"] >= r["first"]) for s in ("train", "validation", "test")}
    return h, mlp_in, keep


def build_smollm2(path: Path, *, log=print) -> None:
    """Recipe: SmolLM2's middle residual stream and MLP; the sweep, the transcoder, loss recovered, contexts."""
    from helpers.assets import smollm2

    r = RECIPE["smollm2"]
    layer, first = r["layer"], r["first"]
    site, mlp_out = f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_mlp_out"
    common.set_seed(0)
    model, tok = smollm2()
    model.requires_grad_(False)
    windows, source = smollm2_windows(tok)
    split = split_of(len(windows))
    h, mlp_in, keep = _smollm2_activations(model, windows, log)
    x = h[site]
    norms = x[keep["train"]].norm(dim=-1)
    log(f"largest / median token norm kept: {float(norms.max() / norms.median()):.1f}")
    res = _sweep(x[keep["train"]], x[keep["validation"]], x[keep["test"]], r, log)
    log("training the transcoder")
    t = r["transcoder"]
    tr = keep["train"].nonzero()[:, 0]
    tr = _draw(tr, r["max_train"])
    tc, tc_hist = train_sae(mlp_in[tr], targets=h[mlp_out][tr], d_sae=t["d_sae"], kind="topk", k=t["k"],
                            epochs=r["epochs"], batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], seed=0)
    tc = load_dictionary(_state(tc) | {"transcoder": True})
    tc_test = _evaluate(tc, mlp_in[keep["test"]], h[mlp_out][keep["test"]])
    # the MLP's own neurons on the same held-out tokens: activation share for a like-for-like L0
    summary = _summary(res)
    chosen = {kind: select(summary, kind, max_fvu=RECIPE["select_fvu"]) for kind in KINDS}
    log("loss recovered")
    test_w = windows[split == "test"][: r["loss_windows"]]
    losses = {"clean": next_token_loss(model, test_w, first=first),
              "zero": next_token_loss(model, test_w, edits=splice(model, site, torch.zeros_like, first=first),
                                      first=first)}
    for name, rr in res.items():
        edit = splice(model, site, lambda a, m=rr["model"]: m(a)[0], first=first)
        losses[name] = next_token_loss(model, test_w, edits=edit, first=first)
    losses["mlp zero"] = next_token_loss(model, test_w, edits=splice(model, mlp_out, torch.zeros_like, first=first),
                                         first=first)
    losses["transcoder"] = next_token_loss(model, test_w, edits=splice_transcoder(model, layer, tc, first=first),
                                           first=first)
    log("contexts")
    best = {}
    late = (h["pos"] >= first).nonzero()[:, 0]                  # contexts only among the kept positions
    for name in [chosen["topk"]]:
        v, i = top_contexts(res[name]["model"], x[late])
        best[name] = (v, late[i])
    v, i = top_contexts(tc, mlp_in[late])
    tc_best = (v, late[i])
    tc_blob = _state(tc) | {"transcoder": True}
    torch.save({"recipe": r, "summary": summary, "chosen": chosen, "source": source,
                "windows": windows.int(), "token_seq": h["seq"].int(), "token_pos": h["pos"].to(torch.int16),
                "dictionaries": {chosen["topk"]: _state(res[chosen["topk"]]["model"])},
                "transcoder": tc_blob, "transcoder_history": tc_hist["loss"][::10],
                "transcoder_test": {"l0": float(tc_test["l0"].mean()), "fvu_tok": tc_test["fvu_tok"].half(),
                                    "counts": tc_test["counts"].int(), "n": tc_test["n"]},
                "losses": {k: v.float() for k, v in losses.items()},
                "contexts": {n: (v.half(), i.int()) for n, (v, i) in best.items()},
                "transcoder_contexts": (tc_best[0].half(), tc_best[1].int())}, path)


def artefact_path(name: str) -> Path:
    """Cache path of artefact ``name`` (``"minilm"`` or ``"smollm2"``), keyed by the recipe's hash."""
    shared = {k: v for k, v in RECIPE.items() if k not in ("minilm", "smollm2")}
    key = common.content_hash({"recipe": RECIPE.get(name), "shared": shared, "name": name}, 12)
    return common.cache_dir("models", "dictionaries") / f"{name}-{key}.pt"


def load_artefact(name: str) -> dict:
    """The committed (verified) artefact, else the cached one, else built now (minutes of CPU)."""
    builders = {"minilm": build_minilm, "smollm2": build_smollm2}
    if name not in builders:
        raise ValueError(f"name must be one of {sorted(builders)}, got {name!r}")
    path = common.cached_file(artefact_path(name), builders[name], committed=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def build_artefacts(names: Sequence[str] = ("minilm", "smollm2")) -> None:
    """Build (or verify) the chapter's artefacts: ``python -m helpers.dictionaries [minilm|smollm2]``."""
    for name in names:
        print(name, load_artefact(name) and artefact_path(name))


# ---------------------------------------------------------------------------------------------
# Studies of the chapter whose small results are committed (helpers/weights/results/ch6c)
# ---------------------------------------------------------------------------------------------


def _study_path(name: str, recipe: dict) -> Path:
    return common.cache_dir("results", "ch6c") / f"{name}-{common.content_hash(recipe)}.pt"


def l1_probe(C: float, *, seed: int = 0):
    """One sparse (L1) logistic regression per class, one-vs-rest (scikit-learn, liblinear, seeded)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    return OneVsRestClassifier(LogisticRegression(l1_ratio=1.0, solver="liblinear", C=C, random_state=seed))


def ovr_proba(X: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """``predict_proba`` of a fitted :func:`l1_probe` from its weights: each class's sigmoid, rows normalised."""
    p = 1.0 / (1.0 + np.exp(-(np.asarray(X, dtype=np.float64) @ coef.T + intercept)))
    return p / p.sum(1, keepdims=True)


SEED_STUDY = {"seeds": [1, 2], "v": 1}
"""Training seeds of :func:`seed_study` (seed 0 is the committed artefact's)."""


def _seed_metrics(model: SparseAutoencoder, x: Tensor, target: Tensor | None = None) -> dict:
    e = _evaluate(model, x, target)
    freq = e["counts"].float() / e["n"]
    return {"fvu": float(e["fvu_tok"].mean()), "l0": float(e["l0"].mean()), "dead": float((e["counts"] == 0).float()
            .mean()), "dense": float((freq > 0.1).float().mean())}


def _minilm_saes(runs: dict, *, log=print) -> tuple[dict, Tensor, dict]:
    """The chosen MiniLM TopK SAE retrained once per ``runs`` entry ``{key: (seed, epochs)}`` (``epochs=None``:
    the recipe's) on the committed recipe's training tokens: ``({key: SAE}, activations, split masks)``."""
    k = int(load_artefact("minilm")["chosen"]["topk"].split("-")[1])
    x, keep = _minilm_activations(log)
    r = RECIPE["minilm"]
    x_tr = _draw(x[keep["train"]], r["max_train"])
    out = {}
    for key, (seed, epochs) in runs.items():
        log(f"MiniLM, seed {seed}, {epochs or r['epochs']} passes")
        sae, _ = train_sae(x_tr, d_sae=r["d_sae"], kind="topk", k=k, epochs=epochs or r["epochs"],
                           batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], seed=seed)
        out[key] = load_dictionary(_state(sae))
    return out, x, keep


def _retrained(runs: dict, *, transcoder: bool, log=print) -> dict:
    """The chosen TopK SAEs (and, with ``transcoder``, the transcoder) retrained once per ``runs`` entry
    ``{key: (seed, epochs)}`` (``epochs=None``: the model's recipe) on the committed recipe's training tokens,
    scored on its test tokens and loss windows:
    ``{key: {"minilm" | "smollm2" | "transcoder": {"fvu", "l0", "dead", "dense"} (+ "loss")}}``."""
    from helpers.assets import smollm2

    k_smollm2 = int(load_artefact("smollm2")["chosen"]["topk"].split("-")[1])
    saes, x, keep = _minilm_saes(runs, log=log)
    out = {key: {"minilm": _seed_metrics(sae, x[keep["test"]])} for key, sae in saes.items()}
    del x, saes
    r = RECIPE["smollm2"]
    layer, first, t = r["layer"], r["first"], r["transcoder"]
    model, tok = smollm2()
    model.requires_grad_(False)
    windows, _ = smollm2_windows(tok)
    h, mlp_in, keep = _smollm2_activations(model, windows, log)
    site = f"blocks.{layer}.hook_resid_post"
    x, mlp_out = h[site], h[f"blocks.{layer}.hook_mlp_out"]
    x_tr = _draw(x[keep["train"]], r["max_train"])
    tr = _draw(keep["train"].nonzero()[:, 0], r["max_train"])
    test_w = windows[split_of(len(windows)) == "test"][: r["loss_windows"]]
    for key, (seed, epochs) in runs.items():
        log(f"SmolLM2, seed {seed}, {epochs or r['epochs']} passes")
        sae, _ = train_sae(x_tr, d_sae=r["d_sae"], kind="topk", k=k_smollm2, epochs=epochs or r["epochs"],
                           batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], seed=seed)
        sae = load_dictionary(_state(sae))
        out[key]["smollm2"] = _seed_metrics(sae, x[keep["test"]]) | {"loss": next_token_loss(
            model, test_w, edits=splice(model, site, lambda a, m=sae: m(a)[0], first=first), first=first)}
        if transcoder:
            tc, _ = train_sae(mlp_in[tr], targets=mlp_out[tr], d_sae=t["d_sae"], kind="topk", k=t["k"],
                              epochs=epochs or r["epochs"], batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], seed=seed)
            tc = load_dictionary(_state(tc) | {"transcoder": True})
            out[key]["transcoder"] = _seed_metrics(tc, mlp_in[keep["test"]], mlp_out[keep["test"]]) | {
                "loss": next_token_loss(model, test_w, edits=splice_transcoder(model, layer, tc, first=first),
                                        first=first)}
    return out


def _chosen_recipe(study: dict) -> dict:
    chosen = {name: load_artefact(name)["chosen"]["topk"] for name in ("minilm", "smollm2")}
    return {"recipe": RECIPE, "chosen": chosen, **study}


def seed_study(*, log=print) -> dict:
    """The chapter's chosen TopK SAEs (MiniLM, SmolLM2) and the transcoder retrained under the seeds of
    :data:`SEED_STUDY` (initialisation and batch order; same training tokens, one pass), scored on the same test
    tokens and loss windows as the committed artefacts. Committed under ``results/ch6c``.

    Returns:
        ``{seed: {"minilm" | "smollm2" | "transcoder": {"fvu", "l0", "dead", "dense"}}}`` (floats) and, for
        ``"smollm2"`` and ``"transcoder"``, ``"loss"``: ``[window]`` next-token cross-entropy with the
        dictionary spliced in.
    """
    def build(path: Path) -> None:
        runs = {seed: (seed, None) for seed in SEED_STUDY["seeds"]}
        torch.save(_retrained(runs, transcoder=True, log=log), path)

    path = _study_path("seeds", _chosen_recipe(SEED_STUDY))
    return torch.load(common.cached_file(path, build, committed=True), weights_only=True)


EPOCH_STUDY = {"epochs": [2, 4], "v": 1}
"""Passes over the same training tokens in :func:`epoch_study` (the committed dictionaries made one)."""


def epoch_study(*, log=print) -> dict:
    """How far from converged the chapter's chosen TopK SAEs are: each retrained (seed 0, same tokens, same
    batch and learning rate) for more passes over its training tokens, scored on the same test tokens and, for
    SmolLM2, the same loss windows. Committed under ``results/ch6c``.

    Returns:
        ``{epochs: {"minilm" | "smollm2": {"fvu", "l0", "dead", "dense"} (+ "loss" [window] for SmolLM2)}}``.
    """
    def build(path: Path) -> None:
        runs = {epochs: (0, epochs) for epochs in EPOCH_STUDY["epochs"]}
        torch.save(_retrained(runs, transcoder=False, log=log), path)

    path = _study_path("epochs", _chosen_recipe(EPOCH_STUDY))
    return torch.load(common.cached_file(path, build, committed=True), weights_only=True)


DATA_STUDY = {"seeds": [0, 1, 2], "samples": 1000000, "v": 1}
"""More distinct tokens at equal compute (:func:`data_study`): training seeds and Adam samples per run."""


def extra_austen_sentences() -> list[str]:
    """Every Austen sentence in the recipe's length range (6-40 words) that :func:`minilm_sentences` leaves out."""
    sents = _austen_pool()
    used = set(_spread(len(sents), RECIPE["minilm"]["n_austen"]).tolist())
    return [s for i, s in enumerate(sents) if i not in used]


def data_study(*, log=print) -> dict:
    """Do more *distinct* tokens help where more passes stop paying? MiniLM's chosen TopK SAE trained on
    ``DATA_STUDY["samples"]`` Adam samples (two passes of the recipe) two ways, per seed: **two passes** over the
    recipe's training tokens, or **more tokens** — one draw of that many samples from the recipe's training tokens
    plus every further Austen sentence (:func:`extra_austen_sentences`, training only: the test tokens are the
    recipe's). Same batch size, learning rate and seeds; scored on the recipe's test tokens. Committed under
    ``results/ch6c``.

    Returns:
        ``{"distinct": {arm: int}, "runs": {arm: {seed: {"fvu", "l0", "dead", "dense"}}}}``.
    """
    from helpers.assets import minilm

    def build(path: Path) -> None:
        r = RECIPE["minilm"]
        k = int(load_artefact("minilm")["chosen"]["topk"].split("-")[1])
        x, keep = _minilm_activations(log)
        model, tok = minilm()
        log("harvesting the further Austen sentences")
        h = harvest(model, batches_of(tok, extra_austen_sentences(), batch_size=128, max_length=r["max_length"]),
                    site=r["site"])
        extra = h[r["site"]][~torch.isin(h["input_ids"], torch.tensor(tok.all_special_ids))]
        pool = torch.cat([x[keep["train"]], extra])
        arms = {"two passes": (_draw(x[keep["train"]], r["max_train"]), 2),
                "more tokens": (_draw(pool, DATA_STUDY["samples"]), 1)}
        out = {"distinct": {"two passes": min(r["max_train"], int(keep["train"].sum())),
                            "more tokens": min(DATA_STUDY["samples"], len(pool))}, "runs": {a: {} for a in arms}}
        for seed in DATA_STUDY["seeds"]:
            for arm, (data, epochs) in arms.items():
                log(f"MiniLM, {arm}, seed {seed}")
                sae, _ = train_sae(data, d_sae=r["d_sae"], kind="topk", k=k, epochs=epochs,
                                   batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], seed=seed)
                out["runs"][arm][seed] = _seed_metrics(load_dictionary(_state(sae)), x[keep["test"]])
        torch.save(out, path)

    path = _study_path("data", _chosen_recipe(DATA_STUDY))
    return torch.load(common.cached_file(path, build, committed=True), weights_only=True)


@torch.no_grad()
def pooled_codes(encoder: nn.Module, batches: Sequence[dict], *, site: str, special_ids: Sequence[int],
                 sae: SparseAutoencoder | None = None, chunk: int = 8192) -> np.ndarray:
    """``[sequence, d]`` mean over each sequence's tokens (special tokens excluded) of ``sae``'s code at ``site``
    (``sae=None``: of the activation itself). A sequence with no ordinary token gets zeros."""
    h = harvest(encoder, batches, site=site)
    keep = ~torch.isin(h["input_ids"], torch.as_tensor(list(special_ids)))
    x, seq = h[site][keep], h["seq"][keep]
    n = sum(len(b["input_ids"]) for b in batches)
    d = x.shape[1] if sae is None else sae.d_sae
    sums = torch.zeros(n, d)
    for xc, sc in zip(x.split(chunk), seq.split(chunk), strict=True):    # never hold every token's code at once
        sums.index_add_(0, sc, xc if sae is None else sae.encode(xc))
    return (sums / torch.bincount(seq, minlength=n).clamp(min=1)[:, None]).numpy()


def fold_probe(X: np.ndarray, y: np.ndarray, folds: np.ndarray, *, Cs: Sequence[float], seed: int = 0) -> dict:
    """The L1 probe on chapter folds: each passage is predicted by the model that never saw its fold.

    For test fold ``k`` the penalty is chosen on fold ``k + 1`` (whole chapters, mod the number of folds) by a
    probe fitted on the remaining folds (ties: the stronger penalty), then refitted on every fold but ``k``.

    Returns:
        ``{"pred" [passage], "C" [fold], "val_acc" [fold, C], "coef" [fold, class, feature],
        "intercept" [fold, class]}`` (numpy).
    """
    X, y, folds = np.asarray(X), np.asarray(y), np.asarray(folds)
    if X.ndim != 2 or len(X) != len(y) or y.shape != folds.shape or not np.isfinite(X).all():
        raise ValueError(f"X must be finite [passage, feature] with one label and fold per row, got {X.shape}, "
                         f"{y.shape}, {folds.shape}")
    ks = np.unique(folds)
    if len(ks) < 3 or not np.array_equal(ks, np.arange(len(ks))):
        raise ValueError(f"folds must be 0..K-1 with K >= 3, got {ks.tolist()}")
    out = {"pred": np.zeros(len(y), dtype=np.int64), "C": [], "val_acc": [], "coef": [], "intercept": []}
    for k in ks:
        v = (k + 1) % len(ks)
        fit, val, train, test = folds != k, folds == v, folds != k, folds == k
        fit &= folds != v
        acc = [float(np.mean(l1_probe(C, seed=seed).fit(X[fit], y[fit]).predict(X[val]) == y[val])) for C in Cs]
        best = max(range(len(Cs)), key=lambda i: (acc[i], -Cs[i]))
        clf = l1_probe(Cs[best], seed=seed).fit(X[train], y[train])
        out["pred"][test] = clf.predict(X[test])
        out["C"].append(float(Cs[best]))
        out["val_acc"].append(acc)
        out["coef"].append(np.vstack([e.coef_ for e in clf.estimators_]))
        out["intercept"].append(np.concatenate([e.intercept_ for e in clf.estimators_]))
    return {k: np.asarray(v) for k, v in out.items()}


def cv_probe(X: np.ndarray, y: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], *, Cs: Sequence[float],
             fraction: float = 0.8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The L1 probe under cross-validation with the penalty chosen inside each training fold.

    For each ``(train, test)`` pair, ``C`` is chosen on a stratified ``1 - fraction`` of ``train`` by a probe fitted
    on the rest (ties: the stronger penalty), then the probe is refitted on all of ``train`` and tested.

    Returns:
        ``([example] correct predictions summed over the folds, [fold] chosen C)``.
    """
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or len(X) != len(y) or not np.isfinite(X).all() or not folds:
        raise ValueError(f"X must be finite [example, feature] with one label per row and folds non-empty, got "
                         f"{X.shape}, {y.shape}, {len(folds)} folds")
    correct, chosen = np.zeros(len(y)), []
    for tr, te in folds:
        fit_i, val_i = stats.split_indices(len(tr), fraction=fraction, seed=seed, labels=y[tr])
        fit_i, val_i = tr[fit_i], tr[val_i]
        acc = [float(np.mean(l1_probe(C, seed=seed).fit(X[fit_i], y[fit_i]).predict(X[val_i]) == y[val_i]))
               for C in Cs]
        best = max(range(len(Cs)), key=lambda i: (acc[i], -Cs[i]))
        correct[te] += l1_probe(Cs[best], seed=seed).fit(X[tr], y[tr]).predict(X[te]) == y[te]
        chosen.append(float(Cs[best]))
    return correct, np.asarray(chosen)


def wikipedia_sae(encoder: nn.Module, tokenizer, *, k: int, log=print) -> tuple[SparseAutoencoder, dict]:
    """A MiniLM TopK SAE of the recipe trained on Wikipedia sentences only (no Austen): ``(sae, test summary)``.

    Same site, width, batch, learning rate, seed and number of training samples (``max_train``) as the committed
    sweep: the training tokens of every Wikipedia sentence (split by :func:`split_of`, the same sentences the book
    corpus uses for training), repeated where there are fewer than ``max_train``; FVU and L0 on its own test tokens.
    """
    from helpers.assets import wikipedia_sentences

    r = RECIPE["minilm"]
    texts = wikipedia_sentences()
    h = harvest(encoder, batches_of(tokenizer, texts, batch_size=128, max_length=r["max_length"]), site=r["site"])
    keep = ~torch.isin(h["input_ids"], torch.tensor(tokenizer.all_special_ids))
    units = split_of(len(texts))[h["seq"].numpy()]
    x_tr, x_te = h[r["site"]][keep & torch.from_numpy(units == "train")], h[r["site"]][keep & torch.from_numpy(
        units == "test")]
    n_tokens = len(x_tr)
    x_tr = _draw(x_tr, r["max_train"])
    log(f"Wikipedia-only SAE: {n_tokens:,} training tokens, {len(x_tr):,} samples")
    sae, _ = train_sae(x_tr, d_sae=r["d_sae"], kind="topk", k=k, epochs=r["epochs"], batch_size=RECIPE["batch_size"],
                       lr=RECIPE["lr"], seed=0)
    sae = load_dictionary(_state(sae))
    e = _evaluate(sae, x_te)
    return sae, {"n_train": n_tokens, "n_samples": len(x_tr), "n_test": e["n"], "fvu": float(e["fvu_tok"].mean()),
                 "l0": float(e["l0"].mean())}


def _probe_on_codes(encoder: nn.Module, tokenizer, batches: Sequence[dict], sae: SparseAutoencoder | None, labels,
                    folds, recipe: dict) -> dict[str, Tensor]:
    """:func:`fold_probe` on the passages' pooled codes of ``sae`` (``None``: the activation), as tensors to save."""
    X = pooled_codes(encoder, batches, site=recipe["site"], special_ids=tokenizer.all_special_ids, sae=sae)
    probe = fold_probe(X, np.asarray(labels), np.asarray(folds), Cs=recipe["Cs"])
    return {k: torch.from_numpy(v) for k, v in probe.items()}


def austen_fold_study(encoder: nn.Module, tokenizer, sae: SparseAutoencoder, texts: Sequence[str], labels,
                      folds, *, recipe: dict) -> dict:
    """Chapter 6c's classifier on Chapter 3's chapter folds (committed): :func:`fold_probe` on the passages'
    pooled codes of ``sae`` (``"book"``), of a Wikipedia-only SAE (:func:`wikipedia_sae`, ``"wikipedia"``) and
    on the pooled activation itself (``"dense"``). ``recipe`` names all that determines the inputs and holds
    ``"site"``, ``"max_length"`` and ``"Cs"``.

    Returns:
        ``{variant: fold_probe(...)}`` plus ``"wikipedia_sae"`` (its stored state) and ``"wikipedia_summary"``.
    """
    def build(path: Path) -> None:
        batches = batches_of(tokenizer, list(texts), batch_size=128, max_length=recipe["max_length"])
        wiki, summary = wikipedia_sae(encoder, tokenizer, k=sae.k)
        out = {name: _probe_on_codes(encoder, tokenizer, batches, code, labels, folds, recipe)
               for name, code in (("book", sae), ("wikipedia", wiki), ("dense", None))}
        torch.save(out | {"wikipedia_sae": _state(wiki), "wikipedia_summary": summary}, path)

    blob = torch.load(common.cached_file(_study_path("austen-folds", recipe), build, committed=True),
                      weights_only=True)
    return {name: {k: v.numpy() for k, v in blob[name].items()} for name in ("book", "wikipedia", "dense")} | {
        "wikipedia_sae": load_dictionary(blob["wikipedia_sae"]), "wikipedia_summary": blob["wikipedia_summary"]}


def austen_seed_study(encoder: nn.Module, tokenizer, texts: Sequence[str], labels, folds, *, recipe: dict,
                      log=print) -> dict[int, dict]:
    """:func:`austen_fold_study`'s classifier on the codes of the MiniLM SAE retrained under each seed of
    :data:`SEED_STUDY` (committed, with the SAEs themselves so that other tests can read them): how much the
    classifier moves with the dictionary's seed.

    Returns:
        ``{seed: fold_probe(...) | {"sae": SparseAutoencoder}}`` (numpy), ``recipe`` as for
        :func:`austen_fold_study`.
    """
    def build(path: Path) -> None:
        batches = batches_of(tokenizer, list(texts), batch_size=128, max_length=recipe["max_length"])
        saes, _, _ = _minilm_saes({seed: (seed, None) for seed in SEED_STUDY["seeds"]}, log=log)
        out = {seed: _probe_on_codes(encoder, tokenizer, batches, sae, labels, folds, recipe) | {"sae": _state(sae)}
               for seed, sae in saes.items()}
        torch.save(out, path)

    path = _study_path("austen-seeds", _chosen_recipe({"folds": recipe, "seeds": SEED_STUDY}))
    blob = torch.load(common.cached_file(path, build, committed=True), weights_only=True)
    return {int(seed): {k: load_dictionary(v) if k == "sae" else v.numpy() for k, v in d.items()}
            for seed, d in blob.items()}


@torch.no_grad()
def concept_mass(model: nn.Module, tokenizer, prompts: Sequence[str], ids: Sequence[int], edits=()) -> np.ndarray:
    """``[prompt]`` probability that the next token after each prompt is one of ``ids``, inside ``edits``.

    ``edits``: a list of context managers, or a function returning fresh ones (:func:`splice`, or a
    memory edit); one forward pass per prompt (no padding).
    """
    out = []
    for p in prompts:
        with hooks.patches(edits() if callable(edits) else edits):
            probs = model(**tokenizer(p, return_tensors="pt")).logits[0, -1].softmax(-1)
        out.append(float(probs[list(ids)].sum()))
    return np.array(out)


def steering_edit(model: nn.Module, site: str, direction: Tensor, strength: float, *, first: int = 1):
    """``() -> [hooks.patch]``: add ``strength`` times the unit ``direction`` at ``site``, positions ``first..``."""
    unit = direction / direction.norm()
    return splice(model, site, lambda a: a + strength * unit, first=first)


def memory_edit(model: nn.Module, memories: dict, value: float):
    """``() -> [ffn.intervene]``: set the coefficients of ``memories`` (``{layer: [neuron]}``) to ``value``."""
    from helpers import ffn

    return lambda: [ffn.intervene(model, memories, value=value)]


def steering_study(model: nn.Module, tokenizer, sae: SparseAutoencoder, *, recipe: dict, resid_norm: float,
                   val_windows: Tensor, test_windows: Tensor) -> dict:
    """Chapter 6c's steering protocol: a feature against random features and Chapter 5's memory edit.

    On validation prompts and windows, α (feature) and the memory value are each chosen as the one with the
    highest P(selection word) whose CE increase on the windows stays below ``recipe["max_dce"]``; on test
    prompts and windows, each edit is then scored by P(held-out word) and CE. ``recipe`` holds ``site``,
    ``first``, ``feature``, ``random`` (features), ``memories``, ``sel_ids``, ``held_ids``, ``val_prompts``,
    ``test_prompts``, ``alphas``, ``mem_values``, ``mem_ch5`` and ``max_dce``; the result is committed.

    Returns ``{"val_alpha" [alpha, 2], "val_mem" [value, 2]`` (P(selection word), CE increase),
    ``"alpha", "mem_value", "mass": {edit: [prompt]}, "ce": {edit: [window]}}`` (float64).
    """
    r = recipe
    memories = {int(k): list(v) for k, v in r["memories"].items()}

    def feature_edit(f, alpha):
        return steering_edit(model, r["site"], sae.W_dec[f], alpha * resid_norm, first=r["first"])

    def choose(options, edit):                                 # validation: P(selection word) under a CE cap
        base = next_token_loss(model, val_windows, first=r["first"]).mean()
        rows = [[concept_mass(model, tokenizer, r["val_prompts"], r["sel_ids"], edit(o)).mean(),
                 float(next_token_loss(model, val_windows, edits=edit(o), first=r["first"]).mean() - base)]
                for o in options]
        ok = [i for i, row in enumerate(rows) if row[1] < r["max_dce"]] or [0]
        return float(options[max(ok, key=lambda i: rows[i][0])]), torch.tensor(rows, dtype=torch.float64)

    def build(path: Path) -> None:
        alpha, val_alpha = choose(r["alphas"], lambda a: feature_edit(r["feature"], a))
        mem_value, val_mem = choose(r["mem_values"], lambda v: memory_edit(model, memories, v))
        edits = {"feature": [feature_edit(r["feature"], alpha)],
                 "random feature": [feature_edit(f, alpha) for f in r["random"]],      # averaged over features
                 "memories, value chosen": [memory_edit(model, memories, mem_value)],
                 "memories, value 5 (Ch. 5)": [memory_edit(model, memories, r["mem_ch5"])]}
        mass = {"none": concept_mass(model, tokenizer, r["test_prompts"], r["held_ids"])}
        ce = {}
        for name, es in edits.items():
            mass[name] = np.mean([concept_mass(model, tokenizer, r["test_prompts"], r["held_ids"], e) for e in es], 0)
            ce[name] = np.mean([next_token_loss(model, test_windows, edits=e, first=r["first"]).double().numpy()
                                for e in es], 0)
        torch.save({"val_alpha": val_alpha, "val_mem": val_mem, "alpha": alpha, "mem_value": mem_value,
                    "mass": {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in mass.items()},
                    "ce": {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in ce.items()}}, path)

    blob = torch.load(common.cached_file(_study_path("steering", recipe), build, committed=True), weights_only=True)
    return {"val_alpha": blob["val_alpha"].numpy(), "val_mem": blob["val_mem"].numpy(), "alpha": blob["alpha"],
            "mem_value": blob["mem_value"], "mass": {k: v.numpy() for k, v in blob["mass"].items()},
            "ce": {k: v.numpy() for k, v in blob["ce"].items()}}


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    build_artefacts(sys.argv[1:] or ("minilm", "smollm2"))
