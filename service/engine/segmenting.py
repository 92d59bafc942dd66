"""One segment request through the loaded model: decode -> queue -> batch forward -> post-process.

``SegmentFlow`` is created once the model is loaded (``ServiceRuntime``); it knows nothing of HTTP
or of the service's lifecycle. It also keeps what admission needs to judge the work ahead: the
requests being decoded (they queue next) and the bytes the queued images hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from transfiner.model.inference.backend import BATCH_WIDE_OPTIONS
from transfiner.model.inference.preprocess import network_shape
from transfiner.service.engine.batcher import Batcher, BatcherClosed, DeadlineExceeded, Job, QueueFull
from transfiner.service.engine.host_memory import release_freed_memory
from transfiner.service.engine.loading import LoadedModel
from transfiner.service.engine.pipeline import NetworkImage, RequestOptions, network_image, records
from transfiner.service.engine.worker import InferenceResult, SegmentJob, WorkerError
from transfiner.service.errors import ServiceError, invalid_parameter
from transfiner.service.imaging import decode_image
from transfiner.service.metrics import ServiceMetrics
from transfiner.service.schemas import SegmentParams
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.tracing import NO_TRACING, Tracing, wall_ns

log = logging.getLogger("service")

# Decoded uploads from this size on give their freed memory back to the system at once.
LARGE_DECODE_BYTES = 64 * 1024 * 1024


class ByteBudget:
    """The bytes of queued images held by every model's requests together, against one limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0


@dataclass
class SegmentOutcome:
    """A finished request: what the route serialises."""

    image: NetworkImage
    instances: list[dict[str, Any]]
    instances_json: bytes | None  # the instances as JSON, when asked for (encoded off the loop)
    queue_s: float
    inference_s: float
    postprocess_s: float


class SegmentFlow:
    def __init__(
        self,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        model: LoadedModel,
        batcher: Batcher,
        decode_pool: Executor,
        post_pool: Executor,
        total_bytes: ByteBudget | None = None,
        tracing: Tracing = NO_TRACING,
        key: tuple[str, str] | None = None,
    ) -> None:
        """``key``: the model version served, as the repository names it (default: the model's
        own name and digest), for the stage spans."""
        self.settings = settings
        self.metrics = metrics
        self.model = model
        self.batcher = batcher
        self._decode_pool = decode_pool
        self._post_pool = post_pool
        self._queued_bytes = 0  # network-size pixels of this model's jobs not yet settled
        # All models' together (the service's max_queued_bytes; a model's own config may set less).
        self._total_bytes = total_bytes or ByteBudget(settings.max_queued_bytes)
        self.tracing = tracing
        name, version = key or (model.name, model.version)
        self._model_attributes = {
            "transfiner.model.name": name,
            "transfiner.model.version": version,
            "transfiner.model.backend": model.backend,
            "transfiner.model.precision": model.precision,
        }
        cfg = model.cfg
        self._class_index = {name: i for i, name in enumerate(cfg.class_names)}
        self._class_index.update({str(cid): i for i, cid in enumerate(cfg.category_ids)})

    # -- what admission needs --------------------------------------------------------------------

    def expected_wait(self) -> float | None:
        """Seconds until a request admitted now would be through the model (None before the
        first batch): the queue and the requests still being decoded (they queue first)."""
        if self.batcher.recent_batch_seconds() is None:
            return None
        return self.retry_after()

    def retry_after(self) -> float:
        return self.batcher.estimate_wait(self.batcher.depth + self.batcher.arriving_count)

    # -- the flow --------------------------------------------------------------------------------

    def _shares(self, options: RequestOptions) -> Hashable:
        """What this request's batch-mates must share: nothing on eager PyTorch, which applies
        options per image; on an exported graph, the threshold and cap it takes once per batch
        (a batch runs at its lowest threshold and largest cap: one ``score_threshold=0``
        request would make every batch-mate compute 100 refined masks)."""
        if self.model.backend not in BATCH_WIDE_OPTIONS:
            return None
        return options.score_threshold, None if options.classes is not None else options.max_detections

    def request_options(self, params: SegmentParams) -> RequestOptions:
        """Validates the parameters that depend on the model (class names and ids)."""
        classes = None
        if params.classes is not None:
            unknown = [c for c in params.classes if str(c) not in self._class_index]
            if unknown:
                raise invalid_parameter(f"unknown classes {unknown}: use category ids or names from /v1/models")
            classes = frozenset(self._class_index[str(c)] for c in params.classes)
        return RequestOptions(
            score_threshold=params.score_threshold,
            max_detections=params.max_detections,
            classes=classes,
            mask_threshold=params.mask_threshold,
            mask_format=params.mask_format,
            refine=params.refine,
        )

    async def segment(
        self,
        data: bytes,
        params: SegmentParams,
        deadline: float,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
        as_json: bool = False,
    ) -> SegmentOutcome:
        """Decodes, queues, waits for the batch, post-processes; raises ``ServiceError``.

        - ``disconnected`` returns when the client goes away (the job is then dropped);
          ``as_json`` also encodes the instances as JSON in the post-processing thread.
        - When the current span records (``Tracing.server_span``), the stages get child spans:
          ``decode``, ``queue``, ``forward`` and ``postprocess``."""
        options = self.request_options(params)
        loop = asyncio.get_running_loop()
        traced = self.tracing.recording()

        started = time.perf_counter()
        started_ns = time.time_ns() if traced else 0
        image = None
        try:
            with self.batcher.arriving():  # a filling batch may wait for it
                image = await loop.run_in_executor(self._decode_pool, self._decode, data)
        finally:
            if traced:  # also for an upload that does not decode
                self._record_decode(started_ns, len(data), image)
        self.metrics.decode_seconds.observe(time.perf_counter() - started)
        self.metrics.megapixels.observe(image.width * image.height / 1e6)
        if time.monotonic() >= deadline:
            raise _deadline_error("while decoding")

        total = self._total_bytes
        for held, budget, whose in (
            (self._queued_bytes, self.settings.max_queued_bytes, "this model's"),
            (total.held, total.limit, "all models'"),
        ):
            if held + image.nbytes > budget:
                raise ServiceError(
                    503,
                    "memory_budget",
                    f"{whose} queued images hold {held} bytes; this one "
                    f"({image.nbytes} bytes) would pass the budget of {budget}",
                    reason="memory_budget",
                    retry_after=self.retry_after(),
                )
        job = Job(SegmentJob(image, options), deadline=deadline, canvas=image.canvas, shares=self._shares(options))
        self._hold_bytes(job, image.nbytes)
        try:
            self.batcher.submit(job)
        except QueueFull as full:
            raise ServiceError(
                503, "queue_full", str(full), reason="queue_full", retry_after=full.retry_after
            ) from None
        except BatcherClosed:
            raise ServiceError(503, "shutting_down", "the service is shutting down", reason="draining") from None

        result = None
        try:
            result = await self._wait(job, deadline, disconnected)
        finally:
            if traced:  # also for a request that failed or timed out in the queue or the model
                self._record_batch_stages(job, result)
        queue_s = (job.dispatched_at or job.enqueued_at) - job.enqueued_at
        cfg = self.model.cfg

        def finish() -> tuple[list[dict[str, Any]], bytes | None]:
            instances = records(result.fetched, cfg, params.image_id)
            return instances, (dumps(instances) if as_json else None)

        started = time.perf_counter()
        started_ns = time.time_ns() if traced else 0
        instances, encoded = await loop.run_in_executor(self._post_pool, finish)
        post_s = time.perf_counter() - started
        if traced:
            self.tracing.record_stage(
                "postprocess", started_ns, time.time_ns(), {"transfiner.instances": len(instances)}
            )
        self.metrics.postprocess_seconds.observe(post_s)
        self.metrics.instances.observe(len(instances))
        return SegmentOutcome(image, instances, encoded, queue_s, result.preprocess_s + result.inference_s, post_s)

    def _record_decode(self, started_ns: int, nbytes: int, image: NetworkImage | None) -> None:
        attributes: dict[str, Any] = {"transfiner.image.bytes": nbytes}
        if image is not None:
            attributes.update({"transfiner.image.width": image.width, "transfiner.image.height": image.height})
        self.tracing.record_stage("decode", started_ns, time.time_ns(), attributes)

    def _record_batch_stages(self, job: Job, result: InferenceResult | None) -> None:
        """The ``queue`` span (submitted until its batch started) and the ``forward`` span (the
        batch it rode in, until its answer was back), from the times the batcher took."""
        now = time.monotonic()
        dispatched = job.dispatched_at
        self.tracing.record_stage("queue", wall_ns(job.enqueued_at), wall_ns(now if dispatched is None else dispatched))
        if dispatched is None:
            return
        attributes: dict[str, Any] = dict(self._model_attributes)
        devices = self.model.devices
        attributes["transfiner.device"] = devices[job.worker if job.worker is not None else 0]
        if result is not None:
            attributes["transfiner.batch.size"] = result.batch_size
            attributes["transfiner.preprocess_ms"] = round(result.preprocess_s * 1000, 3)
            attributes["transfiner.inference_ms"] = round(result.inference_s * 1000, 3)
        self.tracing.record_stage("forward", wall_ns(dispatched), wall_ns(now), attributes)

    def _hold_bytes(self, job: Job, nbytes: int) -> None:
        """Counts the image against ``max_queued_bytes`` until its job is settled (answered,
        failed, or cancelled because its client left or its deadline passed)."""
        self._queued_bytes += nbytes
        self._total_bytes.held += nbytes
        self.metrics.queued_bytes.set(self._queued_bytes)

        def release(_: asyncio.Future) -> None:
            self._queued_bytes -= nbytes
            self._total_bytes.held -= nbytes
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
        self,
        job: Job,
        deadline: float,
        disconnected: Callable[[], Awaitable[Any]] | None,
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
                raise ServiceError(500, "internal_error", error.public) from None
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
