"""Okapi BM25 over a scipy sparse matrix.

Why our own and not a BM25 package: scikit-learn's CountVectorizer already
does the tokenising and counting (fast, C-backed), and the scoring is a few
lines on top; keeping it ours lets the index be one .npz file we write beside
and rename like every other index file, and lets the Qdrant store use exactly
the same tokens and term-frequency weights.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from pathlib import Path

TOKEN = r"(?u)\b\w+\b"
_TOKEN = re.compile(TOKEN)
K1, B = 1.5, 0.75


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def tf_weights(tokens: list[str], avgdl: float) -> dict[int, float]:
    """Sparse BM25 term-frequency part keyed by a stable 32-bit hash of the term (for Qdrant, which adds IDF itself)."""
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    norm = K1 * (1 - B + B * len(tokens) / avgdl)
    return {zlib.crc32(t.encode()): tf * (K1 + 1) / (tf + norm) for t, tf in counts.items()}


class BM25:
    """Scores of every chunk for a query: sum over query terms of idf * saturated tf."""

    def __init__(self, weights, ids, vocab: list[str]):
        self.weights = weights.tocsc()  # column slices (one per query term) are what queries need
        self.ids = ids
        self.vocab = {t: i for i, t in enumerate(vocab)}

    @classmethod
    def build(cls, ids: list[int], texts: list[str]) -> "BM25":
        import numpy as np
        from scipy import sparse
        from sklearn.feature_extraction.text import CountVectorizer

        if not texts:
            return cls(sparse.csr_matrix((0, 0), dtype="float32"), np.zeros(0, dtype="int64"), [])
        cv = CountVectorizer(token_pattern=TOKEN, lowercase=True, dtype=np.float32)
        tf = cv.fit_transform(texts).tocsr()
        n = tf.shape[0]
        dl = np.asarray(tf.sum(axis=1)).ravel()
        avgdl = max(float(dl.mean()), 1.0)
        df = np.bincount(tf.indices, minlength=tf.shape[1])
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype("float32")
        # BM25 per (chunk, term): idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * dl / avgdl))
        row_norm = K1 * (1 - B + B * dl / avgdl)
        rows = np.repeat(np.arange(n), np.diff(tf.indptr))
        data = tf.data * (K1 + 1) / (tf.data + row_norm[rows]) * idf[tf.indices]
        w = sparse.csr_matrix((data.astype("float32"), tf.indices, tf.indptr), shape=tf.shape)
        vocab = [""] * len(cv.vocabulary_)
        for t, i in cv.vocabulary_.items():
            vocab[i] = t
        return cls(w, np.asarray(ids, dtype="int64"), vocab)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """[(chunk id, score)] best first; only chunks sharing a term with the query."""
        import numpy as np

        cols = sorted({self.vocab[t] for t in tokenize(query) if t in self.vocab})
        if not cols or k <= 0:
            return []
        scores = np.asarray(self.weights[:, cols].sum(axis=1)).ravel()
        nz = np.flatnonzero(scores)
        top = nz[np.argsort(-scores[nz], kind="stable")[:k]] if len(nz) <= 4 * k else _topk(scores, k)
        return [(int(self.ids[i]), float(scores[i])) for i in top if scores[i] > 0]

    def save(self, path: Path) -> None:
        """Write to `path` atomically (beside, fsync, rename)."""
        import numpy as np

        w = self.weights.tocsr()
        tmp = Path(str(path) + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, data=w.data, indices=w.indices, indptr=w.indptr, shape=np.array(w.shape), ids=self.ids,
                     vocab=np.array(sorted(self.vocab, key=self.vocab.get), dtype=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "BM25":
        import numpy as np
        from scipy import sparse

        z = np.load(path, allow_pickle=False)
        w = sparse.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        return cls(w, z["ids"], list(z["vocab"]))


def _topk(scores, k: int):
    import numpy as np

    k = min(k, len(scores))
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def avg_len_guess(chunk_chars: int) -> float:
    """Average chunk length in tokens assumed by stores that cannot see the whole corpus (about 5.5 chars a token)."""
    return max(1.0, math.floor(chunk_chars / 5.5))
