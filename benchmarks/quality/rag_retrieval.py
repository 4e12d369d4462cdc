"""Retrieval quality on SQuAD 2.0 eval: every paragraph is a document, each answerable
question's gold paragraph is the target. One JSON row for the ingest, one per mode (recall@1,
recall@5, MRR@10, ranking by document) and one for the abstention gate (top-chunk cosine
of on-topic, unanswerable and off-topic questions against each threshold), on stdout (and
appended to --out as JSON lines).

    python benchmarks/quality/rag_retrieval.py [--data ../shared/data] [--out benchmarks/results/rag_retrieval.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import DATA, add_out, emit  # noqa: E402


def paragraphs(path: Path):
    d = json.loads(path.read_text())
    for a in d["data"]:
        for i, p in enumerate(a["paragraphs"]):
            yield f"{a['title']}/p{i}", p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA))
    add_out(ap)
    ap.add_argument("--offtopic", type=int, default=500, help="questions from train.json (other articles) used as off-topic")
    args = ap.parse_args()
    import numpy as np

    from phikit.rag import RAG, LocalStore, index_texts
    from phikit.rag.embed import Embedder
    from phikit.rag.rag import MIN_SCORE

    data = Path(args.data) / "squad_v2"
    corpus = list(paragraphs(data / "eval.json"))
    answerable = [(q["question"], src) for src, p in corpus for q in p["qas"] if not q["is_impossible"]]
    impossible = [q["question"] for _, p in corpus for q in p["qas"] if q["is_impossible"]]
    offtopic = [q["question"] for _, p in paragraphs(data / "train.json") for q in p["qas"]][: args.offtopic]
    emb = Embedder()
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp, create=True)
        s = index_texts(store, [(src, p["context"]) for src, p in corpus], emb)
        rag = RAG(store, embedder=emb)
        t0 = time.perf_counter()
        qv = emb.encode([q for q, _ in answerable])
        q_embed_ms = (time.perf_counter() - t0) / len(answerable) * 1000
        common = {"corpus_paragraphs": len(corpus), "chunks": store.count(), "questions": len(answerable),
                  "embedder": emb.name, "chunk_size": store.meta.chunk_size, "overlap": store.meta.overlap}
        emit({"measure": "ingest", **common, "embed_s": round(s.embed_s, 2), "chunks_per_s": round(s.chunks_per_s, 1)}, args.out)
        for mode in ("dense", "bm25", "hybrid"):
            ranks, lat = [], []
            for (q, gold), v in zip(answerable, qv):
                t0 = time.perf_counter()
                hits = rag.retrieve(q, k=20, mode=mode, vector=v)
                lat.append(time.perf_counter() - t0)
                docs = list(dict.fromkeys(h.source for h in hits))  # chunks -> paragraphs, best rank kept
                ranks.append(docs.index(gold) + 1 if gold in docs else None)
            r = {"measure": "squad_retrieval", "mode": mode, **common,
                 "recall@1": round(float(np.mean([x == 1 for x in ranks])), 4),
                 "recall@5": round(float(np.mean([x is not None and x <= 5 for x in ranks])), 4),
                 "mrr@10": round(float(np.mean([1 / x if x is not None and x <= 10 else 0 for x in ranks])), 4),
                 "retrieve_ms_p50_excl_query_embedding": round(float(np.percentile(lat, 50)) * 1000, 2),
                 "query_embedding_ms_batched": round(q_embed_ms, 2)}
            emit(r, args.out)
        # The gate: best dense cosine per question, for questions whose answer is in the corpus,
        # questions about the corpus's topics with no answer (SQuAD "impossible"), and off-topic ones.
        top = {}
        for name, qs in (("answerable", [q for q, _ in answerable]), ("unanswerable_on_topic", impossible), ("off_topic", offtopic)):
            vs = qv if name == "answerable" else emb.encode(qs)
            top[name] = np.array([rag.store.dense(v, 1)[0].score for v in vs])
        gate = {"measure": "abstention_gate", "default_min_score": MIN_SCORE,
                "counts": {k: len(v) for k, v in top.items()},
                "top_cosine_p05_p50_p95": {k: [round(float(x), 3) for x in np.percentile(v, [5, 50, 95])] for k, v in top.items()},
                "fraction_gated_by_threshold": {str(t): {k: round(float(np.mean(v < t)), 4) for k, v in top.items()}
                                                for t in (0.2, 0.25, 0.3, 0.35, 0.4, 0.5)}}
        emit(gate, args.out)
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
