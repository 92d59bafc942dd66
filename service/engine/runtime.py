"""The running service, independent of HTTP: its lifecycle (loading the models, readiness,
draining, shutdown) around the ``ModelManager`` that holds the models and their versions.

One ``ServiceRuntime`` lives in ``app.state.runtime``; routes only parse requests and call it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch

from transfiner.service.engine.host_memory import keep_freed_memory_for_reuse
from transfiner.service.engine.loading import resolved_settings, workers_on_gpu
from transfiner.service.engine.manager import ModelManager
from transfiner.service.engine.model_version import BatcherFactory, ModelLoader, ModelVersion, load_model
from transfiner.service.errors import ServiceError
from transfiner.service.metrics import ServiceMetrics
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.tracing import NO_TRACING, Tracing

log = logging.getLogger("service")

__all__ = ["BatcherFactory", "ModelLoader", "ServiceRuntime", "keeps_freed_memory", "load_model"]


def keeps_freed_memory(settings: ServiceSettings) -> bool:
    """``keep_freed_memory`` as set; by default when no model runs on the CPU in this process.

    Then its large buffers are the uploads', image-sized and renewed every request, and kept they
    save each request its page faults (docs/gpu-performance.md). A CPU model's own allocations
    kept 100-160 MB more for no measured gain, so a CPU worker thread leaves glibc as it is."""
    if settings.keep_freed_memory is not None:
        return settings.keep_freed_memory
    return bool(settings.worker_process) or workers_on_gpu(settings.device, settings.workers)


class ServiceRuntime:
    """States: starting -> ready -> draining -> stopped (or failed, when ``--model`` cannot load).

    With a model repository the service stays up whatever its models do: a model that cannot
    load is an error in the index, and readiness waits only for the models that must serve
    (``ModelManager.ready``)."""

    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics | None = None,
        loader: ModelLoader = load_model,
        batcher_factory: BatcherFactory | None = None,
        settings_for=resolved_settings,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self.settings = settings_for(settings)  # the service's own, as /v1/models reports them
        self.tracing = tracing  # the app's: its transports open the server spans, the flows add stages
        self.metrics = metrics or ServiceMetrics()
        self.state = "starting"
        self.detail: str | None = "loading the models"
        self._decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="transfiner-decode")
        self._post_pool = ThreadPoolExecutor(settings.postprocess_threads, thread_name_prefix="transfiner-post")
        # Each version resolves its own settings (its config.yaml may put it on another device).
        self.models = ModelManager(
            settings,
            self.metrics,
            (self._decode_pool, self._post_pool),
            loader,
            batcher_factory,
            settings_for,
            tracing=tracing,
        )
        self._start_task: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.models.ready

    def not_ready(self) -> list[str]:
        """Why readiness is 503 while the service runs (``ModelManager.not_ready``)."""
        return self.models.not_ready()

    def start(self) -> asyncio.Task:
        """Loads the models and warms them up in the background; readiness turns 200 when done."""
        if self._start_task is None:
            self._start_task = asyncio.create_task(self._start(), name="transfiner-start")
        return self._start_task

    async def _start(self) -> None:
        settings = self.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        if keeps_freed_memory(settings):
            keep_freed_memory_for_reuse()
        try:
            await self.models.start()
        except Exception as error:  # noqa: BLE001 - reported by readiness and the log, not raised
            self.state, self.detail = "failed", f"the models could not be loaded: {type(error).__name__}: {error}"
            log.exception("the models could not be loaded")
            return
        if self.models.root is None and self.models.models["default"].newest_ready() is None:
            # One --model that cannot load: the server can never answer, so it says why and exits.
            reason = self.models.index()[0].get("reason", "unknown")
            self.state, self.detail = "failed", f"model failed to load: {reason}"
            return
        self.metrics.enable_gpu_metrics(allocator=not any(v.settings.worker_process for v in self.models.loaded()))
        if self.state == "starting":  # a SIGTERM during start-up wins
            self.state, self.detail = "ready", None
            self.metrics.ready.set(1)
            log.info("ready: %d model version(s) loaded", len(self.models.loaded()))

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
        timeout = self.settings.drain_timeout_s
        versions = self.models.all_versions()
        idle = await asyncio.gather(*(v.admitted.wait_idle(timeout) for v in versions))
        if not all(idle):
            log.warning("drain timeout: %d requests still in flight", sum(v.admitted.inflight for v in versions))
        left = self.settings.shutdown_grace_s - (time.monotonic() - started)
        if left > 0:
            await asyncio.sleep(left)

    def skip_drain(self) -> None:
        """Stops waiting for in-flight work (a second SIGTERM); queued jobs still get answers."""
        if self._drain_task is not None:
            self._drain_task.cancel()

    async def stop(self) -> None:
        """Drains (if not done yet), then unloads every model and stops the thread pools."""
        with contextlib.suppress(asyncio.CancelledError):
            await self.begin_drain()
        if self._start_task is not None and not self._start_task.done():
            self._start_task.cancel()
            with contextlib.suppress(BaseException):
                await self._start_task
        await self.models.close()
        self._decode_pool.shutdown(wait=True)
        self._post_pool.shutdown(wait=True)
        self.state = "stopped"

    # -- requests --------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admission(
        self, client: str, deadline: float | None = None, model: str | None = None, version: str | None = None
    ) -> AsyncIterator[ModelVersion]:
        """The model version that answers a segment request, with one in-flight place held in
        it; refused with 503 while the service is not ready or draining, 404 for an unknown model
        or version, else ``Admission.slot``'s refusals."""
        if self.state != "ready":
            if self.state == "draining":
                raise ServiceError(
                    503, "shutting_down", "the service is shutting down", reason="draining", retry_after=5
                )
            raise ServiceError(
                503, "not_ready", f"the service is not ready: {self.detail}", reason="not_ready", retry_after=5
            )
        async with self.models.admission(model, version, client, deadline) as found:
            yield found
