"""What this process's C heap (glibc's malloc) does with freed memory: kept for the next image
while the process serves, handed back to the system after a very large one.

- Every image passes through buffers of a few megabytes (the upload, the decoded pixels, their RGB
  array, the network input, activations). By default glibc gives such blocks back to the system as
  soon as they are freed: blocks above its mmap threshold are unmapped, and a heap whose free top
  grows past its trim threshold is shrunk (both thresholds follow the block sizes it has seen, and
  several buffers freed together still cross them). The next image's buffers are then mapped afresh
  and every 4 KB page of them faults in again, in the kernel, while the thread that touches it holds
  the GIL. ``keep_freed_memory_for_reuse`` raises both thresholds so those blocks stay in the heap
  for the next image; ``release_freed_memory`` still hands everything back after a decode far above
  them.
- glibc only (``mallopt``, ``malloc_trim``); elsewhere both do nothing.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory_for_reuse", "release_freed_memory"]

# Blocks below this come from a heap: the largest mmap threshold glibc accepts on 64-bit systems.
MMAP_THRESHOLD = 32 * 1024 * 1024
# A heap keeps up to this much free at its top: the most glibc's own adaptation ever keeps (twice
# its largest mmap threshold).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# glibc's own settings; when an operator sets any, the choice is theirs.
_GLIBC_MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _libc_function(name: str) -> Callable[..., int] | None:
    """A function of the C library this process runs on, or None where it has none (musl, macOS)."""
    try:
        return getattr(ctypes.CDLL(None), name, None)  # the process's own symbols, libc's included
    except OSError:
        return None


_mallopt = _libc_function("mallopt")
_malloc_trim = _libc_function("malloc_trim")


def keep_freed_memory_for_reuse() -> bool:
    """Keeps freed blocks below ``MMAP_THRESHOLD`` in this process for reuse; -> whether it did.

    For a process that handles one image after another in buffers of a few megabytes (the
    service's, ``service.engine.runtime.keeps_freed_memory``). The cost is resident memory: each malloc
    arena (about one per thread that allocates) may keep up to ``TRIM_THRESHOLD`` free, and
    blocks freed amid live ones stay too. When glibc's own ``MALLOC_*_`` variables or
    ``GLIBC_TUNABLES`` malloc settings are given, they are the operator's choice and stay.
    """
    if _mallopt is None or any(name in os.environ for name in _GLIBC_MALLOC_VARIABLES):
        return False
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    # mallopt returns 1 on success; either call also turns off glibc's moving thresholds.
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all([_mallopt(parameter, value) == 1 for parameter, value in settings])


def release_freed_memory() -> None:
    """Gives the memory freed so far back to the system (glibc's ``malloc_trim``).

    Pillow allocates a large image in 16 MB blocks, below the mmap threshold, so they come from
    the heap; freed, they would stay in the process, and the next large upload fragments the
    heap further (the resident size grew by hundreds of megabytes per 40-megapixel upload)."""
    if _malloc_trim is not None:
        _malloc_trim(0)
