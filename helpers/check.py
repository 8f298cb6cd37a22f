"""Automatic checks for the book's exercises: the book's one place for them.

Each function takes the reader's implementation, runs it on known-answer and random cases against the
book's reference, prints ``pass`` or what differs with a hint, and returns ``True``/``False``. Checks run
on small synthetic inputs and tiny models built here, so they take well under a second and need no asset.

- :func:`patch_metric` — Chapter 6b, the normalised patching metric (``causal.normalised``);
- :func:`logit_lens` — Chapter 6b, the logit lens of one residual-stream vector (``causal.unembed``).
- :func:`topk_activation` — Chapter 6c, the TopK activation of a sparse autoencoder
  (``dictionaries.topk_activation``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _report(failures: list[str], hint: str) -> bool:
    if not failures:
        print("pass")
        return True
    print("not yet:\n- " + "\n- ".join(failures[:3]) + f"\nhint: {hint}")
    return False


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
        try:
            got = torch.as_tensor(fn(p.clone(), c.clone(), x.clone()), dtype=torch.float32)
        except Exception as err:  # noqa: BLE001 - the reader's code may raise anything
            failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
            continue
        want = normalised(p, clean=c, corrupted=x)
        if got.shape != want.shape or not torch.allclose(got, want, atol=1e-5):
            failures.append(f"{name}: expected {want.tolist()}, got {got.tolist()}")
    return _report(failures, "measure how far the patch moved the metric from the corrupted run, as a share of "
                             "the whole clean-minus-corrupted gap: (patched - corrupted) / (clean - corrupted)")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=32, vocab_size=50, tie_word_embeddings=True)
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
        cases = [("last layer (must equal the model's logits)", resid[-1], logits),
                 ("first layer", resid[0], unembed(model, resid[0])),
                 ("a scaled vector", 7 * resid[0], unembed(model, 7 * resid[0]))]
    failures = []
    for name, r, want in cases:
        try:
            with torch.no_grad():
                got = fn(model, r.clone())
        except Exception as err:  # noqa: BLE001
            failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
            continue
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            failures.append(f"{name}: largest difference {float((got - want).abs().max()):.3g} from the reference")
    return _report(failures, "apply the final RMSNorm (model.model.norm, with its gain) before the unembedding "
                             "(model.lm_head); the residual stream is never unembedded raw")


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
        try:
            got = fn(pre.clone(), k)
        except Exception as err:  # noqa: BLE001 - the reader's code may raise anything
            failures.append(f"{name}: your function raised {type(err).__name__}: {err}")
            continue
        want = reference(pre, k)
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            failures.append(f"{name}: expected a tensor of shape {tuple(want.shape)}, got {getattr(got, 'shape', got)}")
        elif not torch.allclose(got.float(), want, atol=1e-6):
            failures.append(f"{name}: expected {want.tolist()}, got {got.tolist()}")
    return _report(failures, "take pre.topk(k, dim=-1) (the largest values, not the largest absolute values), "
                             "put relu(values) back at their indices in a tensor of zeros (scatter)")


__all__ = ["logit_lens", "patch_metric", "topk_activation"]
