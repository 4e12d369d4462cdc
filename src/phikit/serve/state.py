"""What every route shares: the served models, the generation slot, limits, metrics, the embedder.

A request names its model; `await state.use(request, name, keep_alive)` looks the name up (the model
the server was started with and its aliases, the models made with /api/create, the registry's models
whose weights are here), loads it if need be (pool.py) and returns a `Use`: the served name, the
loaded Model and the defaults its requests start from. The Use holds the model loaded until the
response has ended (the Guard in app.py releases it), whatever way it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from fastapi import Request
from starlette.responses import StreamingResponse

from ..engine.types import Chunk
from ..errors import PhikitError
from ..rag.embed import Embedder
from .errors import ApiError, not_found_model
from .metrics import Metrics
from .pool import DEFAULT_KEEP_ALIVE, FOREVER, Pool, Slot, parse_keep_alive
from .store import ModelDef, ModelStore, base_name
from .worker import ClientGone, Lease, Worker

EMBED_NAME = "all-minilm-l6-v2"
EMBED_ALIASES = {EMBED_NAME, "all-minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
# The names embedding clients ask for by default, answered by the one embedder too (serve/embeddings.py):
# OpenAI's (token ids under these are tiktoken cl100k_base ids) and Ollama's most common.
OPENAI_EMBED_NAMES = ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002")
DEFAULT_EMBED_NAMES = (*OPENAI_EMBED_NAMES, "nomic-embed-text")


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


def env_keep_alive() -> float | None:
    """The default keep-alive: $OLLAMA_KEEP_ALIVE, else Ollama's 5 minutes (seconds; None = forever)."""
    v = os.environ.get("OLLAMA_KEEP_ALIVE", "").strip()
    return parse_keep_alive(v, "$OLLAMA_KEEP_ALIVE") if v else DEFAULT_KEEP_ALIVE


def env_max_loaded() -> int:
    """The default number of models held loaded: $OLLAMA_MAX_LOADED_MODELS, else Ollama's 3."""
    v = os.environ.get("OLLAMA_MAX_LOADED_MODELS", "").strip()
    if not v:
        return 3
    if not v.isdigit() or int(v) < 1:
        raise PhikitError(f"$OLLAMA_MAX_LOADED_MODELS must be a whole number of at least 1, got {v!r}")
    return int(v)


@dataclass
class ServeConfig:
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)  # extra model names clients may ask for
    embed_aliases: list[str] = field(default_factory=list)  # extra names for the embedder (--embed-alias)
    rag_store: str | None = None  # a store folder (or qdrant:// URL) for /v1/rag/query
    limits: Limits = field(default_factory=Limits)
    max_loaded: int = field(default_factory=env_max_loaded)  # models held loaded at once
    max_memory: int | None = None  # bytes all loaded models may take together (a model not yet loaded: its files' size)
    keep_alive: float | None = field(default_factory=env_keep_alive)  # seconds an idle model stays loaded; None = forever
    load_options: dict[str, Any] | None = None  # phikit.load keywords for models loaded on demand (quant, device, n_ctx...)
    start_load: dict[str, Any] | None = None  # phikit.load keywords that load the start model again; None: read from it
    models_dir: str | None = None  # the manifests of /api/create's models; None: $PHIKIT_HOME/serve/models
    # Continuous batching (engine/scheduler.py): requests generating together per model, and each model's KV
    # cache in tokens (None: the backend's default); the prompt cache reuses the KV of earlier prompts' prefixes.
    # parallel 1 without the prompt cache is one request at a time on one thread, with no engine thread.
    parallel: int = 1
    kv_tokens: int | None = None
    prompt_cache: bool = False


def _adapter_path(adapter: str | None) -> str | None:
    return str(Path(adapter).expanduser().resolve()) if adapter else None


def _reload_options(model, info: dict) -> dict[str, Any]:
    """phikit.load keywords that load `model` again as it is now."""
    spec, backend = model.spec, model.backend.name
    opts: dict[str, Any] = {"model": spec.source if (spec.gguf_file or spec.path) else spec.name, "adapter": model.adapter,
                            "format": model.fmt.name, "n_ctx": model.context_length, "backend": backend}
    if backend == "transformers":
        device = str(info.get("device", "cpu"))
        opts.update(device="cuda" if device.startswith("cuda") else "cpu",
                    quant=info.get("quant") if info.get("quant") in ("nf4", "int4") else "none")
        if info.get("dtype") in ("float32", "bfloat16", "float16"):
            opts["dtype"] = info["dtype"]
    elif backend == "llamacpp" and info.get("threads"):
        opts["threads"] = info["threads"]
    return opts


class Use:
    """One request's hold on a served model: `name` (as responses give it), the loaded `model`, and `d`,
    the ModelDef whose SYSTEM, MESSAGEs and PARAMETERs its requests start from. `release()` is idempotent."""

    def __init__(self, pool: Pool, slot: Slot, d: ModelDef):
        self.name, self.model, self.d = d.name, slot.model, d
        self._pool, self._slot = pool, slot

    def messages(self, messages: list[dict]) -> list[dict]:
        return self.d.conversation(messages)

    def options(self, given: dict[str, Any]) -> dict[str, Any]:
        return self.d.options(given)

    def release(self) -> None:
        if self._slot is not None:
            slot, self._slot = self._slot, None
            self._pool.release(slot)


class ServerState:
    def __init__(self, model, config: ServeConfig) -> None:
        self.config = config
        self.limits = config.limits
        self.batching = config.parallel > 1 or config.prompt_cache
        self.worker = Worker(config.parallel if self.batching else 1)
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
        self.store = ModelStore(config.models_dir)
        self.pool = Pool(self.worker, config.max_loaded, config.max_memory)
        # The start model: loaded now and kept loaded (keep_alive does not apply to it), unless the budget needs its
        # room or a request asks for its unload (keep_alive 0 with nothing to generate); then loaded again on its next
        # use. Pinned where something else holds it too (the RAG store's answers) or unloading frees nothing (a remote).
        self.batched(model)
        self.start = ModelDef(model.name, model.spec.source, _adapter_path(model.adapter), origin="start",
                              modified_at=self.started)
        self.start_spec = model.spec  # plain data: holding it keeps no weights alive
        self.start_key = (model.spec.source, self.start.adapter, None)
        pinned = self.rag is not None or model.backend.name == "openai"
        self.info = self.pool.add(self.start_key, model.name, model, FOREVER, pinned).info  # read before any request runs
        self._start_load = config.start_load or _reload_options(model, self.info)
        self.load_options = dict(config.load_options or {})
        key = f"{model.name}|{model.spec.source}|{self.info.get('memory_bytes')}"
        self.digest = hashlib.sha256(key.encode()).hexdigest()  # an identifier, not a content hash
        self._registry_names: tuple[float, list[str]] | None = None  # (when checked, names)

    # -- names -------------------------------------------------------------
    @property
    def name(self) -> str:
        """The name of the model the server was started with."""
        return self.start.name

    def chat_names(self) -> list[str]:
        """The start model's names: its own and the aliases given with --alias."""
        return [self.name, *self.config.aliases]

    def registry_names(self) -> list[str]:
        """The registry's models whose weights are on this machine (checked at most once a minute)."""
        if self._registry_names is None or time.monotonic() - self._registry_names[0] > 60:
            from ..models.registry import REGISTRY, resolve

            names = [n for n, spec in ((n, resolve(n)) for n in REGISTRY) if spec.gguf_file or spec.path]
            self._registry_names = (time.monotonic(), names)
        return self._registry_names[1]

    def defs(self) -> list[ModelDef]:
        """Every model a request may name (blocking: run it off the event loop): the start model and its
        aliases, the created models, the registry's models whose weights are here; each name once."""
        out = [self.start, *(ModelDef(a, self.start.source, self.start.adapter, origin="start", modified_at=self.started)
                             for a in self.config.aliases)]
        seen = {d.name.lower() for d in out}
        for d in [*self.store.all(), *(ModelDef(n, n, origin="registry", modified_at=self.started) for n in self.registry_names())]:
            if d.name.lower() not in seen:
                seen.add(d.name.lower())
                out.append(d)
        return out

    def find(self, name: str | None) -> ModelDef | None:
        """What a requested name stands for, or None (blocking: it may look for registry weights)."""
        n = base_name(name or "")
        if n.lower() in {x.lower() for x in self.chat_names()}:
            return self.start
        d = self.store.get(n)
        if d is not None or not n:
            return d
        from ..models.registry import ALIASES, REGISTRY

        key = ALIASES.get(n.lower(), n.lower())
        if key in REGISTRY and key in self.registry_names():
            return ModelDef(key, key, origin="registry", modified_at=self.started)
        return None

    async def lookup(self, name: str | None) -> ModelDef:
        """What a requested name stands for (Ollama's ':latest' tag allowed); 404 listing the served names otherwise."""
        d = await asyncio.to_thread(self.find, name)
        if d is None:
            names = [d.name for d in await asyncio.to_thread(self.defs)]
            raise not_found_model(name or "", names)
        return d

    # -- loaded models -------------------------------------------------------
    def spec(self, d: ModelDef):
        """The located weights (a ModelSpec) of a model (blocking); its PhikitError names the model when they are gone."""
        if d.origin == "start" or (d.source, d.adapter) == (self.start.source, self.start.adapter):
            return self.start_spec  # also a copy of the start model, or one made FROM it
        from ..models.registry import resolve

        try:
            return resolve(d.source)
        except PhikitError as e:
            raise type(e)(f"model {d.name!r} ({d.source}): {e}") from None

    def key(self, d: ModelDef, spec=None) -> tuple:
        """The pool key of a model: what it loads (weights, adapter, context length); blocking."""
        if d.origin == "start":
            return self.start_key
        return ((spec or self.spec(d)).source, d.adapter, d.num_ctx)

    def _plan(self, d: ModelDef) -> tuple[tuple, Callable[[], Any], int]:
        """(pool key, loader, estimated bytes) of a model (blocking: it looks at the weights' files)."""
        spec = self.spec(d)
        key = self.key(d, spec)
        if key == self.start_key:
            return key, self._load_start, int(self.info.get("memory_bytes") or 0)
        from ..models.meta import describe

        try:
            estimate = describe(spec).size_bytes
        except (PhikitError, OSError):
            estimate = 0
        import phikit

        opts = {**self.load_options, "adapter": d.adapter}
        if d.num_ctx:
            opts["n_ctx"] = d.num_ctx
        return key, lambda: self.batched(phikit.load(d.source, **opts)), estimate

    def _load_start(self):
        import phikit

        opts = dict(self._start_load)
        return self.batched(phikit.load(opts.pop("model", None), **opts))

    def batched(self, model):
        """`model` with its generations on an engine thread that batches them, when this server batches."""
        from ..engine.backend import LocalBackend

        be = model.backend
        if self.batching and isinstance(be, LocalBackend) and be.scheduler is None:
            st = be.enable_batching(self.config.parallel, self.config.kv_tokens, self.config.prompt_cache)
            print(f"phikit: {model.name}: {st['parallel']} request(s) generating together, KV cache of "
                  f"{st['kv_capacity_tokens'] if st['kv_capacity_tokens'] < 1 << 40 else 'unbounded'} tokens, prompt cache "
                  f"{'on' if self.config.prompt_cache else 'off'}", file=sys.stderr)
        return model

    def engine_stats(self) -> dict:
        """The loaded models' schedulers, summed: running, waiting, batch size, KV in use, cache hits."""
        out: dict[str, int] = {}
        for slot in self.pool.loaded():
            sch = getattr(slot.model.backend, "scheduler", None)
            if sch is not None:
                for k, v in sch.stats().items():
                    out[k] = out.get(k, 0) + v
        return out

    async def forget(self, name: str) -> None:
        """A deleted model's name leaves the loaded models (/api/ps names a slot by its last request's model):
        the start model's slot takes its own name back; another unloads, now if idle, else after its requests."""
        for slot in list(self.pool.slots.values()):
            if base_name(slot.name).lower() != base_name(name).lower():
                continue
            if slot.key == self.start_key:
                slot.name = self.name
            else:
                await self.pool.unload(slot.key)

    async def use(self, request: Request | None, name: str | None, keep_alive=None) -> Use:
        """The model a request names, loaded, held until the response ends (released by app.Guard; without
        a request the caller releases it). keep_alive: Ollama's, for after this request (None: the server's
        default); the start model's is forever. 404 for an unknown name; a failed load raises its PhikitError."""
        ka = parse_keep_alive(keep_alive) if keep_alive is not None else self.config.keep_alive
        d = await self.lookup(name)
        key, load, estimate = await asyncio.to_thread(self._plan, d)
        if key == self.start_key:
            ka = FOREVER  # the model the server was started for stays loaded
        slot = await self.pool.acquire(key, d.name, load, ka, estimate, request.is_disconnected if request is not None else None)
        u = Use(self.pool, slot, d)
        if request is not None:
            request.scope.setdefault("phikit.uses", []).append(u)
        return u

    async def unload(self, name: str | None) -> ModelDef:
        """Unload a named model now (Ollama's keep_alive 0 with nothing to generate); when busy, as its last request ends."""
        d = await self.lookup(name)
        key, _, _ = await asyncio.to_thread(self._plan, d)
        await self.pool.unload(key)
        return d

    def release(self, uses: list[Use]) -> None:
        for u in uses:
            u.release()

    def embed_names(self) -> list[str]:
        """The embedder's listed names: its own, the clients' defaults, the --embed-alias ones."""
        return list(dict.fromkeys([EMBED_NAME, *DEFAULT_EMBED_NAMES, *self.config.embed_aliases]))

    def check_embed_model(self, name: str | None) -> str:
        """The requested embedding model's name (Ollama's ':latest' tag dropped) if the embedder answers to it; 404 otherwise."""
        base = (name or "").removesuffix(":latest")
        if base in EMBED_ALIASES or base in self.embed_names():
            return base
        raise not_found_model(name or "", self.embed_names())

    # -- limits ------------------------------------------------------------
    def check_limit(self, value: int, limit: int, param: str, what: str) -> None:
        if value > limit:
            raise ApiError(400, f"{what} is {value}, over this server's limit of {limit}", param=param, code="limit_exceeded")

    def max_tokens(self, requested: int | None, param: str = "max_tokens", model=None, default: int | None = None) -> int:
        """max_tokens for `model` (default: the start model): the request's, checked; else `default` (a created
        model's num_predict, when positive), the limit and the model's context, whichever is least."""
        if requested is None:
            context = model.context_length if model is not None else int(self.info.get("context_length") or self.limits.max_tokens)
            most = min(self.limits.max_tokens, context)
            return min(most, default) if default is not None and default > 0 else most
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


__all__ = ["ServerState", "ServeConfig", "Limits", "Use", "ChunkStreamResponse", "ClientGone", "EMBED_NAME", "OPENAI_EMBED_NAMES"]
