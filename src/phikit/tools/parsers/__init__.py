"""Tool-call parsers, one tiny module per chat format's `tool_style` (as mlx-lm's tool_parsers).

Each module has the same surface:
    parse(text, tool_names=None) -> Parsed   # the assistant turn split into content and calls
    MARKERS: tuple[str, ...]                 # how a call can begin (for holding back streamed text)
"""

from __future__ import annotations

from types import ModuleType

from ...errors import PhikitError
from . import json_calls, phi4mini
from .base import Parsed

PARSERS: dict[str, ModuleType] = {"json-system": json_calls, "phi4-mini": phi4mini}


def get_parser(tool_style: str) -> ModuleType:
    """The parser module for a ChatFormat's `tool_style`."""
    try:
        return PARSERS[tool_style]
    except KeyError:
        raise PhikitError(f"no tool-call parser for tool style {tool_style!r}; known: {', '.join(PARSERS)}") from None


__all__ = ["Parsed", "PARSERS", "get_parser"]
