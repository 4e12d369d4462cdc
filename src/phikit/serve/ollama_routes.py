"""Ollama-compatible routes: /api/chat, /api/generate, /api/embed(dings), /api/tags, /api/show, /api/ps, /api/version.

Streams are NDJSON (one JSON object a line) unless `"stream": false`; the
last object has `done: true`, `done_reason` and the timings in nanoseconds
that Ollama clients read (`eval_count / eval_duration` is their tokens/s).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from .. import __version__
from ..engine.types import Chunk, SamplingParams
from ..errors import PhikitError
from .errors import ApiError, internal_error
from .generation import chat_stream, check_tools, schema_of_ollama_format, tool_calls_of, with_json
from .schemas import (
    OllamaChatRequest, OllamaEmbedRequest, OllamaGenerateRequest, OllamaLegacyEmbedRequest, OllamaOptions, OllamaShowRequest,
    error_responses,
)
from .state import EMBED_NAME, ChunkStreamResponse, ServerState

router = APIRouter()
NS = 1_000_000_000


def _state(request: Request) -> ServerState:
    return request.app.state.phikit


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _params(s: ServerState, o: OllamaOptions | None) -> SamplingParams:
    o = o or OllamaOptions()
    # num_predict -1 (forever) and -2 (fill the context) both mean: up to the server's limit
    wanted = o.num_predict if o.num_predict is not None and o.num_predict > 0 else None
    return SamplingParams(
        max_tokens=s.max_tokens(wanted, "options.num_predict"),
        temperature=0.8 if o.temperature is None else o.temperature,  # Ollama's defaults
        top_p=0.9 if o.top_p is None else o.top_p,
        top_k=40 if o.top_k is None else o.top_k,
        seed=o.seed,
        stop=list(o.stop or []),
    ).validate()


def _final_stats(c: Chunk, t0: float) -> dict:
    st = c.stats
    out = {"done": True, "done_reason": c.finish_reason, "total_duration": int((time.perf_counter() - t0) * NS), "load_duration": 0}
    if st is not None:
        out.update(
            prompt_eval_count=st.prompt_tokens, prompt_eval_duration=int(st.prompt_s * NS),
            eval_count=st.completion_tokens, eval_duration=int(st.decode_s * NS),
        )
    return out


def _line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _ollama_calls(events: list) -> list[dict]:
    # Ollama's shape: arguments as an object, not a JSON string
    return [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
            for c in tool_calls_of(events)]


async def _respond(request: Request, s: ServerState, make, shape, stream: bool, t0: float):
    """Run one generation; `shape(text, calls)` wraps a text delta (and tool calls) as this route's payload."""
    lease, gen = await s.first_stream(request, make)
    name = s.name
    if stream:
        async def lines() -> AsyncIterator[str]:
            try:
                async for c in lease.chunks(gen):
                    if not isinstance(c, Chunk):  # a ToolEvent
                        calls = _ollama_calls([c])
                        if calls:
                            yield _line({"model": name, "created_at": _now(), **shape("", calls), "done": False})
                        continue
                    if c.text:
                        yield _line({"model": name, "created_at": _now(), **shape(c.text), "done": False})
                    if c.finish_reason is not None:
                        s.record(c)
                        yield _line({"model": name, "created_at": _now(), **shape(""), **_final_stats(c, t0)})
            except PhikitError as e:
                yield _line({"error": str(e)})
            except Exception as e:  # a bug: logged, and only its reference sent (the status is sent already)
                yield _line({"error": internal_error(e).message})

        return ChunkStreamResponse(lines(), lease, "application/x-ndjson")
    try:
        parts, events, last = [], [], Chunk(finish_reason="stop")
        async for c in lease.chunks(gen, watch=True):
            if not isinstance(c, Chunk):
                events.append(c)
                parts.clear()  # text before a call belonged to that call's turn
                continue
            parts.append(c.text)
            if c.finish_reason is not None:
                last = c
                s.record(c)
    finally:
        lease.close()
    return {"model": name, "created_at": _now(), **shape("".join(parts), _ollama_calls(events)), **_final_stats(last, t0)}


def _loaded(name: str, shape) -> dict:
    # Ollama answers an empty request by (re)loading the model: here it is always loaded.
    return {"model": name, "created_at": _now(), **shape(""), "done": True, "done_reason": "load"}


@router.post("/api/chat", responses=error_responses(400, 404, openai=False))
async def chat(body: OllamaChatRequest, request: Request):
    t0 = time.perf_counter()
    s = _state(request)
    s.check_model(body.model)
    def shape(text: str, calls: list | None = None) -> dict:
        msg = {"role": "assistant", "content": text}
        return {"message": {**msg, "tool_calls": calls} if calls else msg}
    if not body.messages:
        return _loaded(s.name, shape)
    lim = s.limits
    s.check_limit(len(body.messages), lim.max_messages, "messages", "the number of messages")
    check_tools(body.tools, lim.max_tools, lim.max_schema_bytes)
    schema = schema_of_ollama_format(body.format)
    if body.tools and schema is not None:
        raise ApiError(400, "format cannot be combined with tools: send one or the other", param="format")
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    params = with_json(_params(s, body.options), schema, lim.max_schema_bytes, "format")
    make = partial(chat_stream, s.model, messages, params, body.tools or None)
    return await _respond(request, s, make, shape, body.stream, t0)


@router.post("/api/generate", responses=error_responses(400, 404, openai=False))
async def generate(body: OllamaGenerateRequest, request: Request):
    t0 = time.perf_counter()
    s = _state(request)
    s.check_model(body.model)
    def shape(text: str, calls: list | None = None) -> dict:
        return {"response": text}
    if not body.prompt:
        return _loaded(s.name, shape)
    params = with_json(_params(s, body.options), schema_of_ollama_format(body.format), s.limits.max_schema_bytes, "format")
    if body.raw:  # the prompt is already rendered: no chat template
        make = partial(s.model.backend.stream_prompt, body.prompt, params)
    else:
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + [{"role": "user", "content": body.prompt}]
        make = partial(chat_stream, s.model, messages, params)
    return await _respond(request, s, make, shape, body.stream, t0)


async def _embed(s: ServerState, texts: list[str]) -> tuple[list[list[float]], int]:
    if not texts:
        raise ApiError(400, "input must not be empty", param="input")
    s.check_limit(len(texts), s.limits.max_inputs, "input", "the number of inputs")
    return await asyncio.to_thread(s.embedder.embed, texts)


@router.post("/api/embed", responses=error_responses(400, 404, openai=False))
async def embed(body: OllamaEmbedRequest, request: Request):
    t0 = time.perf_counter()
    s = _state(request)
    s.check_embed_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    vecs, n_tokens = await _embed(s, texts)
    return {"model": body.model, "embeddings": vecs, "total_duration": int((time.perf_counter() - t0) * NS),
            "load_duration": int(s.embedder.load_s * NS), "prompt_eval_count": n_tokens}


@router.post("/api/embeddings", responses=error_responses(400, 404, openai=False))
async def embeddings_legacy(body: OllamaLegacyEmbedRequest, request: Request):
    s = _state(request)
    s.check_embed_model(body.model)
    vecs, _ = await _embed(s, [body.prompt])
    return {"embedding": vecs[0]}


def _details(s: ServerState) -> dict:
    info = s.info
    n = info.get("parameters") or s.model.spec.params or 0
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    fmt = "gguf" if info.get("dtype") == "gguf" else "safetensors"
    return {"parent_model": "", "format": fmt, "family": info.get("format", ""), "families": [info.get("format", "")],
            "parameter_size": size, "quantization_level": str(info.get("quant", "none"))}


def _entry(s: ServerState, name: str) -> dict:
    return {"name": f"{name}:latest", "model": f"{name}:latest", "modified_at": datetime.fromtimestamp(s.started, timezone.utc).isoformat(),
            "size": int(s.info.get("memory_bytes") or 0), "digest": s.digest, "details": _details(s)}


@router.get("/api/tags")
async def tags(request: Request):
    s = _state(request)
    return {"models": [_entry(s, n) for n in s.chat_names()]}


@router.get("/api/ps")
async def ps(request: Request):
    s = _state(request)
    # Loaded for as long as the server runs: report an expiry far ahead, as Ollama does for keep_alive -1.
    expires = (datetime.now(timezone.utc) + timedelta(days=365)).isoformat()
    on_gpu = s.info.get("device", "cpu") != "cpu"
    return {"models": [{**_entry(s, s.name), "expires_at": expires, "size_vram": _entry(s, s.name)["size"] if on_gpu else 0}]}


@router.post("/api/show", responses=error_responses(400, 404, openai=False))
async def show(body: OllamaShowRequest, request: Request):
    s = _state(request)
    s.check_model(body.model or body.name)
    sample = s.model.fmt.render([{"role": "user", "content": "{{ .Prompt }}"}], add_generation_prompt=True)
    return {
        "modelfile": f"# served by phikit {__version__}\nFROM {s.model.spec.source}\n",
        "parameters": "\n".join(f"stop {json.dumps(t)}" for t in s.model.fmt.stop),
        "template": sample,
        "details": _details(s),
        "model_info": {"general.parameter_count": s.info.get("parameters"), "general.context_length": s.info.get("context_length"),
                       "phikit.backend": s.info.get("backend"), "phikit.format": s.info.get("format")},
        "capabilities": ["completion", "tools"],
        "modified_at": datetime.fromtimestamp(s.started, timezone.utc).isoformat(),
    }


@router.get("/api/version")
async def version():
    return {"version": __version__}


@router.get("/", response_class=PlainTextResponse)
async def root():
    return "phikit is running"


__all__ = ["router", "EMBED_NAME"]
