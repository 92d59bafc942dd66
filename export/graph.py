"""The exported graph: what goes in, what comes out, and the module that is traced.

One graph covers the whole network, image tensor to detections::

    images          float32 [B, 3, H, W]  BGR 0..255, padded with the pixel mean (H, W: multiples of 32)
    image_sizes     int64   [B, 2]        (h, w) of each image before padding
    score_threshold float32 []            keep class scores above this
    max_detections  int64   []            per image (negative: no limit)
 -> boxes           float32 [D, 4]        xyxy in network-input pixels
    scores          float32 [D]
    classes         int64   [D]           contiguous class index
    batch_index     int64   [D]           rows grouped by image, best score first
    mask_probs      float32 [D, 112, 112] refined mask probabilities inside each box
    coarse_probs    float32 [D, 112, 112] the coarse Mask R-CNN masks of the same detections

- B, H, W and D are dynamic. Resizing and padding before, pasting and RLE after, stay in the shared
  Python code (``model.inference.preprocess``, ``model.inference.paste``, ``model.inference.rle``)
  that every runtime uses.
- Why it can be exported at all: the quadtree's node selection is a fixed-size top-k with a
  threshold mask (``model.modeling.refiner.PointQuadtree``), features are gathered and the refined values
  scattered back with ``where`` on that mask, and every box is one padded sequence with a
  key-padding mask. The detector's data-dependent parts (score filtering, per-level RoI assignment)
  use NonZero and NonMaxSuppression, which ONNX Runtime and TensorRT 10 both run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from transfiner.model.config import ModelConfig
from transfiner.model.inference.preprocess import pad_batch
from transfiner.model.modeling.rcnn import InferenceOptions, MaskTransfiner, RawOutputs


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]
    description: str


INPUTS = (
    TensorSpec(
        "images",
        "float32",
        ("batch", 3, "height", "width"),
        "BGR 0..255, resized as model.preprocess, padded with the pixel mean to multiples of 32",
    ),
    TensorSpec("image_sizes", "int64", ("batch", 2), "(h, w) of each image before padding"),
    TensorSpec("score_threshold", "float32", (), "keep class scores strictly above this"),
    TensorSpec("max_detections", "int64", (), "detections per image, best first; negative: no limit"),
)
OUTPUTS = (
    TensorSpec("boxes", "float32", ("detections", 4), "xyxy in network-input pixels"),
    TensorSpec("scores", "float32", ("detections",), "class score"),
    TensorSpec("classes", "int64", ("detections",), "contiguous class index (metadata class_names)"),
    TensorSpec("batch_index", "int64", ("detections",), "image of each row; rows grouped by image, best first"),
    TensorSpec("mask_probs", "float32", ("detections", 112, 112), "refined mask probabilities in the box"),
    TensorSpec("coarse_probs", "float32", ("detections", 112, 112), "coarse (Mask R-CNN) mask probabilities"),
)
INPUT_NAMES = tuple(spec.name for spec in INPUTS)
OUTPUT_NAMES = tuple(spec.name for spec in OUTPUTS)


def dynamic_axes() -> dict[str, dict[int, str]]:
    """The named (dynamic) dimensions of every input and output, for ``torch.onnx.export``."""
    return {
        spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
        for spec in INPUTS + OUTPUTS
        if any(isinstance(d, str) for d in spec.shape)
    }


def specs_as_dicts(specs: tuple[TensorSpec, ...]) -> list[dict]:
    return [asdict(spec) for spec in specs]


class ExportableMaskTransfiner(nn.Module):
    """``MaskTransfiner`` with tensors only in and out, as tracing needs.

    The score threshold and the detection cap are graph inputs, so one exported file serves
    every request; refinement always runs (``coarse_probs`` gives the unrefined masks).
    """

    def __init__(self, model: MaskTransfiner) -> None:
        super().__init__()
        self.model = model
        # The wrapper itself must be in eval mode: the ONNX exporter puts a module back into the
        # mode it found it in afterwards, which would otherwise switch the model to training.
        self.eval()

    def forward(
        self,
        images: torch.Tensor,
        image_sizes: torch.Tensor,
        score_threshold: torch.Tensor,
        max_detections: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        raw = self.model(images, image_sizes, InferenceOptions(score_threshold, max_detections, refine=True))
        return raw.boxes, raw.scores, raw.classes, raw.batch_index, raw.mask_probs, raw.coarse_probs


def example_inputs(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """What the graph is traced on: two seeded noise images of different sizes.

    Score threshold 0 makes every model, trained or not, produce detections, so every branch of
    the detector is recorded with rows in it (an empty example would record the empty shortcut
    of torchvision's NMS). Five detections per image keep tracing cheap at R50 widths.
    """
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=generator) * 255 for h, w in ((160, 224), (192, 128))]
    batch, sizes = pad_batch([image.to(device) for image in images], cfg.input)
    return batch, sizes, torch.tensor(0.0, device=device), torch.tensor(5, device=device)


def raw_outputs(outputs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> RawOutputs:
    """The graph's outputs, in ``OUTPUT_NAMES`` order, as the eager model's ``RawOutputs``."""
    boxes, scores, classes, batch_index, mask_probs, coarse_probs = outputs
    return RawOutputs(boxes, scores, classes, batch_index, mask_probs, coarse_probs)


def graph_arguments(
    cfg: ModelConfig, options: InferenceOptions, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``InferenceOptions`` as the graph's (score_threshold, max_detections) inputs."""
    if options.max_refined_per_image not in (None, cfg.transfiner.max_refined_per_image):
        raise ValueError(
            "exported models refine the number of detections per image fixed at export "
            f"({cfg.transfiner.max_refined_per_image}); export again with another config to change it"
        )
    threshold = cfg.roi_heads.score_thresh_test if options.score_threshold is None else options.score_threshold
    top_k = cfg.roi_heads.detections_per_image if options.max_detections is None else options.max_detections
    return (
        torch.tensor(float(threshold), dtype=torch.float32, device=device),
        torch.tensor(int(top_k), dtype=torch.int64, device=device),
    )
