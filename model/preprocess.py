"""Turning user images into the network's padded BGR batch, as detectron2's test-time input."""

from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import InputConfig

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
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[:3]


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """Detectron2's ``ResizeShortestEdge`` output size (rounded half up)."""
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


def prepare_batch(
    images: list[torch.Tensor], cfg: InputConfig, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB [3, H, W] tensors -> (batch [B, 3, Hp, Wp] float BGR 0..255, sizes [B, 2] (h, w)).

    Each image is resized so its short edge is ``min_size_test`` (long edge at most
    ``max_size_test``) with antialiased bilinear interpolation, as PIL's resize in detectron2.
    Padding (to a multiple of ``size_divisibility``) is filled with the pixel mean, so it is 0
    after the model's normalisation, as detectron2 pads normalised images with 0.
    """
    resized = []
    for image in images:
        height, width = image.shape[-2:]
        new_h, new_w = resized_shape(height, width, cfg.min_size_test, cfg.max_size_test)
        x = image.to(device=device, dtype=torch.float32).flip(0)[None]  # RGB -> BGR
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        resized.append(x[0].clamp_(0, 255))
    return pad_batch(resized, cfg)


def pad_batch(images: list[torch.Tensor], cfg: InputConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """BGR [3, h, w] float tensors -> (padded batch [B, 3, Hp, Wp], sizes [B, 2] int64)."""
    divisor = cfg.size_divisibility
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    pad_h = (max_h + divisor - 1) // divisor * divisor
    pad_w = (max_w + divisor - 1) // divisor * divisor
    device = images[0].device
    mean = torch.tensor(cfg.pixel_mean, device=device).view(3, 1, 1)
    batch = mean.expand(len(images), 3, pad_h, pad_w).clone()
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]] = img
    sizes = torch.tensor([[img.shape[1], img.shape[2]] for img in images], dtype=torch.int64, device=device)
    return batch, sizes
