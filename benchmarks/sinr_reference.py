"""Chapter 2's SINr against the reference package (PyPI ``sinr==1.4.2``), side by side in one run.

Both implementations get the identical tokenised corpus (``helpers.sinr.book_corpus()``: Wikipedia
subset + Austen, stop words and words seen < 5 times removed), the same window and the same
Louvain resolution γ. The reference runs in its own virtual environment (it pins spacy 3.7, so it
must not enter the book's), created on first use under the book cache with ``pip install sinr==1.4.2``;
``benchmarks/sinr_reference_worker.py`` drives it with its documented workflow (``Cooccurrence`` →
``pmi_filter`` → ``SINr.load_from_cooc_pkl`` → ``detect_communities`` → ``extract_embeddings`` →
``InterpretableWordsModelBuilder``).

Recorded per system: wall time of graph building (co-occurrence + PMI filter + graph), community
detection and vector extraction (median of ``--repeats`` alternating runs, since the CPU may be
shared), the number of edges and dimensions, and quality measured by the *same* code on both
node-recall matrices (helpers.sinr: WS353 and SimLex-999 Spearman with coverage, DistRatio with the
book's intruder rule and with ``rule="package"``), plus the package's own ``dist_ratio`` on its
vectors (``reference.dist_ratio_package_code``), which ``rule="package"`` should match within the
spread of intruder draws.
``time_ratio`` = ours / reference over the three stages (goal <= 1.0, at WS353 within 0.02), at
each γ in ``by_gamma`` and, at the top level, at the first γ (Chapter 2's). The reference calls
networkit's PLM with ``recurse=False``, so at the same γ it stops with more, smaller communities than
a full Louvain; several γ values show quality at comparable numbers of dimensions.
Writes ``benchmarks/results/sinr_reference.json``.

Usage: ``python benchmarks/sinr_reference.py [--window 5] [--gammas 5 10] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import sparse

from helpers import common, sinr
from helpers.assets import word_similarity

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "sinr_reference.json"
WORKER = ROOT / "benchmarks" / "sinr_reference_worker.py"
REFERENCE = "sinr==1.4.2"


def reference_python() -> Path:
    """The interpreter of the reference's isolated virtual environment, created on first use."""
    venv = common.cache_dir("venvs") / REFERENCE.replace("==", "-")
    python = venv / "bin" / "python"
    if not python.exists() or subprocess.run([python, "-c", "import sinr.graph_embeddings"],
                                             capture_output=True).returncode != 0:
        print(f"creating {venv} with {REFERENCE} (first run only)", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", REFERENCE], check=True)
    return python


def run_reference(python: Path, corpus_pkl: Path, window: int, gamma: float, work: Path) -> dict:
    """Run the reference once; returns its timings, vocabulary and node-recall matrix."""
    for f in work.glob("*"):
        f.unlink()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    subprocess.run([python, WORKER, corpus_pkl, work, "--window", str(window), "--gamma", str(gamma)],
                   check=True, capture_output=True, env=env)
    result = json.loads((work / "result.json").read_text())
    with np.load(work / "vectors.npz") as z:
        result["vectors"] = sparse.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
    return result


def run_ours(corpus: sinr.Corpus, window: int, gamma: float) -> dict:
    """Run helpers.sinr once with the same stage boundaries as the reference."""
    emb = sinr.train(corpus, window=window, gamma=gamma, seed=0)
    t = emb.info["timings"]
    return {"vocab": list(emb.words), "vectors": emb.vectors, "graph_s": t.graph_s, "communities_s": t.communities_s,
            "vectors_s": t.vectors_s, "edges": emb.info["edges"]}


def quality(vectors: sparse.csr_matrix, vocab: list[str]) -> dict:
    index = {w: i for i, w in enumerate(vocab)}
    out = {"dims": int(vectors.shape[1]), "words": int(vectors.shape[0])}
    for name in ("ws353", "simlex999"):
        rho, coverage = sinr.similarity_correlation(vectors, index, word_similarity(name))
        out[name] = round(rho, 4)
        out[f"{name}_coverage"] = round(coverage, 4)
    out["dist_ratio"] = round(sinr.dist_ratio(vectors), 4)
    out["dist_ratio_package_rule"] = round(sinr.dist_ratio(vectors, rule="package"), 4)
    return out


def compare(corpus, python, corpus_pkl, window, gamma, repeats, work) -> dict:
    """Alternate ``repeats`` runs of both systems at one γ; median times, quality of the first run."""
    stages = ("graph_s", "communities_s", "vectors_s")
    runs = {"ours": [], "reference": []}
    for _ in range(repeats):
        runs["reference"].append(run_reference(python, corpus_pkl, window, gamma, work))
        runs["ours"].append(run_ours(corpus, window, gamma))
    out = {}
    for name, rs in runs.items():
        times = {s: round(statistics.median(r[s] for r in rs), 3) for s in stages}
        times["total_s"] = round(sum(times.values()), 3)
        out[name] = {**times, "edges": rs[0]["edges"], **quality(rs[0]["vectors"], rs[0]["vocab"])}
    # the package's own dist_ratio code on its vectors: checks helpers.sinr's rule="package" re-implementation
    out["reference"]["dist_ratio_package_code"] = round(runs["reference"][0]["package_dist_ratio"], 4)
    out["time_ratio"] = round(out["ours"]["total_s"] / out["reference"]["total_s"], 3)
    out["stage_ratios"] = {s: round(out["ours"][s] / out["reference"][s], 3) for s in stages}
    out["ws353_gap"] = round(out["ours"]["ws353"] - out["reference"]["ws353"], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--gammas", type=float, nargs="+", default=[5.0, 10.0], help="Chapter 2 uses 5")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    corpus = sinr.book_corpus()
    python = reference_python()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
        "reference": REFERENCE,
        "corpus": {"raw_tokens": corpus.raw_tokens, "tokens": corpus.n_tokens, "documents": corpus.n_documents,
                   "vocab": len(corpus.words), "same_input_for_both": True},
        "window": args.window,
        "repeats": args.repeats,
        "by_gamma": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus_pkl = work / "corpus.pkl"
        corpus_pkl.write_bytes(pickle.dumps(corpus.documents()))
        (work / "ref").mkdir()
        for gamma in args.gammas:
            report["by_gamma"][f"{gamma:g}"] = compare(corpus, python, corpus_pkl, args.window, gamma, args.repeats,
                                                       work / "ref")
    first = report["by_gamma"][f"{args.gammas[0]:g}"]
    report.update(gamma=args.gammas[0], ours=first["ours"], reference=first["reference"],
                  time_ratio=first["time_ratio"], ws353_gap=first["ws353_gap"])
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
