"""Mask Transfiner (CVPR 2022) for production: the model, its export and its inference service.

- ``Predictor``: images in, boxes, classes, scores and masks out (``Predictor(weights="default")``).
- ``load_model`` / ``build_model``: the network from a checkpoint, or a preset with random weights.
- ``transfiner.model``: the network, inference, weights, data sets, training and evaluation.
- ``transfiner.export``: TorchScript and ONNX export, the exported backends, the TensorRT check.
- ``transfiner.service``: the REST service, its batching engine, the Ray Serve engine, load tests.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version as package_version
from typing import TYPE_CHECKING

# Loaded when first read (PEP 562), so that importing one light module of the package (a Ray Data
# decode task imports the image reader) does not import torch and the whole network.
_EXPORTS = {
    "ModelConfig": "transfiner.model.config",
    "preset": "transfiner.model.config",
    "make_shapes": "transfiner.model.datasets.shapes",
    "evaluate": "transfiner.model.evaluation.evaluate",
    "Prediction": "transfiner.model.inference.predictor",
    "Predictor": "transfiner.model.inference.predictor",
    "load_predictor": "transfiner.model.inference.predictor",
    "masks_to_rle": "transfiner.model.inference.rle",
    "InferenceOptions": "transfiner.model.modeling.rcnn",
    "MaskTransfiner": "transfiner.model.modeling.rcnn",
    "build_model": "transfiner.model.weights.checkpoint",
    "load_model": "transfiner.model.weights.checkpoint",
    "save_checkpoint": "transfiner.model.weights.checkpoint",
}

if TYPE_CHECKING:
    from transfiner.model.config import ModelConfig, preset
    from transfiner.model.datasets.shapes import make_shapes
    from transfiner.model.evaluation.evaluate import evaluate
    from transfiner.model.inference.predictor import Prediction, Predictor, load_predictor
    from transfiner.model.inference.rle import masks_to_rle
    from transfiner.model.modeling.rcnn import InferenceOptions, MaskTransfiner
    from transfiner.model.weights.checkpoint import build_model, load_model, save_checkpoint

__version__ = package_version("transfiner")


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'transfiner' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # read once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "InferenceOptions",
    "MaskTransfiner",
    "ModelConfig",
    "Prediction",
    "Predictor",
    "build_model",
    "evaluate",
    "load_model",
    "load_predictor",
    "make_shapes",
    "masks_to_rle",
    "preset",
    "save_checkpoint",
]
