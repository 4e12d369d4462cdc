"""HTTP errors in the two shapes clients expect.

`/v1/...` answers OpenAI's `{"error": {"message", "type", "param", "code"}}`;
everything else answers Ollama's `{"error": "..."}`. A PhikitError keeps its
own `.status`; request validation failures (malformed JSON, wrong types) are
400s; nothing a client sends may become a 500. A 500 (a bug) is logged with a
reference and answered with that reference only: exception text can carry
paths, prompts or library internals that are not the client's to read.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PhikitError

log = logging.getLogger("phikit.serve")
TOO_DEEP = "the request nests too deeply to process (a JSON schema or value hundreds of levels deep): flatten it"


class ApiError(StarletteHTTPException):
    """An error answered to the client as-is: status, message and the OpenAI fields.

    An HTTPException so that FastAPI passes it through unchanged when it is raised
    while the body is read (the body-size limit does that)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def not_found_model(name: str, served: list[str]) -> ApiError:
    return ApiError(
        404, f"the model {name!r} does not exist here; this server serves: {', '.join(served)}",
        param="model", code="model_not_found",
    )


def internal_error(exc: BaseException, request: Request | None = None) -> ApiError:
    """A 500 for an unexpected exception: the traceback goes to the log under a reference, the client gets the reference."""
    ref = uuid.uuid4().hex[:12]
    where = f" on {request.method} {request.url.path}" if request is not None else ""
    log.error("internal error %s%s", ref, where, exc_info=exc)
    return ApiError(500, f"internal server error (reference {ref}): this is a bug in phikit, not in the request; "
                         "the server's log holds the details under that reference", type="server_error", code="internal_error")


def error_response(request: Request, err: ApiError) -> JSONResponse:
    # A message quoting the request could carry a lone surrogate, which UTF-8 cannot encode.
    message = err.message.encode("utf-8", "backslashreplace").decode("utf-8")
    if request.url.path.startswith("/v1"):
        body = {"error": {"message": message, "type": err.type, "param": err.param, "code": err.code}}
    else:
        body = {"error": message}
    headers = dict(err.headers or {})  # e.g. Allow on a 405
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(body, status_code=err.status, headers=headers or None)


def _required_fields(request: Request) -> list[str]:
    """The required top-level fields of the route's body model, to name them when the body is empty."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    return [n for n, f in getattr(model, "model_fields", {}).items() if f.is_required()]


def _validation_message(exc: RequestValidationError, required: list[str] = ()) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "the request body is not valid", None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(e.get("ctx", {}).get("error", e.get("msg"))), None
    loc = [str(x) for x in e.get("loc", ())]
    loc = loc[1:] if loc[:1] == ["body"] else loc
    if not loc:  # the body as a whole: absent, or not a JSON object (app._json_body has every body read as JSON)
        fields = " and ".join(f"'{f}'" for f in required)
        todo = "send a JSON object" + (f" with {fields}" if fields else "")
        if e.get("type") == "missing":
            return f"the request body is empty: {todo}", (required or [None])[0]
        return f"the request body is not a JSON object: {todo}", None
    missing = [".".join(str(x) for x in m["loc"][1:]) for m in errs if m.get("type") == "missing" and len(m["loc"]) > 1]
    if e.get("type") == "missing" and missing:
        names = ", ".join(f"'{m}'" for m in missing)
        return f"missing field{'s' if len(missing) > 1 else ''} {names}: add {'them' if len(missing) > 1 else 'it'} to the request body", missing[0]
    param = (e.get("ctx") or {}).get("where") or ".".join(loc)
    return f"'{param}': {e.get('msg', 'invalid value')}", param


def install(app) -> None:
    """Register the handlers that turn every failure into the right error body."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(request, exc)

    @app.exception_handler(PhikitError)
    async def _phikit(request: Request, exc: PhikitError):
        status = exc.status if 400 <= exc.status < 600 else 400
        kind = "invalid_request_error" if status < 500 else "server_error"
        return error_response(request, ApiError(status, str(exc), kind))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc, _required_fields(request))
        return error_response(request, ApiError(400, msg, param=param))

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError):
        # Only request content nests deep enough for this (a JSON schema, tool parameters): the
        # converters walking it recurse once or more per level, so it is the request's to flatten.
        return error_response(request, ApiError(400, TOO_DEEP, code="too_deep"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's "error parsing the body": JSON nested past Python's limit
            return error_response(request, ApiError(400, TOO_DEEP, code="too_deep"))
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "")
            msg = f"{request.method} is not allowed on {request.url.path}" + (f": use {allow}" if allow else "")
            return error_response(request, ApiError(405, msg, headers=exc.headers))
        if exc.status_code == 404:
            msg = f"no route {request.url.path}: /openapi.json lists the routes"
            return error_response(request, ApiError(404, msg, "not_found_error", headers=exc.headers))
        return error_response(request, ApiError(exc.status_code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(request, internal_error(exc, request))
