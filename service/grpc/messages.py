"""The protocol's protobuf messages <-> the shared core's transport-free tensors and requests.

- Inputs arrive as typed ``contents`` or as ``raw_input_contents`` (one entry per input, the
  elements row-major; a BYTES element is a 4-byte little-endian length, then its bytes).
- Outputs leave as ``raw_output_contents``, in output order: what Triton's client reads.
- Malformed tensors are ``ServiceError`` 400 here (INVALID_ARGUMENT once converted).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from transfiner.service.errors import bad_request
from transfiner.service.grpc import inference_pb2 as pb
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

# The field of ``InferTensorContents`` that carries each datatype's typed contents (FP16 has none:
# it travels only as raw contents).
CONTENTS_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


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
    """Fills a protobuf parameter map; bool is tested before int (a bool is an int in Python),
    and anything else (a float: the protocol's gRPC form has no double) is sent as a string."""
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        else:
            target[key].string_param = str(value)


def _input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
    params = parameters(tensor.parameters)
    if datatype not in DATATYPES:
        raise bad_request(f"input {name!r}: unknown datatype {datatype!r}")
    if any(dim < 0 for dim in shape):
        raise bad_request(f"input {name!r}: shape {list(shape)} has a negative dimension")
    if raw is not None:
        try:
            return from_raw(name, datatype, shape, raw, params)
        except TensorError as error:
            raise bad_request(str(error)) from None
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise bad_request(f"input {name!r}: {datatype} travels only as raw_input_contents")
    values = getattr(tensor.contents, field)
    count = element_count(shape)
    if len(values) != count:
        raise bad_request(f"input {name!r}: shape {list(shape)} holds {count} elements, got {len(values)}")
    if datatype == "BYTES":
        data: np.ndarray | list[bytes] = list(values)
    else:
        data = np.asarray(values, dtype=NUMPY_TYPES[datatype]).reshape(shape)
    return Tensor(name=name, datatype=datatype, shape=shape, data=data, parameters=params)


def infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """The core's request for a protobuf one (tensors checked against their shapes)."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise bad_request(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs: give one per input")
    if raw and any(tensor.HasField("contents") for tensor in message.inputs):
        raise bad_request("give raw_input_contents or typed contents, not both")
    inputs = [_input(tensor, raw[i] if raw else None) for i, tensor in enumerate(message.inputs)]
    outputs = [RequestedOutput(name=o.name, parameters=parameters(o.parameters)) for o in message.outputs] or None
    return InferRequest(inputs, outputs, parameters(message.parameters), message.id or None)


def infer_response(response: InferResponse) -> pb.ModelInferResponse:
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id or ""
    )
    set_parameters(message.parameters, response.parameters)
    for tensor in response.outputs:
        output = message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        set_parameters(output.parameters, tensor.parameters)
        message.raw_output_contents.append(to_raw(tensor))
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
