"""POST /v1/rag/query: an answer from the documents of the store given with --rag-store, with its sources.

Retrieval (the RAG's embedder and store) runs on the one thread that opened
the store (SQLite connections stay on their thread), one query at a time; the grounded answer then takes the generation slot like
any other request. With `"stream": true` the reply is server-sent events:
`{"type": "sources", ...}`, then `{"type": "delta", "text": ...}` chunks, then
`{"type": "done", "abstained": ..., "finish_reason": ...}` and `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import AsyncIterator, Literal

from fastapi import APIRouter, Request
from pydantic import Field

from ..engine.types import SamplingParams
from ..errors import PhikitError
from ..grounding import ABSTAIN, is_abstention
from .errors import ApiError, internal_error
from .schemas import _Body, error_responses
from .state import ChunkStreamResponse, ServerState

router = APIRouter()


class RagQuery(_Body):
    question: str = Field(min_length=1)
    k: int | None = Field(default=None, ge=1, le=50)
    mode: Literal["hybrid", "dense", "bm25"] | None = None
    stream: bool = False
    max_tokens: int | None = None
    temperature: float = Field(default=0.0, ge=0, le=2)  # grounded answers: greedy by default


def _retrieve(rag, q: RagQuery):
    hits = rag.retrieve(q.question, q.k, q.mode)
    return hits, rag.gate(hits)


@router.post("/v1/rag/query", responses=error_responses(400, 404))
async def rag_query(body: RagQuery, request: Request):
    s: ServerState = request.app.state.phikit
    if s.rag is None:
        raise ApiError(404, "no document store is loaded: start the server with --rag-store DIR", code="rag_not_configured")
    params = SamplingParams(max_tokens=s.max_tokens(body.max_tokens), temperature=body.temperature).validate()
    hits, gated = await asyncio.get_running_loop().run_in_executor(s.rag_pool, _retrieve, s.rag, body)
    sources = [h.to_dict() for h in hits]
    if gated:  # nothing relevant: abstain without asking the model
        if body.stream:
            return _static_events(sources)
        return {"answer": ABSTAIN, "abstained": True, "gated": True, "sources": sources}
    lease, gen = await s.first_stream(request, partial(s.rag.stream, body.question, hits, params))
    if body.stream:
        return ChunkStreamResponse(_events(s, lease, gen, sources), lease, "text/event-stream")
    try:
        parts, usage = [], {}
        async for c in lease.chunks(gen, watch=True):
            parts.append(c.text)
            if c.finish_reason is not None:
                s.record(c)
                if c.stats:
                    usage = {"prompt_tokens": c.stats.prompt_tokens, "completion_tokens": c.stats.completion_tokens}
    finally:
        lease.close()
    text = "".join(parts).strip()
    return {"answer": text, "abstained": is_abstention(text), "gated": False, "sources": sources, "usage": usage}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _static_events(sources: list[dict]):
    from fastapi.responses import Response

    text = (_sse({"type": "sources", "sources": sources}) + _sse({"type": "delta", "text": ABSTAIN})
            + _sse({"type": "done", "abstained": True, "gated": True, "finish_reason": "stop"}) + "data: [DONE]\n\n")
    return Response(text, media_type="text/event-stream")


async def _events(s: ServerState, lease, gen, sources: list[dict]) -> AsyncIterator[str]:
    yield _sse({"type": "sources", "sources": sources})
    parts = []
    try:
        async for c in lease.chunks(gen):
            if c.text:
                parts.append(c.text)
                yield _sse({"type": "delta", "text": c.text})
            if c.finish_reason is not None:
                s.record(c)
                yield _sse({"type": "done", "abstained": is_abstention("".join(parts)), "gated": False, "finish_reason": c.finish_reason})
    except PhikitError as e:
        yield _sse({"type": "error", "error": {"message": str(e)}})
        return
    except Exception as e:  # a bug: logged, and only its reference sent (the status is sent already)
        yield _sse({"type": "error", "error": {"message": internal_error(e).message}})
        return
    yield "data: [DONE]\n\n"
