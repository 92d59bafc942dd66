"""The protocol's tensors, requests and responses, as plain dataclasses (no transport).

- A tensor's ``data`` is a numpy array of its datatype and shape, or for ``BYTES`` the list of its
  elements (raw bytes each, row-major).
- ``to_raw`` and ``from_raw``: the protocol's binary layout of a tensor (REST's binary data
  extension and gRPC's ``raw_*_contents``): little-endian values, row-major; a ``BYTES`` element
  is a 4-byte little-endian length, then its bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

# The protocol's numeric datatypes; BYTES is handled apart, BF16 has no numpy type and is refused.
NUMPY_TYPES: dict[str, np.dtype] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in {
        "BOOL": np.bool_,
        "UINT8": np.uint8,
        "UINT16": np.uint16,
        "UINT32": np.uint32,
        "UINT64": np.uint64,
        "INT8": np.int8,
        "INT16": np.int16,
        "INT32": np.int32,
        "INT64": np.int64,
        "FP16": np.float16,
        "FP32": np.float32,
        "FP64": np.float64,
    }.items()
}
DATATYPES = frozenset({*NUMPY_TYPES, "BYTES"})

Parameters = dict[str, bool | int | float | str]


class TensorError(ValueError):
    """Tensor data that does not fit its datatype or shape (the transports answer it as bad input)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # "BYTES", "FP32", "INT32", "UINT8", ...
    shape: tuple[int, ...]
    data: np.ndarray | list[bytes]
    parameters: Parameters = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: Parameters = field(default_factory=dict)  # binary_data (REST only)


@dataclass(frozen=True)
class InferRequest:
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None = None  # None: the default outputs
    parameters: Parameters = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str | None = None
    parameters: Parameters = field(default_factory=dict)


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def to_raw(tensor: Tensor) -> bytes:
    """The tensor's data in the protocol's binary layout."""
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(item)) + item for item in tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()


def from_raw(
    name: str, datatype: str, shape: tuple[int, ...], raw: bytes, parameters: Parameters | None = None
) -> Tensor:
    """The tensor that ``raw`` (the binary layout) holds; raises ``TensorError`` when it does not
    hold exactly ``shape``'s elements of ``datatype``."""
    count = element_count(shape)
    if datatype == "BYTES":
        data = split_bytes(raw)
        if len(data) != count:
            raise TensorError(f"input {name!r}: {len(data)} BYTES elements for shape {list(shape)}")
        return Tensor(name, datatype, shape, data, dict(parameters or {}))
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise TensorError(f"input {name!r}: unsupported datatype {datatype!r}")
    if len(raw) != count * dtype.itemsize:
        raise TensorError(
            f"input {name!r}: {len(raw)} bytes of data for shape {list(shape)} of {datatype} "
            f"({count * dtype.itemsize} expected)"
        )
    array = np.frombuffer(raw, dtype=dtype).reshape(shape)
    return Tensor(name, datatype, shape, array, dict(parameters or {}))


def split_bytes(raw: bytes) -> list[bytes]:
    """The elements of a serialised BYTES tensor; raises ``TensorError`` if it is cut short."""
    items, offset = [], 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError("BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise TensorError(f"a BYTES element of {size} bytes runs past the end of the data")
        items.append(bytes(view[offset : offset + size]))
        offset += size
    return items
