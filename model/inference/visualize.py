"""Overlay pictures of predictions: translucent masks, box outlines and labels."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def instance_colors(count: int) -> list[tuple[int, int, int]]:
    """Well-separated colours (golden-ratio hue steps), the same for every run."""
    colors = []
    for i in range(count):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def draw_overlay(
    image: np.ndarray, boxes: np.ndarray, masks: np.ndarray, labels: list[str], alpha: float = 0.5
) -> Image.Image:
    """image [H, W, 3] uint8 RGB, boxes [N, 4] xyxy, masks [N, H, W] bool -> PIL image."""
    canvas = image.astype(np.float32).copy()
    colors = instance_colors(len(boxes))
    for mask, color in zip(masks, colors):
        canvas[mask] = canvas[mask] * (1 - alpha) + np.array(color, dtype=np.float32) * alpha
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for box, label, color in zip(boxes, labels, colors):
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=2)
        draw.text((x0 + 2, y0 + 1), label, fill=color)
    return picture


def prediction_overlay(image: np.ndarray, prediction, class_names: Sequence[str]) -> Image.Image:
    """A ``Prediction``'s overlay on its image, each instance labelled "<class> <score>"."""
    labels = [f"{class_names[c]} {s:.2f}" for c, s in zip(prediction.classes, prediction.scores)]
    return draw_overlay(image, prediction.boxes, prediction.masks, labels)
