"""A uvicorn server whose first SIGTERM/SIGINT drains the service before the port closes."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from .runtime import ServiceRuntime

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """Plain uvicorn stops accepting connections at once on SIGTERM, so readiness can never be
    seen turning 503; here the first signal starts ``runtime.begin_drain()`` and the server exits
    when it is done. A second signal falls through to uvicorn (Ctrl-C twice forces the exit)."""

    def __init__(self, config: uvicorn.Config, runtime: ServiceRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining and self._loop is not None:
            self._loop.call_soon_threadsafe(self.runtime.skip_drain)
        if self._draining or self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        # Signal handlers run between bytecodes of the loop's own thread: hand over via the loop.
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        log.info("signal received: draining before shutdown")
        task = self.runtime.begin_drain()
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))
