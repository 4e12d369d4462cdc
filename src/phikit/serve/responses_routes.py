"""OpenAI's Responses API: POST /v1/responses, and GET / DELETE /v1/responses/{id} for kept ones.

A Responses request is translated into the chat request it means, then runs
exactly as /v1/chat/completions does (`generation.chat_stream` on the one slot):
`instructions` and the input items become chat messages (`function_call` and
`function_call_output` items become an assistant turn's tool_calls and `tool`
turns), the flat function tools and `tool_choice` become the chat ones, and
`text.format` a JSON schema for constrained decoding. Only the framing is its
own: output items (`message`, `function_call`) and, when streaming, typed
server-sent events (`event: response.output_text.delta` ...) numbered by
`sequence_number`, from `response.created` to `response.completed`, or
`response.incomplete` when `max_output_tokens` cut the reply short.

Responses are kept in memory unless `store: false`: the latest STORE_ITEMS,
at most STORE_BYTES of their conversations, the oldest dropped first, all gone
when the server restarts. `previous_response_id` continues a kept one (its
input and output come before the new input; its `instructions` do not, as at
OpenAI); an id not kept is a 400 that names it, never silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from functools import partial
from typing import Any, AsyncIterator, Literal, Union

from fastapi import APIRouter, Request
from pydantic import Field

from ..engine.types import Chunk, SamplingParams
from ..errors import PhikitError
from .errors import ApiError, internal_error
from ..chat.reply import Reply
from .generation import chat_stream, check_forced_calls, check_tools, pick_tools, tool_calls_of, with_json
from .schemas import _Body, error_responses
from .state import ChunkStreamResponse, ServerState
from .worker import Lease

router = APIRouter()
STORE_ITEMS = 256  # responses kept for previous_response_id and GET
STORE_BYTES = 64 * 1024 * 1024  # their conversations together, as JSON
TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(_Body):
    """POST /v1/responses. Other fields OpenAI defines (`include`, `reasoning`, `user`, `top_logprobs`...)
    are accepted and change nothing; the ones whose meaning this server cannot give are a 400."""

    model: str
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None  # refused when true
    conversation: Union[str, dict[str, Any], None] = None  # refused
    prompt: dict[str, Any] | None = None  # refused


class Store:
    """The latest responses and their conversations (input items + output items, normalised), oldest dropped first."""

    def __init__(self, max_items: int = STORE_ITEMS, max_bytes: int = STORE_BYTES):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._kept: OrderedDict[str, tuple[dict, list[dict], int]] = OrderedDict()
        self._bytes = 0

    def put(self, response: dict, items: list[dict]) -> None:
        size = len(json.dumps(items)) + len(json.dumps(response))
        if size > self.max_bytes:
            return
        self._kept[response["id"]] = (response, items, size)
        self._bytes += size
        while len(self._kept) > self.max_items or self._bytes > self.max_bytes:
            self._bytes -= self._kept.popitem(last=False)[1][2]

    def get(self, rid: str) -> tuple[dict, list[dict]] | None:
        kept = self._kept.get(rid)
        return None if kept is None else kept[:2]

    def delete(self, rid: str) -> bool:
        kept = self._kept.pop(rid, None)
        if kept is not None:
            self._bytes -= kept[2]
        return kept is not None


def _state(request: Request) -> ServerState:
    return request.app.state.phikit


def _store(request: Request) -> Store:
    state = request.app.state
    if getattr(state, "phikit_responses", None) is None:
        state.phikit_responses = Store()
    return state.phikit_responses


def _bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"'{param}': {message}", param=param, code=code)


# -- Responses fields -> the chat request ------------------------------------------


def _text_of(content: Any, where: str) -> str:
    """The text of a message's content: a string, or parts of which only text ones are taken."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(where, "must be a string or a list of content parts such as {'type': 'input_text', 'text': ...}")
    out = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in (*TEXT_PARTS, "refusal"):
            raise _bad(f"{where}.{j}", f"{kind!r} parts are not supported: this server's models read text only (input_text parts)")
        if not isinstance(p.get(key), str):
            raise _bad(f"{where}.{j}.{key}", "must be a string")
        out.append(p[key])
    return "".join(out)


def _item(item: Any, where: str, call_names: dict[str, str]) -> dict | None:
    """An input (or output) item, normalised to the three kinds the conversation is built from; None to skip it.

    `call_names` maps the call_ids seen so far to their function names (a function_call_output names its call)."""
    if not isinstance(item, dict):
        raise _bad(where, "must be an object such as {'role': 'user', 'content': ...}")
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise _bad(f"{where}.role", f"must be user, system, developer or assistant, got {role!r}")
        return {"type": "message", "role": role, "content": _text_of(item.get("content"), f"{where}.content")}
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise _bad(f"{where}.{key}", "must be a string")
        call_names[item["call_id"]] = item["name"]
        return {"type": "function_call", "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
    if kind == "function_call_output":
        cid = item.get("call_id")
        if not isinstance(cid, str) or cid not in call_names:
            raise _bad(f"{where}.call_id", f"no function_call with call_id {cid!r} comes before this output: "
                                           "send the function_call item too, or use previous_response_id")
        return {"type": "function_call_output", "call_id": cid, "output": _text_of(item.get("output"), f"{where}.output")}
    if kind == "reasoning":
        return None  # another model's hidden reasoning: nothing this one can read
    raise _bad(f"{where}.type", f"{kind!r} items are not supported: send message, function_call and function_call_output items")


def _items(body: ResponsesRequest, earlier: list[dict]) -> list[dict]:
    """The request's input items, normalised and checked (their call_ids against `earlier` ones too)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    names = {it["call_id"]: it["name"] for it in earlier if it["type"] == "function_call"}
    items = [_item(it, f"input.{i}", names) for i, it in enumerate(body.input)]
    return [it for it in items if it is not None]


def _messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """The chat messages of a conversation of normalised items; consecutive calls share one assistant turn."""
    msgs = [{"role": "system", "content": instructions}] if instructions else []
    names = {}
    for it in items:
        if it["type"] == "message":
            msgs.append({"role": "system" if it["role"] == "developer" else it["role"], "content": it["content"]})
        elif it["type"] == "function_call":
            names[it["call_id"]] = it["name"]
            call = {"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
            last = msgs[-1] if msgs else {}
            if last.get("role") == "assistant" and last.get("content") is None:
                last["tool_calls"].append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            msgs.append({"role": "tool", "tool_call_id": it["call_id"], "name": names[it["call_id"]], "content": it["output"]})
    return msgs


def _chat_tools(tools: list[dict] | None) -> list[dict] | None:
    """The flat Responses function tools in the chat shape; built-in tools (web_search...) are a 400 naming them."""
    if not tools:
        return None
    other = sorted({str(t.get("type")) for t in tools if t.get("type") != "function"})
    if other:
        raise ApiError(400, f"this server runs function tools only, not {', '.join(other)}: remove "
                            f"{'it' if len(other) == 1 else 'them'}, or declare a function tool that does the work",
                       param="tools", code="unsupported_tool")
    out = []
    for k, t in enumerate(tools):
        if not isinstance(t.get("name"), str) or not t["name"]:
            hint = " (Responses tools are flat, not the chat shape with 'function')" if "function" in t else ""
            raise _bad(f"tools.{k}.name", "a function tool needs a name: {'type': 'function', 'name': ..., "
                                          f"'parameters': {{...}}}}{hint}")
        out.append({"type": "function", "function": {key: t[key] for key in ("name", "description", "parameters")
                                                     if t.get(key) is not None}})
    return out


def _chat_choice(choice: Any, tools: list[dict] | None) -> tuple[list[dict] | None, Any]:
    """(tools, the chat tool_choice) for a Responses tool_choice, for `pick_tools`."""
    if choice is None or choice in ("none", "auto", "required"):
        return tools, choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):
        return tools, {"type": "function", "function": {"name": choice["name"]}}
    if kind == "allowed_tools" and choice.get("mode") in ("auto", "required") and isinstance(choice.get("tools"), list):
        names = [t.get("name") if isinstance(t, dict) and t.get("type") == "function" else None for t in choice["tools"]]
        if None in names:
            raise _bad("tool_choice.tools", "this server runs function tools only: list {'type': 'function', 'name': ...} entries")
        missing = [n for n in names if n not in {t["function"]["name"] for t in tools or []}]
        if missing:
            raise _bad("tool_choice.tools", f"names {', '.join(map(repr, missing))}, not among the tools")
        return [t for t in tools or [] if t["function"]["name"] in names] or None, choice["mode"]
    if isinstance(kind, str) and kind not in ("function", "allowed_tools"):
        raise ApiError(400, f"tool_choice {kind!r} is a built-in tool this server does not run: choose a function tool",
                       param="tool_choice", code="unsupported_tool")
    raise ApiError(400, "tool_choice must be 'none', 'auto', 'required', {'type': 'function', 'name': ...} or "
                        "{'type': 'allowed_tools', 'mode': 'auto' | 'required', 'tools': [...]}", param="tool_choice")


def _schema(text: dict | None) -> dict | None:
    """The JSON schema `text.format` asks for (None for plain text)."""
    fmt = (text or {}).get("format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise _bad("text.format.schema", "json_schema needs {'type': 'json_schema', 'name': ..., 'schema': {...}}")
        return fmt["schema"]
    raise _bad("text.format", f"type must be text, json_object or json_schema, got {kind!r}")


def _refuse_unsupported(body: ResponsesRequest) -> None:
    if body.background:
        raise _bad("background", "background responses are not supported here: stream, or wait for the reply")
    if body.conversation is not None:
        raise _bad("conversation", "conversations are not kept here: use previous_response_id, or send the whole conversation in input")
    if body.prompt is not None:
        raise _bad("prompt", "stored prompt templates live on OpenAI's platform: send instructions and input instead")


# -- the chunk stream -> output items and events -------------------------------------


class Output:
    """Builds a response's output items from its stream of Chunks and ToolEvents, and the events that announce them.

    Both the blocking and the streaming reply are built here (the blocking one drops the events), so
    they hold the same items: a `message` for text, a `function_call` for each call the client must run."""

    def __init__(self, head: dict):
        self.head = head  # the fields of the response object that never change
        self.items: list[dict] = []
        self.seq = 0
        self.text: str | None = None  # the open message's text; None: no message is open
        self.finish, self.usage = "stop", None
        self.reply = Reply()
        self.done: Chunk | None = None

    def event(self, kind: str, **fields) -> dict:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **fields}

    def response(self, status: str) -> dict:
        done = status != "in_progress"
        return {**self.head, "status": status, "output": [_copy(it) for it in self.items] if done else [],
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "completed_at": int(time.time()) if status == "completed" else None, "error": None,
                "usage": self.usage if done else None}

    def start(self) -> list[dict]:
        return [self.event("response.created", response=self.response("in_progress")),
                self.event("response.in_progress", response=self.response("in_progress"))]

    def feed(self, c) -> list[dict]:
        """The events one stream item makes (a Chunk or a ToolEvent, read through `Reply`); `self.done` is the
        last chunk once it came."""
        d = self.reply.feed(c)
        if d.client_call:  # a call the client runs ends any message before it
            return [*self._close(), *(e for call in tool_calls_of([d.client_call]) for e in self._call(call))]
        out = self._open() if d.text and self.text is None else []
        if d.text:
            self.text += d.text
            out.append(self._on_text("response.output_text.delta", delta=d.text, logprobs=[]))
        if d.done:
            self.done = d.done
            self.finish = d.done.finish_reason
            s = d.done.stats
            i, o = (s.prompt_tokens, s.completion_tokens) if s else (0, 0)
            self.usage = {"input_tokens": i, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}, "output_tokens": o,
                          "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": i + o}
        return out

    def end(self) -> list[dict]:
        """The last events; an empty reply is still a message, with empty text."""
        status = "incomplete" if self.finish == "length" else "completed"
        out = self._open() if not self.items else []
        return [*out, *self._close(status), self.event(f"response.{status}", response=self.response(status))]

    def failed(self, e: Exception) -> list[dict]:
        """After the headers went out an error can only be events: `error`, then `response.failed`."""
        if isinstance(e, PhikitError):
            e = ApiError(e.status, str(e), "invalid_request_error" if e.status < 500 else "server_error")
        elif not isinstance(e, ApiError):  # a bug: logged, and only its reference sent
            e = internal_error(e)
        kind = "invalid_prompt" if e.status < 500 else "server_error"  # the codes a Response's error may carry
        failed = {**self.response("failed"), "error": {"code": kind, "message": e.message}}
        return [self.event("error", code=e.code or e.type, message=e.message, param=e.param),
                self.event("response.failed", response=failed)]

    def _on_text(self, kind: str, **fields) -> dict:
        return self.event(kind, item_id=self.items[-1]["id"], output_index=len(self.items) - 1, content_index=0, **fields)

    def _open(self) -> list[dict]:
        self.text = ""
        item = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        self.items.append(item)
        return [self.event("response.output_item.added", output_index=len(self.items) - 1, item=_copy(item)),
                self._on_text("response.content_part.added", part=_part(""))]

    def _close(self, status: str = "completed") -> list[dict]:
        if self.text is None:
            return []
        text, self.text = self.text, None
        item = self.items[-1]
        item.update(status=status, content=[_part(text)])
        return [self._on_text("response.output_text.done", text=text, logprobs=[]),
                self._on_text("response.content_part.done", part=_part(text)),
                self.event("response.output_item.done", output_index=len(self.items) - 1, item=_copy(item))]

    def _call(self, call: dict) -> list[dict]:
        fn = call["function"]
        item = {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": "in_progress", "call_id": call["id"],
                "name": fn["name"], "arguments": ""}
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1}
        out = [self.event("response.output_item.added", output_index=where["output_index"], item=_copy(item)),
               self.event("response.function_call_arguments.delta", **where, delta=fn["arguments"]),
               self.event("response.function_call_arguments.done", **where, name=fn["name"], arguments=fn["arguments"])]
        item.update(arguments=fn["arguments"], status="completed")
        return [*out, self.event("response.output_item.done", output_index=where["output_index"], item=_copy(item))]


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _copy(item: dict) -> dict:
    return {**item, "content": [dict(p) for p in item["content"]]} if "content" in item else dict(item)


def _sse(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


# -- routes ------------------------------------------------------------------------


@router.post("/v1/responses", responses=error_responses(400, 404))
async def create_response(body: ResponsesRequest, request: Request):
    s = _state(request)
    lim = s.limits
    u = await s.use(request, body.model)
    _refuse_unsupported(body)
    store = _store(request)
    earlier: list[dict] = []
    if body.previous_response_id is not None:
        kept = store.get(body.previous_response_id)
        if kept is None:
            raise _bad("previous_response_id", f"no kept response {body.previous_response_id!r}: this server keeps the latest "
                                               f"{store.max_items} responses made without store=false in memory, until it "
                                               "restarts; send the whole conversation in input instead",
                       code="previous_response_not_found")
        earlier = kept[1]
    if not isinstance(body.input, str):
        s.check_limit(len(body.input), lim.max_messages, "input", "the number of input items")
    items = [*earlier, *_items(body, earlier)]
    if not items:
        raise _bad("input", "is empty: send the user's message")
    max_tokens = s.max_tokens(body.max_output_tokens, "max_output_tokens", u.model, u.d.parameters.get("num_predict"))
    tools = _chat_tools(body.tools)
    check_tools(tools, lim.max_tools, lim.max_schema_bytes)
    tools, choice = pick_tools(*_chat_choice(body.tool_choice, tools))
    check_forced_calls(tools, choice, lim.max_schema_bytes)
    schema = _schema(body.text)
    if tools and schema is not None:
        raise _bad("text.format", "a JSON format cannot be combined with tools here: send one or the other")
    dp = u.d.parameters  # a created model's PARAMETERs: the defaults of what the request leaves out
    params = SamplingParams(max_tokens=max_tokens, temperature=dp.get("temperature", 1.0) if body.temperature is None else body.temperature,
                            top_p=dp.get("top_p", 1.0) if body.top_p is None else body.top_p, top_k=dp.get("top_k", 0),
                            seed=dp.get("seed")).validate()
    params = with_json(params, schema, lim.max_schema_bytes, "text.format.schema")
    make = partial(chat_stream, u.model, u.messages(_messages(body.instructions, items)), params, tools, choice)

    keep = body.store is not False
    out = Output({
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()), "model": u.name,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False, "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": keep, "temperature": params.temperature,
        "text": {"format": (body.text or {}).get("format") or {"type": "text"}}, "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [], "top_p": params.top_p, "truncation": body.truncation or "disabled", "user": None,
        "background": False,
    })

    def finished(response: dict) -> None:
        if keep:
            store.put(response, [*items, *(it for it in (_item(o, "output", {}) for o in response["output"]) if it)])

    lease, first = await s.first_stream(request, make)
    if body.stream:
        return ChunkStreamResponse(_events(s, lease, first, out, finished), lease, "text/event-stream")
    try:
        async for c in lease.chunks(first, watch=True):
            out.feed(c)
            if out.done is c:  # the last chunk: the generation's stats
                s.record(c)
    finally:
        lease.close()
    response = out.end()[-1]["response"]
    finished(response)
    return response


async def _events(s: ServerState, lease: Lease, first, out: Output, finished) -> AsyncIterator[str]:
    chunks = lease.chunks(first)
    try:
        for e in out.start():
            yield _sse(e)
        async for c in chunks:
            for e in out.feed(c):
                yield _sse(e)
            if out.done is c:
                s.record(c)
        last = out.end()
    except Exception as e:  # the status is sent already: the error travels as events
        for ev in out.failed(e):
            yield _sse(ev)
        return
    finally:
        await chunks.aclose()  # a client that went away closes us: stop the generation now, not at GC
    finished(last[-1]["response"])  # kept before the client can read the id and ask for it
    for e in last:
        yield _sse(e)


@router.get("/v1/responses/{response_id}", responses=error_responses(404))
async def get_response(response_id: str, request: Request):
    kept = _store(request).get(response_id)
    if kept is None:
        raise _not_kept(response_id)
    return kept[0]


@router.delete("/v1/responses/{response_id}", responses=error_responses(404))
async def delete_response(response_id: str, request: Request):
    if not _store(request).delete(response_id):
        raise _not_kept(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def _not_kept(rid: str) -> ApiError:
    return ApiError(404, f"no kept response {rid!r}: responses made with store=false, evicted ones (the latest "
                         f"{STORE_ITEMS} are kept) and those from before a restart are gone",
                    "not_found_error", param="response_id", code="response_not_found")
