"""The FastAPI app: OpenAI (chat, completions, responses, embeddings) and Ollama routes over one model, plus /health,
/metrics and the /ui page.

    from phikit.serve import create_app, ServeConfig
    app = create_app(phikit.load(), ServeConfig(api_key="s3cret"))

`serve()` runs it with uvicorn. Requests share one generation slot
(`worker.py`): they queue and run one at a time, and a client that goes away
stops its generation. `/openapi.json` describes every route with the errors it
answers; like every route but /health it needs the API key when there is one.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from .. import __version__
from . import errors
from .errors import ApiError, error_response
from .state import ServeConfig, ServerState
from .worker import ClientGone

OPEN_PATHS = {"/health"}  # reachable without the API key
MAX_HEADER_BYTES = 16 * 1024  # the request line and all headers together; over it is a 431 (serve())


JSON_ROUTES = ("/v1/", "/api/")  # every body these take is JSON


def _json_body(scope: dict) -> dict:
    """`scope` with `Content-Type: application/json` where a JSON route's request says none, or another type.

    OpenAI and Ollama read such a body as JSON; FastAPI parses only a body marked JSON. Ollama's own
    curl examples (`curl -d`: a form type) and litellm's ollama providers (none) send it unmarked."""
    if scope["method"] not in ("POST", "PUT", "PATCH", "DELETE") or not scope["path"].startswith(JSON_ROUTES):
        return scope
    kept = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    given = [v for k, v in scope["headers"] if k == b"content-type"]
    if given and given[0].split(b";")[0].strip().lower() == b"application/json":
        return scope
    return {**scope, "headers": [*kept, (b"content-type", b"application/json")]}


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

        uses = scope["phikit.uses"] = []  # the models this request holds (ServerState.use), released once it has ended
        try:
            err = self._check(request)
            if err is not None:
                return await error_response(request, err)(scope, receive, counted_send)
            await self.app(_json_body(scope), self._limited(receive), counted_send)
        finally:
            self.state.release(uses)
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
    from . import ollama_routes, openai_routes, rag_routes, responses_routes

    config = config or ServeConfig()
    state = ServerState(model, config)
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.pool.shutdown()
        state.worker.shutdown()
        if state.rag_pool is not None:
            state.rag_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="phikit", version=__version__, docs_url=None, redoc_url=None, openapi_url="/openapi.json", lifespan=lifespan)
    app.openapi = partial(_openapi, app, bool(config.api_key))
    app.state.phikit = state
    errors.install(app)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nobody reads it: the client left while queued

    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(ollama_routes.router)
    app.include_router(rag_routes.router)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.name, "queue": state.worker.waiting, "active": state.worker.active,
                **state.engine_stats(), "parallel": state.worker.slots}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        text = state.metrics.render(state.worker.waiting, state.worker.active, state.pool, state.engine_stats())
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


def _openapi(app: FastAPI, keyed: bool) -> dict:
    """FastAPI's document with the errors the app really answers: its 400s instead of FastAPI's 422,
    and, with an API key, the bearer scheme and the 401 on every route but /health."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from .schemas import error_responses

        doc = get_openapi(title=app.title, version=app.version, routes=app.routes,
                          description="OpenAI- (/v1) and Ollama-compatible (/api) routes over one model")
        components = doc.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):  # the 422 body, never sent here
            components.get("schemas", {}).pop(name, None)
        if keyed:
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, ops in doc["paths"].items():
            for op in ops.values():
                op["responses"].pop("422", None)
                if keyed and path not in OPEN_PATHS:
                    op["security"] = [{"bearer": []}]
                    ref = {"$ref": "#/components/schemas/" + ("OpenAIError" if path.startswith("/v1") else "OllamaError")}
                    op["responses"]["401"] = {"description": error_responses(401)[401]["description"],
                                              "content": {"application/json": {"schema": ref}}}
        app.openapi_schema = doc
    return app.openapi_schema


def http_protocol():
    """uvicorn's h11 protocol, answering a request head over MAX_HEADER_BYTES with 431 rather than with
    a 400 and, as the client is still sending, often a connection reset instead of any answer.

    Always h11: uvicorn's other parser, httptools, puts no bound on the size of the headers."""
    import sys

    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _rejected = False

        def data_received(self, data: bytes) -> None:
            if not self._rejected:  # after a 431 the rest of the head is read and dropped
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            # uvicorn calls this inside its `except h11.RemoteProtocolError`; h11 hints 431 for a head too long.
            if getattr(sys.exc_info()[1], "error_status_hint", None) != 431:
                return super().send_400_response(msg)
            body = (f"the request line and headers are over this server's limit of {MAX_HEADER_BYTES} bytes: "
                    "send smaller headers\n").encode()
            head = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]
            for event in (h11.Response(status_code=431, headers=head, reason=b"Request Header Fields Too Large"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self._rejected = True
            # Closing with the client's bytes unread makes the kernel send a reset, which can destroy
            # the answer before the client reads it: end our side, keep draining, close a little later.
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(2.0, self.transport.close)

    return Protocol


def serve(model, config: ServeConfig, host: str = "127.0.0.1", port: int = 11434, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    app = create_app(model, config)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                http=http_protocol(), h11_max_incomplete_event_size=MAX_HEADER_BYTES)
