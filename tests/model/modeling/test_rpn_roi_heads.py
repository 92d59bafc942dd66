"""RPN head/proposals and the box head's inference, against detectron2 v0.5 semantics."""

from __future__ import annotations

import math

import torch
from torchvision.ops import box_iou, nms

from transfiner.model.config import ROIHeadsConfig, RPNConfig
from transfiner.model.modeling.box_ops import Box2BoxTransform, rank_within_image
from transfiner.model.modeling.roi_heads import BoxROIHeads
from transfiner.model.modeling.rpn import RPN, RPNHead

STRIDES = (4, 8, 16, 32, 64)


# ----------------------------------------------------------------------------- RPN head


def _position_head(channels: int = 2, num_anchors: int = 3) -> RPNHead:
    """A head whose outputs are known functions of the input: conv = identity, 1x1 = scales."""
    head = RPNHead(channels, num_anchors)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.bias.zero_()
        for c in range(channels):
            head.conv.weight[c, c, 1, 1] = 1.0
        head.objectness_logits.weight.zero_()
        head.objectness_logits.bias.zero_()
        head.anchor_deltas.weight.zero_()
        head.anchor_deltas.bias.zero_()
        for a in range(num_anchors):
            head.objectness_logits.weight[a, 0, 0, 0] = a + 1.0  # logit(y, x, a) = (a + 1) v(y, x)
            for k in range(4):  # channel a * 4 + k: delta k of anchor a (detectron2's view(N, A, 4, H, W))
                head.anchor_deltas.weight[a * 4 + k, 0, 0, 0] = 10.0 * a + k + 1
    return head


def test_rpn_head_flattening_order_is_y_x_anchor():
    head = _position_head()
    height, width, num_anchors = 3, 4, 3
    values = torch.stack(
        [
            torch.arange(height * width, dtype=torch.float32).reshape(height, width) + 1,
            torch.arange(height * width, dtype=torch.float32).reshape(height, width) * 2 + 100,
        ]
    )  # two images, v(y, x) >= 0 so the ReLU keeps it
    features = torch.zeros(2, 2, height, width)
    features[:, 0] = values
    small = torch.zeros(2, 2, 1, 2)
    small[:, 0] = torch.tensor([[[5.0, 7.0]], [[1.0, 3.0]]])
    with torch.no_grad():
        logits, deltas = head([features, small])
    assert [t.shape for t in logits] == [(2, height * width * num_anchors), (2, 2 * num_anchors)]
    assert [t.shape for t in deltas] == [(2, height * width * num_anchors, 4), (2, 2 * num_anchors, 4)]
    for b in range(2):
        for y in range(height):
            for x in range(width):
                for a in range(num_anchors):
                    i = (y * width + x) * num_anchors + a
                    v = values[b, y, x]
                    assert logits[0][b, i] == (a + 1) * v
                    torch.testing.assert_close(deltas[0][b, i], v * (10.0 * a + torch.arange(1.0, 5.0)))
        for x in range(2):
            for a in range(num_anchors):
                assert logits[1][b, x * num_anchors + a] == (a + 1) * small[b, 0, 0, x]


def test_rpn_head_bias_per_anchor_picks_flat_index():
    """Objectness = bias of one anchor, plus a bump at one location: argmax is (y*W + x)*A + a."""
    head = RPNHead(1, 3)
    with torch.no_grad():
        head.conv.weight.zero_()
        head.conv.weight[0, 0, 1, 1] = 1.0
        head.conv.bias.zero_()
        head.objectness_logits.weight.fill_(1.0)
        head.objectness_logits.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    x = torch.zeros(1, 1, 5, 6)
    x[0, 0, 3, 4] = 1.0
    with torch.no_grad():
        logits, _ = head([x])
    assert int(logits[0].argmax()) == (3 * 6 + 4) * 3 + 2


# ----------------------------------------------------------------------------- RPN proposals


def _rpn(pre: int = 30, post: int = 20, nms_thresh: float = 0.7, seed: int = 0, std: float = 0.5) -> RPN:
    torch.manual_seed(seed)
    cfg = RPNConfig(
        anchor_sizes=(16, 32, 64, 128, 256),
        pre_nms_topk_train=pre + 5,
        pre_nms_topk_test=pre,
        post_nms_topk_train=post // 2,
        post_nms_topk_test=post,
        nms_thresh=nms_thresh,
    )
    rpn = RPN(cfg, 4, STRIDES).eval()
    with torch.no_grad():
        for layer in (rpn.rpn_head.conv, rpn.rpn_head.objectness_logits, rpn.rpn_head.anchor_deltas):
            layer.weight.normal_(std=std)
            layer.bias.normal_(std=std)
    return rpn


def _features(seed: int, batch: int = 2, size: tuple[int, int] = (64, 96)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 4, math.ceil(size[0] / s), math.ceil(size[1] / s), generator=g) for s in STRIDES]


def _reference_proposals(anchors, logits, deltas, image_sizes, pre, post, nms_thresh, weights):
    """detectron2's find_top_rpn_proposals, written out: decode every anchor, sort, keep pre per
    level, drop non-finite, clip, drop empty, per-level NMS, keep post."""
    transform = Box2BoxTransform(weights)
    results = []
    for n, (h, w) in enumerate(image_sizes.tolist()):
        boxes, scores, lvls = [], [], []
        for level, (a, logit, d) in enumerate(zip(anchors, logits, deltas)):
            decoded = transform.apply_deltas(d[n], a)
            order = logit[n].sort(descending=True).indices[:pre]
            boxes.append(decoded[order])
            scores.append(logit[n][order])
            lvls.append(torch.full((len(order),), level))
        boxes, scores, lvls = torch.cat(boxes), torch.cat(scores), torch.cat(lvls)
        valid = torch.isfinite(boxes).all(1) & torch.isfinite(scores)
        boxes, scores, lvls = boxes[valid], scores[valid], lvls[valid]
        boxes = torch.stack(
            (boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)), dim=1
        )
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, lvls = boxes[keep], scores[keep], lvls[keep]
        kept = []
        for level in lvls.unique().tolist():  # NMS inside each level, then merge by score
            idx = torch.nonzero(lvls == level).squeeze(1)
            kept.append(idx[nms(boxes[idx], scores[idx], nms_thresh)])
        kept = torch.cat(kept)
        kept = kept[scores[kept].sort(descending=True).indices][:post]
        results.append(torch.cat((boxes[kept], scores[kept, None]), dim=1))
    return results


def test_rpn_proposals_match_detectron2_algorithm():
    rpn = _rpn(pre=25, post=14, nms_thresh=0.6)
    features = _features(1)
    image_sizes = torch.tensor([[64, 96], [50, 70]])  # second image padded
    with torch.no_grad():
        proposals, anchors, logits, deltas = rpn(features, image_sizes)
    assert [len(a) for a in anchors] == [f.shape[2] * f.shape[3] * 3 for f in features]
    expected = _reference_proposals(anchors, logits, deltas, image_sizes, 25, 14, 0.6, (1.0, 1.0, 1.0, 1.0))
    assert [len(p) for p in expected] == [14, 11]  # image 0 is capped, image 1 is not
    for got, want in zip(proposals, expected):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_rpn_proposals_are_clipped_sorted_nonempty_and_capped():
    rpn = _rpn(pre=40, post=15, nms_thresh=0.7, seed=2, std=0.3)
    features = _features(3, batch=3)
    image_sizes = torch.tensor([[64, 96], [33, 41], [64, 20]])
    with torch.no_grad():
        proposals, *_ = rpn(features, image_sizes)
        rpn.cfg.post_nms_topk_test = 1000
        uncapped, *_ = rpn(features, image_sizes)
    assert len(proposals) == 3
    for boxes, more in zip(proposals, uncapped):
        assert len(more) > 15
        torch.testing.assert_close(boxes, more[:15])  # the cap keeps the best-scoring ones
    for boxes, (h, w) in zip(proposals, image_sizes.tolist()):
        assert boxes.shape[1] == 5 and len(boxes) == 15
        xyxy, scores = boxes[:, :4], boxes[:, 4]
        assert (xyxy >= 0).all()
        assert (xyxy[:, [0, 2]] <= w).all() and (xyxy[:, [1, 3]] <= h).all()
        assert ((xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])).all()
        assert (scores[:-1] >= scores[1:]).all()
    # Large deltas push many anchors out of small images: some get clipped onto the border.
    assert any(((b[:, 2] == w) | (b[:, 3] == h)).any() for b, (h, w) in zip(proposals, image_sizes.tolist()))


def test_rpn_train_and_test_topk():
    rpn = _rpn(pre=30, post=12, nms_thresh=0.99, seed=4)
    features = _features(5, batch=1)
    sizes = torch.tensor([[64, 96]])
    with torch.no_grad():
        test_props, *_ = rpn(features, sizes)
        rpn.train()
        train_props, *_ = rpn(features, sizes)
    assert len(test_props[0]) == 12
    assert len(train_props[0]) == 6


def test_rpn_top_proposal_is_the_anchor_at_the_peak():
    """With zero deltas, the best proposal is the anchor whose (y, x, a) logit is highest."""
    rpn = RPN(RPNConfig(anchor_sizes=(16, 32, 64, 128, 256), post_nms_topk_test=5), 1, STRIDES).eval()
    with torch.no_grad():
        head = rpn.rpn_head
        head.conv.weight.zero_()
        head.conv.weight[0, 0, 1, 1] = 1.0
        head.conv.bias.zero_()
        head.objectness_logits.weight.fill_(1.0)
        head.objectness_logits.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))  # ratio 2 wins
        head.anchor_deltas.weight.zero_()
        head.anchor_deltas.bias.zero_()
    features = [torch.zeros(1, 1, math.ceil(64 / s), math.ceil(96 / s)) for s in STRIDES]
    features[1][0, 0, 3, 5] = 2.0  # P3 (stride 8, size 32): centre (40, 24)
    with torch.no_grad():
        proposals, *_ = rpn(features, torch.tensor([[64, 96]]))
    s = math.sqrt(2.0)
    expected = torch.tensor([40 - 8 * s, 24 - 16 * s, 40 + 8 * s, 24 + 16 * s, 2.5])
    torch.testing.assert_close(proposals[0][0], expected)


# ----------------------------------------------------------------------------- box head inference


def _heads(num_classes: int = 3, **overrides) -> BoxROIHeads:
    cfg = ROIHeadsConfig(num_classes=num_classes, fc_dim=16, **overrides)
    return BoxROIHeads(cfg, in_channels=2).eval()


def _logits(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (rows: K classes then background)."""
    return torch.tensor(probs).log()


def test_box_head_forward_shapes():
    torch.manual_seed(0)
    heads = _heads(num_classes=3)
    features = [torch.randn(2, 2, 64 // s, 96 // s) for s in (4, 8, 16, 32)]
    boxes = torch.tensor([[0.0, 0.0, 20.0, 30.0], [10.0, 10.0, 90.0, 60.0], [5.0, 5.0, 9.0, 9.0]])
    with torch.no_grad():
        logits, deltas = heads(features, boxes, torch.tensor([0, 1, 1]))
    assert logits.shape == (3, 4) and deltas.shape == (3, 12)
    state = heads.state_dict()
    assert tuple(state["box_head.fc1.weight"].shape) == (16, 2 * 7 * 7)
    assert tuple(state["box_predictor.cls_score.weight"].shape) == (4, 16)
    assert tuple(state["box_predictor.bbox_pred.weight"].shape) == (12, 16)


def _scenario():
    """Two images; logits and deltas built so the expected detections are known."""
    proposals = torch.tensor(
        [
            [10.0, 10.0, 50.0, 50.0],  # A, image 0
            [12.0, 12.0, 52.0, 52.0],  # B, image 0, IoU(A, B) = 0.82
            [60.0, 60.0, 90.0, 90.0],  # C, image 0, background
            [0.0, 0.0, 100.0, 100.0],  # D, image 1, clipped to 60 x 80
            [5.0, 5.0, 20.0, 20.0],  # E, image 1, class 0 box doubled in width by its deltas
            [10.0, 10.0, 50.0, 50.0],  # F, image 1, same box as A (other image: no suppression)
        ]
    )
    batch = torch.tensor([0, 0, 0, 1, 1, 1])
    probs = [
        [0.60, 0.30, 0.04, 0.06],  # A
        [0.50, 0.02, 0.40, 0.08],  # B: class 0 suppressed by A's class 0; class 2 survives
        [0.01, 0.01, 0.01, 0.97],  # C: background wins; nothing survives
        [0.20, 0.70, 0.04, 0.06],  # D
        [0.90, 0.03, 0.03, 0.04],  # E: the best score of the batch, but in image 1
        [0.55, 0.01, 0.01, 0.43],  # F
    ]
    deltas = torch.zeros(6, 12)
    deltas[4, 2] = 5.0 * math.log(2.0)  # E, class 0, dw (weight 5): width 15 -> 30
    deltas[4, 4] = 10.0  # E, class 1 dx: irrelevant (score below threshold)
    image_sizes = torch.tensor([[100, 100], [80, 60]])  # (h, w)
    return _logits(probs), deltas, proposals, batch, image_sizes


def test_box_inference_known_detections():
    heads = _heads()
    logits, deltas, proposals, batch, sizes = _scenario()
    det = heads.inference(logits, deltas, proposals, batch, sizes)
    assert det.batch_index.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert det.classes.tolist() == [0, 2, 1, 0, 1, 0, 0]
    torch.testing.assert_close(det.scores, torch.tensor([0.60, 0.40, 0.30, 0.90, 0.70, 0.55, 0.20]))
    expected_boxes = torch.tensor(
        [
            [10.0, 10.0, 50.0, 50.0],  # A class 0
            [12.0, 12.0, 52.0, 52.0],  # B class 2
            [10.0, 10.0, 50.0, 50.0],  # A class 1: overlaps A class 0, other class, survives
            [0.0, 5.0, 27.5, 20.0],  # E class 0: [-2.5, 5, 27.5, 20] clipped at x = 0
            [0.0, 0.0, 60.0, 80.0],  # D class 1 clipped to w = 60, h = 80
            [10.0, 10.0, 50.0, 50.0],  # F class 0
            [0.0, 0.0, 60.0, 80.0],  # D class 0
        ]
    )
    torch.testing.assert_close(det.boxes, expected_boxes)
    assert det.classes.max() < 3  # the background column never becomes a class


def test_box_inference_per_class_nms():
    heads = _heads(num_classes=2)
    proposals = torch.tensor([[0.0, 0.0, 40.0, 40.0], [2.0, 2.0, 42.0, 42.0], [1.0, 1.0, 41.0, 41.0]])
    assert (box_iou(proposals, proposals) > 0.8).all()  # every pair overlaps
    probs = [[0.8, 0.1, 0.1], [0.1, 0.7, 0.2], [0.6, 0.1, 0.3]]
    args = (_logits(probs), torch.zeros(3, 8), proposals, torch.zeros(3, dtype=torch.int64), torch.tensor([[100, 100]]))
    det = heads.inference(*args)
    # The best box of each class survives although they overlap; the others are suppressed.
    assert det.classes.tolist() == [0, 1]
    torch.testing.assert_close(det.scores, torch.tensor([0.8, 0.7]))
    torch.testing.assert_close(det.boxes, proposals[:2])
    # With a threshold above every IoU, all six (box, class) pairs survive, score-sorted.
    heads.cfg.nms_thresh_test = 0.95
    det = heads.inference(*args)
    torch.testing.assert_close(det.scores, torch.tensor([0.8, 0.7, 0.6, 0.1, 0.1, 0.1]))
    assert det.classes.tolist()[:3] == [0, 1, 0]
    assert sorted(zip(det.classes.tolist()[3:])) == [(0,), (1,), (1,)]


def test_box_inference_score_threshold():
    heads = _heads()
    logits, deltas, proposals, batch, sizes = _scenario()
    det = heads.inference(logits, deltas, proposals, batch, sizes, score_thresh=0.5)
    # B's class-0 0.5 is below, A's class 0 (0.6) suppresses nothing else of image 0.
    torch.testing.assert_close(det.scores, torch.tensor([0.60, 0.90, 0.70, 0.55]))
    assert det.batch_index.tolist() == [0, 1, 1, 1]
    # The threshold is strict: a score equal to it is dropped.
    exact = torch.softmax(logits, dim=-1)[5, 0].item()  # F class 0, 0.55
    det = heads.inference(logits, deltas, proposals, batch, sizes, score_thresh=exact)
    torch.testing.assert_close(det.scores, torch.tensor([0.60, 0.90, 0.70]))
    det = heads.inference(logits, deltas, proposals, batch, sizes, score_thresh=0.95)
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0,) and det.classes.shape == (0,)
    assert det.batch_index.shape == (0,)
    # The default comes from the config (0.05): 0.04 scores are dropped.
    det = heads.inference(logits, deltas, proposals, batch, sizes)
    assert (det.scores > 0.05).all()


def test_box_inference_topk_per_image():
    heads = _heads(detections_per_image=2)
    logits, deltas, proposals, batch, sizes = _scenario()
    det = heads.inference(logits, deltas, proposals, batch, sizes)
    assert det.batch_index.tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(det.scores, torch.tensor([0.60, 0.40, 0.90, 0.70]))
    det = heads.inference(logits, deltas, proposals, batch, sizes, detections_per_image=1)
    assert det.batch_index.tolist() == [0, 1]
    assert det.classes.tolist() == [0, 0]
    torch.testing.assert_close(det.scores, torch.tensor([0.60, 0.90]))


def test_box_inference_unordered_batch_and_empty_image():
    """Proposals of images interleaved, image 1 with nothing: grouped by image, score-sorted."""
    heads = _heads()
    logits, deltas, proposals, batch, _ = _scenario()
    perm = torch.tensor([4, 0, 3, 2, 5, 1])
    batch = torch.tensor([0, 0, 0, 2, 2, 2])[perm]  # image 1 gets no proposals
    sizes = torch.tensor([[100, 100], [10, 10], [80, 60]])
    det = heads.inference(logits[perm], deltas[perm], proposals[perm], batch, sizes)
    assert det.batch_index.tolist() == [0, 0, 0, 2, 2, 2, 2]
    torch.testing.assert_close(det.scores, torch.tensor([0.60, 0.40, 0.30, 0.90, 0.70, 0.55, 0.20]))
    assert det.rank.tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_rank_within_image():
    assert rank_within_image(torch.tensor([0, 0, 1, 1, 1, 3]), 4).tolist() == [0, 1, 0, 1, 2, 0]
    # Rows keep their order even if images interleave.
    assert rank_within_image(torch.tensor([1, 0, 1, 1, 0]), 2).tolist() == [0, 0, 1, 2, 1]
    assert rank_within_image(torch.zeros(0, dtype=torch.int64), 3).tolist() == []


def test_box_inference_negative_topk_keeps_all():
    """detectron2's fast_rcnn_inference: topk_per_image < 0 returns every detection."""
    heads = _heads(detections_per_image=1)
    logits, deltas, proposals, batch, sizes = _scenario()
    det = heads.inference(logits, deltas, proposals, batch, sizes, detections_per_image=-1)
    torch.testing.assert_close(det.scores, torch.tensor([0.60, 0.40, 0.30, 0.90, 0.70, 0.55, 0.20]))


def test_box_inference_drops_non_finite_proposals_before_clipping():
    """detectron2 drops a proposal whose boxes (any class) or scores are not finite, before the
    clip that would otherwise turn an infinite box into a finite one on the image border."""
    heads = _heads()
    logits, deltas, proposals, batch, sizes = _scenario()
    deltas[0, 8] = float("inf")  # A, class 2 (score 0.04, below the threshold): dx = inf
    logits[5, 3] = float("nan")  # F: a NaN background logit
    det = heads.inference(logits, deltas, proposals, batch, sizes)
    # A (all its classes) and F are gone; B's class 0 (0.5) is no longer suppressed by A.
    assert det.batch_index.tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(det.scores, torch.tensor([0.50, 0.40, 0.90, 0.70, 0.20]))
    assert torch.isfinite(det.boxes).all()
    # Only an infinite delta on a kept class: without the fix it became the box [60, 0, 60, 80].
    logits, deltas, proposals, batch, sizes = _scenario()
    deltas[3, 4] = float("inf")  # D, class 1 (0.7)
    det = heads.inference(logits, deltas, proposals, batch, sizes)
    torch.testing.assert_close(det.scores, torch.tensor([0.60, 0.40, 0.30, 0.90, 0.55]))
