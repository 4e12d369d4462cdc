"""The FastAPI app: OpenAI and Ollama routes over one model, plus /health, /metrics and the /ui page.

    from phikit.serve import create_app, ServeConfig
    app = create_app(phikit.load(), ServeConfig(api_key="s3cret"))

`serve()` runs it with uvicorn. Requests share one generation slot
(`worker.py`): they queue and run one at a time, and a client that goes away
stops its generation.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from .. import __version__
from . import errors
from .errors import ApiError, error_response
from .state import ServeConfig, ServerState
from .worker import ClientGone

log = logging.getLogger("phikit.serve")
OPEN_PATHS = {"/health"}  # reachable without the API key


class Guard:
    """ASGI middleware: the API key, the body-size limit and the request counter, before any route runs."""

    def __init__(self, app, state: ServerState, known_paths: set[str]):
        self.app, self.state, self.known = app, state, known_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        path = scope["path"]
        status = {"code": 500}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            err = self._check(request)
            if err is not None:
                return await error_response(request, err)(scope, receive, counted_send)
            await self.app(scope, self._limited(receive), counted_send)
        finally:
            self.state.metrics.request(path if path in self.known else "other", status["code"])

    def _check(self, request: Request) -> ApiError | None:
        key = self.state.config.api_key
        if key and request.url.path not in OPEN_PATHS and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                type="authentication_error", code="invalid_api_key")
        size = request.headers.get("content-length")
        limit = self.state.limits.max_body_bytes
        if size and size.isdigit() and int(size) > limit:
            return self._too_big(limit)
        return None

    def _too_big(self, limit: int) -> ApiError:
        return ApiError(400, f"the request body is over this server's limit of {limit} bytes", code="limit_exceeded")

    def _limited(self, receive):
        # A chunked body has no Content-Length: count what arrives instead.
        seen = {"n": 0}
        limit = self.state.limits.max_body_bytes

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen["n"] += len(message.get("body", b""))
                if seen["n"] > limit:
                    raise self._too_big(limit)
            return message

        return wrapped


def create_app(model, config: ServeConfig | None = None) -> FastAPI:
    """An ASGI app serving `model` (a phikit Model) with `config` (API key, CORS, limits)."""
    from . import ollama_routes, openai_routes, rag_routes

    config = config or ServeConfig()
    state = ServerState(model, config)
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.worker.shutdown()
        if state.rag_pool is not None:
            state.rag_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="phikit", version=__version__, docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.phikit = state
    errors.install(app)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: the client left while queued

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request, ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    app.include_router(openai_routes.router)
    app.include_router(ollama_routes.router)
    app.include_router(rag_routes.router)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.name, "queue": state.worker.waiting, "active": state.worker.active}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        text = state.metrics.render(state.worker.waiting, state.worker.active)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/info")
    async def info():
        return JSONResponse({**state.info, "served_names": state.chat_names(), "version": __version__, "rag": state.rag is not None})

    @app.get("/ui", response_class=HTMLResponse)
    async def ui():
        return HTMLResponse(resources.files("phikit.serve").joinpath("ui.html").read_text(encoding="utf-8"))

    routes = [*app.routes, *openai_routes.router.routes, *ollama_routes.router.routes, *rag_routes.router.routes]
    known = {p for p in (getattr(r, "path", None) for r in routes) if p}
    app.add_middleware(Guard, state=state, known_paths=known)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Outermost, so a browser's preflight is answered before the key is asked for.
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"], allow_headers=["*"])
    return app


def serve(model, config: ServeConfig, host: str = "127.0.0.1", port: int = 11434, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    app = create_app(model, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
