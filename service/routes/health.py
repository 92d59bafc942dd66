"""Liveness, readiness and the Prometheus endpoint (all without an API key, for probes/scrapers)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from transfiner.service.schemas import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health/live", response_model=HealthResponse, response_model_exclude_none=True)
async def live() -> dict:
    """200 while the process serves HTTP, whatever the model is doing."""
    return {"status": "alive"}


@router.get(
    "/health/ready",
    response_model=HealthResponse,
    responses={503: {"model": HealthResponse, "description": "loading, warming up, draining or failed"}},
)
async def ready(request: Request) -> JSONResponse:
    """200 once every model that must serve is loaded and warm; 503 before that, while draining,
    while a worker process that exited is started again, and while a model that served has no
    version ready."""
    runtime = request.app.state.runtime
    if runtime.ready:
        return JSONResponse({"status": "ready"})
    if runtime.state == "ready":
        detail = "; ".join(runtime.not_ready())
        status = "restarting" if "starting again" in detail else "unavailable"
        return JSONResponse({"status": status, "detail": detail}, status_code=503)
    return JSONResponse({"status": runtime.state, "detail": runtime.detail}, status_code=503)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
