"""Training losses: detectron2's RPN and box losses, and every loss the official Transfiner trains.

``TrainingLosses`` holds the two training-only heads of the official code (the semantic
predictor on the enhanced P2 and the boundary branch), so the inference model never carries them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from transfiner.model.config import TransfinerConfig
from transfiner.model.datasets.coco import TrainingSample
from transfiner.model.datasets.targets import crop_masks, gt_incoherence, mask_boundary
from transfiner.model.modeling.layers import c2_msra_fill
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.modeling.refiner import LEVEL_SIZES, PointQuadtree


class Matcher:
    """detectron2's ``Matcher``: each prediction gets its best ground truth and a label.

    ``thresholds`` (ascending) split IoU into intervals labelled by ``labels`` (1 foreground,
    0 background, -1 ignore). With ``allow_low_quality_matches`` every ground truth's best
    predictions are foreground even below the top threshold (the RPN does this).
    """

    def __init__(self, thresholds: list[float], labels: list[int], allow_low_quality_matches: bool = False):
        self.thresholds = [-float("inf"), *thresholds, float("inf")]
        self.labels = labels
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """quality [G, P] IoU -> (matched ground-truth index [P], label [P] int8)."""
        if quality.numel() == 0:
            matches = quality.new_zeros(quality.shape[1], dtype=torch.int64)
            return matches, quality.new_full((quality.shape[1],), self.labels[0], dtype=torch.int8)
        values, matches = quality.max(dim=0)
        labels = matches.new_full(matches.shape, 1, dtype=torch.int8)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            labels[(values >= low) & (values < high)] = label
        if self.allow_low_quality_matches:
            best = quality.max(dim=1, keepdim=True).values
            _, preds = torch.nonzero(quality == best, as_tuple=True)
            labels[preds] = 1
        return matches, labels


def subsample_labels(
    labels: torch.Tensor, num_samples: int, positive_fraction: float, bg_label: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random positive and negative indices, at most ``positive_fraction`` positive (detectron2)."""
    positive = torch.nonzero((labels != -1) & (labels != bg_label)).squeeze(1)
    negative = torch.nonzero(labels == bg_label).squeeze(1)
    num_pos = min(positive.numel(), int(num_samples * positive_fraction))
    num_neg = min(negative.numel(), num_samples - num_pos)
    pos = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
    return pos, neg


def dice_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Official ``dice_loss_my``: 1 - (2 sum(pg) + 1) / (sum p + sum g + 1), averaged over boxes."""
    probs, targets = probs.flatten(1), targets.flatten(1)
    loss = 1 - (2 * (probs * targets).sum(1) + 1) / (probs.sum(1) + targets.sum(1) + 1)
    return loss.sum() / max(probs.shape[0], 1)


@dataclass
class SampledProposals:
    boxes: torch.Tensor  # [S, 4]
    batch_index: torch.Tensor  # [S]
    classes: torch.Tensor  # [S], num_classes = background
    gt_boxes: torch.Tensor  # [S, 4] matched ground truth box (meaningless for background)
    instance: torch.Tensor  # [S] index into the batch's concatenated ground-truth masks


class TrainingLosses(nn.Module):
    """Computes the loss dict of one batch for ``MaskTransfiner`` (which must be in train mode)."""

    def __init__(self, model: MaskTransfiner, semantic_loss: bool = True, boundary_loss: bool = True) -> None:
        super().__init__()
        cfg = model.cfg
        channels = cfg.fpn.out_channels
        self.rpn_matcher = Matcher(list(cfg.rpn.iou_thresholds), [0, -1, 1], allow_low_quality_matches=True)
        self.roi_matcher = Matcher([cfg.roi_heads.iou_threshold], [0, 1])
        t = cfg.transfiner
        self.train_quadtree = PointQuadtree(t.train_thresholds, self.train_cells(t))
        # Official training-only heads: `predictor_semantic_s`, `deconv_bo` + `predictor_bo`.
        self.semantic_predictor = nn.Conv2d(channels, 1, 1) if semantic_loss else None
        if boundary_loss:
            self.boundary_deconv = nn.ConvTranspose2d(cfg.mask_head.conv_dim, cfg.mask_head.conv_dim, 2, stride=2)
            self.boundary_predictor = nn.Conv2d(cfg.mask_head.conv_dim, 1, 1)
            c2_msra_fill(self.boundary_deconv)
            nn.init.normal_(self.boundary_predictor.weight, std=0.001)
            nn.init.zeros_(self.boundary_predictor.bias)
        else:
            self.boundary_deconv = self.boundary_predictor = None

    @staticmethod
    def train_cells(cfg: TransfinerConfig) -> tuple[int, int, int]:
        """Cells per level so each level gets about ``train_nodes_per_level`` nodes (150 official)."""
        n = cfg.train_nodes_per_level
        return tuple(max(1, round(n / (size // LEVEL_SIZES[0]) ** 2)) for size in LEVEL_SIZES)

    def forward(
        self, model: MaskTransfiner, images: torch.Tensor, image_sizes: torch.Tensor, targets: list[TrainingSample]
    ) -> dict[str, torch.Tensor]:
        cfg = model.cfg
        device = images.device
        gt_boxes = [t.boxes.to(device) for t in targets]
        gt_classes = [t.classes.to(device) for t in targets]
        features = model.backbone(model.normalize(images))
        proposals, anchors, logits, deltas = model.proposal_generator(features, image_sizes)
        losses = self.rpn_losses(model, anchors, logits, deltas, gt_boxes)

        sampled = self.sample_proposals(model, proposals, gt_boxes, gt_classes)
        box_features = features[:4]
        cls_logits, box_deltas = model.roi_heads(box_features, sampled.boxes, sampled.batch_index)
        losses.update(self.box_losses(model, cls_logits, box_deltas, sampled))

        # Ground-truth masks of the whole batch on one padded canvas, indexed by `instance`.
        height, width = images.shape[-2:]
        masks = torch.zeros((sum(len(t.masks) for t in targets), height, width), device=device)
        start = 0
        for t in targets:
            n, h, w = t.masks.shape
            masks[start : start + n, :h, :w] = t.masks.to(device)
            start += n
        fg = sampled.classes < cfg.roi_heads.num_classes
        semantic = model.mask_head.semantic(features[0])
        enhanced = [features[0] + semantic] + list(features[1:4])
        losses.update(self.mask_losses(model, box_features, enhanced, sampled, fg, masks))
        if self.semantic_predictor is not None:
            losses["loss_semantic"] = self.semantic_loss(semantic, masks, targets)
        return losses

    def rpn_losses(self, model, anchors, logits, deltas, gt_boxes) -> dict[str, torch.Tensor]:
        cfg = model.cfg.rpn
        all_anchors = torch.cat(anchors)  # [A, 4]
        logits = torch.cat(logits, dim=1)  # [B, A]
        deltas = torch.cat(deltas, dim=1)  # [B, A, 4]
        labels, targets = [], []
        for boxes in gt_boxes:
            matches, label = self.rpn_matcher(box_iou(boxes, all_anchors))
            pos, neg = subsample_labels(label, cfg.batch_size_per_image, cfg.positive_fraction, 0)
            sampled = torch.full_like(label, -1)
            sampled[pos], sampled[neg] = 1, 0
            labels.append(sampled)
            matched = boxes[matches] if len(boxes) else torch.zeros_like(all_anchors)
            targets.append(model.proposal_generator.box2box.get_deltas(all_anchors, matched))
        labels = torch.stack(labels)
        targets = torch.stack(targets)
        valid = labels >= 0
        positive = labels == 1
        normalizer = cfg.batch_size_per_image * len(gt_boxes)
        objectness = F.binary_cross_entropy_with_logits(logits[valid], labels[valid].float(), reduction="sum")
        localization = F.l1_loss(deltas[positive], targets[positive], reduction="sum")
        return {"loss_rpn_cls": objectness / normalizer, "loss_rpn_loc": localization / normalizer}

    @torch.no_grad()
    def sample_proposals(self, model, proposals, gt_boxes, gt_classes) -> SampledProposals:
        """Adds the ground truth to the proposals, matches them, samples 512 per image (25% fg)."""
        cfg = model.cfg.roi_heads
        out = {k: [] for k in ("boxes", "batch_index", "classes", "gt_boxes", "instance")}
        offset = 0
        for i, (props, boxes, classes) in enumerate(zip(proposals, gt_boxes, gt_classes)):
            candidates = torch.cat((props[:, :4], boxes))
            matches, labels = self.roi_matcher(box_iou(boxes, candidates))
            cls = classes[matches] if len(boxes) else torch.zeros_like(matches)
            cls = torch.where(labels == 1, cls, torch.full_like(cls, cfg.num_classes))
            pos, neg = subsample_labels(cls, cfg.batch_size_per_image, cfg.positive_fraction, cfg.num_classes)
            keep = torch.cat((pos, neg))
            out["boxes"].append(candidates[keep])
            out["batch_index"].append(torch.full((len(keep),), i, dtype=torch.int64, device=candidates.device))
            out["classes"].append(cls[keep])
            out["gt_boxes"].append(boxes[matches[keep]] if len(boxes) else candidates[keep])
            out["instance"].append(matches[keep] + offset)
            offset += len(boxes)
        return SampledProposals(**{k: torch.cat(v) for k, v in out.items()})

    def box_losses(self, model, cls_logits, box_deltas, sampled: SampledProposals) -> dict[str, torch.Tensor]:
        num_classes = model.cfg.roi_heads.num_classes
        loss_cls = F.cross_entropy(cls_logits, sampled.classes)
        fg = torch.nonzero(sampled.classes < num_classes).squeeze(1)
        pred = box_deltas.view(-1, num_classes, 4)[fg, sampled.classes[fg]]
        target = model.roi_heads.box2box.get_deltas(sampled.boxes[fg], sampled.gt_boxes[fg])
        loss_reg = F.l1_loss(pred, target, reduction="sum") / max(sampled.classes.numel(), 1)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_reg}

    def mask_losses(
        self, model, features, enhanced, sampled: SampledProposals, fg: torch.Tensor, masks: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Coarse mask, incoherence (dice + BCE, x0.5), refinement (L1) and boundary losses.

        features: P2..P5; enhanced: P2 + semantic(P2), P3..P5; masks [N, H, W] float 0/1.
        """
        head = model.mask_head
        boxes, batch_index = sampled.boxes[fg], sampled.batch_index[fg]
        classes, instance = sampled.classes[fg], sampled.instance[fg]
        if boxes.shape[0] == 0:
            # No foreground: keep every mask-branch parameter in the graph with a zero loss.
            zero = sum(p.sum() for p in head.parameters()) * 0.0
            names = ["loss_mask", "loss_mask_uncertain", "loss_mask_refine"]
            return {n: zero for n in names + (["loss_bound"] if self.boundary_predictor is not None else [])}

        roi_features = head.pooler(features, boxes, batch_index)
        logits, mask_features = head.coarse(roi_features)
        logits = logits[torch.arange(len(classes), device=logits.device), classes]  # [F, 28, 28]
        target28 = crop_masks(masks, boxes, instance, 28)
        losses = {"loss_mask": F.binary_cross_entropy_with_logits(logits, target28.float())}

        incoherence = head.incoherence(roi_features, mask_features)  # [F, 28, 28]
        gt_inc = gt_incoherence(masks, boxes, instance).float()
        # F.binary_cross_entropy raises on NaN input; a diverged run must reach the trainer's check
        # of the total instead (the dice term keeps the total NaN). Finite values are unchanged.
        probabilities = incoherence.nan_to_num(nan=0.5).clamp(1e-6, 1 - 1e-6)
        losses["loss_mask_uncertain"] = 0.5 * (
            dice_loss(incoherence, gt_inc) + F.binary_cross_entropy(probabilities, gt_inc)
        )

        # Refinement on at most `train_max_boxes` boxes, nodes sampled among predicted incoherent cells.
        keep = slice(0, head.cfg.train_max_boxes)
        refiner = head.refiner
        levels = self.train_quadtree(incoherence[keep].detach(), random_order=True)
        decoded = refiner.decode(
            enhanced,
            boxes[keep],
            batch_index[keep],
            head.pooler.levels(boxes[keep]),
            roi_features[keep],
            logits[keep].detach().sigmoid(),
            levels,
        )
        predictions = [decoded[0]]
        labels = [crop_masks(masks, boxes[keep], instance[keep], 14).flatten(1)]
        valid = [torch.ones_like(decoded[0], dtype=torch.bool)]
        for level, values in zip(levels, decoded[1:]):
            grid = crop_masks(masks, boxes[keep], instance[keep], level.size).flatten(1)
            predictions.append(values)
            labels.append(grid.gather(1, level.nodes))
            valid.append(level.valid)
        predictions, labels, valid = (torch.cat(t, dim=1) for t in (predictions, labels, valid))
        losses["loss_mask_refine"] = F.l1_loss(predictions[valid], labels[valid].float())

        if self.boundary_predictor is not None:
            boundary = self.boundary_predictor(F.relu(self.boundary_deconv(mask_features)))[:, 0]
            # Official: JointLoss of two identical BCE terms, times 0.5 = one BCE.
            losses["loss_bound"] = F.binary_cross_entropy_with_logits(boundary, mask_boundary(target28).float())
        return losses

    def semantic_loss(self, semantic: torch.Tensor, masks: torch.Tensor, targets: list[TrainingSample]) -> torch.Tensor:
        """BCE of a 1x1 conv on the semantic P2 features vs the union of the image's masks (x0.25).

        The union is drawn on the padded canvas (the official code stretches the unpadded one)."""
        logits = self.semantic_predictor(semantic)[:, 0]  # [B, H/4, W/4]
        union = torch.zeros((len(targets),) + masks.shape[-2:], device=semantic.device)
        start = 0
        for i, t in enumerate(targets):
            n = len(t.masks)
            if n:
                union[i] = masks[start : start + n].amax(dim=0)
            start += n
        target = F.interpolate(union[:, None], size=logits.shape[-2:], mode="nearest")[:, 0]
        return 0.25 * F.binary_cross_entropy_with_logits(logits, target)
