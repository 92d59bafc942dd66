"""POST /v1/segment: one image in, COCO result records out."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response

from ..errors import ServiceError, invalid_parameter
from ..schemas import ErrorResponse, SegmentParams, SegmentResponse
from ..runtime import dumps
from ..security import client_key, require_api_key
from ..uploads import read_segment_request

router = APIRouter(tags=["segment"], dependencies=[Depends(require_api_key)])


def _openapi_extra() -> dict[str, Any]:
    """Documents the three body forms and the parameters, which the route parses itself
    (FastAPI cannot declare 'query or form field or JSON key' for one parameter)."""
    schema = SegmentParams.model_json_schema()
    params = [
        {"name": name, "in": "query", "required": False, "schema": prop, "description": prop.get("description", "")}
        for name, prop in schema["properties"].items()
    ]
    json_props = {"image": {"type": "string", "format": "byte", "description": "base64 or a data: URL"}}
    json_props.update(schema["properties"])
    return {
        "parameters": params,
        "requestBody": {"required": True, "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["image"],
                "properties": {"image": {"type": "string", "format": "binary"}, **schema["properties"]},
            }},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object", "required": ["image"], "properties": json_props}},
        }},
    }


ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "malformed request (no image; bad multipart, JSON or base64; huge int, deep nesting, lone surrogate)",
        401: "missing or wrong API key",
        413: "body or pixel count over the limit",
        415: "not a supported image (PNG, JPEG, GIF, WEBP, BMP, TIFF), decided from the bytes",
        422: "invalid parameters, or an image that does not decode",
        429: "too many requests in flight for this client (Retry-After)",
        503: "queue full, not ready or shutting down (Retry-After)",
        504: "the deadline (X-Request-Timeout or the default) passed",
    }.items()
}


def request_timeout(header: str | None, default: float, maximum: float) -> float:
    if header is None:
        return default
    try:
        seconds = float(header)
    except ValueError:
        raise invalid_parameter(f"X-Request-Timeout must be a number of seconds, got {header!r}") from None
    if not (math.isfinite(seconds) and 0 < seconds <= maximum):
        raise invalid_parameter(f"X-Request-Timeout must be in (0, {maximum}] seconds, got {header}")
    return seconds


async def _disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@router.post(
    "/v1/segment", response_model=SegmentResponse, responses=ERRORS, openapi_extra=_openapi_extra(),
    summary="Segment the instances of one image",
)
async def segment(
    request: Request,
    x_request_timeout: str | None = Header(None, description="deadline in seconds from arrival"),
) -> Response:
    arrived = time.monotonic()
    runtime = request.app.state.runtime
    settings = runtime.settings
    deadline = arrived + request_timeout(x_request_timeout, settings.request_timeout_s, settings.max_request_timeout_s)
    async with runtime.admission(client_key(request)):
        try:
            # A slow upload must not hold its in-flight slot past the deadline.
            data, params = await asyncio.wait_for(read_segment_request(request), deadline - time.monotonic())
        except asyncio.TimeoutError:
            raise ServiceError(
                504, "deadline_exceeded", "the request's deadline passed while its body was read", reason="deadline"
            ) from None
        outcome = await runtime.segment(
            data, params, deadline, disconnected=lambda: _disconnect(request), as_json=True
        )
    model = runtime.model
    image = {"width": outcome.image.width, "height": outcome.image.height, "image_id": params.image_id}
    timing = {
        "queue_ms": round(outcome.queue_s * 1000, 3),
        "inference_ms": round(outcome.inference_s * 1000, 3),
        "postprocess_ms": round(outcome.postprocess_s * 1000, 3),
        "total_ms": round((time.monotonic() - arrived) * 1000, 3),
    }
    # The instances (the bulk: RLE strings) were encoded in the post-processing thread; only the
    # small parts are encoded here, on the event loop.
    body = b"".join((
        b'{"image":', dumps(image),
        b',"model":', dumps({
            "name": model.name, "version": model.version, "backend": model.backend, "precision": model.precision,
        }),
        b',"instances":', outcome.instances_json,
        b',"timing":', dumps(timing), b"}",
    ))
    return Response(body, media_type="application/json")

