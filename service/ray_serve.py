"""The service as a Ray Serve application: ``transfiner serve --engine ray``.

- Each Ray Serve replica runs the very app ``transfiner serve`` runs (``create_app``: the same
  routes, request parsing, parameters, error model, JSON, metrics and health routes) around its own
  copy of the model. Only the batching engine differs: instead of the service's asyncio ``Batcher``,
  requests are batched by Ray Serve's ``@serve.batch`` (``RayServeBatcher``), and Ray places the
  replicas (CPU, whole or fractional GPUs) on the cluster's nodes, routes HTTP to them from the
  proxy on every node, replaces replicas that die, and scales their number between a minimum and a
  maximum on load (Serve autoscaling on ongoing requests per replica).
- Ray is an optional dependency (``pip install 'transfiner[ray]'``); nothing else imports this
  module, so the FastAPI engine runs without it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from transfiner.service.app import create_app
from transfiner.service.engine.batcher import (
    BatcherClosed,
    BatchObserver,
    BatchRunner,
    BatchTimes,
    DeadlineExceeded,
    Job,
    batch_capacity,
)
from transfiner.service.engine.loading import max_batch_size_for
from transfiner.service.repository.layout import scan_repository
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.logs import configure_logging

log = logging.getLogger("service")

APP_NAME = "transfiner"
DEPLOYMENT_NAME = "transfiner"
# Which replica (and Ray node) answered, on every response: for operators following a request
# through the cluster, and for the multi-node test. Opaque Ray ids, nothing about the host.
REPLICA_HEADER = "x-transfiner-replica"
# How many recent batch times admission and the deadline checks judge by (their 90th percentile,
# ``BatchTimes``): fewer than the FastAPI engine's 32. Under Ray every request, refused ones too,
# costs the proxy's work and its body's passage between processes on the model's cores, so batch
# times rise with the arrival rate; a short history follows them within a few batches.
BATCH_HISTORY = 8


class RayServeBatcher:
    """What ``ServiceRuntime`` needs of a batcher (``submit``, ``start``, ``close``,
    ``estimate_wait``, ``arriving``), on Ray Serve's own batching.

    - ``@serve.batch`` collects the replica's requests (up to ``max_batch_size``, waiting at most
      ``max_delay_s`` for batch-mates) and reports Ray's batch metrics (``ray_serve_batch_*``).
    - Serve forms a batch from whatever is in its queue as soon as its previous batch is formed,
      not when a worker is free: under load it would fix many small batches early, each then
      waiting its turn, and throughput (which a full batch buys) would fall below what admission
      counts on. So jobs wait here, in arrival order, and go to Serve only when they can start at
      once: a batch's worth for each free worker (the oldest job's canvas and ``Job.shares``
      first, as ``Batcher``), so under load Serve's batches leave full, as the FastAPI engine's.
    - A Ray batch may still mix canvases (padded input sizes), which a forward pass must not (a
      request's answer would depend on its batch-mates' padding), so each Ray batch runs as one
      forward pass per canvas and ``Job.shares`` (more where ``max_batch_pixels`` says so), in
      arrival order, on the service's own ``Worker`` (the same pre-processing and forward pass as
      the FastAPI engine).
    - Jobs whose client left, or whose deadline would pass before their batch is done (by the
      recent batch times), never reach the model, as in ``Batcher``.
    """

    def __init__(
        self,
        runners: Sequence[BatchRunner],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_batch_pixels: int | None = None,
        observer: BatchObserver | None = None,
        history: int = BATCH_HISTORY,
    ) -> None:
        if not runners:
            raise ValueError("a batcher needs at least one runner")
        self.runners = list(runners)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_batch_pixels = max_batch_pixels
        self.observer = observer
        self._idle: asyncio.Queue[BatchRunner] = asyncio.Queue()
        for runner in self.runners:
            self._idle.put_nowait(runner)
        self._closed = False
        self._pending: collections.deque[Job] = collections.deque()  # not yet handed to Serve
        self._in_serve = 0  # handed to Serve, their batch not started yet
        self._arriving = 0
        self._tasks: set[asyncio.Task] = set()
        self.batch_times = BatchTimes(history)

        # A closure, not a method: Serve keeps one queue per decorated function, so a method
        # would share its queue between instances of this class.
        async def transfiner_batch(jobs: list[Job]) -> list[None]:
            await self._run(jobs)
            return [None] * len(jobs)

        # One batch per worker at a time (a replica has one worker: Ray scales replicas).
        self._batched = serve.batch(
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=max_delay_s,
            max_concurrent_batches=len(self.runners),
        )(transfiner_batch)

    @property
    def depth(self) -> int:
        return len(self._pending) + self._in_serve

    @property
    def arriving_count(self) -> int:
        return self._arriving

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Counts a request being decoded (for ``estimate_wait``'s callers); Serve's batch
        window is its own, so nothing waits for it here."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def recent_batch_seconds(self) -> float | None:
        return self.batch_times.recent()

    def estimate_wait(self, waiting: int | None = None) -> float:
        """As ``Batcher.estimate_wait`` (``BatchTimes.wait``): true of this engine too, since
        its batches under load are full ones."""
        waiting = self.depth if waiting is None else waiting
        busy = len(self.runners) - self._idle.qsize()
        return self.batch_times.wait(
            waiting,
            self.max_batch_size * len(self.runners),
            running=busy > 0,
            fallback=self.max_delay_s + 1.0,
        )

    def start(self) -> None:
        """Nothing to start: Serve's batch loop starts with the first request."""

    def submit(self, job: Job) -> None:
        """Queues ``job``; its future settles when its batch has run. The replica's admission
        (``max_ongoing_requests``, the runtime's capacity and the deadline check) bounds how many
        wait, so there is no queue limit here."""
        if self._closed:
            raise BatcherClosed("the service is shutting down")
        self._pending.append(job)
        # A job settled while it waits here (its client left, its handler gave up at the
        # deadline) leaves the queue, and the depth gauge, at once.
        job.future.add_done_callback(lambda _: self._discard(job))
        self._feed()
        self._report_depth()

    async def close(self, drain: bool = True) -> None:
        """Stops accepting jobs; with ``drain`` the submitted ones still run, else they fail."""
        self._closed = True
        if not drain:
            while self._pending:
                job = self._pending.popleft()
                if not job.future.done():
                    job.future.set_exception(BatcherClosed("the service is shutting down"))
            for task in list(self._tasks):
                task.cancel()
        # A finishing batch hands the next jobs to Serve before its task ends.
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _discard(self, job: Job) -> None:
        if job in self._pending:  # by identity (eq=False)
            self._pending.remove(job)
            self._report_depth()

    def _feed(self) -> None:
        """Hands Serve what can start at once: for each free worker a batch's worth of the
        oldest live job's group (canvas and shares), in arrival order. The rest waits here, so
        that a batch formed when a worker frees up takes all it can hold."""
        room = self.max_batch_size * self._idle.qsize() - self._in_serve
        if room <= 0 or not self._pending:
            return
        now = time.monotonic()
        self._pending = collections.deque(job for job in self._pending if self._alive(job, now))
        while room > 0 and self._pending:
            group = self._pending[0].group
            capacity = batch_capacity(group[0], self.max_batch_size, self.max_batch_pixels)
            batch = [job for job in self._pending if job.group == group][: min(capacity, room)]
            taken = set(map(id, batch))
            self._pending = collections.deque(job for job in self._pending if id(job) not in taken)
            for job in batch:
                self._hand_over(job)
            # A whole batch's room for each group: Serve's batch of another canvas would run as
            # a forward pass of its own anyway.
            room -= self.max_batch_size

    def _hand_over(self, job: Job) -> None:
        self._in_serve += 1
        task = asyncio.ensure_future(self._batched(job))
        self._tasks.add(task)

        def settled(done: asyncio.Task) -> None:
            self._tasks.discard(done)
            error = None if done.cancelled() else done.exception()
            if not job.future.done():
                job.future.set_exception(error or BatcherClosed("the batch was cancelled"))

        task.add_done_callback(settled)

    def _alive(self, job: Job, now: float) -> bool:
        """False for a job whose future is settled, or whose deadline will have passed before a
        batch started now is done (the recent batch times); such a job is failed here with
        ``DeadlineExceeded``, as ``Batcher`` does, instead of spending the model on an answer
        that nobody will read."""
        if job.future.done():
            return False
        if job.deadline <= now + (self.recent_batch_seconds() or 0.0):
            job.future.set_exception(DeadlineExceeded("the request's deadline would pass before its batch is done"))
            return False
        return True

    async def _run(self, jobs: list[Job]) -> None:
        self._in_serve -= len(jobs)
        self._report_depth()
        by_group: dict[tuple, list[Job]] = {}
        for job in jobs:
            by_group.setdefault(job.group, []).append(job)
        # Serve caps a batch by its count only: a canvas's jobs then run in batches that also
        # keep to max_batch_pixels, as the FastAPI engine's.
        groups = [
            jobs[start : start + size]
            for (canvas, _), jobs in by_group.items()
            for size in [batch_capacity(canvas, self.max_batch_size, self.max_batch_pixels)]
            for start in range(0, len(jobs), size)
        ]
        runner = await self._idle.get()
        try:
            for group in groups:
                started = time.monotonic()
                # Judged when the forward pass starts: an earlier pass of this Ray batch may
                # have taken the time a job had left.
                group = [job for job in group if self._alive(job, started)]
                if not group:
                    continue
                for job in group:
                    job.dispatched_at = started
                if self.observer is not None:
                    self.observer.batch(group)
                try:
                    await runner.run(group)
                except Exception as error:  # noqa: BLE001 - answered per request (500), the replica goes on
                    log.exception("batch of %d failed", len(group))
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(error)
                finally:
                    self.batch_times.record(time.monotonic() - started)
        finally:
            self._idle.put_nowait(runner)
            self._feed()
            self._report_depth()

    def _report_depth(self) -> None:
        if self.observer is not None:
            self.observer.queue_depth(self.depth)


class ReplicaHeaderMiddleware:
    """Adds ``x-transfiner-replica: <replica id>; node=<Ray node id>`` to every response."""

    def __init__(self, app: ASGIApp, value: str) -> None:
        self.app = app
        self.value = value.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, send_with_header)


def replica_settings(settings: ServiceSettings, gpus: float) -> ServiceSettings:
    """A replica's settings: one model worker (Ray scales replicas, not workers in one), on the
    GPU Ray assigned it (Ray sets CUDA_VISIBLE_DEVICES, so it is always cuda:0) or on the CPU,
    in the replica's own process (Ray owns the replica processes; a worker process spawned from
    one would escape Ray's placement and restarts)."""
    device = "cuda" if gpus > 0 else ("cpu" if settings.device == "auto" else settings.device)
    max_batch_size = max_batch_size_for(settings.max_batch_size, device, 1)
    return settings.model_copy(
        update={
            "workers": 1,
            "device": device,
            "worker_process": False,
            "max_batch_size": max_batch_size,
        }
    )


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class TransfinerReplica:
    """One replica: the service app on one copy of the model, batching with ``RayServeBatcher``."""

    async def __init__(self, settings: ServiceSettings, gpus: float = 0.0) -> None:
        configure_logging(settings.log_format, settings.log_level)

        def batcher(
            version: ServiceSettings, workers: Sequence[BatchRunner], observer: BatchObserver
        ) -> RayServeBatcher:
            return RayServeBatcher(
                workers,
                max_batch_size=version.max_batch_size,
                max_delay_s=version.max_delay_ms / 1000,
                max_batch_pixels=version.max_batch_pixels,
                observer=observer,
            )

        # Not ``self.app``: the ingress wrapper owns that name (the ASGI app it serves). Every
        # model version of the repository runs as this replica runs (a model's config.yaml may
        # not give it workers or processes of its own here). Its tracer provider is its own,
        # from the OTEL_* variables the driver passed on (``otel_environment``), shut down with it.
        self.service_app = create_app(
            settings, batcher_factory=batcher, settings_for=lambda version: replica_settings(version, gpus)
        )
        context = serve.get_replica_context()
        node = ray.get_runtime_context().get_node_id()
        self.service_app.add_middleware(ReplicaHeaderMiddleware, value=f"{context.replica_id.unique_id}; node={node}")
        self.runtime = self.service_app.state.runtime
        # Load and warm up here, so Ray routes nothing to this replica (and counts it as starting,
        # not running) until the model answers; the app's lifespan start then finds it done.
        await self.runtime.start()
        if self.runtime.state != "ready":
            raise RuntimeError(f"replica not ready: {self.runtime.detail}")

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return self.service_app

    async def check_health(self) -> None:
        """Ray's periodic health check: a replica whose model failed is replaced."""
        if self.runtime.state in ("failed", "stopped"):
            raise RuntimeError(f"replica unhealthy: {self.runtime.state}: {self.runtime.detail}")


@dataclasses.dataclass(frozen=True)
class Scaling:
    """Fixed ``replicas``, or autoscaling between ``min_replicas`` and ``max_replicas``."""

    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    # Autoscaling keeps about this many requests in flight per replica (default: a full batch).
    target_ongoing_requests: float | None = None
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 300.0

    def __post_init__(self) -> None:
        autoscale = self.min_replicas is not None or self.max_replicas is not None
        if autoscale and self.replicas is not None:
            raise ValueError("give either --replicas or --min-replicas/--max-replicas, not both")
        if autoscale:
            low, high = self.min_replicas, self.max_replicas
            if low is None or high is None:
                raise ValueError("autoscaling needs both --min-replicas and --max-replicas")
            if not (0 <= low <= high and high >= 1):
                raise ValueError(
                    f"need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, got {low}, {high}"
                )
        elif self.replicas is None or self.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {self.replicas}")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise ValueError("--replica-cpus and --replica-gpus must not be negative")

    @property
    def autoscaling(self) -> bool:
        return self.replicas is None


def otel_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The driver's ``OTEL_*`` variables, for the replicas' ``runtime_env``: a replica on another
    node does not inherit the driver's environment, and traces there are configured by them."""
    environ = dict(os.environ) if environ is None else environ
    return {name: value for name, value in environ.items() if name.startswith("OTEL_")}


def build_application(settings: ServiceSettings, scaling: Scaling) -> serve.Application:
    """The Ray Serve application ``transfiner serve --engine ray`` deploys."""
    replica = replica_settings(settings, scaling.replica_gpus)
    # The replica's own admission answers overflow with the service's JSON 503 (queue_full,
    # Retry-After); one more than it admits keeps Ray from queueing those requests in its proxy
    # instead. Also far above max_batch_size, which Serve's batches could not otherwise reach.
    # Each model of a repository admits as much (the models found now; one more may come).
    models = len(scan_repository(settings.model_repository)) + 1 if settings.model_repository else 1
    capacity = (replica.max_queue_size + replica.max_batch_size) * models
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": scaling.replica_cpus, "num_gpus": scaling.replica_gpus},
        "max_ongoing_requests": capacity + 1,
        # Ray waits this long for a stopping replica's requests before killing it; the app's own
        # drain (lifespan shutdown) then finds it idle.
        "graceful_shutdown_timeout_s": max(1.0, settings.drain_timeout_s),
        "health_check_period_s": 5.0,
    }
    if scaling.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(1, scaling.min_replicas or 0),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests or float(replica.max_batch_size),
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
        }
    else:
        options["num_replicas"] = scaling.replicas
    otel = otel_environment()
    if otel:
        options["ray_actor_options"]["runtime_env"] = {"env_vars": otel}
    return TransfinerReplica.options(**options).bind(replica, scaling.replica_gpus)


def serve_on_ray(
    settings: ServiceSettings,
    scaling: Scaling,
    address: str = "local",
    metrics_export_port: int | None = None,
) -> int:
    """Deploys the application on a Ray cluster (``address``; ``local`` starts one on this
    machine), serves until SIGTERM/SIGINT, then deletes it (replicas drain) and leaves the cluster
    as it found it: Serve (its controller and proxies) is shut down again if this call started it."""
    from ray.serve.context import _get_global_client

    configure_logging(settings.log_format, settings.log_level)
    if settings.port == 0:
        raise ValueError("--engine ray needs a fixed --port: every node's Ray proxy listens on it")
    init_args: dict[str, Any] = {"logging_level": settings.log_level.upper(), "log_to_driver": False}
    if address == "local":
        if metrics_export_port is not None:
            init_args["_metrics_export_port"] = metrics_export_port
        # "local" always starts a new instance; without an address Ray joins the cluster that
        # /tmp/ray last recorded, which may be another user's (or in another network namespace).
        ray.init(address="local", **init_args)
    else:
        ray.init(address=address, **init_args)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # Serve's HTTP options are fixed while it runs: on a cluster that already serves, ours
        # would be silently ignored (Ray only logs it), so say so instead.
        running = _get_global_client(raise_if_no_controller_running=False)
        if running is not None:
            http = running.http_config
            if (http.host, http.port) != (settings.host, settings.port):
                print(
                    f"error: Ray Serve already runs on this cluster with its proxies on {http.host}:{http.port}; "
                    f"serve there (--host {http.host} --port {http.port}) or shut it down first "
                    "(`serve shutdown`)",
                    file=sys.stderr,
                )
                return 2
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            try:
                serve.run(build_application(settings, scaling), name=APP_NAME, route_prefix="/", blocking=False)
            except RuntimeError as error:  # Serve gave up on the replicas; the reason is in their logs
                print(
                    f"error: Ray Serve could not deploy the application: {error} (replica logs: logs/serve/ in "
                    "the Ray session folder, /tmp/ray/session_latest by default)",
                    file=sys.stderr,
                )
                return 1
            how = (
                f"{scaling.replicas} replicas"
                if not scaling.autoscaling
                else f"{scaling.min_replicas}-{scaling.max_replicas} replicas (autoscaling)"
            )
            log.info("ready on Ray: http://%s:%d (%s)", settings.host, settings.port, how)
            stop.wait()
            log.info("signal received: deleting the application (its replicas drain)")
            serve.delete(APP_NAME)
        finally:
            if running is None:
                serve.shutdown()
    finally:
        ray.shutdown()
    return 0
