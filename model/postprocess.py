"""Backend-independent post-processing: soft instance masks -> image masks -> COCO RLE.

Every backend (eager PyTorch, TorchScript, ONNX Runtime) ends with per-detection
mask probabilities and boxes; this module is the one place that turns them into
full-image masks, so all backends produce identical results.
"""

from __future__ import annotations

import math

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

__all__ = ["paste_masks", "encode_rle"]


def paste_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
) -> torch.Tensor:
    """Paste per-box soft masks into the image and binarize them.

    Same result as detectron2 v0.5 ``paste_masks_in_image`` on CPU: the centre of
    pixel (x, y), i.e. (x + 0.5, y + 0.5), is mapped to the box's normalized
    coordinates and the mask is sampled bilinearly (``align_corners=False``,
    zeros outside the mask). Only pixels in the integer window
    ``[floor(x0) - 1, ceil(x1) + 1) x [floor(y0) - 1, ceil(y1) + 1)`` clipped to
    the image are sampled; every other pixel is False.

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
    n = mask_probs.shape[0]
    if boxes.shape[0] != n:
        raise ValueError(f"{n} masks but {boxes.shape[0]} boxes")
    device = mask_probs.device
    out = torch.zeros(n, height, width, dtype=torch.bool, device=device)  # [N, H, W]
    if n == 0:
        return out

    probs = mask_probs.to(torch.float32)[:, None]  # [N, 1, S, S]
    boxes = boxes.to(device=device, dtype=torch.float32)  # [N, 4]
    # One host copy of the boxes: window bounds are Python ints, and this avoids
    # a device sync per detection on CUDA.
    boxes_host = boxes.cpu().tolist()
    for i, (x0, y0, x1, y1) in enumerate(boxes_host):
        if not (x1 - x0 > 0 and y1 - y0 > 0):
            continue  # degenerate box: division by zero would give NaN/inf grids
        xa, xb = max(math.floor(x0) - 1, 0), min(math.ceil(x1) + 1, width)
        ya, yb = max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, height)
        if xb <= xa or yb <= ya:
            continue  # box entirely outside the image

        bx0, by0, bx1, by1 = boxes[i]  # tensors, so arithmetic stays in float32
        gx = (torch.arange(xa, xb, device=device, dtype=torch.float32) + 0.5 - bx0) / (bx1 - bx0) * 2 - 1
        gy = (torch.arange(ya, yb, device=device, dtype=torch.float32) + 0.5 - by0) / (by1 - by0) * 2 - 1
        # |g| >= 2 already samples zero for any S >= 1; clamping keeps sub-pixel
        # boxes from producing inf coordinates without changing any result.
        gx, gy = gx.clamp(-2, 2), gy.clamp(-2, 2)
        grid = torch.stack(
            [gx[None, :].expand(yb - ya, -1), gy[:, None].expand(-1, xb - xa)], dim=-1
        )  # [h, w, 2] as (x, y)
        sampled = F.grid_sample(probs[i : i + 1], grid[None], mode="bilinear", align_corners=False)
        out[i, ya:yb, xa:xb] = sampled[0, 0] >= threshold  # [h, w]
    return out


def encode_rle(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """Encode binary masks as COCO compressed RLE.

    Args:
        masks: [N, H, W] bool (or 0/1 integer) torch tensor (any device) or numpy array.

    Returns:
        N dicts ``{"size": [H, W], "counts": str}``: JSON-serializable, and
        ``pycocotools.mask.decode`` accepts them as they are.
    """
    if masks.ndim != 3:
        raise ValueError(f"expected [N, H, W] masks, got shape {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants a Fortran-ordered uint8 [H, W, N], i.e. the memory of a
    # C-ordered [N, W, H]: transpose (on the GPU if the tensor is there), copy once.
    if isinstance(masks, torch.Tensor):
        nwh = masks.transpose(1, 2).to(torch.uint8, memory_format=torch.contiguous_format)
        nwh = nwh.cpu().numpy()
    else:
        nwh = np.asarray(masks).transpose(0, 2, 1).astype(np.uint8, order="C")
    rles = mask_util.encode(nwh.transpose(2, 1, 0))  # [H, W, N], Fortran order
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
