"""The whole network: ResNet-FPN, RPN, box head, and the Transfiner mask head."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from transfiner.model.config import ModelConfig
from transfiner.model.modeling.backbone import build_backbone
from transfiner.model.modeling.box_ops import rank_within_image
from transfiner.model.modeling.mask_head import TransfinerMaskHead
from transfiner.model.modeling.roi_heads import BoxROIHeads, Detections, per_image
from transfiner.model.modeling.rpn import RPN
from transfiner.model.transfer import to_device


@dataclass
class InferenceOptions:
    """Per-call settings; ``None`` means the config's value.

    The score threshold, detection cap and refinement may also be given per image ([B] tensors),
    so that one batch serves requests with different options and each image keeps (and pays the
    mask head for) only the detections its own request gets back.
    """

    score_threshold: float | torch.Tensor | None = None  # keep class scores above it; scalar or [B]
    max_detections: int | torch.Tensor | None = None  # per image, best first; negative: no limit; scalar or [B]
    refine: bool | torch.Tensor = True  # or [B] bool
    max_refined_per_image: int | None = None
    # [B, K] bool: the classes each image keeps, taken from its best ``detections_per_image``
    # detections (the config's) before ``max_detections`` applies; None keeps every class.
    classes: torch.Tensor | None = None

    def batch_wide(self) -> InferenceOptions:
        """Scalar options that give every image at least what its own options give: the lowest
        threshold, the largest cap (the config's when any image filters classes) and refinement
        if any image wants it. For runtimes that take one value per batch (exported graphs);
        the per-image choice is then made afterwards from their outputs."""

        def lowest(value):
            return value.min().item() if isinstance(value, torch.Tensor) else value

        def largest(value):
            if not isinstance(value, torch.Tensor):
                return value
            return -1 if bool((value < 0).any()) else int(value.max().item())

        refine = bool(self.refine.any()) if isinstance(self.refine, torch.Tensor) else self.refine
        top_k = None if self.classes is not None else largest(self.max_detections)
        return InferenceOptions(lowest(self.score_threshold), top_k, refine, self.max_refined_per_image)


@dataclass
class RawOutputs:
    """Detections of a batch, flattened and grouped by image (best score first within an image).

    Boxes are in the pixels of the resized (network input) image; the Predictor maps them back.
    """

    boxes: torch.Tensor  # [D, 4] xyxy
    scores: torch.Tensor  # [D]
    classes: torch.Tensor  # [D] int64, contiguous class index
    batch_index: torch.Tensor  # [D] int64
    mask_probs: torch.Tensor  # [D, 112, 112] float
    coarse_probs: torch.Tensor  # [D, 112, 112] the coarse masks of the same detections


class MaskTransfiner(nn.Module):
    """Mask R-CNN (ResNet-FPN) with the Transfiner mask head.

    ``forward`` takes a padded batch of BGR images in 0..255 and returns ``RawOutputs``.
    Parameter names follow detectron2 (``backbone.bottom_up.*``, ``proposal_generator.*``,
    ``roi_heads.*``), except the mask branch, which lives under ``mask_head.*`` with named parts;
    ``model.weights.checkpoint`` maps the official names onto it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.resnet, cfg.fpn)
        channels = cfg.fpn.out_channels
        self.proposal_generator = RPN(cfg.rpn, channels, self.backbone.strides)
        self.roi_heads = BoxROIHeads(cfg.roi_heads, channels)
        self.mask_head = TransfinerMaskHead(channels, cfg.mask_head, cfg.transfiner, cfg.roi_heads.num_classes)
        self.register_buffer("pixel_mean", torch.tensor(cfg.input.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.input.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean) / self.pixel_std

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions | None = None
    ) -> RawOutputs:
        """images [B, 3, H, W] BGR 0..255, H and W divisible by 32, zero-padded after the image
        (pad with the pixel mean, so padding is 0 after normalisation); image_sizes [B, 2] (h, w)
        of each image before padding."""
        return self.segment(self.detect(images, image_sizes, options))

    def detect(
        self, images: torch.Tensor, image_sizes: torch.Tensor, options: InferenceOptions | None = None
    ) -> DetectedBatch:
        """The first half of ``forward``: features and final detections, no masks yet."""
        options = options or InferenceOptions()
        features = self.backbone(self.normalize(images))
        rpn = self.proposal_generator
        anchors = rpn.anchor_generator(features)
        proposal_boxes, _, proposal_batch = rpn.propose(anchors, *rpn.rpn_head(features), image_sizes)
        box_features = features[:4]  # P2..P5; P6 only feeds the RPN
        logits, deltas = self.roi_heads(box_features, proposal_boxes, proposal_batch)
        top_k = options.max_detections
        if options.classes is not None:
            # An image with a class filter picks from the config's top-k, then its own cap applies.
            configured = self.cfg.roi_heads.detections_per_image
            wanted = torch.as_tensor(configured if top_k is None else top_k).expand(images.shape[0])
            top_k = torch.where(options.classes.all(dim=1), wanted.cpu(), configured)
        detections = self.roi_heads.inference(
            logits,
            deltas,
            proposal_boxes,
            proposal_batch,
            image_sizes,
            options.score_threshold,
            top_k,
        )
        if options.classes is not None:
            detections = _keep_classes(detections, options.classes, options.max_detections, image_sizes.shape[0])
        cap = options.max_refined_per_image
        cap = self.cfg.transfiner.max_refined_per_image if cap is None else cap
        refine_mask = detections.rank < cap
        refine = options.refine
        if isinstance(refine, torch.Tensor):
            refine_mask = refine_mask & per_image(refine.to(refine_mask.device), detections.batch_index)
            refine = True
        return DetectedBatch(box_features, detections, refine_mask, bool(refine))

    def segment(self, batch: DetectedBatch, rows: torch.Tensor | None = None) -> RawOutputs:
        """The second half of ``forward``: the masks of the detections ``rows`` ([R] int64 into
        the batch's detections; default all), as ``RawOutputs`` of those rows. Calls on parts
        of one batch give each detection what one call on all of them gives."""
        detections, refine_mask = batch.detections, batch.refine_mask
        if rows is not None:
            detections, refine_mask = detections.take(rows), refine_mask[rows]
        enhanced = None
        if rows is not None and batch.refine and self.mask_head.cfg.enabled:
            enhanced = batch.enhanced_features(self.mask_head)  # once per batch, not per call
        mask_probs, coarse_probs = self.mask_head(
            batch.features,
            detections.boxes,
            detections.classes,
            detections.batch_index,
            refine_mask,
            batch.refine,
            enhanced,
        )
        return RawOutputs(
            detections.boxes, detections.scores, detections.classes, detections.batch_index, mask_probs, coarse_probs
        )

    def segment_lightest_first(
        self, batch: DetectedBatch, boxes_per_group: int
    ) -> Iterator[tuple[list[int], RawOutputs]]:
        """``segment`` in groups of whole images, the images with the fewest refined detections
        first, each group holding about ``boxes_per_group`` refined boxes (at least one image).

        Yields (the group's image indices, its ``RawOutputs``, with the batch's image indices).
        A caller that hands each group's answers out as they come makes an image with few
        detections wait for its own masks, not for those of a batch-mate with many.
        """
        num_images = batch.num_images
        index = batch.detections.batch_index
        refined = torch.bincount(index[batch.refine_mask], minlength=num_images).tolist()
        order = sorted(range(num_images), key=lambda i: refined[i])
        groups: list[list[int]] = []
        load = 0
        for image in order:
            if groups and load + refined[image] <= boxes_per_group:
                groups[-1].append(image)
                load += refined[image]
            else:
                groups.append([image])
                load = refined[image]
        if len(groups) == 1:  # the whole batch: no need to pick rows
            yield groups[0], self.segment(batch)
            return
        for group in groups:
            members = to_device(torch.tensor(group), index.device)
            rows = torch.nonzero(torch.isin(index, members)).squeeze(1)
            yield group, self.segment(batch, rows)


@dataclass
class DetectedBatch:
    """What ``MaskTransfiner.detect`` hands to ``segment``: the batch's features and detections."""

    features: list[torch.Tensor]  # P2..P5, [B, C, H/s, W/s]
    detections: Detections
    refine_mask: torch.Tensor  # [D] bool: the detections the refiner takes
    refine: bool  # False: coarse masks only, for every detection
    _enhanced: list[torch.Tensor] | None = None

    @property
    def num_images(self) -> int:
        return self.features[0].shape[0]

    def enhanced_features(self, mask_head: TransfinerMaskHead) -> list[torch.Tensor]:
        if self._enhanced is None:
            self._enhanced = mask_head.enhanced_features(self.features)
        return self._enhanced


def _keep_classes(
    detections: Detections, classes: torch.Tensor, max_detections: int | torch.Tensor | None, num_images: int
) -> Detections:
    """The detections of the classes each image keeps (classes [B, K] bool), then each image's
    best ``max_detections`` of them (None or negative: all)."""
    allowed = classes.to(detections.classes.device)[detections.batch_index, detections.classes]
    kept = detections.take(torch.nonzero(allowed).squeeze(1))
    rank = rank_within_image(kept.batch_index, num_images)
    kept = Detections(kept.boxes, kept.scores, kept.classes, kept.batch_index, rank)
    if max_detections is None:
        return kept
    top_k = per_image(max_detections, kept.batch_index)
    return kept.take(torch.nonzero((rank < top_k) | (top_k < 0)).squeeze(1))
