"""COCO compressed RLE of the masks, encoded straight from the windows around the boxes.

- ``masks_to_rle``: ``encode_rle(paste_masks(...))`` byte for byte, without full-image masks.
- Its device half (``window_changes``: where each window column changes value) and its host half
  (``changes_on_host``, ``rles_from_changes``) are apart, so several images share one copy.
- ``encode_rle``: RLE of full-image binary masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

from transfiner.model.inference.paste import box_windows, count_masks, sample_windows

__all__ = ["masks_to_rle", "WindowChanges", "window_changes", "changes_on_host", "rles_from_changes", "encode_rle"]


def masks_to_rle(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
) -> list[dict]:
    """``encode_rle(paste_masks(...))``, byte for byte, without building full-image masks.

    COCO RLE runs down the columns (index x * H + y, first run background). Outside its window
    a detection is background, so every change of value is at a window column's pixel rows
    y0..y1: each window's columns are scanned on the device (``window_changes``), and only the
    change positions go to the host (``changes_on_host``), where pycocotools compresses the
    runs (``rles_from_changes``).

    Args: as ``paste_masks``.

    Returns:
        N dicts ``{"size": [H, W], "counts": str}``, as ``encode_rle``.
    """
    changes = window_changes(mask_probs, boxes, image_size, threshold)
    return rles_from_changes(changes, changes_on_host([changes])[0])


@dataclass
class WindowChanges:
    """``masks_to_rle``'s device half for one image: where each window column changes value."""

    image_size: tuple[int, int]  # (H, W)
    windows: np.ndarray  # [N, 4] int64 (x0, y0, x1, y1), ``box_windows``
    # Per group of windows sampled together: its detection indices and the (w, h + 1) of their flags.
    groups: list[tuple[np.ndarray, tuple[int, int]]]
    # [T] bool on the device: every group's [g, w, h + 1] flags (a run starts or ends at row k of
    # window column x), flattened and concatenated in the order of ``groups``.
    flags: torch.Tensor


def window_changes(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float = 0.5,
) -> WindowChanges:
    """Samples each detection's window (``sample_windows``) and marks, down each window column
    with background above and below it, where the value changes. Queues kernels only: nothing
    here waits for the device (boxes may be on the host)."""
    n = count_masks(mask_probs, boxes)
    windows = box_windows(boxes, image_size)  # [N, 4]
    groups, flags = [], []
    if n:
        for group, binary in sample_windows(mask_probs, boxes, windows, threshold):
            cols = F.pad(binary.transpose(1, 2), (1, 1))  # [g, w, h + 2], column-major
            change = cols[..., 1:] != cols[..., :-1]  # [g, w, h + 1]
            groups.append((group, (change.shape[1], change.shape[2])))
            flags.append(change.reshape(-1))
    if not flags:
        flat = torch.zeros(0, dtype=torch.bool, device=mask_probs.device)
    else:
        flat = flags[0] if len(flags) == 1 else torch.cat(flags)
    return WindowChanges((int(image_size[0]), int(image_size[1])), windows, groups, flat)


def changes_on_host(changes: Sequence[WindowChanges]) -> list[np.ndarray]:
    """The positions of the set flags of several ``WindowChanges`` (ascending int64, one array
    each), in one copy from the device: the host waits for it once, however many images."""
    if not changes:
        return []
    flags = [c.flags for c in changes]
    found = _flat_nonzero(flags[0] if len(flags) == 1 else torch.cat(flags)).cpu().numpy()
    ends = np.cumsum([len(f) for f in flags])
    cuts = np.searchsorted(found, ends[:-1])
    starts = np.concatenate(([0], ends[:-1]))
    return [part - start for part, start in zip(np.split(found, cuts), starts)]


def rles_from_changes(changes: WindowChanges, found: np.ndarray) -> list[dict]:
    """``masks_to_rle``'s host half: the compressed RLE of each detection, from the positions
    ``found`` (ascending) of ``changes.flags``' set values."""
    height, width = changes.image_size
    windows = changes.windows
    n = len(windows)
    if n == 0:
        return []
    sizes = [len(group) * w * k1 for group, (w, k1) in changes.groups]
    cuts = np.searchsorted(found, np.cumsum(sizes)[:-1]) if sizes else []
    at, owner = [np.zeros(1, np.int64)], [np.full(1, n)]  # a sentinel past the last detection
    offset = 0
    for (group, (w, k1)), flat, size in zip(changes.groups, np.split(found, cuts), sizes):
        flat = flat - offset  # sorted by (j, x, k) within the group
        offset += size
        j, x, k = flat // (w * k1), flat // k1 % w, flat % k1  # detection group[j], window column x
        detection = group[j]
        at.append((windows[detection, 0] + x) * height + windows[detection, 1] + k)  # image x * H + y
        owner.append(detection)
    at, owner = np.concatenate(at), np.concatenate(owner)
    order = np.argsort(owner, kind="stable")  # by detection, each one's changes still ascending
    at, owner = at[order], owner[order]
    # A run ending at the bottom of a full-height window column and one starting at the top of
    # the next column are one run: the two changes at the same index cancel.
    repeated = (at[1:] == at[:-1]) & (owner[1:] == owner[:-1])
    keep = np.ones(len(at), dtype=bool)
    keep[1:] &= ~repeated
    keep[:-1] &= ~repeated
    at, owner = at[keep], owner[keep]
    starts = np.searchsorted(owner, np.arange(n + 1))  # detection i's changes: starts[i]:starts[i + 1]
    total = height * width
    uncompressed = []
    for i in range(n):
        positions = at[starts[i] : starts[i + 1]]
        counts = np.diff(positions, prepend=0, append=total)  # a background run first, maybe empty
        if len(positions) and positions[-1] == total:
            counts = counts[:-1]  # the mask ends with foreground: no background run after it
        uncompressed.append({"size": [height, width], "counts": counts})
    rles = mask_util.frPyObjects(uncompressed, height, width)  # compresses in C, as encode
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _flat_nonzero(flags: torch.Tensor) -> torch.Tensor:
    """Indices of the True values of 1-D ``flags``, ascending, on its device."""
    if flags.device.type == "cpu":  # numpy's is several times faster than torch's on the CPU
        return torch.from_numpy(np.flatnonzero(flags.numpy()))
    return flags.nonzero()[:, 0]


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
