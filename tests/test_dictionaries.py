"""Known-answer tests for helpers/dictionaries.py (sparse autoencoders and transcoders, Chapter 6c)."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import dictionaries as D


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(n=12000, d=16, n_dirs=24, active=3, seed=0):
    """Data that is a sparse non-negative combination of ``n_dirs`` planted unit directions."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_dirs, d, generator=g), dim=1)   # [dir, d]
    idx = torch.rand(n, n_dirs, generator=g).argsort(1)[:, :active]
    coef = torch.zeros(n, n_dirs).scatter_(1, idx, 0.5 + torch.rand(n, active, generator=g))
    return coef @ dirs, dirs


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=100, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_topk_sae_recovers_planted_directions():
    x, dirs = planted()
    sae, hist = D.train_sae(x, d_sae=48, kind="topk", k=3, epochs=8, batch_size=256, lr=3e-3, seed=0)
    cos = dirs @ sae.W_dec.T                                                  # [dir, latent], unit rows
    best = cos.max(1).values
    assert (best > 0.95).all(), best  # every planted direction found (min 0.986 here; 0.979-0.990 over seeds 0-2)
    assert hist["loss"][-1] < hist["loss"][0]
    assert float(D.fvu(x, sae(x)[0])) < 0.2


def test_topk_keeps_exactly_k_and_decoder_rows_are_unit_norm():
    x, _ = planted(n=2000)
    sae, _ = D.train_sae(x, d_sae=40, kind="topk", k=5, epochs=1, batch_size=256, seed=0)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40), atol=1e-5)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)                       # every pre-activation positive: ReLU keeps all k
    z = sae.encode(x)
    assert ((z > 0).sum(-1) == 5).all()
    relu, _ = D.train_sae(x, d_sae=40, kind="relu", l1=1.0, epochs=1, batch_size=256, seed=0)
    assert torch.allclose(relu.W_dec.norm(dim=1), torch.ones(40), atol=1e-5)


def identity_sae(d):
    """x -> ReLU(x) - ReLU(-x) = x with 2d latents: an exact autoencoder."""
    sae = D.SparseAutoencoder(d, 2 * d, kind="relu")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae.eval()


def test_identity_sae_spliced_into_a_tiny_llama_leaves_the_loss_unchanged():
    model = tiny_llama()
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    sae = identity_sae(32)
    site = "blocks.0.hook_resid_post"
    clean = D.next_token_loss(model, ids)
    spliced = D.next_token_loss(model, ids, edits=D.splice(model, site, lambda a: sae(a)[0]))
    zero = D.next_token_loss(model, ids, edits=D.splice(model, site, torch.zeros_like))
    assert torch.allclose(clean, spliced, atol=1e-5)
    assert not torch.allclose(clean, zero, atol=1e-3)


def test_zero_transcoder_equals_zero_ablating_the_mlp():
    model = tiny_llama()
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    tc = D.Transcoder(32, 16, 32, k=4)
    with torch.no_grad():
        tc.W_dec.zero_()
    zeroed = D.next_token_loss(model, ids, edits=D.splice(model, "blocks.1.hook_mlp_out", torch.zeros_like))
    replaced = D.next_token_loss(model, ids, edits=D.splice_transcoder(model, 1, tc))
    assert torch.allclose(zeroed, replaced, atol=1e-6)


def test_harvest_stops_early_and_keeps_every_token():
    model = tiny_llama()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    h = D.harvest(model, [{"input_ids": ids, "attention_mask": mask}], site="blocks.0.hook_resid_post")
    assert h["blocks.0.hook_resid_post"].shape == (12, 32)
    assert h["pos"].tolist() == list(range(7)) + list(range(5))


def test_measures_known_answers():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert float(D.fvu(x, x)) == 0.0
    assert float(D.fvu(x, torch.zeros_like(x))) == pytest.approx(1.0)
    assert float(D.fvu(x, x / 2, per_token=True).mean()) == pytest.approx(0.25)
    z = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    assert D.dead_latents(z).tolist() == [True, False, True]
    assert D.loss_recovered(2.0, 6.0, 3.0) == pytest.approx(0.75)
    w = D.word_type_features(torch.tensor([[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]), torch.tensor([1, 1, -1]), 3)
    assert w.tolist() == [[0.0, 0.0], [2.0, 1.0], [0.0, 0.0]]


def test_transcoder_learns_a_sparse_linear_map():
    x, _ = planted(n=6000)
    W = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    tc, _ = D.train_sae(x, targets=x @ W, d_sae=48, kind="topk", k=6, epochs=6, batch_size=256, lr=3e-3)
    assert float(D.fvu(x @ W, tc(x)[0])) < 0.2


def test_bad_input_raises_clear_errors():
    sae = D.SparseAutoencoder(8, 16, k=4)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        sae.encode(torch.randn(3, 7))
    with pytest.raises(ValueError, match="NaN"):
        sae.encode(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(ValueError, match="empty"):
        sae.encode(torch.zeros(0, 8))
    with pytest.raises(ValueError, match="k must be"):
        D.SparseAutoencoder(8, 16, k=17)
    with pytest.raises(ValueError, match="kind"):
        D.SparseAutoencoder(8, 16, kind="jumprelu")
    with pytest.raises(ValueError, match="empty"):
        D.train_sae(torch.zeros(0, 8), d_sae=16)
    with pytest.raises(ValueError, match="NaN"):
        D.train_sae(torch.full((4, 8), float("nan")), d_sae=16)
    with pytest.raises(ValueError, match="same shape"):
        D.fvu(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="gap"):
        D.loss_recovered(3.0, 2.0, 2.5)
    with pytest.raises(ValueError, match="n_words"):
        D.word_type_features(torch.ones(2, 2), torch.tensor([0, 5]), 3)


def test_stored_dictionary_round_trips_in_half_precision():
    sae = D.SparseAutoencoder(8, 16, kind="topk", k=4)
    again = D.load_dictionary(D._state(sae))
    x = torch.randn(5, 8)
    assert torch.allclose(sae(x)[0], again(x)[0], atol=1e-2)
    assert D.select({"topk-4": {"validation": {"fvu": 0.2, "l0": 4}}, "topk-8": {"validation": {"fvu": 0.1, "l0": 8}}},
                    "topk", max_fvu=0.3) == "topk-4"


def test_a_short_version_of_the_recipe_sweeps_summarises_and_selects():
    x, _ = planted(n=3000)
    r = {"d_sae": 32, "ks": [2, 4], "l1s": [0.5], "epochs": 1, "max_train": 2000}
    res = D._sweep(x[:2000], x[2000:2500], x[2500:], r, lambda *_: None)
    summary = D._summary(res)
    assert set(summary) == {"topk-2", "topk-4", "relu-0.5"}
    assert summary["topk-4"]["test"]["l0"] == pytest.approx(4.0, abs=1e-6)
    assert D.select(summary, "topk", max_fvu=1.01) == "topk-2"          # the sparsest one under the bar
    blob = D._state(res["topk-4"]["model"])
    assert all(v.dtype == torch.float16 for v in blob["state"].values() if v.ndim == 2)


def test_draw_takes_every_row_once_before_any_twice():
    x = torch.arange(10)
    head = D._draw(x, 4)
    assert torch.equal(head, x[torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4]])
    assert torch.equal(D._draw(x, 10).sort().values, x)                           # all rows, once each
    long = D._draw(x, 25)
    assert len(long) == 25 and torch.equal(long[:10].sort().values, x) and torch.equal(long[10:20].sort().values, x)
    assert torch.equal(long[:4], head)                                           # the same first permutation


def test_word_type_features_with_a_transform_equals_transforming_first():
    g = torch.Generator().manual_seed(0)
    x, words = torch.randn(20000, 4, generator=g), torch.randint(-1, 7, (20000,), generator=g)
    codes = D.SparseAutoencoder(4, 12, k=3).encode
    streamed = D.word_type_features(x, words, 7, transform=codes)                   # 8,192 tokens at a time
    assert streamed.shape == (7, 12)
    assert torch.allclose(streamed, D.word_type_features(codes(x), words, 7), atol=1e-6)


def test_fold_probe_predicts_each_fold_with_a_model_that_never_saw_it_and_ovr_proba_matches():
    import numpy as np

    rng = np.random.default_rng(0)
    X, y = rng.random((120, 6)), np.tile(np.arange(3), 40)
    X[np.arange(120), y] += 1.0                                                   # one informative feature per class
    folds = np.repeat(np.arange(4), 30)
    out = D.fold_probe(X, y, folds, Cs=[0.1, 10.0])
    assert out["coef"].shape == (4, 3, 6) and out["val_acc"].shape == (4, 2) and set(out["C"]) <= {0.1, 10.0}
    assert (out["pred"] == y).mean() > 0.9
    for k in range(4):                                                            # fold k: refit on the other folds
        clf = D.l1_probe(out["C"][k]).fit(X[folds != k], y[folds != k])
        assert np.array_equal(clf.predict(X[folds == k]), out["pred"][folds == k])
        proba = D.ovr_proba(X[folds == k], out["coef"][k], out["intercept"][k])
        assert np.abs(proba - clf.predict_proba(X[folds == k])).max() < 1e-12
    with pytest.raises(ValueError, match="folds must be 0..K-1"):
        D.fold_probe(X, y, np.repeat(np.arange(2), 60), Cs=[1.0])
    with pytest.raises(ValueError, match="finite"):
        D.fold_probe(np.full((120, 6), np.nan), y, folds, Cs=[1.0])


def test_cv_probe_chooses_c_inside_each_training_fold_and_counts_correct_predictions():
    from sklearn.model_selection import RepeatedStratifiedKFold

    rng = np.random.default_rng(1)
    X, y = rng.random((80, 5)), np.tile([0, 1], 40)
    X[:, 0] += 0.8 * y                                                            # one informative feature
    folds = list(RepeatedStratifiedKFold(n_splits=5, n_repeats=2, random_state=0).split(X, y))
    correct, chosen = D.cv_probe(X, y, folds, Cs=[0.01, 10.0])
    assert correct.shape == (80,) and correct.max() <= 2 and correct.sum() / 160 > 0.75 and len(chosen) == 10
    tr, te = folds[0]                                                             # fold 0 by hand
    from helpers import stats

    fit_i, val_i = stats.split_indices(len(tr), fraction=0.8, seed=0, labels=y[tr])
    acc = [np.mean(D.l1_probe(C).fit(X[tr[fit_i]], y[tr[fit_i]]).predict(X[tr[val_i]]) == y[tr[val_i]])
           for C in (0.01, 10.0)]
    assert chosen[0] == (0.01 if acc[0] >= acc[1] else 10.0)
    with pytest.raises(ValueError, match="folds non-empty"):
        D.cv_probe(X, y, [], Cs=[1.0])


def test_pooled_codes_average_each_sequence_without_special_tokens():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=16)).eval()
    ids = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])                       # 1, 2 special; 0 padding
    mask = (ids != 0).long()
    batch = [{"input_ids": ids, "attention_mask": mask}]
    sae = D.SparseAutoencoder(8, 12, k=3)
    pooled = D.pooled_codes(model, batch, site="blocks.1.hook_resid_post", special_ids=[1, 2], sae=sae)
    dense = D.pooled_codes(model, batch, site="blocks.1.hook_resid_post", special_ids=[1, 2])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state             # block 1 is the last block
    assert np.allclose(dense[0], h[0, 1:3].mean(0).numpy(), atol=1e-5)
    assert np.allclose(dense[1], h[1, 1].numpy(), atol=1e-5)
    assert np.allclose(pooled[0], sae.encode(h[0, 1:3]).mean(0).detach().numpy(), atol=1e-5)


def test_steering_edit_adds_the_unit_direction_and_concept_mass_sums_probabilities():
    model = tiny_llama()

    class Tok:                                                                    # ids from characters, no special
        def __call__(self, text, return_tensors=None):
            return {"input_ids": torch.tensor([[ord(c) % 100 for c in text]])}

    direction = torch.zeros(32)
    direction[3] = 2.0
    seen = {}
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        clean = model(input_ids=ids).logits
        edits = D.steering_edit(model, "blocks.0.hook_resid_post", direction, 0.5, first=2)
        with D.hooks.patches(edits()):
            with D.hooks.capture(model, "blocks.0.hook_resid_post") as cache:
                model(input_ids=ids)
            seen["x"] = cache["blocks.0.hook_resid_post"]
        plain = D.harvest(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                          site="blocks.0.hook_resid_post")["blocks.0.hook_resid_post"]
    delta = seen["x"][0] - plain
    assert torch.allclose(delta[:2], torch.zeros(2, 32)) and torch.allclose(delta[2:, 3], torch.full((3,), 0.5))
    probs = clean[0, -1].softmax(-1)
    mass = D.concept_mass(model, Tok(), ["\x01\x02\x03\x04\x05"], [7, 9])
    assert mass.shape == (1,) and mass[0] == pytest.approx(float(probs[[7, 9]].sum()), rel=1e-5)


def test_the_committed_seed_study_loads_without_retraining(monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the committed seed study should load, not retrain")

    monkeypatch.setattr(D, "train_sae", no_training)
    runs = D.seed_study()
    assert sorted(runs) == D.SEED_STUDY["seeds"]
    for seed in D.SEED_STUDY["seeds"]:
        assert set(runs[seed]) == {"minilm", "smollm2", "transcoder"}
        for name, r in runs[seed].items():
            assert 0 < r["fvu"] < 1 and 0 <= r["dead"] <= 1 and r["l0"] > 0
            if name != "minilm":
                assert r["loss"].shape == (D.RECIPE["smollm2"]["loss_windows"],)
                assert bool(torch.isfinite(r["loss"]).all())


def test_seed_metrics_count_dead_and_dense_latents():
    sae = D.SparseAutoencoder(4, 6, kind="topk", k=2)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.copy_(torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -2.0]))     # always latents 0 and 1
    m = D._seed_metrics(sae, torch.randn(50, 4))
    assert m["l0"] == 2 and m["dead"] == pytest.approx(4 / 6) and m["dense"] == pytest.approx(2 / 6)
