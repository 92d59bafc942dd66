"""The running service, independent of HTTP: model loading, warm-up, admission, the segment
flow (decode -> queue -> batch forward -> post-process), readiness and draining.

One ``ServiceRuntime`` lives in ``app.state.runtime``; routes only parse requests and call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from model.preprocess import network_shape

from .backends import LoadedModel, build_backends
from .batcher import Batcher, BatcherClosed, DeadlineExceeded, Job, QueueFull
from .errors import ServiceError, invalid_parameter
from .imaging import decode_image, release_freed_memory
from .metrics import ServiceMetrics
from .pipeline import NetworkImage, RequestOptions, network_image, postprocess
from .schemas import SegmentParams
from .settings import ServiceSettings
from .worker import InferenceResult, SegmentJob, Worker, WorkerError

log = logging.getLogger("service")

ModelLoader = Callable[[ServiceSettings], LoadedModel]
# Decoded uploads from this size on give their freed memory back to the system at once.
LARGE_DECODE_BYTES = 64 * 1024 * 1024
# (workers, observer) -> an object with Batcher's submit/start/close/estimate_wait.
BatcherFactory = Callable[[Sequence[Worker], "MetricsObserver"], Any]


def load_model(settings: ServiceSettings) -> LoadedModel:
    return build_backends(
        settings.model, settings.config, settings.device, settings.workers, settings.backend, settings.torch_threads,
        settings.precision, settings.max_cells,
    )


class MetricsObserver:
    """Feeds the batcher's reports into the Prometheus metrics."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def queue_depth(self, depth: int) -> None:
        self.metrics.queue_depth.set(depth)

    def batch(self, jobs: Sequence[Job]) -> None:
        self.metrics.batch_size.observe(len(jobs))
        for job in jobs:
            self.metrics.queue_seconds.observe((job.dispatched_at or job.enqueued_at) - job.enqueued_at)


@dataclass
class SegmentOutcome:
    """A finished request: what the route serialises."""

    image: NetworkImage
    instances: list[dict[str, Any]]
    instances_json: bytes | None  # the instances as JSON, when asked for (encoded off the loop)
    queue_s: float
    inference_s: float
    postprocess_s: float


class ServiceRuntime:
    """States: starting -> ready -> draining -> stopped (or failed, if the model cannot load)."""

    def __init__(
        self, settings: ServiceSettings, metrics: ServiceMetrics | None = None, loader: ModelLoader = load_model,
        batcher_factory: BatcherFactory | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.loader = loader
        # Another batching engine for the workers (Ray Serve's, see service/ray_serve.py); None: ``Batcher``.
        self.batcher_factory = batcher_factory
        self.state = "starting"
        self.detail: str | None = "loading the model"
        self.model: LoadedModel | None = None
        self.workers: list[Worker] = []
        self.batcher: Batcher | None = None
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="transfiner-decode")
        self._post_pool = ThreadPoolExecutor(settings.postprocess_threads, thread_name_prefix="transfiner-post")
        self._inflight = 0
        self._queued_bytes = 0  # network-size pixels of the jobs not yet settled
        self._decoding = 0  # admitted requests whose upload is being decoded
        self._per_client: Counter[str] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()
        self._start_task: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None
        self._class_index: dict[str, int] = {}

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def capacity(self) -> int:
        """How many segment requests may be in flight: the queue plus a batch per worker."""
        workers = len(self.workers) or (self.settings.workers or 1)
        return self.settings.max_queue_size + workers * self.settings.max_batch_size

    def start(self) -> asyncio.Task:
        """Loads the model and warms up in the background; readiness turns 200 when done."""
        if self._start_task is None:
            self._start_task = asyncio.create_task(self._start(), name="transfiner-start")
        return self._start_task

    async def _start(self) -> None:
        settings = self.settings
        try:
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            model = await asyncio.to_thread(self.loader, settings)
            workers = [Worker(backend, i, self.metrics) for i, backend in enumerate(model.backends)]
            self.detail = "warming up"
            warm_batch = settings.max_batch_size if model.backends[0].device.type == "cuda" else 1
            for worker in workers:
                await asyncio.to_thread(worker.warm_up, settings.warmup_batches, warm_batch)
        except Exception as error:  # noqa: BLE001 - reported by readiness and the log, not raised
            log.exception("the model could not be loaded")
            self.state, self.detail = "failed", f"model failed to load: {type(error).__name__}: {error}"
            return
        self.model, self.workers = model, workers
        cfg = model.cfg
        self._class_index = {name: i for i, name in enumerate(cfg.class_names)}
        self._class_index.update({str(cid): i for i, cid in enumerate(cfg.category_ids)})
        if self.batcher_factory is not None:
            self.batcher = self.batcher_factory(workers, MetricsObserver(self.metrics))
        else:
            self.batcher = Batcher(
                workers, max_batch_size=settings.max_batch_size, max_delay_s=settings.max_delay_ms / 1000,
                max_queue_size=self.capacity, max_batch_pixels=settings.max_batch_pixels,
                observer=MetricsObserver(self.metrics),
            )
        self.batcher.start()
        self.metrics.set_model(model.name, model.version, model.backend, model.precision, model.devices)
        self.metrics.enable_gpu_metrics()
        if self.state == "starting":  # a SIGTERM during start-up wins
            self.state, self.detail = "ready", None
            self.metrics.ready.set(1)
            log.info("ready: %s %s on %s", model.name, model.version, ", ".join(model.devices))

    def begin_drain(self) -> asyncio.Task:
        """Readiness 503 and new requests refused from now; returns the task that finishes the
        drain (in-flight requests answered, the grace period over)."""
        if self._drain_task is None:
            self.state, self.detail = "draining", "shutting down"
            self.metrics.ready.set(0)
            self._drain_task = asyncio.create_task(self._drain(), name="transfiner-drain")
        return self._drain_task

    async def _drain(self) -> None:
        started = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.settings.drain_timeout_s)
        if not self._idle.is_set():
            log.warning("drain timeout: %d requests still in flight", self._inflight)
        left = self.settings.shutdown_grace_s - (time.monotonic() - started)
        if left > 0:
            await asyncio.sleep(left)

    def skip_drain(self) -> None:
        """Stops waiting for in-flight work (a second SIGTERM); queued jobs still get answers."""
        if self._drain_task is not None:
            self._drain_task.cancel()

    async def stop(self) -> None:
        """Drains (if not done yet), then stops the batcher, workers and thread pools."""
        with contextlib.suppress(asyncio.CancelledError):
            await self.begin_drain()
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(BaseException):
                await self._start_task
        if self.batcher is not None:
            await self.batcher.close(drain=True)
        for worker in self.workers:
            await asyncio.to_thread(worker.close)
        self._decode_pool.shutdown(wait=True)
        self._post_pool.shutdown(wait=True)
        self.state = "stopped"

    # -- admission -------------------------------------------------------------------------------

    def retry_after(self) -> float:
        """Seconds until a request sent now would be through the model (``Batcher.estimate_wait``)."""
        if self.batcher is None:
            return 5.0
        return self.batcher.estimate_wait(self.batcher.depth + self._decoding)

    @contextlib.asynccontextmanager
    async def admission(self, client: str, deadline: float | None = None) -> AsyncIterator[None]:
        """Holds one in-flight slot for a segment request, or refuses it (503/429): when the
        service is not ready, the client has its limit in flight, the queue is full, or the
        requests ahead would take it past its ``deadline`` (time.monotonic() seconds)."""
        if self.state != "ready":
            if self.state == "draining":
                raise ServiceError(503, "shutting_down", "the service is shutting down", reason="draining",
                                   retry_after=5)
            raise ServiceError(503, "not_ready", f"the service is not ready: {self.detail}", reason="not_ready",
                               retry_after=5)
        limit = self.settings.max_client_inflight
        if limit and self._per_client[client] >= limit:
            raise ServiceError(
                429, "too_many_requests", f"at most {limit} requests in flight per client",
                reason="client_limit", retry_after=self.retry_after(),
            )
        if self._inflight >= self.capacity:
            raise ServiceError(
                503, "queue_full", f"the queue is full ({self._inflight} requests in flight)",
                reason="queue_full", retry_after=self.retry_after(),
            )
        if deadline is not None and self.batcher is not None and self.batcher.recent_batch_seconds() is not None:
            # Refused now rather than computed for a client that has given up by then. Ahead of
            # it: the queue, and the admitted requests still being decoded (they queue first).
            ahead = self.batcher.depth + self._decoding
            wait = self.batcher.estimate_wait(ahead)
            if time.monotonic() + wait > deadline:
                raise ServiceError(
                    503, "overloaded",
                    f"the {ahead} requests queued ahead take about {wait:.1f} s, past this request's deadline",
                    reason="deadline_unmeetable", retry_after=wait,
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

    # -- the segment flow ------------------------------------------------------------------------

    def request_options(self, params: SegmentParams) -> RequestOptions:
        """Validates the parameters that depend on the model (class names and ids)."""
        classes = None
        if params.classes is not None:
            unknown = [c for c in params.classes if str(c) not in self._class_index]
            if unknown:
                raise invalid_parameter(f"unknown classes {unknown}: use category ids or names from /v1/models")
            classes = frozenset(self._class_index[str(c)] for c in params.classes)
        return RequestOptions(
            score_threshold=params.score_threshold, max_detections=params.max_detections, classes=classes,
            mask_threshold=params.mask_threshold, mask_format=params.mask_format, refine=params.refine,
        )

    async def segment(
        self, data: bytes, params: SegmentParams, deadline: float,
        disconnected: Callable[[], Awaitable[Any]] | None = None, as_json: bool = False,
    ) -> SegmentOutcome:
        """Decodes, queues, waits for the batch, post-processes; raises ``ServiceError``.

        ``disconnected`` returns when the client goes away (the job is then dropped);
        ``as_json`` also encodes the instances as JSON in the post-processing thread."""
        assert self.batcher is not None and self.model is not None, "segment() before the model is ready"
        options = self.request_options(params)
        loop = asyncio.get_running_loop()

        cfg = self.model.cfg
        started = time.perf_counter()
        self._decoding += 1
        try:
            image = await loop.run_in_executor(self._decode_pool, self._decode, data)
        finally:
            self._decoding -= 1
        self.metrics.decode_seconds.observe(time.perf_counter() - started)
        self.metrics.megapixels.observe(image.width * image.height / 1e6)
        if time.monotonic() >= deadline:
            raise _deadline_error("while decoding")

        budget = self.settings.max_queued_bytes
        if self._queued_bytes + image.nbytes > budget:
            raise ServiceError(
                503, "memory_budget", f"the queued images hold {self._queued_bytes} bytes; this one "
                f"({image.nbytes} bytes) would pass the budget of {budget}",
                reason="memory_budget", retry_after=self.retry_after(),
            )
        job = Job(SegmentJob(image, options), deadline=deadline, canvas=image.canvas)
        self._hold_bytes(job, image.nbytes)
        try:
            self.batcher.submit(job)
        except QueueFull as full:
            raise ServiceError(503, "queue_full", str(full), reason="queue_full", retry_after=full.retry_after) from None
        except BatcherClosed:
            raise ServiceError(503, "shutting_down", "the service is shutting down", reason="draining") from None

        result = await self._wait(job, deadline, disconnected)
        queue_s = (job.dispatched_at or job.enqueued_at) - job.enqueued_at

        def finish() -> tuple[list[dict[str, Any]], bytes | None]:
            instances = postprocess(
                result.raw, result.index, result.input_size, result.original, options, cfg, params.image_id
            )
            return instances, (dumps(instances) if as_json else None)

        started = time.perf_counter()
        instances, encoded = await loop.run_in_executor(self._post_pool, finish)
        post_s = time.perf_counter() - started
        self.metrics.postprocess_seconds.observe(post_s)
        self.metrics.instances.observe(len(instances))
        return SegmentOutcome(image, instances, encoded, queue_s, result.preprocess_s + result.inference_s, post_s)

    def _hold_bytes(self, job: Job, nbytes: int) -> None:
        """Counts the image against ``max_queued_bytes`` until its job is settled (answered,
        failed, or cancelled because its client left or its deadline passed)."""
        self._queued_bytes += nbytes
        self.metrics.queued_bytes.set(self._queued_bytes)

        def release(_: asyncio.Future) -> None:
            self._queued_bytes -= nbytes
            self.metrics.queued_bytes.set(self._queued_bytes)

        job.future.add_done_callback(release)

    def _decode(self, data: bytes) -> NetworkImage:
        """On a decode thread: the upload (JPEGs at a reduced scale, never below the network
        input) -> what waits in the queue; the full decoded pixels are freed here."""
        cfg = self.model.cfg.input
        decoded = decode_image(data, self.settings.max_pixels, reduce_to=lambda h, w: network_shape(h, w, cfg))
        image = network_image(decoded.rgb, decoded.size, cfg)
        if decoded.rgb.nbytes >= LARGE_DECODE_BYTES:
            del decoded
            release_freed_memory()
        return image

    async def _wait(
        self, job: Job, deadline: float, disconnected: Callable[[], Awaitable[Any]] | None,
    ) -> InferenceResult:
        """The job's result, unless its deadline passes (504) or the client leaves first; either
        way the job is cancelled, so the batcher drops it if it is still queued."""
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        waiting = {job.future} | ({watcher} if watcher is not None else set())
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if watcher is not None:
                watcher.cancel()
        if job.future in done:
            try:
                return job.future.result()
            except DeadlineExceeded:
                raise _deadline_error("in the queue") from None
            except BatcherClosed:
                raise ServiceError(503, "shutting_down", "the service is shutting down", reason="draining") from None
            except WorkerError as error:
                log.error("%s", error)
                raise ServiceError(500, "internal_error", "inference failed (logged on the server)") from None
        job.future.cancel()
        if watcher is not None and watcher in done:
            # Nobody will read the answer; 499 (nginx's "client closed request") for the log.
            raise ServiceError(499, "client_disconnected", "the client disconnected", reason="client_disconnected")
        raise _deadline_error("waiting for the model")


def dumps(value: Any) -> bytes:
    """Compact JSON, as Starlette's JSONResponse writes it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _deadline_error(where: str) -> ServiceError:
    return ServiceError(504, "deadline_exceeded", f"the request's deadline passed {where}", reason="deadline")
