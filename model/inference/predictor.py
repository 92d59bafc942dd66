"""The user-facing object: images in, boxes, classes, scores and masks out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from transfiner.model.config import ModelConfig, preset, with_max_cells
from transfiner.model.inference.backend import Backend, TorchBackend
from transfiner.model.inference.detections import coco_records, image_detections
from transfiner.model.inference.paste import paste_masks, paste_windows
from transfiner.model.inference.preprocess import ImageLike, group_by_canvas, prepare_batch, to_rgb_tensor
from transfiner.model.inference.rle import masks_to_rle
from transfiner.model.modeling.rcnn import InferenceOptions, MaskTransfiner, RawOutputs
from transfiner.model.weights.checkpoint import build_model, load_model
from transfiner.model.weights.default import resolve_weights


@dataclass
class Prediction:
    """The instances found in one image, in the image's own pixel coordinates.

    Binary masks are sampled from ``mask_probs`` when first asked for, on ``device`` (the
    model's: CUDA and CPU bilinear sampling may differ in the last bit, which can move an edge
    pixel), and only inside each box's window: ``rles`` and ``mask_windows`` never build the
    [N, H, W] full-image ``masks`` (100 of them at 1333x800 are 107 MB), which are pasted only
    if read.
    """

    image_size: tuple[int, int]  # (height, width)
    boxes: np.ndarray  # [N, 4] float32 xyxy
    scores: np.ndarray  # [N] float32
    classes: np.ndarray  # [N] int64 contiguous class index
    mask_probs: np.ndarray  # [N, 112, 112] float32 soft masks inside each box
    mask_threshold: float = 0.5  # a pixel is foreground when its sampled probability >= this
    device: str | torch.device = "cpu"  # where binary masks are sampled
    _masks: np.ndarray | None = field(default=None, repr=False)
    _rles: list[dict] | None = field(default=None, repr=False)
    # (mask_probs, boxes) as tensors on ``device`` when the model left them there: sampling then
    # needs no copy back from the host.
    _tensors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.scores)

    def _mask_inputs(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], float]:
        """The arguments of ``model.inference.paste``'s samplers, on ``device``."""
        if self._tensors is not None:
            probs, boxes = self._tensors
        else:
            probs = torch.as_tensor(self.mask_probs, device=self.device)  # [N, S, S]
            boxes = torch.as_tensor(self.boxes, device=self.device)  # [N, 4]
        return probs, boxes, self.image_size, self.mask_threshold

    @property
    def masks(self) -> np.ndarray:
        """[N, H, W] bool full-image masks, pasted once when first read."""
        if self._masks is None:
            self._masks = paste_masks(*self._mask_inputs()).cpu().numpy()
        return self._masks

    @property
    def rles(self) -> list[dict]:
        """COCO compressed RLE of ``masks`` (``counts`` as str), computed once from the windows."""
        if self._rles is None:
            self._rles = masks_to_rle(*self._mask_inputs())
        return self._rles

    def mask_windows(self) -> list[tuple[np.ndarray, tuple[int, int]]]:
        """Each instance's mask inside the window around its box ([h, w] bool) and the window's
        top-left pixel (x, y): ``masks[i]`` is that window there, background elsewhere."""
        return [(window.cpu().numpy(), origin) for window, origin in paste_windows(*self._mask_inputs())]

    def coco_records(self, image_id, category_ids: Sequence[int]) -> list[dict]:
        """One COCO results record per instance: bbox as xywh, compressed RLE with str counts
        (``model.inference.detections.coco_records``)."""
        return coco_records(image_id, self.boxes, self.scores, self.classes, category_ids, self.rles)

    @classmethod
    def from_outputs(
        cls,
        raw: RawOutputs,
        index: int,
        input_size: torch.Tensor,
        original: tuple[int, int],
        mask_threshold: float = 0.5,
    ) -> Prediction:
        """Image ``index`` of a batch's outputs, in the ``original`` (h, w) image's pixels
        (``model.inference.detections.image_detections``; ``input_size`` (h, w) is its network input).
        Masks are sampled later, when asked for, on the outputs' device."""
        detections = image_detections(raw, index, input_size, original)
        probs, boxes = detections.mask_probs, detections.boxes
        height, width = original
        return cls(
            image_size=(height, width),
            boxes=boxes.cpu().numpy(),
            scores=detections.scores.cpu().numpy(),
            classes=detections.classes.cpu().numpy(),
            mask_probs=probs.cpu().numpy(),
            mask_threshold=mask_threshold,
            device=probs.device,
            _tensors=(probs, boxes) if probs.device.type != "cpu" else None,
        )


def parse_device(device: str | torch.device) -> torch.device:
    """A device name (cpu, cuda, cuda:N, ...) -> ``torch.device``; a clear ValueError, not
    torch's RuntimeError, for a name that is none."""
    try:
        return torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"not a device: {device!r} (use cpu, cuda, cuda:N or auto)") from error


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> CUDA when available, else the CPU; a CUDA device must exist (a clear
    ValueError here instead of a driver error deep inside the first forward pass)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = parse_device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise ValueError(f"{resolved} is not available here ({count} CUDA devices); use --device cpu")
    return resolved


class Predictor:
    """Runs Mask Transfiner on RGB images, as a batch, on one device.

    >>> predictor = Predictor()                             # the shipped default model
    >>> predictor = Predictor("small")                      # preset, random weights
    >>> predictor = Predictor(weights="model.pth")          # config read from the checkpoint
    >>> prediction = predictor(image)                       # one image -> Prediction
    >>> predictions = predictor.predict([image_a, image_b]) # one batch -> list[Prediction]

    Exported models (TorchScript, ONNX Runtime) run through the same object:
    ``Predictor.from_backend(export.backends.load_backend("model-onnx/", "onnxruntime"))``.
    """

    def __init__(
        self,
        config: str | ModelConfig | None = None,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        precision: str | None = "auto",
        max_cells: tuple[int, int, int] | None = None,
    ) -> None:
        if config is None and weights is None:
            weights = resolve_weights("default")
        if weights is None:  # random weights: a config is all there is
            cfg = with_max_cells(preset(config) if isinstance(config, str) else config, max_cells)
            model = build_model(cfg, None, resolve_device(device))
        else:
            model = load_model(weights, config, resolve_device(device), max_cells)
        self._use(TorchBackend(model, precision))

    @classmethod
    def from_backend(cls, backend: Backend) -> Predictor:
        """A Predictor on any runtime (eager, TorchScript, ONNX Runtime)."""
        predictor = cls.__new__(cls)
        predictor._use(backend)
        return predictor

    @classmethod
    def from_model(cls, model: MaskTransfiner) -> Predictor:
        """A Predictor on a model already built (eval mode, its own device)."""
        return cls.from_backend(TorchBackend(model))

    def _use(self, backend: Backend) -> None:
        self.backend = backend
        self.cfg: ModelConfig = backend.cfg
        self.device = backend.device
        self.precision = backend.precision  # fp32, bf16 or fp16
        # The eager module, for what needs more than outputs (evaluation's incoherence statistics).
        self.model: MaskTransfiner | None = getattr(backend, "model", None)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.cfg.class_names

    def __call__(self, image: ImageLike, **options) -> Prediction:
        return self.predict([image], **options)[0]

    @torch.inference_mode()
    def predict(
        self,
        images: Sequence[ImageLike],
        score_threshold: float | None = None,
        max_detections: int | None = None,
        mask_threshold: float = 0.5,
        refine: bool = True,
    ) -> list[Prediction]:
        """Predicts a batch of RGB images (numpy HxWx3 uint8, PIL images, or tensors), in order.
        Images of different padded canvases (``canvas_shape``) run as separate forward passes.

        score_threshold: keep detections above it, 0..1 (default: the config's, 0.05 as
        detectron2); max_detections: per image, at least 1 (default: the config's, 100);
        mask_threshold: binarises the pasted soft masks, 0..1; refine: False gives the coarse Mask
        R-CNN masks only.
        """
        for name, value in (("score_threshold", score_threshold), ("mask_threshold", mask_threshold)):
            if value is not None and not 0.0 <= value <= 1.0:  # NaN fails this too
                raise ValueError(f"{name} must be a number from 0 to 1, got {value}")
        if max_detections is not None and max_detections < 1:
            raise ValueError("max_detections must be at least 1")
        if len(images) == 0:
            return []
        rgb = [to_rgb_tensor(image) for image in images]
        original = [tuple(image.shape[-2:]) for image in rgb]
        options = InferenceOptions(score_threshold, max_detections, refine)
        predictions: list[Prediction | None] = [None] * len(rgb)
        # One forward pass per canvas: padding to a batch-mate's larger canvas would change the
        # answer, so each image gets exactly what it gets alone.
        for indices in group_by_canvas(original, self.cfg.input).values():
            batch, sizes = prepare_batch([rgb[i] for i in indices], self.cfg.input, self.device)
            raw = self.backend.infer(batch, sizes, options)
            for row, i in enumerate(indices):
                predictions[i] = Prediction.from_outputs(raw, row, sizes[row], original[i], mask_threshold)
        return predictions


def load_predictor(
    model: str | os.PathLike | None = "default",
    config: str | ModelConfig | None = None,
    device: str | torch.device | None = "auto",
    precision: str | None = "auto",
    max_cells: tuple[int, int, int] | None = None,
) -> Predictor:
    """A ``Predictor`` for ``--model`` (and optionally ``--config``, needed for bare state dicts;
    ``max_cells``, the node caps, instead of the checkpoint's)."""
    weights = resolve_weights(model)
    cfg = preset(config) if isinstance(config, str) else config
    return Predictor(cfg, weights, device, precision, max_cells=max_cells)
