"""Every error leaves the server as OpenAI's body, ``{"error": {message, type, param, code}}``, or on
Anthropic's routes (``/v1/messages...``) as Anthropic's, ``{"type": "error", "error": {type, message}}``.

Clients (the openai and anthropic SDKs, lm-eval, LangChain) parse those shapes; FastAPI's
``{"detail": ...}`` would surface as an opaque failure, so its handlers are replaced here, unknown
routes included.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.errors import ConfigError, EngineOverloadedError, InvalidRequestError, ModelNotFoundError
from pagoda.server.protocol import VALIDATOR_PARAMS

log = logging.getLogger("pagoda.server")

RETRY_AFTER_SECONDS = 1
ANTHROPIC_PREFIX = "/v1/messages"
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


class APIError(Exception):
    """An error with its HTTP status and OpenAI fields, raised anywhere in a handler."""

    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers


class PayloadTooLarge(Exception):
    """Raised while reading a body that outgrows the limit (a lying or absent Content-Length)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds the limit of {limit} bytes")
        self.limit = limit


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(
    status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
    code: str | None = None, headers: Mapping[str, str] | None = None, path: str = "",
) -> JSONResponse:
    """The error body of the API `path` belongs to (OpenAI's unless it is an Anthropic route)."""
    if path.startswith(ANTHROPIC_PREFIX):
        return JSONResponse(anthropic_error_body(status, message), status_code=status, headers=headers)
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def api_error_from(exc: Exception) -> APIError:
    """Map an engine or validation exception to its APIError; anything unknown is a 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, exc.message, param=exc.param, code="model_not_found")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, param=exc.param)
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), "service_unavailable_error", code="server_overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, ConfigError):  # e.g. a chat template that rejects these messages
        return APIError(400, str(exc), param="messages")
    if isinstance(exc, ValidationError):
        return validation_error(exc.errors(include_url=False))
    if isinstance(exc, PayloadTooLarge):
        return APIError(413, str(exc), code="request_too_large")
    log.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", "server_error", code="internal_error")


def validation_error(errors: Sequence[Any]) -> APIError:
    """The first pydantic error as a 400 naming its field, e.g. ``messages[0].role``."""
    if not errors:
        return APIError(400, "invalid request")
    err = errors[0]
    kind, msg = err.get("type", ""), str(err.get("msg", "invalid value"))
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {msg}", code="invalid_json")
    if kind in ("model_type", "model_attributes_type") and not err.get("loc"):
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    msg = msg.removeprefix("Value error, ")
    param = _param_from_loc(err.get("loc", ()))
    if param is None:
        param = next((p for prefix, p in VALIDATOR_PARAMS.items() if msg.startswith(prefix)), None)
    if kind == "missing":
        return APIError(400, f"missing required field '{param}'", param=param)
    if param is None:
        return APIError(400, msg)
    return APIError(400, f"invalid value for '{param}': {msg}", param=param)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _param_from_loc(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """("messages", 0, "role") -> "messages[0].role"; union branch names (e.g. "list[int]") are dropped."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            if not parts:
                break
            parts[-1] += f"[{item}]"
        elif item in ("body",) and not parts:
            continue
        elif not item.isidentifier() or item in _UNION_TAGS:  # a union branch, e.g. "str", "list[int]"
            break
        else:
            parts.append(item)
    return ".".join(parts) or None


def install_exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        e = validation_error(list(exc.errors()))
        return error_response(e.status, e.message, e.type, e.param, e.code, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 404:
            return error_response(404, f"no route {request.method} {path}", code="not_found", path=path)
        if exc.status_code == 405:
            return error_response(405, f"method {request.method} is not allowed on {path}",
                                  code="method_not_allowed", headers=exc.headers, path=path)
        kind = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind, headers=exc.headers, path=path)

    for cls in (InvalidRequestError, EngineOverloadedError, ConfigError, ValidationError, PayloadTooLarge):
        app.add_exception_handler(cls, _mapped)


async def _mapped(request: Request, exc: Exception) -> JSONResponse:
    e = api_error_from(exc)
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers, request.url.path)


class GuardMiddleware:
    """Outermost layer: refuses oversized bodies (413) and turns any escaped exception into a 500
    body, so one bad request never takes the server down or leaks a plain-text traceback."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app, self.limit = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        path = scope.get("path", "")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(413, str(PayloadTooLarge(self.limit)), code="request_too_large",
                                 path=path)(scope, receive, send)
            return
        seen, started = 0, False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLarge(self.limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception as exc:  # the last line of defence
            if started:
                log.error("error after the response started", exc_info=exc)
                return
            e = api_error_from(exc)
            await error_response(e.status, e.message, e.type, e.param, e.code, e.headers, path)(scope, receive, send)
