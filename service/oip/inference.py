"""Inference, metadata and readiness as the protocol has them, over the service's own runtime.

- ``infer`` takes the same path as ``POST /v1/models/{name}/segment``: ``runtime.admission`` then
  the version's ``segment``, so admission, deadlines, batching, workers and metrics are shared.
- Input ``image``: BYTES, one element (shape ``[1]`` or ``[1, 1]``), the encoded image file.
- Request parameters are /v1's (``SegmentParams``, validated the same way) plus the protocol's own
  (``PROTOCOL_PARAMETERS``); ``timeout`` (microseconds, as Triton) can only shorten the deadline.
- Outputs: ``boxes`` FP32 [N, 4] (x1, y1, x2, y2 in image pixels, /v1's rounded xywh converted),
  ``scores`` FP32 [N], ``classes`` INT32 [N] (category ids), ``labels`` BYTES [N] (class names),
  ``masks_rle`` BYTES [N] (each the JSON of /v1's ``segmentation``, to the byte), and, only when
  requested by name, ``masks`` UINT8 [N, H, W].
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from transfiner.service.engine.manager import version_order
from transfiner.service.engine.runtime import ServiceRuntime
from transfiner.service.engine.segmenting import SegmentOutcome, dumps
from transfiner.service.errors import ServiceError
from transfiner.service.oip.errors import OipError, bad_input, from_service_error, not_found
from transfiner.service.oip.tensors import InferRequest, InferResponse, RequestedOutput, Tensor, element_count
from transfiner.service.schemas import SegmentParams
from transfiner.service.uploads import validate_params

IMAGE = "image"
# name -> (datatype, shape in the metadata); the first five are the default outputs.
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "boxes": ("FP32", [-1, 4]),
    "scores": ("FP32", [-1]),
    "classes": ("INT32", [-1]),
    "labels": ("BYTES", [-1]),
    "masks_rle": ("BYTES", [-1]),
    "masks": ("UINT8", [-1, -1, -1]),
}
DEFAULT_OUTPUTS = ("boxes", "scores", "classes", "labels", "masks_rle")
MASK_OUTPUTS = frozenset({"masks_rle", "masks"})
SEGMENT_PARAMETERS = frozenset(SegmentParams.model_fields)
# The protocol's own request parameters: REST reads ``binary_data_output``, ``timeout`` shortens the
# deadline, ``priority`` is accepted and has no effect (one queue, first come first served).
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "timeout", "priority"})
OUTPUT_PARAMETERS = frozenset({"binary_data"})
# Triton's names for the backends, where it has one.
PLATFORMS = {"pytorch": "pytorch", "torchscript": "pytorch_libtorch", "onnxruntime": "onnxruntime_onnx"}
EXTENSIONS = ["binary_tensor_data", "parameters"]


async def infer(
    runtime: ServiceRuntime,
    name: str,
    version: str | None,
    request: InferRequest,
    *,
    client: Hashable,
    deadline: float,
    disconnected: Callable[[], Awaitable[Any]] | None = None,
    arrived: float | None = None,
) -> InferResponse:
    """Segments the request's image with model ``name`` (at ``version``, else its newest READY one);
    raises ``OipError``.

    - ``deadline``: ``time.monotonic()`` seconds; the ``timeout`` parameter (microseconds from
      ``arrived``, default now) may bring it closer.
    - ``disconnected`` returns when the client goes away (the job is then dropped)."""
    image = _image(request.inputs)
    params = _segment_params(request.parameters)
    names = _output_names(request.outputs, params)
    if MASK_OUTPUTS & set(names) and params.mask_format == "none":
        params = params.model_copy(update={"mask_format": "rle"})  # asked for by name: computed
    deadline = _deadline(request.parameters, deadline, time.monotonic() if arrived is None else arrived)
    try:
        async with runtime.admission(client, deadline, name, version) as served:
            outcome = await served.segment(image, params, deadline, disconnected=disconnected)
            model_name, model_version = served.name, served.version
    except ServiceError as error:
        raise from_service_error(error) from None
    if "masks" in names:  # decoding N full-size masks is work for a thread, not the event loop
        outputs = await asyncio.to_thread(_outputs, outcome, names)
    else:
        outputs = _outputs(outcome, names)
    parameters = {} if params.image_id is None else {"image_id": params.image_id}
    return InferResponse(model_name, model_version, outputs, request.id, parameters)


def _image(inputs: list[Tensor]) -> bytes:
    names = [tensor.name for tensor in inputs]
    if names != [IMAGE]:
        raise bad_input(f"the model takes one input, {IMAGE!r} (BYTES, shape [1]); got {names}")
    tensor = inputs[0]
    if tensor.datatype != "BYTES" or element_count(tensor.shape) != 1 or len(tensor.shape) > 2:
        raise bad_input(
            f"input {IMAGE!r} must be BYTES of shape [1] (one encoded image file); "
            f"got {tensor.datatype} {list(tensor.shape)}"
        )
    if len(tensor.data) != 1:
        raise bad_input(f"input {IMAGE!r} holds {len(tensor.data)} elements for shape [1]")
    if not tensor.data[0]:
        raise bad_input(f"input {IMAGE!r} is empty")
    return tensor.data[0]


def _segment_params(parameters: dict[str, Any]) -> SegmentParams:
    unknown = sorted(set(parameters) - SEGMENT_PARAMETERS - PROTOCOL_PARAMETERS)
    if unknown:
        raise bad_input(
            f"unknown parameters {unknown} (known: {', '.join(sorted(SEGMENT_PARAMETERS | PROTOCOL_PARAMETERS))})"
        )
    if not isinstance(parameters.get("binary_data_output", False), bool):
        raise bad_input("parameter binary_data_output must be a boolean")
    priority = _integer(parameters.get("priority", 0))
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise bad_input(f"parameter priority must be a non-negative integer, got {priority!r}")
    try:
        params = validate_params({k: v for k, v in parameters.items() if k in SEGMENT_PARAMETERS})
    except ServiceError as error:
        raise bad_input(error.message) from None
    if params.mask_format == "polygon":
        raise bad_input("mask_format polygon is not offered here: masks_rle (or masks) carries the masks")
    return params


def _output_names(outputs: list[RequestedOutput] | None, params: SegmentParams) -> list[str]:
    """The outputs to send, in the order asked (an output asked for twice is sent once).

    - ``mask_format`` none leaves the mask outputs out of the default ones; asked for by name,
      they are computed."""
    if outputs is None:
        masks = params.mask_format != "none"
        return [name for name in DEFAULT_OUTPUTS if masks or name not in MASK_OUTPUTS]
    names = [output.name for output in outputs]
    unknown = [name for name in names if name not in OUTPUTS]
    if unknown:
        raise bad_input(f"unknown outputs {unknown} (outputs: {', '.join(OUTPUTS)})")
    for output in outputs:
        extra = sorted(set(output.parameters) - OUTPUT_PARAMETERS)
        if extra:
            raise bad_input(f"output {output.name!r}: unsupported parameters {extra}")
        if not isinstance(output.parameters.get("binary_data", False), bool):
            raise bad_input(f"output {output.name!r}: binary_data must be a boolean")
    return list(dict.fromkeys(names))


def _integer(value: Any) -> Any:
    """JSON's 5.0 is the integer 5 (as JSON Schema has it); anything else as it is."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _deadline(parameters: dict[str, Any], deadline: float, arrived: float) -> float:
    timeout = _integer(parameters.get("timeout"))
    if timeout is None:
        return deadline
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise bad_input(f"parameter timeout must be a positive integer of microseconds, got {timeout!r}")
    return min(deadline, arrived + timeout / 1e6)


def _outputs(outcome: SegmentOutcome, names: list[str]) -> list[Tensor]:
    instances = outcome.instances
    count = len(instances)
    tensors = []
    for name in names:
        datatype = OUTPUTS[name][0]
        if name == "boxes":
            xywh = np.array([i["bbox"] for i in instances], dtype=np.float64).reshape(count, 4)
            data = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.float32)
        elif name == "scores":
            data = np.array([i["score"] for i in instances], dtype=np.float32)
        elif name == "classes":
            data = np.array([i["category_id"] for i in instances], dtype=np.int32)
        elif name == "labels":
            data = [i["category_name"].encode() for i in instances]
        elif name == "masks_rle":
            data = [dumps(i["segmentation"]) for i in instances]
        else:
            data = _masks(instances, outcome.image.height, outcome.image.width)
        shape = (count,) if isinstance(data, list) else data.shape
        tensors.append(Tensor(name, datatype, tuple(shape), data))
    return tensors


def _masks(instances: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    if not instances:
        return np.zeros((0, height, width), dtype=np.uint8)
    rles = [{"size": i["segmentation"]["size"], "counts": i["segmentation"]["counts"].encode()} for i in instances]
    return np.ascontiguousarray(mask_util.decode(rles).transpose(2, 0, 1))


# -- metadata and readiness ----------------------------------------------------------------------


def server_live() -> bool:
    return True


def server_ready(runtime: ServiceRuntime) -> bool:
    return runtime.ready


def server_metadata() -> dict[str, Any]:
    return {"name": "transfiner", "version": package_version("transfiner"), "extensions": list(EXTENSIONS)}


def _model(runtime: ServiceRuntime, name: str, version: str | None):
    """The model ``name`` (and its ``version``, if named); ``OipError`` 404 if unknown, 503 before
    the models are loaded."""
    if runtime.state in ("starting", "failed"):
        raise OipError(f"the models are not loaded: {runtime.detail}", 503, retry_after=5, reason="not_ready")
    model = runtime.models.models.get(name)
    if model is None or (not model.versions and model.error is None):
        raise not_found(f"no model {name!r} (models: {', '.join(sorted(runtime.models.models)) or 'none'})")
    found = None
    if version is not None:
        found = model.versions.get(version)
        if found is None or found.state == "UNLOADING":
            raise not_found(f"model {name!r} has no version {version!r}")
    return model, found


def model_ready(runtime: ServiceRuntime, name: str, version: str | None) -> bool:
    """Whether a request for the model (version) would be served now; ``OipError`` 404 for an
    unknown model or version."""
    if runtime.state in ("starting", "failed"):
        return False
    model, found = _model(runtime, name, version)
    serving = found if version is not None else model.newest_ready()
    return runtime.state == "ready" and serving is not None and serving.ready


def model_metadata(runtime: ServiceRuntime, name: str, version: str | None) -> dict[str, Any]:
    """``name``, ``versions`` (the READY ones, or the one named), ``platform`` and the tensors;
    ``OipError`` 404 for an unknown model or version."""
    model, found = _model(runtime, name, version)
    if found is not None:
        versions = [found]
    else:
        versions = sorted(
            (v for v in model.versions.values() if v.state == "READY"), key=lambda v: version_order(v.version)
        )
    describing = found or model.newest_ready() or next(iter(model.versions.values()), None)
    backend = describing.settings.backend if describing is not None else "pytorch"
    return {
        "name": model.name,
        "versions": [v.version for v in versions],
        "platform": PLATFORMS.get(backend, backend),
        "inputs": [{"name": IMAGE, "datatype": "BYTES", "shape": [1]}],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in OUTPUTS.items()],
    }
