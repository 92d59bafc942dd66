import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F

from model.postprocess import encode_rle, paste_masks


def reference_paste(probs, boxes, image_size, threshold=0.5):
    """detectron2 v0.5 CPU semantics, written the slow way: sample the whole image
    per detection, then keep only the integer window around the box."""
    h, w = image_size
    out = torch.zeros(len(probs), h, w, dtype=torch.bool)
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    for i, (box, prob) in enumerate(zip(boxes.float(), probs.float())):
        x0, y0, x1, y1 = box
        gx = (xs - x0) / (x1 - x0) * 2 - 1
        gy = (ys - y0) / (y1 - y0) * 2 - 1
        grid = torch.stack([gx[None, :].expand(h, w), gy[:, None].expand(h, w)], dim=-1)
        full = F.grid_sample(prob[None, None], grid[None], mode="bilinear", align_corners=False)[0, 0]
        window = torch.zeros(h, w, dtype=torch.bool)
        xa, xb = max(math.floor(x0) - 1, 0), min(math.ceil(x1) + 1, w)
        ya, yb = max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, h)
        window[max(ya, 0) : max(yb, 0), max(xa, 0) : max(xb, 0)] = True
        out[i] = (full >= threshold) & window
    return out


def random_boxes(gen, n, h, w):
    """Mix of ordinary, partly/fully outside, sub-pixel and fractional boxes."""
    cx = torch.rand(n, generator=gen) * (w + 40) - 20
    cy = torch.rand(n, generator=gen) * (h + 40) - 20
    bw = torch.rand(n, generator=gen) * w * 0.8
    bh = torch.rand(n, generator=gen) * h * 0.8
    tiny = torch.rand(n, generator=gen) < 0.2
    bw[tiny] *= 0.01  # < 1 px
    bh[tiny] *= 0.01
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)


@pytest.mark.parametrize("mask_size", [28, 112])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_matches_reference(mask_size, threshold):
    gen = torch.Generator().manual_seed(mask_size)
    h, w = 61, 90
    n = 40
    # Smooth-ish probabilities so thresholding produces real shapes.
    probs = torch.rand(n, 1, 7, 7, generator=gen)
    probs = F.interpolate(probs, size=(mask_size, mask_size), mode="bilinear")[:, 0]
    boxes = random_boxes(gen, n, h, w)
    got = paste_masks(probs, boxes, (h, w), threshold)
    assert got.dtype == torch.bool and got.shape == (n, h, w)
    assert torch.equal(got, reference_paste(probs, boxes, (h, w), threshold))
    assert got.any()


def test_large_box_window_and_dtypes():
    # A box much wider than 3 * S: full-image bilinear sampling would leak into
    # the pixels just outside the window; the window must cut them off.
    probs = torch.ones(2, 28, 28)
    boxes = torch.tensor([[10.3, 5.7, 150.2, 40.1], [-30.0, -10.0, 130.5, 70.0]])
    ref = reference_paste(probs, boxes, (50, 160), 0.01)
    assert torch.equal(paste_masks(probs, boxes, (50, 160), 0.01), ref)
    assert torch.equal(paste_masks(probs.half(), boxes.double(), (50, 160), 0.01), ref)


def test_constant_mask_covers_box():
    h, w = 20, 30
    boxes = torch.tensor([[3.0, 4.0, 13.0, 9.0], [0.0, 0.0, 30.0, 20.0]])
    got = paste_masks(torch.ones(2, 28, 28), boxes, (h, w))
    for mask, (x0, y0, x1, y1) in zip(got, boxes.int().tolist()):
        expected = torch.zeros(h, w, dtype=torch.bool)
        expected[y0:y1, x0:x1] = True
        assert torch.equal(mask, expected)


def test_threshold_moves_result():
    # Probabilities rise left to right; a higher threshold keeps fewer columns.
    probs = torch.linspace(0, 1, 28).expand(28, 28)[None]
    box = torch.tensor([[0.0, 0.0, 28.0, 28.0]])
    areas = [int(paste_masks(probs, box, (28, 28), t).sum()) for t in (0.0, 0.25, 0.5, 0.75, 1.01)]
    assert areas == sorted(areas, reverse=True) and len(set(areas)) == len(areas)
    assert areas[-1] == 0
    low = paste_masks(probs, box, (28, 28), 0.25)
    high = paste_masks(probs, box, (28, 28), 0.75)
    assert not (high & ~low).any()
    # threshold 0 still excludes pixels outside the window
    assert areas[0] == 28 * 28


def test_empty_and_degenerate():
    out = paste_masks(torch.zeros(0, 112, 112), torch.zeros(0, 4), (7, 9))
    assert out.shape == (0, 7, 9) and out.dtype == torch.bool
    boxes = torch.tensor(
        [
            [5.0, 5.0, 5.0, 10.0],  # zero width
            [5.0, 5.0, 10.0, 5.0],  # zero height
            [8.0, 8.0, 2.0, 9.0],  # inverted
            [100.0, 100.0, 120.0, 130.0],  # outside the image
            [-50.0, -50.0, -10.0, -5.0],  # outside the image
            [float("nan"), 1.0, 4.0, 4.0],
        ]
    )
    out = paste_masks(torch.ones(len(boxes), 28, 28), boxes, (20, 20), threshold=0.0)
    assert out.shape == (len(boxes), 20, 20) and not out.any()


def test_encode_rle_roundtrip():
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 17, 23, generator=gen) > 0.6
    masks[0] = False
    masks[1] = True
    for inp in (masks, masks.numpy(), masks.numpy().astype(np.uint8)):
        rles = encode_rle(inp)
        assert len(rles) == 5
        json.dumps(rles)
        for rle, mask in zip(rles, masks.numpy()):
            assert isinstance(rle["counts"], str)
            assert rle["size"] == [17, 23]
            decoded = mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()})
            np.testing.assert_array_equal(decoded, mask.astype(np.uint8))
    assert encode_rle(torch.zeros(0, 4, 4, dtype=torch.bool)) == []


def test_paste_then_encode():
    gen = torch.Generator().manual_seed(1)
    probs = torch.rand(3, 28, 28, generator=gen)
    boxes = random_boxes(gen, 3, 32, 48)
    masks = paste_masks(probs, boxes, (32, 48))
    decoded = mask_util.decode([{"size": r["size"], "counts": r["counts"]} for r in encode_rle(masks)])
    np.testing.assert_array_equal(decoded.transpose(2, 0, 1), masks.numpy().astype(np.uint8))
