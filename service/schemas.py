"""Request parameters and response bodies (pydantic 2); they also document the API in /docs."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema, field_validator

# Bounds on what a request may make the service repeat: ``image_id`` is echoed in the response
# and in every instance (a 19 MB id with 100 detections would be a 1.9 GB answer), and unknown
# classes are listed in the 422's message.
MAX_ID_CHARS = 1024
MAX_CLASSES = 1000

ImageId = int | Annotated[str, StringConstraints(max_length=MAX_ID_CHARS)]

# What str.strip() removes (str.isspace), spelled out: ECMA-262's \s, which a document's pattern
# means, differs from it (\x1c-\x1f, \x85; \ufeff).
_BLANK_CHARS = "\\t\\n\\v\\f\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"
# A class filter's text item names at least one class: it holds more than commas and blanks.
CLASS_TEXT_PATTERN = f"[^,{_BLANK_CHARS}]"
_CLASS_REF = {
    "anyOf": [{"type": "integer"}, {"type": "string", "maxLength": MAX_ID_CHARS, "pattern": CLASS_TEXT_PATTERN}]
}
# A list, or one item (JSON may give one; a query or form field is one item per key), or null.
_CLASSES_SCHEMA = {
    "anyOf": [
        {"type": "array", "items": _CLASS_REF, "minItems": 1, "maxItems": MAX_CLASSES},
        _CLASS_REF,
        {"type": "null"},
    ],
    "description": "keep only these classes: category ids or names; a text item may name several, "
    "comma-separated (classes=1,3 or classes=1&classes=3 in a query)",
}

# ASCII digits only: str.isdigit() also takes "³" (which int() refuses) and "٣" (which it reads as 3).
DIGITS = re.compile(r"[0-9]+")


def _base64_image_pattern() -> str:
    """JSON ``image``: padded base64 of at least one byte, ASCII blanks anywhere (as `base64`
    wraps its lines), optionally as a ``data:...;base64,`` URL. The document's pattern (ECMA-262,
    which Python's ``re.fullmatch`` reads the same); the server checks it with a faster
    equivalent (``uploads.base64_payload``, a test compares the two)."""
    char, blanks = "[A-Za-z0-9+/]", "[\\t\\n\\r ]*"
    one = f"{char}{blanks}"
    last = f"(?:{one}{one}{one}{one}|{one}{one}{one}={blanks}|{one}{one}={blanks}={blanks})"
    data_url = "[dD][aA][tT][aA]:[^,]*;[bB][aA][sS][eE]64[^,]*,"
    return f"^(?:{data_url})?{blanks}(?:{one}{one}{one}{one})*{last}$"


BASE64_IMAGE_PATTERN = _base64_image_pattern()


class SegmentParams(BaseModel):
    """Per-request options of ``POST /v1/segment`` (query string, form fields or JSON keys).

    They are applied to this request only, after the forward pass it shares with its batch.
    """

    model_config = ConfigDict(extra="forbid")

    score_threshold: float = Field(
        0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="keep detections scoring above this"
    )
    max_detections: int = Field(100, ge=1, le=100, description="per image, best scores first")
    classes: Annotated[list[ImageId] | None, WithJsonSchema(_CLASSES_SCHEMA)] = Field(None, max_length=MAX_CLASSES)
    mask_threshold: float = Field(0.5, ge=0.0, le=1.0, allow_inf_nan=False, description="binarises the soft masks (>=)")
    mask_format: Literal["rle", "polygon", "none"] = "rle"
    refine: bool = Field(True, description="false: the coarse Mask R-CNN masks only")
    image_id: ImageId | None = Field(
        None, description="echoed; ASCII digits without a leading zero, in a query or form, become an integer"
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _split_classes(cls, value: Any) -> Any:
        # Query strings and form fields carry "1,3" or repeated keys; JSON carries a list or a string.
        if isinstance(value, (str, int)):
            value = [value]
        if isinstance(value, (list, tuple)):
            items: list[Any] = []
            for item in value:
                if isinstance(item, str):
                    names = [part.strip() for part in item.split(",") if part.strip()]
                    if not names:  # an empty filter would run the model for nothing
                        raise ValueError("name at least one class (ids or names), or leave classes out for all of them")
                    items.extend(names)
                else:
                    items.append(item)
            if not items:
                raise ValueError("name at least one class (ids or names), or leave classes out for all of them")
            return [int(i) if isinstance(i, str) and DIGITS.fullmatch(i) else i for i in items]
        return value

    @field_validator("score_threshold", "max_detections", "mask_threshold", "image_id", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # pydantic would read JSON true as 1 (a threshold of 1 finds nothing, an image_id of 1 is
        # another image's): a number was meant, or a mistake was made.
        if isinstance(value, bool):
            raise ValueError("a number, not true or false")
        return value

    @field_validator("image_id", mode="before")
    @classmethod
    def _numeric_id(cls, value: Any) -> Any:
        # Only canonical digits: "0042" stays a string, so the echo is exactly what was sent.
        if isinstance(value, str) and DIGITS.fullmatch(value) and str(int(value)) == value:
            return int(value)
        return value


class RLE(BaseModel):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE (column-major runs)")


class Instance(BaseModel):
    """One detection, a COCO results record (``COCO.loadRes`` takes a list of them as is)."""

    image_id: ImageId | None
    bbox: list[float] = Field(description="[x, y, width, height] in the image's pixels")
    score: float
    category_id: int
    category_name: str
    area: float = Field(description="mask pixels; the box area when mask_format is none")
    segmentation: RLE | list[list[float]] | None = Field(
        None, description="RLE, or polygons [[x0, y0, x1, y1, ...], ...] along pixel corners"
    )


class ImageInfo(BaseModel):
    width: int
    height: int
    image_id: ImageId | None


class ModelInfo(BaseModel):
    name: str
    version: str
    backend: str
    precision: str = Field(description="fp32, bf16 or fp16")


class Timing(BaseModel):
    queue_ms: float
    inference_ms: float
    postprocess_ms: float
    total_ms: float


class SegmentResponse(BaseModel):
    image: ImageInfo
    model: ModelInfo
    instances: list[Instance]
    timing: Timing


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_delay_ms: float
    max_arrival_wait_ms: float
    max_batch_pixels: int | None
    max_queue_size: int
    workers: int
    worker_process: bool = False  # each worker in a process of its own


class VersionState(BaseModel):
    version: str
    state: Literal["LOADING", "READY", "UNLOADING", "UNAVAILABLE"]
    reason: str | None = Field(None, description="why it is UNAVAILABLE")
    digest: str | None = Field(None, description="the weights' digest (once loaded)")
    backend: str | None = None
    precision: str | None = None
    device: list[str] | None = None


class ModelCard(BaseModel):
    """A model, described by the version that answers its requests (its newest READY one); the
    version fields are null while none is ready."""

    name: str
    version: str | None = Field(description="the version that answers /v1/models/{name}/segment")
    backend: str | None
    precision: str | None = Field(description="fp32, bf16 or fp16: what the forward pass computes in")
    device: list[str] | None
    ready: bool
    classes: list[dict[str, Any]] | None = Field(description="[{id, name}] in the model's class order")
    input: dict[str, int] | None = Field(description="network input: min_size, max_size")
    batching: BatchingInfo | None
    default: bool = Field(False, description="POST /v1/segment answers with this model")
    versions: list[VersionState] = Field(description="every version on record, oldest first")


class ModelsResponse(BaseModel):
    models: list[ModelCard]


class IndexEntry(BaseModel):
    """One row of the repository index (Triton's repository extension)."""

    name: str
    version: str | None = None
    state: Literal["LOADING", "READY", "UNLOADING", "UNAVAILABLE"]
    reason: str | None = None


class HealthResponse(BaseModel):
    status: str
    detail: str | None = None
