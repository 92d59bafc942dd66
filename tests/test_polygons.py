"""The linear-time polygon tracer gives exactly the answers of the tracer it replaced
(tests/polygon_reference.py), on many random masks of every kind that makes tracing hard.

What the polygons mean (they rasterise back to the mask, holes filled) is tested in
tests/test_service_units.py; here only equality with the reference and the running time."""

from __future__ import annotations

import time

import numpy as np
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
    "speckled": _speckled, "blobs": _blobs, "holes": _holes, "diagonals": _diagonals, "borders": _borders,
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


@pytest.mark.timeout(120)
def test_a_million_pixel_speckled_mask_traces_in_seconds():
    """The reference starts each loop with a scan of every untraced edge: on this mask (about
    65,000 pieces, a million edges) it would run for hours. The linear tracer takes about a
    second on a 2-core CPU; the bound leaves room for a loaded machine."""
    mask = np.random.default_rng(3).random((1000, 1000)) < 0.5
    start = time.perf_counter()
    polygons = mask_to_polygons(mask)
    elapsed = time.perf_counter() - start
    assert len(polygons) > 50_000
    assert elapsed < 60, elapsed
