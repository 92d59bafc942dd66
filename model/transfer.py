"""Copies between the host and the model's device that do not make the host wait for the GPU.

A plain host-to-GPU copy (``tensor.to("cuda")``, ``torch.as_tensor(array, device="cuda")``)
synchronizes: the host waits until every kernel already queued has finished, so the GPU idles
while the host prepares the next ones. From page-locked memory the copy is queued behind those
kernels instead. Copies back to the host always wait (their values are needed), so the code
that reads results gathers what it needs into as few of them as it can.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: torch.Tensor | np.ndarray, device: torch.device | str) -> torch.Tensor:
    """``values`` on ``device``; onto a GPU through page-locked memory, without waiting for it."""
    tensor = torch.as_tensor(values)
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    if not _dense(tensor):
        # A copy from a tensor with gaps would be gathered into ordinary memory on the way.
        tensor = tensor.contiguous()
    # A dense tensor in any dimension order (an HWC image viewed as CHW) goes over as it is. The
    # caching host allocator keeps the page-locked block until the queued transfer has run.
    return tensor.pin_memory().to(device, non_blocking=True)


def _dense(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` fills its memory without gaps, in some order of its dimensions."""
    expected = 1
    for dim in sorted(range(tensor.dim()), key=tensor.stride):
        if tensor.shape[dim] != 1 and tensor.stride(dim) != expected:
            return False
        expected *= tensor.shape[dim]
    return True
