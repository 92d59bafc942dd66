"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer bodies and break disconnect
detection): request metrics, the request body limit, and HEAD answered as GET."""

from __future__ import annotations

import time

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transfiner.service.errors import ServiceError, error_body, is_protocol_path, protocol_error_body
from transfiner.service.metrics import ServiceMetrics


class MetricsMiddleware:
    """Counts every HTTP request by route template, method and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, known_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.metrics = metrics
        # For requests answered before routing (the body limit's early 413): the route templates,
        # matched as the router would match them.
        self.known_paths = [(compile_path(path)[0], path) for path in sorted(known_paths)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before responding, the error middleware answers 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            # The router stores the matched route in the scope; raw paths would explode label counts.
            route = getattr(scope.get("route"), "path", None)
            if route is None:
                path = scope["path"]
                route = next((template for regex, template in self.known_paths if regex.match(path)), "unmatched")
            self.metrics.requests.labels(route=route, method=scope["method"], status=str(status)).inc()
            self.metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)


class HeadAsGetMiddleware:
    """Answers HEAD as GET, headers only: RFC 9110 asks every general-purpose server to support
    HEAD wherever it supports GET, and probes and uptime checkers use it. The route runs for a
    GET; the server leaves the body out, as it knows the request was a HEAD (uvicorn's protocols
    decide that from their own scope, not this copy)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, send)
        finally:
            if "route" in as_get:  # for the metrics around this middleware (they count it as HEAD)
                scope["route"] = as_get["route"]


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``, and 503 ``memory_budget`` once the body bytes held by
    all requests in progress would pass ``max_total_bytes``: at once when a declared
    Content-Length would not fit beside what is held now, or as the bytes arrive (by raising
    ``ServiceError`` from ``receive`` inside the route). Bytes count as they arrive, not as they
    are declared, so connections that send headers and stall hold nothing; they count until the
    request ends."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        metrics: ServiceMetrics,
        max_total_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_total_bytes = max_total_bytes
        self.metrics = metrics
        self.held = 0  # bytes of the bodies of the requests in progress (one event loop: no lock)

    def _over_budget(self, more: int) -> bool:
        return self.max_total_bytes is not None and self.held + more > self.max_total_bytes

    def _budget_message(self) -> str:
        return (
            f"the request bodies in progress hold {self.held} bytes; this one would pass the limit of "
            f"{self.max_total_bytes} (max_body_bytes_total)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, scope, 400, "bad_request", "invalid Content-Length header")
                    return
        if declared is not None and declared > self.max_bytes:
            self.metrics.rejections.labels(reason="too_large").inc()
            await _send_error(
                send,
                scope,
                413,
                "body_too_large",
                f"request body of {declared} bytes exceeds the limit of {self.max_bytes}",
            )
            return

        if declared and self._over_budget(declared):
            self.metrics.rejections.labels(reason="memory_budget").inc()
            await _send_error(send, scope, 503, "memory_budget", self._budget_message(), retry_after=1)
            return

        received = 0  # of this body, counted in self.held until the request ends

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                size = len(message.get("body", b""))
                if received + size > self.max_bytes:
                    raise ServiceError(
                        413,
                        "body_too_large",
                        f"request body exceeds the limit of {self.max_bytes} bytes",
                        reason="too_large",
                    )
                if self._over_budget(size):
                    raise ServiceError(
                        503, "memory_budget", self._budget_message(), reason="memory_budget", retry_after=1
                    )
                received += size
                self.held += size
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            self.held -= received


async def _send_error(
    send: Send, scope: Scope, status: int, code: str, message: str, retry_after: int | None = None
) -> None:
    body = protocol_error_body(message) if is_protocol_path(scope["path"]) else error_body(code, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
