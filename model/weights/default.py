"""Where models come from: the shipped default model, or a checkpoint the user names.

Every command that takes weights accepts ``--model default`` or ``--model PATH`` (a checkpoint);
those with ``--backend`` also take a ``transfiner export`` folder. This module knows checkpoints
only; ``export.resolve.resolve_model`` makes the whole decision for the commands and the service.
"""

from __future__ import annotations

import os
from pathlib import Path

from transfiner.model.weights.files import CheckpointError

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
        raise CheckpointError(
            f"{path} is a folder; give a checkpoint file (.pth) (predict, evaluate and serve "
            "run a `transfiner export` folder with --backend onnxruntime or torchscript)"
        )
    if not path.is_file():
        raise CheckpointError(f"model not found: {path}")
    return path
