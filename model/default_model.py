"""Where models come from: the shipped default model, or a checkpoint the user names.

Every command that takes weights accepts ``--model default`` or ``--model PATH`` (a checkpoint);
those with ``--backend`` also take a ``transfiner export`` folder. This module knows checkpoints
only; ``export.resolve.resolve_model`` makes the whole decision for the commands and the service.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


from .backend import BACKEND_NAMES
from .checkpoint_io import CheckpointError
from .config import PRESET_NAMES, parse_max_cells
from .precision import PRECISIONS

# The small model trained by our own `transfiner train` on make-shapes data (see its README).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
DEFAULT_WEIGHTS = DEFAULT_MODEL_DIR / "model.pth"


def resolve_weights(model: str | os.PathLike | None) -> Path | None:
    """``None`` -> no weights, ``"default"`` -> the shipped model, else the given checkpoint path."""
    if model is None:
        return None
    if str(model) == "default":
        if not DEFAULT_WEIGHTS.is_file():
            raise CheckpointError(f"the default model is missing: {DEFAULT_WEIGHTS} (reinstall the package)")
        return DEFAULT_WEIGHTS
    path = Path(model)
    if path.is_dir():
        inside = [path / name for name in ("model_final.pth", "last.pth") if (path / name).is_file()]
        if inside:  # a `transfiner train` run
            raise CheckpointError(f"{path} is a folder; give a checkpoint file, e.g. {inside[0]}")
        raise CheckpointError(f"{path} is a folder; give a checkpoint file (.pth) (predict, evaluate and serve "
                              "run a `transfiner export` folder with --backend onnxruntime or torchscript)")
    if not path.is_file():
        raise CheckpointError(f"model not found: {path}")
    return path


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``/``--weights``, ``--config`` and ``--device``, the same for every command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="'default' (the shipped model, the default) or a checkpoint")
    group.add_argument("--weights", default=None, help="checkpoint file (same as --model FILE)")
    parser.add_argument("--config", default=None, choices=PRESET_NAMES,
                        help="model preset (default: the one stored in the checkpoint)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def model_from_args(args: argparse.Namespace) -> str | Path:
    """What ``--model``/``--weights`` name; the default model when neither is given."""
    return args.weights or args.model or "default"


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", default=None, choices=BACKEND_NAMES,
        help="pytorch (eager, the default), torchscript or onnxruntime; --model may then also be a "
             "`transfiner export` folder (a checkpoint is exported once into ~/.cache/transfiner)",
    )


def _max_cells_flag(text: str) -> tuple[int, int, int]:
    try:
        return parse_max_cells(text)
    except ValueError as error:  # argparse shows an ArgumentTypeError's own words, not the function's name
        raise argparse.ArgumentTypeError(str(error)) from None


def add_max_cells_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-cells", default=None, type=_max_cells_flag, metavar="A,B,C",
        help="node caps per quadtree level, 28-cells of the 28/56/112 levels (default: the checkpoint's; "
             "784,784,784 selects exactly the official nodes; smaller is faster and differs where a box "
             "has more incoherent cells). Exported models keep the caps they were exported with",
    )


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision", default=None, choices=PRECISIONS,
        help="auto (the default: bf16 on CUDA that supports it, else fp32), fp32, bf16 or fp16; exported "
             "models run fp32",
    )

