"""The local RAG store: one folder with a SQLite database, a FAISS index and a BM25 index.

    DIR/rag.sqlite        meta (embedder, dim, chunking, generation), documents, chunks
    DIR/vectors.<g>.faiss FAISS IndexIDMap2(IndexFlatIP) keyed by chunk id
    DIR/bm25.<g>.npz      BM25 weights keyed by chunk id

An update runs in one SQLite transaction. The new index files of generation
g+1 are written (beside, then renamed) before the transaction that records
g+1 commits, so a run killed at any point leaves either the old generation
(whose files are untouched) or the new one, never a mix; stray files of an
uncommitted generation are removed by the next update.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from ..errors import DataError, require
from .records import DocInfo, Hit, Meta, NewDoc, StoreError, check_meta, now  # noqa: F401 - also their old import path

DB = "rag.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
  id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT UNIQUE NOT NULL, kind TEXT NOT NULL,
  sha256 TEXT NOT NULL, n_chunks INTEGER NOT NULL, chars INTEGER NOT NULL, indexed_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
  id INTEGER PRIMARY KEY AUTOINCREMENT, doc_id INTEGER NOT NULL REFERENCES documents(id), ord INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks(doc_id);
"""


class LocalStore:
    """SQLite + FAISS + BM25 in one folder. Open with `LocalStore(dir, create=...)`."""

    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path).expanduser()
        db = self.path / DB
        if not db.is_file():
            if not create:
                raise StoreError(f"no RAG store at {self.path} (no {DB} there): build one with `phikit rag index PATH --store {self.path}`")
            if self.path.exists() and not self.path.is_dir():
                raise StoreError(f"{self.path} is a file, not a store folder: pick another --store")
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.con = sqlite3.connect(db, isolation_level=None)  # transactions are ours (BEGIN ... COMMIT)
            self.con.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{db} is not a readable RAG store ({e}); move it away and index again") from e
        self._faiss = None
        self._bm25 = None

    def __repr__(self) -> str:
        return f"LocalStore({str(self.path)!r})"

    # meta ---------------------------------------------------------------
    def _meta_raw(self) -> dict[str, str]:
        return dict(self.con.execute("SELECT key, value FROM meta"))

    @property
    def meta(self) -> Meta | None:
        m = self._meta_raw()
        if "embedder" not in m:
            return None
        return Meta(m["embedder"], int(m["dim"]), int(m.get("chunk_size", 800)), int(m.get("overlap", 150)))

    def init_meta(self, meta: Meta) -> None:
        with self._tx():
            for k, v in vars(meta).items():
                self.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (k, str(v)))
            self.con.execute("INSERT OR IGNORE INTO meta VALUES ('generation', '0')")

    @property
    def generation(self) -> int:
        return int(self._meta_raw().get("generation", 0))

    # documents ------------------------------------------------------------
    def documents(self) -> list[DocInfo]:
        rows = self.con.execute("SELECT source, kind, sha256, n_chunks, chars, indexed_at FROM documents ORDER BY source")
        return [DocInfo(*r) for r in rows]

    def count(self) -> int:
        return self.con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def apply(self, upserts: list[NewDoc], deletes: list[str]) -> None:
        """Replace/insert `upserts` and remove `deletes` (sources), all or nothing."""
        import numpy as np

        faiss = require("faiss", "faiss-cpu", "the RAG vector index")
        meta = self.meta
        if meta is None:
            raise StoreError(f"the store {self.path} has no metadata yet (init_meta first)")
        index = self._load_faiss(fresh=True)
        with self._tx():  # BEGIN IMMEDIATE: we are the only writer from here on
            self._cleanup()  # leftovers of a run killed before its commit
            gone: list[int] = []
            for source in list(deletes) + [d.source for d in upserts]:
                row = self.con.execute("SELECT id FROM documents WHERE source = ?", (source,)).fetchone()
                if row:
                    gone += [r[0] for r in self.con.execute("SELECT id FROM chunks WHERE doc_id = ?", row)]
                    self.con.execute("DELETE FROM chunks WHERE doc_id = ?", row)
                    self.con.execute("DELETE FROM documents WHERE id = ?", row)
            new_ids: list[int] = []
            vecs = []
            for d in upserts:
                if len(d.chunks) != len(d.vectors) or (len(d.chunks) and d.vectors.shape[1] != meta.dim):
                    raise DataError(f"{d.source}: {len(d.chunks)} chunks but vectors of shape {getattr(d.vectors, 'shape', None)} (store dim {meta.dim})")
                cur = self.con.execute(
                    "INSERT INTO documents (source, kind, sha256, n_chunks, chars, indexed_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (d.source, d.kind, d.sha256, len(d.chunks), d.chars, now()))
                doc_id = cur.lastrowid
                for i, text in enumerate(d.chunks):
                    new_ids.append(self.con.execute("INSERT INTO chunks (doc_id, ord, text) VALUES (?, ?, ?)", (doc_id, i, text)).lastrowid)
                if len(d.chunks):
                    vecs.append(d.vectors)
            if gone:
                index.remove_ids(np.asarray(gone, dtype="int64"))
            if new_ids:
                index.add_with_ids(np.ascontiguousarray(np.concatenate(vecs), dtype="float32"), np.asarray(new_ids, dtype="int64"))
            from .bm25 import BM25

            rows = self.con.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
            bm25 = BM25.build([r[0] for r in rows], [r[1] for r in rows])
            gen = self.generation + 1
            _write_faiss(faiss, index, self.path / f"vectors.{gen}.faiss")
            bm25.save(self.path / f"bm25.{gen}.npz")
            self.con.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen),))
        self._faiss, self._bm25 = index, bm25
        self._cleanup()

    # search ---------------------------------------------------------------
    def dense(self, vector, k: int) -> list[Hit]:
        import numpy as np

        index = self._load_faiss()
        if index.ntotal == 0 or k <= 0:
            return []
        scores, ids = index.search(np.asarray(vector, dtype="float32").reshape(1, -1), min(k, index.ntotal))
        return self._hits([(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0])

    def bm25(self, query: str, k: int) -> list[Hit]:
        if self._bm25 is None:
            from .bm25 import BM25

            p = self.path / f"bm25.{self.generation}.npz"
            self._bm25 = BM25.load(p) if p.is_file() else BM25.build([], [])
        return self._hits(self._bm25.search(query, k))

    def _hits(self, scored: list[tuple[int, float]]) -> list[Hit]:
        if not scored:
            return []
        ids = [i for i, _ in scored]
        q = f"SELECT c.id, d.source, c.ord, c.text FROM chunks c JOIN documents d ON d.id = c.doc_id WHERE c.id IN ({','.join('?' * len(ids))})"
        rows = {r[0]: r[1:] for r in self.con.execute(q, ids)}
        return [Hit(rows[i][0], rows[i][1], rows[i][2], s) for i, s in scored if i in rows]

    # files ------------------------------------------------------------------
    def _load_faiss(self, fresh: bool = False):
        faiss = require("faiss", "faiss-cpu", "the RAG vector index")
        if self._faiss is not None and not fresh:
            return self._faiss
        # One query at a time gains nothing from OpenMP threads, and next to torch's own pool
        # they spin against each other: measured 28 ms a search on 200 vectors, 0.1 ms with one.
        faiss.omp_set_num_threads(1)
        p = self.path / f"vectors.{self.generation}.faiss"
        if p.is_file():
            index = faiss.read_index(str(p))
        elif self.generation == 0:
            meta = self.meta
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(meta.dim if meta else 1))
        else:
            raise StoreError(f"{p} is missing: the store {self.path} is damaged; index the documents again into a new --store")
        if not fresh:
            self._faiss = index
        return index

    def _cleanup(self) -> None:
        """Remove index files of other generations (old ones, or ones a killed run wrote but never committed)."""
        keep = {f"vectors.{self.generation}.faiss", f"bm25.{self.generation}.npz", DB}
        for f in self.path.iterdir():
            if (f.name.startswith(("vectors.", "bm25.")) and f.name not in keep) or f.name.endswith(".tmp"):
                try:
                    f.unlink()
                except OSError:
                    pass

    def _tx(self):
        con = self.con

        class _T:
            def __enter__(self):
                con.execute("BEGIN IMMEDIATE")

            def __exit__(self, et, ev, tb):
                con.execute("ROLLBACK" if et else "COMMIT")
                return False

        return _T()

    def close(self) -> None:
        self.con.close()


def _write_faiss(faiss, index, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_store(spec: str | Path, create: bool = False):
    """A store from a --store value: a folder, or qdrant://HOST:PORT/COLLECTION, or qdrant-local://DIR/COLLECTION."""
    s = str(spec)
    if s.startswith(("qdrant://", "qdrant-local://")):
        from .qdrant import QdrantStore

        return QdrantStore.from_url(s, create=create)
    return LocalStore(s, create=create)
