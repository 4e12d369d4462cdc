"""Ingest: files -> text -> chunks -> vectors -> one atomic store update.

Only documents whose content hash changed are read, chunked and embedded
again; documents whose file is gone are removed. Nothing is written until
every vector is ready, so an interrupted run changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .chunk import chunk_text
from .embed import Embedder
from .readers import Unreadable, read_bytes, read_file, walk
from .store import Meta, NewDoc, StoreError, check_meta

log = logging.getLogger("phikit.rag")


@dataclass
class Summary:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, how it was read)
    chunks_embedded: int = 0
    embed_s: float = 0.0
    total_s: float = 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks_embedded / self.embed_s if self.embed_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = {k: v for k, v in vars(self).items()}
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        d["notes"] = [{"path": p, "note": r} for p, r in self.notes]
        d["chunks_per_s"] = round(self.chunks_per_s, 1)
        return d


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare(store, embedder: Embedder | str | None, chunk_size: int | None, overlap: int | None):
    """Check the embedder against the store (recording it on a new store); returns a function that loads it.

    Loading is deferred so a re-run where nothing changed does not pay for the model."""
    from .embed import resolve_name

    meta = store.meta
    loaded: list[Embedder] = [embedder] if isinstance(embedder, Embedder) else []
    if meta is not None:
        name = loaded[0].name if loaded else (resolve_name(embedder)[0] if embedder else meta.embedder)
        check_meta(meta, name, repr(store))
        if (chunk_size and chunk_size != meta.chunk_size) or (overlap is not None and overlap != meta.overlap):
            raise StoreError(f"{store!r} chunks at {meta.chunk_size} chars with {meta.overlap} overlap; use those or a new --store")
    else:
        if not loaded:
            loaded.append(Embedder(embedder))
        store.init_meta(Meta(loaded[0].name, loaded[0].dim, chunk_size or 800, 150 if overlap is None else overlap))

    def get() -> Embedder:
        if not loaded:
            loaded.append(Embedder(meta.embedder))
        if loaded[0].dim != store.meta.dim:
            check_meta(store.meta, f"{loaded[0].name} ({loaded[0].dim} dims)", repr(store))
        return loaded[0]

    return get


def _embed_all(get_emb, docs: list[tuple[str, str, str, list[str], int]], progress: bool, summary: Summary) -> list[NewDoc]:
    import numpy as np

    texts = [c for *_, chunks, _ in docs for c in chunks]
    if not texts:
        return []
    emb = get_emb()
    bar = None
    if progress and texts:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), unit="chunk", desc="embedding", dynamic_ncols=True)
    t0 = time.perf_counter()
    parts = []
    step = 256
    for i in range(0, len(texts), step):
        parts.append(emb.encode(texts[i:i + step]))
        if bar:
            bar.update(len(texts[i:i + step]))
    if bar:
        bar.close()
    summary.embed_s = time.perf_counter() - t0
    summary.chunks_embedded = len(texts)
    vecs = np.concatenate(parts)
    out, at = [], 0
    for source, kind, digest, chunks, chars in docs:
        out.append(NewDoc(source, kind, digest, chunks, vecs[at:at + len(chunks)], chars))
        at += len(chunks)
    return out


def _queue(s: Summary, todo: list, meta, src: str, kind: str, digest: str, text: str, known: bool, why_empty: str) -> None:
    """Chunk a new or changed source into `todo` (added or updated), or skip it when it has no text."""
    chunks = chunk_text(text, meta.chunk_size, meta.overlap)
    if not chunks:
        s.skipped.append((src, why_empty))
        return
    (s.updated if known else s.added).append(src)
    todo.append((src, kind, digest, chunks, len(text)))


def index_paths(store, paths: list[str | Path], embedder: Embedder | str | None = None, progress: bool = True,
                chunk_size: int | None = None, overlap: int | None = None) -> Summary:
    """Index the files under `paths` into `store`; returns what was added, updated, removed and skipped.

    Entries inside a folder that cannot be indexed (links that loop or dangle, FIFOs, sockets, devices,
    unsupported types, unreadable files) are listed in `Summary.skipped` with the reason. A path given
    directly that is neither a folder nor an indexable file raises DataError before the store is touched."""
    t0 = time.perf_counter()
    s = Summary()
    files, s.skipped = walk(paths)  # first: a bad argument must fail before anything is written
    emb = prepare(store, embedder, chunk_size, overlap)
    meta = store.meta
    known = {d.source: d for d in store.documents()}
    todo = []
    for f in files:
        src = str(f)
        try:
            data = read_bytes(f)
        except Unreadable as e:
            s.skipped.append((src, str(e)))
            continue
        digest = sha256(data)
        if src in known and known[src].sha256 == digest:
            s.unchanged.append(src)
            continue
        try:
            text, notes = read_file(f, data)
        except Unreadable as e:
            s.skipped.append((src, str(e)))
            continue
        s.notes += [(src, n) for n in notes]
        _queue(s, todo, meta, src, "file", digest, text, src in known,
               "no text in it (empty, or a scanned PDF without a text layer)")
    # Files that are gone, and files that now fail to read, lose their chunks: stale text is worse than none.
    skipped = {p for p, _ in s.skipped}
    s.removed = [d.source for d in known.values() if d.kind == "file" and (not Path(d.source).exists() or d.source in skipped)]
    for p, why in s.skipped:
        log.info("skipped %s: %s", p, why)  # the CLI prints the summary; Python callers read s.skipped
    new = _embed_all(emb, todo, progress, s)
    if new or s.removed:
        store.apply(new, s.removed)
    s.total_s = time.perf_counter() - t0
    return s


def index_texts(store, items: list[tuple[str, str]], embedder: Embedder | str | None = None, progress: bool = False,
                chunk_size: int | None = None, overlap: int | None = None) -> Summary:
    """Index in-memory (source, text) pairs; a source already there with other text is replaced."""
    t0 = time.perf_counter()
    emb = prepare(store, embedder, chunk_size, overlap)
    meta = store.meta
    s = Summary()
    known = {d.source: d.sha256 for d in store.documents()}
    todo = []
    for src, text in items:
        digest = sha256(text.encode())
        if known.get(src) == digest:
            s.unchanged.append(src)
            continue
        _queue(s, todo, meta, src, "text", digest, text, src in known, "no text")
    new = _embed_all(emb, todo, progress, s)
    if new:
        store.apply(new, [])
    s.total_s = time.perf_counter() - t0
    return s


def remove(store, sources: list[str]) -> list[str]:
    """Remove documents by source (a path is matched by its absolute form too); returns what was removed."""
    known = {d.source for d in store.documents()}
    hit = []
    for src in sources:
        cands = [src, str(Path(src).expanduser().resolve())]
        match = next((c for c in cands if c in known), None)
        if match is None:
            # A folder removes every document under it.
            root = str(Path(src).expanduser().resolve()).rstrip("/") + "/"
            hit += [k for k in known if k.startswith(root)]
        else:
            hit.append(match)
    hit = sorted(set(hit))
    if not hit:
        raise StoreError(f"nothing in {store!r} matches {', '.join(sources)}: see `phikit rag ls`")
    store.apply([], hit)
    return hit
