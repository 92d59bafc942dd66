"""Uploaded bytes -> an upright RGB array, decided by the bytes themselves, never the declared type.

- The format is sniffed from magic bytes, Pillow is then told to try only that format (no other
  plugin ever parses the upload), the pixel count is checked from the header before anything is
  decoded, and the pixels go through the same opening (one native decoder call for the whole upload)
  and conversion as ``model.inference.images.load_image_rgb`` (EXIF orientation; grey, palette, CMYK, alpha
  and 16-bit modes). Animated images give their first frame.
- Given ``reduce_to``, a JPEG is decoded by libjpeg's reduced DCT (Pillow's draft mode: 1/2, 1/4 or
  1/8 scale) to the smallest such size that is still at least what the network needs, which is
  several times faster and holds a fraction of the memory for large photos. The pixels then differ
  slightly from a full decode followed by the resize; other formats are always decoded in full.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image

from transfiner.model.inference.images import image_to_rgb, open_image
from transfiner.service.errors import ServiceError

__all__ = ["DecodedImage", "sniff_format", "decode_image", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


# (height, width) of an upright image -> the least (height, width) its pixels are needed at.
SizeNeeded = Callable[[int, int], tuple[int, int]]

# EXIF orientations that swap width and height (transpose, 90, transverse, 270).
_SWAPS_AXES = {5, 6, 7, 8}


@dataclass
class DecodedImage:
    rgb: np.ndarray  # [h, w, 3] uint8, upright; smaller than ``size`` when decoded in draft mode
    format: str
    size: tuple[int, int]  # (height, width) of the image itself, upright: the output coordinates

    @property
    def height(self) -> int:
        return self.size[0]

    @property
    def width(self) -> int:
        return self.size[1]


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name of ``data`` from its leading bytes, or None if not supported."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(b"BM"):
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def decode_image(data: bytes, max_pixels: int, reduce_to: SizeNeeded | None = None) -> DecodedImage:
    """Decodes an upload; raises ``ServiceError`` 415 (not a supported image), 413 (more than
    ``max_pixels``) or 422 (a supported format that does not decode: corrupt or truncated).

    ``reduce_to``: what size the caller needs the pixels at; JPEGs are then decoded at a reduced
    scale, never below it (``DecodedImage.size`` stays the image's own size)."""
    if not data:
        raise ServiceError(400, "bad_request", "the request carries no image", reason="bad_image")
    fmt = sniff_format(data)
    if fmt is None:
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"not a supported image: the bytes are none of {', '.join(SUPPORTED_FORMATS)}",
            reason="unsupported_type",
        )
    try:
        with open_image(data, formats=[fmt]) as image:
            # Checked from the header, before a single pixel is decoded.
            width, height = image.size
            if width * height > max_pixels:
                raise ServiceError(
                    413,
                    "image_too_large",
                    f"image has {width}x{height} = {width * height} pixels, more than the limit {max_pixels}",
                    reason="too_large",
                )
            size = _upright_size(image)
            if reduce_to is not None and fmt == "JPEG":
                _draft(image, size, reduce_to(*size))
            # Multi-frame files (GIF, WEBP, TIFF) open on their first frame already.
            rgb = image_to_rgb(image)
    except ServiceError:
        raise
    except Image.DecompressionBombError as error:
        # Pillow's own guard (twice its MAX_IMAGE_PIXELS) fires in ``Image.open``, before ours;
        # its message gives the pixel count, and its own limit, which is not the client's concern.
        counted = re.search(r"\((\d+) pixels\)", str(error))
        pixels = f"{int(counted.group(1))} pixels" if counted else "more pixels"
        limit = min(max_pixels, 2 * Image.MAX_IMAGE_PIXELS)  # the lower of the two is the one that applies
        raise ServiceError(
            413,
            "image_too_large",
            f"image has {pixels}, more than the limit {limit}",
            reason="too_large",
        ) from None
    # Pillow reports corrupt data with many exception types (OSError, SyntaxError, struct.error...).
    except Exception as error:  # noqa: BLE001
        raise ServiceError(
            422,
            "invalid_image",
            f"cannot decode the {fmt} image ({type(error).__name__}: {error})",
            reason="bad_image",
        ) from None
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ServiceError(422, "invalid_image", f"image has no pixels ({rgb.shape})", reason="bad_image")
    return DecodedImage(np.ascontiguousarray(rgb), fmt, size)


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(height, width) once the EXIF orientation is applied, from the header alone."""
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation)
    return (width, height) if orientation in _SWAPS_AXES else (height, width)


def _draft(image: Image.Image, upright: tuple[int, int], needed: tuple[int, int]) -> None:
    """Asks the JPEG decoder for the largest reduction (1/2, 1/4, 1/8) that keeps the image at
    least ``needed`` (upright (h, w)); Pillow never picks a scale below the requested size."""
    needed_h, needed_w = needed
    if upright != (image.height, image.width):  # stored on its side: so is the request
        needed_h, needed_w = needed_w, needed_h
    image.draft("RGB", (needed_w, needed_h))
