"""An asyncio dynamic batcher: a bounded queue, one dispatcher per worker, size/delay/pixel caps.

- A batch only holds jobs of one canvas (the padded network input size, ``Job.canvas``), so no
  request's answer depends on its batch-mates, and of one ``Job.shares`` (what else a runtime
  applies to a whole batch), so no request pays for a batch-mate's options. The oldest waiting job
  always leads the next batch (no starvation); its batch takes the queued jobs of its group (canvas
  and shares) in arrival order, the others keep their place for a later batch (FIFO within each
  group).
- A dispatcher takes a batch only when its worker is free, so under load batches fill from the queue
  with no waiting at all, and ``max_delay`` is only paid when the service is idle enough that a lone
  request would otherwise run alone.
- While requests are still ``arriving`` (their uploads being decoded; they queue next) a filling
  batch waits for them a little longer (``max_arrival_wait``, never longer than a recent batch
  took): a closed loop of as many clients as a batch holds would otherwise settle into two half
  batches, each sent while the other's clients decode.
- A worker that says it ``takes_next_batch`` (one in a process of its own, which must receive a
  batch's images before it can start) also gets a second dispatcher that hands it the next batch
  while one runs, but only a full one, and only of the oldest job's canvas: under load its images
  travel while the model computes, and a partial batch keeps filling in the queue until the worker
  is free.
- Jobs whose deadline would pass before their batch is done (by the recent batch times) are failed
  with ``DeadlineExceeded``, and jobs whose future is settled (the client went away, or its handler
  gave up) leave the queue at once; neither reaches a worker.
- Nothing here knows about HTTP or models: a worker is anything with ``async run(jobs)`` that
  settles each job's future.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("service")


class QueueFull(Exception):
    """The queue holds ``max_queue_size`` jobs; ``retry_after`` estimates when it will have room."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"queue full, retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """The job's deadline passed before a worker took it."""


class BatcherClosed(Exception):
    """The batcher no longer accepts jobs (shutting down)."""


@dataclass(eq=False)
class Job:
    """One request's unit of work. ``payload`` is for the worker; the batcher only reads the rest."""

    payload: Any = field(repr=False)  # an image: never formatted into logs or errors
    deadline: float  # time.monotonic() seconds
    canvas: tuple[int, int] = (0, 0)  # padded network input (H, W): batch-mates share it
    # Anything else batch-mates must share (None: nothing); e.g. the options an exported graph
    # takes once per batch, whose cost (a score threshold of 0) would otherwise fall on all.
    shares: Hashable = None
    enqueued_at: float = field(default_factory=time.monotonic)
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    dispatched_at: float | None = None
    worker: int | None = None  # the index of the runner its batch went to

    @property
    def group(self) -> tuple[tuple[int, int], Hashable]:
        """Jobs of one group may share a batch."""
        return self.canvas, self.shares


def batch_capacity(canvas: tuple[int, int], max_batch_size: int, max_batch_pixels: int | None) -> int:
    """How many jobs of one canvas (H, W) a batch holds: ``max_batch_size``, and no more than
    ``max_batch_pixels`` allows (batch size x H x W), but always one."""
    if max_batch_pixels is None:
        return max_batch_size
    return max(1, min(max_batch_size, max_batch_pixels // (canvas[0] * canvas[1])))


class BatchTimes:
    """The durations of the recent batches, and what they say about the wait ahead. Shared by
    ``Batcher`` and the Ray Serve engine's batcher (``service.ray_serve``)."""

    def __init__(self, history: int = 32) -> None:
        self._seconds: collections.deque[float] = collections.deque(maxlen=history)

    def record(self, seconds: float) -> None:
        self._seconds.append(seconds)

    def recent(self) -> float | None:
        """How long a batch takes, on the slow side: the 90th percentile of the recent batch
        times (None before the first batch). Deadlines are judged by it, so that a request is
        refused, rather than computed for a client that has given up, when a batch runs slow."""
        if not self._seconds:
            return None
        ordered = sorted(self._seconds)
        return ordered[math.ceil(0.9 * len(ordered)) - 1]

    def wait(self, waiting: int, per_round: int, running: bool, fallback: float) -> float:
        """Seconds until a request queued behind ``waiting`` others is through the model: the
        batches running now (if ``running``), then the rounds of ``per_round`` jobs (batch size x
        workers) ahead of it and its own, each taking ``recent()`` (``fallback`` before any)."""
        per_batch = self.recent()
        if per_batch is None:
            per_batch = fallback
        return (int(running) + math.ceil((waiting + 1) / per_round)) * per_batch


class BatchRunner(Protocol):
    """A worker. One that also has ``takes_next_batch = True`` may be given its next batch while
    one runs (it runs its batches in the order given)."""

    async def run(self, jobs: list[Job]) -> None:
        """Processes the jobs as one batch and settles every job's future."""
        ...


class BatchObserver(Protocol):
    """What the batcher reports (``ServiceMetrics`` fits through ``MetricsObserver``)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch(self, jobs: Sequence[Job]) -> None: ...


class Batcher:
    def __init__(
        self,
        runners: Sequence[BatchRunner],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        max_batch_pixels: int | None = None,
        observer: BatchObserver | None = None,
        history: int = 32,
        max_arrival_wait_s: float = 0.0,
    ) -> None:
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        self.runners = list(runners)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_arrival_wait_s = max_arrival_wait_s
        self.max_queue_size = max_queue_size
        self.max_batch_pixels = max_batch_pixels
        self.observer = observer
        self._queue: collections.deque[Job] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._tasks: list[asyncio.Task] = []
        self._busy = 0
        self._arriving = 0  # requests between admission and submit (being decoded)
        self._last_done: dict[int, float] = {}  # id(runner) -> when its latest batch ended
        self._running: collections.Counter[int] = collections.Counter()  # id(runner) -> batches it holds
        self.batch_times = BatchTimes(history)

    # -- state -----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def arriving_count(self) -> int:
        return self._arriving

    def recent_batch_seconds(self) -> float | None:
        return self.batch_times.recent()

    def estimate_wait(self, waiting: int | None = None) -> float:
        """Seconds until a request queued now behind ``waiting`` others (default: the queue) is
        through the model (``BatchTimes.wait``)."""
        waiting = self.depth if waiting is None else waiting
        return self.batch_times.wait(
            waiting,
            self.max_batch_size * len(self.runners),
            running=self._busy > 0,
            fallback=self.max_delay_s + 1.0,
        )

    # -- producer side ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Around the work between a request's admission and its ``submit`` (decoding): a
        filling batch may wait for it (``max_arrival_wait_s``)."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wakeup.set()  # a batch waiting for arrivals may go now

    def submit(self, job: Job) -> None:
        """Queues ``job``; raises ``QueueFull`` (with a retry estimate) or ``BatcherClosed``."""
        if self._closed:
            raise BatcherClosed("the service is shutting down")
        if len(self._queue) >= self.max_queue_size:
            # Requests whose clients left or whose deadline passed only give their places up
            # when a worker next takes a batch; a full queue must not turn a new one away for them.
            self._drop_dead()
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(self.estimate_wait())
        self._queue.append(job)
        # A job settled while queued (its client left, its handler gave up at the deadline)
        # leaves the queue, and the depth gauge, at once.
        job.future.add_done_callback(lambda _: self._discard(job))
        self._report_depth()
        self._wakeup.set()

    def _discard(self, job: Job) -> None:
        # Usually the job was taken into a batch already. Not remove() and catch its ValueError:
        # that error's message is the job's repr, built on the event loop for every answer.
        if job in self._queue:  # by identity (eq=False)
            self._queue.remove(job)
            self._report_depth()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._dispatch(runner), name=f"batcher-{i}") for i, runner in enumerate(self.runners)
        ]
        self._tasks += [
            asyncio.create_task(self._dispatch(runner, look_ahead=True), name=f"batcher-{i}-next")
            for i, runner in enumerate(self.runners)
            if getattr(runner, "takes_next_batch", False)
        ]

    async def close(self, drain: bool = True) -> None:
        """Stops accepting jobs; with ``drain`` the queued ones still run, else they fail."""
        self._closed = True
        if not drain:
            while self._queue:
                job = self._queue.popleft()
                if not job.future.done():
                    job.future.set_exception(BatcherClosed("the service is shutting down"))
            self._report_depth()
        self._wakeup.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []

    # -- consumer side ---------------------------------------------------------------------------

    async def _dispatch(self, runner: BatchRunner, look_ahead: bool = False) -> None:
        worker = self.runners.index(runner)
        while True:
            jobs = await (self._next_full_batch(runner) if look_ahead else self._next_batch())
            if jobs is None:
                return
            self._running[id(runner)] += 1
            if getattr(runner, "takes_next_batch", False):
                self._wakeup.set()  # its look-ahead dispatcher may now hand it the next batch
            self._busy += 1
            started = time.monotonic()
            for job in jobs:
                job.dispatched_at, job.worker = started, worker
            if self.observer is not None:
                self.observer.batch(jobs)
            try:
                await runner.run(jobs)
            except Exception as error:  # noqa: BLE001 - a failing batch must not stop the dispatcher
                log.exception("batch of %d failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
            finally:
                self._busy -= 1
                # A batch handed over while the runner's previous one ran starts when that ends.
                done = time.monotonic()
                self.batch_times.record(done - max(started, self._last_done.get(id(runner), started)))
                self._last_done[id(runner)] = done
                self._running[id(runner)] -= 1

    async def _next_batch(self) -> list[Job] | None:
        """Waits for a first live job, then fills the batch with jobs of its canvas until it is
        full (size or pixel budget) or until ``_flush_at``. None when closed and empty."""
        while True:
            batch: list[Job] = []
            while not batch:
                if not self._queue:
                    if self._closed:
                        return None
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                self._take(batch)
            while not self._full(batch) and not self._closed:
                remaining = self._flush_at(batch[0]) - time.monotonic()
                if remaining <= 0:
                    break
                # Everything of this canvas is taken; what is left is another canvas's, so wait
                # for a new arrival or the end of one (another dispatcher may take it first;
                # _take copes).
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                self._take(batch)
            # Jobs taken early may have died while the batch filled: they must not reach the model.
            batch = [job for job in batch if self._alive(job, time.monotonic())]
            if batch:
                return batch

    def _flush_at(self, first: Job) -> float:
        """When a batch led by ``first`` goes if it does not fill: ``max_delay`` after ``first``
        arrived; while requests are arriving, up to ``max_arrival_wait`` after, but no later
        than a recent batch's time after (by then a batch sent without them would be done)."""
        flush_at = first.enqueued_at + self.max_delay_s
        if self._arriving:
            wait = self.max_arrival_wait_s
            recent = self.recent_batch_seconds()
            flush_at = max(flush_at, first.enqueued_at + (wait if recent is None else min(wait, recent)))
        return flush_at

    async def _next_full_batch(self, runner: BatchRunner) -> list[Job] | None:
        """The look-ahead dispatcher's batch: while ``runner`` runs a batch, and as soon as the
        queue holds a full batch of the oldest job's canvas, that batch (never a partial one,
        never jumping the queue; an idle runner gets its batch from ``_next_batch``). None once
        closed."""
        while not self._closed:
            now = time.monotonic()
            self._queue = collections.deque(job for job in self._queue if self._alive(job, now))
            if self._queue and self._running[id(runner)] == 1:
                group = self._queue[0].group
                same = [job for job in self._queue if job.group == group]
                capacity = batch_capacity(group[0], self.max_batch_size, self.max_batch_pixels)
                if len(same) >= capacity:
                    taken = set(map(id, same[:capacity]))
                    self._queue = collections.deque(job for job in self._queue if id(job) not in taken)
                    self._report_depth()
                    # This batch starts when the running one ends: its jobs must meet their
                    # deadlines a batch later than a batch taken now would.
                    starts = now + (self.recent_batch_seconds() or 0.0)
                    batch = [job for job in same[:capacity] if self._alive(job, starts)]
                    if batch:
                        return batch
                    continue
            self._report_depth()
            self._wakeup.clear()
            await self._wakeup.wait()
        return None

    def _alive(self, job: Job, now: float) -> bool:
        """False for a job whose future is settled (cancelled), or whose deadline will have
        passed before a batch started now is done (the median recent batch time): such a job is
        failed here with ``DeadlineExceeded`` instead of spending the model on an answer that
        nobody will read."""
        if job.future.done():  # cancelled: the client left or its handler timed out
            return False
        if job.deadline <= now + (self.recent_batch_seconds() or 0.0):
            job.future.set_exception(DeadlineExceeded("the request's deadline would pass before its batch is done"))
            return False
        return True

    def _take(self, batch: list[Job]) -> None:
        """Moves live jobs from the queue into ``batch`` in arrival order: the oldest leads an
        empty batch, then the jobs of its canvas while the batch is not full. Dead jobs anywhere
        in the queue are dropped; the others stay queued, in order."""
        now = time.monotonic()
        left: collections.deque[Job] = collections.deque()
        while self._queue:
            job = self._queue.popleft()
            if not self._alive(job, now):
                continue
            if not batch or (job.group == batch[0].group and not self._full(batch)):
                batch.append(job)
            else:
                left.append(job)
        self._queue = left
        self._report_depth()

    def _drop_dead(self) -> None:
        now = time.monotonic()
        self._queue = collections.deque(job for job in self._queue if self._alive(job, now))
        self._report_depth()

    def _full(self, batch: list[Job]) -> bool:
        """No room for one more job of the batch's canvas (all its jobs pad to the same pixels)."""
        return len(batch) >= batch_capacity(batch[0].canvas, self.max_batch_size, self.max_batch_pixels)

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.queue_depth(len(self._queue))
