"""What a chat request asks the model for, built on phikit.chat: plain text, tool calls or JSON.

The routes only translate HTTP fields into these calls; tool parsing and
constrained decoding belong to `phikit.chat` and `phikit.engine.constrain`.
Every stream here is a plain generator of `Chunk`s and `ToolEvent`s, run on
the generation thread by the Lease (worker.py).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from typing import Any, Iterator

from ..engine.types import Chunk, SamplingParams
from ..errors import DataError
from .errors import ApiError

_END = object()


class primed:
    """`items` run to its first element now, so errors (a prompt over the context) raise before any byte is sent;
    then the same elements. `reader`: that of `items` (engine/backend.py ChunkStream), for the Lease."""

    def __init__(self, items: Iterator):
        self.items = items
        self.first = next(items, _END)

    @property
    def reader(self):
        return getattr(self.items, "reader", None)

    def __iter__(self) -> "primed":
        return self

    def __next__(self):
        if self.first is not _END:
            first, self.first = self.first, _END
            return first
        return next(self.items)

    def close(self) -> None:
        close = getattr(self.items, "close", None)
        if close is not None:
            close()


def chat_stream(model, messages: list[dict], params: SamplingParams, tools: list[dict] | None = None,
                tool_choice: str = "auto") -> Iterator:
    """Chunks (and ToolEvents with tools) of the reply; the caller runs any tool the model calls."""
    if not tools:
        if params.json_schema is not None:
            from ..chat import with_schema

            messages = with_schema(messages, params.json_schema)
        return primed(model.stream(messages, params))
    from ..chat import run_tools

    # One round: the model answers or asks for calls; the client runs them and sends the results back.
    return primed(run_tools(model, messages, tools, params, max_rounds=1, tool_choice=tool_choice))


def tool_calls_of(events: list) -> list[dict]:
    """OpenAI `tool_calls` for the calls the client must run (ToolEvents without a result)."""
    from ..chat import ToolEvent

    calls = [e.call for e in events if isinstance(e, ToolEvent) and e.result is None]
    out = []
    for c in calls:
        d = c.to_openai()
        d["id"] = f"call_{uuid.uuid4().hex[:20]}"  # unique across turns, as clients key results by it
        out.append(d)
    return out


def pick_tools(tools: list[dict] | None, tool_choice: Any) -> tuple[list[dict] | None, str]:
    """(tools to declare, "auto"|"required") from OpenAI's tools/tool_choice; 400 on a bad choice."""
    if not tools or tool_choice in (None, "auto"):
        return tools or None, "auto"
    if tool_choice == "none":
        return None, "auto"
    if tool_choice == "required":
        return tools, "required"
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}, "
                                f"got {json.dumps(tool_choice)[:200]}", param="tool_choice")
        chosen = [t for t in tools if (t.get("function", t) or {}).get("name") == name]
        if not chosen:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return chosen, "required"
    raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                   param="tool_choice")


def _json_object() -> dict:
    """Any JSON object; with_schema asks the model for its answer as one (not for this schema, which it would echo)."""
    from ..chat.structured import JSON_OBJECT

    return dict(JSON_OBJECT)


def schema_of_response_format(rf: dict | None) -> dict | None:
    """The JSON schema that OpenAI's response_format asks for (None for text)."""
    if rf is None or rf.get("type") in (None, "text"):
        return None
    if rf["type"] == "json_object":
        return _json_object()
    if rf["type"] == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise ApiError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format")
        return js["schema"]
    raise ApiError(400, f"response_format type must be text, json_object or json_schema, got {rf['type']!r}",
                   param="response_format")


def schema_of_ollama_format(fmt: Any) -> dict | None:
    """Ollama's `format`: "json" or a JSON schema object."""
    if fmt in (None, ""):
        return None
    if fmt == "json":
        return _json_object()
    if isinstance(fmt, dict):
        return fmt
    raise ApiError(400, "format must be \"json\" or a JSON schema object", param="format")


def with_json(params: SamplingParams, schema: dict | None, max_bytes: int, param: str) -> SamplingParams:
    """`params` constrained to `schema` (checked, and within the size limit)."""
    if schema is None:
        return params
    return replace(params, json_schema=checked_schema(schema, max_bytes, param))


def checked_schema(schema: dict, max_bytes: int, param: str) -> dict:
    """`schema` if it is a JSON schema within the size limit and what the grammar engines take; else a 400 naming `param`."""
    size = len(json.dumps(schema))
    if size > max_bytes:
        raise ApiError(400, f"the schema is {size} bytes, over this server's limit of {max_bytes}", param=param, code="limit_exceeded")
    from ..engine.constrain import check_schema

    try:
        return check_schema(schema)
    except DataError as e:
        raise ApiError(400, f"'{param}': {e}", param=param) from None
    except RecursionError:
        raise _too_deep(param) from None


def _too_deep(param: str) -> ApiError:
    return ApiError(400, f"'{param}' nests too deeply to process (dozens of levels): flatten it", param=param, code="too_deep")


def check_forced_calls(tools: list[dict] | None, tool_choice: str, max_bytes: int) -> None:
    """With tool_choice "required" the calls are generated under a grammar made from the tools'
    parameters: check that schema here, so that a 400 names `tools` rather than a schema the client never wrote."""
    if not tools or tool_choice != "required":
        return
    from ..chat.tool_loop import calls_schema
    from ..tools import as_tools

    checked_schema(calls_schema(as_tools(tools)), max_bytes, "tools")


def check_tools(tools: list[dict] | None, limit: int, max_bytes: int) -> None:
    if not tools:
        return
    if len(tools) > limit:
        raise ApiError(400, f"the number of tools is {len(tools)}, over this server's limit of {limit}", param="tools", code="limit_exceeded")
    size = len(json.dumps(tools))
    if size > max_bytes:
        raise ApiError(400, f"the tool declarations are {size} bytes, over this server's limit of {max_bytes}", param="tools", code="limit_exceeded")
    from ..tools import as_tools

    try:
        as_tools(tools)
    except DataError as e:
        raise ApiError(400, f"'tools': {e}", param="tools") from None
    except RecursionError:
        raise _too_deep("tools") from None


__all__ = ["chat_stream", "primed", "tool_calls_of", "pick_tools", "schema_of_response_format", "schema_of_ollama_format",
           "with_json", "checked_schema", "check_tools", "check_forced_calls", "Chunk"]
