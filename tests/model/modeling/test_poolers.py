"""FPN level assignment and multi-level RoIAlignV2, against detectron2 v0.5's ROIPooler."""

from __future__ import annotations

import math

import torch
from torchvision.ops import roi_align

from transfiner.model.modeling.poolers import (
    ROIPooler,
    _roi_align_per_level_traced,
    assign_fpn_levels,
    boxes_to_rois,
    multilevel_roi_align,
)


def _square(side: float, x0: float = 3.0, y0: float = 5.0) -> list[float]:
    return [x0, y0, x0 + side, y0 + side]


def _formula_level(area: float) -> int:
    """detectron2: floor(4 + log2(sqrt(area) / 224 + 1e-8)), clamped to [2, 5]."""
    return min(max(math.floor(4 + math.log2(math.sqrt(area) / 224 + 1e-8)), 2), 5)


def test_assign_fpn_levels_examples():
    sides = [10.0, 112.0, 224.0, 448.0, 1000.0]
    boxes = torch.tensor([_square(s) for s in sides])
    levels = assign_fpn_levels(boxes)
    assert levels.dtype == torch.int64
    assert levels.tolist() == [0, 1, 2, 3, 3]  # P2, P3, P4, P5, P5
    assert levels.tolist() == [_formula_level(s * s) - 2 for s in sides]


def test_assign_fpn_levels_boundaries_and_aspect():
    # sqrt(area) decides, not the side: 56 x 224 has the area of a 112 square (P3).
    boxes = torch.tensor(
        [
            [0.0, 0.0, 56.0, 224.0],
            _square(111.0),
            _square(223.0),
            _square(447.0),
            _square(1.0),
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    assert assign_fpn_levels(boxes).tolist() == [1, 0, 1, 2, 0, 0]
    # Other level ranges and canonical sizes.
    big = torch.tensor([_square(2000.0), _square(10.0)])
    assert assign_fpn_levels(big, min_level=3, max_level=6).tolist() == [3, 0]
    assert assign_fpn_levels(torch.tensor([_square(112.0)]), canonical_box_size=112).tolist() == [2]


def test_assign_fpn_levels_matches_formula_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    wh = torch.exp(torch.rand(300, 2, generator=g) * math.log(1200.0))
    boxes = torch.cat((torch.zeros(300, 2), wh), dim=1)
    expected = [_formula_level(float(w) * float(h)) - 2 for w, h in wh.tolist()]
    got = assign_fpn_levels(boxes).tolist()
    # float32 vs float64 may disagree only exactly at a level boundary.
    mismatches = [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]
    for i in mismatches:
        size = math.sqrt(float(wh[i, 0]) * float(wh[i, 1]))
        assert abs(math.log2(size / 224) - round(math.log2(size / 224))) < 1e-5
    assert len(mismatches) <= 1


def _pyramid(generator: torch.Generator, batch: int = 3, channels: int = 4, size: tuple[int, int] = (64, 96)):
    return [torch.randn(batch, channels, size[0] // s, size[1] // s, generator=generator) for s in (4, 8, 16, 32)]


def test_multilevel_roi_align_equals_torchvision_on_assigned_level():
    g = torch.Generator().manual_seed(1)
    features = _pyramid(g)
    boxes = torch.tensor(
        [
            [3.0, 4.0, 20.5, 18.0],  # small -> P2
            [0.0, 0.0, 95.0, 63.0],  # large -> P3
            [10.2, 7.7, 40.1, 50.3],  # P2
            [-5.0, -3.0, 110.0, 70.0],  # outside the image -> P3/P4
            [30.0, 30.0, 31.0, 31.0],  # tiny
            [1.0, 2.0, 60.0, 58.0],
        ]
    )
    batch_index = torch.tensor([2, 0, 1, 2, 0, 1])
    levels = torch.tensor([0, 3, 0, 2, 0, 1])  # explicit mix, including P5
    rois = boxes_to_rois(boxes, batch_index)
    assert rois.shape == (6, 5)
    torch.testing.assert_close(rois[:, 0], batch_index.float())
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    out = multilevel_roi_align(features, rois, levels, 7, scales)
    assert out.shape == (6, 4, 7, 7)
    for i in range(6):
        level = int(levels[i])
        expected = roi_align(
            features[level], rois[i : i + 1], 7, spatial_scale=scales[level], sampling_ratio=0, aligned=True
        )
        torch.testing.assert_close(out[i : i + 1], expected)
        # aligned=True really matters (RoIAlignV2): the legacy op gives something else here.
        legacy = roi_align(
            features[level], rois[i : i + 1], 7, spatial_scale=scales[level], sampling_ratio=0, aligned=False
        )
        assert not torch.allclose(out[i : i + 1], legacy)


def test_roi_pooler_uses_size_rule_and_keeps_row_order():
    g = torch.Generator().manual_seed(2)
    features = _pyramid(g, batch=2, channels=3, size=(256, 320))
    boxes = torch.tensor(
        [
            _square(460.0, 5, 5),
            _square(12.0),
            _square(120.0, 40, 30),
            _square(230.0, 2, 2),
            _square(50.0, 100, 100),
            _square(12.0),
        ]
    )
    batch_index = torch.tensor([1, 0, 0, 1, 1, 1])
    pooler = ROIPooler(7, strides=(4, 8, 16, 32))
    assert (pooler.min_level, pooler.max_level) == (2, 5)
    levels = pooler.levels(boxes)
    assert levels.tolist() == [3, 0, 1, 2, 0, 0]
    out = pooler(features, boxes, batch_index)
    for i in range(len(boxes)):
        level = int(levels[i])
        roi = torch.cat((batch_index[i : i + 1, None].float(), boxes[i : i + 1]), dim=1)
        expected = roi_align(features[level], roi, 7, spatial_scale=1 / (4 * 2**level), sampling_ratio=0, aligned=True)
        torch.testing.assert_close(out[i : i + 1], expected)
    # The same box in two images pools from its own image.
    assert not torch.allclose(out[1], out[5])
    # Permuting the input rows permutes the output rows.
    perm = torch.tensor([4, 2, 0, 5, 1, 3])
    torch.testing.assert_close(pooler(features, boxes[perm], batch_index[perm]), out[perm])


def test_zero_boxes():
    g = torch.Generator().manual_seed(3)
    features = _pyramid(g, batch=2, channels=5)
    out = ROIPooler(14)(features, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 5, 14, 14)
    out = multilevel_roi_align(
        features, torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), 7, (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    )
    assert out.shape == (0, 5, 7, 7)
    # Some levels empty, others not.
    out = ROIPooler(7)(features, torch.tensor([_square(20.0)]), torch.tensor([1]))
    assert out.shape == (1, 5, 7, 7) and out.abs().sum() > 0


def test_eager_pooling_by_level_slices_equals_the_traced_graphs_masks():
    # The eager path sorts the RoIs by level (one wait for the device); exported graphs pick each
    # level's rows by a mask. Same values, an empty level (P4 here) included.
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(2, 8, 64 // 2**i, 96 // 2**i, generator=g) for i in range(4)]
    n = 40
    xy = torch.rand(n, 2, generator=g) * 200
    wh = torch.rand(n, 2, generator=g) * 150 + 1
    rois = torch.cat((torch.randint(0, 2, (n, 1), generator=g).float(), xy, xy + wh), dim=1)
    levels = torch.randint(0, 4, (n,), generator=g)
    levels[levels == 2] = 3
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    eager = multilevel_roi_align(features, rois, levels, 7, scales)
    traced = _roi_align_per_level_traced(features, rois, levels, 7, scales, 0)
    assert torch.equal(eager, traced)
    assert eager.abs().sum((1, 2, 3)).min() > 0  # every RoI was pooled
