import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
import torch.nn.functional as F

import transfiner.model.inference.paste as paste
from transfiner.model.inference.detections import coco_records, image_detections, rescale_boxes, select_detections
from transfiner.model.inference.fetch import DetectionRequest, fetch_detections
from transfiner.model.inference.paste import paste_masks, paste_windows
from transfiner.model.inference.polygons import mask_to_polygons
from transfiner.model.inference.predictor import Prediction
from transfiner.model.inference.rle import changes_on_host, encode_rle, masks_to_rle, rles_from_changes, window_changes
from transfiner.model.inference.segments import fetch_segments, finish_segments
from transfiner.model.modeling.rcnn import RawOutputs


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


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def random_case(rng, device):
    """One random masks_to_rle case: image size (1xN and Nx1 included), S, threshold, and boxes
    inside, across and touching the border, entirely outside, full height, empty, NaN, sub-pixel."""
    h, w = (int(v) for v in rng.integers(1, 70, size=2))
    if rng.random() < 0.15:
        h = 1
    elif rng.random() < 0.15:
        w = 1
    n = int(rng.integers(0, 12))
    size = int(rng.choice([28, 112]))
    kind = rng.random()
    if kind < 0.15:
        probs = torch.ones(n, size, size)
    else:
        coarse = torch.from_numpy(rng.random((n, 1, 7, 7), dtype=np.float32))
        probs = F.interpolate(coarse, size=(size, size), mode="bilinear")[:, 0] if n else torch.zeros(0, size, size)
    threshold = float(rng.choice([0.5, rng.random(), 0.0, 1.01]))
    cx, cy = rng.uniform(-0.3, 1.3, n) * w, rng.uniform(-0.3, 1.3, n) * h
    bw, bh = rng.uniform(0, 1.2, n) * w, rng.uniform(0, 1.2, n) * h
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)  # [n, 4]
    for i in range(n):
        special = rng.random()
        if special < 0.1:
            boxes[i, 1], boxes[i, 3] = -rng.random() * 3, h + rng.random() * 3  # full height
        elif special < 0.15:
            boxes[i, 2] = boxes[i, 0]  # zero width
        elif special < 0.2:
            boxes[i, 3] = boxes[i, 1] - rng.random()  # negative height
        elif special < 0.25:
            boxes[i, int(rng.integers(0, 4))] = np.nan
        elif special < 0.35:
            boxes[i, 2:] = boxes[i, :2] + rng.random(2) * 0.05  # sub-pixel
        elif special < 0.4:
            boxes[i] += [w + 5, 0, w + 5, 0]  # right of the image
    boxes = torch.from_numpy(boxes.astype(np.float32))
    return probs.to(device), boxes.to(device), (h, w), threshold


@pytest.mark.parametrize("device", DEVICES)
def test_masks_to_rle_equals_encoded_paste(device):
    rng = np.random.default_rng(0)
    for _ in range(300):
        probs, boxes, (h, w), threshold = random_case(rng, device)
        pasted = paste_masks(probs, boxes, (h, w), threshold).cpu().numpy()  # [n, h, w]
        want = mask_util.encode(np.asfortranarray(pasted.transpose(1, 2, 0).astype(np.uint8)))
        got = masks_to_rle(probs, boxes, (h, w), threshold)
        assert len(got) == len(pasted)
        for rle, ref, mask in zip(got, want, pasted):
            assert rle["size"] == [h, w] == list(ref["size"])
            assert rle["counts"] == ref["counts"].decode("ascii")
            np.testing.assert_array_equal(mask_util.decode(rle), mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("waste, threads", [(1.0, 2), (1e9, 2), (1.0, 7)])
def test_masks_to_rle_does_not_depend_on_grouping(device, waste, threads, monkeypatch):
    # Many windows of very different shapes, full-image boxes included, sampled one group per
    # box (waste 1) or all padded together, and on the CPU cut into strips of rows for the
    # threads: each detection's pixels are those of its own paste.
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(paste, "_GROUP_WASTE", {"cpu": waste})
    monkeypatch.setattr(paste, "_GROUP_WASTE_ACCELERATOR", waste)
    monkeypatch.setattr(paste, "_GROUP_PIXELS", 1 << 40)
    gen = torch.Generator().manual_seed(3)
    h, w = 90, 140
    boxes = random_boxes(gen, 60, h, w)
    boxes[:5] = torch.tensor([-1.0, -1.0, w + 1.0, h + 1.0])
    probs = F.interpolate(torch.rand(60, 1, 7, 7, generator=gen), size=(112, 112), mode="bilinear")[:, 0]
    probs, boxes = probs.to(device), boxes.to(device)
    alone = [encode_rle(paste_masks(probs[i : i + 1], boxes[i : i + 1], (h, w), 0.4))[0] for i in range(60)]
    assert masks_to_rle(probs, boxes, (h, w), 0.4) == alone
    assert encode_rle(paste_masks(probs, boxes, (h, w), 0.4)) == alone


def test_masks_to_rle_empty_and_mismatch():
    assert masks_to_rle(torch.zeros(0, 28, 28), torch.zeros(0, 4), (5, 6)) == []
    with pytest.raises(ValueError):
        masks_to_rle(torch.zeros(2, 28, 28), torch.zeros(3, 4), (5, 6))


def test_paste_windows_hold_the_pasted_mask():
    gen = torch.Generator().manual_seed(4)
    boxes = random_boxes(gen, 20, 40, 50)
    probs = torch.rand(20, 28, 28, generator=gen)
    full = paste_masks(probs, boxes, (40, 50))
    for mask, (window, (x, y)) in zip(full, paste_windows(probs, boxes, (40, 50))):
        h, w = window.shape
        assert torch.equal(mask[y : y + h, x : x + w], window)
        assert int(mask.sum()) == int(window.sum())  # nothing outside the window


def test_window_polygons_equal_full_image_polygons():
    rng = np.random.default_rng(5)
    for _ in range(40):
        probs, boxes, (h, w), threshold = random_case(rng, "cpu")
        full = paste_masks(probs, boxes, (h, w), threshold).numpy()
        for mask, (window, origin) in zip(full, paste_windows(probs, boxes, (h, w), threshold)):
            assert mask_to_polygons(window.numpy(), origin) == mask_to_polygons(mask)


def test_prediction_masks_are_lazy():
    gen = torch.Generator().manual_seed(6)
    h, w = 30, 45
    boxes = random_boxes(gen, 8, h, w).numpy()
    probs = torch.rand(8, 28, 28, generator=gen).numpy()
    prediction = Prediction((h, w), boxes, np.ones(8, np.float32), np.zeros(8, np.int64), probs, 0.3)
    expected = paste_masks(torch.from_numpy(probs), torch.from_numpy(boxes), (h, w), 0.3).numpy()
    assert prediction.rles == encode_rle(expected)
    windows = prediction.mask_windows()
    assert prediction._masks is None  # RLE and windows never build full-image masks
    for mask, (window, (x, y)) in zip(expected, windows):
        np.testing.assert_array_equal(mask[y : y + window.shape[0], x : x + window.shape[1]], window)
    np.testing.assert_array_equal(prediction.masks, expected)


def test_coco_records_round_and_carry_only_what_is_given():
    boxes = np.array([[1.234, 2.0, 11.2391, 7.5]], np.float32)  # [1, 4] xyxy
    plain = coco_records(9, boxes, np.array([0.1234567], np.float32), np.array([1]), (3, 7))
    assert plain == [
        {
            "image_id": 9,
            "bbox": [1.23, 2.0, 10.01, 5.5],
            "score": 0.12346,
            "category_id": 7,
        }
    ]
    full = coco_records(9, boxes, np.array([0.5]), np.array([0]), (3, 7), [{"counts": "x"}], [4.0], ("a", "b"))
    assert list(full[0]) == ["image_id", "bbox", "score", "category_id", "category_name", "area", "segmentation"]
    assert full[0]["category_name"] == "a" and full[0]["area"] == 4.0 and full[0]["segmentation"] == {"counts": "x"}


def random_outputs(gen, images, per_image, dtype=torch.float32, device="cpu"):
    """A batch's ``RawOutputs`` as the model leaves them: grouped by image, best score first."""
    boxes = torch.cat([random_boxes(gen, n, 60, 90) for n in per_image])
    boxes[::7] = boxes[::7][:, [2, 1, 0, 3]]  # some empty: dropped, as detectron2 does
    scores = torch.cat([torch.rand(n, generator=gen).sort(descending=True).values for n in per_image])
    classes = torch.randint(0, 3, (len(scores),), generator=gen)
    index = torch.cat([torch.full((n,), i) for i, n in enumerate(per_image)])
    probs = F.interpolate(torch.rand(len(scores), 1, 7, 7, generator=gen), size=(28, 28), mode="bilinear")[:, 0]
    coarse = probs.flip(2)  # other masks, for refine=False
    return RawOutputs(
        boxes.to(device, dtype),
        scores.to(device, dtype),
        classes.to(device),
        index.to(device),
        probs.to(device, dtype),
        coarse.to(device, dtype),
    )


def one_at_a_time(raw, request):
    """What ``fetch_detections`` must equal: the one-image functions, on the outputs' device."""
    selected = select_detections(
        raw,
        request.index,
        request.score_threshold,
        request.classes,
        request.max_detections,
        request.refine,
    )
    detections = image_detections(selected, 0, torch.tensor(request.input_size), request.original)
    segments = fetch_segments(detections, request.original, request.mask_format, request.mask_threshold)
    return detections, segments


REQUESTS = [
    DetectionRequest(0, (60, 90), (120, 180)),
    DetectionRequest(1, (60, 90), (45, 67), score_threshold=0.4, max_detections=3, mask_threshold=0.3),
    DetectionRequest(2, (60, 90), (60, 90), classes=frozenset({0, 2}), refine=False),
    DetectionRequest(3, (60, 90), (61, 89), mask_format="polygon"),
    DetectionRequest(4, (60, 90), (30, 45), mask_format="none"),
    DetectionRequest(5, (60, 90), (90, 135), mask_format="polygon", refine=False, max_detections=4),
    DetectionRequest(6, (60, 90), (60, 90)),  # no detections
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fetch_detections_equals_one_image_at_a_time(device, dtype):
    gen = torch.Generator().manual_seed(8)
    raw = random_outputs(gen, 7, [12, 9, 15, 8, 10, 11, 0], dtype, device)
    fetched = fetch_detections(raw, REQUESTS)
    assert len(fetched) == len(REQUESTS)
    for request, got in zip(REQUESTS, fetched):
        want, segments = one_at_a_time(raw, request)
        np.testing.assert_array_equal(got.boxes, want.boxes.cpu().numpy())
        np.testing.assert_array_equal(got.scores, want.scores.cpu().numpy())
        np.testing.assert_array_equal(got.classes, want.classes.cpu().numpy())
        assert got.boxes.dtype == np.float32 and got.scores.dtype == np.float32
        assert finish_segments(got.segments) == finish_segments(segments)
        assert got.segments.mask_format == request.mask_format
    # Not a test of two copies of the same code: the filters really narrowed the picks.
    assert 0 < len(fetched[1].scores) <= 3 and (fetched[1].scores > 0.4).all()
    assert set(fetched[2].classes) <= {0, 2} and len(fetched[6].scores) == 0
    rles = fetched[0].segments.rles
    assert len(rles) == len(fetched[0].scores) > 5 and all(r["size"] == [120, 180] for r in rles)
    assert fetched[4].segments.rles is None and fetched[4].segments.boxes.shape == (len(fetched[4].scores), 4)


def test_fetch_detections_masks_are_those_of_the_full_image_paste():
    gen = torch.Generator().manual_seed(9)
    raw = random_outputs(gen, 2, [10, 7])
    requests = [
        DetectionRequest(0, (60, 90), (120, 180)),
        DetectionRequest(1, (60, 90), (50, 80), mask_format="polygon"),
    ]
    first, second = fetch_detections(raw, requests)
    rows = raw.batch_index == 0
    boxes, nonempty = rescale_boxes(raw.boxes[rows], torch.tensor((60, 90)), (120, 180))
    pasted = paste_masks(raw.mask_probs[rows][nonempty], boxes[nonempty], (120, 180))
    assert first.segments.rles == encode_rle(pasted)
    rows = raw.batch_index == 1
    boxes, nonempty = rescale_boxes(raw.boxes[rows], torch.tensor((60, 90)), (50, 80))
    pasted = paste_masks(raw.mask_probs[rows][nonempty], boxes[nonempty], (50, 80)).numpy()
    assert len(second.segments.windows) == len(pasted) > 3
    for mask, (window, (x, y)) in zip(pasted, second.segments.windows):
        np.testing.assert_array_equal(mask[y : y + window.shape[0], x : x + window.shape[1]], window)
        assert mask.sum() == window.sum()


def test_changes_of_several_images_come_back_in_one_copy_as_each_alone():
    gen = torch.Generator().manual_seed(10)
    cases = []
    for n, (h, w) in [(6, (40, 50)), (0, (10, 10)), (9, (70, 30))]:
        boxes, probs = random_boxes(gen, n, h, w), torch.rand(n, 28, 28, generator=gen)
        cases.append((probs, boxes, (h, w), window_changes(probs, boxes, (h, w), 0.5)))
    together = changes_on_host([changes for *_, changes in cases])
    for (probs, boxes, size, changes), found in zip(cases, together):
        assert np.array_equal(found, changes_on_host([changes])[0])
        assert rles_from_changes(changes, found) == encode_rle(paste_masks(probs, boxes, size, 0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fetch_detections_waits_for_the_gpu_a_fixed_number_of_times():
    import warnings

    gen = torch.Generator().manual_seed(11)
    raw = random_outputs(gen, 7, [12, 9, 15, 8, 10, 11, 3], torch.float32, "cuda")
    fetch_detections(raw, REQUESTS)  # warm-up: the allocators' first calls may synchronize

    def waits(requests) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fetch_detections(raw, requests)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    rle = [r for r in REQUESTS if r.mask_format == "rle"]
    assert waits(rle[:1]) == waits(rle) <= 3  # the boxes, then the run changes (count, values)
    assert waits(REQUESTS) <= 4  # and one copy of every polygon window
