"""Numeric precision of inference: ``auto``, ``fp32``, ``bf16`` or ``fp16``.

Lower precision runs the network under ``torch.autocast``: convolutions, linear layers and
attention compute in bf16/fp16, while the steps whose rounding would move boxes or change which
detections survive stay in float32 inside the model (class scores, box decoding, NMS inputs,
RoI box coordinates, quadtree thresholds, mask propagation). ``auto`` is bf16 on CUDA devices
that support it and fp32 everywhere else, so CPU results are the float32 ones unless asked.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str | None, device: torch.device | str) -> str:
    """``auto``/None -> ``bf16`` on a CUDA device that supports it, else ``fp32``; other names as
    they are (a ValueError for unknown ones)."""
    device = torch.device(device)
    if precision in (None, "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context a forward pass runs in at ``precision`` (a resolved name, not ``auto``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[precision])
