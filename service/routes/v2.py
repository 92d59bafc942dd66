"""The Open Inference Protocol ("KServe v2") over HTTP/REST, on the service's own port.

- Health and server metadata, model metadata and readiness, and inference: the same admission,
  deadlines, batching and workers as ``/v1`` (``service.oip.inference``).
- Bodies: JSON, or JSON followed by binary tensor data (``Inference-Header-Content-Length``).
- Errors take the protocol's shape, ``{"error": "<message>"}`` (``service.errors`` shapes the ones
  raised outside these routes: the API key's 401, the body limit's 413).
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from transfiner.service.errors import ServiceError, protocol_error_body
from transfiner.service.oip import inference
from transfiner.service.oip.errors import OipError, bad_input, from_service_error
from transfiner.service.oip.rest import (
    HEADER_LENGTH,
    InferResponseBody,
    ModelMetadataBody,
    ProtocolError,
    ServerMetadataBody,
    encode_response,
    header_length,
    parse_request,
)
from transfiner.service.routes.segment import (
    RETRY_AFTER,
    TIMEOUT_HEADER,
    read_within,
    request_timeout,
    wait_disconnect,
    without_null,
)
from transfiner.service.schemas import BASE64_IMAGE_PATTERN, SegmentParams
from transfiner.service.security import client_key
from transfiner.service.telemetry.middleware import request_facts

open_router = APIRouter(tags=["open inference protocol"])
# Behind the API key when one is set (``guarded``, in create_app).
router = APIRouter(tags=["open inference protocol"])

_MODEL = Path(description="the model, as /v1/models lists it")
_VERSION = Path(description="one of its versions")
# Bodies from this size on are parsed in a thread (as /v1's JSON bodies).
OFF_LOOP_BYTES = 64 * 1024


_MALFORMED_HTTP = "malformed HTTP (request line, headers, Content-Length or chunked framing; the connection closes)"


def _errors(*statuses: int, bad_request: str = _MALFORMED_HTTP) -> dict[int | str, dict[str, Any]]:
    """The protocol's error shape for ``statuses``, and for what any route may answer (these
    replace the app's ``{"error": {"code", "message"}}`` entries)."""
    texts = {
        400: bad_request,
        401: "missing or wrong API key",
        404: "no such model or version",
        408: "the request head or body did not arrive in time (the connection closes)",
        413: "body or pixel count over the limit",
        429: "too many requests in flight for this client (Retry-After)",
        431: "request line and headers over 64 KiB (the connection closes)",
        500: "unexpected error (logged on the server)",
        503: "not ready, queue full, deadline cannot be met, memory budget spent or shutting down (Retry-After)",
        504: "the deadline (X-Request-Timeout, the timeout parameter or the default) passed",
    }
    out: dict[int | str, dict[str, Any]] = {}
    for status in sorted({400, 408, 413, 431, 500, *statuses}):
        out[status] = {"model": ProtocolError, "description": texts[status]}
        if status in (429, 503):
            out[status]["headers"] = RETRY_AFTER
        if status == 401:
            out[status]["headers"] = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}
    return out


# The key's 401 in the protocol's shape, declared by ``guarded`` only when a key is set.
UNAUTHORIZED = {401: _errors(401)[401]}


def _error(error: OipError) -> Response:
    headers = {}
    if error.retry_after is not None:
        # Whole seconds, never 0 (as ServiceError.headers).
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    return Response(protocol_error_body(error.message), error.http_status, headers, media_type="application/json")


async def oip_error(request: Request, error: OipError) -> Response:
    """The app's handler of ``OipError``: the protocol's error answer, counted as /v1's are."""
    metrics = getattr(request.app.state, "metrics", None)
    if error.reason and metrics is not None:
        metrics.rejections.labels(reason=error.reason).inc()
    return _error(error)


# -- health and metadata -----------------------------------------------------------------------

_EMPTY_OK = {200: {"description": "yes (no body)", "content": {}}}


@open_router.get("/v2/health/live", response_class=Response, responses={**_EMPTY_OK, **_errors()})
async def server_live() -> Response:
    """200 while the process serves HTTP."""
    return Response(status_code=200)


@open_router.get(
    "/v2/health/ready",
    response_class=Response,
    responses={**_EMPTY_OK, **_errors(bad_request=f"not ready; or {_MALFORMED_HTTP}")},
)
async def server_ready(request: Request) -> Response:
    """200 once every model that must serve is loaded and warm (as /health/ready); else 400 (the
    protocol answers "not ready" with a 4xx; Triton with 400)."""
    runtime = request.app.state.runtime
    if inference.server_ready(runtime):
        return Response(status_code=200)
    detail = "; ".join(runtime.not_ready()) if runtime.state == "ready" else runtime.detail
    return _error(OipError(f"the server is not ready ({runtime.state}): {detail}"))


@router.get("/v2", response_model=ServerMetadataBody, responses=_errors())
async def server_metadata() -> dict:
    """The server's name, version and protocol extensions."""
    return inference.server_metadata()


def _model_ready(request: Request, name: str, version: str | None) -> Response:
    if inference.model_ready(request.app.state.runtime, name, version):
        return Response(status_code=200)
    which = f"model {name!r}" + ("" if version is None else f" version {version}")
    return _error(OipError(f"{which} is not ready"))


_READY = {**_EMPTY_OK, **_errors(404, bad_request=f"not ready; or {_MALFORMED_HTTP}")}


@router.get("/v2/models/{name}/ready", response_class=Response, responses=_READY)
async def model_ready(request: Request, name: str = _MODEL) -> Response:
    """200 when a request for the model would be served now (its newest READY version); else 400."""
    return _model_ready(request, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready", response_class=Response, responses=_READY)
async def model_version_ready(request: Request, name: str = _MODEL, version: str = _VERSION) -> Response:
    """200 when this version of the model serves now; else 400."""
    return _model_ready(request, name, version)


@router.get("/v2/models/{name}", response_model=ModelMetadataBody, responses=_errors(404, 503))
async def model_metadata(request: Request, name: str = _MODEL) -> dict:
    """The model's READY versions, platform, input and outputs."""
    return inference.model_metadata(request.app.state.runtime, name, None)


@router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadataBody, responses=_errors(404, 503))
async def model_version_metadata(request: Request, name: str = _MODEL, version: str = _VERSION) -> dict:
    """One version's metadata."""
    return inference.model_metadata(request.app.state.runtime, name, version)


# -- inference ---------------------------------------------------------------------------------


def _request_schema() -> dict[str, Any]:
    """This model's inference request in JSON, as exactly as the server takes it: one BYTES input
    ``image`` of shape [1] holding base64, the parameters with /v1's types and bounds, the outputs
    by name. The binary tensor data extension (a JSON header, then raw bytes, its length in
    ``Inference-Header-Content-Length``) ties a header to the body's layout, which OpenAPI cannot
    state: it is described in prose, not offered to generators."""
    segment = SegmentParams.model_json_schema()["properties"]
    parameters = {name: without_null(prop) for name, prop in segment.items()}
    parameters["mask_format"] = {**parameters["mask_format"], "enum": ["rle", "none"]}
    # The protocol's parameter values are scalars: several classes go comma-separated in one string.
    classes = parameters["classes"]
    scalar = [option for option in classes["anyOf"] if option.get("type") != "array"]
    parameters["classes"] = {**classes, "anyOf": scalar} if len(scalar) > 1 else {**classes, **scalar[0]}
    parameters["classes"]["description"] = "keep only these classes: a category id, or names and ids comma-separated"
    parameters["timeout"] = {"type": "integer", "minimum": 1, "description": "microseconds; shortens the deadline"}
    parameters["binary_data_output"] = {"type": "boolean", "description": "every output in the binary part"}
    parameters["priority"] = {"type": "integer", "minimum": 0, "description": "accepted, no effect"}
    image = {
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"type": "string", "enum": [inference.IMAGE]},
            "datatype": {"type": "string", "enum": ["BYTES"]},
            "shape": {"type": "array", "items": {"type": "integer", "enum": [1]}, "minItems": 1, "maxItems": 1},
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
            "data": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {"type": "string", "minLength": 4, "pattern": BASE64_IMAGE_PATTERN},
                "description": "the encoded image file (PNG, JPEG, ...) as base64 (or a data: URL)",
            },
        },
        "additionalProperties": False,
    }
    output = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "enum": list(inference.OUTPUTS)},
            "parameters": {
                "type": "object",
                "properties": {"binary_data": {"type": "boolean"}},
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "parameters": {"type": "object", "properties": parameters, "additionalProperties": False},
            "inputs": {"type": "array", "items": image, "minItems": 1, "maxItems": 1},
            "outputs": {"anyOf": [{"type": "array", "items": output}, {"type": "null"}]},
        },
        "additionalProperties": False,
    }


def _infer_extra() -> dict[str, Any]:
    return {
        "parameters": [TIMEOUT_HEADER],
        "requestBody": {
            "required": True,
            "description": "The request in JSON. With the binary tensor data extension the body is instead the "
            "JSON header (the input then has parameters.binary_data_size in place of data), then the input's "
            f"bytes, with the header's length in {HEADER_LENGTH} (any content type).",
            "content": {"application/json": {"schema": _request_schema()}},
        },
    }


_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": InferResponseBody,
        "description": "the outputs; with binary outputs, the JSON header then their data (application/octet-stream)",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        "headers": {
            HEADER_LENGTH: {
                "description": "the JSON header's length, when binary output data follow it",
                "schema": {"type": "integer"},
            }
        },
    },
    **_errors(
        404,
        429,
        503,
        504,
        bad_request="bad JSON header, tensor, base64 data, parameter, output or image; bad "
        f"Inference-Header-Content-Length, X-Request-Timeout or Content-Encoding; or {_MALFORMED_HTTP}",
    ),
}


@router.post(
    "/v2/models/{name}/infer",
    response_class=Response,
    responses=_INFER_RESPONSES,
    openapi_extra=_infer_extra(),
    summary="Segment one image with a model (its newest READY version), Open Inference Protocol",
)
async def infer(request: Request, name: str = _MODEL) -> Response:
    return await _infer(request, name, None)


@router.post(
    "/v2/models/{name}/versions/{version}/infer",
    response_class=Response,
    responses=_INFER_RESPONSES,
    openapi_extra=_infer_extra(),
    summary="Segment one image with one version of a model, Open Inference Protocol",
)
async def infer_version(request: Request, name: str = _MODEL, version: str = _VERSION) -> Response:
    return await _infer(request, name, version)


async def _read(request: Request):
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise bad_input(f"Content-Encoding {encoding!r} is not supported: send the body uncompressed")
    try:
        body = await request.body()
    except ClientDisconnect:
        raise ServiceError(
            499, "client_disconnected", "the client disconnected during the upload", reason="client_disconnected"
        ) from None
    length = header_length(request.headers.get(HEADER_LENGTH), len(body))
    if len(body) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_request, body, length)
    return parse_request(body, length)


async def _infer(request: Request, name: str, version: str | None) -> Response:
    arrived = time.monotonic()
    runtime = request.app.state.runtime
    settings = runtime.settings
    tracing = runtime.tracing
    try:
        timeout = request_timeout(
            request.headers.get("x-request-timeout"), settings.request_timeout_s, settings.max_request_timeout_s
        )
        deadline = arrived + timeout
        with tracing.stage("receive"):
            parsed = await read_within(_read(request), settings, arrived, deadline)
    except ServiceError as error:
        raise from_service_error(error) from None
    response = await inference.infer(
        runtime,
        name,
        version,
        parsed,
        client=client_key(request),
        deadline=deadline,
        disconnected=lambda: wait_disconnect(request),
        arrived=arrived,
    )
    facts = request_facts(request.scope)
    if facts is not None:
        facts.note(model=response.model_name, version=response.model_version)
    tracing.annotate({"transfiner.model.name": response.model_name, "transfiner.model.version": response.model_version})
    with tracing.stage("encode"):
        body, length = encode_response(response, parsed)
    if length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={HEADER_LENGTH: str(length)})
