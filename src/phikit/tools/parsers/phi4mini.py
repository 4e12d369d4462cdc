"""Phi-4-mini: calls come as `<|tool_call|>[...]<|/tool_call|>`.

Decoding drops special tokens, so the tags are often gone by the time text
reaches here; the JSON forms are then read exactly as in the JSON style, which
also covers the variants seen in the wild (missing closing tag, one object
instead of a list, `functools[...]`, a code fence).
"""

from __future__ import annotations

from typing import Iterable

from . import json_calls
from .base import Parsed

MARKERS = json_calls.MARKERS


def parse(text: str, tool_names: Iterable[str] | None = None) -> Parsed:
    """Split an assistant turn into prose and tool calls."""
    return json_calls.parse(text, tool_names)
