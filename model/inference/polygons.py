"""Binary masks -> COCO polygons, by tracing the pixel edges between foreground and background.

- pycocotools can rasterise polygons (``frPyObjects``) but not trace them, and the project has no
  OpenCV; this is a small crack-following tracer. Each polygon runs along pixel *corners*, so a mask
  is reproduced pixel for pixel when pycocotools rasterises it again, except where COCO polygons
  cannot express the shape:

  * holes: COCO merges an object's polygons by union, so an inner boundary would fill the hole
    instead of cutting it; only outer boundaries are returned, holes are lost;
  * diagonal-only contact: two pixels touching at a corner are traced as separate polygons
    (4-connectivity), which keeps every polygon simple (no self-touching vertex).

- The work is linear in the number of pixels: finding the boundary edges and the edge that follows
  each one is array arithmetic, and one pass over the edges links them into loops. (The tracer it
  replaced, kept in scripts/reference/polygons.py, scanned every untraced edge to start each loop,
  quadratic in the number of pieces; tests/model/inference/test_polygons.py checks the answers are identical.)
"""

from __future__ import annotations

import numpy as np

__all__ = ["mask_to_polygons"]

# Directions of travel along pixel edges, in image coordinates (x right, y down), clockwise:
# right, down, left, up. Turning right is direction + 1 (mod 4).
_STEP_X = np.array([1, 0, -1, 0])
_STEP_Y = np.array([0, 1, 0, -1])


def _boundary_edges(mask: np.ndarray) -> np.ndarray:
    """[W + 1, H + 1, 4] bool: whether a boundary edge leaves corner (x, y) in each direction.

    Every foreground pixel contributes the sides it shares with background, walked clockwise
    around the pixel, so outer boundaries run clockwise and holes anticlockwise. Corner (x, y)
    is the top-left corner of pixel (x, y), which is ``mask[y, x]``."""
    p = np.pad(mask, 1)  # p[y + 1, x + 1] is pixel (x, y); outside the mask is background
    pixel = p[1:, 1:]  # [H + 1, W + 1]: the pixel whose top-left corner is (x, y)
    left = p[1:, :-1]  # the pixel left of it, (x - 1, y)
    up = p[:-1, 1:]  # the pixel above it, (x, y - 1)
    up_left = p[:-1, :-1]  # the pixel diagonally up-left, (x - 1, y - 1)
    edges = np.stack(
        [
            pixel & ~up,  # right: the top side of pixel (x, y)
            left & ~pixel,  # down: the right side of pixel (x - 1, y)
            up_left & ~left,  # left: the bottom side of pixel (x - 1, y - 1)
            up & ~up_left,  # up: the left side of pixel (x, y - 1)
        ],
        axis=-1,
    )  # [H + 1, W + 1, 4]
    # Indexed [x, y, direction] so that the edges, numbered in memory order, are sorted by
    # (corner x, corner y, direction): the order in which loops are started (see _trace_loops).
    return np.ascontiguousarray(edges.transpose(1, 0, 2))


def _link_edges(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Numbers the boundary edges and finds the edge that follows each one along its loop.

    Returns, per edge (in (x, y, direction) order): the number of the next edge, whether the
    boundary turns where the edge ends, and that end corner's x and y."""
    x, y, direction = np.nonzero(edges)
    # A lookup table over every (corner, direction): int32 keeps it at 4 bytes an entry.
    number = np.full(edges.shape, -1, dtype=np.int32 if x.size < 2**31 else np.int64)
    number[x, y, direction] = np.arange(x.size)
    end_x, end_y = x + _STEP_X[direction], y + _STEP_Y[direction]
    # At the end corner prefer a right turn, then straight on, then a left turn: where two
    # pixels touch diagonally two edges leave the corner, and the right turn keeps the pixel on
    # our right in its own loop (4-connectivity). Elsewhere exactly one edge leaves the corner.
    right, left = (direction + 1) % 4, (direction + 3) % 4
    nxt = np.where(edges[end_x, end_y, right], right, np.where(edges[end_x, end_y, direction], direction, left))
    return number[end_x, end_y, nxt], nxt != direction, end_x, end_y


def _trace_loops(following: list[int]) -> tuple[list[int], list[int]]:
    """Walks every loop once: the edges in walking order, and where each loop starts in it.

    Each loop starts at its smallest edge number, and loops come in the order of those
    numbers, so the output does not depend on how the edges were stored."""
    order: list[int] = []
    starts: list[int] = []
    visited = bytearray(len(following))
    for first in range(len(following)):
        if visited[first]:
            continue
        starts.append(len(order))
        edge = first
        while not visited[edge]:
            visited[edge] = 1
            order.append(edge)
            edge = following[edge]
    return order, starts


def mask_to_polygons(mask: np.ndarray, offset: tuple[int, int] = (0, 0)) -> list[list[float]]:
    """A [H, W] binary mask -> COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` (outer boundaries).

    - Coordinates are pixel corners (pixel (x, y) spans x..x+1, y..y+1), as pycocotools'
      ``frPyObjects`` expects for an exact round trip. Largest polygon first; polygons of equal area
      in the order of their boundaries' smallest (x, y) corner.
    - ``offset`` (x, y) places ``mask`` in a larger image whose other pixels are background: a
      detection's window (``model.inference.paste.paste_windows``) gives the polygons of its
      full-image mask, identical, since tracing and ordering do not change under translation.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a [H, W] mask, got shape {mask.shape}")
    if not mask.any():
        return []
    following, turns, end_x, end_y = _link_edges(_boundary_edges(mask))
    order, starts = _trace_loops(following.tolist())
    order_array = np.asarray(order, dtype=np.int64)

    # A polygon's vertices are the corners where its loop turns; straight runs add nothing.
    turning = turns[order_array]
    corner = order_array[turning]  # the edges after which the boundary turns, in walking order
    loop = np.repeat(np.arange(len(starts)), np.diff(starts + [len(order)]))[turning]  # their loops
    xs, ys = end_x[corner], end_y[corner]
    first = np.flatnonzero(np.r_[True, loop[1:] != loop[:-1]])  # each polygon's first vertex
    last = np.r_[first[1:], loop.size] - 1

    # Twice the signed area (shoelace), in integers: positive is clockwise in image
    # coordinates, an outer boundary; holes are anticlockwise.
    following_vertex = np.arange(1, loop.size + 1)
    following_vertex[last] = first
    twice_area = np.add.reduceat(xs * ys[following_vertex] - xs[following_vertex] * ys, first)

    coordinates = np.stack([xs + offset[0], ys + offset[1]], axis=1).astype(np.float64).ravel().tolist()
    outer = np.flatnonzero(twice_area > 0)
    outer = outer[np.argsort(-twice_area[outer], kind="stable")]  # largest first, ties in loop order
    begin, end = (2 * first[outer]).tolist(), (2 * last[outer] + 2).tolist()
    return [coordinates[b:e] for b, e in zip(begin, end)]
