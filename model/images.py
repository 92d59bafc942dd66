"""Image files and opened PIL images -> upright uint8 RGB arrays: the one pixel conversion shared
by the training data, the command line and the service's upload decoder.

Kept apart from ``model.data`` so that a reader of images does not import the training data's
machinery (``torch.utils.data``, ``pycocotools.coco``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

__all__ = ["DatasetError", "load_image_rgb", "image_to_rgb"]

PathLike = Union[str, Path]


class DatasetError(Exception):
    """A data set that cannot be used; the message names the file and the image/annotation id.

    Defined here, with the lowest reader that raises it (a missing or undecodable image file), so
    that one exception covers input images and data sets alike; ``model.data`` re-exports it."""


def load_image_rgb(path: PathLike) -> np.ndarray:
    """An image file -> uint8 RGB array [H, W, 3], upright according to its EXIF orientation.

    Any mode is converted: alpha is dropped (as detectron2), palette/CMYK/grey become RGB, and
    16-bit grey (``I;16``, ``I``) is scaled by 1/257 to 0..255 rather than clipped.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with Image.open(path) as image:
            return image_to_rgb(image)
    # Pillow reports corrupt files with many exception types (OSError, SyntaxError, struct.error...).
    except Exception as error:  # noqa: BLE001
        raise DatasetError(f"{path}: cannot read image ({type(error).__name__}: {error})") from None


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
        strip = image.crop((0, top, width, min(height, top + rows)))
        out[top : top + strip.height] = np.asarray(strip if strip.mode == "RGB" else strip.convert("RGB"))
    return out
