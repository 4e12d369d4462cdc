"""Chat formats, one per model family, looked up by name or detected from a tokenizer."""

from __future__ import annotations

from ..errors import PhikitError
from .base import ChatFormat, Message
from .chatml import CHATML, SMOLLM2
from .phi3 import PHI3
from .phi4 import PHI4
from .phi4mini import PHI4_MINI

FORMATS: dict[str, ChatFormat] = {f.name: f for f in (CHATML, SMOLLM2, PHI3, PHI4_MINI, PHI4)}


def get_format(name: str) -> ChatFormat:
    """The format called `name`; raises PhikitError listing the known names."""
    try:
        return FORMATS[name]
    except KeyError:
        raise PhikitError(f"unknown chat format {name!r}; known: {', '.join(sorted(FORMATS))}") from None


def detect_format(vocab: dict[str, int] | set[str]) -> ChatFormat | None:
    """Guess the format from the special tokens a tokenizer knows; None if no match."""
    has = set(vocab)
    if "<|im_sep|>" in has:
        return PHI4
    if "<|tool_call|>" in has and "<|end|>" in has:
        return PHI4_MINI
    if "<|end|>" in has and "<|assistant|>" in has:
        return PHI3
    if "<|im_start|>" in has and "<|im_end|>" in has:
        return CHATML
    return None


__all__ = ["ChatFormat", "Message", "FORMATS", "get_format", "detect_format", "CHATML", "SMOLLM2", "PHI3", "PHI4", "PHI4_MINI"]
