"""Token attributions for a text classifier on a BERT encoder, with Captum and attention.

One classifier, :class:`PooledClassifier` (encoder → mean pooling → linear head), and one verb,
:func:`token_attributions`, which explains the probability of a class with one of :data:`METHODS`
and returns one score per token, ``[batch, pos]``, the shape of ``input_ids``. The gradient and
perturbation methods are Captum's (Kokhlikyan et al. 2020): ``LayerIntegratedGradients`` on the
word embeddings (Sundararajan et al. 2017), ``Saliency`` (Simonyan et al. 2014), ``InputXGradient``
(Shrikumar et al. 2017) and ``FeatureAblation`` of one token at a time (occlusion, Zeiler & Fergus
2014); raw attention and rollout come from :mod:`helpers.attention` (Abnar & Zuidema 2020).

Introduced in nbs/07_attribution_faithfulness.ipynb.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from helpers import attention
from helpers.data import AustenSplit, austen_passages  # noqa: F401  (Chapter 7 imports them from here)

METHODS = ("integrated_gradients", "saliency", "input_x_gradient", "occlusion", "attention", "rollout", "random")
"""Attribution methods known to :func:`token_attributions`."""


class PooledClassifier(nn.Module):
    """A BERT-style encoder, mean pooling over real tokens, and a linear head.

    Args:
        encoder: a ``BertModel``-like module (``encoder(input_ids=..., inputs_embeds=..., attention_mask=...)``).
        n_classes: number of classes.

    ``forward(input_ids=None, attention_mask=None, inputs_embeds=None)`` returns logits [batch, class];
    :meth:`predict_proba` returns probabilities and is the ``predict`` that :mod:`helpers.evaluation` expects.
    """

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def pooled(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_attentions=False):
        out = self.encoder(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
        )
        weights = attention_mask.to(out.last_hidden_state.dtype)[..., None]  # [batch, pos, 1]
        pooled = (out.last_hidden_state * weights).sum(1) / weights.sum(1)  # [batch, d]
        return pooled, out

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None) -> Tensor:
        return self.head(self.pooled(input_ids, attention_mask, inputs_embeds)[0])

    @torch.no_grad()
    def predict_proba(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Class probabilities [batch, class]."""
        return self(input_ids=input_ids, attention_mask=attention_mask).softmax(-1)


def _word_embeddings(classifier: PooledClassifier) -> nn.Embedding:
    return classifier.encoder.get_input_embeddings()


def token_attributions(
    classifier: PooledClassifier,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    method: str,
    target,
    candidates: Tensor | None = None,
    baseline_id: int = 0,
    n_steps: int = 50,
    internal_batch_size: int | None = None,
    seed: int = 0,
    return_delta: bool = False,
):
    """Score every token's contribution to the probability of class ``target``.

    Args:
        classifier: a :class:`PooledClassifier` in eval mode.
        input_ids, attention_mask: [batch, pos].
        method: one of :data:`METHODS`:
            ``integrated_gradients`` — Captum ``LayerIntegratedGradients`` on the word embeddings,
            from a baseline where every candidate token is ``baseline_id``; signed, and summing to
            ``p(x) - p(baseline)`` (completeness);
            ``saliency`` — L2 norm of the gradient of the probability w.r.t. the word embedding;
            ``input_x_gradient`` — embedding · gradient, summed over the embedding axis (signed);
            ``occlusion`` — ``p(x) - p(x with the token replaced by baseline_id)`` (Captum
            ``FeatureAblation``, one token at a time);
            ``attention`` — last-layer attention averaged over heads, read at the mean-pooled output;
            ``rollout`` — attention rollout (residual 0.5) read the same way; both ignore ``target``;
            ``random`` — uniform noise (a baseline for the metrics).
        target: the explained class, an int or a [batch] tensor.
        candidates: [batch, pos] bool, the tokens to explain (default: all real tokens); the IG
            baseline replaces exactly these, and other tokens score 0.
        baseline_id: the token that stands for "absent" (``[PAD]``, id 0 in BERT's vocabulary).
        n_steps, internal_batch_size: integrated-gradients options (Captum's).
        seed: for ``random``.
        return_delta: for ``integrated_gradients``, also return Captum's convergence delta [batch]
            (sum of attributions minus ``p(x) - p(baseline)``).

    Returns:
        [batch, pos] float tensor (0 off the candidates), or ``(attributions, delta)``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [batch, pos], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if return_delta and method != "integrated_gradients":
        raise ValueError("return_delta is only defined for integrated_gradients")
    mask = attention_mask.bool()
    candidates = mask if candidates is None else candidates.bool() & mask
    if candidates.shape != input_ids.shape:
        raise ValueError(f"candidates must match input_ids {tuple(input_ids.shape)}, got {tuple(candidates.shape)}")
    target = torch.as_tensor(target, dtype=torch.long)
    if target.ndim == 0:
        target = target.expand(input_ids.shape[0])
    if target.shape != (input_ids.shape[0],):
        raise ValueError(f"target must be an int or a [batch] tensor, got shape {tuple(target.shape)}")
    delta = None

    def prob_from_ids(ids, am):
        return classifier(input_ids=ids, attention_mask=am).softmax(-1)

    def prob_from_embeds(embeds, am):
        return classifier(inputs_embeds=embeds, attention_mask=am).softmax(-1)

    if method == "integrated_gradients":
        from captum.attr import LayerIntegratedGradients

        lig = LayerIntegratedGradients(prob_from_ids, _word_embeddings(classifier))
        baseline = input_ids.masked_fill(candidates, baseline_id)
        attr, delta = lig.attribute(
            input_ids,
            baselines=baseline,
            additional_forward_args=(attention_mask,),
            target=target,
            n_steps=n_steps,
            internal_batch_size=internal_batch_size,
            return_convergence_delta=True,
        )
        scores = attr.sum(-1)  # [batch, pos]
    elif method in ("saliency", "input_x_gradient"):
        from captum.attr import InputXGradient, Saliency

        embeds = _word_embeddings(classifier)(input_ids).detach().requires_grad_(True)  # [batch, pos, d]
        if method == "saliency":
            grads = Saliency(prob_from_embeds).attribute(
                embeds, target=target, abs=False, additional_forward_args=(attention_mask,)
            )
            scores = grads.norm(dim=-1)
        else:
            attr = InputXGradient(prob_from_embeds).attribute(
                embeds, target=target, additional_forward_args=(attention_mask,)
            )
            scores = attr.sum(-1)
    elif method == "occlusion":
        from captum.attr import FeatureAblation

        embeds = _word_embeddings(classifier)(input_ids).detach()  # [batch, pos, d]
        base = _word_embeddings(classifier)(torch.full_like(input_ids, baseline_id)).detach()
        positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)  # [batch, pos]
        feature_mask = positions[..., None].expand_as(embeds).contiguous()
        with torch.no_grad():
            attr = FeatureAblation(prob_from_embeds).attribute(
                embeds,
                baselines=base,
                target=target,
                feature_mask=feature_mask,
                additional_forward_args=(attention_mask,),
                perturbations_per_eval=8,
            )
        scores = attr[..., 0]
    elif method in ("attention", "rollout"):
        with torch.no_grad():
            _, out = classifier.pooled(input_ids, attention_mask, output_attentions=True)
        attn = torch.stack(out.attentions) * mask[None, :, None, :, None]  # [layer, batch, head, q, k], padding rows 0
        if method == "attention":
            matrix = attn[-1].mean(1)  # [batch, q, k]
        else:
            matrix = attention.rollout(attn)
        scores = attention.read_out(matrix, mask, output="mean")
    else:
        generator = torch.Generator().manual_seed(seed)
        scores = torch.rand(input_ids.shape, generator=generator)
    scores = (scores.detach().float() * candidates).cpu()
    if return_delta:
        return scores, delta.detach().cpu()
    return scores


def pooled_features(
    encoder: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 64
) -> Tensor:
    """Mean-pooled last hidden states [n, d] of ``texts`` (frozen encoder, no gradients)."""
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty list of strings")
    device = next(encoder.parameters()).device
    parts = []
    with torch.inference_mode():
        for _, enc in attention.encode_batches(
            tokenizer, texts, batch_size=batch_size, max_length=max_length, device=device
        ):
            out = encoder(**enc).last_hidden_state
            weights = enc["attention_mask"][..., None].to(out.dtype)
            parts.append(((out * weights).sum(1) / weights.sum(1)).cpu())
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# The Austen attribution task of Chapter 7 (reused by Chapter 14): passages and the trained head
# ---------------------------------------------------------------------------------------------

AUSTEN_TITLES = ("Sense & Sensibility", "Pride & Prejudice", "Emma", "Persuasion")
"""The four novels the chapter's classifier tells apart (labels 0-3 in this order)."""


def austen_classifier(encoder: nn.Module, tokenizer, split: AustenSplit, *, titles: Sequence[str] = AUSTEN_TITLES,
                      words: int = 30, steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-4,
                      seed: int = 0) -> PooledClassifier:  # fmt: skip
    """Chapter 7's classifier: the frozen encoder, mean pooling and a linear head trained on ``split.train``.

    The head is trained once (full-batch Adam on the pooled features) and committed with the book
    through :func:`helpers.common.cached_file`; the recipe's hash names the file, so a changed recipe
    trains a new head. Returns the classifier in eval mode with gradients off.

    Introduced in nbs/07_attribution_faithfulness.ipynb; reused by nbs/14_evaluating_interpretability.ipynb.
    """
    import torch.nn.functional as F

    from helpers import common

    n_train = len(split.train) // len(titles)
    recipe = {"model": "all-MiniLM-L6-v2", "titles": list(titles), "words": words, "n_train": n_train,
              "split_seed": 0, "steps": steps, "lr": lr, "weight_decay": weight_decay, "seed": seed, "version": 1}
    classifier = PooledClassifier(encoder, len(titles))

    def build_head(path):
        common.set_seed(seed)
        X = pooled_features(encoder, tokenizer, [p for p, _ in split.train], max_length=64)  # [n, d]
        y = torch.tensor([label for _, label in split.train])
        head = nn.Linear(X.shape[1], len(titles))
        opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(X), y).backward()
            opt.step()
        torch.save(head.state_dict(), path)

    path = common.cached_file(common.cache_dir("models", "ch7") / f"austen-head-{common.content_hash(recipe)}.pt",
                              build_head, committed=True)
    classifier.head.load_state_dict(torch.load(path))
    return classifier.eval().requires_grad_(False)
