"""The store interface on Qdrant (`qdrant-client`), for corpora that outgrow one machine.

    qdrant://HOST:PORT/COLLECTION   a Qdrant server
    qdrant-local://DIR/COLLECTION   the client's embedded local mode, on disk in DIR
    QdrantStore(QdrantClient(location=":memory:"), "name")   in memory (tests)

Chunks live in COLLECTION with a dense vector ("dense", cosine) and a sparse
BM25 vector ("bm25": our saturated term frequencies, Qdrant applies the IDF),
payload source/ord/text/sha256. Documents and the store's metadata live in
COLLECTION__docs. Qdrant has no multi-collection transactions, so updates are
ordered to be safe to kill: new chunks (ids carry the content hash) are
written first, stale ones deleted next, and the document record, which is
what the next run compares hashes against, last; a killed run is finished
by the next one.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlparse

from ..errors import require
from .bm25 import avg_len_guess, tf_weights, tokenize
from .records import DocInfo, Hit, Meta, NewDoc, StoreError, now

_META_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "phikit:meta"))


def _doc_id(source: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "phikit:doc:" + source))


class QdrantStore:
    def __init__(self, client, collection: str, create: bool = False, label: str | None = None):
        self.client, self.collection, self.docs = client, collection, collection + "__docs"
        self.label = label or f"qdrant collection {collection!r}"
        self.M = require("qdrant_client.models", "qdrant-client", "the Qdrant store")
        try:
            exists = client.collection_exists(self.docs)
        except Exception as e:  # connection refused, timeouts, bad URLs
            raise StoreError(f"cannot reach {self.label} ({type(e).__name__}: {e}); is the Qdrant server running?") from e
        if not exists:
            if not create:
                raise StoreError(f"no RAG store in {self.label}: build one with `phikit rag index PATH --store ...`")
            client.create_collection(self.docs, vectors_config={})

    @classmethod
    def from_url(cls, url: str, create: bool = False) -> "QdrantStore":
        qc = require("qdrant_client", "qdrant-client", "the Qdrant store")
        u = urlparse(url)
        if u.scheme == "qdrant":
            coll = u.path.strip("/")
            if not (u.hostname and coll) or "/" in coll:
                raise StoreError(f"bad Qdrant store {url!r}: use qdrant://HOST:PORT/COLLECTION")
            return cls(qc.QdrantClient(host=u.hostname, port=u.port or 6333), coll, create, url)
        where, _, coll = (u.netloc + u.path).rstrip("/").rpartition("/")
        if not where or not coll:
            raise StoreError(f"bad local Qdrant store {url!r}: use qdrant-local://DIR/COLLECTION")
        client = qc.QdrantClient(location=":memory:") if where == ":memory:" else qc.QdrantClient(path=where)
        return cls(client, coll, create, url)

    def __repr__(self) -> str:
        return self.label

    @property
    def meta(self) -> Meta | None:
        got = self.client.retrieve(self.docs, [_META_ID])
        return Meta(**got[0].payload) if got else None

    def init_meta(self, meta: Meta) -> None:
        M = self.M
        if not self.client.collection_exists(self.collection):
            self.client.create_collection(
                self.collection,
                vectors_config={"dense": M.VectorParams(size=meta.dim, distance=M.Distance.COSINE)},
                sparse_vectors_config={"bm25": M.SparseVectorParams(modifier=M.Modifier.IDF)},
            )
            import warnings

            with warnings.catch_warnings():  # local mode says payload indexes do nothing there; a server uses it
                warnings.simplefilter("ignore")
                self.client.create_payload_index(self.collection, "source", M.PayloadSchemaType.KEYWORD)
        self.client.upsert(self.docs, [M.PointStruct(id=_META_ID, vector={}, payload=vars(meta))])

    def documents(self) -> list[DocInfo]:
        out, offset = [], None
        while True:
            pts, offset = self.client.scroll(self.docs, limit=1000, offset=offset, with_payload=True)
            out += [DocInfo(**p.payload) for p in pts if str(p.id) != _META_ID]
            if offset is None:
                return sorted(out, key=lambda d: d.source)

    def count(self) -> int:
        if not self.client.collection_exists(self.collection):
            return 0
        return self.client.count(self.collection).count

    def _source_filter(self, source: str, keep_sha: str | None = None):
        M = self.M
        must_not = [M.FieldCondition(key="sha256", match=M.MatchValue(value=keep_sha))] if keep_sha else None
        return M.FilterSelector(filter=M.Filter(must=[M.FieldCondition(key="source", match=M.MatchValue(value=source))], must_not=must_not))

    def apply(self, upserts: list[NewDoc], deletes: list[str]) -> None:
        M = self.M
        meta = self.meta
        if meta is None:
            raise StoreError(f"{self.label} has no metadata yet (init_meta first)")
        avgdl = avg_len_guess(meta.chunk_size)
        for d in upserts:
            pts = []
            for i, (text, vec) in enumerate(zip(d.chunks, d.vectors)):
                sp = tf_weights(tokenize(text), avgdl)
                pts.append(M.PointStruct(
                    id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"phikit:chunk:{d.source}#{d.sha256}#{i}")),
                    vector={"dense": vec.tolist(), "bm25": M.SparseVector(indices=list(sp), values=list(sp.values()))},
                    payload={"source": d.source, "ord": i, "text": text, "sha256": d.sha256}))
            for j in range(0, len(pts), 256):
                self.client.upsert(self.collection, pts[j:j + 256])
            self.client.delete(self.collection, self._source_filter(d.source, keep_sha=d.sha256))
            info = DocInfo(d.source, d.kind, d.sha256, len(d.chunks), d.chars, now())
            self.client.upsert(self.docs, [M.PointStruct(id=_doc_id(d.source), vector={}, payload=vars(info))])
        for source in deletes:
            self.client.delete(self.collection, self._source_filter(source))
            self.client.delete(self.docs, M.PointIdsList(points=[_doc_id(source)]))

    def _hits(self, points) -> list[Hit]:
        return [Hit(p.payload["source"], int(p.payload["ord"]), p.payload["text"], float(p.score)) for p in points]

    def dense(self, vector, k: int) -> list[Hit]:
        if self.count() == 0:
            return []
        res = self.client.query_points(self.collection, query=[float(x) for x in vector], using="dense", limit=k, with_payload=True)
        return self._hits(res.points)

    def bm25(self, query: str, k: int) -> list[Hit]:
        if self.count() == 0:
            return []
        ids = sorted(tf_weights(tokenize(query), 1.0))
        if not ids:
            return []
        q = self.M.SparseVector(indices=ids, values=[1.0] * len(ids))
        return self._hits(self.client.query_points(self.collection, query=q, using="bm25", limit=k, with_payload=True).points)

    def close(self) -> None:
        self.client.close()
