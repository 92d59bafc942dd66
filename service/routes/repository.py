"""The repository extension (Triton's shapes): the index of model versions, and load/unload on demand."""

from __future__ import annotations

from fastapi import APIRouter, Request

from transfiner.service.schemas import ErrorResponse, IndexEntry

router = APIRouter(tags=["repository"])  # behind the API key (``security.guarded``)
ERRORS = {404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


@router.get(
    "/v1/repository/index",
    response_model=list[IndexEntry],
    response_model_exclude_none=True,
)
async def index(request: Request) -> list[dict]:
    """Every model version on record: LOADING, READY, UNLOADING or UNAVAILABLE (with the reason)."""
    return request.app.state.runtime.models.index()


@router.post(
    "/v1/repository/models/{name}/load",
    response_model=list[IndexEntry],
    response_model_exclude_none=True,
    responses={**ERRORS, 400: {"model": ErrorResponse, "description": "no version of the model could be loaded"}},
)
async def load(name: str, request: Request) -> list[dict]:
    """Loads the model from the repository (its new versions, by its version policy) and answers
    once they are READY or have failed; its rows of the index."""
    manager = request.app.state.runtime.models
    await manager.load(name)
    return [row for row in manager.index() if row["name"] == name]


@router.post(
    "/v1/repository/models/{name}/unload",
    response_model=list[IndexEntry],
    response_model_exclude_none=True,
    responses=ERRORS,
)
async def unload(name: str, request: Request) -> list[dict]:
    """Unloads every version of the model once the requests they admitted are answered; later
    requests for it get 404 until it is loaded again."""
    manager = request.app.state.runtime.models
    await manager.unload(name)
    return [row for row in manager.index() if row["name"] == name]
