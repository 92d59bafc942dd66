"""The protocol's HTTP/REST bodies: JSON, and the binary tensor data extension, both ways.

- A body is a JSON header, optionally followed by binary tensor data: the header's length is then
  the ``Inference-Header-Content-Length`` HTTP header, and each tensor sent that way has
  ``"parameters": {"binary_data_size": n}`` instead of ``data`` (``tensors.to_raw``'s layout; the
  tensors' data follow one another in the order the header lists them).
- As JSON ``data``, a BYTES *input* element is a base64 string (an image file is not text); a BYTES
  *output* element is UTF-8 text (class names, RLE JSON), as Triton sends it.
- The pydantic models document the JSON in /openapi.json and check a request's header.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from transfiner.service.engine.segmenting import dumps
from transfiner.service.errors import ServiceError
from transfiner.service.oip.errors import bad_input
from transfiner.service.oip.tensors import (
    DATATYPES,
    NUMPY_TYPES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    Tensor,
    TensorError,
    element_count,
    from_raw,
    to_raw,
)
from transfiner.service.uploads import base64_payload, check_json_types

HEADER_LENGTH = "Inference-Header-Content-Length"
ParameterValue = bool | int | float | str


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputBody(_Body):
    name: str
    shape: list[int] = Field(description="dimensions; each >= 0")
    datatype: str = Field(description="BYTES for the image")
    parameters: dict[str, ParameterValue] = Field(
        default_factory=dict, description="binary_data_size: the bytes of this tensor in the binary part of the body"
    )
    data: list[Any] | None = Field(
        None, description="row-major elements (may be nested); a BYTES element is a base64 string"
    )


class OutputRequestBody(_Body):
    name: str = Field(description="boxes, scores, classes, labels, masks_rle or masks")
    parameters: dict[str, ParameterValue] = Field(
        default_factory=dict, description="binary_data: true sends this output in the binary part"
    )


class InferRequestBody(_Body):
    id: str | None = None
    parameters: dict[str, ParameterValue] = Field(
        default_factory=dict,
        description="score_threshold, max_detections, classes, mask_threshold, refine, mask_format "
        "(rle or none), image_id; timeout (microseconds), binary_data_output, priority",
    )
    inputs: list[InputBody] = Field(description='one input, "image" (BYTES, shape [1])')
    outputs: list[OutputRequestBody] | None = Field(
        None, description="the outputs to send (default: boxes, scores, classes, labels, masks_rle)"
    )


class OutputBody(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, ParameterValue] | None = None
    data: list[Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, ParameterValue] | None = None
    outputs: list[OutputBody]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataBody(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadataBody(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ProtocolError(BaseModel):
    """The protocol's error: ``{"error": "<message>"}``."""

    error: str


# -- server side ---------------------------------------------------------------------------------


def header_length(value: str | None, body_length: int) -> int | None:
    """The ``Inference-Header-Content-Length`` header's value, checked against the body."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise bad_input(f"{HEADER_LENGTH} must be an integer, got {value!r}") from None
    if not 0 < length <= body_length:
        raise bad_input(f"{HEADER_LENGTH} {length} does not fit the body of {body_length} bytes")
    return length


def parse_request(body: bytes, length: int | None) -> InferRequest:
    """The request a body holds (``length``: the JSON header's, None when the body is all JSON);
    raises ``OipError`` 400."""
    header, binary = (body, b"") if length is None else (body[:length], body[length:])
    try:
        parsed = InferRequestBody.model_validate_json(header)
    except ValidationError as error:
        raise bad_input(f"invalid inference request: {_problems(error)}") from None
    inputs, offset = [], 0
    for item in parsed.inputs:
        shape = tuple(item.shape)
        if any(d < 0 for d in shape):
            raise bad_input(f"input {item.name!r}: negative dimension in shape {item.shape}")
        if item.datatype not in DATATYPES:
            raise bad_input(f"input {item.name!r}: unknown datatype {item.datatype!r}")
        unknown = sorted(set(item.parameters) - {"binary_data_size"})
        if unknown:
            raise bad_input(f"input {item.name!r}: unsupported parameters {unknown}")
        size = item.parameters.get("binary_data_size")
        try:
            if size is not None:
                if item.data is not None:
                    raise bad_input(f"input {item.name!r} has both data and binary_data_size")
                if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                    raise bad_input(f"input {item.name!r}: binary_data_size must be a non-negative integer")
                if offset + size > len(binary):
                    raise bad_input(
                        f"input {item.name!r}: binary_data_size {size} runs past the binary data ({len(binary)} bytes)"
                    )
                tensor = from_raw(item.name, item.datatype, shape, binary[offset : offset + size], item.parameters)
                offset += size
            elif item.data is not None:
                tensor = _from_json(item.name, item.datatype, shape, item.data, item.parameters)
            else:
                raise bad_input(f"input {item.name!r} has neither data nor binary_data_size")
        except TensorError as error:
            raise bad_input(str(error)) from None
        inputs.append(tensor)
    if offset != len(binary):
        raise bad_input(f"{len(binary) - offset} bytes of binary data follow the tensors' binary_data_size")
    try:
        check_json_types(parsed.parameters)  # JSON's numbers and booleans, as in /v1's JSON bodies
    except ServiceError as error:
        raise bad_input(error.message) from None
    outputs = None if parsed.outputs is None else [RequestedOutput(o.name, o.parameters) for o in parsed.outputs]
    return InferRequest(inputs, outputs, parsed.parameters, parsed.id)


def encode_response(response: InferResponse, request: InferRequest) -> tuple[bytes, int | None]:
    """The body of the answer and its JSON header's length (None when it is all JSON). An output
    goes binary when its request says ``binary_data: true``, or else when the request's
    ``binary_data_output`` is true."""
    default = request.parameters.get("binary_data_output") is True
    asked = {o.name: o.parameters.get("binary_data") for o in request.outputs or ()}
    outputs, blobs = [], []
    for tensor in response.outputs:
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        binary = asked.get(tensor.name)
        if binary is True or (binary is None and default):
            raw = to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _to_json(tensor)
        outputs.append(entry)
    header: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    header["outputs"] = outputs
    encoded = dumps(header)
    if not blobs:
        return encoded, None
    return b"".join([encoded, *blobs]), len(encoded)


# -- client side (transfiner bench, the tests) -----------------------------------------------------


def encode_request(request: InferRequest, binary: bool = True) -> tuple[bytes, int | None]:
    """A request's body (inputs as binary data, or JSON ``data``) and its JSON header's length."""
    inputs, blobs = [], []
    for tensor in request.inputs:
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        parameters = dict(tensor.parameters)
        if binary:
            raw = to_raw(tensor)
            parameters["binary_data_size"] = len(raw)
            blobs.append(raw)
        elif tensor.datatype == "BYTES":
            entry["data"] = [base64.b64encode(item).decode() for item in tensor.data]
        else:
            entry["data"] = np.asarray(tensor.data).ravel().tolist()
        if parameters:
            entry["parameters"] = parameters
        inputs.append(entry)
    header: dict[str, Any] = {}
    if request.id is not None:
        header["id"] = request.id
    if request.parameters:
        header["parameters"] = request.parameters
    header["inputs"] = inputs
    if request.outputs is not None:
        header["outputs"] = [{"name": o.name, "parameters": o.parameters} for o in request.outputs]
    encoded = dumps(header)
    return (b"".join([encoded, *blobs]), len(encoded)) if blobs else (encoded, None)


def parse_response(body: bytes, length: int | None) -> InferResponse:
    """The response a body holds (``length``: the ``Inference-Header-Content-Length`` header)."""
    header, binary = (body, b"") if length is None else (body[:length], body[length:])
    parsed = InferResponseBody.model_validate_json(header)
    outputs, offset = [], 0
    for item in parsed.outputs:
        size = (item.parameters or {}).get("binary_data_size")
        if size is not None:
            outputs.append(from_raw(item.name, item.datatype, tuple(item.shape), binary[offset : offset + size]))
            offset += size
        elif item.datatype == "BYTES":
            data = [str(e).encode() for e in _flat(item.data or [])]
            outputs.append(Tensor(item.name, item.datatype, tuple(item.shape), data))
        else:
            array = np.asarray(_flat(item.data or []), dtype=NUMPY_TYPES[item.datatype]).reshape(item.shape)
            outputs.append(Tensor(item.name, item.datatype, tuple(item.shape), array))
    return InferResponse(parsed.model_name, parsed.model_version or "", outputs, parsed.id, parsed.parameters or {})


# -- helpers -------------------------------------------------------------------------------------


def _problems(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(parts)


def _flat(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    stack = [iter(data)]
    while stack:  # no recursion: the nesting is as deep as the JSON parser allowed
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: list[Any], parameters: dict) -> Tensor:
    flat = _flat(data)
    if len(flat) != element_count(shape):
        raise bad_input(f"input {name!r}: {len(flat)} elements of data for shape {list(shape)}")
    if datatype == "BYTES":
        items = []
        for element in flat:
            if not isinstance(element, str):
                raise bad_input(f"input {name!r}: a BYTES element in JSON must be a base64 string")
            # /v1's rule for a JSON image: padded base64, blanks allowed, or a data: URL.
            payload = base64_payload(element)
            if payload is None:
                raise bad_input(f"input {name!r}: a BYTES element is not valid base64") from None
            items.append(base64.b64decode(payload))
        return Tensor(name, datatype, shape, items, dict(parameters))
    try:
        array = np.asarray(flat, dtype=NUMPY_TYPES[datatype]).reshape(shape)
    except (TypeError, ValueError, OverflowError):
        raise bad_input(f"input {name!r}: data that is not {datatype}") from None
    return Tensor(name, datatype, shape, array, dict(parameters))


def _to_json(tensor: Tensor) -> list[Any]:
    if tensor.datatype == "BYTES":
        return [item.decode("utf-8") for item in tensor.data]
    return np.asarray(tensor.data).ravel().tolist()
