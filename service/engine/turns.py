"""Fair turns on a shared device for the models loaded on it.

- Every loaded model version has workers of its own, but versions on one device (the CPU's cores,
  a GPU) share its time. Left alone, a flooded model's back-to-back batches would take the device
  from a model with a few requests; here each batch takes a turn on its device first, and when
  several versions wait, the turns go round them in order, one batch each.
- A version that holds the device keeps it for further batches while nobody else waits (a worker
  process is handed its next batch while one runs: that overlap stays).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Hashable
from typing import Any


class DeviceTurns:
    """Turns on one device, shared by its owners (model versions) round robin."""

    def __init__(self) -> None:
        self._owner: Hashable | None = None
        self._held = 0  # batches of the owner running now
        self._waiting: collections.OrderedDict[Hashable, collections.deque[asyncio.Future]] = collections.OrderedDict()

    @contextlib.asynccontextmanager
    async def turn(self, owner: Hashable) -> AsyncIterator[None]:
        """Runs the body when it is ``owner``'s turn on the device."""
        if self._owner is None or (self._owner == owner and not self._others_wait(owner)):
            self._owner = owner
            self._held += 1
        else:
            granted = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(owner, collections.deque()).append(granted)
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():  # granted just as it was cancelled
                    self._release()
                else:
                    self._forget(owner, granted)
                raise
        try:
            yield
        finally:
            self._release()

    def _others_wait(self, owner: Hashable) -> bool:
        return any(key != owner for key in self._waiting)

    def _forget(self, owner: Hashable, granted: asyncio.Future) -> None:
        queue = self._waiting.get(owner)
        if queue is not None and granted in queue:
            queue.remove(granted)
            if not queue:
                del self._waiting[owner]

    def _release(self) -> None:
        self._held -= 1
        if self._held > 0:
            return
        self._owner = None
        if not self._waiting:
            return
        # The next owner in line (the one that waited longest); it goes to the back of the line.
        owner, queue = next(iter(self._waiting.items()))
        granted = queue.popleft()
        if queue:
            self._waiting.move_to_end(owner)
        else:
            del self._waiting[owner]
        self._owner, self._held = owner, 1
        granted.set_result(None)


class TurnTakingRunner:
    """A batch runner (``batcher.BatchRunner``) whose batches each wait for a turn on its device."""

    def __init__(self, runner: Any, turns: DeviceTurns, owner: Hashable) -> None:
        self.runner = runner
        self.turns = turns
        self.owner = owner
        self.takes_next_batch = getattr(runner, "takes_next_batch", False)

    async def run(self, jobs: list) -> None:
        async with self.turns.turn(self.owner):
            await self.runner.run(jobs)
