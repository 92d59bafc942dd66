"""Image files and opened PIL images -> upright uint8 RGB arrays: the one pixel conversion shared
by the training data, the command line and the service's upload decoder.

- Kept apart from ``model.datasets.coco`` so that a reader of images does not import the training data's
  machinery (``torch.utils.data``, ``pycocotools.coco``).
- Encoded bytes are opened by ``open_image`` so that Pillow decodes them in one native call, which
  releases the GIL once. Left to itself Pillow decodes 64 KB at a time, and a PNG one IDAT chunk
  (8-64 KB) at a time, taking the GIL back between pieces; in a server whose event loop is busy,
  each of those hand-overs can wait a whole switch interval (5 ms).
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

__all__ = ["DatasetError", "load_image_rgb", "open_image", "image_to_rgb", "without_object_reprs"]

PathLike = Union[str, Path]


# Pillow names the file object in its messages ("cannot identify image file <_io.BytesIO object at
# 0x7f...>"): the address tells a reader nothing, and heap addresses are not for the outside.
_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


def without_object_reprs(message: str, name: str) -> str:
    """``message`` with every object repr replaced by ``name`` (what the object was)."""
    return _OBJECT_REPR.sub(name, message)


class DatasetError(Exception):
    """A data set that cannot be used; the message names the file and the image/annotation id.

    Defined here, with the lowest reader that raises it (a missing or undecodable image file), so
    that one exception covers input images and data sets alike; ``model.datasets.coco`` imports it from here."""


def load_image_rgb(path: PathLike) -> np.ndarray:
    """An image file -> uint8 RGB array [H, W, 3], upright according to its EXIF orientation.

    Any mode is converted: alpha is dropped (as detectron2), palette/CMYK/grey become RGB, and
    16-bit grey (``I;16``, ``I``) is scaled by 1/257 to 0..255 rather than clipped.
    """
    path = Path(path)
    if path.is_dir():
        raise DatasetError(f"{path}: a folder, not an image file (give the files, e.g. {path / '*.jpg'})")
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with open_image(path.read_bytes()) as image:
            return image_to_rgb(image)
    # Pillow reports corrupt files with many exception types (OSError, SyntaxError, struct.error...).
    except Exception as error:  # noqa: BLE001
        message = without_object_reprs(str(error), path.name)
        raise DatasetError(f"{path}: cannot read image ({type(error).__name__}: {message})") from None


def open_image(data: bytes, formats: Sequence[str] | None = None) -> Image.Image:
    """Encoded image bytes -> an opened (not yet decoded) PIL image whose pixels are decoded in
    one call to Pillow's native decoder; ``formats`` as ``Image.open``'s."""
    if data.startswith(_PNG_SIGNATURE):
        data = _with_one_idat(data)
    image = Image.open(io.BytesIO(data), formats=formats)
    image.decodermaxblock = max(image.decodermaxblock, len(data))  # how much each decoder call gets
    return image


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _with_one_idat(data: bytes) -> bytes:
    """A PNG with its consecutive IDAT chunks joined into one, which is the same PNG: the pixels
    are one zlib stream split across chunks at arbitrary points. Pillow decodes each IDAT chunk
    in a call of its own. Anything unusual (a chunk list cut short, IDATs apart) is left as is."""
    # The stream is gathered as it is found, never as a list of pieces: an upload of a million
    # empty chunks must not cost a million Python objects.
    offset, first, end, count, stream = len(_PNG_SIGNATURE), -1, -1, 0, bytearray()
    while offset + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        after = offset + 12 + length  # length, type, data, CRC
        if kind == b"IDAT":
            if first >= 0 and offset != end:
                return data
            first = offset if first < 0 else first
            stream += memoryview(data)[offset + 8 : offset + 8 + length]
            end, count = after, count + 1
        if kind == b"IEND":
            break
        offset = after
    if count < 2 or end > len(data):
        return data
    checksum = zlib.crc32(stream, zlib.crc32(b"IDAT"))
    chunk = (struct.pack(">I4s", len(stream), b"IDAT"), stream, struct.pack(">I", checksum))
    return b"".join((data[:first], *chunk, data[end:]))


def image_to_rgb(image: Image.Image) -> np.ndarray:
    """An opened PIL image (file or bytes; the first frame if animated) -> uint8 RGB [H, W, 3],
    upright by its EXIF orientation, any mode converted as ``load_image_rgb`` says."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)  # a copy, so only when there is something to turn
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 255).round().astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return _rgb_in_strips(image)


# Rows per strip of ``_rgb_in_strips``: about 4 MB of RGB at a time.
_STRIP_BYTES = 4 * 1024 * 1024


def _rgb_in_strips(image: Image.Image) -> np.ndarray:
    """``np.asarray(image.convert("RGB"))`` with one full-size copy of the pixels instead of up
    to three (the conversion, and the bytes Pillow hands numpy, which it joins from pieces): for
    a 40-megapixel upload, hundreds of megabytes. Mode conversions are per pixel, so converting
    strip by strip gives the same values."""
    width, height = image.size
    out = np.empty((height, width, 3), dtype=np.uint8)  # [H, W, 3]
    rows = max(1, _STRIP_BYTES // (3 * width))
    for top in range(0, height, rows):
        strip = image if rows >= height else image.crop((0, top, width, min(height, top + rows)))
        out[top : top + strip.height] = np.asarray(strip if strip.mode == "RGB" else strip.convert("RGB"))
    return out
