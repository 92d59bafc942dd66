"""One loaded version of one model: its workers, batcher, segment flow and admission.

States (the index's, as Triton's model repository names them): LOADING -> READY -> UNLOADING ->
gone, or LOADING -> UNAVAILABLE when it cannot load or warm up (``error`` says why). Versions share
the service's decode and post-processing threads and, on one device, fair turns (``turns``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Executor
from typing import Any

from transfiner.model.inference.images import DatasetError
from transfiner.model.weights.files import CheckpointError
from transfiner.service.engine.admission import Admission
from transfiner.service.engine.batcher import Batcher, Job
from transfiner.service.engine.loading import LoadedModel, build_backends
from transfiner.service.engine.segmenting import ByteBudget, SegmentFlow, SegmentOutcome
from transfiner.service.engine.turns import DeviceTurns, TurnTakingRunner
from transfiner.service.engine.worker import Worker
from transfiner.service.engine.worker_process import ProcessWorker, start_worker_processes
from transfiner.service.errors import ServiceError
from transfiner.service.metrics import VersionMetrics
from transfiner.service.schemas import SegmentParams
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.tracing import NO_TRACING, Tracing

log = logging.getLogger("service")
# What a model that cannot be loaded raises for a reason its message states (a missing or corrupt
# file, a setting that does not fit it), as the command line reports it: no traceback in the log.
MODEL_ERRORS = (CheckpointError, DatasetError, ValueError, OSError)

ModelLoader = Callable[[ServiceSettings], LoadedModel]
# (the version's settings, its workers, observer) -> an object with Batcher's submit/start/close/
# depth/estimate_wait/recent_batch_seconds.
BatcherFactory = Callable[[ServiceSettings, Sequence[Any], "MetricsObserver"], Any]


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
    """Feeds the batcher's reports into a version's Prometheus metrics."""

    def __init__(self, metrics: VersionMetrics) -> None:
        self.metrics = metrics

    def queue_depth(self, depth: int) -> None:
        self.metrics.queue_depth.set(depth)

    def batch(self, jobs: Sequence[Job]) -> None:
        self.metrics.batch_size.observe(len(jobs))
        for job in jobs:
            self.metrics.queue_seconds.observe((job.dispatched_at or job.enqueued_at) - job.enqueued_at)


class ModelVersion:
    """A model version from loading to unloading; ``settings.model`` names its files."""

    def __init__(
        self,
        name: str,
        version: str,
        settings: ServiceSettings,
        metrics: VersionMetrics,
        pools: tuple[Executor, Executor],
        turns: Callable[[str], DeviceTurns],
        total_bytes: ByteBudget,
        loader: ModelLoader = load_model,
        batcher_factory: BatcherFactory | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.name, self.version = name, version
        self.settings = settings
        self.metrics = metrics
        self.state = "LOADING"
        self.error: str | None = None
        self.digest: str | None = None  # the weights' digest, once loaded
        self.model: LoadedModel | None = None
        self.workers: list[Worker | ProcessWorker] = []
        self.batcher: Batcher | None = None
        self.flow: SegmentFlow | None = None
        self.admitted = Admission(settings.max_client_inflight, metrics)
        self._pools = pools
        self._turns = turns
        self._total_bytes = total_bytes
        self._loader = loader
        self._batcher_factory = batcher_factory
        self._tracing = tracing
        self._unloading: asyncio.Future | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.version

    @property
    def ready(self) -> bool:
        return self.state == "READY" and not self.workers_down()

    def workers_down(self) -> list[int]:
        """The worker processes being started again after theirs exited (none in-process)."""
        return [w.index for w in self.workers if isinstance(w, ProcessWorker) and not w.alive]

    @property
    def capacity(self) -> int:
        """How many segment requests may be in flight: the queue plus a batch per worker."""
        workers = len(self.workers) or (self.settings.workers or 1)
        return self.settings.max_queue_size + workers * self.settings.max_batch_size

    # -- lifecycle -------------------------------------------------------------------------------

    async def load(self) -> bool:
        """Loads and warms up; True when READY, else UNAVAILABLE with ``error`` set (never raises)."""
        settings = self.settings
        try:
            if settings.worker_process:
                model, workers = await start_worker_processes(settings, self.metrics)
            else:
                model = await asyncio.to_thread(self._loader, settings)
                workers = [Worker(backend, i, self.metrics) for i, backend in enumerate(model.backends)]
                warm_batch = settings.max_batch_size if model.backends[0].device.type == "cuda" else 1
                for worker in workers:
                    await asyncio.to_thread(worker.warm_up, settings.warmup_batches, warm_batch)
        except asyncio.CancelledError:
            self.state, self.error = "UNAVAILABLE", "loading was cancelled"
            raise
        except Exception as error:  # noqa: BLE001 - reported by the index, readiness and the log, not raised
            self.state, self.error = "UNAVAILABLE", f"{type(error).__name__}: {error}"
            if isinstance(error, MODEL_ERRORS):  # a bad file or setting: its message says it all
                log.error("model %s version %s failed to load: %s", self.name, self.version, self.error)
            else:
                log.exception("model %s version %s could not be loaded", self.name, self.version)
            return False
        if self.state != "LOADING":  # unloaded while it loaded
            for worker in workers:
                await asyncio.to_thread(worker.close)
            return False
        self.model, self.workers, self.digest = model, workers, model.version
        runners = [TurnTakingRunner(w, self._turns(device), self.key) for w, device in zip(workers, model.devices)]
        observer = MetricsObserver(self.metrics)
        if self._batcher_factory is not None:
            self.batcher = self._batcher_factory(settings, runners, observer)
        else:
            self.batcher = Batcher(
                runners,
                max_batch_size=settings.max_batch_size,
                max_delay_s=settings.max_delay_ms / 1000,
                max_arrival_wait_s=settings.max_arrival_wait_ms / 1000,
                max_queue_size=self.capacity,
                max_batch_pixels=settings.max_batch_pixels,
                observer=observer,
            )
        self.batcher.start()
        decode_pool, post_pool = self._pools
        self.flow = SegmentFlow(
            settings,
            self.metrics,
            model,
            self.batcher,
            decode_pool,
            post_pool,
            total_bytes=self._total_bytes,
            tracing=self._tracing,
            key=self.key,
        )
        self.metrics.set_model(model.backend, model.precision, model.devices)
        self.state = "READY"
        log.info(
            "model %s version %s ready: %s on %s, %d model worker(s), each in %s",
            self.name,
            self.version,
            model.backend,
            ", ".join(model.devices),
            len(workers),
            "a process of its own" if settings.worker_process else "a thread of the server",
        )
        return True

    async def unload(self, drain_timeout_s: float) -> None:
        """Stops taking requests, lets the admitted ones finish (up to ``drain_timeout_s``), then
        stops its batcher and workers and lets go of the model. Once, however often it is called;
        a version still loading stops its workers itself when its load ends (``load``)."""
        if self._unloading is None:
            self._unloading = asyncio.ensure_future(self._unload(drain_timeout_s))
        await asyncio.shield(self._unloading)

    async def _unload(self, drain_timeout_s: float) -> None:
        loaded = self.state == "READY"
        self.state = "UNLOADING"
        try:
            if loaded:
                if not await self.admitted.wait_idle(drain_timeout_s):
                    log.warning(
                        "model %s version %s: %d requests still in flight at unload",
                        self.name,
                        self.version,
                        self.admitted.inflight,
                    )
                if self.batcher is not None:
                    await self.batcher.close(drain=True)
                for worker in self.workers:
                    await asyncio.to_thread(worker.close)
        finally:
            self.model, self.workers, self.batcher, self.flow = None, [], None, None
        if loaded:
            log.info("model %s version %s unloaded", self.name, self.version)

    # -- requests --------------------------------------------------------------------------------

    def retry_after(self) -> float:
        return self.flow.retry_after() if self.flow is not None else 5.0

    @contextlib.asynccontextmanager
    async def admission(self, client: str, deadline: float | None = None) -> AsyncIterator[None]:
        """Holds one in-flight place for a segment request, or refuses it (``Admission.slot``)."""
        if self.state != "READY":
            raise ServiceError(
                503,
                "not_ready",
                f"model {self.name} version {self.version} is {self.state.lower()}",
                reason="not_ready",
                retry_after=5,
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
        assert self.flow is not None, "segment() on a version that is not loaded"
        return await self.flow.segment(data, params, deadline, disconnected, as_json)

    def describe(self) -> dict[str, Any]:
        """What /v1/models says about this version."""
        info: dict[str, Any] = {"version": self.version, "state": self.state}
        if self.error is not None:
            info["reason"] = self.error
        if self.model is not None:
            info.update(digest=self.digest, backend=self.model.backend, precision=self.model.precision)
            info["device"] = self.model.devices
        return info
