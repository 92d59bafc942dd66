"""POST /v1/segment: one image in, COCO result records out."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response

from transfiner.service.engine.segmenting import dumps
from transfiner.service.errors import ServiceError, invalid_parameter
from transfiner.service.schemas import BASE64_IMAGE_PATTERN, ErrorResponse, SegmentParams, SegmentResponse
from transfiner.service.security import client_key
from transfiner.service.settings import ServiceSettings
from transfiner.service.telemetry.middleware import request_facts
from transfiner.service.uploads import read_segment_request

router = APIRouter(tags=["segment"])  # behind the API key (``security.guarded``)
_DEFAULT_MAX_TIMEOUT = ServiceSettings.model_fields["max_request_timeout_s"].default
_MIN_DOCUMENTED_TIMEOUT = 1.0
T = TypeVar("T")


# The deadline header, as /openapi.json documents it (the protocol's routes take it too).
TIMEOUT_HEADER = {
    "name": "X-Request-Timeout",
    "in": "header",
    "required": False,
    "schema": {"type": "number", "minimum": _MIN_DOCUMENTED_TIMEOUT, "maximum": _DEFAULT_MAX_TIMEOUT},
    "description": f"deadline in seconds from arrival, {_MIN_DOCUMENTED_TIMEOUT:g} to max_request_timeout_s "
    f"({_DEFAULT_MAX_TIMEOUT:g} by default); past it 504. Shorter positive values are accepted but may "
    "expire before any answer (504), or be refused when the queue ahead is longer (503)",
}


PRECEDENCE = "given both in the query and in the body, the body's value is used"


def without_null(prop: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema where null cannot be sent (a query, a form field, a protocol
    parameter; leaving the parameter out can): the null alternative and a null default go."""
    alternatives = [option for option in prop.get("anyOf", []) if option != {"type": "null"}]
    if len(alternatives) == len(prop.get("anyOf", [])):
        return prop
    rest = {key: value for key, value in prop.items() if key != "anyOf" and not (key == "default" and value is None)}
    return {**rest, **(alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives})}


def _openapi_extra(path: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Documents the three body forms and the parameters, which the route parses itself
    (FastAPI cannot declare 'query or form field or JSON key' for one parameter); ``path``: the
    route's path parameters (this list replaces the one FastAPI would make)."""
    schema = SegmentParams.model_json_schema()
    as_text = {name: without_null(prop) for name, prop in schema["properties"].items()}
    params = [*(path or ())]
    params += [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": prop,
            "description": f"{prop['description']}; {PRECEDENCE}" if "description" in prop else PRECEDENCE,
        }
        for name, prop in as_text.items()
    ]
    # Parsed by the route (its upper bound is a setting); declared here with the default bound.
    # The documented minimum is the useful range: any positive value is accepted, but one shorter
    # than a request can take answers 504 (or 503), which a client reading the document should
    # not have to expect for a well-formed request.
    params.append(TIMEOUT_HEADER)
    # An image of no bytes is refused (400), so every form declares at least one.
    upload = {"type": "string", "format": "binary", "minLength": 1}
    base64_image = {
        "type": "string",
        "minLength": 4,
        "pattern": BASE64_IMAGE_PATTERN,
        "description": "the image as padded base64 (blanks and line breaks allowed) or a data: URL "
        "(data:image/png;base64,...)",
    }
    # Unknown fields are refused (422), as unknown query parameters are.
    return {
        "parameters": params,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": upload, **as_text},
                        "additionalProperties": False,
                    }
                },
                "image/*": {"schema": upload},
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {"image": base64_image, **schema["properties"]},
                        "additionalProperties": False,
                    }
                },
            },
        },
    }


# The header that 429s and 503s carry, as the document declares it (here and on /v2).
RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
}
_HEADERS = {
    429: RETRY_AFTER,
    503: RETRY_AFTER,
}
ERRORS = {
    status: {
        "model": ErrorResponse,
        "description": text,
        **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
    }
    for status, text in {
        400: "malformed request (no image; bad multipart, JSON or base64; huge int, deep nesting, lone surrogate; "
        "invalid Content-Length)",
        404: "no such model or version (or it is being unloaded), or no default model",
        408: "the request head or body did not arrive within head_timeout_s / body_timeout_s (the connection closes)",
        413: "body or pixel count over the limit",
        415: "not a supported image (PNG, JPEG, GIF, WEBP, BMP, TIFF), decided from the bytes",
        422: "invalid parameters, or an image that does not decode",
        429: "too many requests in flight for this client (Retry-After)",
        431: "request line and headers over 64 KiB (the connection closes)",
        500: "inference failed (logged on the server)",
        503: "queue full, deadline cannot be met, memory budget spent, not ready or shutting down (Retry-After)",
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


async def wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _path_parameter(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}, "description": description}


_MODEL = _path_parameter("name", "the model, as /v1/models lists it")
_VERSION = _path_parameter("version", "one of its READY versions")


@router.post(
    "/v1/segment",
    response_model=SegmentResponse,
    responses=ERRORS,
    openapi_extra=_openapi_extra(),
    summary="Segment the instances of one image (the default model)",
)
async def segment(request: Request) -> Response:
    return await _segment(request, None, None)


@router.post(
    "/v1/models/{name}/segment",
    response_model=SegmentResponse,
    responses=ERRORS,
    openapi_extra=_openapi_extra([_MODEL]),
    summary="Segment the instances of one image with a model (its newest READY version)",
)
async def segment_with_model(name: str, request: Request) -> Response:
    return await _segment(request, name, None)


@router.post(
    "/v1/models/{name}/versions/{version}/segment",
    response_model=SegmentResponse,
    responses=ERRORS,
    openapi_extra=_openapi_extra([_MODEL, _VERSION]),
    summary="Segment the instances of one image with one version of a model",
)
async def segment_with_version(name: str, version: str, request: Request) -> Response:
    return await _segment(request, name, version)


async def read_within(reading: Awaitable[T], settings: ServiceSettings, arrived: float, deadline: float) -> T:
    """What ``reading`` (of the request's body) returns, unless the body takes longer than
    ``body_timeout_s`` (408) or the deadline passes first (504)."""
    # The body is read before the request takes a place in the queue: a slow or stalled upload
    # holds a connection (bounded by body_timeout_s and max_connections), never a queue place.
    body_deadline = min(deadline, arrived + settings.body_timeout_s)
    try:
        return await asyncio.wait_for(reading, body_deadline - time.monotonic())
    except asyncio.TimeoutError:
        if body_deadline >= deadline:
            raise ServiceError(
                504, "deadline_exceeded", "the request's deadline passed while its body was read", reason="deadline"
            ) from None
        raise ServiceError(
            408,
            "request_timeout",
            f"the request body did not arrive within {settings.body_timeout_s:g} s",
            reason="body_timeout",
            headers={"Connection": "close"},
        ) from None


async def _segment(request: Request, name: str | None, version: str | None) -> Response:
    arrived = time.monotonic()
    runtime = request.app.state.runtime
    settings = runtime.settings
    tracing = runtime.tracing
    facts = request_facts(request.scope)
    timeout = request_timeout(
        request.headers.get("x-request-timeout"), settings.request_timeout_s, settings.max_request_timeout_s
    )
    deadline = arrived + timeout
    with tracing.stage("receive"):
        data, params = await read_within(read_segment_request(request), settings, arrived, deadline)
    async with runtime.admission(client_key(request), deadline, name, version) as served:
        if facts is not None:
            facts.note(model=served.name, version=served.version)
        tracing.annotate({"transfiner.model.name": served.name, "transfiner.model.version": served.version})
        outcome = await served.segment(
            data, params, deadline, disconnected=lambda: wait_disconnect(request), as_json=True
        )
        # Read while admitted: once the last admitted request is answered an old version may unload.
        loaded = served.model
        model = {
            "name": served.name,
            "version": served.version,
            "backend": loaded.backend,
            "precision": loaded.precision,
        }
    image = {"width": outcome.image.width, "height": outcome.image.height, "image_id": params.image_id}
    timing = {
        "queue_ms": round(outcome.queue_s * 1000, 3),
        "inference_ms": round(outcome.inference_s * 1000, 3),
        "postprocess_ms": round(outcome.postprocess_s * 1000, 3),
        "total_ms": round((time.monotonic() - arrived) * 1000, 3),
    }
    if facts is not None:
        facts.note(**{key: value for key, value in timing.items() if key != "total_ms"})
    # The instances (the bulk: RLE strings) were encoded in the post-processing thread; only the
    # small parts are encoded here, on the event loop.
    with tracing.stage("encode"):
        body = b"".join(
            (
                b'{"image":',
                dumps(image),
                b',"model":',
                dumps(model),
                b',"instances":',
                outcome.instances_json,
                b',"timing":',
                dumps(timing),
                b"}",
            )
        )
    return Response(body, media_type="application/json")
