"""The protocol's protobuf messages <-> the shared core's transport-free tensors and requests.

- Inputs arrive as typed ``contents`` or as ``raw_input_contents`` (one entry per input, the
  elements row-major; a BYTES element is a 4-byte little-endian length, then its bytes).
- Outputs leave as ``raw_output_contents``, in output order: what Triton's client reads.
- Malformed tensors are ``ServiceError`` 400 here (INVALID_ARGUMENT once converted).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from transfiner.service.errors import bad_request
from transfiner.service.grpc import inference_pb2 as pb
from transfiner.service.oip.tensors import InferRequest, InferResponse, RequestedOutput, Tensor

# Numeric datatypes: their numpy type (little-endian, as raw contents are) and, for typed
# contents, the field of ``InferTensorContents`` that carries them. FP16 has no typed field.
NUMERIC: dict[str, tuple[str, str | None]] = {
    "BOOL": ("?", "bool_contents"),
    "UINT8": ("<u1", "uint_contents"),
    "UINT16": ("<u2", "uint_contents"),
    "UINT32": ("<u4", "uint_contents"),
    "UINT64": ("<u8", "uint64_contents"),
    "INT8": ("<i1", "int_contents"),
    "INT16": ("<i2", "int_contents"),
    "INT32": ("<i4", "int_contents"),
    "INT64": ("<i8", "int64_contents"),
    "FP16": ("<f2", None),
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
}
_LENGTH = struct.Struct("<I")


def parameters(entries: Mapping[str, pb.InferParameter]) -> dict[str, bool | int | str]:
    """A protobuf parameter map as plain values; a value of no kind this protocol defines (a
    newer client's double or uint64) is refused rather than silently read as missing."""
    found: dict[str, bool | int | str] = {}
    for key, value in entries.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is None:
            raise bad_request(f"parameter {key!r}: give a bool, int64 or string value")
        found[key] = getattr(value, kind)
    return found


def set_parameters(target: Any, values: Mapping[str, Any]) -> None:
    """Fills a protobuf parameter map; bool is tested before int (a bool is an int in Python)."""
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        else:
            target[key].string_param = str(value)


def _elements(shape: tuple[int, ...], name: str) -> int:
    if any(dim < 0 for dim in shape):
        raise bad_request(f"input {name!r}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """``count`` BYTES elements of raw contents (each a 4-byte little-endian length, then that many bytes)."""
    elements, at = [], 0
    view = memoryview(raw)
    for _ in range(count):
        if at + 4 > len(raw):
            raise bad_request(f"input {name!r}: raw contents end inside an element's length")
        (length,) = _LENGTH.unpack_from(raw, at)
        at += 4
        if at + length > len(raw):
            raise bad_request(f"input {name!r}: an element's length ({length}) runs past the raw contents")
        elements.append(bytes(view[at : at + length]))
        at += length
    if at != len(raw):
        raise bad_request(f"input {name!r}: {len(raw) - at} bytes follow the {count} element(s) its shape holds")
    return elements


def join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(element)) + element for element in elements)


def _input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    count = _elements(shape, name)
    if datatype == "BYTES":
        if raw is not None:
            data: np.ndarray | list[bytes] = split_bytes(raw, count, name)
        else:
            data = list(tensor.contents.bytes_contents)
            if len(data) != count:
                raise bad_request(f"input {name!r}: shape {list(shape)} holds {count} elements, got {len(data)}")
    elif datatype in NUMERIC:
        dtype, field = NUMERIC[datatype]
        if raw is not None:
            if len(raw) != count * np.dtype(dtype).itemsize:
                raise bad_request(f"input {name!r}: {len(raw)} raw bytes for {count} {datatype} elements")
            data = np.frombuffer(raw, dtype=dtype).reshape(shape)
        else:
            if field is None:
                raise bad_request(f"input {name!r}: {datatype} travels only as raw_input_contents")
            values = getattr(tensor.contents, field)
            if len(values) != count:
                raise bad_request(f"input {name!r}: shape {list(shape)} holds {count} elements, got {len(values)}")
            data = np.asarray(values, dtype=dtype).reshape(shape)
    else:
        raise bad_request(f"input {name!r}: unknown datatype {datatype!r}")
    return Tensor(name=name, datatype=datatype, shape=shape, data=data, parameters=parameters(tensor.parameters))


def infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """The core's request for a protobuf one (tensors checked against their shapes)."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise bad_request(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: give one per input")
    if raw and any(tensor.HasField("contents") for tensor in message.inputs):
        raise bad_request("give raw_input_contents or typed contents, not both")
    inputs = [_input(tensor, raw[i] if raw else None) for i, tensor in enumerate(message.inputs)]
    outputs = [RequestedOutput(name=o.name, parameters=parameters(o.parameters)) for o in message.outputs] or None
    return InferRequest(inputs=inputs, outputs=outputs, parameters=parameters(message.parameters), id=message.id or None)


def raw_contents(tensor: Tensor) -> bytes:
    """A tensor's elements as raw contents (row-major, little-endian)."""
    if tensor.datatype == "BYTES":
        return join_bytes(list(tensor.data))
    dtype, _ = NUMERIC[tensor.datatype]
    return np.ascontiguousarray(tensor.data, dtype=dtype).tobytes()


def infer_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    set_parameters(message.parameters, response.parameters)
    for tensor in response.outputs:
        output = message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        set_parameters(output.parameters, tensor.parameters)
        message.raw_output_contents.append(raw_contents(tensor))
    return message


def model_metadata(metadata: Mapping[str, Any]) -> pb.ModelMetadataResponse:
    """The core's model metadata (the REST protocol's JSON object) as its protobuf message."""

    def tensors(entries: list[dict]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
        return [
            pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=list(t["shape"]))
            for t in entries
        ]

    return pb.ModelMetadataResponse(
        name=metadata["name"],
        versions=list(metadata.get("versions", ())),
        platform=metadata.get("platform", ""),
        inputs=tensors(metadata.get("inputs", [])),
        outputs=tensors(metadata.get("outputs", [])),
    )

