"""HTTP errors in the two shapes clients expect.

`/v1/...` answers OpenAI's `{"error": {"message", "type", "param", "code"}}`;
everything else answers Ollama's `{"error": "..."}`. A PhikitError keeps its
own `.status`; request validation failures (malformed JSON, wrong types) are
400s; nothing a client sends may become a 500.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PhikitError


class ApiError(StarletteHTTPException):
    """An error answered to the client as-is: status, message and the OpenAI fields.

    An HTTPException so that FastAPI passes it through unchanged when it is raised
    while the body is read (the body-size limit does that)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None):
        super().__init__(status, message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def not_found_model(name: str, served: list[str]) -> ApiError:
    return ApiError(
        404, f"the model {name!r} does not exist here; this server serves: {', '.join(served)}",
        param="model", code="model_not_found",
    )


def error_response(request: Request, err: ApiError) -> JSONResponse:
    if request.url.path.startswith("/v1"):
        body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    else:
        body = {"error": err.message}
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "the request body is not valid", None
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON: " + str(e.get("ctx", {}).get("error", e.get("msg"))), None
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    return f"{where}{e.get('msg', 'invalid value')}", param


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
        msg, param = _validation_message(exc)
        return error_response(request, ApiError(400, msg, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(request, ApiError(exc.status_code, str(exc.detail), kind))
