"""GET /v1/models: what is served, on what, with which batching."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from transfiner.service.errors import ServiceError
from transfiner.service.schemas import ErrorResponse, ModelsResponse
from transfiner.service.security import require_api_key

router = APIRouter(tags=["models"], dependencies=[Depends(require_api_key)])


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses={401: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def models(request: Request) -> dict:
    runtime = request.app.state.runtime
    model = runtime.model
    if model is None:
        raise ServiceError(503, "not_ready", f"the model is not loaded: {runtime.detail}", retry_after=5)
    cfg = model.cfg
    settings = runtime.settings
    return {
        "models": [
            {
                "name": model.name,
                "version": model.version,
                "backend": model.backend,
                "precision": model.precision,
                "device": model.devices,
                "ready": runtime.ready,
                "classes": [{"id": cid, "name": name} for cid, name in zip(cfg.category_ids, cfg.class_names)],
                "input": {"min_size": cfg.input.min_size_test, "max_size": cfg.input.max_size_test},
                "batching": {
                    "max_batch_size": settings.max_batch_size,
                    "max_delay_ms": settings.max_delay_ms,
                    "max_arrival_wait_ms": settings.max_arrival_wait_ms,
                    "max_batch_pixels": settings.max_batch_pixels,
                    "max_queue_size": settings.max_queue_size,
                    "workers": len(runtime.workers),
                    "worker_process": settings.worker_process,
                },
            }
        ]
    }
