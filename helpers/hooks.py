"""Capture and patch activations of the book's transformers by role name (TransformerLens-style).

One hook layer for both real models of the book: MiniLM-L6 (a ``transformers`` ``BertModel``) and
SmolLM2-135M (a ``LlamaForCausalLM``). Sites are named as in TransformerLens (Nanda & Bloom 2022):

- ``hook_embed``: embeddings output = residual stream before block 0, ``[batch, pos, d_model]`` (BERT:
  after the embedding LayerNorm; Llama: ``embed_tokens``, skipped when ``inputs_embeds`` is passed);
- ``blocks.{l}.hook_resid_pre``: input of block l, ``[batch, pos, d_model]``;
- ``blocks.{l}.attn.hook_q`` / ``hook_k`` / ``hook_v``: outputs of the query, key and value projections
  (before rotary embeddings), ``[batch, pos, head, d_head]``; with grouped-query attention ``hook_k`` and
  ``hook_v`` have one entry per key/value head, shared by ``n_heads // n_kv_heads`` query heads;
- ``blocks.{l}.attn.hook_pattern``: attention probabilities (capture only), ``[batch, head, q, k]``;
- ``blocks.{l}.attn.hook_z``: per-head outputs, the input of ``o_proj`` / BERT's ``attention.output.dense``,
  ``[batch, pos, head, d_head]``;
- ``blocks.{l}.hook_attn_out``: attention output added to the residual stream, ``[batch, pos, d_model]``;
- ``blocks.{l}.hook_resid_mid``: Llama only, resid_pre + attn_out, ``[batch, pos, d_model]``;
- ``blocks.{l}.mlp.hook_post``: MLP hidden activation, the input of ``down_proj`` (``act(gate) * up``) /
  BERT's ``output.dense``, ``[batch, pos, d_mlp]``;
- ``blocks.{l}.hook_mlp_out``: MLP output added to the residual stream, ``[batch, pos, d_model]``;
- ``blocks.{l}.hook_resid_post``: output of block l, ``[batch, pos, d_model]``;
- ``ln_final.hook_normalized``: Llama only, output of the final RMSNorm, ``[batch, pos, d_model]``.

BERT is post-LN: each sub-layer ends in ``LayerNorm(x + sublayer(x))``, so ``resid_pre``/``resid_post``
are the hidden states *between* layers (``output_hidden_states``), ``attn_out``/``mlp_out`` are the
dense outputs before that add-and-normalise, and there is no ``resid_mid`` or ``ln_final``. In Llama
(pre-LN) ``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out`` exactly.

``hook_pattern`` is the second output of the self-attention module, which transformers' eager kernel
returns on every call (``output_attentions`` is not needed); SDPA/flash kernels never form it, so it
needs a model loaded with ``attn_implementation="eager"`` (or ``model.set_attn_implementation("eager")``).
It cannot be patched: patch ``hook_z`` to change what a head writes.

Public functions: :func:`capture` / :func:`run_with_cache` (record), :func:`observe` (call a function, store
nothing), :func:`patch` / :func:`ablate` / :func:`patches` (write), :func:`run_until` (stop after a block) at
the sites above; :func:`on_modules` / :func:`capture_modules` for modules without a role name (a timm ViT,
a recommender, BERT's embedding sum). Every hook of the book's helpers goes through this module and is
removed on exit, also after an exception (a test checks that no other module registers a torch hook).

Why hand-written hooks and not nnsight: nnsight 0.8.1 (the version PyPI serves) was evaluated as a
package only, not run: a 313 kB wheel with a compiled extension, 75 Python files (18k lines) and 11
unpinned requirements, of which greenlet and zstandard are not in the book's environment. This layer is
about 550 lines on plain ``torch`` hooks and adds no dependency. Its cost on MiniLM-L6 (benchmarks/hooks.py,
100 sentences, 1 thread, 2-core CPU; benchmarks/results/hooks.json): capturing ``hook_resid_post`` of
all 6 layers 1.04x the bare forward pass, all 61 sites 1.07x, patching one head 0.99x (hooks.json, 2026-12-06;
earlier runs with the 43 sites before ``hook_q/k/v`` gave 1.01x/1.05x/1.02x and 0.99x/1.14x/1.13x: run-to-run
noise on a shared CPU).

Why not TransformerLens: it is this layer's test oracle instead (tests/test_hooks_transformer_lens.py). On
SmolLM2, the Llama sites above (blocks 0, 14, 29) and the logits are bitwise equal to TransformerLens 4.3.0's
unprocessed ``TransformerBridge`` (our ``ln_final.hook_normalized`` is its ``ln_final.hook_out``: its own is
before the RMSNorm weight), within 2e-6 relative of its weight-processed model; a head patch, the logit lens
and direct logit attribution agree to 5e-7 on the unprocessed bridge. Capturing the 30 ``hook_resid_post``
sites costs 0.99x the bare forward pass here, 1.02x with its ``run_with_cache`` (earlier run: 1.03x, 1.10x).
It adds 199 MB (datasets pulls pyarrow) and hides the hook mechanics the chapter teaches, so it stays a
test dependency of this hand-written layer.

Introduced in the causal-interventions chapter: activation patching (Vig et al. 2020; Meng et al. 2022),
logit lens (nostalgebraist 2020), direct logit attribution (Elhage et al. 2021). Site names follow
TransformerLens (https://transformerlensorg.github.io/TransformerLens/).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

_BLOCK_SITES = (  # in the order a forward pass reaches them
    *("hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_z"),
    *("hook_attn_out", "hook_resid_mid"),
    *("mlp.hook_post", "hook_mlp_out", "hook_resid_post"),
)
_BLOCK_NAME = re.compile(r"blocks\.(-?\d+)\.(.+)")


@dataclass(frozen=True)
class _Site:
    name: str
    module: nn.Module
    kind: str  # "in": first input; "out": output; "pattern": 2nd output of attention; "mid": Llama resid_mid
    features: tuple[int, ...]  # shape after [batch, pos] (hook_q/k/v/z: (head, d_head)); () for the pattern
    layer: nn.Module | None = None  # the block, for "mid"


class Cache(dict):
    """``{site: tensor}`` filled by :func:`capture`; a later forward pass in the block overwrites an entry."""

    def __missing__(self, key):
        raise KeyError(f"{key!r} was not captured (has a forward pass run inside the block?); have {sorted(self)}")


def _architecture(model: nn.Module) -> tuple[str, nn.Module]:
    base = getattr(model, "base_model", model)
    if hasattr(base, "embeddings") and hasattr(getattr(base, "encoder", None), "layer"):
        return "bert", base
    if all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm")):
        return "llama", base
    raise ValueError(f"hooks supports BERT-style encoders and Llama-style decoders, got {type(model).__name__}")


def _dims(model: nn.Module) -> tuple[int, int, int, int, int]:
    """(n_layers, n_heads, d_head, d_model, d_mlp) from the config."""
    c = model.config
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, c.num_attention_heads, d_head, c.hidden_size, c.intermediate_size


def _n_kv_heads(model: nn.Module) -> int:
    """Key/value heads: fewer than the query heads with grouped-query attention."""
    c = model.config
    return getattr(c, "num_key_value_heads", None) or c.num_attention_heads


def _block_sites(
    arch: str, block: nn.Module, dims: tuple[int, ...], n_kv: int
) -> dict[str, tuple[nn.Module, str, tuple]]:
    _, n_heads, d_head, d, d_mlp = dims
    if arch == "bert":
        attn_dense, mlp_dense = block.attention.output.dense, block.output.dense
        qkv = block.attention.self
        return {
            "hook_resid_pre": (block, "in", (d,)),
            "attn.hook_q": (qkv.query, "out", (n_heads, d_head)),
            "attn.hook_k": (qkv.key, "out", (n_heads, d_head)),
            "attn.hook_v": (qkv.value, "out", (n_heads, d_head)),
            "attn.hook_pattern": (block.attention.self, "pattern", ()),
            "attn.hook_z": (attn_dense, "in", (n_heads, d_head)),
            "hook_attn_out": (attn_dense, "out", (d,)),
            "mlp.hook_post": (mlp_dense, "in", (d_mlp,)),
            "hook_mlp_out": (mlp_dense, "out", (d,)),
            "hook_resid_post": (block, "out", (d,)),
        }
    attn = block.self_attn
    return {
        "hook_resid_pre": (block, "in", (d,)),
        "attn.hook_q": (attn.q_proj, "out", (n_heads, d_head)),
        "attn.hook_k": (attn.k_proj, "out", (n_kv, d_head)),
        "attn.hook_v": (attn.v_proj, "out", (n_kv, d_head)),
        "attn.hook_pattern": (block.self_attn, "pattern", ()),
        "attn.hook_z": (block.self_attn.o_proj, "in", (n_heads, d_head)),
        "hook_attn_out": (block.self_attn.o_proj, "out", (d,)),
        "hook_resid_mid": (block.post_attention_layernorm, "mid", (d,)),
        "mlp.hook_post": (block.mlp.down_proj, "in", (d_mlp,)),
        "hook_mlp_out": (block.mlp, "out", (d,)),
        "hook_resid_post": (block, "out", (d,)),
    }


def site_names(model: nn.Module) -> list[str]:
    """Every site of ``model``, in the order a forward pass reaches them.

    Args:
        model: a BERT-style encoder or a Llama-style decoder (``transformers``).

    Returns:
        site names, e.g. ``["hook_embed", "blocks.0.hook_resid_pre", ..., "ln_final.hook_normalized"]``.

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=16))
    >>> site_names(bert)[:3]
    ['hook_embed', 'blocks.0.hook_resid_pre', 'blocks.0.attn.hook_q']
    """
    arch, _ = _architecture(model)
    per_block = [s for s in _BLOCK_SITES if arch == "llama" or s != "hook_resid_mid"]
    names = ["hook_embed"] + [f"blocks.{l}.{s}" for l in range(model.config.num_hidden_layers) for s in per_block]
    return names + (["ln_final.hook_normalized"] if arch == "llama" else [])


def _site(model: nn.Module, name: str) -> _Site:
    """Resolve a site name to its module and hook kind, with a ValueError naming what is valid."""
    arch, base = _architecture(model)
    dims = _dims(model)
    n_layers, d = dims[0], dims[3]
    if name == "hook_embed":
        return _Site(name, base.embeddings if arch == "bert" else base.embed_tokens, "out", (d,))
    if name == "ln_final.hook_normalized" and arch == "llama":
        return _Site(name, base.norm, "out", (d,))
    match = _BLOCK_NAME.fullmatch(name)
    if match and match[2] in _BLOCK_SITES:
        layer = int(match[1])
        if not 0 <= layer < n_layers:
            raise ValueError(f"site {name!r}: layer {layer} is out of range; this model has layers 0..{n_layers - 1}")
        block = (base.encoder.layer if arch == "bert" else base.layers)[layer]
        sites = _block_sites(arch, block, dims, _n_kv_heads(model))
        if match[2] in sites:
            return _Site(name, *sites[match[2]], layer=block)
    valid = site_names(model)
    post_ln = arch == "bert" and ("resid_mid" in name or name.startswith("ln_final"))
    why = " (BERT is post-LN: it has no resid_mid or ln_final)" if post_ln else ""
    raise ValueError(f"unknown site {name!r}{why}; valid sites include {valid[:4] + valid[-2:]} (see site_names)")


def _expand(model: nn.Module, sites: str | Iterable[str] | None) -> list[str]:
    """Site names from a name, a glob pattern ("blocks.*.hook_resid_post") or a list of them."""
    if sites is None:
        eager = model.config._attn_implementation == "eager"
        return [s for s in site_names(model) if eager or not s.endswith("hook_pattern")]
    names: list[str] = []
    for item in [sites] if isinstance(sites, str) else sites:
        if any(c in item for c in "*?["):
            found = fnmatch.filter(site_names(model), item)
            if not found:
                raise ValueError(f"pattern {item!r} matches no site; see site_names(model)")
            names += found
        else:
            names.append(_site(model, item).name)
    return list(dict.fromkeys(names))


def _install(site: _Site, edit: Callable[[Tensor], Tensor | None], writes: bool) -> list:
    """Register hooks that pass the site's activation to ``edit``; a returned tensor replaces it."""
    unflatten = len(site.features) == 2  # [batch, pos, head * d_head] <-> [batch, pos, head, d_head]

    def pre(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        y = edit(x.unflatten(-1, site.features) if unflatten else x)
        if y is None:
            return None
        y = y.flatten(-2) if unflatten else y
        return ((y, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    def post(_module, _args, out):
        if site.kind != "pattern":
            y = edit(out.unflatten(-1, site.features) if unflatten else out)
            return y.flatten(-2) if unflatten and y is not None else y
        if out[1] is None:
            raise ValueError(f"{site.name}: no attention probabilities: load the model with eager attention")
        edit(out[1])

    if site.kind == "in":
        return [site.module.register_forward_pre_hook(pre, with_kwargs=True)]
    if site.kind != "mid":
        return [site.module.register_forward_hook(post)]
    # resid_mid lives in a local variable of the Llama block: read it at the input of the post-attention
    # norm; to write it, change the attention output so that resid_pre + attn_out equals the new value
    # (resid_pre read at the input norm, i.e. after any patch of resid_pre itself).
    resid_pre: list[Tensor] = []

    def keep_pre(_module, args):
        resid_pre[:] = [args[0]]

    def write_mid(_module, _args, out):
        attn_out, *rest = out
        mid = resid_pre[0] + attn_out  # the very sum the block computes next
        new = edit(mid)
        if new is None:
            return None
        return (torch.where(new == mid, attn_out, new - resid_pre[0]), *rest)

    if not writes:
        return [site.module.register_forward_pre_hook(lambda _module, args: edit(args[0]))]
    return [
        site.layer.input_layernorm.register_forward_pre_hook(keep_pre),
        site.layer.self_attn.register_forward_hook(write_mid),
    ]


class _Hooks(contextlib.AbstractContextManager):
    """Installs hooks on ``__enter__`` and always removes them on ``__exit__`` (also after an exception).

    ``installers``: functions that register hooks and return their handles.
    """

    def __init__(self, installers: list[Callable[[], list]], result=None):
        self._installers, self._result, self._handles = installers, result, []

    def __enter__(self):
        try:
            for install in self._installers:
                self._handles += install()
        except BaseException:
            self.__exit__()
            raise
        return self._result

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _plan(items: Iterable[tuple[_Site, Callable, bool]], result=None) -> _Hooks:
    return _Hooks([functools.partial(_install, site, edit, writes) for site, edit, writes in items], result)


def capture(model: nn.Module, sites: str | Iterable[str], *, detach: bool = True) -> _Hooks:
    """Record activations at named sites during the forward passes run inside the ``with`` block.

    Args:
        model: a BERT-style encoder or Llama-style decoder; ``hook_pattern`` needs eager attention.
        sites: a site name, a glob pattern such as ``"blocks.*.hook_resid_post"``, or a list of them.
        detach: store detached tensors (``False`` keeps the graph, e.g. for gradients of a metric).

    Returns:
        a context manager yielding a :class:`Cache` ``{site: tensor}`` (shapes in the module docstring).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=8, num_attention_heads=2,
    ...                                      num_key_value_heads=1, intermediate_size=16, vocab_size=10))
    >>> with capture(llama, ["blocks.1.attn.hook_z", "blocks.*.hook_resid_post"]) as cache:
    ...     _ = llama(torch.tensor([[1, 2, 3]]))
    >>> cache["blocks.1.attn.hook_z"].shape  # [batch, pos, head, d_head]
    torch.Size([1, 3, 2, 4])
    >>> sorted(cache)
    ['blocks.0.hook_resid_post', 'blocks.1.attn.hook_z', 'blocks.1.hook_resid_post']
    """
    names = _expand(model, sites)
    if any(n.endswith("hook_pattern") for n in names) and model.config._attn_implementation != "eager":
        raise ValueError(
            f"hook_pattern needs eager attention, the model uses {model.config._attn_implementation!r}: load it with "
            "attn_implementation='eager' or call model.set_attn_implementation('eager')"
        )
    cache = Cache()

    def recorder(name: str):
        def record(x: Tensor) -> None:
            cache[name] = x.detach() if detach else x

        return record

    return _plan([(_site(model, n), recorder(n), False) for n in names], cache)


def run_with_cache(model: nn.Module, *args, sites: str | Iterable[str] | None = None, **kwargs):
    """Run ``model(*args, **kwargs)`` once and return ``(output, cache)``, as TransformerLens does.

    Args:
        model: a BERT-style encoder or Llama-style decoder.
        args, kwargs: passed to the model (e.g. ``model(**tokenizer(texts, return_tensors="pt"))``).
        sites: what to record (see :func:`capture`); ``None``: every site (``hook_pattern`` only if eager).

    Returns:
        ``(output, cache)``: the model's usual output and a ``{site: tensor}`` :class:`Cache`.
    """
    with capture(model, _expand(model, sites)) as cache:
        output = model(*args, **kwargs)
    return output, cache


def observe(model: nn.Module, sites: str | Iterable[str], fn: Callable[[str, Tensor], None]) -> _Hooks:
    """Call ``fn(site, activation)`` at named sites during the forward passes inside the ``with`` block.

    A read-only hook for what :func:`capture` cannot hold in memory, e.g. a running top-k of MLP
    activations over a corpus (Chapter 5). ``fn``'s return value is ignored; nothing is stored.

    Args:
        model: a BERT-style encoder or Llama-style decoder.
        sites: as in :func:`capture`.
        fn: called with the site name and its activation (shapes in the module docstring, not detached).

    Returns:
        a context manager (yields ``None``).
    """
    names = _expand(model, sites)
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    return _plan([(_site(model, n), functools.partial(_call_and_drop, fn, n), False) for n in names])


def _call_and_drop(fn: Callable[[str, Tensor], None], name: str, x: Tensor) -> None:
    fn(name, x)


class _Stop(Exception):
    """Raised by :func:`run_until`'s hook to end a forward pass once the last block of interest has run."""


def run_until(model: nn.Module, layer: int, *args, **kwargs) -> None:
    """Run ``model(*args, **kwargs)`` but stop right after block ``layer`` (later blocks are not needed).

    Hooks entered before (e.g. :func:`capture` or :func:`observe` of blocks up to ``layer``) see their
    activations as in a full pass; the model's output is not computed, so nothing is returned.

    Args:
        model: a BERT-style encoder or Llama-style decoder (a bare ``LlamaModel`` too).
        layer: the last block to run, ``0 <= layer < n_layers`` (negative counts from the end).
        args, kwargs: passed to the model.
    """
    arch, base = _architecture(model)
    blocks = base.encoder.layer if arch == "bert" else base.layers
    if not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"layer {layer} out of range: the model has blocks 0..{len(blocks) - 1}")
    if layer % len(blocks) == len(blocks) - 1:
        model(*args, **kwargs)
        return

    def stop(_module, _args, _output):
        raise _Stop

    with contextlib.suppress(_Stop), on_modules([(blocks[layer], "output", stop)]):
        model(*args, **kwargs)


_WHEN = {"output": "register_forward_hook", "input": "register_forward_pre_hook"}


def on_modules(items: Iterable[tuple[nn.Module, str, Callable]], *, result=None) -> _Hooks:
    """Plain torch hooks on modules that have no role name here, always removed on exit.

    For the parts of the book's other models (a timm ViT's attention dropout, the last layer of a
    recommender) and for places inside a block that no site names (BERT's embedding sum before its
    LayerNorm, the attention mask a layer receives). Role-named sites go through :func:`capture`,
    :func:`observe` and :func:`patch` instead.

    Args:
        items: ``(module, when, fn)`` triples; ``when`` is ``"output"`` (``fn(module, args, output)``; a
            returned value replaces the output), ``"input"`` (``fn(module, args)``; a returned tuple
            replaces the positional inputs) or ``"input_kwargs"`` (``fn(module, args, kwargs)``).
        result: what the ``with`` statement yields (e.g. the dict the hooks fill).

    Returns:
        a context manager yielding ``result``.

    >>> lin = nn.Linear(2, 3)
    >>> seen = []
    >>> with on_modules([(lin, "output", lambda _m, _a, out: seen.append(out.shape))]):
    ...     _ = lin(torch.zeros(4, 2))
    >>> seen, len(lin._forward_hooks)
    ([torch.Size([4, 3])], 0)
    """
    items = list(items)
    installers = []
    for item in items:
        if len(item) != 3 or not isinstance(item[0], nn.Module) or not callable(item[2]):
            raise ValueError(f"each item must be (torch.nn.Module, when, callable), got {item!r}")
        module, when, fn = item
        if when == "input_kwargs":
            installers.append(functools.partial(_register, module.register_forward_pre_hook, fn, with_kwargs=True))
        elif when in _WHEN:
            installers.append(functools.partial(_register, getattr(module, _WHEN[when]), fn))
        else:
            raise ValueError(f"when must be 'output', 'input' or 'input_kwargs', got {when!r}")
    return _Hooks(installers, result)


def _register(register: Callable, fn: Callable, **options) -> list:
    return [register(fn, **options)]


def capture_modules(modules: Mapping[str, nn.Module], *, detach: bool = True) -> _Hooks:
    """Record the output of any modules by a name of your choice (first element if a tuple).

    :func:`capture` by role name is the usual way; this one is for modules without a role name.

    Args:
        modules: ``{name: module}``.
        detach: store detached tensors.

    Returns:
        a context manager yielding ``{name: output}`` (a later forward pass overwrites an entry).

    >>> lin = nn.Linear(2, 3)
    >>> with capture_modules({"lin": lin}) as cache:
    ...     _ = lin(torch.zeros(1, 2))
    >>> tuple(cache["lin"].shape), len(lin._forward_hooks)
    ((1, 3), 0)
    """
    if not isinstance(modules, Mapping) or not all(isinstance(m, nn.Module) for m in modules.values()):
        raise ValueError("modules must be a mapping {name: torch.nn.Module}")
    cache: dict[str, Tensor] = {}

    def keeper(name: str):
        def keep(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            cache[name] = out.detach() if detach else out

        return keep

    return on_modules([(module, "output", keeper(name)) for name, module in modules.items()], result=cache)


def _indices(what: str, items: int | Sequence[int] | None) -> list[int] | None:
    """``None``, or a non-empty list of ints from an int or a sequence of them."""
    if items is None:
        return None
    try:
        out = [operator.index(items)]
    except TypeError:
        try:
            out = [operator.index(i) for i in items]
        except TypeError:
            out = []
    if not out:
        raise ValueError(f"{what} must be an int or a non-empty list of ints, got {items!r}")
    return out


def patch(
    model: nn.Module,
    site: str,
    value: Tensor | float | None = None,
    *,
    fn: Callable[[Tensor], Tensor] | None = None,
    positions: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
) -> _Hooks:
    """Overwrite the activation at one site, for the forward passes run inside the ``with`` block.

    Activation patching (Vig et al. 2020; Meng et al. 2022) in one line::

        with hooks.patch(model, "blocks.3.attn.hook_z", clean_cache["blocks.3.attn.hook_z"], heads=[5], positions=[-1]):
            out = model(**corrupted)

    Args:
        model: a BERT-style encoder or Llama-style decoder.
        site: a site name (not ``hook_pattern``; see :func:`site_names`).
        value: what to write: either an activation of the site (``[batch or 1, pos, *features]``, e.g. a
            cached clean run of the same length), from which the same positions/heads are taken; or a tensor
            that broadcasts to the patched slice ``[batch, len(positions), len(heads), d_head]`` (e.g. a
            scalar, or a ``[d_model]`` mean).
        fn: instead of ``value``, ``fn(activation) -> activation`` of the same shape; only the chosen
            positions/heads of its result are written.
        positions: index or list of indices along the pos axis (negative counts from the end); ``None``: all.
        heads: head index or list, only for sites with a head axis (``attn.hook_q/k/v/z``); ``None``: all heads.

    Returns:
        a context manager (yields ``None``); several patches stack (nested ``with`` or :func:`patches`).
        Hooks run in the order their blocks were entered, so a :func:`capture` entered inside a patch
        sees the patched value.

    >>> from transformers import BertConfig, BertModel
    >>> bert = BertModel(BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, intermediate_size=16))
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> _, clean = run_with_cache(bert.eval(), ids, sites="blocks.0.attn.hook_z")
    >>> with patch(bert, "blocks.0.attn.hook_z", clean["blocks.0.attn.hook_z"], heads=[1], positions=[-1]):
    ...     same = bert(ids).last_hidden_state  # patched with its own value: nothing changes
    >>> torch.allclose(same, bert(ids).last_hidden_state)
    True
    """
    where = _site(model, site)
    if where.kind == "pattern":
        raise ValueError(f"{site} can be captured but not patched; patch the heads' outputs, attn.hook_z, instead")
    if (value is None) == (fn is None):
        raise ValueError("give exactly one of value= (a tensor or number) or fn= (activation -> activation)")
    head_list = _indices("heads", heads)
    if head_list is not None:
        if len(where.features) != 2:
            raise ValueError(f"heads= applies only to sites with a head axis (attn.hook_q/k/v/z), not to {site!r}")
        n_heads = where.features[0]
        bad = [h for h in head_list if not 0 <= h < n_heads]
        if bad:
            raise ValueError(f"heads {bad} out of range: {site} has heads 0..{n_heads - 1}")
    pos_list = _indices("positions", positions)
    if value is not None:
        value = torch.as_tensor(value, dtype=torch.get_default_dtype() if isinstance(value, float | int) else None)
        if not torch.isfinite(value).all():
            raise ValueError(f"patch value for {site} has non-finite entries (NaN or inf)")
        _check_value(value, where, pos_list, head_list)
    return _plan([(where, _editor(where, value, fn, pos_list, head_list), True)])


def _check_value(value: Tensor, site: _Site, pos: list[int] | None, heads: list[int] | None) -> None:
    """Raise unless ``value`` is a full activation of ``site`` or broadcasts to its patched slice."""
    feats = site.features
    full = value.ndim == 2 + len(feats) and tuple(value.shape[2:]) == feats
    sliced = feats if heads is None else (len(heads), *feats[1:])
    trailing = value.shape[max(0, value.ndim - len(sliced)) :]
    try:  # batch and pos of a sliced value are checked during the forward pass
        fits = value.ndim <= 2 + len(feats) and torch.broadcast_shapes(trailing, sliced) == sliced
    except RuntimeError:
        fits = False
    if not (full or fits):
        raise ValueError(
            f"value of shape {tuple(value.shape)} does not fit {site.name}: give an activation of the site "
            f"[batch, pos, {', '.join(map(str, feats))}] or a tensor that broadcasts to the patched slice "
            f"[batch, {'pos' if pos is None else len(pos)}, {', '.join(map(str, sliced))}]"
        )


def _editor(site: _Site, value: Tensor | None, fn, positions: list[int] | None, heads: list[int] | None):
    """The edit a patch applies to an activation: a copy with ``value`` (or ``fn``'s result) in a slice."""

    def index_for(length: int) -> tuple:
        index: list = [slice(None), slice(None)]  # [batch, pos, (head)]
        if positions is not None:
            bad = [p for p in positions if not -length <= p < length]
            if bad:
                raise ValueError(f"{site.name}: positions {bad} out of range for a sequence of {length} tokens")
            index[1] = torch.tensor([p % length for p in positions])
        if heads is not None:  # pos and head index tensors broadcast to [len(positions), len(heads)]
            index[1] = index[1][:, None] if positions is not None else index[1]
            index.append(torch.tensor(heads))
        return tuple(index)

    def edit(x: Tensor) -> Tensor:
        index = index_for(x.shape[1])
        if fn is not None:
            source = fn(x)
            if not isinstance(source, Tensor) or source.shape != x.shape:
                raise ValueError(f"{site.name}: fn must return a tensor of the input's shape {tuple(x.shape)}")
            if not torch.isfinite(source).all():
                raise ValueError(f"{site.name}: fn returned non-finite values")
            source = source[index]
        else:
            source = value.to(device=x.device, dtype=x.dtype)
            if source.ndim == x.ndim and source.shape[2:] == x.shape[2:] and source.shape[0] in (1, x.shape[0]):
                if source.shape[1] == x.shape[1]:
                    source = source[index]  # a full activation: take the same positions and heads from it
                elif positions is None or source.shape[1] not in (1, len(positions)):
                    raise ValueError(
                        f"{site.name}: value has {source.shape[1]} positions but this run has {x.shape[1]}; for runs "
                        "of other lengths give the patched slice itself, e.g. value[:, [-1]] with positions=[-1]"
                    )
        patched = x.clone()
        try:
            patched[index] = source
        except RuntimeError as err:
            raise ValueError(f"{site.name}: value {tuple(source.shape)} does not fit {tuple(x.shape)}") from err
        return patched

    return edit


def ablate(
    model: nn.Module,
    site: str,
    *,
    heads: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
    value: str | Tensor = "zero",
    reference: Tensor | None = None,
) -> _Hooks:
    """Knock out a site (or some heads/positions of it) during the forward passes inside the block.

    Args:
        model, site, heads, positions: as in :func:`patch`.
        value: ``"zero"``; ``"mean"``: the mean of ``reference`` over its batch and pos axes; or a tensor
            (e.g. a mean activation of your own), written as :func:`patch` writes ``value``.
        reference: for ``"mean"``, activations of this site on a reference batch, ``[n, pos, *features]``;
            padding positions count too: to leave them out, pass ``value=mean_pool(acts, mask).mean(0)``.

    Returns:
        a context manager, as :func:`patch` (Meng et al. 2022 use a noised run, Wang et al. 2023 the mean).
    """
    if isinstance(value, str) and value == "mean":
        features = _site(model, site).features
        if reference is None or reference.ndim != 2 + len(features) or tuple(reference.shape[2:]) != features:
            raise ValueError(f"value='mean' needs reference=, activations of {site} [n, pos, {features}]")
        mean = reference.mean(dim=(0, 1))  # [*features]
        return patch(model, site, fn=lambda x: mean.to(x).expand_as(x), heads=heads, positions=positions)
    if isinstance(value, str) and value != "zero":
        raise ValueError(f"value must be 'zero', 'mean' or a tensor, got {value!r}")
    return patch(model, site, 0.0 if isinstance(value, str) else value, heads=heads, positions=positions)


@contextlib.contextmanager
def patches(items: Iterable[contextlib.AbstractContextManager]) -> Iterator[None]:
    """Enter several :func:`patch`/:func:`ablate` context managers at once (in order); exit them all."""
    with contextlib.ExitStack() as stack:
        for item in items:
            stack.enter_context(item)
        yield


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token vectors over the non-padding positions: the book's one sentence pooling.

    Same arithmetic as sentence-transformers' ``Pooling(pooling_mode="mean")`` (half-precision inputs are
    summed in float32), but a row whose mask is all zeros is an error instead of a silent zero vector.

    Args:
        hidden: token vectors, ``[batch, pos, d]``.
        attention_mask: ``[batch, pos]``, 1 for real tokens and 0 for padding.

    Returns:
        ``[batch, d]`` mean-pooled sentence vectors.

    >>> mean_pool(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]]), torch.tensor([[1, 1, 0]]))
    tensor([[2., 3.]])
    """
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [batch, pos, d], got shape {tuple(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2]:
        shape, got = tuple(hidden.shape[:2]), tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must be [batch, pos] = {shape} like hidden, got {got}")
    counts = attention_mask.sum(dim=1)
    if (counts == 0).any():
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"attention_mask rows {rows} are all zero: those sentences have no token to pool")
    accumulate = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    total = (hidden * mask).sum(dim=1, dtype=accumulate)  # [batch, d]
    return (total / mask.sum(dim=1, dtype=accumulate)).to(hidden.dtype)


__all__ = [
    "Cache", "ablate", "capture", "capture_modules", "mean_pool", "observe", "on_modules", "patch", "patches",
    "run_until", "run_with_cache", "site_names",
]
