"""Who may take a place in the service now: a bounded number of segment requests in flight, at
most ``max_client_inflight`` of them per client, and none whose deadline the work queued ahead of
it would already miss. Refusals are ``ServiceError`` 429/503 with ``Retry-After``.

Plain asyncio, no HTTP: ``ServiceRuntime.admission`` checks readiness and calls ``slot``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator

from transfiner.service.errors import ServiceError
from transfiner.service.metrics import ServiceMetrics


class Admission:
    def __init__(self, max_client_inflight: int, metrics: ServiceMetrics) -> None:
        self.max_client_inflight = max_client_inflight  # 0: no per-client limit
        self.metrics = metrics
        self._inflight = 0
        self._per_client: Counter[str] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def wait_idle(self, timeout: float) -> bool:
        """True once no request is in flight, False if ``timeout`` seconds pass first."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        return self._idle.is_set()

    @contextlib.asynccontextmanager
    async def slot(
        self,
        client: str,
        capacity: int,
        deadline: float | None,
        wait_s: float | None,
        retry_after: float,
    ) -> AsyncIterator[None]:
        """Holds one of ``capacity`` places for the request of ``client``, or refuses it: the
        client's limit reached (429), no place left (503 ``queue_full``), or the work ahead
        (``wait_s`` seconds, None when unknown) taking it past ``deadline`` (time.monotonic()
        seconds; 503 ``overloaded``: refused now rather than computed for a client that has
        given up by then)."""
        limit = self.max_client_inflight
        if limit and self._per_client[client] >= limit:
            raise ServiceError(
                429,
                "too_many_requests",
                f"at most {limit} requests in flight per client",
                reason="client_limit",
                retry_after=retry_after,
            )
        if self._inflight >= capacity:
            raise ServiceError(
                503,
                "queue_full",
                f"the queue is full ({self._inflight} requests in flight)",
                reason="queue_full",
                retry_after=retry_after,
            )
        left_s = None if deadline is None else deadline - time.monotonic()
        if left_s is not None and wait_s is not None and wait_s > left_s:
            raise ServiceError(
                503,
                "overloaded",
                f"an answer takes about {wait_s:.3f} s now (this request's batch and the work "
                f"queued ahead of it), past this request's deadline in {max(left_s, 0.0):.3f} s",
                reason="deadline_unmeetable",
                retry_after=wait_s,
            )
        self._inflight += 1
        self._per_client[client] += 1
        self._idle.clear()
        self.metrics.inflight.set(self._inflight)
        try:
            yield
        finally:
            self._inflight -= 1
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]
            self.metrics.inflight.set(self._inflight)
            if not self._inflight:
                self._idle.set()
