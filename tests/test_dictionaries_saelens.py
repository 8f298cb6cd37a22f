"""helpers.dictionaries cross-checked against SAELens (sae-lens 6.54.12, requirements-nodeps.txt).

The book's dictionaries (the committed MiniLM and SmolLM2 TopK SAEs, the SmolLM2 TopK transcoder, and
small L1/ReLU SAEs and a ReLU transcoder trained here) are loaded into SAELens's own classes and run on
random activations: ``StandardSAE`` / ``StandardTrainingSAE`` (ReLU + L1), ``TopKSAE`` / ``TopKTrainingSAE``,
``Transcoder``; the training loss against ``training_forward_pass`` and SAELens's L1 warm-up
(``CoefficientScheduler``); the FVU against SAELens's ``ExplainedVarianceCalculator``; the input scale
against SAELens's ``ActivationScaler``.

How SAELens is imported. SAELens 6.54.12 declares ``transformer-lens<4`` and ``import sae_lens`` fails with
TransformerLens 4.3.0 (the book's hook oracle): ``sae_lens/saes/sae.py`` does
``from transformer_lens.HookedTransformer import HookedRootModule``, a module TL 4 removed (the class is
kept as ``transformer_lens.HookedRootModule``), and the top-level ``sae_lens/__init__.py`` also imports the
runners, whose ``sae_lens/config.py`` imports wandb. So :func:`_import_saelens` (1) aliases that one
removed module path to the kept class, only while importing, and (2) registers a bare ``sae_lens`` package
(``__version__``, ``logger``: all its submodules read from it) so that ``sae_lens/__init__.py`` is not run.
The SAE classes, ``training.optim`` and ``training.activation_scaler`` then import with packages already
pinned (torch, einops, safetensors, huggingface_hub, PyYAML, transformers). ``ExplainedVarianceCalculator``
lives in ``sae_lens/evals.py``, whose imports reach wandb and TL 3's ``HookedTransformer``; the class is
compiled from that installed file alone (it uses only torch).

Conventions, transformed explicitly:
- the book works on ``scale·x`` (one scalar, mean squared norm ``d_in``) and divides outputs by ``scale``;
  SAELens folds such a factor into the weights with its own ``fold_activation_norm_scaling_factor``;
- book ``b_pre`` (subtracted before encoding, added after decoding; book ``b_dec`` is 0 for an SAE) is
  SAELens's ``b_dec`` with ``apply_b_dec_to_input=True``. SAELens transcoders forbid that flag, so the
  transcoder's ``b_pre`` is folded into ``b_enc`` (``b_enc - b_pre W_enc``);
- loss: the book averages the squared error over dimensions and divides the L1 term by ``d_in``; SAELens
  sums over dimensions. Book loss = SAELens ``training_forward_pass(...).loss / d_in`` with SAELens's
  ``l1_coefficient`` = the book's ``l1``, on the same scaled activations;
- SAELens's standard L1 term is ``Σ_i z_i ‖W_dec,i‖`` and its TopK training SAE rescales by decoder norms;
  the book keeps decoder rows at unit norm (renormalised after every step), where both reduce to the book's.
"""

import ast
import importlib.util
import logging
import sys
import types
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from transformer_lens import HookedRootModule

from helpers import common
from helpers import dictionaries as D

SAELENS_VERSION = "6.54.12"
RTOL = 1e-5  # float32: relative to the largest magnitude compared


def _import_saelens():
    """SAELens's SAE modules without ``sae_lens/__init__.py`` (see the module docstring)."""
    removed = "transformer_lens.HookedTransformer"
    alias = None
    if removed not in sys.modules and importlib.util.find_spec(removed) is None:
        alias = sys.modules[removed] = types.ModuleType(removed)
        alias.HookedRootModule = HookedRootModule
    spec = importlib.util.find_spec("sae_lens")
    if "sae_lens" not in sys.modules:
        pkg = types.ModuleType("sae_lens")
        pkg.__path__, pkg.__spec__ = list(spec.submodule_search_locations), spec
        pkg.__version__, pkg.logger = version("sae-lens"), logging.getLogger("sae_lens")
        sys.modules["sae_lens"] = pkg
    try:
        from sae_lens import registry
        from sae_lens.saes import standard_sae, topk_sae, transcoder
        from sae_lens.training import activation_scaler, optim
    finally:
        if alias is not None:
            del sys.modules[removed]
    # what sae_lens/__init__.py registers for the classes used here (the training configs look themselves up)
    for arch, cls, cfg in (("standard", standard_sae.StandardSAE, standard_sae.StandardSAEConfig),
                           ("topk", topk_sae.TopKSAE, topk_sae.TopKSAEConfig),
                           ("transcoder", transcoder.Transcoder, transcoder.TranscoderConfig)):
        registry.SAE_CLASS_REGISTRY.setdefault(arch, (cls, cfg))
    for arch, cls, cfg in (("standard", standard_sae.StandardTrainingSAE, standard_sae.StandardTrainingSAEConfig),
                           ("topk", topk_sae.TopKTrainingSAE, topk_sae.TopKTrainingSAEConfig)):
        registry.SAE_TRAINING_CLASS_REGISTRY.setdefault(arch, (cls, cfg))
    evals = Path(spec.submodule_search_locations[0], "evals.py")
    node = next(n for n in ast.parse(evals.read_text()).body
                if isinstance(n, ast.ClassDef) and n.name == "ExplainedVarianceCalculator")
    namespace = {"torch": torch}
    exec(compile(ast.Module([node], type_ignores=[]), str(evals), "exec"), namespace)
    return standard_sae, topk_sae, transcoder, activation_scaler, optim, namespace["ExplainedVarianceCalculator"]


standard_sae, topk_sae, sl_transcoder, activation_scaler, optim, ExplainedVarianceCalculator = _import_saelens()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with common.torch_threads(1), torch.no_grad():
        yield


def test_saelens_is_the_pinned_version():
    """The import above is written for this version (its module layout and TL 4's removed module)."""
    assert version("sae-lens") == SAELENS_VERSION
    pins = (Path(__file__).resolve().parents[1] / "requirements-nodeps.txt").read_text().split()
    assert f"sae-lens=={SAELENS_VERSION}" in pins


def _close(got, want, what, rtol=RTOL):
    """Assert ``max|got - want| <= rtol · max|want|`` and return the relative difference."""
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    rel = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    assert rel <= rtol, f"{what}: relative difference {rel:.2e} > {rtol:.0e}"
    return rel


# ---------------------------------------------------------------------------------------------
# The book's weights in SAELens's classes
# ---------------------------------------------------------------------------------------------


def saelens_sae(book: D.SparseAutoencoder, *, training: bool = False, fold_scale: bool = True):
    """The SAELens SAE with ``book``'s weights: on raw activations (``fold_scale``) or on ``scale·x``."""
    assert book.d_out == book.d_in and not book.b_dec.any(), "an SAE's b_dec is 0 in the book"
    kw = {"d_in": book.d_in, "d_sae": book.d_sae, "apply_b_dec_to_input": True}
    if book.kind == "relu":
        cls, cfg = ((standard_sae.StandardTrainingSAE, standard_sae.StandardTrainingSAEConfig) if training
                    else (standard_sae.StandardSAE, standard_sae.StandardSAEConfig))
    else:
        cls, cfg = ((topk_sae.TopKTrainingSAE, topk_sae.TopKTrainingSAEConfig) if training
                    else (topk_sae.TopKSAE, topk_sae.TopKSAEConfig))
        kw["k"] = book.k
    sae = cls(cfg(**kw))
    sae.load_state_dict({"W_enc": book.W_enc, "b_enc": book.b_enc, "W_dec": book.W_dec, "b_dec": book.b_pre})
    if fold_scale:
        sae.fold_activation_norm_scaling_factor(float(book.scale))
    return sae.eval()


def saelens_transcoder(book: D.Transcoder):
    """SAELens's ``Transcoder`` with ``book``'s weights, on raw MLP inputs.

    SAELens 6.54.12 has ReLU (``Transcoder``), skip and JumpReLU transcoders but no TopK one: for a TopK
    book transcoder the ReLU is swapped for SAELens's own ``TopK`` module (that of ``TopKSAE``).
    """
    tc = sl_transcoder.Transcoder(sl_transcoder.TranscoderConfig(d_in=book.d_in, d_sae=book.d_sae, d_out=book.d_out,
                                                                 apply_b_dec_to_input=False))
    tc.load_state_dict({"W_enc": book.W_enc, "b_enc": book.b_enc - book.b_pre @ book.W_enc,
                        "W_dec": book.W_dec, "b_dec": book.b_dec})
    tc.fold_activation_norm_scaling_factor(float(book.scale))
    if book.kind == "topk":
        tc.activation_fn = topk_sae.TopK(book.k)
    return tc.eval()


def random_activations(book: D.SparseAutoencoder, n: int = 512, seed: int = 0) -> torch.Tensor:
    """``[n, d_in]`` Gaussian activations at the book's scale, around its ``b_pre`` (raw units)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, book.d_in, generator=g) + book.b_pre) / book.scale


def dictionary_activations(book: D.SparseAutoencoder, n: int = 512, seed: int = 0) -> torch.Tensor:
    """``[n, d_in]`` activations the dictionary can partly explain: ``k`` of its decoder rows with random positive
    weights plus as much isotropic Gaussian noise, around its ``b_pre``, at the book's scale (raw units)."""
    g = torch.Generator().manual_seed(seed)
    k = book.k or 16
    rows = book.W_dec.detach()[torch.randint(book.d_sae, (n, k), generator=g)]                  # [n, k, d_in]
    signal = (3 * torch.rand(n, k, 1, generator=g) * rows).sum(1)
    noise = torch.randn(n, book.d_in, generator=g) * signal.norm(dim=-1, keepdim=True) / book.d_in ** 0.5
    return (signal + noise + book.b_pre) / book.scale


def committed(name: str) -> dict:
    path = common._committed_path(D.artefact_path(name))
    assert common.verified(path), f"the committed artefact {path.name} is missing or altered (rebuilding takes minutes)"
    return D.load_artefact(name)


@pytest.fixture(scope="module")
def minilm_sae():
    art = committed("minilm")
    return D.load_dictionary(art["dictionaries"][art["chosen"]["topk"]])


@pytest.fixture(scope="module")
def smollm2():
    art = committed("smollm2")
    return D.load_dictionary(art["dictionaries"][art["chosen"]["topk"]]), D.load_dictionary(art["transcoder"])


def planted(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Sparse non-negative combinations of 64 unit directions plus noise and an offset (training data)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(64, d, generator=g), dim=1)
    coef = torch.relu(torch.randn(n, 64, generator=g) - 1.5)
    return 3.0 + coef @ dirs + 0.05 * torch.randn(n, d, generator=g)


@pytest.fixture(scope="module")
def relu_sae():
    with torch.enable_grad():
        sae, _ = D.train_sae(planted(4096), d_sae=128, kind="relu", l1=2.0, batch_size=64, lr=2e-3, seed=0)
    return sae


# ---------------------------------------------------------------------------------------------
# Inference: codes and reconstructions
# ---------------------------------------------------------------------------------------------


def _compare_sae(book, n=512):
    x = random_activations(book, n)
    x_hat, z = book(x)
    out = {}
    for label, sae, inp, unscale in (("folded", saelens_sae(book), x, 1.0),
                                     ("scaled", saelens_sae(book, fold_scale=False), x * book.scale, book.scale)):
        z_sl = sae.encode(inp)
        if book.kind == "topk":
            assert torch.equal(z_sl != 0, z != 0), f"{label}: TopK chose other latents"
        out[f"{label} z"] = _close(z_sl, z, f"{label} codes")
        out[f"{label} x_hat"] = _close(sae(inp) / unscale, x_hat, f"{label} reconstructions")
    return out


def test_committed_minilm_topk_sae_equals_saelens_topk_sae(minilm_sae):
    assert minilm_sae.kind == "topk"
    print(_compare_sae(minilm_sae))


def test_committed_smollm2_topk_sae_equals_saelens_topk_sae(smollm2):
    print(_compare_sae(smollm2[0]))


def test_relu_sae_equals_saelens_standard_sae(relu_sae):
    assert relu_sae.kind == "relu" and relu_sae.b_enc.abs().max() > 1e-3   # a trained encoder bias is compared
    print(_compare_sae(relu_sae))


def test_committed_smollm2_topk_transcoder_equals_saelens_transcoder_with_topk(smollm2):
    book = smollm2[1]
    assert isinstance(book, D.Transcoder) and book.kind == "topk"
    x = random_activations(book)
    y_hat, z = book(x)
    tc = saelens_transcoder(book)
    y_sl, z_sl = tc.forward_with_activations(x)
    assert torch.equal(z_sl != 0, z != 0)
    print({"z": _close(z_sl, z, "codes"), "y_hat": _close(y_sl, y_hat, "outputs")})


def test_relu_transcoder_equals_saelens_transcoder():
    torch.manual_seed(0)
    book = D.Transcoder(24, 96, 40, kind="relu")
    g = torch.Generator().manual_seed(1)
    for p in (book.b_pre, book.b_enc, book.b_dec):
        p.copy_(0.3 * torch.randn(p.shape, generator=g))
    book.scale.fill_(0.37)
    x = random_activations(book)
    y_hat, z = book(x)
    assert 0 < (z > 0).float().mean() < 1
    y_sl, z_sl = saelens_transcoder(book).forward_with_activations(x)
    print({"z": _close(z_sl, z, "codes"), "y_hat": _close(y_sl, y_hat, "outputs")})


# ---------------------------------------------------------------------------------------------
# Training loss, L1 warm-up, input scale
# ---------------------------------------------------------------------------------------------


def _book_losses_at_init(kind: str, x: torch.Tensor, batch_size: int, **kw):
    """``train_sae`` with ``lr=0``: every step's logged loss is that of the returned (initial) weights."""
    with torch.enable_grad():
        book, hist = D.train_sae(x, d_sae=128, kind=kind, batch_size=batch_size, lr=0.0, epochs=1, seed=0, **kw)
    batches = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).split(batch_size)  # train_sae's
    assert len(batches) == hist["steps"] == len(hist["loss"])
    return book, batches, hist["loss"]


def _saelens_step(sae, sae_in, coefficients):
    return sae.training_forward_pass(standard_sae.TrainStepInput(
        sae_in=sae_in, coefficients=coefficients, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False))


def test_relu_training_loss_and_l1_warm_up_equal_saelens():
    """Book loss = (SAELens MSE + SAELens L1 with the warmed-up λ) / d_in, step by step."""
    x, l1, batch = planted(3200), 2.0, 32
    book, batches, losses = _book_losses_at_init("relu", x, batch, l1=l1)
    warm_up = 0.05 * len(batches)                      # train_sae warms the L1 weight up over 5 % of the steps
    assert warm_up == int(warm_up), "an integer warm-up: SAELens overshoots λ for one step otherwise"
    sae = saelens_sae(book, training=True, fold_scale=False)
    schedule = optim.CoefficientScheduler(warm_up_steps=int(warm_up), final_value=l1)   # as SAETrainer drives it
    rel, coefs = 0.0, []
    for idx, book_loss in zip(batches, losses, strict=True):
        out = _saelens_step(sae, x[idx] * book.scale, {"l1": schedule.value})
        coefs.append(schedule.value)
        assert set(out.losses) == {"mse_loss", "l1_loss"}
        rel = max(rel, _close(out.loss / book.d_in, book_loss, "loss"))
        schedule.step()
    assert coefs[0] == 0 and coefs[-1] == l1 and 0 < coefs[2] < l1
    print({"max relative loss difference": rel})


def test_topk_training_loss_equals_saelens_without_auxk():
    """Book loss = SAELens MSE / d_in; SAELens's AuxK term (dead latents) is off: the book has none."""
    x, batch = planted(2048), 64
    book, batches, losses = _book_losses_at_init("topk", x, batch, k=8)
    sae = saelens_sae(book, training=True, fold_scale=False)
    assert sae.cfg.rescale_acts_by_decoder_norm   # SAELens's default; a no-op on the book's unit-norm rows
    rel = 0.0
    for idx, book_loss in zip(batches, losses, strict=True):
        out = _saelens_step(sae, x[idx] * book.scale, {})
        assert float(out.losses["auxiliary_reconstruction_loss"]) == 0.0
        rel = max(rel, _close(out.loss / book.d_in, book_loss, "loss"))
    print({"max relative loss difference": rel})


def test_book_input_scale_is_rms_where_saelens_uses_the_mean_norm():
    """Both rescale inputs by one scalar, to a different target: book E‖s·x‖² = d_in, SAELens E‖s·x‖ = √d_in.

    So book scale = SAELens factor · E‖x‖ / √E‖x‖²; they coincide only when every token has the same norm.
    """
    x = planted(2048) * torch.linspace(0.2, 3.0, 2048)[:, None]       # token norms that vary
    book, _, _ = _book_losses_at_init("topk", x, 512, k=8)
    scaler = activation_scaler.ActivationScaler()
    scaler.estimate_scaling_factor(x.shape[1], iter(x.split(256)), n_batches_for_norm_estimate=8)
    norms = x.double().norm(dim=-1)
    ratio = norms.mean() / norms.pow(2).mean().sqrt()
    rel = _close(book.scale, scaler.scaling_factor * ratio, "book scale vs SAELens factor · mean/rms")
    print({"relation": rel, "book / SAELens": float(book.scale / scaler.scaling_factor)})
    assert ratio < 0.95                                                   # a real difference on such data


# ---------------------------------------------------------------------------------------------
# FVU
# ---------------------------------------------------------------------------------------------


def test_fvu_is_one_minus_saelens_explained_variance(smollm2, minilm_sae):
    out = {}
    for name, book in (("smollm2", smollm2[0]), ("minilm", minilm_sae)):
        x = dictionary_activations(book, 2000, seed=1)                  # neither all nor none of it explained
        x_hat = book(x)[0]
        calc = ExplainedVarianceCalculator()
        for xs, hs in zip(x.split(300), x_hat.split(300), strict=True):   # streamed in uneven batches
            calc.add_batch(sae_output=hs, hidden_acts=xs)
        ev = calc.compute()
        assert 0.05 < ev < 0.95
        out[name] = {"fvu": _close(D.fvu(x, x_hat), 1 - ev, "fvu"),
                     "_evaluate": _close(D._evaluate(book, x)["fvu_tok"].mean(), 1 - ev, "_evaluate fvu_tok mean")}
    print(out)
