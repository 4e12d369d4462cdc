"""Ingest throughput and query latency of the local RAG store at 10k and 100k chunks,
beside a plain FAISS flat index holding the same vectors, in the same run.

What is measured (each JSON line says which):
- `embed`: the real MiniLM-L6 embedder on synthetic chunks (chunks/s on this machine).
- `ingest`: `index_texts` into a fresh store: chunking, SQLite, FAISS, BM25, atomic writes.
  At sizes <= --real-upto the embeddings are real (true end-to-end chunks/s); above it they
  are real MiniLM vectors of a sample of chunks reused cyclically with small noise and
  re-normalised ("reused"), so the store side is timed at full size without hours of CPU
  embedding; end_to_end_chunks_per_s_est then combines it with the measured embed rate.
- `faiss_flat`: IndexFlatIP.add of the same vectors (the peer).
- `query`: p50/p95 of RAG.retrieve for dense, bm25 and hybrid (k=4, query vector given)
  and of a bare IndexFlatIP.search of the same query vectors; the query embedding's own
  latency is reported once under `embed`.
- `reindex`: a second run over the same texts (hash check only) and a one-document change.

    python benchmarks/speed/rag_scale.py [--sizes 10000 100000] [--real-upto 10000] [--out benchmarks/results/rag_scale.jsonl]

One JSON row per measurement on stdout (and appended to --out as JSON lines).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import common  # noqa: E402

CHUNKS_PER_DOC = 5


def synthetic_docs(n_chunks: int, seed: int = 0) -> list[tuple[str, str]]:
    """Documents of ~5 chunks each (paragraphs of ~480 chars, so each chunk is one paragraph plus
    overlap): Zipf-distributed pseudo-words in sentences. The real chunk count is reported."""
    rng = random.Random(seed)
    syl = ["ka", "to", "ri", "men", "sa", "lo", "ver", "di", "an", "mo", "el", "tu", "bra", "si", "no", "qua"]
    vocab = sorted({"".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(20000)})
    weights = [1 / (i + 1) for i in range(len(vocab))]
    docs = []
    for d in range(max(1, n_chunks // CHUNKS_PER_DOC)):
        paras = []
        for _ in range(CHUNKS_PER_DOC):
            words = rng.choices(vocab, weights, k=75)
            sents, i = [], 0
            while i < len(words):
                n = rng.randint(8, 18)
                sents.append(" ".join(words[i:i + n]).capitalize() + ".")
                i += n
            paras.append(" ".join(sents))
        docs.append((f"synthetic/doc{d:06d}", "\n\n".join(paras)))
    return docs


def pct(xs, p):
    import numpy as np

    return round(float(np.percentile(xs, p)) * 1000, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--real-upto", type=int, default=10000, help="sizes up to this embed every chunk for real")
    ap.add_argument("--sample", type=int, default=2000, help="chunks embedded for real to measure the embedder and to reuse")
    ap.add_argument("--queries", type=int, default=200)
    common.add_out(ap)
    ap.add_argument("--note", default=None, help="recorded in every row (e.g. where and with which weights it ran)")
    args = ap.parse_args()
    import faiss
    import numpy as np

    from phikit.rag import RAG, LocalStore, index_texts
    from phikit.rag.chunk import chunk_text
    from phikit.rag.embed import Embedder

    tag = {"note": args.note} if args.note else {}  # in every row

    real = Embedder()
    sample = [c for _, t in synthetic_docs(args.sample, seed=1) for c in chunk_text(t)][: args.sample]
    t0 = time.perf_counter()
    pool = real.encode(sample)
    embed_rate = len(sample) / (time.perf_counter() - t0)
    qtexts = [c.split(". ")[0] for c in sample[: args.queries]]
    lat = []
    for q in qtexts[:50]:
        t0 = time.perf_counter()
        real.encode([q])
        lat.append(time.perf_counter() - t0)
    qvecs = real.encode(qtexts)
    common.emit({"measure": "embed", "embedder": real.name, "device": str(real.model.device), "chunks": len(sample), "avg_chunk_chars": round(float(np.mean([len(c) for c in sample])), 1),
                 "chunks_per_s": round(embed_rate, 1), "query_embed_ms_p50": pct(lat, 50), "query_embed_ms_p95": pct(lat, 95), **tag}, args.out)

    class Reused(Embedder):
        """Real MiniLM vectors of the sample, reused cyclically with small noise (see the module docstring)."""

        def __init__(self):
            self.name, self.dim, self.model, self.i = real.name, real.dim, None, 0
            self.rng = np.random.default_rng(0)

        def encode(self, texts, batch_size=64):
            idx = (self.i + np.arange(len(texts))) % len(pool)
            self.i += len(texts)
            v = pool[idx] + self.rng.normal(0, 0.02, (len(texts), self.dim)).astype("float32")
            return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype("float32")

    for n in args.sizes:
        docs = synthetic_docs(n)
        emb = real if n <= args.real_upto else Reused()
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalStore(tmp, create=True)
            s = index_texts(store, docs, emb)
            chunks = store.count()
            store_s = s.total_s - s.embed_s
            d = {"measure": "ingest", "chunks": chunks, "documents": len(docs), "embeddings": "real" if emb is real else "reused",
                 "total_s": round(s.total_s, 2), "embed_s": round(s.embed_s, 2), "store_side_s": round(store_s, 2),
                 "store_side_chunks_per_s": round(chunks / store_s, 1)}
            if emb is real:
                d["end_to_end_chunks_per_s"] = round(chunks / s.total_s, 1)
            else:
                d["end_to_end_chunks_per_s_est"] = round(1 / (1 / embed_rate + store_s / chunks), 1)
            # The peer gets exactly the vectors the store holds (order does not matter to a flat index).
            vecs = faiss.downcast_index(store._load_faiss().index).reconstruct_n(0, chunks)
            flat = faiss.IndexFlatIP(real.dim)
            t0 = time.perf_counter()
            flat.add(vecs)
            d["faiss_flat_add_s"] = round(time.perf_counter() - t0, 4)
            d["faiss_flat_add_chunks_per_s"] = round(chunks / max(time.perf_counter() - t0, 1e-9), 1)
            common.emit({**d, **tag}, args.out)
            rag = RAG(store, embedder=real)
            q = {"measure": "query", "chunks": chunks, "k": 4, "queries": len(qtexts), "note": "query vector given; add query_embed_ms for a full query"}
            # Methods take turns on each query, so a busy machine slows them alike.
            methods = {m: (lambda t, v, m=m: rag.retrieve(t, k=4, mode=m, vector=v)) for m in ("dense", "bm25", "hybrid")}
            methods["faiss_flat"] = lambda t, v: flat.search(v.reshape(1, -1), 4)
            lat = {m: [] for m in methods}
            for t, v in zip(qtexts, qvecs):
                for m, f in methods.items():
                    t0 = time.perf_counter()
                    f(t, v)
                    lat[m].append(time.perf_counter() - t0)
            for m, xs in lat.items():
                q[f"{m}_ms_p50"], q[f"{m}_ms_p95"] = pct(xs, 50), pct(xs, 95)
            common.emit({**q, **tag}, args.out)
            s2 = index_texts(store, docs, emb)
            changed = list(docs)
            changed[0] = (docs[0][0], docs[0][1] + "\n\nOne more sentence about nothing.")
            s3 = index_texts(store, changed, emb)
            common.emit({"measure": "reindex", "chunks": chunks, "unchanged_run_s": round(s2.total_s, 2), "unchanged": len(s2.unchanged),
                         "one_doc_changed_s": round(s3.total_s, 2), "updated": len(s3.updated), **tag}, args.out)
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
