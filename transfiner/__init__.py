"""Mask Transfiner (CVPR 2022) for production: the model, its export and its inference service.

- ``Predictor``: images in, boxes, classes, scores and masks out (``Predictor(weights="default")``).
- ``load_model`` / ``build_model``: the network from a checkpoint, or a preset with random weights.
- ``transfiner.model``: the network, inference, weights, data sets, training and evaluation.
- ``transfiner.export``: TorchScript and ONNX export, the exported backends, the TensorRT check.
- ``transfiner.service``: the REST service, its batching engine, the Ray Serve engine, load tests.
"""

from importlib.metadata import version as package_version

from transfiner.model.config import ModelConfig, preset
from transfiner.model.datasets.shapes import make_shapes
from transfiner.model.evaluation.evaluate import evaluate
from transfiner.model.inference.predictor import Prediction, Predictor, load_predictor
from transfiner.model.inference.rle import masks_to_rle
from transfiner.model.modeling.rcnn import InferenceOptions, MaskTransfiner
from transfiner.model.weights.checkpoint import build_model, load_model, save_checkpoint

__version__ = package_version("transfiner")

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
