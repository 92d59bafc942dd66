"""The running service, independent of HTTP: its lifecycle (model loading and warm-up, readiness,
draining, shutdown). Admission (``service.engine.admission``) and the segment flow
(``service.engine.segmenting``) are its two other parts; it owns them and hands routes their entry points.

One ``ServiceRuntime`` lives in ``app.state.runtime``; routes only parse requests and call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from transfiner.model.inference.images import DatasetError
from transfiner.model.weights.files import CheckpointError
from transfiner.service.engine.admission import Admission
from transfiner.service.engine.batcher import Batcher, Job
from transfiner.service.engine.host_memory import keep_freed_memory_for_reuse
from transfiner.service.engine.loading import (
    LoadedModel,
    build_backends,
    max_batch_size_for,
    uses_worker_process,
    workers_on_gpu,
)
from transfiner.service.engine.segmenting import SegmentFlow, SegmentOutcome
from transfiner.service.engine.worker import Worker
from transfiner.service.engine.worker_process import ProcessWorker, start_worker_processes
from transfiner.service.errors import ServiceError
from transfiner.service.metrics import ServiceMetrics
from transfiner.service.schemas import SegmentParams
from transfiner.service.settings import ServiceSettings

log = logging.getLogger("service")
# What a model that cannot be loaded raises for a reason its message states (a missing or corrupt
# file, a setting that does not fit it), as the command line reports it: no traceback in the log.
MODEL_ERRORS = (CheckpointError, DatasetError, ValueError, OSError)

ModelLoader = Callable[[ServiceSettings], LoadedModel]
# (workers, observer) -> an object with Batcher's submit/start/close/depth/estimate_wait/recent_batch_seconds.
BatcherFactory = Callable[[Sequence[Worker], "MetricsObserver"], Any]


def load_model(settings: ServiceSettings) -> LoadedModel:
    return build_backends(
        settings.model,
        settings.config,
        settings.device,
        settings.workers,
        settings.backend,
        settings.torch_threads,
        settings.precision,
        settings.max_cells,
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


def keeps_freed_memory(settings: ServiceSettings) -> bool:
    """``keep_freed_memory`` as set; by default when no model runs on the CPU in this process.

    Then its large buffers are the uploads', image-sized and renewed every request, and kept they
    save each request its page faults (docs/gpu-performance.md). A CPU model's own allocations
    kept 100-160 MB more for no measured gain, so a CPU worker thread leaves glibc as it is."""
    if settings.keep_freed_memory is not None:
        return settings.keep_freed_memory
    return bool(settings.worker_process) or workers_on_gpu(settings.device, settings.workers)


class ServiceRuntime:
    """States: starting -> ready -> draining -> stopped (or failed, if the model cannot load)."""

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics | None = None,
        loader: ModelLoader = load_model,
        batcher_factory: BatcherFactory | None = None,
    ) -> None:
        # Resolved once, so everything downstream (and /v1/models) sees what runs.
        self.settings = settings = settings.model_copy(
            update={
                "worker_process": uses_worker_process(settings.worker_process, settings.device, settings.workers),
                "max_batch_size": max_batch_size_for(settings.max_batch_size, settings.device, settings.workers),
            }
        )
        self.metrics = metrics or ServiceMetrics()
        self.loader = loader
        # Another batching engine for the workers (Ray Serve's, see service/ray_serve.py); None: ``Batcher``.
        self.batcher_factory = batcher_factory
        self.state = "starting"
        self.detail: str | None = "loading the model"
        self.model: LoadedModel | None = None
        self.workers: list[Worker | ProcessWorker] = []
        self.batcher: Batcher | None = None
        self.flow: SegmentFlow | None = None  # once the model is loaded
        self.admitted = Admission(settings.max_client_inflight, self.metrics)
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="transfiner-decode")
        self._post_pool = ThreadPoolExecutor(settings.postprocess_threads, thread_name_prefix="transfiner-post")
        self._start_task: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready" and not self.workers_down()

    def workers_down(self) -> list[int]:
        """The worker processes being started again after theirs exited (none in-process)."""
        return [w.index for w in self.workers if isinstance(w, ProcessWorker) and not w.alive]

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
            sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
            if keeps_freed_memory(settings):
                keep_freed_memory_for_reuse()
            if settings.worker_process:
                self.detail = "starting the worker processes"
                model, workers = await start_worker_processes(settings, self.metrics)
            else:
                model = await asyncio.to_thread(self.loader, settings)
                workers = [Worker(backend, i, self.metrics) for i, backend in enumerate(model.backends)]
                self.detail = "warming up"
                warm_batch = settings.max_batch_size if model.backends[0].device.type == "cuda" else 1
                for worker in workers:
                    await asyncio.to_thread(worker.warm_up, settings.warmup_batches, warm_batch)
        except Exception as error:  # noqa: BLE001 - reported by readiness and the log, not raised
            self.state, self.detail = "failed", f"model failed to load: {type(error).__name__}: {error}"
            if isinstance(error, MODEL_ERRORS):  # a bad file or setting: its message says it all
                log.error("%s", self.detail)
            else:
                log.exception("the model could not be loaded")
            return
        self.model, self.workers = model, workers
        if self.batcher_factory is not None:
            self.batcher = self.batcher_factory(workers, MetricsObserver(self.metrics))
        else:
            self.batcher = Batcher(
                workers,
                max_batch_size=settings.max_batch_size,
                max_delay_s=settings.max_delay_ms / 1000,
                max_arrival_wait_s=settings.max_arrival_wait_ms / 1000,
                max_queue_size=self.capacity,
                max_batch_pixels=settings.max_batch_pixels,
                observer=MetricsObserver(self.metrics),
            )
        self.batcher.start()
        self.flow = SegmentFlow(settings, self.metrics, model, self.batcher, self._decode_pool, self._post_pool)
        self.metrics.set_model(model.name, model.version, model.backend, model.precision, model.devices)
        self.metrics.enable_gpu_metrics(allocator=not settings.worker_process)
        if self.state == "starting":  # a SIGTERM during start-up wins
            self.state, self.detail = "ready", None
            self.metrics.ready.set(1)
            log.info(
                "ready: %s %s on %s, %d model worker(s), each in %s",
                model.name,
                model.version,
                ", ".join(model.devices),
                len(workers),
                "a process of its own" if settings.worker_process else "a thread of the server",
            )

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
        if not await self.admitted.wait_idle(self.settings.drain_timeout_s):
            log.warning("drain timeout: %d requests still in flight", self.admitted.inflight)
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

    # -- the entry points of the other two parts ------------------------------------------------

    def retry_after(self) -> float:
        """Seconds until a request sent now would be through the model (5 before the model is up)."""
        return self.flow.retry_after() if self.flow is not None else 5.0

    @contextlib.asynccontextmanager
    async def admission(self, client: str, deadline: float | None = None) -> AsyncIterator[None]:
        """Holds one in-flight place for a segment request of ``client``, or refuses it (503
        while not ready or draining; else ``Admission.slot``'s refusals)."""
        if self.state != "ready":
            if self.state == "draining":
                raise ServiceError(
                    503, "shutting_down", "the service is shutting down", reason="draining", retry_after=5
                )
            raise ServiceError(
                503, "not_ready", f"the service is not ready: {self.detail}", reason="not_ready", retry_after=5
            )
        wait_s = self.flow.expected_wait() if self.flow is not None else None
        async with self.admitted.slot(client, self.capacity, deadline, wait_s, self.retry_after()):
            yield

    async def segment(
        self,
        data: bytes,
        params: SegmentParams,
        deadline: float,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
        as_json: bool = False,
    ) -> SegmentOutcome:
        """``SegmentFlow.segment`` (call it inside ``admission``)."""
        assert self.flow is not None, "segment() before the model is ready"
        return await self.flow.segment(data, params, deadline, disconnected, as_json)
