"""GET /v1/models and /v1/models/{name}: what is served, which versions, on what, with which batching."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from transfiner.service.engine.manager import ManagedModel, version_order
from transfiner.service.errors import ServiceError
from transfiner.service.schemas import ErrorResponse, ModelCard, ModelsResponse

router = APIRouter(tags=["models"])  # behind the API key (``security.guarded``)


def model_card(model: ManagedModel, default: bool) -> dict[str, Any]:
    serving = model.newest_ready()
    versions = sorted(model.versions.values(), key=lambda v: version_order(v.version))
    card: dict[str, Any] = {
        "name": model.name,
        "default": default,
        "ready": serving is not None and serving.ready,
        "versions": [v.describe() for v in versions],
    }
    if serving is None or serving.model is None:
        return card | dict.fromkeys(("version", "backend", "precision", "device", "classes", "input", "batching"))
    loaded, settings, cfg = serving.model, serving.settings, serving.model.cfg
    return card | {
        "version": serving.version,
        "backend": loaded.backend,
        "precision": loaded.precision,
        "device": loaded.devices,
        "classes": [{"id": cid, "name": name} for cid, name in zip(cfg.category_ids, cfg.class_names)],
        "input": {"min_size": cfg.input.min_size_test, "max_size": cfg.input.max_size_test},
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_delay_ms": settings.max_delay_ms,
            "max_arrival_wait_ms": settings.max_arrival_wait_ms,
            "max_batch_pixels": settings.max_batch_pixels,
            "max_queue_size": settings.max_queue_size,
            "workers": len(serving.workers),
            "worker_process": settings.worker_process,
        },
    }


def _not_started(runtime) -> None:
    if runtime.state in ("starting", "failed"):
        raise ServiceError(503, "not_ready", f"the models are not loaded: {runtime.detail}", retry_after=5)


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    responses={503: {"model": ErrorResponse}},
)
async def models(request: Request) -> dict:
    runtime = request.app.state.runtime
    _not_started(runtime)
    manager = runtime.models
    return {"models": [model_card(m, name == manager.default_name) for name, m in sorted(manager.models.items())]}


@router.get(
    "/v1/models/{name}",
    response_model=ModelCard,
    responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def model(name: str, request: Request) -> dict:
    runtime = request.app.state.runtime
    _not_started(runtime)
    manager = runtime.models
    found = manager.models.get(name)
    if found is None:
        raise ServiceError(
            404,
            "model_not_found",
            f"no model {name!r} (models: {', '.join(sorted(manager.models)) or 'none'})",
            reason="unknown_model",
        )
    return model_card(found, name == manager.default_name)
