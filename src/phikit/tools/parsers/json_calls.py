"""Calls written as JSON: the style of every format that declares tools as a JSON list in the system prompt.

Accepts the forms seen from small and large models alike: a bare JSON list or
object, the same inside a ```json code fence, `functools[...]` (vLLM's Phi-4-mini
parser), `<|tool_call|>...` with or without its closing tag, a call after some
prose, and several calls in one turn.
"""

from __future__ import annotations

import re
from typing import Iterable

from .base import Parsed, calls_from_json, decode_prefix
from ..schema import ToolCall

MARKERS = ("<|tool_call|>", "functools", "```", "[", "{")
_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)(?:```|\Z)", re.S)
_LINE_JSON = re.compile(r"(?:^|\n)[ \t]*(?=[\[{])")  # JSON only counts where a line starts
_CLOSE = re.compile(r"\s*<\|/tool_call\|>")
_PREFIX = re.compile(r"<\|tool_call\|>|functools(?=\s*\[)|\btool_calls?:\s*(?=[\[{])")


def parse(text: str, tool_names: Iterable[str] | None = None) -> Parsed:
    """Split an assistant turn into prose and tool calls."""
    names = list(tool_names or ())
    calls: list[ToolCall] = []
    spans: list[tuple[int, int]] = []
    # 1. fenced blocks
    for m in _FENCE.finditer(text):
        got = _calls_at(m.group(1).strip(), names)
        if got:
            calls += got[0]
            spans.append(m.span())
    # 2. explicit prefixes, then JSON that starts a line (outside fences)
    if not calls:
        pos = 0
        while pos < len(text):
            m = _PREFIX.search(text, pos)
            start = m.end() if m else _json_line_start(text, pos)
            if start is None:
                break
            explicit = m is not None
            body = text[start:].lstrip()
            got = _calls_at(body, names)
            begin = m.start() if m else start
            if got is None:
                if explicit:
                    calls.append(ToolCall(name="?", error="could not read the tool call: write it as a JSON list "
                                                           '[{"name": ..., "arguments": {...}}]'))
                    spans.append((begin, len(text)))
                    break
                pos = start + 1
                continue
            found, used = got
            end = len(text) - len(body) + used
            end = _skip_close(text, end)
            calls += found
            spans.append((begin, end))
            pos = end
    content = text
    for a, b in reversed(spans):
        content = content[:a] + content[b:]
    return Parsed(content=content.strip(), calls=calls)


def _calls_at(body: str, names: list[str]) -> tuple[list[ToolCall], int] | None:
    dec = decode_prefix(body)
    if dec is None:
        return None
    value, used = dec
    calls = calls_from_json(value, names)
    if calls is None:
        return None
    return calls, used


def _json_line_start(text: str, pos: int) -> int | None:
    m = _LINE_JSON.search(text, pos)
    return m.end() if m else None


def _skip_close(text: str, end: int) -> int:
    m = _CLOSE.match(text, end)
    return m.end() if m else end
