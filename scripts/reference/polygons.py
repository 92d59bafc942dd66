"""The polygon tracer as it was before it was made linear-time (kept as the reference for
the tests and ``scripts.bench_polygons``): the same crack-following tracer, but each loop starts at
``min(remaining)``, a scan of every untraced edge, so a mask of k pieces costs O(k * edges).
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_mask_to_polygons"]

# Directions of travel along pixel edges, in image coordinates (x right, y down), clockwise.
_STEP = ((1, 0), (0, 1), (-1, 0), (0, -1))  # right, down, left, up


def _boundary_edges(mask: np.ndarray) -> dict[tuple[int, int], list[int]]:
    """Start corner -> directions of the boundary edges leaving it.

    Every foreground pixel contributes the sides it shares with background, walked clockwise
    around the pixel, so outer boundaries run clockwise and holes anticlockwise."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    sides = {
        0: inner & ~padded[:-2, 1:-1],  # top side, walked right, starts at the top-left corner
        1: inner & ~padded[1:-1, 2:],  # right side, walked down, starts at the top-right corner
        2: inner & ~padded[2:, 1:-1],  # bottom side, walked left, starts at the bottom-right corner
        3: inner & ~padded[1:-1, :-2],  # left side, walked up, starts at the bottom-left corner
    }
    start_offset = {0: (0, 0), 1: (1, 0), 2: (1, 1), 3: (0, 1)}  # (dx, dy) from the pixel's corner
    edges: dict[tuple[int, int], list[int]] = {}
    for direction, present in sides.items():
        rows, cols = np.nonzero(present)
        dx, dy = start_offset[direction]
        for x, y in zip((cols + dx).tolist(), (rows + dy).tolist()):
            edges.setdefault((x, y), []).append(direction)
    return edges


def _trace_loops(edges: dict[tuple[int, int], list[int]]) -> list[list[tuple[int, int]]]:
    """Links the edges into closed loops of corner points (collinear points dropped)."""
    loops = []
    remaining = {(vertex, d) for vertex, dirs in edges.items() for d in dirs}
    while remaining:
        start = min(remaining)  # deterministic output order
        vertex, direction = start
        points: list[tuple[int, int]] = []
        while True:
            remaining.discard((vertex, direction))
            dx, dy = _STEP[direction]
            nxt = (vertex[0] + dx, vertex[1] + dy)
            # Prefer a right turn: at a corner where two pixels touch diagonally this keeps
            # the pixel on our right in its own loop (4-connectivity); elsewhere only one
            # edge leaves a corner and the order does not matter.
            outgoing = edges[nxt]
            for turn in (1, 0, 3):
                new = (direction + turn) % 4
                if new in outgoing:
                    break
            if new != direction:
                points.append(nxt)  # a corner of the polygon; straight runs add nothing
            vertex, direction = nxt, new
            if (vertex, direction) == start:
                break
        loops.append(points)
    return loops


def _signed_area(points: list[tuple[int, int]]) -> float:
    xs = np.array([p[0] for p in points], dtype=np.float64)
    ys = np.array([p[1] for p in points], dtype=np.float64)
    return 0.5 * float(np.dot(xs, np.roll(ys, -1)) - np.dot(np.roll(xs, -1), ys))


def reference_mask_to_polygons(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[list[float]]:
    """A [H, W] binary mask -> COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` (outer boundaries).

    Coordinates are pixel corners (pixel (x, y) spans x..x+1, y..y+1), as pycocotools'
    ``frPyObjects`` expects for an exact round trip. Largest polygon first.

    ``offset`` (x, y) places ``mask`` in a larger image whose other pixels are background: a
    detection's window (``model.inference.paste.paste_windows``) gives the polygons of its
    full-image mask, identical, since tracing and ordering do not change under translation.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a [H, W] mask, got shape {mask.shape}")
    if not mask.any():
        return []
    polygons = []
    for points in _trace_loops(_boundary_edges(mask)):
        area = _signed_area(points)
        if area > 0:  # clockwise in image coordinates: an outer boundary, not a hole
            polygons.append((area, [float(v + o) for point in points for v, o in zip(point, offset)]))
    polygons.sort(key=lambda item: -item[0])
    return [polygon for _, polygon in polygons]
