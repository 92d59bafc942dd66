"""The user-facing object: images in, boxes, classes, scores and masks out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .backend import Backend, TorchBackend
from .checkpoint import build_model, load_checkpoint
from .config import ModelConfig, preset
from .default_model import resolve_weights
from .postprocess import encode_rle, paste_masks
from .preprocess import ImageLike, prepare_batch, to_rgb_tensor
from .rcnn import InferenceOptions, MaskTransfiner, RawOutputs


@dataclass
class Prediction:
    """The instances found in one image, in the image's own pixel coordinates."""

    image_size: tuple[int, int]  # (height, width)
    boxes: np.ndarray  # [N, 4] float32 xyxy
    scores: np.ndarray  # [N] float32
    classes: np.ndarray  # [N] int64 contiguous class index
    mask_probs: np.ndarray  # [N, 112, 112] float32 soft masks inside each box
    masks: np.ndarray  # [N, H, W] bool full-image masks
    _rles: list[dict] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def rles(self) -> list[dict]:
        """COCO compressed RLE of ``masks`` (``counts`` as str), computed once."""
        if self._rles is None:
            self._rles = encode_rle(self.masks)
        return self._rles

    def coco_records(self, image_id, category_ids: Sequence[int]) -> list[dict]:
        """One COCO results record per instance: bbox as xywh, compressed RLE with str counts."""
        records = []
        for box, score, cls, rle in zip(self.boxes, self.scores, self.classes, self.rles):
            x0, y0, x1, y1 = (float(v) for v in box)
            records.append({
                "image_id": image_id,
                "category_id": int(category_ids[int(cls)]),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(float(score), 5),
                "segmentation": rle,
            })
        return records


def rescale_boxes(
    boxes: torch.Tensor, input_size: torch.Tensor, original: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes [N, 4] from network-input pixels (``input_size`` (h, w)) to the ``original`` image's,
    clipped to it; and [N] bool: which are non-empty (detectron2 drops the others)."""
    height, width = original
    scale = torch.tensor([width / input_size[1].item(), height / input_size[0].item()] * 2, device=boxes.device)
    boxes = boxes * scale
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes, (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> CUDA when available, else the CPU; a CUDA device must exist (a clear
    ValueError here instead of a driver error deep inside the first forward pass)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"not a device: {device!r} (use cpu, cuda, cuda:N or auto)") from error
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
    ``Predictor.from_backend(export.runtimes.load_backend("model-onnx/", "onnxruntime"))``.
    """

    def __init__(
        self, config: str | ModelConfig | None = None, weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
    ) -> None:
        if config is None and weights is None:
            weights = resolve_weights("default")
        if config is None:
            config = load_checkpoint(weights)[0]
            if config is None:
                raise ValueError(f"{weights} holds no config: give one (e.g. --config R50-FPN)")
        cfg = preset(config) if isinstance(config, str) else config
        self._use(TorchBackend(build_model(cfg, weights, resolve_device(device))))

    @classmethod
    def from_backend(cls, backend: Backend) -> "Predictor":
        """A Predictor on any runtime (eager, TorchScript, ONNX Runtime)."""
        predictor = cls.__new__(cls)
        predictor._use(backend)
        return predictor

    @classmethod
    def from_model(cls, model: MaskTransfiner) -> "Predictor":
        """A Predictor on a model already built (eval mode, its own device)."""
        return cls.from_backend(TorchBackend(model))

    def _use(self, backend: Backend) -> None:
        self.backend = backend
        self.cfg: ModelConfig = backend.cfg
        self.device = backend.device
        # The eager module, for what needs more than outputs (evaluation's incoherence statistics).
        self.model: MaskTransfiner | None = getattr(backend, "model", None)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.cfg.class_names

    def __call__(self, image: ImageLike, **options) -> Prediction:
        return self.predict([image], **options)[0]

    @torch.inference_mode()
    def predict(
        self, images: Sequence[ImageLike], score_threshold: float | None = None,
        max_detections: int | None = None, mask_threshold: float = 0.5, refine: bool = True,
    ) -> list[Prediction]:
        """Predicts a batch of RGB images (numpy HxWx3 uint8, PIL images, or tensors).

        score_threshold: keep detections above it (default: the config's, 0.05 as detectron2);
        max_detections: per image, 1..100 (default: the config's); mask_threshold: binarises the
        pasted soft masks; refine: False gives the coarse Mask R-CNN masks only.
        """
        if len(images) == 0:
            return []
        if max_detections is not None and max_detections < 1:
            raise ValueError("max_detections must be at least 1")
        rgb = [to_rgb_tensor(image) for image in images]
        batch, sizes = prepare_batch(rgb, self.cfg.input, self.device)
        options = InferenceOptions(score_threshold, max_detections, refine)
        raw = self.backend.infer(batch, sizes, options)
        original = [tuple(image.shape[-2:]) for image in rgb]
        return [self.postprocess(raw, i, sizes[i], original[i], mask_threshold) for i in range(len(rgb))]

    @staticmethod
    def postprocess(
        raw: RawOutputs, index: int, input_size: torch.Tensor, original: tuple[int, int], mask_threshold: float
    ) -> Prediction:
        """Detectron2's ``detector_postprocess`` for image ``index`` of a batch: rescale boxes from
        the network input (``input_size`` (h, w)) to ``original``, drop empty ones, paste masks."""
        rows = raw.batch_index == index
        height, width = original
        boxes, nonempty = rescale_boxes(raw.boxes[rows], input_size, original)
        boxes = boxes[nonempty]
        probs = raw.mask_probs[rows][nonempty]
        masks = paste_masks(probs, boxes, (height, width), mask_threshold)
        return Prediction(
            image_size=(height, width),
            boxes=boxes.float().cpu().numpy(),
            scores=raw.scores[rows][nonempty].float().cpu().numpy(),
            classes=raw.classes[rows][nonempty].cpu().numpy(),
            mask_probs=probs.float().cpu().numpy(),
            masks=masks.cpu().numpy(),
        )
