"""The FastAPI application factory: ``create_app(settings)``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib.metadata import version as package_version

from fastapi import FastAPI

from transfiner.service.engine.loading import resolved_settings
from transfiner.service.engine.runtime import BatcherFactory, ModelLoader, ServiceRuntime, load_model
from transfiner.service.errors import COMMON_ERRORS, install_error_handlers
from transfiner.service.metrics import ServiceMetrics
from transfiner.service.middleware import BodyLimitMiddleware, HeadAsGetMiddleware, MetricsMiddleware
from transfiner.service.oip.errors import OipError
from transfiner.service.routes import demo, health, models, repository, segment, v2
from transfiner.service.security import guarded
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.middleware import RequestTelemetryMiddleware
from transfiner.service.telemetry.tracing import Tracing, tracer_provider_from_env

DESCRIPTION = """\
Mask Transfiner instance segmentation. `POST /v1/segment` takes one image (multipart field
`image`, a raw `image/*` body, or base64 in JSON) and returns COCO result records (compressed
RLE by default) that `pycocotools.COCO.loadRes` accepts as they are; `/v1/models/{name}/segment`
and `/v1/models/{name}/versions/{version}/segment` do the same with a model (version) of the
repository. Parameters go in the query, the body, or both (then the body's value is used).
Errors are `{"error": {"code", "message"}}`. The same models answer the Open Inference
Protocol (KServe v2, as Triton's clients speak it) under `/v2`, whose errors are `{"error": "<message>"}`.
"""


def create_app(
    settings: ServiceSettings | None = None,
    *,
    loader: ModelLoader = load_model,
    batcher_factory: BatcherFactory | None = None,
    settings_for=resolved_settings,
    tracer_provider=None,
) -> FastAPI:
    """A new, independent service (its own metrics registry, runtime and thread pools).

    - The models load in the background once the server starts: liveness answers at once,
      readiness turns 200 after their warm-up batches.
    - ``settings_for``: each model version's settings as they run (the Ray engine's replicas
      run one in-process worker each).
    - ``tracer_provider``: where the traces go (an OpenTelemetry SDK ``TracerProvider``; the
      caller's to shut down); by default one from the ``OTEL_*`` variables, or none (tracing off),
      which the app shuts down with itself.
    """
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    if tracer_provider is None:
        tracing = Tracing(tracer_provider_from_env(), owned=True)
    else:
        tracing = Tracing(tracer_provider)
    runtime = ServiceRuntime(settings, metrics, loader, batcher_factory, settings_for, tracing=tracing)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            await runtime.stop()
            await asyncio.to_thread(tracing.shutdown)  # the last spans are exported (or given up) here

    app = FastAPI(
        title="Mask Transfiner service",
        version=package_version("transfiner"),
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=COMMON_ERRORS,  # documented on every operation; a route's own entries take precedence
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = runtime
    install_error_handlers(app)
    app.add_exception_handler(OipError, v2.oip_error)
    guard = guarded(settings)
    app.include_router(segment.router, **guard)
    app.include_router(models.router, **guard)
    app.include_router(repository.router, **guard)
    app.include_router(health.router)
    app.include_router(v2.router, **guarded(settings, v2.UNAUTHORIZED))
    app.include_router(v2.open_router)
    if settings.demo:
        app.include_router(demo.router)
    app.add_middleware(HeadAsGetMiddleware)  # innermost: the metrics still see a HEAD
    # Added last = outermost: the metrics middleware also counts the limit's early 413s.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        max_total_bytes=settings.max_body_bytes_total,
        metrics=metrics,
    )
    known = frozenset(
        route.path
        for router in (segment.router, models.router, repository.router, health.router, v2.router, v2.open_router)
        for route in router.routes
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, known_paths=known)
    # Outermost: the request's span and id cover everything, early refusals included.
    app.add_middleware(
        RequestTelemetryMiddleware,
        tracing=tracing,
        log_requests=settings.log_format == "json",
        untraced=frozenset({"/health/live", "/health/ready", "/metrics"}),
    )
    return app
