"""Continual adaptation of the CLIP-style model to a stream of tasks, and the ZSCL metrics (chapter 12).

A pretrained multimodal model meets new domains and new classes one task at a time; it may not keep
all the data, and it should not lose what it knew (zero-shot ability, earlier tasks). This module
holds:

* the **task stream**, made in :mod:`helpers.data` (:func:`helpers.data.make_stream`): shifted
  Fashion-MNIST domains (inverted, edge maps, rotated) and scikit-learn's handwritten digits upscaled
  to 28 x 28 as new classes, plus a held-out **retention set** (:func:`helpers.data.retention_set`:
  original Fashion-MNIST test images, held-out prompt templates) that no method trains on. It is
  drawn from the *pre-training* distribution, so it measures retention of what the model was trained
  on, not zero-shot transfer to new data;
* a model wrapper (:class:`ContinualClip`) around chapter 10's :class:`helpers.clip.FashionClip`
  that can also carry per-task linear heads and learned prompt context vectors;
* the **methods**, all with one signature ``method(model, task, *, state) -> model`` (:data:`METHODS`):
  zero-shot, sequential fine-tuning, linear probe, prompt learning (CoOp, and CoCoOp's image-conditioned
  prompts, :func:`cocoop`), WiSE-FT, LwF, ZSCL-style feature distillation and a small replay buffer, plus
  WiSE-FT and ZSCL with the settings of ZSCL's reference scripts (:data:`PAPER_SETTINGS`);
* the two distillation losses as functions (:func:`lwf_loss`, :func:`zscl_loss`);
* the ZSCL **metrics** of an accuracy matrix (:func:`stream_metrics`: Transfer, Avg, Last, forgetting);
* yes/no **questions through prompts**, answered zero-shot by sums of class probabilities (:func:`answer_questions`);
* a small **compositional VQA** task on the LiT model: a frozen answer head (:class:`AnswerHead`, :func:`vqa_heads`)
  reads region features of 2 x 2 scenes, and :func:`lit_vqa_runs` re-reads them after every step of the stream;
* committed multi-seed studies: every method over several seeds (:func:`seed_runs`) and fine-tuning
  learning curves on a validation part of each task (:func:`learning_curves`).

Only the image tower, the two projections, linear heads or context vectors are ever trained: the
MiniLM text tower stays frozen, so the MiniLM embedding of every prompt is computed once.

Tensors: images ``[N, 1, 28, 28]`` normalised as in :mod:`helpers.data`; class embeddings ``[C, d]``.
Introduced in nbs/12_continual_adaptation.ipynb.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from helpers import clip, common, data, stats

# ---------------------------------------------------------------------------------------------
# The model: FashionClip + optional per-task heads + optional prompt context
# ---------------------------------------------------------------------------------------------


class PromptContext(nn.Module):
    """CoOp's learnable context (Zhou et al. 2022): ``M`` vectors that replace a prompt's template words.

    The prompt ``[CLS] v_1 ... v_M <class name> . [SEP]`` is fed to the frozen MiniLM text tower
    through ``inputs_embeds``; ``v_1..v_M`` start as the word embeddings of ``init`` ("a photo of a"),
    so before training the learned prompt equals the hand-written one.
    """

    def __init__(self, text: clip.MiniLMText, *, init: str = "a photo of a", class_specific: bool = False):
        super().__init__()
        encoder, self._tokenizer = text.encoder()  # the same frozen encoder as the model's text tower
        self._encoder = [encoder]  # a list keeps it out of state_dict
        ids = self._tokenizer(init, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        with torch.no_grad():
            vectors = self.encoder.get_input_embeddings()(ids).clone()  # [M, 384]
        self.vectors = nn.Parameter(vectors)
        self.class_specific = class_specific
        self.class_vectors = nn.ParameterDict()  # CoOp's class-specific context (CSC): one [M, 384] per class name

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    def add_classes(self, class_names: Sequence[str]) -> list[nn.Parameter]:
        """Class-specific context: the vectors of ``class_names``, created from the shared ones if new."""
        if not self.class_specific:
            raise ValueError("add_classes needs a class-specific context (class_specific=True)")
        for name in class_names:
            if self._key(name) not in self.class_vectors:
                self.class_vectors[self._key(name)] = nn.Parameter(self.vectors.detach().clone())
        return [self.class_vectors[self._key(n)] for n in class_names]

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def __deepcopy__(self, memo: dict) -> PromptContext:
        # copies share the frozen encoder (22M parameters); only the context vectors are copied
        new = type(self).__new__(type(self))
        nn.Module.__init__(new)
        new._encoder, new._tokenizer = self._encoder, self._tokenizer
        new.vectors = nn.Parameter(self.vectors.detach().clone(), requires_grad=self.vectors.requires_grad)
        new.class_specific = getattr(self, "class_specific", False)
        new.class_vectors = nn.ParameterDict({k: nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad)
                                              for k, v in getattr(self, "class_vectors", {}).items()})
        return new

    def _word_embeddings(self, class_names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Input embeddings ``[C, pos, 384]`` of ``[CLS] x .. x <name> . [SEP]`` and their mask ``[C, pos]``."""
        texts = [" ".join(["x"] * len(self.vectors)) + f" {name}." for name in class_names]
        enc = self._tokenizer(texts, padding=True, return_tensors="pt")
        return self.encoder.get_input_embeddings()(enc["input_ids"]), enc["attention_mask"]

    def _encode(self, embeds: Tensor, context: Tensor, attention_mask: Tensor) -> Tensor:
        """Mean-pooled MiniLM output ``[P, 384]`` of prompts ``[P, pos, 384]`` whose context is ``[P, M, 384]``."""
        m = context.shape[1]
        embeds = torch.cat([embeds[:, :1], context, embeds[:, 1 + m :]], 1)
        hidden = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask[..., None].float()
        return (hidden * mask).sum(1) / mask.sum(1)

    def forward(self, class_names: Sequence[str]) -> Tensor:
        """MiniLM mean-pooled embeddings of the learned prompts, ``[C, 384]`` (differentiable in ``vectors``)."""
        embeds, attention_mask = self._word_embeddings(class_names)  # [C, pos, 384], [C, pos]
        if self.class_specific:  # each class its own context (the shared vectors for a class never trained)
            context = torch.stack([self.class_vectors[self._key(n)] if self._key(n) in self.class_vectors
                                   else self.vectors for n in class_names])
        else:
            context = self.vectors.expand(len(class_names), -1, -1)
        return self._encode(embeds, context, attention_mask)


class ConditionalPromptContext(PromptContext):
    """CoCoOp's context (Zhou et al. 2022, CVPR): CoOp's vectors shifted by a meta-net of each image's embedding.

    The prompt of class ``c`` for image ``x`` is ``[CLS] v_1 + π(x) ... v_M + π(x) <class name> . [SEP]``,
    with ``π = Linear(d, d // 16) → ReLU → Linear(d // 16, 384)`` read from the L2-normalised image
    embedding ``[N, d]`` (the reference code's meta-net, ``vis_dim // 16`` hidden units). The meta-net's
    last layer starts at zero (the reference keeps PyTorch's default initialisation), so before training
    every image's prompts are CoOp's, i.e. the hand-written "a photo of a <class>.".

    Args:
        text: the model's MiniLM text tower (its frozen encoder is shared, not copied).
        image_dim: ``d``, the size of the image embedding the meta-net reads.
        init: the words whose embeddings start the context vectors.
        hidden: the meta-net's hidden width (default ``max(1, d // 16)``).

    >>> ctx = ConditionalPromptContext(clip.text_tower(), image_dim=32)
    >>> [tuple(p.shape) for p in ctx.meta_net.parameters()], bool(ctx.meta_net[-1].weight.abs().sum() == 0)
    ([(2, 32), (2,), (384, 2), (384,)], True)
    """

    def __init__(self, text: clip.MiniLMText, *, image_dim: int, init: str = "a photo of a",
                 hidden: int | None = None):
        if not isinstance(image_dim, int) or image_dim < 1:
            raise ValueError(f"image_dim must be a positive int (the image embedding's size), got {image_dim!r}")
        hidden = max(1, image_dim // 16) if hidden is None else hidden
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int (the meta-net's width), got {hidden!r}")
        super().__init__(text, init=init)
        self.meta_net = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(), nn.Linear(hidden, self.vectors.shape[1]))
        nn.init.zeros_(self.meta_net[-1].weight)
        nn.init.zeros_(self.meta_net[-1].bias)

    def __deepcopy__(self, memo: dict) -> ConditionalPromptContext:
        new = super().__deepcopy__(memo)  # shares the frozen encoder, copies the vectors
        new.meta_net = copy.deepcopy(self.meta_net, memo)
        return new

    def conditioned(self, class_names: Sequence[str], image_emb: Tensor) -> Tensor:
        """MiniLM embeddings of every image's prompts, ``[N, C, 384]``: ``N × C`` prompts through the text tower.

        Args:
            class_names: the ``C`` class names.
            image_emb: ``[N, d]`` L2-normalised image embeddings (differentiable in the vectors and the meta-net).
        """
        d = self.meta_net[0].in_features
        if image_emb.ndim != 2 or image_emb.shape[1] != d:
            raise ValueError(f"image_emb must be [N, {d}] image embeddings, got shape {tuple(image_emb.shape)}")
        if len(class_names) == 0:
            raise ValueError("no class names: pass at least one")
        n, c = len(image_emb), len(class_names)
        embeds, attention_mask = self._word_embeddings(class_names)  # [C, pos, 384], [C, pos]
        context = self.vectors + self.meta_net(image_emb)[:, None]  # [N, M, 384]: one shift π(x) for every vector
        pooled = self._encode(embeds.repeat(n, 1, 1), context.repeat_interleave(c, 0),
                              attention_mask.repeat(n, 1))  # [N * C, 384], image-major
        return pooled.reshape(n, c, -1)


class ContinualClip(nn.Module):
    """A :class:`helpers.clip.FashionClip` plus what the methods add: per-task linear heads, a prompt context.

    :meth:`class_embeddings` gives the ``[C, d]`` classifier of a task: its linear head if one was
    trained, else its own prompt context if one was learned for it, else the shared learned prompt
    context if there is one, else the prompt ensemble of the task's templates through the (trainable)
    text projection. A shared *conditional* context (CoCoOp, :class:`ConditionalPromptContext`) gives
    each image its own classifier: :meth:`similarities` is the one path for both cases.
    """

    def __init__(self, model: clip.FashionClip):
        super().__init__()
        self.clip = model
        self.heads = nn.ParameterDict()
        self.context: PromptContext | None = None
        self.task_contexts = nn.ModuleDict()  # per-task prompt contexts, looked up by task name

    @property
    def logit_scale(self) -> float:
        return self.clip.logit_scale

    def image_embeddings(self, images: Tensor) -> Tensor:
        """``[N, d]`` normalised, differentiable (use :meth:`encode_images` for evaluation)."""
        return F.normalize(self.clip.image_features(images), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: Tensor, *, batch_size: int = 1000) -> Tensor:
        return self.clip.encode_image(images, batch_size=batch_size)

    def prompt_embeddings(self, names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Hand-written prompt ensemble, ``[C, d]`` normalised, differentiable in the text projection."""
        texts = [t.format(c) for c in names for t in templates]
        minilm = self.clip.text(texts)  # [C * T, 384], frozen and cached
        emb = F.normalize(self.clip.text_features(minilm), dim=-1).reshape(len(names), len(templates), -1)
        return F.normalize(emb.mean(1), dim=-1)

    def conditioned(self, task: data.Task) -> bool:
        """Whether ``task``'s classifier depends on the image (a shared CoCoOp context, no head or task context)."""
        return (isinstance(self.context, ConditionalPromptContext) and task.name not in self.heads
                and task.name not in self.task_contexts)

    def class_embeddings(self, task: data.Task) -> Tensor:
        if self.conditioned(task):
            raise ValueError(f"task {task.name!r} is classified by image-conditioned prompts (CoCoOp): "
                             "use similarities(image_emb, task) or image_class_embeddings(image_emb, task)")
        if task.name in self.heads:
            return F.normalize(self.heads[task.name], dim=-1)
        if task.name in self.task_contexts:
            return F.normalize(self.clip.text_features(self.task_contexts[task.name](task.class_names)), dim=-1)
        if self.context is not None:
            return F.normalize(self.clip.text_features(self.context(task.class_names)), dim=-1)
        return self.prompt_embeddings(task.class_names, task.templates)

    def image_class_embeddings(self, image_emb: Tensor, task: data.Task, *, batch_size: int = 1024) -> Tensor:
        """Each image's class embeddings through the conditional context, ``[N, C, d]`` normalised.

        Args:
            image_emb: ``[N, d]`` normalised image embeddings (:meth:`image_embeddings`, :meth:`encode_images`).
            batch_size: at most this many prompts (images × classes, at least one image) per text-tower call.
        """
        if not isinstance(self.context, ConditionalPromptContext):
            raise ValueError("image_class_embeddings needs a conditional context (CoCoOp); use class_embeddings")
        n_images = max(1, batch_size // len(task.class_names))
        minilm = torch.cat([self.context.conditioned(task.class_names, image_emb[i : i + n_images])
                            for i in range(0, len(image_emb), n_images)])  # [N, C, 384]
        return F.normalize(self.clip.text_features(minilm), dim=-1)

    def similarities(self, image_emb: Tensor, task: data.Task) -> Tensor:
        """``cos(image, class)``, ``[N, C]``, from normalised image embeddings ``[N, d]`` (differentiable).

        With a conditional context (CoCoOp) every image is compared with its own prompts, ``N × C`` of them.
        """
        if image_emb.ndim != 2:
            raise ValueError(f"image_emb must be [N, d] image embeddings, got shape {tuple(image_emb.shape)}")
        if self.conditioned(task):
            return torch.einsum("nd,ncd->nc", image_emb, self.image_class_embeddings(image_emb, task))
        return image_emb @ self.class_embeddings(task).T

    def logits(self, images: Tensor, task: data.Task) -> Tensor:
        """``logit_scale * cos(image, class)``, ``[N, C]`` (differentiable)."""
        return self.logit_scale * self.similarities(self.image_embeddings(images), task)


def n_parameters(module: nn.Module | None, *, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------
# WiSE-FT: weight-space interpolation
# ---------------------------------------------------------------------------------------------


def wise_ft(zero_shot: nn.Module, fine_tuned: nn.Module, alpha: float) -> nn.Module:
    """WiSE-FT (Wortsman et al. 2022): ``θ(α) = (1 - α) θ_zero-shot + α θ_fine-tuned``, a new model.

    Args:
        zero_shot, fine_tuned: two models of the same architecture (same state-dict keys and shapes).
        alpha: in ``[0, 1]``; 0 returns a copy of ``zero_shot``, 1 a copy of ``fine_tuned`` (exactly).

    Returns:
        a deep copy of ``fine_tuned`` carrying the interpolated weights (non-float buffers from ``fine_tuned``).

    >>> a, b = nn.Linear(2, 1), nn.Linear(2, 1)
    >>> torch.equal(wise_ft(a, b, 0.0).weight, a.weight), torch.equal(wise_ft(a, b, 1.0).weight, b.weight)
    (True, True)
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0: zero-shot weights, 1: fine-tuned weights), got {alpha}")
    za, fb = zero_shot.state_dict(), fine_tuned.state_dict()
    if za.keys() != fb.keys() or any(za[k].shape != fb[k].shape for k in za):
        raise ValueError("the two models must have the same architecture (same state-dict keys and shapes)")
    out = copy.deepcopy(fine_tuned)
    mixed = {}
    for k, b in fb.items():
        a = za[k]
        if alpha == 0.0:
            mixed[k] = a.clone()
        elif alpha == 1.0 or not b.is_floating_point():
            mixed[k] = b.clone()
        else:
            mixed[k] = (1 - alpha) * a + alpha * b
    out.load_state_dict(mixed)
    return out


# ---------------------------------------------------------------------------------------------
# Replay buffer
# ---------------------------------------------------------------------------------------------


class ReplayBuffer:
    """At most ``size`` stored examples ``(image, label, task index)``, split evenly between the tasks seen.

    When a task is added, every task's share is cut to ``size // n_tasks`` (a random subset, fixed by
    the generator) and the new task fills its share.
    """

    def __init__(self, size: int, *, seed: int = 0):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"buffer size must be a positive int, got {size!r}")
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        self.images = torch.zeros(0, 1, data.IMAGE_SIZE, data.IMAGE_SIZE)
        self.labels = torch.zeros(0, dtype=torch.long)
        self.task_ids = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, images: Tensor, labels: Tensor, task_id: int) -> None:
        if len(images) == 0 or len(images) != len(labels):
            raise ValueError("add a non-empty batch with one label per image")
        n_tasks = len(set(self.task_ids.tolist()) | {task_id})
        share = self.size // n_tasks
        keep = []
        for t in sorted(set(self.task_ids.tolist())):
            rows = torch.nonzero(self.task_ids == t)[:, 0]
            keep.append(rows[torch.randperm(len(rows), generator=self.generator)[:share]])
        new = torch.randperm(len(images), generator=self.generator)[: self.size - sum(len(k) for k in keep)]
        keep_rows = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
        self.images = torch.cat([self.images[keep_rows], images[new]])
        self.labels = torch.cat([self.labels[keep_rows], labels[new]])
        self.task_ids = torch.cat([self.task_ids[keep_rows], torch.full((len(new),), task_id)])

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """``n`` random stored ``(images, labels, task ids)`` (fewer when the buffer holds fewer)."""
        rows = torch.randperm(len(self), generator=self.generator)[:n]
        return self.images[rows], self.labels[rows], self.task_ids[rows]


# ---------------------------------------------------------------------------------------------
# Methods: method(model, task, *, state) -> model
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepRecipe:
    """Optimisation settings shared by every method (per task of the stream)."""

    steps: int = 50
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    probe_steps: int = 100
    probe_lr: float = 1e-2
    coop_steps: int = 25
    coop_lr: float = 2e-3
    alpha: float = 0.5  # WiSE-FT
    distil_weight: float = 1.0  # LwF and ZSCL
    temperature: float = 2.0  # LwF
    n_reference: int = 1000  # ZSCL images
    n_reference_texts: int = 100  # ZSCL texts
    reference_batch: int = 32
    buffer_size: int = 200  # replay, images
    replay_batch: int = 32
    seed: int = 0
    version: int = 1


@dataclasses.dataclass
class State:
    """What a method may keep between tasks (besides the model it returns).

    ``initial``: the pre-trained model (WiSE-FT's anchor, ZSCL's teacher); ``seen``: the tasks trained
    on so far (this one excluded while it trains); ``buffer``: the replay memory; ``reference``: ZSCL's
    unlabelled images ``[n, 1, 28, 28]`` and texts; ``step``: the index of the current task.
    """

    initial: ContinualClip
    recipe: StepRecipe = StepRecipe()
    seen: list[data.Task] = dataclasses.field(default_factory=list)
    buffer: ReplayBuffer | None = None
    reference_images: Tensor | None = None
    reference_texts: list[str] | None = None
    step: int = 0


def _check(model: ContinualClip, task: data.Task, state: State) -> None:
    if not isinstance(model, ContinualClip):
        raise ValueError(f"model must be a ContinualClip (wrap a FashionClip), got {type(model).__name__}")
    if not isinstance(task, data.Task):
        raise ValueError(f"task must be a Task, got {type(task).__name__}")
    if not isinstance(state, State):
        raise ValueError(f"state must be a State, got {type(state).__name__}")


def _tower_parameters(model: ContinualClip) -> list[nn.Parameter]:
    """Image tower + both projections (the learned temperature and the MiniLM text tower stay fixed)."""
    c = model.clip
    return [*c.image_tower.parameters(), *c.image_proj.parameters(), *c.text_proj.parameters()]


def _batches(n: int, recipe: StepRecipe, generator: torch.Generator, steps: int) -> list[Tensor]:
    out: list[Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=generator)
        out += [order[i : i + recipe.batch_size] for i in range(0, n, recipe.batch_size)]
    return out[:steps]


def _fine_tune(model: ContinualClip, task: data.Task, state: State,
               extra: Callable[[ContinualClip, Tensor, torch.Generator], Tensor] | None = None, *,
               label_smoothing: float = 0.0, l2: float = 0.0, we_every: int = 0, steps: int | None = None,
               callback: Callable[[int, ContinualClip], None] | None = None) -> ContinualClip:
    """Cross-entropy over the task's class prompts, image tower + projections trained (+ an extra loss).

    Args:
        extra: ``extra(student, images, generator) -> loss`` added to the cross-entropy at every step.
        label_smoothing: of the cross-entropy (ZSCL's scripts use 0.2).
        l2: weight of ``Σ (θ - θ_start)²`` over the trained parameters, ``θ_start`` the model the task
            starts from (ZSCL's scripts: 1).
        we_every: weight ensembling as ZSCL's ``merge_we``: every ``we_every`` steps (counting from the
            first), the running average (started at ``θ_start``, equal weights) absorbs the current
            weights; the task returns the average. 0 turns it off.
        steps: overrides ``state.recipe.steps``.
        callback: ``callback(steps_done, model)`` after every step (learning curves; ``model`` is in
            training mode and must not be changed).
    """
    recipe = state.recipe
    steps = recipe.steps if steps is None else int(steps)
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    params = _tower_parameters(model)
    for p in params:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in params] if (l2 > 0 or we_every > 0) else []
    average, n_average = [a.clone() for a in start] if we_every > 0 else [], 0
    optimiser = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed * 1000 + state.step)
    model.train()
    for i, batch in enumerate(_batches(len(task.x_train), recipe, generator, steps)):
        x = task.x_train[batch]
        loss = F.cross_entropy(model.logits(x, task), task.y_train[batch], label_smoothing=label_smoothing)
        if extra is not None:
            loss = loss + extra(model, x, generator)
        if l2 > 0:
            loss = loss + l2 * sum(((p - a) ** 2).sum() for p, a in zip(params, start, strict=True))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if we_every > 0 and i % we_every == 0:
            n_average += 1
            with torch.no_grad():
                for a, p in zip(average, params, strict=True):
                    a.mul_(n_average).add_(p).div_(n_average + 1)
        if callback is not None:
            callback(i + 1, model)
    if we_every > 0:
        with torch.no_grad():
            for a, p in zip(average, params, strict=True):
                p.copy_(a)
    return model.eval().requires_grad_(False)


def zero_shot(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """No training: the pre-trained model, prompts only (the reference every method is compared with)."""
    _check(model, task, state)
    return model


def finetune(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """Sequential full fine-tuning of the image tower and both projections on each task in turn."""
    _check(model, task, state)
    return _fine_tune(model, task, state)


def linear_probe(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """A linear head per task on frozen image embeddings, initialised from the task's prompt embeddings.

    Full-batch Adam on cross-entropy; the tower never changes, so earlier tasks keep their heads
    (at test time the task is known: heads are looked up by task name; unseen tasks use prompts).
    """
    _check(model, task, state)
    recipe = state.recipe
    model = copy.deepcopy(model)
    features = model.encode_images(task.x_train)  # [N, d], frozen
    with torch.no_grad():
        init = model.prompt_embeddings(task.class_names, task.templates)
    weight = nn.Parameter(init.clone())
    optimiser = torch.optim.Adam([weight], lr=recipe.probe_lr)
    for _ in range(recipe.probe_steps):
        loss = F.cross_entropy(model.logit_scale * features @ F.normalize(weight, dim=-1).T, task.y_train)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    model.heads[task.name] = nn.Parameter(weight.detach(), requires_grad=False)
    return model


def coop(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """Prompt learning (CoOp, Zhou et al. 2022): only the shared context vectors are trained, task after task.

    Images are embedded once by the frozen tower; each step re-encodes the task's learned prompts
    through the frozen MiniLM and takes a cross-entropy step on a batch of image embeddings.
    """
    return _coop(model, task, state)


def coop_class_specific(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """CoOp with class-specific context (CSC): each class name has its own vectors, shared by tasks that use it."""
    return _coop(model, task, state, class_specific=True)


def coop_per_task(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """CoOp with one context per task, kept after the task (like the linear probe, the task must be known at test)."""
    return _coop(model, task, state, per_task=True)


COCOOP_BATCH = 1
"""Images per CoCoOp step (the reference configs' batch size): each step encodes ``COCOOP_BATCH × C`` prompts."""


def cocoop(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """Conditional prompt learning (CoCoOp, Zhou et al. 2022, CVPR): CoOp's shared context plus a meta-net.

    Only the context vectors and the meta-net (:class:`ConditionalPromptContext`, last layer zero at the
    start) are trained, task after task, for ``recipe.coop_steps`` Adam steps at ``recipe.coop_lr`` on
    :data:`COCOOP_BATCH` image(s) per step (the reference: SGD, batch 1, 10 epochs of a few shots).
    Every image gets its own prompts, so training and evaluation encode one prompt per (image, class) pair.
    """
    return _coop(model, task, state, conditional=True)


def _coop(model: ContinualClip, task: data.Task, state: State, *, class_specific: bool = False,
          per_task: bool = False, conditional: bool = False) -> ContinualClip:
    _check(model, task, state)
    recipe = state.recipe
    model = copy.deepcopy(model)
    if per_task:
        model.task_contexts[task.name] = PromptContext(model.clip.text)
        context = model.task_contexts[task.name]
    else:
        if model.context is None and conditional:
            model.context = ConditionalPromptContext(model.clip.text, image_dim=model.clip.image_proj.out_features)
        elif model.context is None:
            model.context = PromptContext(model.clip.text, class_specific=class_specific)
        if conditional != isinstance(model.context, ConditionalPromptContext):
            raise ValueError("the model already carries a prompt context of another kind (CoOp vs CoCoOp)")
        context = model.context
    model.requires_grad_(False)
    trained = context.add_classes(task.class_names) if class_specific else [context.vectors]
    trained += list(context.meta_net.parameters()) if conditional else []
    for p in trained:
        p.requires_grad_(True)
    features = model.encode_images(task.x_train)  # [N, d]
    optimiser = torch.optim.Adam(trained, lr=recipe.coop_lr)
    generator = torch.Generator().manual_seed(recipe.seed * 1000 + state.step)
    wide = dataclasses.replace(recipe, batch_size=COCOOP_BATCH if conditional else 4 * recipe.batch_size)
    for batch in _batches(len(features), wide, generator, recipe.coop_steps):  # CoOp: the image side is free
        if conditional:  # every image its own prompts: [B, C] through B × C prompts
            logits = model.logit_scale * model.similarities(features[batch], task)
        else:
            text = F.normalize(model.clip.text_features(context(task.class_names)), dim=-1)
            logits = model.logit_scale * features[batch] @ text.T
        loss = F.cross_entropy(logits, task.y_train[batch])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    for p in trained:
        p.requires_grad_(False)
    return model


def wise_ft_method(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """Fine-tune on the task, then interpolate with the *initial* model: ``θ_t = (1-α) θ_0 + α FT(θ_{t-1})``."""
    _check(model, task, state)
    return wise_ft(state.initial, _fine_tune(model, task, state), state.recipe.alpha)


def _kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² KL(softmax(teacher/T) ‖ softmax(student/T))``, mean over rows."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def lwf_loss(student: ContinualClip, teacher: ContinualClip, images: Tensor,
             old_prompts: Sequence[tuple[Sequence[str], Sequence[str]]], *, temperature: float = 2.0,
             teacher_text: Tensor | None = None) -> Tensor:
    """LwF's distillation term: ``T² KL(p_teacher^T ‖ p_student^T)`` over the old classes, on ``images``.

    Args:
        student, teacher: the model being trained and the frozen previous model (no gradient reaches it).
        images: ``[B, 1, 28, 28]``, the current task's images.
        old_prompts: ``(class names, templates)`` of every old class set; their prompt embeddings,
            concatenated, are the ``C_old`` classes of both softmaxes.
        temperature: ``T``.
        teacher_text: the teacher's ``[C_old, d]`` prompt embeddings, when already computed.

    Returns:
        a scalar, 0 when the student equals the teacher; differentiable in the student only.
    """
    with torch.no_grad():
        if teacher_text is None:
            teacher_text = torch.cat([teacher.prompt_embeddings(n, t) for n, t in old_prompts])
        target = teacher.logit_scale * teacher.image_embeddings(images) @ teacher_text.T  # [B, C_old]
    text = torch.cat([student.prompt_embeddings(n, t) for n, t in old_prompts])
    logits = student.logit_scale * student.image_embeddings(images) @ text.T
    return _kl(logits, target, temperature)


def zscl_loss(student: ContinualClip, teacher: ContinualClip, images: Tensor, minilm: Tensor, *,
              temperature: float = 1.0, student_text: bool = True) -> tuple[Tensor, Tensor]:
    """ZSCL's two distillation terms on reference images and texts: image→text and text→image.

    With ``S`` = scaled cosines ``[B, R]`` between reference images and reference texts, the teacher's
    ``S_0`` (frozen, no gradient) and the student's ``S_θ``: ``(T² KL(softmax_rows(S_0/T) ‖
    softmax_rows(S_θ/T)), the same over columns)``.

    Args:
        images: ``[B, 1, 28, 28]`` reference images; minilm: ``[R, 384]`` MiniLM embeddings of the texts.
        temperature: ``T`` (ZSCL's scripts: 2).
        student_text: True (the book's default): the student scores its images against its *own* text
            embeddings, so the text projection is distilled too; False (ZSCL's reference code): against
            the *teacher's* text embeddings, so only the image side is distilled.

    Returns:
        ``(image→text, text→image)`` scalars, both 0 when the student equals the teacher.
    """
    with torch.no_grad():
        teacher_text = F.normalize(teacher.clip.text_features(minilm), dim=-1)
        target = teacher.logit_scale * teacher.image_embeddings(images) @ teacher_text.T  # [B, R]
    text = F.normalize(student.clip.text_features(minilm), dim=-1) if student_text else teacher_text
    logits = student.logit_scale * student.image_embeddings(images) @ text.T
    return _kl(logits, target, temperature), _kl(logits.T, target.T, temperature)


def lwf(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """Learning without Forgetting (Li & Hoiem 2017): fine-tune + distil the previous model's old-class outputs.

    "Old classes" are the classes of the pre-training head (Fashion-MNIST, training templates) and
    of every task seen so far; the previous model's softened probabilities over them, on the
    *current* task's images, are the targets (temperature ``recipe.temperature``).
    """
    _check(model, task, state)
    teacher = copy.deepcopy(model).eval()
    old = {(tuple(data.CLASS_TEXT), tuple(data.TRAIN_TEMPLATES))}
    old |= {(t.class_names, t.templates) for t in state.seen}
    old_prompts = [(list(n), list(t)) for n, t in sorted(old)]
    with torch.no_grad():
        teacher_text = torch.cat([teacher.prompt_embeddings(n, t) for n, t in old_prompts])  # [C_old, d]

    def distil(student: ContinualClip, x: Tensor, _g: torch.Generator) -> Tensor:
        return state.recipe.distil_weight * lwf_loss(student, teacher, x, old_prompts,
                                                     temperature=state.recipe.temperature, teacher_text=teacher_text)

    return _fine_tune(model, task, state, distil)


def _zscl_inputs(model: ContinualClip, task, state) -> tuple:
    """ZSCL's teacher (the initial model), the recipe and the reference texts' MiniLM embeddings ``[R, 384]``."""
    _check(model, task, state)
    if state.reference_images is None or not state.reference_texts:
        raise ValueError("ZSCL needs state.reference_images and state.reference_texts "
                         "(see helpers.data.reference_images())")
    with torch.no_grad():
        minilm = model.clip.text(state.reference_texts)  # [R, 384]
    return state.initial, state.recipe, minilm


def zscl(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """ZSCL-style distillation (Zheng et al. 2023) in feature space, on a reference set, from the *initial* model.

    Each step adds, on a batch of reference images (pre-training domain, no labels) and the
    reference texts (captions of the pre-training data), the KL divergence between the initial and
    the current model's image→text and text→image similarity distributions (:func:`zscl_loss`, ``T = 1``,
    averaged). An ablation of ZSCL: distillation only, without its weight ensembling, L2 penalty and
    label smoothing; :func:`zscl_paper` is the full method.
    """
    teacher, recipe, minilm = _zscl_inputs(model, task, state)

    def distil(student: ContinualClip, _x: Tensor, g: torch.Generator) -> Tensor:
        rows = torch.randint(len(state.reference_images), (recipe.reference_batch,), generator=g)
        image_to_text, text_to_image = zscl_loss(student, teacher, state.reference_images[rows], minilm)
        return recipe.distil_weight * (image_to_text + text_to_image) / 2

    return _fine_tune(model, task, state, distil)


def _zscl_prepare(state: State) -> None:
    """ZSCL's reference set: images and captions drawn once, before the stream (``state.recipe``'s sizes)."""
    recipe = state.recipe
    state.reference_images = data.reference_images(recipe.n_reference, seed=recipe.seed)
    table = data.caption_table()
    pick = torch.randperm(len(table), generator=torch.Generator().manual_seed(recipe.seed))
    state.reference_texts = [table[i] for i in pick[: recipe.n_reference_texts].tolist()]


zscl.prepare = _zscl_prepare


PAPER_SETTINGS = {"label_smoothing": 0.2, "temperature": 2.0, "l2": 1.0, "we_snapshots": 10, "alpha": 0.8}
"""The settings of ZSCL's reference scripts (Thunderbeee/ZSCL, ``mtil/scripts/ZSCL.sh`` and
``WiSE_finetune.sh``, defaults in ``mtil/src/args.py``): label smoothing 0.2; distillation temperature
``T = 2`` (image and text losses, weight 1 each, the student's images scored against the *teacher's*
text embeddings); an L2 penalty of weight 1 on ``Σ (θ - θ_start)²``; weight ensembling every 100 of
1,000 iterations (here: ``we_snapshots`` snapshots per task); WiSE-FT blends each new model with the
*previous task's* model, ``0.8 θ_new + 0.2 θ_previous``."""


def wise_ft_paper(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """WiSE-FT as in ZSCL's scripts: fine-tune (label smoothing 0.2), then blend with the *previous* model.

    ``θ_t = (1 - α) θ_{t-1} + α FT(θ_{t-1})`` with ``α = 0.8`` (:data:`PAPER_SETTINGS`), where the
    book's :func:`wise_ft_method` blends with the initial model ``θ_0`` at ``recipe.alpha``.
    """
    _check(model, task, state)
    tuned = _fine_tune(model, task, state, label_smoothing=PAPER_SETTINGS["label_smoothing"])
    return wise_ft(model, tuned, PAPER_SETTINGS["alpha"])


def zscl_paper(model: ContinualClip, task: data.Task, *, state: State,
               more: Callable[[ContinualClip, Tensor, torch.Generator], Tensor] | None = None) -> ContinualClip:
    """ZSCL with the settings of its reference scripts (:data:`PAPER_SETTINGS`): the full method.

    Distillation from the initial model on the reference set (image and text terms summed, ``T = 2``,
    the student's reference images scored against the teacher's text embeddings), label smoothing 0.2,
    an L2 penalty to the model the task starts from, and weight ensembling over the task's training.
    ``more(student, images, generator)``, if given, is one more loss term (self-training, below).
    """
    teacher, recipe, minilm = _zscl_inputs(model, task, state)

    def distil(student: ContinualClip, x: Tensor, g: torch.Generator) -> Tensor:
        rows = torch.randint(len(state.reference_images), (recipe.reference_batch,), generator=g)
        image_to_text, text_to_image = zscl_loss(student, teacher, state.reference_images[rows], minilm,
                                                 temperature=PAPER_SETTINGS["temperature"], student_text=False)
        loss = recipe.distil_weight * (image_to_text + text_to_image)
        return loss if more is None else loss + more(student, x, g)

    every = max(1, recipe.steps // PAPER_SETTINGS["we_snapshots"])
    return _fine_tune(model, task, state, distil, label_smoothing=PAPER_SETTINGS["label_smoothing"],
                      l2=PAPER_SETTINGS["l2"], we_every=every)


zscl_paper.prepare = _zscl_prepare


def _off_domain_prepare(state: State) -> None:
    """ZSCL's reference set from outside the pre-training data, as the paper's (ImageNet images, CC captions).

    Images: :func:`helpers.data.photo_patches` (grey crops of photos); texts: passages of
    ``n_reference_texts`` // 6 + 1 twelve-word passages per Austen novel, ``n_reference_texts`` of them kept.
    """
    recipe = state.recipe
    state.reference_images = data.photo_patches(recipe.n_reference, seed=recipe.seed)
    per_novel = recipe.n_reference_texts // 6 + 1
    passages = data.austen_passages(words=12, n_train=per_novel, n_test=1, seed=recipe.seed).train
    pick = torch.randperm(len(passages), generator=torch.Generator().manual_seed(recipe.seed))
    state.reference_texts = [passages[i][0] for i in pick[: recipe.n_reference_texts].tolist()]


def zscl_paper_off_domain(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """:func:`zscl_paper` with an off-domain reference set (:func:`_off_domain_prepare`): photo crops, Austen text."""
    return zscl_paper(model, task, state=state)


zscl_paper_off_domain.prepare = _off_domain_prepare


# --- few labels: each task's first FEW_LABELS training images keep their labels, the rest are unlabelled ---

FEW_LABELS = 200
"""Labelled training images per task in the few-labels study (the other images of the task come unlabelled)."""
PSEUDO_THRESHOLD = 0.95
"""Self-training keeps an unlabelled image when the model's largest class probability reaches this (FixMatch's 0.95)."""


def few_labels(task: data.Task, n_labelled: int | None = None) -> tuple[data.Task, Tensor]:
    """``(the task with only its first n_labelled training images, the other training images [U, 1, 28, 28])``.

    ``n_labelled`` defaults to :data:`FEW_LABELS`, read when called.
    """
    n_labelled = FEW_LABELS if n_labelled is None else n_labelled
    if not 1 <= n_labelled < len(task.x_train):
        raise ValueError(f"n_labelled must be in [1, {len(task.x_train)}), got {n_labelled}")
    labelled = data.Task(task.name, task.class_names, task.templates, task.x_train[:n_labelled],
                         task.y_train[:n_labelled], task.x_test, task.y_test)
    return labelled, task.x_train[n_labelled:]


@torch.no_grad()
def _confident(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """``(keep [B] bool: largest class probability >= threshold, argmax class [B])`` of ``[B, C]`` logits."""
    confidence, target = logits.softmax(-1).max(-1)
    return confidence >= threshold, target


def pseudo_label_loss(student: ContinualClip, images: Tensor, task: data.Task, *,
                      threshold: float = PSEUDO_THRESHOLD) -> tuple[Tensor, float]:
    """Self-training on unlabelled images: cross-entropy to the student's own confident predictions.

    The targets are the argmax classes of the student's current predictions, without gradient
    (Lee 2013; FixMatch's confidence mask, Sohn et al. 2020, without its augmentations); images whose
    largest probability is below ``threshold`` contribute nothing.

    Returns:
        ``(loss summed over the kept images / len(images), fraction kept)``; the loss is differentiable in
        the student only.
    """
    logits = student.logits(images, task)  # [B, C]
    keep, target = _confident(logits, threshold)
    if not keep.any():
        return logits.sum() * 0, 0.0
    return F.cross_entropy(logits[keep], target[keep], reduction="sum") / len(images), float(keep.float().mean())


def _self_training(unlabelled: Tensor, task: data.Task, recipe: StepRecipe):
    def term(student: ContinualClip, _x: Tensor, g: torch.Generator) -> Tensor:
        rows = torch.randint(len(unlabelled), (recipe.batch_size,), generator=g)
        return pseudo_label_loss(student, unlabelled[rows], task, threshold=PSEUDO_THRESHOLD)[0]

    return term


def finetune_few(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """Fine-tuning on the task's :data:`FEW_LABELS` labelled images only (the unlabelled ones are ignored)."""
    _check(model, task, state)
    return _fine_tune(model, few_labels(task)[0], state)


def self_training_few(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """Fine-tuning on the labelled images plus self-training on the unlabelled ones (a batch of each per step)."""
    _check(model, task, state)
    labelled, unlabelled = few_labels(task)
    return _fine_tune(model, labelled, state, _self_training(unlabelled, labelled, state.recipe))


def zscl_paper_few(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """:func:`zscl_paper` on the task's labelled images only."""
    return zscl_paper(model, few_labels(task)[0], state=state)


def zscl_paper_self_training_few(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """:func:`zscl_paper` on the labelled images plus self-training on the unlabelled ones."""
    labelled, unlabelled = few_labels(task)
    return zscl_paper(model, labelled, state=state, more=_self_training(unlabelled, labelled, state.recipe))


zscl_paper_few.prepare = zscl_paper_self_training_few.prepare = _zscl_prepare


def replay(model: ContinualClip, task: data.Task, *, state: State) -> ContinualClip:
    """Fine-tune with a small replay buffer: each step adds a batch of stored earlier-task examples.

    Stored examples are scored against their own task's class prompts. After the task, its
    examples join ``state.buffer`` (created with ``recipe.buffer_size`` images if missing).
    """
    _check(model, task, state)
    recipe = state.recipe
    if state.buffer is None:
        state.buffer = ReplayBuffer(recipe.buffer_size, seed=recipe.seed)
    buffer, seen = state.buffer, list(state.seen)

    def rehearse(student: ContinualClip, _x: Tensor, _g: torch.Generator) -> Tensor:
        if len(buffer) == 0:
            return torch.zeros(())
        images, labels, task_ids = buffer.sample(recipe.replay_batch)
        emb = student.image_embeddings(images)
        losses = []
        for t in task_ids.unique().tolist():
            rows = task_ids == t
            logits = student.logit_scale * emb[rows] @ student.class_embeddings(seen[t]).T
            losses.append(F.cross_entropy(logits, labels[rows], reduction="sum"))
        return torch.stack(losses).sum() / len(labels)

    out = _fine_tune(model, task, state, rehearse)
    buffer.add(task.x_train, task.y_train, len(seen))
    return out


METHODS: dict[str, Callable[..., ContinualClip]] = {
    "zero-shot": zero_shot,
    "fine-tune": finetune,
    "linear probe": linear_probe,
    "CoOp": coop,
    "WiSE-FT": wise_ft_method,
    "LwF": lwf,
    "ZSCL": zscl,
    "replay": replay,
    "WiSE-FT (paper)": wise_ft_paper,
    "ZSCL (paper)": zscl_paper,
}
"""Every method of the chapter, by display name, each ``method(model, task, *, state) -> model``.

"WiSE-FT" and "ZSCL" are the book's ablations (blend with ``θ_0`` at ``recipe.alpha``; distillation
only, ``T = 1``); "WiSE-FT (paper)" and "ZSCL (paper)" use ZSCL's reference settings (:data:`PAPER_SETTINGS`)."""

# Whole model copies a method keeps besides the model it trains: WiSE-FT's anchor, LwF's and ZSCL's teacher;
# the paper's ZSCL also keeps the L2 anchor and the running average of its weight ensembling.
for _fn in (wise_ft_method, lwf, zscl, wise_ft_paper):
    _fn.model_copies = 1
for _fn in (zscl_paper, zscl_paper_off_domain, zscl_paper_few, zscl_paper_self_training_few):
    _fn.model_copies = 3

MORE_METHODS: dict[str, Callable[..., ContinualClip]] = {
    "ZSCL (paper, off-domain)": zscl_paper_off_domain,
    "CoOp (class-specific)": coop_class_specific,
    "CoOp (per task)": coop_per_task,
    "CoCoOp": cocoop,
    "fine-tune (few labels)": finetune_few,
    "self-training (few labels)": self_training_few,
    "ZSCL (paper, few labels)": zscl_paper_few,
    "ZSCL (paper) + self-training (few labels)": zscl_paper_self_training_few,
}
"""Methods of the chapter's second setting only (the LiT model, :func:`lit_runs`)."""
ALL_METHODS = {**METHODS, **MORE_METHODS}


# ---------------------------------------------------------------------------------------------
# Evaluation: accuracy matrix, ZSCL metrics, visual questions
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def stream_metrics(matrix: np.ndarray | Tensor) -> dict[str, float]:
    """ZSCL's metrics of a ``[T, T]`` accuracy matrix, ``matrix[t, j]`` = accuracy on task ``j`` after step ``t``.

    * Transfer: for each task ``j >= 2``, the mean accuracy *before* it is trained on (rows ``t < j``,
      the upper triangle), then the mean over those tasks;
    * Avg: the mean of each task's column over all steps, then over tasks (= the matrix mean);
    * Last: the mean of the last row;
    * Forgetting (Chaudhry et al. 2018): for tasks ``j < T``, the best accuracy reached after it was
      learned (rows ``j .. T-1``) minus the final one, averaged.

    >>> m = stream_metrics([[0.9, 0.2], [0.6, 0.8]])
    >>> [round(m[k], 3) for k in ("transfer", "avg", "last", "forgetting")]
    [0.2, 0.625, 0.7, 0.3]
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"matrix must be square [steps, tasks] with at least one task, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("matrix contains NaN or infinite accuracies")
    n = len(a)
    transfer = float(np.mean([a[:j, j].mean() for j in range(1, n)])) if n > 1 else float("nan")
    forgetting = float(np.mean([a[j:n - 1, j].max() - a[-1, j] for j in range(n - 1)])) if n > 1 else 0.0
    return {"transfer": transfer, "avg": float(a.mean(0).mean()), "last": float(a[-1].mean()),
            "forgetting": forgetting}


@dataclasses.dataclass(frozen=True)
class Question:
    """A yes/no question about an image, answered by comparing two sets of prompts.

    ``p(yes) = Σ_yes softmax(s · cos(image, prompt))`` over the yes and no prompts together; the
    answer is yes when ``p(yes) > 1/2``. ``truth(labels, images)`` gives the correct ``[N]`` bools.
    """

    text: str
    yes: tuple[str, ...]
    no: tuple[str, ...]
    truth: Callable[[Tensor, Tensor], Tensor]


def _group(indices: Sequence[int]) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda labels, _images: torch.isin(labels, torch.tensor(list(indices)))


def _dark(labels: Tensor, images: Tensor) -> Tensor:
    return data.pixel_attributes(images, labels)["tone"] == 0


def _class_prompts(indices: Sequence[int], template: str = "a photo of a {}.") -> tuple[str, ...]:
    return tuple(template.format(data.CLASS_TEXT[i]) for i in indices)


_FOOTWEAR, _SLEEVES, _BAG = (5, 7, 9), (0, 2, 4, 6), (8,)
_REST = lambda group: [i for i in range(10) if i not in group]  # noqa: E731

QUESTIONS = (
    Question("Is this footwear?", _class_prompts(_FOOTWEAR), _class_prompts(_REST(_FOOTWEAR)), _group(_FOOTWEAR)),
    Question("Does it have sleeves?", _class_prompts(_SLEEVES), _class_prompts(_REST(_SLEEVES)), _group(_SLEEVES)),
    Question("Is this a bag?", _class_prompts(_BAG), _class_prompts(_REST(_BAG)), _group(_BAG)),
    Question("Is it dark?", tuple(f"a photo of a dark {c}." for c in data.CLASS_TEXT),
             tuple(f"a photo of a {tone} {c}." for tone in ("grey", "light") for c in data.CLASS_TEXT), _dark),
)
"""The chapter's questions: three by class-group aggregation, one about a pixel attribute (tone)."""

NEGATION_QUESTIONS = (
    Question("Is this footwear?", ("a photo of footwear.",), ("a photo of something that is not footwear.",),
             _group(_FOOTWEAR)),
    Question("Does it have sleeves?", ("a photo of a garment with sleeves.",),
             ("a photo of a garment without sleeves.",), _group(_SLEEVES)),
    Question("Is this a bag?", ("a photo of a bag.",), ("a photo of something that is not a bag.",), _group(_BAG)),
    Question("Is it dark?", ("a photo of a dark item.",), ("a photo of an item that is not dark.",), _dark),
)
"""The same questions asked with one positive and one negated prompt (the naive way)."""


@torch.no_grad()
def answer_questions(model: ContinualClip, images: Tensor, questions: Sequence[Question] = QUESTIONS, *,
                     image_emb: Tensor | None = None) -> Tensor:
    """``p(yes)`` for every image and question, ``[N, Q]``, from the model's image tower and hand prompts.

    Args:
        model: a :class:`ContinualClip` (heads and learned context are not used: questions are prompts).
        images: ``[N, 1, 28, 28]``.
        questions: :class:`Question` objects.
        image_emb: precomputed ``encode_images(images)`` ``[N, d]``, to save a forward pass.
    """
    if len(questions) == 0:
        raise ValueError("no questions: pass at least one Question")
    emb = model.encode_images(images) if image_emb is None else image_emb
    out = []
    for q in questions:
        prompts = list(q.yes) + list(q.no)
        text = F.normalize(model.clip.text_features(model.clip.text(prompts)), dim=-1)
        probs = (model.logit_scale * emb @ text.T).softmax(-1)  # [N, yes + no]
        out.append(probs[:, : len(q.yes)].sum(1))
    return torch.stack(out, 1)


def balanced_accuracy(p_yes: Tensor, truth: Tensor) -> float:
    """Mean of the true-positive and true-negative rates of ``p_yes > 1/2`` (0.5 = chance, whatever the base rate).

    >>> round(balanced_accuracy(torch.tensor([0.9, 0.2, 0.8, 0.1]), torch.tensor([True, False, False, False])), 3)
    0.833
    """
    truth = truth.bool()
    if truth.all() or not truth.any():
        raise ValueError("balanced accuracy needs both yes and no examples among the images")
    said = p_yes > 0.5
    return float(((said & truth).sum() / truth.sum() + (~said & ~truth).sum() / (~truth).sum()) / 2)


def question_scores(model: ContinualClip, task: data.Task, questions: Sequence[Question] = QUESTIONS, *,
                    image_emb: Tensor | None = None) -> list[float]:
    """Balanced accuracy of each question on ``task``'s test images (labels and pixels give the truth)."""
    p = answer_questions(model, task.x_test, questions, image_emb=image_emb)
    return [balanced_accuracy(p[:, k], q.truth(task.y_test, task.x_test)) for k, q in enumerate(questions)]


# ---------------------------------------------------------------------------------------------
# Running a method over the stream (cached)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: ContinualClip, tasks: Sequence[data.Task], zero_shot_task: data.Task,
             questions: Sequence[Question] = QUESTIONS, *, image_emb: list[Tensor] | None = None,
             extra_tasks: Sequence[data.Task] = ()) -> dict:
    """Accuracy on every task, on the retention set (``"zero_shot"``), and the questions' balanced accuracy on it.

    Args:
        image_emb: the test-image embeddings of ``[*tasks, zero_shot_task, *extra_tasks]`` when already
            known (a frozen tower); they are computed otherwise and returned under ``"image_emb"``.
        extra_tasks: more sets never trained on (e.g. :func:`helpers.data.held_out_domain`); their
            accuracies are returned under ``"extra"``.
    """
    everything = [*tasks, zero_shot_task, *extra_tasks]
    if image_emb is None:
        image_emb = [model.encode_images(t.x_test) for t in everything]
    acc = [float((model.similarities(e, t).argmax(1) == t.y_test).float().mean())
           for e, t in zip(image_emb, everything, strict=True)]
    n = len(tasks)
    return {"tasks": acc[:n], "zero_shot": acc[n], "extra": acc[n + 1 :], "image_emb": image_emb,
            "questions": question_scores(model, zero_shot_task, questions, image_emb=image_emb[n])}


def run_stream(method: str | Callable[..., ContinualClip], initial: clip.FashionClip, tasks: Sequence[data.Task],
               zero_shot_task: data.Task, *, recipe: StepRecipe = StepRecipe(), progress: bool = False,
               extra_tasks: Sequence[data.Task] = (), after_step: Callable[[ContinualClip], object] | None = None
               ) -> tuple[dict, ContinualClip]:
    """Train ``method`` on ``tasks`` in order, evaluating before training and after every step.

    Returns:
        ``(result, final model)``; ``result`` holds ``"matrix"`` ``[T + 1][T]`` (row 0: before any
        training), ``"zero_shot"`` and ``"questions"`` (``[T + 1]`` and ``[T + 1][Q]``, on the
        retention set, whose key keeps its old name), ``"seconds"`` and ``"cpu_seconds"`` per step
        (training only, wall and process CPU time, one torch thread; CPU time is robust to other jobs
        on the machine), ``"wall_seconds"`` (training and evaluation), and the memory accounting
        ``"trained_params"``, ``"stored_params"`` (extra model copies, heads, contexts)
        and ``"stored_images"`` (buffer or reference set); a method's ``model_copies`` attribute says how many
        whole models it keeps. With ``extra_tasks`` (sets never trained on),
        ``"extra"`` holds ``{name: [T + 1] accuracies}``. With ``after_step``, ``"after_step"`` holds its
        ``[T + 1]`` values, ``after_step(model)`` called on the model before training and after each step (in
        eval mode, no gradient; e.g. a downstream reader, :func:`lit_vqa_runs`).
    """
    if isinstance(method, str) and method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(ALL_METHODS)}")
    fn = ALL_METHODS[method] if isinstance(method, str) else method
    if len(tasks) == 0:
        raise ValueError("the stream is empty: give at least one Task")
    from tqdm.auto import tqdm

    wall = time.perf_counter()
    with common.torch_threads(1):
        common.set_seed(recipe.seed)
        start = ContinualClip(copy.deepcopy(initial)).eval().requires_grad_(False)
        state = State(initial=ContinualClip(copy.deepcopy(initial)).eval().requires_grad_(False), recipe=recipe)
        name = method if isinstance(method, str) else fn.__name__
        if hasattr(fn, "prepare"):  # a method that needs more than the stream (ZSCL's reference set)
            fn.prepare(state)
        first = evaluate(start, tasks, zero_shot_task, extra_tasks=extra_tasks)
        model, rows, seconds, cpu_seconds = start, [first], [], []
        read = [] if after_step is None else [_read(after_step, start)]
        for step, task in enumerate(tqdm(tasks, desc=name, disable=not progress)):
            state.step = step
            before = {k: v.clone() for k, v in model.clip.state_dict().items()}
            t0, c0 = time.perf_counter(), time.process_time()
            model = fn(model, task, state=state)
            seconds.append(time.perf_counter() - t0)
            cpu_seconds.append(time.process_time() - c0)
            state.seen.append(task)
            after = model.clip.state_dict()
            frozen = all(torch.equal(v, after[k]) for k, v in before.items())  # tower unchanged: reuse embeddings
            rows.append(evaluate(model, tasks, zero_shot_task, image_emb=rows[-1]["image_emb"] if frozen else None,
                                 extra_tasks=extra_tasks))
            if after_step is not None:
                read.append(_read(after_step, model))
    tower = n_parameters(nn.ModuleList([model.clip.image_tower, model.clip.image_proj, model.clip.text_proj]))
    contexts = [model.context] if model.context is not None else []
    contexts += list(model.task_contexts.values())
    prompt_params = sum(n_parameters(c) for c in contexts)
    trained = {"zero-shot": 0, "linear probe": sum(h.numel() for h in model.heads.values()),
               **dict.fromkeys((*PROMPT_METHODS, "CoCoOp"), prompt_params)}.get(name, tower)
    stored = getattr(fn, "model_copies", 0) * tower
    stored += sum(h.numel() for h in model.heads.values())
    stored += prompt_params
    images = len(state.buffer) if state.buffer is not None else 0
    images += len(state.reference_images) if state.reference_images is not None else 0
    result = {"method": name, "tasks": [t.name for t in tasks], "matrix": [r["tasks"] for r in rows],
              "zero_shot": [r["zero_shot"] for r in rows], "questions": [r["questions"] for r in rows],
              "seconds": seconds, "cpu_seconds": cpu_seconds, "wall_seconds": time.perf_counter() - wall,
              "trained_params": int(trained), "stored_params": int(stored),
              "stored_images": int(images)}
    if extra_tasks:
        result["extra"] = {t.name: [r["extra"][i] for r in rows] for i, t in enumerate(extra_tasks)}
    if after_step is not None:
        result["after_step"] = read
    return result, model


@torch.no_grad()
def _read(after_step: Callable[[ContinualClip], object], model: ContinualClip) -> object:
    """``after_step(model)`` in eval mode, the model's training flag restored."""
    was = model.training
    out = after_step(model.eval())
    model.train(was)
    return out


def cached_run(method: str, initial: clip.FashionClip, tasks: Sequence[data.Task], zero_shot_task: data.Task, *,
               recipe: StepRecipe = StepRecipe(), stream_key: object = None, progress: bool = False
               ) -> tuple[dict, dict]:
    """:func:`run_stream`, cached under a content hash of (method, recipe, stream, initial model).

    Args:
        stream_key: a JSON-able description of how ``tasks`` were made (e.g. the arguments of
            :func:`helpers.data.make_stream`); it keys the cache together with the initial model's recipe.

    Returns:
        ``(result, final clip state dict)``; the ``"seconds"`` are those measured when the cache was built.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    key = {"code": 2, "method": method, "recipe": dataclasses.asdict(recipe), "stream": stream_key,
           "tasks": [(t.name, len(t.x_train), len(t.x_test)) for t in tasks],
           "initial": getattr(getattr(initial, "recipe", None), "key", lambda: None)(), "zero_shot": len(
               zero_shot_task.x_test), "questions": [q.text for q in QUESTIONS]}
    slug = method.lower().replace(" ", "_").replace("-", "_")
    path = common.cache_dir("models", "continual") / f"{slug}-{common.content_hash(key)}.pt"

    def build(target: Path) -> None:
        result, model = run_stream(method, initial, tasks, zero_shot_task, recipe=recipe, progress=progress)
        blob = {"result": json.dumps(result), "state_dict": {k: v.clone() for k, v in model.clip.state_dict().items()}}
        with open(target, "wb") as fh:
            torch.save(blob, fh)

    blob = torch.load(common.cached_file(path, build, committed=True), map_location="cpu", weights_only=True)
    return json.loads(blob["result"]), blob["state_dict"]


# ---------------------------------------------------------------------------------------------
# Studies over seeds (committed results, no weights)
# ---------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2, 3, 4)
"""The chapter's seeds: seed ``s`` draws the stream with ``make_stream(seed=s)`` and trains with ``recipe.seed = s``."""


def _initial_key(initial: clip.FashionClip) -> object:
    return getattr(getattr(initial, "recipe", None), "key", lambda: None)()


def seed_runs(initial: clip.FashionClip, seed: int, *, methods: Sequence[str] = tuple(METHODS),
              recipe: StepRecipe = StepRecipe(), domains: Sequence[str] = data.DOMAINS, n_train: int = 2000,
              n_test: int = 400, progress: bool = False) -> dict[str, dict]:
    """Every method of ``methods`` on the stream of one seed: :func:`run_stream` results only (no weights).

    Seed ``s`` draws the stream (``make_stream(domains, seed=s)``), the replay buffer, ZSCL's
    reference set and the batches (``recipe.seed = s``); the pre-trained model is the same for all
    seeds. The results (a few kB of JSON per seed) are committed under
    ``helpers/weights/results/ch12/``, named by a content hash of everything that determines them.

    Returns:
        ``{method: result}``, each result as :func:`run_stream` returns it, measured on the retention set.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    recipe = dataclasses.replace(recipe, seed=int(seed))
    key = {"code": 1, "methods": list(methods), "recipe": dataclasses.asdict(recipe), "domains": list(domains),
           "n_train": n_train, "n_test": n_test, "initial": _initial_key(initial), "retention": data.ZERO_SHOT_SIZE,
           "questions": [q.text for q in QUESTIONS]}
    path = common.cache_dir("results", "ch12") / f"seeds-s{seed}-{common.content_hash(key, length=12)}.json"

    def build(target: Path) -> None:
        tasks = data.make_stream(domains, n_train=n_train, n_test=n_test, seed=seed)
        retention = data.retention_set()
        out = {m: run_stream(m, initial, tasks, retention, recipe=recipe, progress=progress)[0] for m in methods}
        target.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


def _validation_split(task: data.Task, n_val: int) -> data.Task:
    """The task with its last ``n_val`` training images as the "test" split (validation) and the rest to fit."""
    if len(task.x_train) <= n_val:
        raise ValueError(f"task {task.name!r} has {len(task.x_train)} training images, need > {n_val}")
    return data.Task(task.name, task.class_names, task.templates, task.x_train[:-n_val], task.y_train[:-n_val],
                     task.x_train[-n_val:], task.y_train[-n_val:])


def _learning_curve(initial: clip.FashionClip, fit: data.Task, state: State, *, steps: int, every: int) -> dict:
    """One task's fine-tuning curve on ``fit``'s test split (the validation part), and the linear probe's accuracy."""
    start = ContinualClip(copy.deepcopy(initial)).eval().requires_grad_(False)

    @torch.no_grad()
    def accuracy(model: ContinualClip) -> float:
        return float((model.logits(fit.x_test, fit).argmax(1) == fit.y_test).float().mean())

    curve, done = [accuracy(start)], [0]

    def record(n: int, model: ContinualClip) -> None:
        if n % every == 0:
            model.eval()
            curve.append(accuracy(model))
            done.append(n)
            model.train()

    _fine_tune(start, fit, state, steps=steps, callback=record)
    probe = linear_probe(start, fit, state=state)
    return {"steps": done, "fine-tune": curve, "linear probe": accuracy(probe)}


def learning_curves(initial: clip.FashionClip, seed: int, *, steps: int = 200, every: int = 10, n_val: int = 400,
                    recipe: StepRecipe = StepRecipe(), domains: Sequence[str] = data.DOMAINS, n_train: int = 2000,
                    n_test: int = 400) -> dict[str, dict]:
    """Fine-tuning curves: accuracy on a held-out validation part of each task's training images vs steps.

    Each task of the seed's stream is split into a fitting part and its last ``n_val`` training images
    (validation; the task's test images are not touched); fine-tuning (the chapter's recipe, from the
    *pre-trained* model, one task alone) is evaluated on the validation part every ``every`` steps up to
    ``steps``, and a linear probe (``recipe.probe_steps`` full-batch steps on the frozen tower) gives
    the frozen-feature reference. Committed JSON under ``helpers/weights/results/ch12/``.

    Returns:
        ``{task name: {"steps": [0, every, ...], "fine-tune": [accuracy], "linear probe": accuracy}}``.
    """
    if steps < every or every < 1:
        raise ValueError(f"need 1 <= every <= steps, got every={every}, steps={steps}")
    recipe = dataclasses.replace(recipe, seed=int(seed))
    key = {"code": 1, "steps": steps, "every": every, "n_val": n_val, "recipe": dataclasses.asdict(recipe),
           "domains": list(domains), "n_train": n_train, "n_test": n_test, "initial": _initial_key(initial)}
    path = common.cache_dir("results", "ch12") / f"curves-s{seed}-{common.content_hash(key, length=12)}.json"

    def build(target: Path) -> None:
        out = {}
        with common.torch_threads(1):
            for k, task in enumerate(data.make_stream(domains, n_train=n_train, n_test=n_test, seed=seed)):
                fit = _validation_split(task, n_val)
                common.set_seed(seed)
                state = State(initial=ContinualClip(initial), recipe=recipe, step=k)
                out[task.name] = _learning_curve(initial, fit, state, steps=steps, every=every)
        target.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


# ---------------------------------------------------------------------------------------------
# The second setting: a LiT model (locked ImageNet tower) that has zero-shot transfer to lose
# ---------------------------------------------------------------------------------------------

LIT_SEEDS = (0, 1, 2)
"""Seeds of the LiT setting (each draws its stream, buffer, reference sets and batches)."""
LIT_ORDERS = (data.DOMAINS, tuple(reversed(data.DOMAINS)))
"""The two task orders of the LiT setting: the chapter's, and the same four tasks reversed."""
LIT_METHODS = ("zero-shot", "fine-tune", "linear probe", "LwF", "WiSE-FT (paper)", "replay", "ZSCL (paper)",
               "ZSCL (paper, off-domain)")
PROMPT_METHODS = ("CoOp", "CoOp (class-specific)", "CoOp (per task)")
"""Prompt learning on the LiT setting: one shared context, one per class name (CSC), one per task."""
FEW_LABEL_METHODS = ("fine-tune (few labels)", "self-training (few labels)", "ZSCL (paper, few labels)",
                     "ZSCL (paper) + self-training (few labels)")
"""The few-labels study on the LiT setting: each task's first :data:`FEW_LABELS` images labelled, the rest not."""
LIT_GRID = {"lr": (3e-4, 1e-3, 3e-3), "steps": 400, "every": 25}
"""Fine-tuning settings tried on the LiT setting's validation split: learning rates, and curves to 400 steps."""


def lit_choice(curves: dict[str, dict]) -> tuple[float, int, float]:
    """The learning rate and step count with the best mean validation accuracy over tasks in :func:`lit_curves`.

    Returns:
        ``(lr, steps, mean validation accuracy)``; ties go to the smaller learning rate, then fewer steps.
    """
    best = None
    for lr, per_task in sorted(curves.items(), key=lambda kv: float(kv[0])):
        mean = np.mean([c["fine-tune"] for c in per_task.values()], axis=0)  # [checkpoints]
        steps = next(iter(per_task.values()))["steps"]
        i = int(np.argmax(mean))
        if best is None or mean[i] > best[2]:
            best = (float(lr), int(steps[i]), float(mean[i]))
    return best


def _lit_features(tasks: Sequence[data.Task], *sets: Tensor) -> None:
    """Compute the locked tower's features of every image the LiT runs will see, with all threads."""
    clip.imagenet_tower().precompute(*[x for t in tasks for x in (t.x_train, t.x_test)], *sets)


def lit_curves(seed: int = 0, *, n_val: int = 400, recipe: StepRecipe = StepRecipe(), n_train: int = 2000,
               n_test: int = 400) -> dict[str, dict]:
    """Validation curves of fine-tuning the LiT model, one task at a time, for each learning rate of :data:`LIT_GRID`.

    As :func:`learning_curves`: each task of seed ``seed``'s stream (chapter order) keeps its last
    ``n_val`` training images for validation; the test images are not touched. Committed JSON.

    Returns:
        ``{str(lr): {task name: {"steps": [...], "fine-tune": [accuracy], "linear probe": accuracy}}}``.
    """
    initial = clip.pretrained_lit(progress=False)
    recipe = dataclasses.replace(recipe, seed=int(seed))
    key = {"code": 1, "grid": LIT_GRID, "n_val": n_val, "recipe": dataclasses.asdict(recipe), "n_train": n_train,
           "n_test": n_test, "initial": _initial_key(initial)}
    path = common.cache_dir("results", "ch12") / f"lit-curves-s{seed}-{common.content_hash(key, length=12)}.json"

    def build(target: Path) -> None:
        tasks = data.make_stream(data.DOMAINS, n_train=n_train, n_test=n_test, seed=seed)
        clip.imagenet_tower().precompute(*[t.x_train for t in tasks])  # the curves never touch the test images
        out = {}
        with common.torch_threads(1):
            for lr in LIT_GRID["lr"]:
                out[str(lr)] = {}
                for k, task in enumerate(tasks):
                    fit = _validation_split(task, n_val)
                    common.set_seed(seed)
                    state = State(initial=ContinualClip(initial), recipe=dataclasses.replace(recipe, lr=lr), step=k)
                    out[str(lr)][task.name] = _learning_curve(initial, fit, state, steps=LIT_GRID["steps"],
                                                              every=LIT_GRID["every"])
        target.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


def _lit_start(methods: Sequence[str], seed: int, recipe: StepRecipe) -> tuple[clip.LitClip, StepRecipe]:
    """The LiT studies' start: ``methods`` checked, the pretrained LiT model, ``recipe`` with its seed set."""
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(ALL_METHODS)}")
    return clip.pretrained_lit(progress=False), dataclasses.replace(recipe, seed=int(seed))


def lit_runs(seed: int, order: Sequence[str] = data.DOMAINS, *, recipe: StepRecipe,
             methods: Sequence[str] = LIT_METHODS, held_out: str = "flipped", n_train: int = 2000, n_test: int = 400,
             progress: bool = False) -> dict[str, dict]:
    """Every method of ``methods`` on one seed's stream, starting from the LiT model (:func:`clip.pretrained_lit`).

    As :func:`seed_runs`, with the retention set and, under ``"extra"``, the held-out domain
    (:func:`helpers.data.held_out_domain`) evaluated after every step. ``recipe`` is the one chosen on
    :func:`lit_curves` (its ``seed`` is replaced by ``seed``). Committed JSON.

    Returns:
        ``{method: result}`` as :func:`run_stream` returns it.
    """
    initial, recipe = _lit_start(methods, seed, recipe)
    key = {"code": 1, "methods": list(methods), "recipe": dataclasses.asdict(recipe), "order": list(order),
           "held_out": held_out, "n_train": n_train, "n_test": n_test, "initial": _initial_key(initial),
           "retention": data.ZERO_SHOT_SIZE, "questions": [q.text for q in QUESTIONS]}
    if "CoCoOp" in methods:  # its settings live outside the recipe (whose fields key every other study)
        key["cocoop"] = {"batch": COCOOP_BATCH, "hidden": "image_dim // 16", "meta_net_last": "zeros"}
    tag = "".join(d[0] for d in order)
    path = common.cache_dir("results", "ch12") / f"lit-s{seed}-{tag}-{common.content_hash(key, length=12)}.json"

    def build(target: Path) -> None:
        tasks = data.make_stream(order, n_train=n_train, n_test=n_test, seed=seed)
        retention, other = data.retention_set(), data.held_out_domain(held_out)
        references = [data.reference_images(recipe.n_reference, seed=seed),
                      data.photo_patches(recipe.n_reference, seed=seed)]
        distils = any(hasattr(ALL_METHODS[m], "prepare") for m in methods)  # ZSCL's reference sets
        _lit_features(tasks, retention.x_test, other.x_test, *(references if distils else []))
        out = {m: run_stream(m, initial, tasks, retention, recipe=recipe, progress=progress, extra_tasks=[other])[0]
               for m in methods}
        target.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


LIT_TUNING = {"LwF": ("distil_weight", (0.3, 1.0, 3.0)), "ZSCL (paper)": ("distil_weight", (0.3, 1.0, 3.0)),
              "replay": ("replay_batch", (16, 32, 64))}
"""Each method's own setting tried on the LiT setting's validation stream (:func:`lit_tuning`): the weight of
the distillation term (LwF, ZSCL) and the replayed examples per step (replay); the middle values are the defaults."""


def lit_tuning(seed: int = 0, *, recipe: StepRecipe, n_val: int = 400, n_train: int = 2000,
               n_test: int = 400) -> dict[str, dict]:
    """Each method of :data:`LIT_TUNING` on the LiT setting's *validation stream*, once per value of its setting.

    The validation stream is seed ``seed``'s stream (chapter order) with each task's last ``n_val`` training
    images as its test split (:func:`_validation_split`, as :func:`lit_curves`); the tasks' test images, the
    retention set and the held-out domain are not touched. ``recipe`` is the one chosen on :func:`lit_curves`.
    Committed JSON.

    Returns:
        ``{method: {str(value): {"avg", "last", "transfer"} on the validation stream}}`` (:func:`stream_metrics`).
    """
    initial = clip.pretrained_lit(progress=False)
    recipe = dataclasses.replace(recipe, seed=int(seed))
    key = {"code": 1, "grid": {m: [f, list(v)] for m, (f, v) in LIT_TUNING.items()}, "n_val": n_val,
           "recipe": dataclasses.asdict(recipe), "n_train": n_train, "n_test": n_test, "initial": _initial_key(initial),
           "retention": data.ZERO_SHOT_SIZE}
    path = common.cache_dir("results", "ch12") / f"lit-tuning-s{seed}-{common.content_hash(key, length=12)}.json"

    def build(target: Path) -> None:
        tasks = [_validation_split(t, n_val) for t in data.make_stream(data.DOMAINS, n_train=n_train, n_test=n_test,
                                                                        seed=seed)]
        references = [data.reference_images(recipe.n_reference, seed=seed)]
        _lit_features(tasks, *references)
        retention = data.retention_set(200)                 # run_stream needs one; never read here
        out = {}
        for method, (field, values) in LIT_TUNING.items():
            out[method] = {}
            for v in values:
                result, _ = run_stream(method, initial, tasks, retention,
                                       recipe=dataclasses.replace(recipe, **{field: v}))
                m = stream_metrics(np.asarray(result["matrix"])[1:])          # rows after each step
                out[method][str(v)] = {k: m[k] for k in ("avg", "last", "transfer")}
        target.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


def lit_tuned(tuning: dict[str, dict], recipe: StepRecipe) -> dict[str, StepRecipe]:
    """Each tuned method's recipe: the value of its :data:`LIT_TUNING` setting with the best validation-stream Avg
    (ties: the default, then the smaller value)."""
    out = {}
    for method, (field, values) in LIT_TUNING.items():
        default = getattr(StepRecipe(), field)
        best = max(values, key=lambda v: (tuning[method][str(v)]["avg"], v == default, -v))
        out[method] = dataclasses.replace(recipe, **{field: best})
    return out


def wise_ft_sweep(initial: clip.FashionClip, seed: int, *, alphas: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
                  recipe: StepRecipe = StepRecipe(), n_train: int = 2000, n_test: int = 400) -> dict[str, dict]:
    """WiSE-FT's coefficient swept after the stream: the pretrained model blended with seed ``seed``'s final
    sequentially fine-tuned model, each blend evaluated on the tasks and the retention set. Committed JSON.

    Returns:
        ``{str(alpha): {"tasks": [accuracy per task], "retention": accuracy}}``.
    """
    if not alphas or not all(0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"alphas must be a non-empty list of values in [0, 1], got {alphas}")
    recipe = dataclasses.replace(recipe, seed=int(seed))
    key = {"code": 1, "alphas": [float(a) for a in alphas], "recipe": dataclasses.asdict(recipe), "n_train": n_train,
           "n_test": n_test, "initial": _initial_key(initial), "retention": data.ZERO_SHOT_SIZE}
    path = common.cache_dir("results", "ch12") / f"wise-sweep-s{seed}-{common.content_hash(key, length=12)}.json"

    def build(target: Path) -> None:
        tasks = data.make_stream(data.DOMAINS, n_train=n_train, n_test=n_test, seed=seed)
        retention = data.retention_set()
        _, tuned = run_stream("fine-tune", initial, tasks, retention, recipe=recipe)
        start = ContinualClip(copy.deepcopy(initial)).eval()
        out = {}
        with common.torch_threads(1):
            for a in alphas:
                ev = evaluate(wise_ft(start, tuned, float(a)).eval(), tasks, retention)
                out[str(float(a))] = {"tasks": ev["tasks"], "retention": ev["zero_shot"]}
        target.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


def pseudo_label_start(seed: int = 0, *, n: int = 200, n_train: int = 2000, n_test: int = 400) -> dict[str, dict]:
    """Self-training's raw material at the start of the stream: for each task of seed ``seed``'s stream (chapter
    order), the share of its first ``n`` unlabelled training images that the LiT model (before any training)
    classifies with confidence at least :data:`PSEUDO_THRESHOLD`, and how often those guesses are right.
    Committed JSON (the locked tower's features would otherwise be computed on every run).

    Returns:
        ``{task name: {"passed": fraction, "right": fraction of the passed (None if none passed), "n": n}}``.
    """
    if not 1 <= n <= n_train - FEW_LABELS:
        raise ValueError(f"n must be in [1, {n_train - FEW_LABELS}] (the unlabelled images of a task), got {n}")
    initial = clip.pretrained_lit(progress=False)
    key = {"code": 1, "seed": seed, "n": n, "n_train": n_train, "n_test": n_test, "few": FEW_LABELS,
           "threshold": PSEUDO_THRESHOLD, "initial": _initial_key(initial)}
    path = common.cache_dir("results", "ch12") / f"pseudo-start-s{seed}-{common.content_hash(key, length=12)}.json"

    def build(target: Path) -> None:
        tasks = data.make_stream(data.DOMAINS, n_train=n_train, n_test=n_test, seed=seed)
        model, out = ContinualClip(initial), {}
        clip.imagenet_tower().precompute(*[few_labels(t)[1][:n] for t in tasks])
        with torch.no_grad():
            for task in tasks:
                _, unlabelled = few_labels(task)
                hidden = task.y_train[FEW_LABELS:][:n]
                keep, guess = _confident(model.logits(unlabelled[:n], task), PSEUDO_THRESHOLD)
                right = float((guess[keep] == hidden[keep]).float().mean()) if keep.any() else None
                out[task.name] = {"passed": float(keep.float().mean()), "right": right, "n": len(hidden)}
        target.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())


# ---------------------------------------------------------------------------------------------
# Compositional VQA on the LiT model: a frozen answer head reads the region features the stream changes
# ---------------------------------------------------------------------------------------------

VQA_MAX_TOKENS = 16
"""Question length (MiniLM word pieces with [CLS] and [SEP]) the answer head reads; the templates need at most 14."""


@torch.no_grad()
def question_tokens(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """The frozen MiniLM's last hidden states of each question, ``([Q, VQA_MAX_TOKENS, 384], mask [Q, L] bool)``.

    Token states, not the mean-pooled sentence embedding: "is the sandal left of the bag?" and "is the bag left
    of the sandal?" pool to almost the same vector. Every distinct text is encoded once per process.
    """
    texts = clip._check_texts(texts, "questions")
    cache = _question_cache()
    todo = sorted({t for t in texts if t not in cache})
    if todo:
        encoder, tokenizer = clip.text_tower().encoder()
        enc = tokenizer(todo, padding="max_length", truncation=False, max_length=VQA_MAX_TOKENS, return_tensors="pt")
        if enc["input_ids"].shape[1] > VQA_MAX_TOKENS:
            raise ValueError(f"a question is longer than {VQA_MAX_TOKENS} word pieces; shorten it")
        hidden = encoder(**enc).last_hidden_state  # [T, L, 384]
        cache.update({t: (h, m.bool()) for t, h, m in zip(todo, hidden, enc["attention_mask"], strict=True)})
    states, masks = zip(*(cache[t] for t in texts), strict=True)
    return torch.stack(states), torch.stack(masks)


@functools.cache
def _question_cache() -> dict[str, tuple[Tensor, Tensor]]:
    return {}


class AnswerHead(nn.Module):
    """A question-conditioned slot reader: each slot looks for itself in the question, then the slots are summed.

    Each slot (its feature projected, plus a learned slot-position embedding, so "left of" and "above" can be
    read) attends over the question's MiniLM token states; the values carry a learned token-position embedding,
    so a slot whose class is named first ("the sandal" in "is the sandal left of the bag?") reads something else
    than one named second. An MLP reads ``[slot, what it attended to, question summary]``; the slot vectors are
    *summed* (counts add up) and an MLP on ``[sum, question summary]`` gives the logits over
    :data:`helpers.data.VQA_ANSWERS`. The question summary is the masked mean of the projected tokens. A
    relation-network / FiLM-style reader (Santoro et al. 2017; Perez et al. 2018) at the book's scale.

    Args:
        slot_dim: size of a slot's feature (the CLIP-style image embedding, or 12 for the symbolic slots).
    """

    def __init__(self, slot_dim: int, *, width: int = 128):
        super().__init__()
        self.key = nn.Linear(clip.MiniLMText.dim, width)
        self.value = nn.Linear(clip.MiniLMText.dim, width)
        self.token_position = nn.Parameter(0.1 * torch.randn(VQA_MAX_TOKENS, width))   # [token, width]
        self.query = nn.Linear(slot_dim, width)
        self.slot_in = nn.Linear(slot_dim, width)
        self.position = nn.Parameter(0.1 * torch.randn(data.VQA_SLOTS, width))         # [slot, width]
        self.read = nn.Sequential(nn.Linear(3 * width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.answer = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, len(data.VQA_ANSWERS)))

    def forward(self, slots: Tensor, question: Tensor, mask: Tensor) -> Tensor:
        """``slots [B, VQA_SLOTS, slot_dim]``, ``question [B, L, 384]``, ``mask [B, L]`` → logits ``[B, answers]``."""
        keys = self.key(question)                                                # [B, L, width]
        values = self.value(question) + self.token_position[: question.shape[1]]  # [B, L, width]
        scores = self.query(slots) @ keys.transpose(1, 2) / keys.shape[-1] ** 0.5  # [B, S, L]
        attended = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1) @ values  # [B, S, width]
        q = (values * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)        # [B, width]
        s = self.slot_in(slots) + self.position                                  # [B, S, width]
        read = self.read(torch.cat([s, attended, q[:, None].expand_as(s)], -1))  # [B, S, width]
        return self.answer(torch.cat([read.sum(1), q], -1))


@dataclasses.dataclass(frozen=True)
class VqaHeadRecipe:
    """How the answer heads are trained: AdamW; a curriculum of ``warmup_epochs`` passes over the spatial questions
    alone, then ``epochs`` passes over every question, the epoch chosen on the validation scenes."""

    width: int = 128
    warmup_epochs: int = 40  # spatial questions only: binding names to slots is otherwise found late or never
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    seed: int = 0
    version: int = 1


def slot_table(model: ContinualClip, items: data.VqaItems) -> Tensor:
    """Region features: every item's CLIP-style image embedding, and the empty slot's last, ``[M + 1, d]``.

    An empty slot is a black 28 x 28 image, encoded like any item (the reader must tell it from an item).
    """
    blank = data.normalise(np.zeros((1, data.IMAGE_SIZE, data.IMAGE_SIZE), np.uint8))
    return model.encode_images(torch.cat([items.images, blank]))


def symbolic_table(items: data.VqaItems) -> Tensor:
    """The ground truth as slot features: one-hot class, dark bit, empty bit, ``[M + 1, 12]`` (empty slot last)."""
    n = len(items.labels)
    table = torch.zeros(n + 1, len(data.CLASS_TEXT) + 2)
    table[torch.arange(n), items.labels] = 1.0
    table[:n, -2] = items.dark.float()
    table[n, -1] = 1.0
    return table


def _inputs(table: Tensor, scenes: data.Scenes, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if len(table) != len(scenes.items.labels) + 1:
        raise ValueError(f"the slot table must have one row per item plus the empty slot "
                         f"({len(scenes.items.labels) + 1}), got {len(table)}")
    slots = scenes.slots[scenes.scene[rows]]                                    # [B, S] item index or -1
    features = table[torch.where(slots >= 0, slots, len(table) - 1)]             # [B, S, d]
    question, mask = question_tokens([scenes.text[i] for i in rows.tolist()])
    return features, question, mask


@torch.no_grad()
def vqa_correct(head: AnswerHead, table: Tensor, scenes: data.Scenes, *, batch_size: int = 500) -> Tensor:
    """Whether the head answers each question of ``scenes`` right, ``[Q]`` bool (the argmax over every answer)."""
    if len(scenes.answer) == 0:
        raise ValueError("no questions to answer")
    head.eval()
    out = []
    for start in range(0, len(scenes.answer), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(scenes.answer)))
        out.append(head(*_inputs(table, scenes, rows)).argmax(1) == scenes.answer[rows])
    return torch.cat(out)


def vqa_accuracy(correct: Tensor, scenes: data.Scenes) -> dict[str, float]:
    """Accuracy per question type (:data:`helpers.data.VQA_TYPES`, those asked) and their mean (``"mean"``, each
    type weighs the same)."""
    if correct.shape != scenes.answer.shape:
        raise ValueError(f"correct must be [{len(scenes.answer)}] (one per question), got {tuple(correct.shape)}")
    out = {kind: float(correct[scenes.kind == k].float().mean()) for k, kind in enumerate(data.VQA_TYPES)
           if (scenes.kind == k).any()}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def vqa_mean_ci(correct: Tensor | np.ndarray, scenes: data.Scenes, *, n_resamples: int = 2000,
                seed: int = 0) -> stats.Estimate:
    """The mean accuracy over question types with a percentile bootstrap over *scenes* (a scene's questions stay
    together; each resample recomputes every type's accuracy, then their mean), 95 %."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.shape != tuple(scenes.answer.shape):
        raise ValueError(f"correct must be [{len(scenes.answer)}] (one per question), got {correct.shape}")
    scene, kind = scenes.scene.numpy(), scenes.kind.numpy()
    asked = np.unique(kind)
    hits, total = np.zeros((len(scenes.slots), len(asked))), np.zeros((len(scenes.slots), len(asked)))
    np.add.at(hits, (scene, np.searchsorted(asked, kind)), correct)
    np.add.at(total, (scene, np.searchsorted(asked, kind)), 1.0)
    draws = np.random.default_rng(seed).integers(len(scenes.slots), size=(n_resamples, len(scenes.slots)))
    dist = (hits[draws].sum(1) / np.maximum(total[draws].sum(1), 1)).mean(1)   # [resample]
    value = float((hits.sum(0) / total.sum(0)).mean())
    lo, hi = np.quantile(dist, [0.025, 0.975])
    return stats.Estimate(value, min(lo, value), max(hi, value), n=len(correct),
                          method=f"bootstrap 95 % over {len(scenes.slots)} scenes")


def answer_prior(scenes: data.Scenes) -> dict[str, int]:
    """The question-only baseline: each question text's most frequent answer in ``scenes`` (ties: the first)."""
    counts: dict[str, np.ndarray] = {}
    for text, a in zip(scenes.text, scenes.answer.tolist(), strict=True):
        counts.setdefault(text, np.zeros(len(data.VQA_ANSWERS), int))[a] += 1
    return {t: int(c.argmax()) for t, c in counts.items()}


def prior_correct(prior: dict[str, int], scenes: data.Scenes) -> Tensor:
    """Whether the question-only prior answers each question right, ``[Q]`` (an unseen text answers "no")."""
    return torch.tensor([prior.get(t, 0) == a for t, a in zip(scenes.text, scenes.answer.tolist(), strict=True)])


def train_answer_head(table: Tensor, train: data.Scenes, validation: data.Scenes, recipe: VqaHeadRecipe,
                      *, validation_table: Tensor | None = None) -> tuple[AnswerHead, list[float]]:
    """Train an :class:`AnswerHead` on ``train``'s questions and keep the epoch with the best mean validation accuracy.

    Args:
        table, validation_table: slot features of ``train``'s and ``validation``'s items (:func:`slot_table` or
            :func:`symbolic_table`); the same table when both splits share their items.

    Returns:
        ``(head in eval mode, mean validation accuracy after each epoch over every question)``.
    """
    validation_table = table if validation_table is None else validation_table
    common.set_seed(recipe.seed)
    head = AnswerHead(table.shape[1], width=recipe.width)
    optimiser = torch.optim.AdamW(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    spatial = torch.nonzero(train.kind == data.VQA_TYPES.index("spatial"))[:, 0]
    best, history = None, []
    for epoch in range(recipe.warmup_epochs + recipe.epochs):
        head.train()
        pool = spatial if epoch < recipe.warmup_epochs else torch.arange(len(train.answer))
        for rows in pool[torch.randperm(len(pool), generator=generator)].split(recipe.batch_size):
            loss = F.cross_entropy(head(*_inputs(table, train, rows)), train.answer[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if epoch < recipe.warmup_epochs:
            continue
        history.append(vqa_accuracy(vqa_correct(head, validation_table, validation), validation)["mean"])
        if best is None or history[-1] > max(history[:-1]):
            best = copy.deepcopy(head.state_dict())
    head.load_state_dict(best)
    return head.eval(), history


def vqa_scenes() -> dict[str, data.Scenes]:
    """The chapter's scenes: items outside the retention set and the test images of every LiT seed's stream."""
    return data.vqa_splits(exclude_seeds=LIT_SEEDS, n_test=400)


VQA_HEAD_RECIPE = VqaHeadRecipe()


def _vqa_head_key(recipe: VqaHeadRecipe) -> dict:
    initial = clip.pretrained_lit(progress=False)
    return {"code": 1, "recipe": dataclasses.asdict(recipe), "splits": data.VQA_SPLITS, "seeds": list(LIT_SEEDS),
            "initial": _initial_key(initial), "darken": [data.VQA_DARKEN, data.VQA_P_DARKENED],
            "max_tokens": VQA_MAX_TOKENS}


def vqa_heads(recipe: VqaHeadRecipe = VQA_HEAD_RECIPE, *, progress: bool = False
              ) -> tuple[AnswerHead, AnswerHead, dict]:
    """The answer head on the LiT model's region features, its twin on the symbolic truth, and their report.

    Both are trained once on the train scenes (the image head on the *start* model's features), the epoch
    chosen on the validation scenes, and then frozen. Committed (weights and report in one file).

    Returns:
        ``(image head, symbolic head, report)``; the report holds each head's validation curve and chosen
        epoch, and on the test scenes the per-question correctness of the image head, the symbolic head and
        the question-only prior (lists of 0/1, in the order of ``vqa_scenes()["test"]``).
    """
    key = _vqa_head_key(recipe)
    path = common.cache_dir("results", "ch12") / f"vqa-heads-{common.content_hash(key, length=12)}.pt"

    def build(target: Path) -> None:
        t0 = time.process_time()
        splits = vqa_scenes()
        start = ContinualClip(clip.pretrained_lit(progress=False))
        clip.imagenet_tower().precompute(*[s.items.images for s in splits.values()], threads=1)
        report, heads = {}, {}
        with common.torch_threads(1):
            tables = {name: slot_table(start, s.items) for name, s in splits.items()}
            symbolic = {name: symbolic_table(s.items) for name, s in splits.items()}
            for kind, t in (("image", tables), ("symbolic", symbolic)):
                head, history = train_answer_head(t["train"], splits["train"], splits["validation"], recipe,
                                                  validation_table=t["validation"])
                heads[kind] = head.state_dict()
                report[kind] = {"validation": history, "epoch": int(np.argmax(history)) + 1,
                                "test": vqa_correct(head, t["test"], splits["test"]).int().tolist()}
            report["prior"] = {"test": prior_correct(answer_prior(splits["train"]), splits["test"]).int().tolist()}
        report["cpu_seconds"] = time.process_time() - t0
        with open(target, "wb") as fh:
            torch.save({"heads": heads, "report": json.dumps(report)}, fh)

    blob = torch.load(common.cached_file(path, build, committed=True), map_location="cpu", weights_only=True)
    heads = {}
    for kind, dim in (("image", clip.pretrained_lit(progress=False).image_proj.out_features),
                      ("symbolic", len(data.CLASS_TEXT) + 2)):
        heads[kind] = AnswerHead(dim, width=recipe.width)
        heads[kind].load_state_dict(blob["heads"][kind])
        heads[kind].eval().requires_grad_(False)
    return heads["image"], heads["symbolic"], json.loads(blob["report"])


VQA_METHODS = ("zero-shot", "fine-tune", "linear probe", "LwF", "WiSE-FT (paper)", "replay", "ZSCL (paper)")
"""The methods whose VQA is tracked through the LiT stream (:func:`lit_vqa_runs`); the linear probe never changes
the image side, so its VQA stays where it starts: a control."""


def lit_vqa_runs(seed: int, order: Sequence[str] = data.DOMAINS, *, recipe: StepRecipe,
                 methods: Sequence[str] = VQA_METHODS, n_train: int = 2000, n_test: int = 400,
                 head_recipe: VqaHeadRecipe = VQA_HEAD_RECIPE, progress: bool = False) -> dict[str, dict]:
    """The frozen answer head of :func:`vqa_heads` read through the LiT stream: VQA accuracy after every step.

    Each method of ``methods`` runs on seed ``seed``'s stream in ``order`` exactly as in :func:`lit_runs` (same
    recipe, streams, reference set; no held-out domain); before training and after each step the test scenes'
    items are re-encoded by the current model and the frozen head answers. Committed JSON.

    Returns:
        ``{method: result}``, each result with ``"vqa"`` (``[T + 1]`` dicts of accuracy per type and ``"mean"``)
        and ``"matrix"``, ``"zero_shot"``, ``"cpu_seconds"``, ``"wall_seconds"`` as :func:`run_stream` returns them.
    """
    initial, recipe = _lit_start(methods, seed, recipe)
    key = {"code": 1, "methods": list(methods), "recipe": dataclasses.asdict(recipe), "order": list(order),
           "n_train": n_train, "n_test": n_test, "initial": _initial_key(initial), "retention": data.ZERO_SHOT_SIZE,
           "head": _vqa_head_key(head_recipe)}
    tag = "".join(d[0] for d in order)
    path = common.cache_dir("results", "ch12") / f"lit-vqa-s{seed}-{tag}-{common.content_hash(key, length=12)}.json"

    def build(target: Path) -> None:
        head, _, _ = vqa_heads(head_recipe)
        test = vqa_scenes()["test"]
        tasks = data.make_stream(order, n_train=n_train, n_test=n_test, seed=seed)
        retention = data.retention_set()
        references = [data.reference_images(recipe.n_reference, seed=seed)]
        clip.imagenet_tower().precompute(*[x for t in tasks for x in (t.x_train, t.x_test)], retention.x_test,
                                         *references, test.items.images, threads=1)

        def read(model: ContinualClip) -> dict:
            return vqa_accuracy(vqa_correct(head, slot_table(model, test.items), test), test)

        out = {}
        for m in methods:
            result, _ = run_stream(m, initial, tasks, retention, recipe=recipe, progress=progress, after_step=read)
            out[m] = {"vqa": result["after_step"], **{k: result[k] for k in ("matrix", "zero_shot", "cpu_seconds",
                                                                             "wall_seconds")}}
        target.write_text(json.dumps(out))

    return json.loads(common.cached_file(path, build, committed=True).read_text())
