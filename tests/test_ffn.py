"""helpers.ffn: key-value memories on tiny random Llama models (known answers: brute force, the module itself)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import ffn

VOCAB, D, D_MLP, LAYERS = 40, 16, 24, 3


def _llama(seed=0, layers=LAYERS):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=D_MLP,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)  # gains != 1, so the final-norm option matters
            else:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def _windows(n=11, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)


def _all_coefficients(model, windows):
    with ffn.capture_coefficients(model) as cache, torch.no_grad():
        model.model(input_ids=windows)
    return torch.stack([cache[layer] for layer in range(LAYERS)])  # [layer, window, pos, d_mlp]


@pytest.mark.parametrize("batch_size", [1, 4, 11])
def test_streaming_topk_per_token_equals_brute_force(batch_size):
    model, windows, k = _llama(), _windows(), 7
    trig = ffn.mine_triggers(model, windows, k=k, batch_size=batch_size, per_document=False, min_position=1)
    m = _all_coefficients(model, windows)[:, :, 1:]  # [layer, window, pos - 1, d_mlp]
    flat = m.permute(0, 3, 1, 2).reshape(LAYERS, D_MLP, -1)  # [layer, d_mlp, window * (pos - 1)]
    best, idx = flat.topk(k, dim=-1)
    n_pos = windows.shape[1] - 1
    assert trig.coef.shape == (LAYERS, D_MLP, k)
    torch.testing.assert_close(trig.coef, best, atol=1e-4, rtol=1e-4)  # batching changes the last float bits
    assert torch.equal(trig.doc, idx // n_pos)
    assert torch.equal(trig.pos, idx % n_pos + 1)
    assert trig.n_tokens == windows.shape[0] * n_pos and trig.layers == (0, 1, 2)


def test_streaming_topk_per_document_equals_brute_force():
    model, windows, k = _llama(), _windows(), 5
    trig = ffn.mine_triggers(model, windows, k=k, batch_size=3, layers=[0, 2])
    m = _all_coefficients(model, windows)[[0, 2], :, 1:]
    per_doc, where = m.max(dim=2)  # [layer, window, d_mlp]
    best, doc = per_doc.permute(0, 2, 1).topk(k, dim=-1)
    torch.testing.assert_close(trig.coef, best, atol=1e-4, rtol=1e-4)  # batching changes the last float bits
    assert torch.equal(trig.doc, doc)
    assert torch.equal(trig.pos, where.permute(0, 2, 1).gather(-1, doc) + 1)
    # the prefix of each trigger reproduces its coefficient when run alone (causal model)
    layer_slot, dim = 1, 3
    d, p = int(trig.doc[layer_slot, dim, 0]), int(trig.pos[layer_slot, dim, 0])
    with ffn.capture_coefficients(model, layers=[2]) as cache, torch.no_grad():
        model(windows[d : d + 1, : p + 1])
    torch.testing.assert_close(cache[2][0, -1, dim], trig.coef[layer_slot, dim, 0], atol=1e-5, rtol=1e-5)


def test_fewer_candidates_than_k_are_marked_missing():
    model = _llama()
    trig = ffn.mine_triggers(model, _windows(n=2), k=4, layers=[1])
    assert torch.isinf(trig.coef[..., 2:]).all() and (trig.doc[..., 2:] == -1).all()
    assert torch.isfinite(trig.coef[..., :2]).all()


def test_mining_early_layers_stops_and_matches_full_run():
    model, windows = _llama(), _windows()
    early = ffn.mine_triggers(model, windows, k=3, layers=[0])
    full = ffn.mine_triggers(model, windows, k=3)
    torch.testing.assert_close(early.coef[0], full.coef[0])
    assert all(len(m.down_proj._forward_pre_hooks) == 0 for m in ffn.feed_forward_layers(model))
    assert len(model.model.layers[0]._forward_hooks) == 0


def test_down_proj_of_coefficients_is_the_mlp_output():
    model = _llama()
    x = torch.randn(2, 5, D)
    for mlp in ffn.feed_forward_layers(model):
        torch.testing.assert_close(mlp.down_proj(ffn.coefficients(mlp, x)), mlp(x), atol=1e-5, rtol=1e-5)


def test_captured_coefficients_are_the_gated_product_of_the_mlp_input():
    model, windows = _llama(), _windows(n=2)
    inputs = {}
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda _m, a: inputs.setdefault("x", a[0]))
    try:
        m = _all_coefficients(model, windows)
    finally:
        handle.remove()
    torch.testing.assert_close(m[1], ffn.coefficients(model.model.layers[1].mlp, inputs["x"]), atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_when_the_forward_raises():
    model = _llama()
    mlps = ffn.feed_forward_layers(model)
    with pytest.raises(RuntimeError), ffn.capture_coefficients(model):
        model(torch.tensor([[1, 2]]))
        raise RuntimeError("boom")
    with pytest.raises(IndexError), ffn.intervene(model, {0: [1]}, scale=0.0):
        model(torch.tensor([[1, VOCAB + 5]]))  # token id out of the vocabulary: the forward raises
    with pytest.raises(IndexError):
        ffn.mine_triggers(model, torch.tensor([[1, 2, VOCAB + 5]]), k=1)
    assert all(len(m.down_proj._forward_pre_hooks) == 0 for m in mlps)
    assert all(len(layer._forward_hooks) == 0 for layer in model.model.layers)


def test_value_projection_shapes_and_definition():
    model = _llama()
    logits = ffn.value_logits(model, layer=2, dims=[0, 5, 7])
    assert logits.shape == (3, VOCAB)
    E, gamma = model.model.embed_tokens.weight, model.model.norm.weight
    v = model.model.layers[2].mlp.down_proj.weight[:, 5]
    torch.testing.assert_close(logits[1], E @ (gamma * v), atol=1e-5, rtol=1e-5)
    raw = ffn.value_logits(model, layer=2, dims=[5], final_norm=False)
    torch.testing.assert_close(raw[0], E @ v, atol=1e-5, rtol=1e-5)
    assert ffn.value_logits(model, layer=0).shape == (D_MLP, VOCAB)
    scores, ids = ffn.value_tokens(model, layer=2, dims=[0, 5, 7], k=4)
    assert scores.shape == ids.shape == (3, 4)
    assert torch.equal(ids[:, 0], logits.argmax(-1))


def test_concept_scores_match_explicit_z_scores():
    model, concept = _llama(), [4, 9, 17]
    z = ffn.concept_scores(model, concept, layers=[1])
    assert z.shape == (1, D_MLP)
    logits = ffn.value_logits(model, layer=1).double()
    expected = (logits[:, concept].mean(1) - logits.mean(1)) / logits.std(1, unbiased=False)
    torch.testing.assert_close(z[0].double(), expected, atol=1e-4, rtol=1e-4)


def test_intervention_moves_the_output_and_is_undone():
    model, ids = _llama(), torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(ids).logits
        with ffn.intervene(model, {1: [0, 3]}, value=4.0), ffn.capture_coefficients(model, layers=[1]) as m:
            during = model(ids).logits
        after = model(ids).logits
        with ffn.intervene(model, {1: list(range(D_MLP))}, scale=0.0):
            no_mlp = model.model.layers[1].mlp(torch.randn(1, 2, D))
    assert torch.all(m[1][..., [0, 3]] == 4.0)
    assert not torch.allclose(before, during)
    torch.testing.assert_close(before, after)
    assert float(no_mlp.abs().max()) == 0.0


def test_token_windows():
    class Tok:  # word length as token id; id 0 is the document separator
        eos_token = "<eos>"

        def convert_tokens_to_ids(self, token):
            return {"<|endoftext|>": 0}.get(token, 99)

        def convert_ids_to_tokens(self, i):
            return {0: "<|endoftext|>"}.get(i, "<unk>")

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[len(w) for w in text.split()] for text in texts]}

    w = ffn.token_windows(Tok(), ["a bb ccc dddd eeeee", "x y"], length=2)
    assert w.tolist() == [[0, 1, 2], [0, 3, 4], [0, 1, 1]]
    assert ffn.token_windows(Tok(), ["a bb ccc dddd eeeee", "x y"], length=2, per_text=1).tolist() == [
        [0, 1, 2],
        [0, 1, 1],
    ]
    assert ffn.token_windows(Tok(), ["a bb ccc"], length=3, start_token="").tolist() == [[1, 2, 3]]
    assert ffn.token_windows(Tok(), ["a bb"], length=1, start_token="<eos>").tolist() == [[99, 1], [99, 2]]


def test_bad_inputs_say_what_to_do():
    model, windows = _llama(), _windows()
    with pytest.raises(ValueError, match="out of range"):
        ffn.mine_triggers(model, windows, layers=[LAYERS])
    with pytest.raises(ValueError, match="out of range"):
        ffn.value_logits(model, layer=-1)
    with pytest.raises(ValueError, match="k must be a positive"):
        ffn.mine_triggers(model, windows, k=0)
    with pytest.raises(ValueError, match="k must be a positive"):
        ffn.value_tokens(model, layer=0, dims=[0], k=-2)
    with pytest.raises(ValueError, match="empty"):
        ffn.mine_triggers(model, windows[:0])
    with pytest.raises(ValueError, match="token ids"):
        ffn.mine_triggers(model, windows.float())
    with pytest.raises(ValueError, match="non-empty"):
        ffn.token_windows(None, [])
    with pytest.raises(ValueError, match="non-empty"):
        ffn.token_windows(None, ["", "  "])
    with pytest.raises(ValueError, match="per_text"):
        ffn.token_windows(None, ["a b"], per_text=0)
    with pytest.raises(ValueError, match="dims"):
        ffn.value_logits(model, layer=0, dims=[D_MLP])
    with pytest.raises(ValueError, match="token_ids"):
        ffn.concept_scores(model, [])
    with pytest.raises(ValueError, match="exactly one"):
        with ffn.intervene(model, {0: [1]}):
            pass
    with pytest.raises(ValueError, match="Llama-style"):
        ffn.feed_forward_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="training mode"):
        ffn.mine_triggers(model.train(), windows)


def test_random_memories_are_a_disjoint_control_in_the_same_layers():
    chosen = {0: [1, 2, 3], 2: [7]}
    rand = ffn.random_memories(chosen, D_MLP, seed=3)
    assert {k: len(v) for k, v in rand.items()} == {0: 3, 2: 1}
    assert not set(rand[0]) & set(chosen[0]) and rand[2] != [7]
    assert rand == ffn.random_memories(chosen, D_MLP, seed=3) and rand != ffn.random_memories(chosen, D_MLP, seed=4)
    with pytest.raises(ValueError, match="only 0 memories"):
        ffn.random_memories({0: list(range(D_MLP))}, D_MLP)


def test_batched_next_token_probs_equal_one_prompt_at_a_time():
    model = _llama()
    prompts = [[5, 6, 7, 8, 9], [4], [10, 11, 12]]
    batched = ffn.next_token_probs(model, prompts, pad_id=0, batch_size=3)
    with torch.no_grad():
        alone = torch.stack([model(input_ids=torch.tensor([p])).logits[0, -1].softmax(-1) for p in prompts])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)
    with ffn.intervene(model, {1: [0, 1, 2]}, value=4.0):
        edited = ffn.next_token_probs(model, prompts)
    assert not torch.allclose(edited, batched, atol=1e-3)


def test_next_token_losses_are_the_cross_entropy_of_the_next_token():
    model, windows = _llama(), _windows(n=3, length=6)
    loss, top = ffn.next_token_losses(model, windows, first=1, batch_size=2)
    with torch.no_grad():
        logp = model(input_ids=windows).logits.log_softmax(-1)          # [window, pos, vocab]
    expected = -logp[:, 1:-1].gather(-1, windows[:, 2:, None])[..., 0]
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(top, logp[:, 1:-1].argmax(-1)) and loss.shape == (3, 4)


def _on_q4_1_grid(w, block=4):
    # round each block of a matrix to 16 levels between its min and max, as GGUF's Q4_1 stores it
    b = w.reshape(w.shape[0], -1, block)
    lo, hi = b.min(-1, keepdim=True).values, b.max(-1, keepdim=True).values
    d = (hi - lo) / 15
    return (lo + ((b - lo) / d).round() * d).reshape(w.shape), d[..., 0]


def test_quantisation_steps_recover_the_grid_of_a_rounded_matrix():
    w, d = _on_q4_1_grid(torch.randn(6, 16))
    torch.testing.assert_close(ffn.quantisation_steps(w, block=4), d)
    assert ffn.grid_share(w, block=4) == 1.0
    assert ffn.grid_share(torch.randn(6, 32), block=16) < 0.3           # full precision: only min and max
    q8 = torch.randint(-127, 128, (3, 8)).float() * 0.01
    q8[:, 0] = 1.27                                                     # the block's largest |w| sets d
    torch.testing.assert_close(ffn.quantisation_steps(q8, scheme="Q8_0", block=8), torch.full((3, 1), 0.01))
    assert ffn.grid_share(q8, scheme="Q8_0", block=8) == 1.0
    with pytest.raises(ValueError, match="divisible by 32"):
        ffn.quantisation_steps(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="scheme"):
        ffn.quantisation_steps(w, scheme="Q5_K", block=4)


def _llama_on_q4_1_grid():
    """A tiny Llama with every projection on a Q4_1 grid of 8-weight blocks, as a de-quantised GGUF model."""
    model = _llama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_proj.weight"):
                p.copy_(_on_q4_1_grid(p, block=8)[0])
    return model


def test_rounding_noise_has_the_size_of_one_rounding_error_and_is_undone():
    model = _llama_on_q4_1_grid()
    schemes = {"_proj.weight": "Q4_1"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w = model.model.layers[0].mlp.up_proj.weight
    d = ffn.quantisation_steps(w, block=8)
    with ffn.rounding_noise(model, seed=0, schemes=schemes, block=8) as info:
        noise = (w.detach() - before["model.layers.0.mlp.up_proj.weight"]).reshape(*d.shape, 8)
        assert (noise.abs() <= d[..., None] / 2 + 1e-6).all()           # never more than half a step
        ratio = noise.pow(2).mean().sqrt() / (d.pow(2).mean().sqrt() / 12 ** 0.5)
        assert 0.8 < float(ratio) < 1.2                                  # uniform: RMS = d / sqrt(12)
        assert 0 < info["relative_rms"] < 0.2
        assert torch.equal(model.model.norm.weight, before["model.norm.weight"])   # gains untouched
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "weights not restored"
    with pytest.raises(ValueError, match="no parameter name"):
        with ffn.rounding_noise(model, schemes={"nothing.weight": "Q4_1"}, block=8):
            pass


def test_value_summary_matches_the_full_projection():
    model = _llama()
    summary = ffn.value_summary(model, k=5, chunk=7)
    for layer in range(LAYERS):
        top = ffn.value_logits(model, layer=layer).topk(5, dim=-1)
        assert torch.equal(summary["top1"][layer], top.indices[:, 0])
        torch.testing.assert_close(summary["kth"][layer], top.values[:, -1])
        tokens = torch.randint(0, VOCAB, (D_MLP, 3))
        torch.testing.assert_close(ffn.value_logits_at(model, layer=layer, tokens=tokens),
                                   ffn.value_logits(model, layer=layer).gather(1, tokens), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="tokens must be"):
        ffn.value_logits_at(model, layer=0, tokens=torch.zeros(3, 2, dtype=torch.long))


def test_trigger_study_is_the_mining_and_its_coefficients_can_be_recomputed():
    model, windows = _llama(), _windows()
    study = ffn.trigger_study(model, windows, k=4, batch_size=3)
    trig = ffn.mine_triggers(model, windows, k=4, batch_size=3)
    assert study["doc"].dtype == torch.int16 and study["pos"].dtype == torch.int8
    assert torch.equal(study["doc"].long(), trig.doc) and torch.equal(study["pos"].long(), trig.pos)
    torch.testing.assert_close(study["kth"], trig.coef[..., -1])
    assert study["n_tokens"] == trig.n_tokens
    upper = ffn.trigger_study(model, windows, k=4, batch_size=3, layers=[1, 2])     # layers are independent
    assert torch.equal(upper["doc"], study["doc"][1:]) and torch.equal(upper["pos"], study["pos"][1:])
    layer, dim = 2, 5
    m = ffn.trigger_coefficients(model, windows, layer=layer, dims=[dim] * 4, docs=trig.doc[layer, dim],
                                 positions=trig.pos[layer, dim])
    torch.testing.assert_close(m, trig.coef[layer, dim], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="same length"):
        ffn.trigger_coefficients(model, windows, layer=0, dims=[1, 2], docs=[0], positions=[1])


def test_committed_results_are_named_by_their_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CACHE", str(tmp_path))
    model, windows = _llama(), _windows()
    key = ffn.model_key(model)
    assert key == ffn.model_key(_llama()) and key != ffn.model_key(_llama(seed=1))
    assert ffn.tokens_key(windows) != ffn.tokens_key(windows[:-1])
    first = ffn.trigger_results(model, windows, k=3, batch_size=4, key=key)       # two files: layers 0-1, 2
    files = sorted((tmp_path / "results" / "ch5").glob("triggers-*.npz"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    again = ffn.trigger_results(model, windows, k=3, batch_size=4, key=key)       # loaded, not rebuilt
    assert [f.stat().st_mtime_ns for f in files] == stamps
    whole = ffn.trigger_study(model, windows, k=3, batch_size=4)
    for name in ("doc", "pos", "kth"):
        assert torch.equal(first[name], again[name]) and torch.equal(first[name], whole[name].to(first[name].dtype))
    assert first["doc"].dtype == torch.long and first["n_tokens"] == whole["n_tokens"]
    ffn.trigger_results(model, windows, k=2, batch_size=4, key=key)               # another recipe, other files
    assert len(list((tmp_path / "results" / "ch5").glob("triggers-*.npz"))) == 4


def test_rounding_noise_study_compares_each_seed_with_the_model():
    model = _llama_on_q4_1_grid()
    windows = _windows(n=3, length=8)
    study = ffn.rounding_noise_study(model, windows, seeds=(0, 1), k=3, batch_size=2,
                                     schemes={"_proj.weight": "Q4_1"}, block=8)
    base_ce, _ = ffn.next_token_losses(model, windows)
    torch.testing.assert_close(study["base_ce"], base_ce)
    assert study["noisy_ce"].shape == study["flipped"].shape == (2, 3) and study["kept"].shape == (2,)
    assert ((study["kept"] >= 0) & (study["kept"] <= 1)).all()
    assert ((study["flipped"] >= 0) & (study["flipped"] <= 1)).all()
    assert not torch.allclose(study["noisy_ce"][0], base_ce.mean(1))              # the noise changes the losses
    with ffn.rounding_noise(model, seed=1, schemes={"_proj.weight": "Q4_1"}, block=8):
        ce1, _ = ffn.next_token_losses(model, windows)
    torch.testing.assert_close(study["noisy_ce"][1], ce1.mean(1))


def test_steering_study_matches_its_parts():
    model, windows = _llama(), _windows(n=3, length=8)
    memories, controls = {1: [0, 2], 2: [5]}, [ffn.random_memories({1: [0, 2], 2: [5]}, D_MLP, seed=s) for s in (0, 1)]
    neutral, musical, held = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]], [3, 4, 5]
    study = ffn.steering_study(model, memories, controls, strengths=(1.0, 3.0), neutral=neutral, musical=musical,
                               held_ids=held, windows=windows, set_to=3.0, n_new=4)
    assert study["chosen"].shape == study["random"].shape == (2, 2) and study["ce_chosen"].shape == (2, 3)
    up = ffn.held_out_mass(model, neutral, held, edit=ffn.intervene(model, memories, value=3.0))
    torch.testing.assert_close(study["chosen"][1], up)
    rand = (ffn.held_out_mass(model, neutral, held, edit=ffn.intervene(model, controls[0], value=1.0))
            + ffn.held_out_mass(model, neutral, held, edit=ffn.intervene(model, controls[1], value=1.0))) / 2
    torch.testing.assert_close(study["random"][0], rand)
    torch.testing.assert_close(study["ce_random"][1],
                               ffn.window_losses(model, windows, edit=ffn.intervene(model, controls[0], value=3.0)))
    probs = ffn.next_token_probs(model, musical)[:, held].sum(-1).double() * 100
    torch.testing.assert_close(study["base_m"], probs)
    assert study["gens"]["chosen"] == ffn.greedy_ids(model, neutral[0], n=4, edit=ffn.intervene(model, memories,
                                                                                                 value=3.0))
    assert len(study["gens"]["unedited"]) == 4


def test_committed_chapter_results_are_small_verified_and_complete():
    from helpers import common

    folder = common.WEIGHTS_DIR / "results" / "ch5"
    shapes = {"triggers": {"doc": (15, 1536, 25), "pos": (15, 1536, 25), "kth": (15, 1536)},
              "rounding-noise": {"base_ce": (16, 63), "noisy_ce": (3, 16), "flipped": (3, 16), "kept": (3,)},
              "steering": {"chosen": (3, 32), "random": (3, 32), "ce_chosen": (3, 16), "down_ctrl": (16,)},
              "knockout": {"clean": (180, 5, 11), "knocked": (180, 5, 11), "control_knocked": (180, 5, 11),
                           "dim": (180,), "control": (180,)}}
    for study, expected in shapes.items():
        files = sorted(folder.glob(f"{study}-*.npz"))
        assert len(files) == (2 if study == "triggers" else 1), study
        for path in files:
            assert common.verified(path) and path.stat().st_size < 2 << 20
            result = ffn._load_result(path)
            assert {k: tuple(result[k].shape) for k in expected} == expected
    triggers = [ffn._load_result(p) for p in sorted(folder.glob("triggers-*.npz"))]
    assert all(t["n_tokens"] == 32000 and 0 <= int(t["doc"].min()) and int(t["doc"].max()) < 500 for t in triggers)


def test_knockout_changes_one_memory_at_one_position_only():
    from helpers import hooks

    model, windows = _llama(), _windows()
    layer, n = 1, 7
    g = torch.Generator().manual_seed(3)
    docs, pos = torch.randint(0, len(windows), (n,), generator=g), torch.randint(1, 8, (n,), generator=g)
    dims = torch.randint(0, D_MLP, (n,), generator=g)
    dims[2] = -1                                                         # one row with nothing knocked out
    tokens = torch.randint(0, VOCAB, (n, 3), generator=g)
    got = ffn.knockout_logprobs(model, windows, layer=layer, dims=dims, docs=docs, positions=pos, tokens=tokens,
                                batch_size=3)                            # sorted and truncated batches
    for i in range(n):                                                   # one full window at a time, by hand
        def zero(m, i=i):
            m = m.clone()
            if dims[i] >= 0:
                m[0, pos[i], dims[i]] = 0.0
            return m

        with torch.no_grad(), hooks.patch(model, f"blocks.{layer}.mlp.hook_post", fn=zero):
            logp = model(windows[docs[i]][None]).logits[0, pos[i]].double().log_softmax(-1)
        torch.testing.assert_close(got[i], logp[tokens[i]], atol=1e-5, rtol=1e-5)
    clean = ffn.knockout_logprobs(model, windows, layer=layer, dims=torch.full((n,), -1), docs=docs, positions=pos,
                                  tokens=tokens)
    assert torch.equal(clean[2], got[2]) and not torch.allclose(clean, got)
    with torch.no_grad():                                                # a memory with no value changes nothing
        model.model.layers[layer].mlp.down_proj.weight[:, dims[0]] = 0.0
    dead = ffn.knockout_logprobs(model, windows, layer=layer, dims=dims[:1], docs=docs[:1], positions=pos[:1],
                                 tokens=tokens[:1])
    off = ffn.knockout_logprobs(model, windows, layer=layer, dims=[-1], docs=docs[:1], positions=pos[:1],
                                tokens=tokens[:1])
    torch.testing.assert_close(dead, off, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="positions"):
        ffn.knockout_logprobs(model, windows, layer=layer, dims=[0], docs=[0], positions=[9], tokens=tokens[:1])
    with pytest.raises(ValueError, match="same n"):
        ffn.knockout_logprobs(model, windows, layer=layer, dims=[0, 1], docs=[0], positions=[1], tokens=tokens[:1])


def test_knockout_study_draws_memories_with_their_triggers_and_controls():
    model, windows = _llama(), _windows()
    trig = ffn.trigger_study(model, windows, k=4, batch_size=3)
    trig = {"doc": trig["doc"].long(), "pos": trig["pos"].long()}
    out = ffn.knockout_study(model, windows, trig, per_layer=2, n_triggers=3, top_tokens=4, seed=0)
    assert out["clean"].shape == out["knocked"].shape == (2 * LAYERS, 3, 5)
    assert (out["control"] != out["dim"]).all() and (out["pos"] + 1 < windows.shape[1]).all()
    for i in range(len(out["dim"])):        # the rows are the memories' own triggers, strongest first
        l, d = int(out["layer"][i]), int(out["dim"][i])
        assert set(zip(out["doc"][i].tolist(), out["pos"][i].tolist(), strict=True)) <= set(
            zip(trig["doc"][l, d].tolist(), trig["pos"][l, d].tolist(), strict=True))
    assert not torch.allclose(out["knocked"], out["clean"]) and not torch.allclose(out["control_knocked"], out["clean"])


def test_top1_agreement_is_the_value_top_token_against_the_token_after_the_top_trigger_by_brute_force():
    model, windows = _llama(), _windows(n=6, length=9)
    got = ffn.top1_agreement(model, windows, batch_size=4)
    coef = _all_coefficients(model, windows)                       # [layer, window, pos, d_mlp]
    top1 = ffn.value_summary(model, k=1)["top1"]
    for layer in range(LAYERS):
        c = coef[layer][:, 1:]                                               # min_position = 1
        best = c.reshape(-1, D_MLP).argmax(0)                      # flat (window, pos - 1) of each memory's top
        win, pos = best // c.shape[1], best % c.shape[1] + 1
        valid = pos + 1 < windows.shape[1]
        following = windows[win, (pos + 1).clamp(max=windows.shape[1] - 1)]
        assert torch.equal(got["valid"][layer], valid)
        assert torch.equal(got["hit"][layer], (top1[layer] == following) & valid)
    assert got["hit"].shape == (LAYERS, D_MLP) and not (got["hit"] & ~got["valid"]).any()


def test_rounding_agreement_study_pairs_the_model_with_each_seed():
    model = _llama_on_q4_1_grid()
    windows = _windows(n=4, length=8)
    schemes = {"_proj.weight": "Q4_1"}
    study = ffn.rounding_agreement_study(model, windows, seeds=(0, 1), batch_size=2, schemes=schemes, block=8)
    with ffn.rounding_noise(model, seed=1, schemes=schemes, block=8):
        one = ffn.top1_agreement(model, windows, batch_size=2)
    base = ffn.top1_agreement(model, windows, batch_size=2)
    assert torch.equal(study["base"]["hit"], base["hit"]) and torch.equal(study["base"]["valid"], base["valid"])
    assert study["noisy"]["hit"].shape == (2, LAYERS, D_MLP)
    assert torch.equal(study["noisy"]["hit"][1], one["hit"])
