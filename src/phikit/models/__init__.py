"""Model registry, loading and tokenizer fixes."""

from .registry import DEFAULT_MODEL, REGISTRY, ModelSpec, embedded_embedder_dir, resolve

__all__ = ["DEFAULT_MODEL", "REGISTRY", "ModelSpec", "embedded_embedder_dir", "resolve"]
