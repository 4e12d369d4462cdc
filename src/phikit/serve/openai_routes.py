"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Streams are framed as server-sent events ending in `data: [DONE]`; with
`stream_options.include_usage` a last chunk with empty `choices` carries the
usage. `n` choices are generated one after another on the one slot, each with
its own seed (seed + index) so they differ yet stay reproducible.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from functools import partial
from typing import AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Request

from ..engine.types import MAX_STOPS, Chunk, SamplingParams
from ..errors import PhikitError
from .errors import ApiError, internal_error, not_found_model
from .generation import (
    chat_stream, check_forced_calls, check_tools, pick_tools, primed, schema_of_response_format, tool_calls_of, with_json,
)
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, error_responses
from .state import EMBED_NAME, ChunkStreamResponse, ServerState
from .worker import Lease

router = APIRouter()
FINGERPRINT = "fp_phikit"


def _state(request: Request) -> ServerState:
    return request.app.state.phikit


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:  # SamplingParams.validate refuses it too; here the error can name the param
        raise ApiError(400, f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", param="stop")
    return stops


def _params(body, max_tokens: int, index: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's defaults
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=None if body.seed is None else body.seed + index,
        stop=_stops(body.stop),
    ).validate()


class Usage:
    """Token counts of one response over all its choices, and the server's metrics per finished stream.

    OpenAI counts a prompt once: a chat request has one prompt (n choices share it, and a
    tool loop's last round holds the whole conversation, so each finish replaces it); a
    completions request has one per prompt, shared by that prompt's `per_prompt` choices.
    """

    def __init__(self, s: ServerState, per_prompt: int | None = None):
        self.s, self.per_prompt = s, per_prompt
        self.prompt = self.completion = 0

    def finish(self, i: int, c: Chunk) -> None:
        """Count the last chunk of choice i's stream."""
        self.s.record(c)
        if not c.stats:
            return
        self.completion += c.stats.completion_tokens
        if self.per_prompt is None:
            self.prompt = c.stats.prompt_tokens
        elif i % self.per_prompt == 0:
            self.prompt += c.stats.prompt_tokens

    def dict(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion, "total_tokens": self.prompt + self.completion}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse_error(e: Exception) -> str:
    if isinstance(e, PhikitError):
        e = ApiError(e.status, str(e), "invalid_request_error" if e.status < 500 else "server_error")
    elif not isinstance(e, ApiError):  # a bug: logged, and only its reference sent
        e = internal_error(e)
    return _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})


async def _framed(events: AsyncIterator[str], head: dict, usage: Usage, include_usage: bool) -> AsyncIterator[str]:
    """An SSE body: the events, then the usage chunk when asked for, then [DONE]; an error
    after the headers are sent travels as an error event, as OpenAI's does."""
    try:
        async for e in events:
            yield e
    except Exception as e:  # the status is sent already: an error event, then the end of the stream
        yield _sse_error(e)
        return
    finally:
        await events.aclose()  # a client that went away closes us: stop the generation under us now, not at GC
    if include_usage:
        yield _sse({**head, "choices": [], "usage": usage.dict()})
    yield "data: [DONE]\n\n"


async def _run_all(lease: Lease, first: Iterator[Chunk], makers: list[Callable[[], Iterator[Chunk]]],
                   watch: bool = False) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) over every stream in turn, on the one lease; `watch`: see Lease.chunks."""
    gen = first
    for i, make in enumerate(makers):
        if i:
            gen = await lease.start(make)
        async for c in lease.chunks(gen, watch):
            yield i, c


async def _generate(request: Request, makers: list) -> tuple[Lease, Iterator[Chunk]]:
    return await _state(request).first_stream(request, makers[0])


@router.post("/v1/chat/completions", responses=error_responses(400, 404))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = _state(request)
    lim = s.limits
    name = s.check_model(body.model)
    s.check_limit(len(body.messages), lim.max_messages, "messages", "the number of messages")
    s.check_limit(body.n, lim.max_n, "n", "n")
    wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = s.max_tokens(wanted, "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
    check_tools(body.tools, lim.max_tools, lim.max_schema_bytes)
    tools, choice = pick_tools(body.tools, body.tool_choice)
    check_forced_calls(tools, choice, lim.max_schema_bytes)
    schema = schema_of_response_format(body.response_format)
    if tools and schema is not None:
        raise ApiError(400, "response_format cannot be combined with tools: send one or the other", param="response_format")
    messages = [m.plain() for m in body.messages]
    makers = [
        partial(chat_stream, s.model, messages, with_json(_params(body, max_tokens, i), schema, lim.max_schema_bytes, "response_format"), tools, choice)
        for i in range(body.n)
    ]
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    lease, first = await _generate(request, makers)
    usage = Usage(s)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "system_fingerprint": FINGERPRINT}
        return ChunkStreamResponse(_framed(_chat_events(lease, first, makers, head, include_usage, usage), head, usage, include_usage),
                                   lease, "text/event-stream")

    try:
        texts, events, finishes = [""] * body.n, [[] for _ in range(body.n)], ["stop"] * body.n
        async for i, c in _run_all(lease, first, makers, watch=True):
            if not isinstance(c, Chunk):  # a ToolEvent
                events[i].append(c)
                texts[i] = ""  # text before a call belonged to that call's turn
                continue
            texts[i] += c.text
            if c.finish_reason is not None:
                finishes[i] = c.finish_reason
                usage.finish(i, c)
    finally:
        lease.close()
    choices = []
    for i in range(body.n):
        calls = tool_calls_of(events[i])
        message = {"role": "assistant", "content": texts[i] if not calls else (texts[i].strip() or None)}
        if calls:
            message["tool_calls"] = calls
        choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": "tool_calls" if calls else finishes[i]})
    return {"id": rid, "object": "chat.completion", "created": created, "model": name, "system_fingerprint": FINGERPRINT,
            "choices": choices, "usage": usage.dict()}


async def _chat_events(lease: Lease, first, makers, head: dict, include_usage: bool, usage: Usage) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    started, n_calls = set(), {}

    def event(i: int, delta: dict, finish: str | None = None) -> str:
        return _sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    async for i, c in _run_all(lease, first, makers):
        if i not in started:  # the first chunk of a choice announces the role
            started.add(i)
            yield event(i, {"role": "assistant", "content": ""})
        if not isinstance(c, Chunk):  # a ToolEvent: one delta carries a whole call
            for call in tool_calls_of([c]):
                k = n_calls.get(i, 0)
                n_calls[i] = k + 1
                yield event(i, {"tool_calls": [{"index": k, **call}]})
            continue
        if c.text:
            yield event(i, {"content": c.text})
        if c.finish_reason is not None:
            usage.finish(i, c)
            yield event(i, {}, "tool_calls" if n_calls.get(i) else c.finish_reason)


@router.post("/v1/completions", responses=error_responses(400, 404))
async def completions(body: CompletionRequest, request: Request):
    s = _state(request)
    name = s.check_model(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ApiError(400, "prompt must not be an empty list", param="prompt")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:  # nothing to continue: llama.cpp fails on zero tokens (a model without BOS encodes "" to none)
        where = "prompt" if isinstance(body.prompt, str) else f"prompt.{empty[0]}"
        raise ApiError(400, f"'{where}' is empty: send the text to continue", param=where)
    s.check_limit(len(prompts) * body.n, s.limits.max_n, "n", "the number of choices (prompts x n)")
    max_tokens = s.max_tokens(body.max_tokens)
    be = s.model.backend
    # primed: the first token is made before the status is sent, so an error is a status, not a broken stream
    makers = [partial(_primed_prompt, be, p, _params(body, max_tokens, i)) for p in prompts for i in range(body.n)]
    echoes = [p for p in prompts for _ in range(body.n)]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    lease, first = await _generate(request, makers)
    head = {"id": rid, "object": "text_completion", "created": created, "model": name, "system_fingerprint": FINGERPRINT}

    usage = Usage(s, per_prompt=body.n)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _completion_events(lease, first, makers, head, include_usage, echoes if body.echo else None, usage)
        return ChunkStreamResponse(_framed(events, head, usage, include_usage), lease, "text/event-stream")

    try:
        texts, finishes = [e if body.echo else "" for e in echoes], ["stop"] * len(makers)
        async for i, c in _run_all(lease, first, makers, watch=True):
            texts[i] += c.text
            if c.finish_reason is not None:
                finishes[i] = c.finish_reason
                usage.finish(i, c)
    finally:
        lease.close()
    choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finishes[i]} for i in range(len(makers))]
    return {**head, "choices": choices, "usage": usage.dict()}


def _primed_prompt(be, prompt: str, params: SamplingParams) -> Iterator[Chunk]:
    return primed(be.stream_prompt(prompt, params))


async def _completion_events(lease, first, makers, head, include_usage, echoes, usage: Usage) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    started = set()
    async for i, c in _run_all(lease, first, makers):
        if echoes is not None and i not in started:
            started.add(i)
            yield _sse({**head, "choices": [{"index": i, "text": echoes[i], "logprobs": None, "finish_reason": None}], **extra})
        if c.text or c.finish_reason is not None:
            yield _sse({**head, "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}], **extra})
        if c.finish_reason is not None:
            usage.finish(i, c)


@router.post("/v1/embeddings", responses=error_responses(400, 404))
async def embeddings(body: EmbeddingRequest, request: Request):
    s = _state(request)
    name = s.check_embed_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise ApiError(400, "input must not be empty", param="input")
    s.check_limit(len(texts), s.limits.max_inputs, "input", "the number of inputs")
    vecs, n_tokens = await asyncio.to_thread(s.embedder.embed, texts)
    if body.encoding_format == "base64":
        import numpy as np

        vecs = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vecs]
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
    return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "phikit"}


@router.get("/v1/models")
async def list_models(request: Request):
    s = _state(request)
    names = [*s.chat_names(), EMBED_NAME]
    return {"object": "list", "data": [_model_card(n, int(s.started)) for n in names]}


@router.get("/v1/models/{model_id:path}", responses=error_responses(404))
async def get_model(model_id: str, request: Request):
    s = _state(request)
    if model_id == EMBED_NAME or model_id in s.chat_names():
        return _model_card(model_id, int(s.started))
    raise not_found_model(model_id, [*s.chat_names(), EMBED_NAME])

