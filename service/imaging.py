"""Uploaded bytes -> an upright RGB array, decided by the bytes themselves, never the declared type.

The format is sniffed from magic bytes, Pillow is then told to try only that format (no other
plugin ever parses the upload), the pixel count is checked from the header before anything is
decoded, and the pixels go through the same conversion as ``model.data.load_image_rgb`` (EXIF
orientation; grey, palette, CMYK, alpha and 16-bit modes). Animated images give their first frame.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

# The pixel conversion shared with the training data reader; see the report for making it public.
from model.data import image_to_rgb

from .errors import ServiceError

__all__ = ["DecodedImage", "sniff_format", "decode_image", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


@dataclass
class DecodedImage:
    rgb: np.ndarray  # [H, W, 3] uint8, upright
    format: str

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])


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


def decode_image(data: bytes, max_pixels: int) -> DecodedImage:
    """Decodes an upload; raises ``ServiceError`` 415 (not a supported image), 413 (more than
    ``max_pixels``) or 422 (a supported format that does not decode: corrupt or truncated)."""
    if not data:
        raise ServiceError(400, "bad_request", "the request carries no image", reason="bad_image")
    fmt = sniff_format(data)
    if fmt is None:
        raise ServiceError(
            415, "unsupported_media_type",
            f"not a supported image: the bytes are none of {', '.join(SUPPORTED_FORMATS)}",
            reason="unsupported_type",
        )
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            # Checked from the header, before a single pixel is decoded.
            width, height = image.size
            if width * height > max_pixels:
                raise ServiceError(
                    413, "image_too_large",
                    f"image has {width}x{height} = {width * height} pixels, more than the limit {max_pixels}",
                    reason="too_large",
                )
            # Multi-frame files (GIF, WEBP, TIFF) open on their first frame already.
            rgb = image_to_rgb(image)
    except ServiceError:
        raise
    except Image.DecompressionBombError as error:
        raise ServiceError(413, "image_too_large", str(error), reason="too_large") from None
    # Pillow reports corrupt data with many exception types (OSError, SyntaxError, struct.error...).
    except Exception as error:  # noqa: BLE001
        raise ServiceError(
            422, "invalid_image", f"cannot decode the {fmt} image ({type(error).__name__}: {error})",
            reason="bad_image",
        ) from None
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ServiceError(422, "invalid_image", f"image has no pixels ({rgb.shape})", reason="bad_image")
    return DecodedImage(np.ascontiguousarray(rgb), fmt)
