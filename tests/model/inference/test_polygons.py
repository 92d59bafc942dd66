"""The polygon tracer: what its polygons mean (pycocotools rasterises them back to the mask, holes
filled), and that the linear-time tracer gives exactly the answers of the tracer it replaced
(scripts/reference/polygons.py) on many random masks of every kind that makes tracing hard."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_util
import pytest

from scripts.reference.polygons import reference_mask_to_polygons
from transfiner.model.inference.polygons import mask_to_polygons


def _speckled(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.random((h, w)) < rng.uniform(0.05, 0.95)


def _blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros((h, w), bool)
    for _ in range(rng.integers(1, 8)):
        cy, cx = rng.uniform(-3, h + 3), rng.uniform(-3, w + 3)  # some cross the border
        ry, rx = rng.uniform(1, max(h, 2) / 2), rng.uniform(1, max(w, 2) / 2)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return mask


def _holes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Blobs with holes cut out, holes with islands inside them, and rings."""
    yy, xx = np.mgrid[:h, :w]
    mask = _blobs(rng, h, w)
    for _ in range(rng.integers(1, 6)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1, 2 + max(h, w) / 3)
        distance = np.hypot(yy - cy, xx - cx)
        mask &= ~(distance < r)
        mask |= distance < r / 3  # an island inside the hole
    return mask


def _diagonals(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Pixels that touch only at corners: checkerboards, diagonal lines, and both mixed with
    solid pieces, so corners where two edges leave are everywhere."""
    yy, xx = np.mgrid[:h, :w]
    kind = rng.integers(3)
    if kind == 0:
        mask = (yy + xx) % 2 == 0
    elif kind == 1:
        mask = (xx - yy) % rng.integers(2, 5) == 0
    else:
        mask = ((yy + xx) % 2 == 0) | (rng.random((h, w)) < 0.3)
    return mask & (rng.random((h, w)) < rng.uniform(0.6, 1.0))


def _borders(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Pieces on every side and corner of the mask, whole rows and columns."""
    mask = rng.random((h, w)) < 0.2
    mask[0, :] |= rng.random(w) < 0.7
    mask[-1, :] |= rng.random(w) < 0.7
    mask[:, 0] |= rng.random(h) < 0.7
    mask[:, -1] |= rng.random(h) < 0.7
    if rng.random() < 0.5:
        mask[rng.integers(h), :] = True
    if rng.random() < 0.5:
        mask[:, rng.integers(w)] = True
    return mask


KINDS = {
    "speckled": _speckled,
    "blobs": _blobs,
    "holes": _holes,
    "diagonals": _diagonals,
    "borders": _borders,
    "empty": lambda rng, h, w: np.zeros((h, w), bool),
    "full": lambda rng, h, w: np.ones((h, w), bool),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_tracer_matches_the_reference_on_random_masks(kind):
    rng = np.random.default_rng(sum(map(ord, kind)))
    for case in range(60):
        # Thin masks (1 x N, N x 1) as well as square-ish ones.
        h, w = (int(v) for v in rng.integers(1, 33, 2))
        if case % 10 == 0:
            h = 1
        elif case % 10 == 1:
            w = 1
        mask = KINDS[kind](rng, h, w)
        offset = (int(rng.integers(-50, 50)), int(rng.integers(-50, 50)))
        expected = reference_mask_to_polygons(mask, offset)
        assert mask_to_polygons(mask, offset) == expected, (kind, case, mask.astype(int).tolist(), offset)


def test_tracer_matches_the_reference_on_a_large_speckled_mask():
    """Thousands of pieces: as many loops of every shape as the reference can trace in seconds."""
    rng = np.random.default_rng(7)
    mask = rng.random((120, 160)) < 0.45
    polygons = mask_to_polygons(mask, (3, 5))
    assert len(polygons) > 1000
    assert polygons == reference_mask_to_polygons(mask, (3, 5))


def test_tracer_accepts_other_dtypes_and_float_offsets():
    mask = np.zeros((6, 7), np.uint8)
    mask[1:4, 2:5] = 255
    mask[5, 6] = 1
    assert mask_to_polygons(mask, (0.5, 1.5)) == reference_mask_to_polygons(mask, (0.5, 1.5))
    assert mask_to_polygons(mask, (0.5, 1.5))[0] == [5.5, 2.5, 5.5, 5.5, 2.5, 5.5, 2.5, 2.5]
    with pytest.raises(ValueError, match="expected a"):
        mask_to_polygons(np.zeros((2, 2, 2), bool))


@pytest.mark.timeout(120)  # a quadratic tracer would hang here, not fail
def test_a_million_pixel_speckled_mask_is_traced():
    """The reference starts each loop with a scan of every untraced edge: on this mask (about
    65,000 pieces, a million edges) it would run for hours. The linear tracer takes about a
    second on a 2-core CPU."""
    mask = np.random.default_rng(3).random((1000, 1000)) < 0.5
    polygons = mask_to_polygons(mask)
    assert len(polygons) > 50_000


# ------------------------------------------------------------------------------------------------
# Rasterised back by pycocotools


def _rasterise(polygons, height, width) -> np.ndarray:
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, height, width))).astype(bool)


def _shapes() -> dict[str, np.ndarray]:
    h, w = 40, 50
    yy, xx = np.mgrid[:h, :w]
    shapes = {}
    rect = np.zeros((h, w), bool)
    rect[5:20, 8:30] = True
    shapes["rectangle"] = rect
    ell = rect.copy()
    ell[20:35, 8:15] = True
    shapes["L"] = ell
    shapes["disk"] = (yy - 20) ** 2 + (xx - 25) ** 2 < 12**2
    shapes["ellipse at the border"] = ((yy - 0) / 15.0) ** 2 + ((xx - 49) / 20.0) ** 2 < 1
    two = np.zeros((h, w), bool)
    two[2:8, 2:8] = True
    two[20:30, 30:45] = True
    shapes["two parts"] = two
    single = np.zeros((h, w), bool)
    single[7, 9] = True
    shapes["one pixel"] = single
    stairs = np.zeros((h, w), bool)
    for i in range(10):
        stairs[10 + i, 10 : 12 + i] = True
    shapes["staircase"] = stairs
    diagonal = np.zeros((h, w), bool)
    diagonal[10, 10] = diagonal[11, 11] = diagonal[12, 12] = True
    shapes["diagonal pixels"] = diagonal
    rng = np.random.default_rng(0)
    blobs = np.zeros((h, w), bool)
    for cy, cx, r in zip(rng.integers(5, 35, 6), rng.integers(5, 45, 6), rng.integers(3, 9, 6)):
        blobs |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    shapes["overlapping disks"] = blobs
    return shapes


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every background region not reachable from the border (8-connected
    background, the dual of the tracer's 4-connected foreground)."""
    outside = np.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = ~mask[0, :], ~mask[-1, :], ~mask[:, 0], ~mask[:, -1]
    while True:
        padded = np.pad(outside, 1)
        grown = np.zeros_like(outside)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grown |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
        grown &= ~mask
        if (grown == outside).all():
            return ~outside
        outside = grown


@pytest.mark.parametrize("name", list(_shapes()))
def test_polygons_rasterise_back_to_the_mask(name):
    mask = _shapes()[name]
    polygons = mask_to_polygons(mask)
    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    drawn = _rasterise(polygons, *mask.shape)
    iou = (drawn & mask).sum() / (drawn | mask).sum()
    assert iou >= 0.9, iou
    np.testing.assert_array_equal(drawn, _fill_holes(mask))  # exact, but for holes


def test_polygons_of_a_ring_lose_only_the_hole():
    yy, xx = np.mgrid[:40, :40]
    distance = (yy - 20) ** 2 + (xx - 20) ** 2
    ring = (distance < 15**2) & (distance >= 6**2)
    polygons = mask_to_polygons(ring)
    assert len(polygons) == 1  # the outer boundary; COCO polygons cannot cut holes
    np.testing.assert_array_equal(_rasterise(polygons, 40, 40), distance < 15**2)
    assert (ring.sum() / (distance < 15**2).sum()) >= 0.8


def test_polygons_of_an_empty_mask():
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []
