"""What every parser shares: the result record and turning decoded JSON into ToolCalls."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..schema import ToolCall

_ARG_KEYS = ("arguments", "parameters", "args", "input")


@dataclass
class Parsed:
    """An assistant turn: its prose `content` and the `calls` found (a call with `.error` could not be read)."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)


def calls_from_json(value: Any, tool_names: Iterable[str] | None = None) -> list[ToolCall] | None:
    """ToolCalls from a decoded JSON value, or None when it does not look like calls at all.

    Accepts a list of calls or a single call; a call is `{"name", "arguments"}`
    (also "parameters"/"args"), the OpenAI `{"function": {...}}` shape, or, for a
    known tool name, the arguments flattened beside the name.
    """
    names = set(tool_names or ())
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = []
    for item in items:
        call = _one_call(item, names)
        if call is None:
            return None
        calls.append(call)
    return calls


def _one_call(item: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):
        item = {**item["function"], "id": item.get("id", "")}
    name = item.get("name")
    if not isinstance(name, str) or not name:
        return None
    key = next((k for k in _ARG_KEYS if k in item), None)
    if key is None:
        if name not in names:
            return None  # an object with just a "name" is data, not a call
        args: Any = {k: v for k, v in item.items() if k not in ("name", "id", "type")}
    else:
        args = item[key]
    call = ToolCall(name=name, id=str(item.get("id") or ""))
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            call.error = f"the arguments of {name} are not valid JSON ({e.msg}); send a JSON object"
            return call
    if args is None:
        args = {}
    if not isinstance(args, dict):
        call.error = f"the arguments of {name} must be a JSON object, got {type(args).__name__}"
    else:
        call.arguments = args
    return call


def decode_prefix(text: str) -> tuple[Any, int] | None:
    """Decode one JSON value at the start of `text`: (value, characters used), or None."""
    try:
        return json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
