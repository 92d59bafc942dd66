"""A model worker: runs batches on one backend in a dedicated thread, off the event loop.

- Torch releases the GIL inside its kernels, so the event loop keeps accepting and decoding while a
  batch runs. The worker does pre-processing, the forward pass and the device half of each request's
  post-processing (``pipeline.fetch``: its rows, boxes and RLE, onto the host), so one thread
  launches every kernel; the host half (``pipeline.records``, polygon tracing, JSON) runs in the
  post-processing pool.
- Each image of a batch runs with its own request's options (``pipeline.batch_options``), and on
  eager PyTorch the masks come in groups of images, fewest detections first: a request is answered
  as soon as its own masks are done, so a batch-mate that asked for many detections costs it little.
  A batch that fails is retried one request at a time, so only the request that causes the failure
  gets the error (``run_with_retries``, which also runs again the batches whose worker process exited).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from transfiner.model.inference.backend import infer_lightest_first
from transfiner.model.inference.fetch import FetchedDetections
from transfiner.service.engine.batcher import Job
from transfiner.service.engine.loading import Backend
from transfiner.service.engine.pipeline import (
    NetworkImage,
    RequestOptions,
    batch_options,
    fetch,
    network_image,
    preprocess,
    records,
)

log = logging.getLogger("service")


@dataclass
class SegmentJob:
    """A job's payload: the image, as it waits for the network, and the request's options."""

    image: NetworkImage
    options: RequestOptions


@dataclass
class InferenceResult:
    """What a request gets back from its batch: its detections and masks, on the host."""

    fetched: FetchedDetections  # ``pipeline.records`` turns it into the response's instances
    index: int  # the request's image in the batch
    batch_size: int
    preprocess_s: float
    inference_s: float  # from the start of the forward pass until this request's masks were fetched


INFERENCE_FAILED = "inference failed (logged on the server)"
EXITED_TWICE = "the model worker process exited twice while computing this request"


class WorkerError(Exception):
    """The forward pass failed for this request; it answers 500 with ``public`` as its message,
    the worker keeps running."""

    def __init__(self, message: str, public: str = INFERENCE_FAILED) -> None:
        super().__init__(message)
        self.public = public


class WorkerExited(Exception):
    """The worker's process exited while a batch was in it; the batch may run again on the next one.

    - ``computing``: the process was computing this batch, so one of its requests may be the cause;
      otherwise the batch only waited behind that one.
    """

    def __init__(self, message: str, computing: bool) -> None:
        super().__init__(message)
        self.computing = computing


Steps = Iterator[list[tuple[int, FetchedDetections]]]


class Worker:
    """Implements ``batcher.BatchRunner`` for one backend."""

    def __init__(self, backend: Backend, index: int = 0, metrics=None) -> None:
        self.backend = backend
        self.index = index
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"transfiner-worker-{index}")

    def start(
        self,
        images: list[NetworkImage],
        options: list[RequestOptions],
        wanted: Callable[[int], bool] = lambda i: True,
    ) -> tuple[Steps, float]:
        """Synchronous, in the worker thread: pre-process one batch of one canvas and set up its
        forward pass, whose steps (``model.inference.backend.infer_lightest_first``, then ``pipeline.fetch``
        for the images of the step that are still ``wanted``) run as they are asked for."""
        started = time.perf_counter()
        prepared = preprocess(images, self.backend.cfg.input, self.backend.device)
        steps = infer_lightest_first(
            self.backend, prepared.images, prepared.sizes, batch_options(options, self.backend.cfg)
        )

        def fetched(indices: list[int], raw) -> list[tuple[int, FetchedDetections]]:
            live = [i for i in indices if wanted(i)]
            return list(zip(live, fetch(raw, live, prepared, options)))

        return (fetched(indices, raw) for indices, raw in steps), time.perf_counter() - started

    async def run(self, jobs: list[Job]) -> None:
        await run_with_retries(jobs, self._run_batch)

    async def _run_batch(self, jobs: list[Job]) -> None:
        """Runs ``jobs`` as one batch and settles each job's future as soon as its masks are done."""
        payloads: list[SegmentJob] = [job.payload for job in jobs]
        loop = asyncio.get_running_loop()
        steps, pre_s = await loop.run_in_executor(
            self._executor,
            self.start,
            [p.image for p in payloads],
            [p.options for p in payloads],
            lambda i: not jobs[i].future.done(),  # a request whose client left needs no masks
        )
        started = time.perf_counter()
        observed = False
        while True:
            step = await loop.run_in_executor(self._executor, next, steps, None)
            if step is None:
                break
            inference_s = time.perf_counter() - started
            if settle(jobs, step, pre_s, inference_s) and not observed:
                observe_batch(self.metrics, pre_s, inference_s)
                observed = True
        if not observed:
            observe_batch(self.metrics, pre_s, time.perf_counter() - started)

    def warm_up(self, batches: int, batch_size: int) -> None:
        """Synchronous: runs ``batches`` synthetic batches (in the worker thread) so the first real
        request does not pay for lazy initialisation (allocator, kernels, thread pools)."""
        cfg = self.backend.cfg
        side = cfg.input.min_size_test
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        rgb[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = (200, 60, 40)  # something to find
        image = network_image(rgb, (side, side), cfg.input)
        request = RequestOptions(score_threshold=0.0, max_detections=5)

        def one_batch() -> None:
            steps, _ = self.start([image] * batch_size, [request] * batch_size)
            for step in steps:
                records(step[0][1], cfg, None)

        for _ in range(batches):
            self._executor.submit(one_batch).result()  # on the worker's own thread, as real batches

    def close(self) -> None:
        self._executor.shutdown(wait=True)


async def run_with_retries(jobs: list[Job], run_batch: Callable[[list[Job]], Awaitable[None]]) -> None:
    """``run_batch`` over the jobs still waiting, so that only the request that causes a failure gets an error.

    - A batch that raises is retried one request at a time; a request that fails alone gets a 500.
    - A batch whose worker process exited (``WorkerExited``) runs again on the restarted process
      (inference is idempotent): the batch the process was computing one request at a time, where a
      request that makes the process exit again gets a 500 that says so; a batch that only waited
      behind it as it was.
    """
    live = _unanswered(jobs)
    while live:
        try:
            await run_batch(live)
            return
        except WorkerExited as error:
            if error.computing:
                await _one_by_one(live, run_batch, error, exited_once=True)
                return
            live = _unanswered(live)  # not a suspect: it runs again as it was
        except Exception as error:  # noqa: BLE001 - answered per request
            if len(live) == 1:
                _fail(live, error)
            else:
                await _one_by_one(live, run_batch, error, exited_once=False)
            return


async def _one_by_one(
    jobs: list[Job], run_batch: Callable[[list[Job]], Awaitable[None]], error: Exception, exited_once: bool
) -> None:
    """Runs the unanswered jobs of a failed batch one at a time.

    - Why not the batch again, or the batch minus the suspects: a failure does not say which request
      caused it (nor, for an exit, whether the batch's size did, as when memory ran out), so after an
      exit every request of the batch is a suspect. Alone, a request that fails is the cause, and no
      batch-mate fails with it.
    """
    failed = _unanswered(jobs)
    log.warning(
        "a batch of %d failed (%s: %s); retrying its %d unanswered requests one by one",
        len(jobs),
        type(error).__name__,
        error,
        len(failed),
    )
    for job in failed:
        await _run_alone(job, run_batch, exited_once)


async def _run_alone(job: Job, run_batch: Callable[[list[Job]], Awaitable[None]], exited_once: bool) -> None:
    """``run_batch([job])`` until the job is answered: its worker process may exit while computing
    it once more (it runs again), not twice."""
    while not job.future.done():
        try:
            await run_batch([job])
            return
        except WorkerExited as error:
            if not error.computing:  # another request's batch took the process down
                continue
            if exited_once:
                _fail([job], error, EXITED_TWICE)
                return
            exited_once = True
        except Exception as error:  # noqa: BLE001
            _fail([job], error)
            return


def settle(jobs: list[Job], step: list[tuple[int, FetchedDetections]], preprocess_s: float, inference_s: float) -> bool:
    """Answers the jobs of one step of a batch (the others wait for a later step); True once
    every job of the batch has its answer (or its client has left)."""
    for i, fetched in step:
        job = jobs[i]
        if not job.future.done():
            job.future.set_result(InferenceResult(fetched, i, len(jobs), preprocess_s, inference_s))
    return all(job.future.done() for job in jobs)


def observe_batch(metrics, preprocess_s: float, inference_s: float) -> None:
    """Counts a batch's times in the metrics. Called as its last answer is set, before the event
    loop sends any answer, so that a scrape of /metrics made after a batch's last answer always
    counts that batch (``transfiner bench`` reads each step's batches that way)."""
    if metrics is not None:
        metrics.preprocess_seconds.observe(preprocess_s)
        metrics.inference_seconds.observe(inference_s)


def _unanswered(jobs: list[Job]) -> list[Job]:
    return [job for job in jobs if not job.future.done()]


def _fail(jobs: list[Job], error: Exception, public: str = INFERENCE_FAILED) -> None:
    log.error("a request answers 500, %r: %s: %s", public, type(error).__name__, error, exc_info=error)
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(WorkerError(f"inference failed: {type(error).__name__}: {error}", public))
