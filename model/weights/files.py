"""Read detectron2-format checkpoint files (``.pth``/``.pt`` and model-zoo ``.pkl``) safely.

Only the raw ``{name: tensor}`` dict is returned here; mapping names onto our modules
is the loader's job.
"""

from __future__ import annotations

import codecs
import collections
import hashlib
import importlib
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "read_state_dict"]

_TORCH_SUFFIXES = {".pth", ".pt"}
_PICKLE_SUFFIXES = {".pkl"}


class CheckpointError(Exception):
    """A checkpoint file cannot be used; the message is meant for the end user."""


def read_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Return the model state dict stored in a detectron2-format checkpoint.

    ``.pth``/``.pt`` files are read with ``torch.load(weights_only=True)``; either a bare
    state dict or a dict with a ``"model"`` entry (a detectron2 training checkpoint) is
    accepted. ``.pkl`` files (detectron2 model zoo: numpy arrays, often written by
    Python 2) are only read when ``allow_pickle`` is set, and even then with an
    unpickler that can build nothing but numpy arrays and plain containers.

    Raises:
        CheckpointError: the file is missing, unreadable, of an unknown type, or does
            not hold a state dict.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint file not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint path is not a file: {p}")
    suffix = p.suffix.lower()
    if suffix in _TORCH_SUFFIXES:
        return _read_torch(p)
    if suffix in _PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(
                f"{p} is a Python pickle (.pkl). Unpickling can run arbitrary code, so it is off by "
                "default; pass --allow-pickle (allow_pickle=True) if you trust this file. Even then "
                "only numpy arrays and plain containers are accepted."
            )
        return _read_pickle(p)
    raise CheckpointError(f"unknown checkpoint type {suffix or '(no extension)'!r} for {p}; expected .pth, .pt or .pkl")


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    return state_dict_of(load_torch_file(path), path)


def load_torch_file(path: Path) -> Any:
    """What a ``.pth`` file holds, read with ``torch.load(weights_only=True)``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is corrupt or not a plain weights file "
            f"({_weights_only_reason(e)}); "
            "only tensors and plain containers are loaded"
        ) from None
    except Exception as e:  # torch raises many types (zip, EOF, ...) for bad files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}") from None


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in what a ``.pth`` file held (bare, or detectron2's ``{"model": ...}``)."""
    sd = _unwrap(obj, path)
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return dict(sd)


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        with path.open("rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except CheckpointError as e:
        raise CheckpointError(f"refusing to load {path}: {e}") from None
    except Exception as e:  # corrupt or truncated pickles raise assorted errors
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}") from None
    out: dict[str, torch.Tensor] = {}
    for k, v in _unwrap(obj, path).items():
        if not isinstance(v, (np.ndarray, np.generic)):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a numpy array")
        arr = np.asarray(v)
        try:
            # native byte order and a private writable copy, which torch.from_numpy needs
            out[k] = torch.from_numpy(np.array(arr, dtype=arr.dtype.newbyteorder("="), copy=True))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: entry {k!r} (dtype {arr.dtype}) cannot become a tensor: {e}") from None
    return out


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    """Pick the state dict out of ``{"model": sd, ...}`` or accept a bare one."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict of weights")
    if "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif not all(isinstance(v, (torch.Tensor, np.ndarray, np.generic)) for v in obj.values()):
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        raise CheckpointError(f"{path} holds a dict with keys [{keys}] but no 'model' state dict")
    if not obj:
        raise CheckpointError(f"{path} holds an empty state dict")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: state dict has non-string key {bad[0]!r}")
    return obj


def _weights_only_reason(e: BaseException) -> str:
    """The useful part of torch's long weights_only error, without its advice to disable it."""
    m = re.search(r"(Unsupported [^\n]*?|Trying to load [^\n]*?)(?:\. Please|\n|$)", str(e))
    return (m.group(1) if m else _first_line(e)).rstrip(".")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def _numpy_attr(submodule: str, name: str) -> Any:
    """``numpy._core.<sub>.<name>`` on numpy 2, ``numpy.core.<sub>.<name>`` on numpy 1."""
    for base in ("numpy._core", "numpy.core"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core shim on numpy 2
                return getattr(importlib.import_module(f"{base}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise CheckpointError(f"numpy has no {submodule}.{name}")


_NUMPY_CORE = {  # (submodule, name) reachable under numpy.core.* (1.x) and numpy._core.* (2.x)
    ("multiarray", "_reconstruct"),  # ndarray.__reduce__
    ("multiarray", "scalar"),  # numpy scalar.__reduce__
    ("numeric", "_frombuffer"),  # ndarray.__reduce_ex__ for protocol 5
}
_PLAIN = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # protocol-2 pickles written by Python 3 encode bytes as _codecs.encode(str, "latin1")
    ("_codecs", "encode"): codecs.encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler whose globals are limited to numpy array reconstruction and containers."""

    def find_class(self, module: str, name: str) -> Any:
        mod = "builtins" if module == "__builtin__" else module  # Python 2 pickles
        if (mod, name) in _PLAIN:
            return _PLAIN[(mod, name)]
        for base in ("numpy.core.", "numpy._core."):
            if mod.startswith(base) and (mod[len(base) :], name) in _NUMPY_CORE:
                return _numpy_attr(mod[len(base) :], name)
        if mod == "numpy.dtypes" and name.endswith("DType"):
            try:
                cls = getattr(importlib.import_module("numpy.dtypes"), name, None)
            except ImportError:  # numpy < 1.25
                cls = None
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                return cls
        raise CheckpointError(f"the pickle asks for {module}.{name}, which is not a numpy array or plain container")


def file_digest(path: str | os.PathLike) -> str:
    """The first 12 hex digits of a file's SHA-256: a version that changes whenever the weights do."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]
