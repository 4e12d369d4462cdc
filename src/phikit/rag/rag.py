"""Retrieval (dense, BM25, or both fused by reciprocal rank) and grounded, cited answers.

    rag = phikit.RAG("my-store")
    for hit in rag.retrieve("When did X happen?", k=4): print(hit.source, hit.score)
    ans = rag.ask("When did X happen?")   # Answer(answer, abstained, sources)

Abstention has two layers: a retrieval gate (when no chunk is similar
enough to the question, the model is not asked at all) and the model's own
abstention with THE phrase of `phikit.grounding`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import PhikitError
from ..grounding import ABSTAIN, grounded_messages, is_abstention
from .store import Hit, open_store

MODES = ("hybrid", "dense", "bm25")
RRF_K = 60  # the constant of Cormack et al. (2009); ranks matter, raw scores do not
# Cosine similarity (MiniLM) of the best chunk below which we abstain without asking the model.
# Measured by benchmarks/quality/rag_retrieval.py (gate section): on-topic questions rarely fall below it,
# off-topic ones mostly do. Only meaningful for the default embedder; pass min_score=0 to turn it off.
MIN_SCORE = 0.3


@dataclass
class Answer:
    answer: str
    abstained: bool
    sources: list[Hit]
    gated: bool = False  # abstained by the retrieval gate, the model was not asked
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"answer": self.answer, "abstained": self.abstained, "gated": self.gated,
                "sources": [h.to_dict() for h in self.sources], **self.extra}


def rrf(lists: list[list[Hit]], k: int) -> list[Hit]:
    """Reciprocal-rank fusion: score = sum of 1 / (RRF_K + rank) over the lists a chunk appears in."""
    fused: dict[tuple[str, int], Hit] = {}
    for hits in lists:
        for rank, h in enumerate(hits, 1):
            key = (h.source, h.chunk_id)
            if key not in fused:
                fused[key] = Hit(h.source, h.chunk_id, h.text, 0.0, {})
            fused[key].score += 1.0 / (RRF_K + rank)
            fused[key].extra.update(h.extra)
    return sorted(fused.values(), key=lambda h: -h.score)[:k]


def format_context(hits: list[Hit]) -> str:
    import os

    return "\n\n".join(f"[{i}] ({os.path.basename(h.source)}) {h.text}" for i, h in enumerate(hits, 1))


class RAG:
    """Questions over a store (a folder or a qdrant:// URL). `model` is a phikit Model, a name for
    `phikit.load`, or None for the embedded default (loaded on the first `ask`)."""

    def __init__(self, store, model=None, embedder=None, k: int = 4, mode: str = "hybrid", min_score: float = MIN_SCORE):
        self.store = open_store(store) if isinstance(store, (str, Path)) else store
        meta = self.store.meta
        if meta is None:
            raise PhikitError(f"{self.store!r} has nothing indexed yet: run `phikit rag index PATH --store ...` first")
        if mode not in MODES:
            raise PhikitError(f"unknown retrieval mode {mode!r}: use one of {', '.join(MODES)}")
        self.k, self.mode, self.min_score = k, mode, min_score
        self._embedder = embedder
        self._model = model

    @property
    def embedder(self):
        from .embed import Embedder
        from .store import check_meta

        if not isinstance(self._embedder, Embedder):
            self._embedder = Embedder(self._embedder or self.store.meta.embedder)
        check_meta(self.store.meta, self._embedder.name, repr(self.store))
        return self._embedder

    @property
    def model(self):
        if self._model is None or isinstance(self._model, str):
            import phikit

            self._model = phikit.load(self._model)
        return self._model

    def retrieve(self, question: str, k: int | None = None, mode: str | None = None, vector=None) -> list[Hit]:
        """The `k` best chunks for `question`, best first (Hit: source, chunk_id, text, score).

        Scores: cosine for dense, BM25 for bm25, RRF for hybrid; every hit found by the
        dense side also carries `extra["cosine"]`. `vector`: the question's embedding when
        the caller has already computed it (batch evaluation)."""
        k = self.k if k is None else k
        mode = mode or self.mode
        if mode not in MODES:
            raise PhikitError(f"unknown retrieval mode {mode!r}: use one of {', '.join(MODES)}")
        if k < 1:
            raise PhikitError(f"k must be at least 1, got {k}")
        if not question.strip():
            raise PhikitError("the question is empty")
        wide = max(4 * k, 20)  # fusion needs deeper lists than it returns
        dense: list[Hit] = []
        bm: list[Hit] = []
        if mode in ("dense", "hybrid"):
            q = self.embedder.encode([question])[0] if vector is None else vector
            dense = self.store.dense(q, k if mode == "dense" else wide)
            for h in dense:
                h.extra["cosine"] = h.score
        if mode in ("bm25", "hybrid"):
            bm = self.store.bm25(question, k if mode == "bm25" else wide)
        if mode == "dense":
            return dense
        if mode == "bm25":
            return bm
        return rrf([dense, bm], k)

    def gate(self, hits: list[Hit]) -> bool:
        """True when retrieval found nothing relevant enough to be worth asking the model."""
        if not hits:
            return True
        cos = [h.extra["cosine"] for h in hits if "cosine" in h.extra]
        return bool(cos) and self.min_score > 0 and max(cos) < self.min_score

    def stream(self, question: str, hits: list[Hit], params=None, **sampling) -> Iterator:
        """Chunks of the model's grounded, cited answer over `hits` (numbered [1]..[n] in order)."""
        msgs = grounded_messages(format_context(hits), question, cite=True)
        return self.model.stream(msgs, params, **sampling)

    def ask(self, question: str, k: int | None = None, mode: str | None = None, params=None, **sampling) -> Answer:
        """Retrieve, then answer from the retrieved chunks only; abstains with `phikit.grounding.ABSTAIN`."""
        hits = self.retrieve(question, k, mode)
        if self.gate(hits):
            return Answer(ABSTAIN, True, hits, gated=True)
        text = "".join(c.text for c in self.stream(question, hits, params, **sampling)).strip()
        return Answer(text, is_abstention(text), hits)
