"""The one error shape every failure takes: ``{"error": {"code", "message"}}`` with its status;
under ``/v2`` (the Open Inference Protocol) the protocol's ``{"error": "<message>"}``.

Handlers are installed for our own errors, FastAPI's validation errors, Starlette's HTTP errors
(404, 405) and anything unexpected (500, logged here, never shown to the client).
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from transfiner.model.inference.images import without_object_reprs
from transfiner.service.schemas import ErrorResponse

log = logging.getLogger("service")

# What any route can answer, whatever it does (for /openapi.json; ``FastAPI(responses=...)``):
# the HTTP layer's and the body limit's refusals, and the catch-all 500.
COMMON_ERRORS: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed HTTP (request line, headers, Content-Length or chunked framing); the connection closes",
        408: "the request head did not arrive within head_timeout_s; the connection closes",
        413: "body over max_body_bytes",
        431: "request line and headers over 64 KiB; the connection closes",
        500: "unexpected error (logged on the server); the connection closes",
    }.items()
}


class ServiceError(Exception):
    """A request that cannot be served; ``reason`` (if any) labels the rejection metric."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        reason: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.reason = reason
        self.retry_after = retry_after
        self.extra_headers = headers or {}

    def headers(self) -> dict[str, str]:
        headers = dict(self.extra_headers)
        if self.retry_after is not None:
            # Retry-After takes whole seconds; never 0, which clients read as "hammer now".
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return headers


def bad_request(message: str) -> ServiceError:
    return ServiceError(400, "bad_request", message)


def invalid_parameter(message: str) -> ServiceError:
    return ServiceError(422, "invalid_parameter", message)


# Messages quote what was sent (unknown parameters and classes, parser errors): a hostile request
# must not turn a 4xx into megabytes of echo.
MAX_MESSAGE_CHARS = 2000


# The Open Inference Protocol's routes, whose errors take its shape; it has no 415 or 422: every
# refusal of the input is a 400 there.
PROTOCOL_PREFIX = "/v2"
PROTOCOL_STATUS = {415: 400, 422: 400}


def is_protocol_path(path: str) -> bool:
    return path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")


def _bounded(message: str) -> str:
    message = without_object_reprs(message, "(the upload)")  # Pillow's file object, in its messages
    if len(message) > MAX_MESSAGE_CHARS:
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message) - MAX_MESSAGE_CHARS} more characters)"
    return message


def error_body(code: str, message: str) -> bytes:
    """The JSON of every error answer, ``{"error": {"code", "message"}}``, encoded as JSONResponse
    encodes: also for the answers written before or outside the app (middleware, the protocol)."""
    return JSONResponse({"error": {"code": code, "message": _bounded(message)}}).body


def protocol_error_body(message: str) -> bytes:
    """The Open Inference Protocol's error JSON, ``{"error": "<message>"}``."""
    return JSONResponse({"error": _bounded(message)}).body


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, path: str = ""
) -> Response:
    """The error answer in the shape of the route at ``path``."""
    if is_protocol_path(path):
        status, body = PROTOCOL_STATUS.get(status, status), protocol_error_body(message)
    else:
        body = error_body(code, message)
    return Response(body, status_code=status, headers=headers, media_type="application/json")


def _format_validation(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query"))
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Routes every failure, expected or not, to the JSON error shape."""

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        metrics = getattr(request.app.state, "metrics", None)
        if error.reason and metrics is not None:
            metrics.rejections.labels(reason=error.reason).inc()
        return error_response(error.status, error.code, error.message, error.headers(), request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_parameter", _format_validation(error), path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), dict(error.headers or {}), request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # Starlette re-raises after this answer and the server then drops the connection: say so,
        # or a keep-alive client sends its next request into a closed socket.
        return error_response(
            500,
            "internal_error",
            "internal server error (logged on the server)",
            {"Connection": "close"},
            request.url.path,
        )
