"""What every route shares: the model, its generation slot, limits, metrics, the embedder."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from fastapi import Request
from starlette.responses import StreamingResponse

from ..engine.types import Chunk
from ..rag.embed import Embedder
from .errors import ApiError, not_found_model
from .metrics import Metrics
from .worker import ClientGone, Lease, Worker

EMBED_NAME = "all-minilm-l6-v2"
EMBED_ALIASES = {EMBED_NAME, "all-minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


@dataclass
class Limits:
    """Per-request limits; over one is a 400 that names it."""

    max_body_bytes: int = 4 * 1024 * 1024
    max_tokens: int = 4096
    max_n: int = 8
    max_tools: int = 64
    max_schema_bytes: int = 64 * 1024  # a response_format schema, or all tool declarations together
    max_messages: int = 512
    max_inputs: int = 256  # embedding inputs per request


@dataclass
class ServeConfig:
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)  # extra model names clients may ask for
    rag_store: str | None = None  # a store folder (or qdrant:// URL) for /v1/rag/query
    limits: Limits = field(default_factory=Limits)


class ServerState:
    def __init__(self, model, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.limits = config.limits
        self.worker = Worker()
        self.metrics = Metrics()
        self.embedder = Embedder(device="cpu", load=False)  # MiniLM, loaded on the first embedding request
        self.rag = None
        self.rag_pool = None
        if config.rag_store:
            from ..rag import RAG

            # The store's SQLite connection belongs to the thread that opened it: open it on the
            # one retrieval thread, and retrieve there. Raises PhikitError for a missing or empty store.
            self.rag_pool = ThreadPoolExecutor(1, thread_name_prefix="phikit-rag")
            self.rag = self.rag_pool.submit(RAG, config.rag_store, model=model).result()
        self.started = time.time()
        self.info = model.info()  # read once, before any request can run the model
        key = f"{model.name}|{model.spec.source}|{self.info.get('memory_bytes')}"
        self.digest = "sha256:" + hashlib.sha256(key.encode()).hexdigest()  # an identifier, not a content hash

    # -- names -------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.model.name

    def chat_names(self) -> list[str]:
        return [self.name, *self.config.aliases]

    def check_model(self, name: str | None) -> str:
        """The served name for a requested one (Ollama's ':latest' tag allowed); 404 otherwise."""
        base = (name or "").removesuffix(":latest")
        if base in self.chat_names():
            return self.name
        raise not_found_model(name or "", self.chat_names())

    def check_embed_model(self, name: str | None) -> str:
        base = (name or "").removesuffix(":latest")
        if base in EMBED_ALIASES:
            return EMBED_NAME
        raise not_found_model(name or "", [EMBED_NAME])

    # -- limits ------------------------------------------------------------
    def check_limit(self, value: int, limit: int, param: str, what: str) -> None:
        if value > limit:
            raise ApiError(400, f"{what} is {value}, over this server's limit of {limit}", param=param, code="limit_exceeded")

    def max_tokens(self, requested: int | None, param: str = "max_tokens") -> int:
        if requested is None:
            return min(self.limits.max_tokens, self.model.context_length)
        if requested < 1:
            raise ApiError(400, f"{param} must be at least 1, got {requested}", param=param)
        self.check_limit(requested, self.limits.max_tokens, param, param)
        return requested

    # -- generation --------------------------------------------------------
    async def lease(self, request: Request) -> Lease:
        """Queue for the generation slot; a client that leaves meanwhile raises ClientGone."""
        return await self.worker.acquire(request.is_disconnected)

    async def first_stream(self, request: Request, make: Callable[[], Iterator[Chunk]]) -> tuple[Lease, Iterator[Chunk]]:
        """Take the slot and start the first stream, so its errors come back as a status, not mid-stream."""
        lease = await self.lease(request)
        try:
            return lease, await lease.start(make)
        except BaseException:
            lease.close()
            raise

    def record(self, chunk: Chunk) -> None:
        if chunk.stats is not None:
            s = chunk.stats
            self.metrics.generation(s.prompt_tokens, s.completion_tokens, s.ttft_s)


class ChunkStreamResponse(StreamingResponse):
    """A streaming response that always closes its body and its Lease, however it ends."""

    def __init__(self, content, lease: Lease, media_type: str) -> None:
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.lease = lease

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self.lease.close()


__all__ = ["ServerState", "ServeConfig", "Limits", "ChunkStreamResponse", "ClientGone", "EMBED_NAME"]
