"""Runs the reference SINr package (PyPI ``sinr==1.4.2``) inside its own virtual environment.

Called by ``benchmarks/sinr_reference.py``; never imported by the book (the reference pins spacy 3.7
and must not enter the book's environment). Reads the tokenised corpus (a pickle of word lists),
builds SINr vectors with the package's documented workflow, and writes the node-recall vectors,
vocabulary, per-stage wall times and the package's own DistRatio (``sinr.text.evaluate.dist_ratio``)
of those vectors.

Usage: ``python sinr_reference_worker.py CORPUS.pkl OUT_DIR --window 5 --gamma 10``
"""

import argparse
import json
import pickle
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus")
    parser.add_argument("out")
    parser.add_argument("--window", type=int, required=True)
    parser.add_argument("--gamma", type=float, required=True)
    parser.add_argument("--par", default="balanced", help="networkit PLM parallelism ('none' = one thread)")
    args = parser.parse_args()

    import sinr.graph_embeddings as ge
    from sinr.text.cooccurrence import Cooccurrence
    from sinr.text.pmi import pmi_filter

    docs = pickle.loads(Path(args.corpus).read_bytes())
    out = Path(args.out)
    t0 = time.perf_counter()
    cooc = Cooccurrence()
    cooc.fit(docs, window=args.window)
    cooc.matrix = pmi_filter(cooc.matrix)
    cooc.save(str(out / "cooc.pk"))
    model = ge.SINr.load_from_cooc_pkl(str(out / "cooc.pk"))
    t1 = time.perf_counter()
    communities = model.detect_communities(gamma=args.gamma, par=args.par)
    t2 = time.perf_counter()
    model.extract_embeddings(communities)
    vectors = ge.InterpretableWordsModelBuilder(model, "reference", n_jobs=1, n_neighbors=25).build()
    t3 = time.perf_counter()
    nr = vectors.vectors.tocsr()
    # the package's own DistRatio on its own vectors (untimed): its intruder rule, for the cross-check
    # against helpers.sinr.dist_ratio(rule="package"); pick_intruder draws with random.randint
    import random

    from sinr.text.evaluate import dist_ratio as package_dist_ratio

    random.seed(0)
    package_dr = float(package_dist_ratio(vectors))
    np.savez_compressed(out / "vectors.npz", data=nr.data, indices=nr.indices, indptr=nr.indptr,
                        shape=np.array(nr.shape))
    (out / "result.json").write_text(json.dumps({
        "vocab": list(vectors.vocab),
        "graph_s": t1 - t0, "communities_s": t2 - t1, "vectors_s": t3 - t2,
        "edges": int(model.get_cooc_graph().numberOfEdges()),
        "package_dist_ratio": package_dr,
    }))


if __name__ == "__main__":
    main()
