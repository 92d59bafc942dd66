"""The Ray Data tasks of a bulk job: read and decode images (light: numpy, Pillow, fsspec; no torch)."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

import numpy as np

from transfiner.bulk.inputs import read_bytes
from transfiner.model.inference.images import image_to_rgb, open_image, without_object_reprs

DECODE_CPUS = 0.25  # a decode task's share: replicas may hold every whole CPU of a node
DECODE_BATCH = 8  # the most images a block holds: a decode task reads one block


def decode_images(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """A Ray Data task: read and decode a batch of locations; a failure is the row's ``error``."""
    images, errors = [], []
    for location in batch["path"]:
        try:
            data = read_bytes(str(location))
        except Exception as error:  # noqa: BLE001 (a missing file, a filesystem's own errors)
            images.append(_NO_IMAGE)
            errors.append(f"cannot read: {type(error).__name__}: {error}")
            continue
        try:
            with open_image(data) as image:
                images.append(image_to_rgb(image))
            errors.append("")
        # Pillow reports corrupt files with many exception types (OSError, SyntaxError, struct.error...).
        except Exception as error:  # noqa: BLE001
            images.append(_NO_IMAGE)
            message = without_object_reprs(str(error), PurePosixPath(str(location)).name)
            errors.append(f"cannot decode: {type(error).__name__}: {message}")
    return {**batch, "image": images, "error": np.array(errors, dtype=object)}


_NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)  # stands in for an image that failed to decode
