"""The records every store speaks (local or Qdrant): metadata, documents, new documents, hits, errors.

Kept apart from the stores so that `store` and `qdrant` both import them and neither imports the other
(`store.open_store` picks `qdrant` inside the call); `phikit.rag.store` still exports them.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

from ..errors import PhikitError


class StoreError(PhikitError):
    """A store is missing, damaged, or built with another embedding model."""

    status = 404


@dataclass
class Meta:
    embedder: str
    dim: int
    chunk_size: int = 800
    overlap: int = 150


@dataclass
class DocInfo:
    source: str
    kind: str  # "file": checked on disk at every index run; "text": given in memory
    sha256: str
    n_chunks: int
    chars: int = 0
    indexed_at: str = ""


@dataclass
class NewDoc:
    source: str
    kind: str
    sha256: str
    chunks: list[str]
    vectors: object  # float32 array (len(chunks), dim)
    chars: int = 0


@dataclass
class Hit:
    """One retrieved chunk. `chunk_id` is the chunk's position in its document (0-based)."""

    source: str
    chunk_id: int
    text: str
    score: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"source": self.source, "chunk_id": self.chunk_id, "score": round(float(self.score), 6), "text": self.text}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def check_meta(have: Meta, want_embedder: str | None, where: str) -> None:
    if want_embedder is not None and want_embedder != have.embedder:
        raise StoreError(
            f"the store {where} was built with the embedding model {have.embedder!r} ({have.dim} dimensions); "
            f"its vectors cannot be mixed with {want_embedder!r}. Index with --embedder {have.embedder!r}, "
            "or use a new --store for the other model"
        )
