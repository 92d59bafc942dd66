"""Turning user images into the network's padded BGR batch, as detectron2's test-time input."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transfiner.model.config import InputConfig
from transfiner.model.transfer import to_device

ImageLike = Union[np.ndarray, Image.Image, torch.Tensor]


def to_rgb_tensor(image: ImageLike) -> torch.Tensor:
    """An RGB image -> uint8 or float tensor [3, H, W] with values in 0..255.

    Accepts a PIL image (any mode), a numpy array [H, W], [H, W, 3] or [H, W, 4] (uint8 or
    float in 0..255), or a tensor [3, H, W] / [H, W, 3]. Grayscale is repeated; alpha dropped.
    """
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if isinstance(image, np.ndarray):
        # A copy: arrays may be read-only (np.asarray of a PIL image) or non-contiguous.
        tensor = torch.from_numpy(np.array(image))
        channels_last = True
    elif isinstance(image, torch.Tensor):
        tensor = image
        channels_last = tensor.ndim == 3 and tensor.shape[0] not in (1, 3, 4) and tensor.shape[-1] in (1, 3, 4)
    else:
        raise TypeError(f"expected a numpy array, PIL image or tensor, got {type(image).__name__}")
    if tensor.ndim == 2:
        tensor = tensor[None]
    elif tensor.ndim == 3 and channels_last:
        tensor = tensor.permute(2, 0, 1)
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape [H, W], [H, W, C] or [C, H, W], got {tuple(image.shape)}")
    if tensor.shape[1] < 1 or tensor.shape[2] < 1:
        raise ValueError(f"empty image of shape {tuple(image.shape)}")
    if tensor.is_floating_point() and 0 < float(tensor.amax()) <= 1:
        # A common slip (torchvision's ToTensor scales to 0..1); the model then sees a black image.
        warnings.warn("a float image with values in 0..1: the model expects 0..255 (multiply by 255)", stacklevel=3)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[:3]


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Detectron2's ``ResizeShortestEdge`` output size (rounded half up), never below 1 a side.

    Past an aspect ratio of about ``2 * max_size / short_edge`` (1281x1 at 800/1333) the long-edge
    cap shrinks the short side below half a pixel; detectron2 rounds it to 0 and its resize
    raises. Keeping 1 pixel leaves every size detectron2 can run unchanged and makes such an
    image a valid (if uninformative) input rather than a failure of its whole batch.
    """
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def network_shape(height: int, width: int, cfg: InputConfig) -> tuple[int, int]:
    """(h, w) the network sees an image of this (original) size at: its test-time resize."""
    return resized_shape(height, width, cfg.min_size_test, cfg.max_size_test)


def _round_up(size: int, divisor: int) -> int:
    return (size + divisor - 1) // divisor * divisor


def padded_shape(height: int, width: int, cfg: InputConfig) -> tuple[int, int]:
    """(H, W) of the canvas a network-size (h, w) image is padded to alone: each side rounded up
    to ``size_divisibility``. Training pads its (jittered) samples the same way."""
    return _round_up(height, cfg.size_divisibility), _round_up(width, cfg.size_divisibility)


def canvas_shape(height: int, width: int, cfg: InputConfig) -> tuple[int, int]:
    """(H, W) of the padded canvas an image of this (original) size runs on: its network size
    rounded up to ``size_divisibility``, as detectron2 pads a lone image.

    It depends on the image alone, so an image's answer never depends on its batch-mates as long
    as a batch only holds images of one canvas (padding is seen by every convolution near the
    border, and by GroupNorm's statistics): ``Predictor.predict`` and the service's batcher
    group by it.
    """
    return padded_shape(*network_shape(height, width, cfg), cfg)


def group_by_canvas(sizes: Sequence[tuple[int, int]], cfg: InputConfig) -> dict[tuple[int, int], list[int]]:
    """Original (h, w) sizes -> {canvas: indices of the images on it}, in input order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (height, width) in enumerate(sizes):
        groups.setdefault(canvas_shape(height, width, cfg), []).append(i)
    return groups


def resize_image(image: torch.Tensor, size: tuple[int, int], device: torch.device | str) -> torch.Tensor:
    """RGB [3, H, W] (uint8 or float, 0..255) -> BGR float32 [3, h, w] resized to ``size``.

    Antialiased bilinear, as PIL's resize in detectron2's ``ResizeShortestEdge``. The one resize
    of the test-time input: the Predictor, the exporters' checks and the service all use it.
    """
    size = tuple(size)
    if torch.device(device).type == "cpu" and image.device.type == "cpu" and size != tuple(image.shape[-2:]):
        return _resize_on_cpu(image, size).clamp_(0, 255)
    x = image.to(device=device, dtype=torch.float32).flip(0)[None]  # RGB -> BGR, [1, 3, H, W]
    if size != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x[0].clamp_(0, 255)


# Rows of the input converted to float at a time by ``_resize_on_cpu``.
_BAND_ROWS = 256


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[H, W] float -> [h, w], antialiased bilinear."""
    return F.interpolate(x[None, None], size=size, mode="bilinear", align_corners=False, antialias=True)[0, 0]


def _resize_on_cpu(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``resize_image`` for a CPU tensor, in bounded memory: the same values to the bit.

    The one-call form converts the whole upload to float32 and flips it first (for a 40-megapixel
    upload two copies of 480 MB each). The antialiased resize is separable and treats channels
    alike, so it runs per channel, the width pass on bands of rows (converted through one float
    buffer: a fresh one per band fragments the heap by hundreds of megabytes) and the height pass
    on the [H, w] result, channels taken in BGR order. tests/model/inference/test_predictor.py checks the equality.
    """
    height, width = image.shape[-2:]
    band = torch.empty(min(_BAND_ROWS, height), width)  # one float buffer, reused for every band
    channels = []
    for index in (2, 1, 0):  # BGR; not image.flip(0), which would copy the whole upload
        rows = []
        for top in range(0, height, _BAND_ROWS):
            part = band[: min(_BAND_ROWS, height - top)]
            part.copy_(image[index, top : top + part.shape[0]])
            rows.append(_resize(part, (part.shape[0], size[1])))
        channels.append(_resize(torch.cat(rows), size))  # [H, w] -> [h, w]
    return torch.stack(channels)


def prepare_batch(
    images: list[torch.Tensor], cfg: InputConfig, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB [3, H, W] tensors -> (batch [B, 3, Hp, Wp] float BGR 0..255, sizes [B, 2] (h, w)).

    - Each image is resized so its short edge is ``min_size_test`` (long edge at most
      ``max_size_test``) by ``resize_image``. Padding is filled with the pixel mean, so it is 0
      after the model's normalisation, as detectron2 pads normalised images with 0.
    - Images of one ``canvas_shape`` give each exactly the canvas it has alone. Images of several
      canvases are padded to the smallest canvas holding them all (what the export checks feed the
      graphs); their answers then depend on the batch, so callers that must not (the Predictor, the
      service) batch one canvas at a time.
    """
    resized = [resize_image(image, network_shape(*image.shape[-2:], cfg), device) for image in images]
    return pad_batch(resized, cfg)


def pad_batch(images: list[torch.Tensor], cfg: InputConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """BGR [3, h, w] float tensors -> (padded batch [B, 3, Hp, Wp], sizes [B, 2] int64).

    (Hp, Wp): the largest (h, w), each rounded up to ``size_divisibility``; for images of one
    canvas, that canvas."""
    pad_h, pad_w = padded_shape(max(img.shape[1] for img in images), max(img.shape[2] for img in images), cfg)
    device = images[0].device
    mean = to_device(torch.tensor(cfg.pixel_mean), device).view(3, 1, 1)
    batch = mean.expand(len(images), 3, pad_h, pad_w).clone()
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]] = img
    sizes = to_device(torch.tensor([[img.shape[1], img.shape[2]] for img in images], dtype=torch.int64), device)
    return batch, sizes
