"""Answers from the user's own documents: ingest, chunk, embed, store, retrieve, answer with sources.

Layers, each usable alone: `readers` (file -> text), `chunk` (text -> chunks),
`embed` (sentence-transformers), `store` (SQLite + FAISS + BM25 in a folder)
or `qdrant` (the same interface on Qdrant), `index` (files -> one atomic store
update), `rag` (retrieval, fusion, the abstention gate, grounded answers).
Heavy libraries are imported inside the functions that use them.
"""

from .index import Summary, index_paths, index_texts, remove
from .rag import RAG, Answer, rrf
from .store import Hit, LocalStore, StoreError, open_store

__all__ = ["RAG", "Answer", "Hit", "LocalStore", "StoreError", "Summary", "index_paths", "index_texts", "open_store", "remove", "rrf"]
