"""Box2BoxTransform, clip_boxes and the anchor generator, against detectron2 v0.5's formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import batched_nms, nms

from transfiner.model.modeling.box_ops import (
    AnchorGenerator,
    Box2BoxTransform,
    best_first,
    box_area,
    clip_boxes,
    coordinate_trick_nms,
    nms_in_each_image,
)


def _boxes(generator: torch.Generator, n: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 200
    wh = torch.rand(n, 2, generator=generator) * 150 + 2
    return torch.cat((xy, xy + wh), dim=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_get_deltas_apply_deltas_round_trip(weights):
    g = torch.Generator().manual_seed(0)
    src, target = _boxes(g, 50), _boxes(g, 50)
    transform = Box2BoxTransform(weights)
    deltas = transform.get_deltas(src, target)
    torch.testing.assert_close(transform.apply_deltas(deltas, src), target, rtol=1e-5, atol=1e-3)
    # Identity: zero deltas, and the deltas of a box to itself.
    torch.testing.assert_close(transform.get_deltas(src, src), torch.zeros(50, 4))
    torch.testing.assert_close(transform.apply_deltas(torch.zeros(50, 4), src), src)


def test_get_deltas_formula_and_weights():
    src = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), 10 x 20 (no +1)
    target = torch.tensor([[10.0, 0.0, 30.0, 10.0]])  # centre (20, 5), 20 x 10
    expected = torch.tensor([[15 / 10, -5 / 20, math.log(2.0), math.log(0.5)]])
    torch.testing.assert_close(Box2BoxTransform((1, 1, 1, 1)).get_deltas(src, target), expected)
    weighted = Box2BoxTransform((10.0, 10.0, 5.0, 5.0)).get_deltas(src, target)
    torch.testing.assert_close(weighted, expected * torch.tensor([10.0, 10.0, 5.0, 5.0]))


def test_apply_deltas_scale_clamp():
    transform = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    # dw, dh far beyond log(1000/16): a 16 px box grows to at most 1000 px.
    out = transform.apply_deltas(torch.tensor([[0.0, 0.0, 50.0, 100.0]]), box)
    torch.testing.assert_close(out, torch.tensor([[8 - 500.0, 8 - 500.0, 8 + 500.0, 8 + 500.0]]))
    assert torch.isfinite(out).all()
    # Negative scales are not clamped.
    out = transform.apply_deltas(torch.tensor([[0.0, 0.0, -math.log(4.0), 0.0]]), box)
    torch.testing.assert_close(out, torch.tensor([[6.0, 0.0, 10.0, 16.0]]))
    # The clamp applies after dividing by the weights.
    custom = Box2BoxTransform((1.0, 1.0, 2.0, 2.0), scale_clamp=math.log(2.0))
    out = custom.apply_deltas(torch.tensor([[0.0, 0.0, 2 * math.log(1.5), 10.0]]), box)
    torch.testing.assert_close(out, torch.tensor([[-4.0, -8.0, 20.0, 24.0]]))


def test_apply_deltas_k_boxes_per_reference():
    g = torch.Generator().manual_seed(1)
    boxes = _boxes(g, 7)
    deltas = torch.randn(7, 12, generator=g)  # k = 3 (e.g. per class)
    transform = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    out = transform.apply_deltas(deltas, boxes)
    assert out.shape == (7, 12)
    for k in range(3):
        single = transform.apply_deltas(deltas[:, 4 * k : 4 * k + 4], boxes)
        torch.testing.assert_close(out[:, 4 * k : 4 * k + 4], single)
    # Hand-computed: class 1 of the first row.
    b = boxes[0]
    w, h = b[2] - b[0], b[3] - b[1]
    cx, cy = b[0] + w / 2, b[1] + h / 2
    dx, dy, dw, dh = deltas[0, 4:8] / torch.tensor([10.0, 10.0, 5.0, 5.0])
    pcx, pcy, pw, ph = cx + dx * w, cy + dy * h, w * torch.exp(dw), h * torch.exp(dh)
    expected = torch.stack((pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2))
    torch.testing.assert_close(out[0, 4:8], expected)


def test_apply_deltas_decodes_in_float32():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float16)
    out = Box2BoxTransform((1, 1, 1, 1)).apply_deltas(torch.zeros(1, 4, dtype=torch.float16), boxes)
    assert out.dtype == torch.float32


def test_clip_boxes():
    boxes = torch.tensor([[-5.0, -3.0, 50.0, 200.0], [10.0, 20.0, 30.0, 40.0], [120.0, 90.0, 130.0, 95.0]])
    out = clip_boxes(boxes, 80, 100)  # height 80, width 100
    expected = torch.tensor([[0.0, 0.0, 50.0, 80.0], [10.0, 20.0, 30.0, 40.0], [100.0, 80.0, 100.0, 80.0]])
    torch.testing.assert_close(out, expected)
    # Per-row image sizes [R, 1, 1] broadcast over boxes [R, K, 4] (as the box head uses it).
    heights = torch.tensor([80.0, 30.0, 1000.0]).view(3, 1, 1)
    widths = torch.tensor([100.0, 15.0, 1000.0]).view(3, 1, 1)
    per_row = clip_boxes(boxes[:, None, :], heights, widths)
    assert per_row.shape == (3, 1, 4)
    torch.testing.assert_close(
        per_row[:, 0], torch.tensor([[0.0, 0.0, 50.0, 80.0], [10.0, 20.0, 15.0, 30.0], [120.0, 90.0, 130.0, 95.0]])
    )


def test_box_area():
    torch.testing.assert_close(box_area(torch.tensor([[1.0, 2.0, 4.0, 7.0]])), torch.tensor([15.0]))


# ----------------------------------------------------------------------------- anchors

# detectron2: w = sqrt(size^2 / ratio), h = ratio * w, anchor = (-w/2, -h/2, w/2, h/2).
_S = math.sqrt(2.0)
CELL_32 = torch.tensor(
    [
        [-16 * _S, -8 * _S, 16 * _S, 8 * _S],  # ratio 0.5: 45.25 x 22.63
        [-16.0, -16.0, 16.0, 16.0],  # ratio 1
        [-8 * _S, -16 * _S, 8 * _S, 16 * _S],  # ratio 2: 22.63 x 45.25
    ]
)


def test_cell_anchors_size_32():
    generator = AnchorGenerator((32, 64), (0.5, 1.0, 2.0), (4, 8))
    torch.testing.assert_close(generator.cell_anchors_0, CELL_32)
    torch.testing.assert_close(generator.cell_anchors_1, CELL_32 * 2)
    assert generator.num_anchors == 3
    widths = CELL_32[:, 2] - CELL_32[:, 0]
    heights = CELL_32[:, 3] - CELL_32[:, 1]
    torch.testing.assert_close(widths * heights, torch.full((3,), 1024.0))
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0]))
    # Cell anchors are not stored in checkpoints.
    assert generator.state_dict() == {}


def test_anchor_order_is_y_x_anchor():
    generator = AnchorGenerator((32, 64), (0.5, 1.0, 2.0), (8, 16))
    features = [torch.zeros(2, 4, 3, 5), torch.zeros(2, 4, 2, 1)]
    anchors = generator(features)
    assert [a.shape for a in anchors] == [(3 * 5 * 3, 4), (2 * 1 * 3, 4)]
    for level, (stride, cell) in enumerate(((8, CELL_32), (16, CELL_32 * 2))):
        height, width = features[level].shape[-2:]
        for y in range(height):
            for x in range(width):
                for a in range(3):
                    shift = torch.tensor([x * stride, y * stride] * 2, dtype=torch.float32)
                    torch.testing.assert_close(anchors[level][(y * width + x) * 3 + a], cell[a] + shift)


def test_anchor_centres_at_stride_multiples_and_offset():
    features = [torch.zeros(1, 1, 4, 6)]
    anchors = AnchorGenerator((32,), (0.5, 1.0, 2.0), (16,))(features)[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    ys, xs = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    expected = torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=1).repeat_interleave(3, dim=0) * 16
    torch.testing.assert_close(centres, expected)
    half = AnchorGenerator((32,), (1.0,), (16,), offset=0.5)(features)[0]
    torch.testing.assert_close((half[:, :2] + half[:, 2:]) / 2, (expected[::3] + 8))


def _nms_batch(seed: int, counts: list[int], groups: int):
    """Images with ``counts`` candidates each, laid out per image [B, n] (n the largest count):
    boxes, scores, groups and the valid slots (each image's first ``count``; the others hold
    values that must not matter: NaN boxes, high scores)."""
    g = torch.Generator().manual_seed(seed)
    batch, n = len(counts), max(counts)
    boxes = _boxes(g, batch * n).view(batch, n, 4)
    boxes[..., 0::2] = boxes[..., 0::2].round()  # whole pixels, so some boxes tie in their IoU
    scores = torch.rand(batch, n, generator=g)
    group = torch.randint(groups, (batch, n), generator=g)
    valid = torch.arange(n)[None, :] < torch.tensor(counts)[:, None]
    boxes[~valid] = math.nan
    scores[~valid] = 2.0
    return boxes, scores, group, valid


def _alone(boxes, scores, group, valid, image, coordinate_trick=True):
    """What NMS keeps of image ``image`` alone: [n] bool."""
    rows = torch.nonzero(valid[image]).squeeze(1)
    grouped = coordinate_trick_nms if coordinate_trick else batched_nms
    keep = grouped(boxes[image, rows], scores[image, rows], group[image, rows], 0.5)
    return torch.zeros_like(valid[image]).index_fill(0, rows[keep], True)


@pytest.mark.parametrize("coordinate_trick", [True, False])
def test_nms_in_each_image_keeps_what_each_image_keeps_alone(coordinate_trick):
    """Each image keeps what NMS keeps of it alone (empty images included), whatever its
    batch-mates and whatever lies in the slots that are no candidates."""
    counts = [40, 0, 300, 1, 120]
    boxes, scores, group, valid = _nms_batch(0, counts, groups=5)
    kept = nms_in_each_image(boxes, scores, group, valid, 5, 0.5, coordinate_trick)
    for image in range(len(counts)):
        assert torch.equal(kept[image], _alone(boxes, scores, group, valid, image, coordinate_trick))
    assert 0 < kept.sum() < sum(counts)  # something was kept, something suppressed
    assert not kept[~valid].any()


def test_nms_in_each_image_traced_keeps_its_loop():
    """A traced graph runs the loop over the images scripted: the same result for other batch
    sizes than the one it was traced with."""
    boxes, scores, group, valid = _nms_batch(1, [60, 200, 0, 90], groups=80)

    def run(b, s, c, v):
        return nms_in_each_image(b, s, c, v, 80, 0.5)

    traced = torch.jit.trace(run, (boxes, scores, group, valid), check_trace=False)
    for counts in ([60, 200, 0, 90], [7], [30, 0, 150, 2, 80, 41]):
        args = _nms_batch(2, counts, groups=80)
        assert torch.equal(traced(*args), run(*args))
    empty = _nms_batch(1, [0, 0], groups=80)
    assert not traced(*empty).any() and traced(*empty).shape == (2, 0)


def _onnx_session(module: torch.nn.Module, example: tuple, names: list[str], path):
    import onnxruntime as ort

    torch.onnx.export(
        module,
        example,
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=names,
        dynamic_axes={name: {0: "batch", 1: "n"} for name in names},
    )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_nms_in_each_image_in_onnx_is_nonmaxsuppression_per_image_and_group(tmp_path):
    """ONNX: one NonMaxSuppression over the batch, each (image, group) on its own: what NMS keeps
    of each group of each image alone, for other batch sizes than the exported one."""
    import onnx

    class Module(torch.nn.Module):
        def forward(self, b, s, c, v):
            return nms_in_each_image(b, s, c, v, 5, 0.5)

    session = _onnx_session(Module(), _nms_batch(3, [30, 50], groups=5), ["b", "s", "c", "v"], tmp_path / "nms.onnx")
    operators = [node.op_type for node in onnx.load(str(tmp_path / "nms.onnx")).graph.node]
    assert operators.count("NonMaxSuppression") == 1 and "Loop" not in operators
    for counts in ([40, 0, 300, 1, 120], [9]):
        boxes, scores, group, valid = _nms_batch(4, counts, groups=5)
        (got,) = session.run(None, {"b": boxes.numpy(), "s": scores.numpy(), "c": group.numpy(), "v": valid.numpy()})
        for image in range(len(counts)):
            expected = torch.zeros_like(valid[image])
            for g in range(5):
                rows = torch.nonzero(valid[image] & (group[image] == g)).squeeze(1)
                expected[rows[nms(boxes[image, rows], scores[image, rows], 0.5)]] = True
            assert got[image].tolist() == expected.tolist()


def test_best_first_keeps_equal_values_in_their_order():
    """Largest first, equal values in their order (as NMS lists the boxes it keeps), and nothing
    past each row's k-th."""
    values = torch.tensor([[0.5, 0.9, 0.5, -math.inf, 0.9, 0.1], [0.2, 0.2, 0.2, 0.2, 0.2, 0.2]])
    best, index = best_first(values, 4)
    assert index[0, :4].tolist() == [1, 4, 0, 2] and index[1, :4].tolist() == [0, 1, 2, 3]
    assert torch.equal(best[:, :4], values.gather(1, index[:, :4]))
    assert (best[:, 4:] == -math.inf).all()
