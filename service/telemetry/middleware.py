"""Per HTTP request: its id, its server span and its log line (pure ASGI, outermost).

- ``X-Request-Id``: the client's when sane (up to 128 of ``A-Z a-z 0-9 - _ . : / + = @``), else a
  new one; returned on every answer.
- The server span (``Tracing.server_span``), named by the route template once routing is done,
  a child of the request's W3C ``traceparent``; its trace id answers as ``X-Trace-Id``. Not for
  ``untraced`` paths (probes and scrapes, every few seconds: traces of nothing).
- The request log line (``service.request``, when ``log_requests``): the ids, route, status,
  client and times, with the model and the stage times that the route notes in ``RequestFacts``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transfiner.service.telemetry.logs import FIELDS
from transfiner.service.telemetry.tracing import NO_TRACING, Tracing, trace_id_hex

log = logging.getLogger("service.request")

# Where the request's facts wait in the ASGI scope for the route (and the 500 handler) to read.
SCOPE_KEY = "transfiner.request"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9\-_.:/+=@]{1,128}")


@dataclass
class RequestFacts:
    """What the log line and the answer's headers say about one request; routes fill in the model
    and the stage times (``note``)."""

    request_id: str
    trace_id: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)

    def note(self, **fields: Any) -> None:
        """Adds fields to the request's log line (model, version, queue_ms, inference_ms...)."""
        self.fields.update(fields)

    def headers(self) -> dict[str, str]:
        """``X-Request-Id`` and, when traced, ``X-Trace-Id``."""
        found = {"X-Request-Id": self.request_id}
        if self.trace_id is not None:
            found["X-Trace-Id"] = self.trace_id
        return found


def request_facts(scope: Scope) -> RequestFacts | None:
    """The request's ``RequestFacts`` (None outside ``RequestTelemetryMiddleware``)."""
    return scope.get(SCOPE_KEY)


def request_id_from(value: str | None) -> str:
    return value if value is not None and _SANE_REQUEST_ID.fullmatch(value) else uuid.uuid4().hex


class RequestTelemetryMiddleware:
    def __init__(
        self, app: ASGIApp, tracing: Tracing, log_requests: bool = False, untraced: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.tracing = tracing
        self.log_requests = log_requests
        self.untraced = untraced

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        raw = scope.get("headers", ())
        given = next((value.decode("latin-1") for name, value in raw if name == b"x-request-id"), None)
        facts = RequestFacts(request_id_from(given))
        scope[SCOPE_KEY] = facts
        status = 500  # unless an answer starts: the error middleware outside answers 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(name.lower().encode(), value.encode()) for name, value in facts.headers().items()]
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        method = scope["method"]
        tracing = NO_TRACING if scope["path"] in self.untraced else self.tracing
        headers: dict[str, str] = {}
        if tracing.enabled:  # else nothing reads them
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}
        attributes = _request_attributes(scope, headers) if tracing.enabled else None
        with tracing.server_span(method, headers, attributes) as span:
            facts.trace_id = trace_id_hex(span)
            try:
                await self.app(scope, receive, send_with_headers)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if span.is_recording():
                    _finish_span(span, method, route, status)
                if self.log_requests:
                    self._log(scope, facts, route, status, started)

    def _log(self, scope: Scope, facts: RequestFacts, route: str | None, status: int, started: float) -> None:
        client = scope.get("client")
        fields = {
            "request_id": facts.request_id,
            "trace_id": facts.trace_id,
            "method": scope["method"],
            "route": route,
            "path": scope["path"],
            "status": status,
            "client": client[0] if client else None,
            **facts.fields,
            "total_ms": round((time.monotonic() - started) * 1000, 3),
        }
        log.info("%s %s %d", scope["method"], scope["path"], status, extra={FIELDS: fields})


def _request_attributes(scope: Scope, headers: dict[str, str]) -> dict[str, Any]:
    """The server span's HTTP attributes (OpenTelemetry semantic conventions)."""
    attributes: dict[str, Any] = {
        "http.request.method": scope["method"],
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    server, client = scope.get("server"), scope.get("client")
    if server:
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    if client:
        attributes["client.address"], attributes["client.port"] = client[0], client[1]
    if "user-agent" in headers:
        attributes["user_agent.original"] = headers["user-agent"]
    return attributes


def _finish_span(span, method: str, route: str | None, status: int) -> None:
    if route is not None:
        span.update_name(f"{method} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:  # a server span's 4xx is the client's error, not the server's
        span.set_status(Status(StatusCode.ERROR))
