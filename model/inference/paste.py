"""Binary masks from the soft ones, sampled only inside the small window around each box.

- A detection can only be foreground inside the small integer window around its box
  (``box_windows``), so only those windows are sampled (``sample_windows``, batched over
  detections).
- ``paste_windows``: each detection's window mask and where it sits; ``paste_masks``: full-image
  masks, built only when asked for.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from transfiner.model.transfer import to_device

__all__ = ["box_windows", "sample_windows", "paste_windows", "crop_windows", "paste_masks", "count_masks"]

# A group of windows sampled together holds at most this many (padded) pixels, or one window:
# bounds the [n, h, w, 2] float32 sampling grid (32 MB) however many large boxes there are.
_GROUP_PIXELS = 1 << 22
# ... and pads to its largest window by at most this factor over the pixels it really needs. On
# the CPU a padded pixel costs as much as a real one (1.25 was fastest at 1 and 2 threads on
# scripts/bench_postprocess.py; 1.5 at 16, by 15%); on a GPU padding is nearly free and every
# group costs kernel launches and a sync: fewer, fuller groups.
_GROUP_WASTE = {"cpu": 1.25}
_GROUP_WASTE_ACCELERATOR = 8.0


def box_windows(boxes: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """The pixels ``paste_masks`` samples for each box, as [N, 4] int64 (x0, y0, x1, y1).

    detectron2's integer window ``[floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1)``
    of the float32 box, clipped to the image. Every pixel outside it is background. Boxes with
    zero, negative or NaN width or height (or non-finite corners) and boxes entirely outside the
    image give an empty window, all zeros.
    """
    height, width = int(image_size[0]), int(image_size[1])
    # float32 as the sampling sees them; float64 holds them exactly for floor/ceil.
    b = boxes.detach().to(torch.float32).cpu().numpy().astype(np.float64).reshape(-1, 4)  # [N, 4]
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(b).all(axis=1) & (b[:, 2] - b[:, 0] > 0) & (b[:, 3] - b[:, 1] > 0)
    b = np.where(ok[:, None], b, 0.0)
    # Clipping both ends to the image keeps the ints small and an outside box's window empty.
    x0 = np.clip(np.floor(b[:, 0]) - 1, 0, width)
    x1 = np.clip(np.ceil(b[:, 2]) + 1, 0, width)
    y0 = np.clip(np.floor(b[:, 1]) - 1, 0, height)
    y1 = np.clip(np.ceil(b[:, 3]) + 1, 0, height)
    windows = np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)  # [N, 4]
    empty = ~ok | (windows[:, 2] <= windows[:, 0]) | (windows[:, 3] <= windows[:, 1])
    windows[empty] = 0
    return windows


def _window_groups(windows: np.ndarray, device: torch.device) -> list[np.ndarray]:
    """Indices of the non-empty windows, grouped to be sampled together: largest first, a group
    closed when padding to its largest height and width would waste too much or hold too many
    pixels. One launch per group instead of per box, without one big box padding all the others."""
    widths = (windows[:, 2] - windows[:, 0]).tolist()  # Python ints: the loop stays cheap
    heights = (windows[:, 3] - windows[:, 1]).tolist()
    areas = [w * h for w, h in zip(widths, heights)]
    order = sorted((i for i in range(len(areas)) if areas[i] > 0), key=lambda i: -areas[i])
    waste = _GROUP_WASTE.get(device.type, _GROUP_WASTE_ACCELERATOR)
    groups: list[list[int]] = []
    group: list[int] = []
    need = pad_w = pad_h = 0
    for i in order:
        w, h = max(pad_w, widths[i]), max(pad_h, heights[i])
        padded = (len(group) + 1) * w * h
        if group and (padded > _GROUP_PIXELS or padded > waste * (need + areas[i])):
            groups.append(group)
            group, need, w, h = [], 0, widths[i], heights[i]
        group.append(i)
        need, pad_w, pad_h = need + areas[i], w, h
    if group:
        groups.append(group)
    return [np.asarray(g, dtype=np.int64) for g in groups]


def sample_windows(
    mask_probs: torch.Tensor, boxes: torch.Tensor, windows: np.ndarray, threshold: float = 0.5
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Binarized soft masks sampled inside their windows, a group of detections per ``grid_sample``.

    Same result as detectron2 v0.5 ``paste_masks_in_image`` on CPU: the centre of pixel (x, y),
    i.e. (x + 0.5, y + 0.5), is mapped to the box's normalized coordinates and the mask is sampled
    bilinearly (``align_corners=False``, zeros outside the mask), in float32, with the same
    operations in the same order as one box at a time, so grouping changes no pixel.

    Args:
        mask_probs: [N, S, S] float mask probabilities (any S, any float dtype).
        boxes: [N, 4] xyxy boxes in output-image pixels.
        windows: [N, 4] int (x0, y0, x1, y1) from ``box_windows``; empty ones are skipped.
        threshold: a pixel is foreground when its sampled probability >= threshold.

    Yields:
        (group [g] int64 detection indices, [g, h, w] bool on the device of ``mask_probs``), h and
        w the group's largest window height and width: detection ``group[j]``'s window is at the
        top left, [j, :y1 - y0, :x1 - x0], and False beyond it.
    """
    groups = _window_groups(windows, mask_probs.device)
    if not groups:
        return
    device = mask_probs.device
    sizes = windows[:, 2:] - windows[:, :2]  # [N, 2] (w, h)
    width, height = (int(v) for v in sizes.max(axis=0))
    origin = to_device(windows[:, :2], device)  # [N, 2] (x0, y0)
    extent = to_device(sizes, device)  # [N, 2] (w, h)
    boxes = to_device(boxes, device).to(torch.float32)  # [N, 4]
    # On the CPU grid_sample runs the items of its batch in parallel: a group of fewer windows
    # than threads is cut into strips of rows, one item each, to keep every thread busy.
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    cols = torch.arange(width, device=device)  # [W]
    rows = torch.arange(height + threads, device=device)  # [H'], room to round strips up
    # The grid is separable: one row of x and one column of y coordinates per detection.
    xs = (origin[:, :1] + cols).to(torch.float32)  # [N, W] pixel x, exact integers
    ys = (origin[:, 1:] + rows).to(torch.float32)  # [N, H']
    gx = (xs + 0.5 - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1  # [N, W]
    gy = (ys + 0.5 - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1  # [N, H']
    # |g| >= 2 already samples zero for any S >= 1; clamping keeps sub-pixel boxes from
    # producing inf coordinates without changing any result. Beyond its window (padding, and
    # all of an empty window's NaN/inf) a detection samples there too: zero, background for
    # any threshold > 0.
    inside_x = cols < extent[:, :1]  # [N, W]
    inside_y = rows < extent[:, 1:]  # [N, H']
    gx = torch.where(inside_x, gx.clamp(-2, 2), 2.0)
    gy = torch.where(inside_y, gy.clamp(-2, 2), 2.0)
    probs = mask_probs.to(torch.float32)  # [N, S, S]
    for group in groups:
        index = to_device(group, device)
        g = len(group)
        w, h = (int(v) for v in sizes[group].max(axis=0))
        strips = min(h, -(-threads // g))
        strip = -(-h // strips)  # rows per strip; strips * strip < h + threads
        grid = torch.empty(g, strips * strip, w, 2, device=device)  # [g, h', w, 2] as (x, y)
        grid[..., 0] = gx[index, None, :w]
        grid[..., 1] = gy[index, : strips * strip, None]
        items = probs[index if strips == 1 else index.repeat_interleave(strips), None]  # [g * strips, 1, S, S]
        sampled = F.grid_sample(items, grid.view(g * strips, strip, w, 2), mode="bilinear", align_corners=False)
        binary = (sampled.view(g, strips * strip, w) >= threshold)[:, :h]  # [g, h, w]
        if not threshold > 0:  # then the padding's zeros pass: mask it out (a rare threshold)
            binary &= inside_y[index, :h, None] & inside_x[index, None, :w]
        yield group, binary


def paste_windows(
    mask_probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int], threshold: float = 0.5
) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Each detection's binary mask inside its window, and the window's top-left pixel (x, y).

    The full-image mask of detection i is ``window`` at ``[y:y + h, x:x + w]`` and False
    elsewhere; degenerate boxes give a [0, 0] window at (0, 0). Windows are on the device of
    ``mask_probs`` (views of the batch they were sampled in).
    """
    n = count_masks(mask_probs, boxes)
    windows = box_windows(boxes, image_size)  # [N, 4]
    empty = torch.zeros(0, 0, dtype=torch.bool, device=mask_probs.device)
    out: list[tuple[torch.Tensor, tuple[int, int]]] = [(empty, (0, 0))] * n
    for group, sampled in sample_windows(mask_probs, boxes, windows, threshold):
        crop_windows(out, group, sampled, windows)
    return out


def crop_windows(out: list, group: np.ndarray, sampled, windows: np.ndarray) -> None:
    """Puts each detection of ``group`` into ``out`` as (its window cut from ``sampled`` [g, h, w],
    tensor or array, where it sits at the top left; the window's top-left pixel (x, y))."""
    for window, (x0, y0, x1, y1), i in zip(sampled, windows[group].tolist(), group.tolist()):
        out[i] = (window[: y1 - y0, : x1 - x0], (x0, y0))


def paste_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """Paste per-box soft masks into the image and binarize them (``sample_windows``).

    Args:
        mask_probs: [N, S, S] float mask probabilities (any S, any float dtype).
        boxes: [N, 4] xyxy boxes in output-image pixel coordinates.
        image_size: (height, width) of the output image.
        threshold: a pixel is foreground when its sampled probability >= threshold.

    Returns:
        [N, height, width] bool masks on the device of ``mask_probs``. Boxes with
        zero (or negative, or NaN) width or height give empty masks.
    """
    height, width = int(image_size[0]), int(image_size[1])
    n = count_masks(mask_probs, boxes)
    out = torch.zeros(n, height, width, dtype=torch.bool, device=mask_probs.device)  # [N, H, W]
    for i, (window, (x0, y0)) in enumerate(paste_windows(mask_probs, boxes, image_size, threshold)):
        h, w = window.shape
        out[i, y0 : y0 + h, x0 : x0 + w] = window
    return out


def count_masks(mask_probs: torch.Tensor, boxes: torch.Tensor) -> int:
    """The number of detections; raises ValueError unless there are as many boxes as masks."""
    n = mask_probs.shape[0]
    if boxes.shape[0] != n:
        raise ValueError(f"{n} masks but {boxes.shape[0]} boxes")
    return n
