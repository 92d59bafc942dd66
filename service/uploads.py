"""The three ways an image reaches ``POST /v1/segment``, reduced to (bytes, parameters).

* ``multipart/form-data``: the file in field ``image``, parameters as other fields;
* ``application/json``: ``{"image": "<base64 or data: URL>", "score_threshold": ...}``;
* anything else: the body is the image (``image/*``, ``application/octet-stream``, no type, or
  ``application/x-www-form-urlencoded`` as ``curl --data-binary`` declares it).

Query parameters apply to all three; one also given in the body takes the body's value. The
body's declared type only picks the transport; what the image is gets decided later by sniffing
its bytes (``service.imaging``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import sys
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from transfiner.service.errors import ServiceError, bad_request, invalid_parameter
from transfiner.service.imaging import sniff_format
from transfiner.service.schemas import MAX_CLASSES, SegmentParams

# Every parameter once, and each item of a class list as a field of its own.
MAX_FORM_FIELDS = len(SegmentParams.model_fields) + MAX_CLASSES
TOO_DEEP = "the JSON body is nested too deeply"


# The one parameter that may be repeated in a query or a form (``classes=1&classes=3``).
REPEATABLE = frozenset({"classes"})


def _multi(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Repeated keys of ``REPEATABLE`` become lists; any other given twice is an error (which of
    two score thresholds would be meant?)."""
    out: dict[str, Any] = {}
    for key, value in items:
        if key not in out:
            out[key] = value
        elif key in REPEATABLE:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            raise invalid_parameter(f"{key}: given more than once")
    return out


_BLANKS = str.maketrans("", "", "\t\n\r ")
_BASE64_CHARS = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_BASE64_MARK = re.compile(r";[bB][aA][sS][eE]64")


def base64_payload(text: str) -> str | None:
    """The base64 of a JSON ``image`` without its blanks and data: URL head, or None unless the
    text matches ``schemas.BASE64_IMAGE_PATTERN``: the same decision in linear time (the pattern
    itself takes seconds over 20 MB in Python's engine)."""
    if text[:5].lower() == "data:":  # data:image/png;base64,.... (RFC 2397: case-insensitive)
        head, comma, text = text.partition(",")
        if not comma or not _BASE64_MARK.search(head):
            return None
    payload = text.translate(_BLANKS)
    if not payload or len(payload) % 4 or not _BASE64_CHARS.fullmatch(payload):
        return None
    return payload


def _decode_base64(text: Any) -> bytes:
    payload = base64_payload(text) if isinstance(text, str) else None
    if payload is None:
        raise bad_request(
            "JSON field 'image' must be padded base64 of at least one byte (ASCII blanks allowed), "
            "or a data: URL with ';base64'"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):  # base64_payload lets none through; kept as the last word
        raise bad_request("JSON field 'image' is not valid base64") from None


async def _read_multipart(request: Request) -> tuple[bytes, dict[str, Any]]:
    try:
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except HTTPException as error:  # Starlette's parser reports malformed forms this way
        raise bad_request(f"malformed multipart body: {error.detail}") from None
    try:
        image = form.get("image")
        if image is None:
            raise bad_request("multipart body has no 'image' field")
        if not isinstance(image, UploadFile):
            raise bad_request("multipart field 'image' must be a file part, not a text field")
        fields = []
        for key, value in form.multi_items():
            if key == "image":
                continue
            if isinstance(value, UploadFile):
                raise bad_request(f"unexpected file field {key!r}: send one image in 'image'")
            fields.append((key, value))
        return await image.read(), _multi(fields)
    finally:
        await form.close()


def _parse_json(raw: bytes) -> Any:
    """``json.loads``, with the ways valid-looking JSON still makes Python raise as 400s."""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"malformed JSON body: {error}") from None
    except RecursionError:
        raise bad_request(TOO_DEEP) from None
    except ValueError:  # Python's cap on int <-> str conversion (CVE-2020-10735)
        raise bad_request(f"a number in the JSON body has more than {sys.get_int_max_str_digits()} digits") from None


def _check_unicode(params: dict[str, Any]) -> None:
    """JSON may escape lone surrogates (``"\\ud800"``), which Python parses but cannot encode
    as UTF-8: echoed (``image_id``) or quoted in an error message, they would fail the response."""
    try:
        json.dumps(params, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the JSON body contains a lone surrogate (\\ud800-\\udfff): not valid Unicode") from None
    except RecursionError:
        raise bad_request(TOO_DEEP) from None


# JSON bodies above this are parsed and base64-decoded in a thread: a 20 MB body takes the event
# loop (and every other request's I/O) away for about 100 ms otherwise.
OFF_LOOP_BYTES = 64 * 1024


async def _read_json(request: Request) -> tuple[bytes, dict[str, Any]]:
    raw = await request.body()
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(_json_request, raw)
    return _json_request(raw)


# The JSON type each number or boolean parameter must have in a JSON body. Their lax parsing
# takes the text a query needs ("0.5", "true"), which in JSON the document does not allow.
JSON_TYPES = {
    name: prop["type"]
    for name, prop in SegmentParams.model_json_schema()["properties"].items()
    if prop.get("type") in ("number", "integer", "boolean")
}


_JSON_NAMES = {str: "a string", list: "an array", dict: "an object", type(None): "null"}


def check_json_types(params: dict[str, Any]) -> None:
    """422 unless each number or boolean parameter has its JSON type (JSON bodies: /v1 and /v2)."""
    for name, expected in JSON_TYPES.items():
        if name not in params:
            continue
        value = params[name]
        # bool is an int to Python; a number given as true is refused by the parameters' own check.
        fits = isinstance(value, bool) if expected == "boolean" else isinstance(value, (int, float))
        if not fits:
            raise invalid_parameter(f"{name}: a JSON {expected}, not {_JSON_NAMES.get(type(value), 'that')}")


def _json_request(raw: bytes) -> tuple[bytes, dict[str, Any]]:
    body = _parse_json(raw)
    if not isinstance(body, dict):
        raise bad_request("the JSON body must be an object with an 'image' field")
    if "image" not in body:
        raise bad_request("JSON body has no 'image' field")
    data = _decode_base64(body.pop("image"))  # non-ASCII, surrogates included, is not base64
    _check_unicode(body)
    check_json_types(body)
    return data, body


async def read_segment_request(request: Request) -> tuple[bytes, SegmentParams]:
    """The image bytes and validated parameters; raises ``ServiceError`` 400/415/422 (499 if the
    client leaves during the upload)."""
    try:
        return await _read_segment_request(request)
    except ClientDisconnect:
        raise ServiceError(
            499, "client_disconnected", "the client disconnected during the upload", reason="client_disconnected"
        ) from None


async def _read_segment_request(request: Request) -> tuple[bytes, SegmentParams]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        data, body_params = await _read_multipart(request)
    elif content_type == "application/json" or content_type.endswith("+json"):
        data, body_params = await _read_json(request)
    else:
        # Raw bytes, whatever the declared type: `curl --data-binary @img.png` declares
        # application/x-www-form-urlencoded. Sniffing the bytes decides what the image is.
        data, body_params = await request.body(), {}
        if content_type == "application/x-www-form-urlencoded" and data and sniff_format(data) is None:
            # Most likely `curl -d image=...`: say what works instead of only "not an image".
            raise ServiceError(
                415,
                "unsupported_media_type",
                "a URL-encoded form is not accepted: send the image as the body itself "
                "(curl --data-binary @photo.jpg) or as the field 'image' of multipart/form-data "
                "(curl -F image=@photo.jpg)",
                reason="unsupported_type",
            )
    # A parameter in both places takes the body's value (a list of classes replaces the query's):
    # the body is what the client composed for this request, a query may carry a base URL's defaults.
    # The query is still checked on its own: an invalid value is refused wherever it is.
    query = _multi(list(request.query_params.multi_items()))
    if query and body_params:
        validate_params(query)
    params = query | body_params
    if not data:
        raise bad_request("the request carries no image")
    return data, validate_params(params)


def validate_params(params: dict[str, Any]) -> SegmentParams:
    try:
        return SegmentParams.model_validate(params)
    except ValidationError as error:
        # One entry per parameter, named as the client named it: a value that fits no member of
        # a union (image_id: an integer or a short string) gets pydantic's message for each, not
        # its internal member names.
        problems: dict[str, list[str]] = {}
        for item in error.errors():
            where = str(item["loc"][0]) if item["loc"] else ""
            if len(item["loc"]) > 1 and isinstance(item["loc"][1], int):
                where += f"[{item['loc'][1]}]"  # an item of a list (classes)
            message = item["msg"].removeprefix("Value error, ")
            if message not in problems.setdefault(where, []):
                problems[where].append(message)
        parts = [
            f"{where}: {' or '.join(messages)}" if where else " or ".join(messages)
            for where, messages in problems.items()
        ]
        raise invalid_parameter("; ".join(parts)) from None
