"""Ground-truth targets cut from full-image instance masks: RoI masks and incoherence.

Shared by training (losses) and evaluation (incoherence recall / accuracy, Tables 1 and 3 of the
paper), so both judge the detector against the same definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align


def crop_masks(masks: torch.Tensor, boxes: torch.Tensor, instance_index: torch.Tensor, size: int) -> torch.Tensor:
    """detectron2's ``BitMasks.crop_and_resize``: RoIAlign of the matched mask, then >= 0.5.

    masks [N, H, W] bool/float full-image masks; boxes [R, 4] xyxy; instance_index [R] picks the
    mask of each box. Returns bool [R, size, size].
    """
    rois = torch.cat((instance_index[:, None].to(boxes.dtype), boxes), dim=1)
    crops = roi_align(masks[:, None].to(boxes.dtype), rois, size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return crops[:, 0] >= 0.5


def incoherence_maps(masks: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Where a mask loses information when down- and up-sampled (official ``get_incoherent_mask``).

    masks [N, H, W] -> float [N, H // factor, W // factor]: bilinear down, bilinear up, absolute
    residue, bilinear down again; values >= 0.01 become 1 (smaller ones keep their value).
    """
    mask = masks[:, None].float()
    height, width = mask.shape[-2:]
    small = (height // factor, width // factor)
    recovered = F.interpolate(F.interpolate(mask, size=small, mode="bilinear"), size=(height, width), mode="bilinear")
    residue = F.interpolate((mask - recovered).abs(), size=small, mode="bilinear")[:, 0]
    return torch.where(residue >= 0.01, torch.ones_like(residue), residue)


def gt_incoherence(
    masks: torch.Tensor, boxes: torch.Tensor, instance_index: torch.Tensor, size: int = 28, factor: int = 2
) -> torch.Tensor:
    """Ground-truth incoherence of each box on its ``size x size`` grid, as the official code.

    The half-resolution incoherence map of the box's matched instance is RoIAligned with the
    box (scaled by 1/factor) and thresholded at 0.05. The official code recomputes the map for
    every proposal; it only depends on the instance, so it is computed once per instance here.
    Returns bool [R, size, size].
    """
    maps = incoherence_maps(masks, factor)  # [N, H/f, W/f]
    rois = torch.cat((instance_index[:, None].to(boxes.dtype), boxes / factor), dim=1)
    crops = roi_align(maps[:, None].to(boxes.dtype), rois, size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return crops[:, 0] >= 0.05


def mask_boundary(masks: torch.Tensor) -> torch.Tensor:
    """Pixels where dilation and erosion (4-neighbour cross) differ: bool [R, S, S] -> [R, S, S].

    The target of the official boundary branch (skimage's ``binary_dilation != binary_erosion``
    with its default cross-shaped element; skimage's erosion treats outside the grid as
    foreground, its dilation as background).
    """
    x = masks[:, None].float()
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=x.device).view(1, 1, 3, 3)
    dilated = F.conv2d(F.pad(x, (1, 1, 1, 1), value=0.0), cross) > 0
    eroded = F.conv2d(F.pad(x, (1, 1, 1, 1), value=1.0), cross) >= 5
    return (dilated != eroded)[:, 0]
