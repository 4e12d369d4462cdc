"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Streams are framed as server-sent events ending in `data: [DONE]`; with
`stream_options.include_usage` a last chunk with empty `choices` carries the
usage. `n` choices are generated one after another on the one slot, each with
its own seed (seed + index) so they differ yet stay reproducible.

Log-probabilities (`logprobs` 0..5 on completions, in the legacy shape
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; `logprobs: true` and
`top_logprobs` 0..20 on chat, in `{"content": [{"token", "logprob", "bytes",
"top_logprobs"}]}`) are the model's raw distribution, before temperature, top-p and
any JSON constraint (engine.types.Logprob), as vLLM returns by default. Completions
with `echo` give the prompt's tokens too, the first one's logprob null; with
`max_tokens: 0` nothing is generated: the prompt is scored (lm-evaluation-harness's
loglikelihood). A prompt may be token ids of the served model's tokenizer.
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

from ..chat.reply import Reply
from ..engine.types import MAX_STOPS, Chunk, Logprob, SamplingParams
from ..errors import PhikitError
from .errors import ApiError, internal_error, not_found_model
from .generation import (
    chat_stream, check_forced_calls, check_tools, pick_tools, primed, schema_of_response_format, tool_calls_of, with_json,
)
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, error_responses
from .modelfile import SPECIAL_STOPS
from .embeddings import embed as embed_input
from .state import ChunkStreamResponse, ServerState
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


def _params(body, max_tokens: int, index: int, defaults: dict | None = None, **more) -> SamplingParams:
    """The request's sampling, over `defaults` (the PARAMETERs of a model made with /api/create), over OpenAI's."""
    d = defaults or {}
    seed = body.seed if body.seed is not None else d.get("seed")
    # a Modelfile's stops name the format's end tokens too: generation stops on those already
    stop = _stops(body.stop) if body.stop is not None else [x for x in d.get("stop", []) if x not in SPECIAL_STOPS]
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=d.get("temperature", 1.0) if body.temperature is None else body.temperature,  # OpenAI's defaults
        top_p=d.get("top_p", 1.0) if body.top_p is None else body.top_p,
        top_k=d.get("top_k", 0),
        seed=None if seed is None else seed + index,
        stop=stop,
        ignore_eos=body.ignore_eos,
        **more,
    ).validate()


LOGPROB_FLOOR = -9999.0  # what OpenAI and vLLM send for a token the model rules out: JSON has no -inf


def _value(v: float | None) -> float | None:
    return None if v is None else max(v, LOGPROB_FLOOR)


def _chat_logprobs(lps: list[Logprob], k: int) -> dict:
    """Chat's shape: one entry per token, with its `k` likeliest alternatives."""
    def entry(lp: Logprob) -> dict:
        return {"token": lp.token, "logprob": _value(lp.logprob), "bytes": list(lp.piece)}

    return {"content": [{**entry(lp), "top_logprobs": [entry(t) for t in lp.top[:k]]} for lp in lps]}


def _legacy_logprobs(lps: list[Logprob], k: int, offset: int) -> tuple[dict, int]:
    """Completions' shape for `lps`, their text starting at `offset` of the choice's text; and the offset after them.

    top_logprobs holds the k likeliest tokens and the chosen one (as vLLM and llama.cpp's server do, so a
    client can tell whether it was the likeliest); null for the prompt's first token."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for lp in lps:
        out["tokens"].append(lp.token)
        out["token_logprobs"].append(_value(lp.logprob))
        out["text_offset"].append(offset)
        offset += len(lp.token)
        top = None
        if lp.logprob is not None:
            top = {}
            for t in [*lp.top[:k], lp]:
                top.setdefault(t.token, _value(t.logprob))
        out["top_logprobs"].append(top)
    return out, offset


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
    """(choice index, chunk) over every stream, on the one lease; `watch`: see Lease.chunks. One slot: the
    streams in turn. Several (the model batches): all started at once, so `n` choices generate together,
    and their chunks come as they are made."""
    if lease.worker.slots == 1 or len(makers) == 1:
        gen = first
        for i, make in enumerate(makers):
            if i:
                gen = await lease.start(make)
            async for c in lease.chunks(gen, watch):
                yield i, c
        return
    out: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, make) -> None:
        try:
            gen = first if i == 0 else await lease.start(make)
            async for c in lease.chunks(gen, watch):
                await out.put((i, c))
            await out.put((i, None))
        except BaseException as e:  # handed to the reader, which raises it
            await out.put((i, e))

    tasks = [asyncio.ensure_future(pump(i, make)) for i, make in enumerate(makers)]
    try:
        left = len(tasks)
        while left:
            i, c = await out.get()
            if c is None:
                left -= 1
            elif isinstance(c, BaseException):
                raise c
            else:
                yield i, c
    finally:
        for t in tasks:
            t.cancel()


async def _generate(request: Request, makers: list) -> tuple[Lease, Iterator[Chunk]]:
    return await _state(request).first_stream(request, makers[0])


@router.post("/v1/chat/completions", responses=error_responses(400, 404))
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s = _state(request)
    lim = s.limits
    u = await s.use(request, body.model)
    name = u.name
    s.check_limit(len(body.messages), lim.max_messages, "messages", "the number of messages")
    s.check_limit(body.n, lim.max_n, "n", "n")
    wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = s.max_tokens(wanted, "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
                              u.model, u.d.parameters.get("num_predict"))
    check_tools(body.tools, lim.max_tools, lim.max_schema_bytes)
    tools, choice = pick_tools(body.tools, body.tool_choice)
    check_forced_calls(tools, choice, lim.max_schema_bytes)
    schema = schema_of_response_format(body.response_format)
    if tools and schema is not None:
        raise ApiError(400, "response_format cannot be combined with tools: send one or the other", param="response_format")
    k = _chat_top(body, tools)
    messages = u.messages([m.plain() for m in body.messages])
    makers = [
        partial(chat_stream, u.model, messages, with_json(_params(body, max_tokens, i, u.d.parameters, logprobs=k), schema, lim.max_schema_bytes,
                                                          "response_format"), tools, choice)
        for i in range(body.n)
    ]
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    lease, first = await _generate(request, makers)
    usage = Usage(s)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "system_fingerprint": FINGERPRINT}
        return ChunkStreamResponse(_framed(_chat_events(lease, first, makers, head, include_usage, usage, k), head, usage,
                                           include_usage), lease, "text/event-stream")

    try:
        replies = [Reply() for _ in range(body.n)]
        async for i, c in _run_all(lease, first, makers, watch=True):
            d = replies[i].feed(c)
            if d.done:
                usage.finish(i, d.done)
    finally:
        lease.close()
    choices = []
    for i, r in enumerate(replies):
        calls = tool_calls_of(r.calls)
        message = {"role": "assistant", "content": r.text if not calls else (r.text.strip() or None)}
        if calls:
            message["tool_calls"] = calls
        logprobs = None if k is None else _chat_logprobs(r.logprobs, k)
        choices.append({"index": i, "message": message, "logprobs": logprobs,
                        "finish_reason": "tool_calls" if calls else r.finish_reason or "stop"})
    return {"id": rid, "object": "chat.completion", "created": created, "model": name, "system_fingerprint": FINGERPRINT,
            "choices": choices, "usage": usage.dict()}


def _chat_top(body: ChatCompletionRequest, tools) -> int | None:
    """How many alternatives each token's logprobs carry (None: logprobs not asked for)."""
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if not body.logprobs:
        return None
    if tools:  # the tool loop holds text back to find calls in it, and passes on text only
        raise ApiError(400, "logprobs cannot be combined with tools here: send one or the other", param="logprobs")
    return body.top_logprobs or 0


async def _chat_events(lease: Lease, first, makers, head: dict, include_usage: bool, usage: Usage,
                       k: int | None = None) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    replies: dict[int, Reply] = {}

    def event(i: int, delta: dict, finish: str | None = None, lps: list[Logprob] | None = None) -> str:
        logprobs = None if k is None or lps is None else _chat_logprobs(lps, k)
        return _sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], **extra})

    # The text event, one a token a stream, is the same JSON each time but for its text: framed once per
    # choice around a marker, then only the text is encoded (the whole dict's encoding was a tenth of the
    # server's time at 64 streams; benchmarks/speed/serve_ceiling.py). Byte for byte what `event` writes.
    frames: dict[int, tuple[str, str]] = {}

    def text_event(i: int, text: str) -> str:
        if i not in frames:
            before, after = event(i, {"content": "\0"}).rsplit(json.dumps("\0"), 1)  # the last string in it
            frames[i] = before, after
        before, after = frames[i]
        return before + json.dumps(text, ensure_ascii=False) + after

    async for i, c in _run_all(lease, first, makers):
        if i not in replies:  # the first chunk of a choice announces the role
            replies[i] = Reply()
            yield event(i, {"role": "assistant", "content": ""})
        reply = replies[i]
        d = reply.feed(c)
        if d.client_call:  # one delta carries a whole call
            for call in tool_calls_of([d.client_call]):
                yield event(i, {"tool_calls": [{"index": len(reply.calls) - 1, **call}]})
        if d.text or d.logprobs:
            yield text_event(i, d.text) if k is None else event(i, {"content": d.text}, lps=d.logprobs)
        if d.done:
            usage.finish(i, d.done)
            yield event(i, {}, "tool_calls" if reply.calls else d.done.finish_reason)


@router.post("/v1/completions", responses=error_responses(400, 404))
async def completions(body: CompletionRequest, request: Request):
    s = _state(request)
    u = await s.use(request, body.model)
    name = u.name
    if not body.prompt:
        raise ApiError(400, "prompt must not be an empty list", param="prompt")
    one = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)  # a text, or one prompt's token ids
    prompts = [body.prompt] if one else body.prompt
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:  # nothing to continue: llama.cpp fails on zero tokens (a model without BOS encodes "" to none)
        where = "prompt" if one else f"prompt.{empty[0]}"
        raise ApiError(400, f"'{where}' is empty: send the text (or token ids) to continue", param=where)
    s.check_limit(len(prompts) * body.n, s.limits.max_n, "n", "the number of choices (prompts x n)")
    if body.max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens 0 generates nothing: use it with echo (and logprobs) to score the prompt", param="max_tokens")
    max_tokens = 0 if body.max_tokens == 0 else s.max_tokens(body.max_tokens, "max_tokens", u.model, u.d.parameters.get("num_predict"))
    for where, p in zip(["prompt"] if one else [f"prompt.{i}" for i in range(len(prompts))], prompts):
        if not isinstance(p, str):
            try:
                u.model.backend.check_prompt_ids(p)  # here, so the 400 names which prompt
            except PhikitError as e:
                raise ApiError(400, f"'{where}': {e}", param="prompt") from None
    k = body.logprobs
    # The prompt's own logprobs: asked for with echo, and what an echo of token ids shows as its text.
    scored = [body.echo and (k is not None or max_tokens == 0 or not isinstance(p, str)) for p in prompts]
    # primed: the first token is made before the status is sent, so an error is a status, not a broken stream
    makers = [partial(_primed_prompt, u.model, p, _params(body, max_tokens, i, u.d.parameters, logprobs=k, prompt_logprobs=(k or 0) if sc else None))
              for p, sc in zip(prompts, scored) for i in range(body.n)]
    echoes = [p for p in prompts for _ in range(body.n)]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    lease, first = await _generate(request, makers)
    head = {"id": rid, "object": "text_completion", "created": created, "model": name, "system_fingerprint": FINGERPRINT}

    usage = Usage(s, per_prompt=body.n)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _completion_events(lease, first, makers, head, include_usage, echoes if body.echo else None, usage, k)
        return ChunkStreamResponse(_framed(events, head, usage, include_usage), lease, "text/event-stream")

    try:
        texts, finishes = [""] * len(makers), ["stop"] * len(makers)
        scores: list[list[Logprob]] = [[] for _ in makers]  # the prompt's (with echo), then the generated tokens'
        async for i, c in _run_all(lease, first, makers, watch=True):
            if c.prompt_logprobs is not None:
                scores[i] = c.prompt_logprobs + scores[i]
            texts[i] += c.text
            scores[i] += c.logprobs or []
            if c.finish_reason is not None:
                finishes[i] = c.finish_reason
                usage.finish(i, c)
    finally:
        lease.close()
    choices = []
    for i in range(len(makers)):
        text = (_echo_text(echoes[i], scores[i]) if body.echo else "") + texts[i]
        logprobs = None if k is None else _legacy_logprobs(scores[i], k, 0)[0]
        choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finishes[i]})
    return {**head, "choices": choices, "usage": usage.dict()}


def _echo_text(prompt: str | list[int], scored: list[Logprob]) -> str:
    """The prompt as echo shows it: the text as sent, or the text of the token ids (their pieces, from the prompt's logprobs)."""
    if isinstance(prompt, str):
        return prompt
    return b"".join(lp.piece for lp in scored[: len(prompt)]).decode("utf-8", errors="replace")


def _primed_prompt(model, prompt: str | list[int], params: SamplingParams) -> Iterator[Chunk]:
    return primed(model.stream_prompt(prompt, params))


async def _completion_events(lease, first, makers, head, include_usage, echoes, usage: Usage, k: int | None = None) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    started, offsets = set(), {}

    def event(i: int, text: str, lps: list[Logprob] | None, finish: str | None = None) -> str:
        logprobs = None
        if k is not None and lps is not None:
            logprobs, offsets[i] = _legacy_logprobs(lps, k, offsets.get(i, 0))
        return _sse({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}], **extra})

    async for i, c in _run_all(lease, first, makers):
        if echoes is not None and i not in started:
            started.add(i)
            yield event(i, _echo_text(echoes[i], c.prompt_logprobs or []), c.prompt_logprobs)
        if c.text or c.logprobs or c.finish_reason is not None:
            yield event(i, c.text, c.logprobs, c.finish_reason)
        if c.finish_reason is not None:
            usage.finish(i, c)


@router.post("/v1/embeddings", responses=error_responses(400, 404))
async def embeddings(body: EmbeddingRequest, request: Request):
    s = _state(request)
    name = s.check_embed_model(body.model)
    vecs, n_tokens = await asyncio.to_thread(embed_input, s, name, body.input, body.dimensions)
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
    defs = await asyncio.to_thread(s.defs)  # the names /api/tags lists, and the embedder's
    embed = [n for n in s.embed_names() if n not in {d.name for d in defs}]
    return {"object": "list", "data": [*(_model_card(d.name, int(d.modified_at or s.started)) for d in defs),
                                       *(_model_card(n, int(s.started)) for n in embed)]}


@router.get("/v1/models/{model_id:path}", responses=error_responses(404))
async def get_model(model_id: str, request: Request):
    s = _state(request)
    d = await asyncio.to_thread(s.find, model_id)
    if model_id in s.embed_names() or d is not None:
        return _model_card(model_id, int(d.modified_at if d is not None else s.started))
    raise not_found_model(model_id, [*(d.name for d in await asyncio.to_thread(s.defs)), *s.embed_names()])

