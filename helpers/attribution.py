"""Token attributions for a text classifier on a BERT encoder, with Captum and attention.

One classifier, :class:`PooledClassifier` (encoder → mean pooling → linear head), and one verb,
:func:`token_attributions`, which explains the probability of a class with one of :data:`STUDY_METHODS`
and returns one score per token, ``[batch, pos]``, the shape of ``input_ids``. The gradient and
perturbation methods are Captum's (Kokhlikyan et al. 2020): ``LayerIntegratedGradients`` on the
word embeddings (Sundararajan et al. 2017), ``Saliency`` (Simonyan et al. 2014), ``InputXGradient``
(Shrikumar et al. 2017), ``FeatureAblation`` of one token at a time (occlusion, Zeiler & Fergus
2014) and ``Lime`` (Ribeiro et al. 2016, with LIME's text kernel and a ridge surrogate); raw
attention and rollout come from :mod:`helpers.attention` (Abnar & Zuidema 2020).

Introduced in nbs/07_attribution_faithfulness.ipynb.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from helpers import attention
from helpers.common import tensor_digest
from helpers.data import AustenSplit, austen_passages  # noqa: F401  (Chapter 7 imports them from here)

METHODS = ("integrated_gradients", "saliency", "input_x_gradient", "occlusion", "attention", "rollout", "random")
"""The attribution methods Chapter 7's page runs today (and Chapter 14's list)."""

STUDY_METHODS = ("integrated_gradients", "saliency", "input_x_gradient", "occlusion", "lime", "attention", "rollout",
                 "random")
"""Every method :func:`token_attributions` knows, in the order :func:`faithfulness_study` runs them."""


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
    lime_samples: int = 200,
    ig_rule: str = "gausslegendre",
):
    """Score every token's contribution to the probability of class ``target``.

    Args:
        classifier: a :class:`PooledClassifier` in eval mode.
        input_ids, attention_mask: [batch, pos].
        method: one of :data:`STUDY_METHODS`:
            ``integrated_gradients`` — Captum ``LayerIntegratedGradients`` on the word embeddings,
            from a baseline where every candidate token is ``baseline_id``; signed, and summing to
            ``p(x) - p(baseline)`` (completeness);
            ``saliency`` — L2 norm of the gradient of the probability w.r.t. the word embedding;
            ``input_x_gradient`` — embedding · gradient, summed over the embedding axis (signed);
            ``occlusion`` — ``p(x) - p(x with the token replaced by baseline_id)`` (Captum
            ``FeatureAblation``, one token at a time);
            ``attention`` — last-layer attention averaged over heads, read at the mean-pooled output;
            ``lime`` — the coefficients of a ridge regression (LIME's surrogate, alpha 1) of the
            probability on which candidate tokens are present, fitted to ``lime_samples`` random
            subsets (each token kept with probability 1/2, absent tokens replaced by
            ``baseline_id``), weighted by LIME's text kernel exp(-(100 d)^2 / (2 * 25^2)) on the cosine
            distance d between the subset and the full passage (Captum ``Lime``);
            ``rollout`` — attention rollout (residual 0.5) read the same way; both ignore ``target``;
            ``random`` — uniform noise (a baseline for the metrics).
        target: the explained class, an int or a [batch] tensor.
        candidates: [batch, pos] bool, the tokens to explain (default: all real tokens); the IG
            baseline replaces exactly these, and other tokens score 0.
        baseline_id: the token that stands for "absent" (``[PAD]``, id 0 in BERT's vocabulary).
        n_steps, internal_batch_size: integrated-gradients options (Captum's).
        ig_rule: Captum's quadrature for integrated gradients: ``"gausslegendre"`` (its default),
            ``"riemann_trapezoid"``, ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``.
        lime_samples: how many random subsets ``lime`` fits its surrogate to.
        seed: for ``random`` and ``lime``'s subsets.
        return_delta: for ``integrated_gradients``, also return Captum's convergence delta [batch]
            (sum of attributions minus ``p(x) - p(baseline)``).

    Returns:
        [batch, pos] float tensor (0 off the candidates), or ``(attributions, delta)``.
    """
    if method not in STUDY_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {STUDY_METHODS}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [batch, pos], got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if return_delta and method != "integrated_gradients":
        raise ValueError("return_delta is only defined for integrated_gradients")
    if method == "lime" and lime_samples < 2:
        raise ValueError(f"lime_samples must be at least 2, got {lime_samples}")
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
            method=ig_rule,
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
    elif method == "lime":
        scores = _lime(prob_from_embeds, _word_embeddings(classifier), input_ids, attention_mask, candidates,
                       target, baseline_id=baseline_id, n_samples=lime_samples, seed=seed)
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


def _lime(prob_from_embeds, embedding: nn.Embedding, input_ids: Tensor, attention_mask: Tensor,
          candidates: Tensor, target: Tensor, *, baseline_id: int, n_samples: int, seed: int) -> Tensor:  # fmt: skip
    """LIME on tokens: one surrogate per passage; scores [batch, pos] (0 off the candidates)."""
    import warnings

    from captum._utils.models.linear_model import SkLearnRidge
    from captum.attr import Lime

    scores = torch.zeros(input_ids.shape)
    with torch.no_grad():
        embeds = embedding(input_ids)  # [batch, pos, d]
        absent = embedding(torch.full_like(input_ids, baseline_id))
    for b in range(input_ids.shape[0]):
        cand = candidates[b]
        n_features = int(cand.sum()) + 1  # feature 0: every non-candidate position, never changed
        if n_features < 2:
            continue
        feature = torch.zeros(input_ids.shape[1], dtype=torch.long)
        feature[cand] = torch.arange(1, n_features)
        base = torch.where(cand[:, None], absent[b], embeds[b])  # non-candidates keep their embedding
        # one stream per passage, keyed by its tokens: a passage gets the same subsets in any batch
        key = int((input_ids[b] * torch.arange(1, input_ids.shape[1] + 1)).sum()) % 2**31
        generator = torch.Generator().manual_seed(seed * 1_000_003 + key)

        def perturb(original, n_features=n_features, generator=generator, **kwargs):
            return torch.bernoulli(torch.full((1, n_features), 0.5), generator=generator).long()

        def kernel(original, perturbed, sample, n_features=n_features, **kwargs):
            present = sample.float()[0, 1:]
            d = 1 - float(present.sum()) / (float(present.norm()) * (n_features - 1) ** 0.5 + 1e-12)
            return torch.exp(torch.tensor(-((100 * d) ** 2) / (2 * 25**2)))  # LimeTextExplainer's default

        lime = Lime(prob_from_embeds, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=kernel,
                    perturb_func=perturb)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # Captum warns about sklearn's sample weights
            coefs = lime.attribute(embeds[b:b + 1], baselines=base[None], target=int(target[b]),
                                   feature_mask=feature[None, :, None].expand_as(embeds[b:b + 1]),
                                   additional_forward_args=(attention_mask[b:b + 1],), n_samples=n_samples,
                                   perturbations_per_eval=50, return_input_shape=False)  # [1, n_features]
        scores[b, cand] = coefs[0, 1:].float()
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



def austen_finetuned(encoder: nn.Module, tokenizer, split: AustenSplit, *, titles: Sequence[str] = AUSTEN_TITLES,
                     words: int = 30, max_epochs: int = 10, batch_size: int = 32, lr: float = 1e-4,
                     head_lr: float = 3e-3, val_fraction: float = 0.1, seed: int = 0) -> PooledClassifier:  # fmt: skip
    """Chapter 7's second classifier: the last attention layer trained for the task, with a new head.

    Trains the query, key, value and output projections of the encoder's last attention layer (and
    its LayerNorm) together with a freshly initialised linear head, with Adam on cross-entropy, in
    eval mode (no dropout). The inputs of the last block are computed once (the five blocks below
    stay frozen), so an epoch costs one block. A stratified ``val_fraction`` of ``split.train`` is
    held out and never trained on; the epoch with the best validation accuracy is kept (``split.test``
    is never seen). The trained tensors (about 0.6 M numbers) are committed through
    :func:`helpers.common.cached_file`.

    Returns a new classifier (its own copy of the encoder) in eval mode with gradients off, with
    ``selected_epoch`` and ``history`` (validation accuracy per epoch, epoch 0 = untrained head).
    """
    import copy

    import torch.nn.functional as F

    from helpers import common, hooks
    from helpers.stats import split_indices

    labels = [label for _, label in split.train]
    recipe = {"model": "all-MiniLM-L6-v2", "titles": list(titles), "words": words, "n_train": len(split.train),
              "split_seed": 0, "max_epochs": max_epochs, "batch_size": batch_size, "lr": lr, "head_lr": head_lr,
              "val_fraction": val_fraction, "seed": seed, "trained": "last attention layer + new head", "version": 2}
    model = PooledClassifier(copy.deepcopy(encoder), len(titles))
    last = model.encoder.encoder.layer[-1]
    block = last.attention

    def build(path) -> None:
        common.set_seed(seed)
        val, train = split_indices(len(labels), fraction=val_fraction, seed=seed, labels=labels)
        enc = tokenizer([p for p, _ in split.train], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
        ids, am, y = enc["input_ids"], enc["attention_mask"], torch.tensor(labels)
        model.eval().requires_grad_(False)
        n_layers = len(model.encoder.encoder.layer)
        with torch.no_grad():  # the input of the last block, once
            hidden = torch.cat([hooks.run_with_cache(model.encoder, input_ids=ids[b], attention_mask=am[b],
                                                     sites=f"blocks.{n_layers - 1}.hook_resid_pre")[1]
                                [f"blocks.{n_layers - 1}.hook_resid_pre"] for b in torch.arange(len(ids)).split(128)])
        additive = (1.0 - am[:, None, None, :].float()) * torch.finfo(torch.float32).min  # eager BERT's mask

        def logits(rows):
            out = last(hidden[rows], attention_mask=additive[rows])
            out = out[0] if isinstance(out, tuple) else out
            w = am[rows, :, None].float()
            return model.head((out * w).sum(1) / w.sum(1))

        with torch.no_grad():  # the shortcut computes what the whole encoder computes
            full = model(input_ids=ids[:16], attention_mask=am[:16])
            torch.testing.assert_close(logits(torch.arange(16)), full, atol=1e-4, rtol=1e-4)

        def accuracy(rows) -> float:
            with torch.no_grad():
                return float((logits(torch.as_tensor(rows)).argmax(1) == y[rows]).float().mean())

        for p in list(block.parameters()) + list(model.head.parameters()):
            p.requires_grad_(True)
        opt = torch.optim.Adam([{"params": list(block.parameters()), "lr": lr},
                                {"params": list(model.head.parameters()), "lr": head_lr}])
        gen = torch.Generator().manual_seed(seed)
        history = {"val_accuracy": [accuracy(val)], "train_loss": [float("nan")]}
        best = (history["val_accuracy"][0], 0, copy.deepcopy({"block": block.state_dict(),
                                                              "head": model.head.state_dict()}))
        with common.torch_threads(common.free_cores()):
            for epoch in range(1, max_epochs + 1):
                order = torch.as_tensor(train)[torch.randperm(len(train), generator=gen)]
                losses = []
                for rows in order.split(batch_size):
                    opt.zero_grad()
                    loss = F.cross_entropy(logits(rows), y[rows])
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                history["val_accuracy"].append(accuracy(val))
                history["train_loss"].append(sum(losses) / len(losses))
                if history["val_accuracy"][-1] > best[0]:
                    best = (history["val_accuracy"][-1], epoch,
                            copy.deepcopy({"block": block.state_dict(), "head": model.head.state_dict()}))
        torch.save({**best[2], "epoch": best[1], "history": history}, path)

    path = common.cached_file(common.cache_dir("models", "ch7") / f"austen-attention-{common.content_hash(recipe)}.pt",
                              build, committed=True)
    state = torch.load(path, weights_only=True)
    block.load_state_dict(state["block"])
    model.head.load_state_dict(state["head"])
    model.selected_epoch, model.history = int(state["epoch"]), state["history"]
    return model.eval().requires_grad_(False)


def attribute_rows(model: PooledClassifier, ids: Tensor, am: Tensor, content: Tensor, target: Tensor, method: str, *,
                   pad_id: int = 0, batch: int = 8, **options) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """:func:`token_attributions` over many passages, batch by batch, each batch trimmed to its longest passage.

    Args:
        ids, am, content: [n, pos] token ids, attention mask and candidates; target: [n].
        options: passed on (``n_steps``, ``seed``, ``lime_samples``, ...).

    Returns:
        ``(scores [n, pos], delta [n] or None)``; the delta is integrated gradients' convergence delta.
    """
    n = ids.shape[0]
    lengths = am.sum(1)
    order = lengths.argsort(stable=True)
    out = torch.zeros(ids.shape)
    delta = torch.zeros(n) if method == "integrated_gradients" else None
    for rows in order.split(batch):
        w = int(lengths[rows].max())
        res = token_attributions(model, ids[rows, :w], am[rows, :w], method=method, target=target[rows],
                                 candidates=content[rows, :w], baseline_id=pad_id,
                                 return_delta=delta is not None, **options)
        if delta is not None:
            res, d = res
            delta[rows] = d.float()
        out[rows, :w] = res
    return out, delta


def randomised_copy(model: PooledClassifier, kind: str, seed: int) -> PooledClassifier:
    """Adebayo et al.'s model randomisation: a copy with the head (``kind="head"``) or every weight
    (``kind="model"``: encoder as at BERT's initialisation, normal(0, 0.02), LayerNorm reset) re-drawn."""
    import copy

    if kind not in ("head", "model"):
        raise ValueError(f"kind must be 'head' or 'model', got {kind!r}")
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out.head.weight.copy_(torch.randn(out.head.weight.shape, generator=gen) * float(model.head.weight.std()))
        out.head.bias.zero_()
        if kind == "model":
            for name, p in out.encoder.named_parameters():
                if "LayerNorm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return out.eval().requires_grad_(False)


def _gradient_times_difference(model: PooledClassifier, ids: Tensor, am: Tensor, content: Tensor, target: Tensor, *,
                               pad_id: int, batch: int = 32) -> Tensor:  # fmt: skip
    """(w - w') . grad f(w) per token [n, pos]: input x gradient measured from the [PAD] baseline w'."""
    emb = _word_embeddings(model)
    out = torch.zeros(ids.shape)
    for rows in torch.arange(ids.shape[0]).split(batch):
        w = emb(ids[rows]).detach().requires_grad_(True)
        w0 = emb(ids[rows].masked_fill(content[rows], pad_id)).detach()
        p = model(inputs_embeds=w, attention_mask=am[rows]).softmax(-1).gather(1, target[rows, None]).sum()
        (grad,) = torch.autograd.grad(p, w)
        out[rows] = ((w - w0) * grad).sum(-1).detach() * content[rows]
    return out


STUDY = {"n_steps": 50, "random_seeds": 5, "lime_samples": 100, "sanity_models": ["tuned"], "sanity_per_class": 8,
         "sanity_seeds": 3, "sanity_n_steps": 20, "convergence_models": ["tuned"], "convergence_passages": 8,
         "convergence_steps": [2, 4, 8, 16, 32, 64], "version": 1}
"""The protocol of :func:`faithfulness_study` (its hash names the committed results)."""


def faithfulness_study(models: dict[str, PooledClassifier], ids: Tensor, am: Tensor, content: Tensor, labels: Tensor,
                       *, pad_id: int = 0, protocol: dict = STUDY) -> dict:  # fmt: skip
    """Chapter 7's experiment: every method on every passage, ERASER's metrics, the sanity check.

    For each model (explaining its own predicted class):

    * ``scores/<method>`` [n, pos] for :data:`STUDY_METHODS`; ``random/<seed>`` for ``random_seeds``
      rankings; ``ig_delta`` and ``ig_gap`` [n] (convergence delta, ``f(x) - f(x')``);
      ``one_step`` [n, pos], the gradient at the input times ``x - x'`` (integrated gradients with a
      single right-hand step), which separates input × gradient's two differences from IG;
    * ``aopc/<name>/comprehensiveness`` and ``.../sufficiency`` [bin, n] for every score above and
      for the reversed input × gradient ranking (``neg_input_x_gradient``);
    * ``sanity/<kind>/<seed>/<method>`` [m]: per-passage Spearman between the trained and a
      :func:`randomised_copy`'s attributions, on the first ``sanity_per_class`` passages of each class
      (models in ``sanity_models``; integrated gradients with ``sanity_n_steps`` there);
    * ``convergence/<rule>/<steps>`` [k]: ``abs(delta) / abs(gap)`` of integrated gradients with Captum's
      Gauss-Legendre rule and the trapezoid Riemann sum on ``convergence_passages`` passages
      (models in ``convergence_models``).

    Args:
        models: name -> classifier; ids, am, content: [n, pos]; labels: [n] true classes (for the
        sanity subset). Returns a flat dict of tensors (``torch.save``-able, weights-only loadable).
    """
    from helpers import evaluation

    if ids.shape != am.shape or ids.shape != content.shape or labels.shape != (ids.shape[0],):
        raise ValueError(f"ids, am, content must share [n, pos] and labels be [n]; got {tuple(ids.shape)}, "
                         f"{tuple(am.shape)}, {tuple(content.shape)}, {tuple(labels.shape)}")
    p = protocol
    out: dict = {"ids": ids, "am": am, "content": content, "labels": labels}
    sanity_rows = torch.cat([(labels == c).nonzero().flatten()[: p["sanity_per_class"]] for c in labels.unique()])
    out["sanity_rows"] = sanity_rows
    for name, model in models.items():
        probs = model.predict_proba(ids, am)
        target = probs.argmax(1)
        out[f"{name}/probs"] = probs
        kw = dict(pad_id=pad_id, n_steps=p["n_steps"], lime_samples=p["lime_samples"], internal_batch_size=100)
        scores = {}
        for method in STUDY_METHODS:
            scores[method], d = attribute_rows(model, ids, am, content, target, method, **kw)
            if d is not None:
                out[f"{name}/ig_delta"] = d
        for s in range(1, p["random_seeds"]):
            scores[f"random/{s}"], _ = attribute_rows(model, ids, am, content, target, "random", seed=s, pad_id=pad_id)
        scores["one_step"] = _gradient_times_difference(model, ids, am, content, target, pad_id=pad_id)
        scores["neg_input_x_gradient"] = -scores["input_x_gradient"]
        base = ids.masked_fill(content, pad_id)
        out[f"{name}/ig_gap"] = (probs - model.predict_proba(base, am)).gather(1, target[:, None])[:, 0]
        for key, sc in scores.items():
            if key != "neg_input_x_gradient":
                out[f"{name}/scores/{key}"] = sc
            res = evaluation.aopc(model.predict_proba, ids, am, sc, target=target, candidates=content, pad_id=pad_id)
            out[f"{name}/aopc/{key}/comprehensiveness"] = res["comprehensiveness"].float()
            out[f"{name}/aopc/{key}/sufficiency"] = res["sufficiency"].float()
        r = sanity_rows
        for kind in ("head", "model") if name in p["sanity_models"] else ():
            for s in range(1, p["sanity_seeds"] + 1):
                model_r = randomised_copy(model, kind, seed=s)
                for method in STUDY_METHODS[:-1]:
                    sc, _ = attribute_rows(model_r, ids[r], am[r], content[r], target[r], method,
                                           **{**kw, "n_steps": p["sanity_n_steps"]})
                    rho = evaluation.rank_agreement(scores[method][r], sc, content[r])
                    out[f"{name}/sanity/{kind}/{s}/{method}"] = rho.float()
        if name not in p["convergence_models"]:
            continue
        k = torch.arange(p["convergence_passages"]) * (ids.shape[0] // p["convergence_passages"])
        gap = out[f"{name}/ig_gap"][k].abs()
        for rule in ("gausslegendre", "riemann_trapezoid"):
            for steps in p["convergence_steps"]:
                _, d = attribute_rows(model, ids[k], am[k], content[k], target[k], "integrated_gradients",
                                      pad_id=pad_id, n_steps=steps, ig_rule=rule)
                out[f"{name}/convergence/{rule}/{steps}"] = (d.abs() / gap).float()
    return out


def faithfulness_results(models: dict[str, PooledClassifier], ids: Tensor, am: Tensor, content: Tensor, labels: Tensor,
                         *, pad_id: int = 0, protocol: dict = STUDY) -> dict:  # fmt: skip
    """:func:`faithfulness_study`'s results, committed with the book (verified by SHA-256) and rebuilt when
    missing or altered; the file is named by a hash of the protocol, the models' weights and the passages.

    Rebuilding takes several CPU-minutes (integrated gradients, LIME and the sanity check on every passage).
    """
    from helpers import common

    key = {"protocol": protocol, "methods": list(STUDY_METHODS), "inputs": tensor_digest([ids, am, content, labels]),
           "models": {name: tensor_digest(list(m.state_dict().values())) for name, m in models.items()},
           "pad_id": pad_id}

    def build(path) -> None:
        with common.torch_threads(common.free_cores()):
            torch.save(faithfulness_study(models, ids, am, content, labels, pad_id=pad_id, protocol=protocol), path)

    path = common.cached_file(common.cache_dir("results", "ch7") / f"faithfulness-{common.content_hash(key)}.pt",
                              build, committed=True)
    return torch.load(path, weights_only=True)
