"""The uvicorn server: its limits from the settings, a timeout on incomplete request heads, and a
first SIGTERM/SIGINT that drains the service before the port closes."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from transfiner.service.engine.runtime import ServiceRuntime
from transfiner.service.errors import error_body
from transfiner.service.grpc.server import GrpcServer
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.logs import uvicorn_log_config


def _error_response(status_line: str, code: str, message: str) -> bytes:
    """A complete JSON error response (``error_body``, as every error answer) written straight to
    the transport, before or outside the app; then the connection closes."""
    body = error_body(code, message)
    return (
        f"HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


# What Kubernetes and Docker probe: answered whatever the number of open connections.
PROBES = frozenset({"/health/live", "/health/ready"})


def _timeout_response() -> bytes:
    return _error_response("408 Request Timeout", "request_timeout", "the request head was not received in time")


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    """What a request gets beyond ``max_connections`` (uvicorn's ``limit_concurrency``): the
    service's JSON 503 with Retry-After, instead of uvicorn's plain-text one."""
    body = error_body(
        "too_many_connections",
        "the server is serving as many connections and requests as it allows (max_connections); retry later",
    )
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"1"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


# Request line plus headers; nginx's default (large_client_header_buffers) is 4 x 8 KiB per line.
MAX_HEAD_BYTES = 64 * 1024


class HeadTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol (httptools, a dependency), plus a deadline for each request's line
    and headers, and the service's JSON error shape where uvicorn answers by itself.

    uvicorn only times out idle keep-alive connections: a client that opens a connection and
    sends nothing, or half a request head, holds it (and a file descriptor) for ever. Here the
    head must be complete ``head_timeout_s`` after the connection opens or the request's first
    byte arrives, else the connection gets a 408 and is closed, as nginx's client_header_timeout.
    """

    head_timeout_s = 10.0  # set per server by ``uvicorn_config``
    max_head_bytes = MAX_HEAD_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        # Bytes received while a request head is incomplete: httptools buffers header lines
        # without limit, so a flood of headers (or one endless line) would grow memory until the
        # head timeout; past ``max_head_bytes`` the client gets 431 and the connection closes.
        self._in_head = self._head_unfinished = True
        self._head_bytes = 0
        self._bad_request_pending = False
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        # Counted only when no head ended in this data: a whole small request arriving in one
        # piece is never mistaken for a long head (a head begun in such a piece is undercounted
        # by less than that piece).
        self._head_unfinished = self._in_head
        super().data_received(data)
        if self._head_unfinished and self._in_head and not self._bad_request_pending:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
                self._disarm_head_timer()
                self.transport.write(
                    _error_response(
                        "431 Request Header Fields Too Large",
                        "headers_too_large",
                        f"the request line and headers exceed {self.max_head_bytes} bytes",
                    )
                )
                self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """What httptools cannot parse (bad request line, header, Content-Length or chunk framing):
        uvicorn's own answer is plain text; this is the service's JSON error shape.

        When the bad bytes follow complete requests on the same connection (pipelining) whose
        answers are still being made, uvicorn would close the connection under them; here they
        are answered first and the 400 comes after them (``on_response_complete``)."""
        self._disarm_head_timer()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete and not cycle.more_body:
            self._bad_request_pending = True
            self.flow.pause_reading()
            return
        self._send_bad_request()

    def _send_bad_request(self) -> None:
        self._bad_request_pending = False
        if self.transport.is_closing():
            return
        self.transport.write(
            _error_response(
                "400 Bad Request",
                "bad_request",
                "invalid HTTP request: malformed request line, header, Content-Length or chunked framing",
            )
        )
        self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._bad_request_pending and not self.pipeline and self.cycle.response_complete:
            self._send_bad_request()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_timer()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        # uvicorn picks its plain-text 503 app for a request beyond limit_concurrency; every
        # request (pipelined ones too) starts here. The probes still get the truth: a replica
        # that is merely busy is alive, and answering 503 there would have Kubernetes restart
        # healthy pods whenever connections pile up (a flood of slow clients, an overload).
        if app is service_unavailable:
            app = self.app if cycle.scope["path"] in PROBES else _too_many_connections
        super()._start_asgi_task(cycle, app)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._in_head = self._head_unfinished = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what follows on this connection is the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(_timeout_response())
            self.transport.close()


# How long uvicorn waits for open requests once the service's own drain is over (its
# ``timeout_graceful_shutdown``): by then in-flight work is done or has had ``drain_timeout_s``, so
# this only lets answers being written go out. A stopping replica takes at most the drain plus this.
AFTER_DRAIN_S = 5.0


def uvicorn_config(app: Any, settings: ServiceSettings, **overrides: Any) -> uvicorn.Config:
    """The server for ``app`` with the settings' connection limits and timeouts."""
    protocol = type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": settings.head_timeout_s})
    options: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        http=protocol,
        timeout_graceful_shutdown=AFTER_DRAIN_S,
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        # No route takes a WebSocket: an Upgrade request is plain HTTP (uvicorn's WebSocket
        # protocol would answer a bad handshake itself, in plain text).
        ws="none",
    )
    log_config = uvicorn_log_config(settings.log_format)
    if log_config is not None:  # else uvicorn's own (text)
        options["log_config"] = log_config
    options.update(overrides)
    return uvicorn.Config(app, **options)


log = logging.getLogger("service")


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """``host:port`` bound as uvicorn would bind it (asyncio's ``create_server``: every address
    the host resolves to, IPv6 ones IPv6-only), but now, before the model loads, so that a port in
    use fails at once; raises ValueError with the reason."""
    sockets: list[socket.socket] = []
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.set_inheritable(True)
    except OSError as error:
        for sock in sockets:
            sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sockets


class ServiceServer(uvicorn.Server):
    """uvicorn, and beside it in the same event loop the gRPC server of the same runtime
    (``grpc_port``; 0: none): bound before the models load, so a port in use fails at once, and
    stopped after the drain, before the lifespan unloads the models."""

    def __init__(self, config: uvicorn.Config, runtime: ServiceRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.grpc: GrpcServer | None = None
        self.grpc_port: int | None = None  # where gRPC listens, once it does
        self.failure: str | None = None  # why the server could not start or the model not load
        self.loop: asyncio.AbstractEventLoop | None = None  # the one HTTP and gRPC are served in

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        settings = self.runtime.settings
        if settings.grpc_port:
            try:
                # Bound here first for the operating system's reason (gRPC's own error says none).
                for sock in listening_sockets(settings.host, settings.grpc_port):
                    sock.close()
                self.grpc = GrpcServer(self.runtime)
                self.grpc_port = await self.grpc.start()
            except ValueError as error:
                self.failure = f"gRPC: {error}"
                log.error("exiting: %s", self.failure)
                self.should_exit = True
                return
        await super().startup(sockets)
        if self.should_exit and self.grpc is not None:  # the lifespan failed: no shutdown follows
            await self.grpc.stop(0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is not None:
            await self.grpc.stop(AFTER_DRAIN_S)
        await super().shutdown(sockets)


class DrainingServer(ServiceServer):
    """Plain uvicorn stops accepting connections at once on SIGTERM, so readiness can never be
    seen turning 503; here the first signal starts ``runtime.begin_drain()`` and the server exits
    when it is done. A second signal falls through to uvicorn (Ctrl-C twice forces the exit).
    gRPC drains with HTTP: its health turns NOT_SERVING and new calls get UNAVAILABLE."""

    def __init__(self, config: uvicorn.Config, runtime: ServiceRuntime) -> None:
        super().__init__(config, runtime)
        self._draining = False
        self._watch: asyncio.Task | None = None  # keeps the load watch referenced while it runs

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)  # the lifespan has begun loading the model
        for sock in sockets or ():  # uvicorn says where it listens only for sockets it bound itself
            host, port = sock.getsockname()[:2]
            log.info("listening on http://%s:%d", f"[{host}]" if ":" in host else host, port)
        if not self.should_exit:
            self._watch = asyncio.create_task(self._exit_if_the_model_fails(), name="transfiner-load-watch")

    async def _exit_if_the_model_fails(self) -> None:
        """Readiness alone would leave a server that can never answer alive (and its liveness
        probe passing) for good; it exits instead, its readiness saying why until then."""
        await self.runtime.start()  # the lifespan's task: done once the model is loaded or has failed
        if self.runtime.state == "failed":
            self.failure = self.runtime.detail
            log.error("exiting: %s", self.failure)
            self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining and self.loop is not None:
            self.loop.call_soon_threadsafe(self.runtime.skip_drain)
        if self._draining or self.loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        # Signal handlers run between bytecodes of the loop's own thread: hand over via the loop.
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        log.info("signal received: draining before shutdown")
        task = self.runtime.begin_drain()
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))
