"""Box inference with the per-image pre-NMS bound, against the previous implementation.

Random batches: images with different proposal counts, interleaved as the RPN emits them,
boxes clustered so NMS suppresses a lot, scores spread over the classes.
"""

from __future__ import annotations

import pytest
import torch

from scripts.reference.box_inference import reference_inference
from transfiner.model.config import ROIHeadsConfig
from transfiner.model.modeling.roi_heads import BoxROIHeads

NUM_CLASSES = 6


def _heads(**overrides) -> BoxROIHeads:
    return BoxROIHeads(ROIHeadsConfig(num_classes=NUM_CLASSES, fc_dim=16, **overrides), in_channels=2).eval()


def _batch(seed: int, counts=(40, 0, 75, 23)):
    """Random logits, deltas and proposals for images with ``counts`` proposals each."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.cat([torch.full((n,), i) for i, n in enumerate(counts)])
    batch = batch[torch.randperm(batch.shape[0], generator=g)]  # interleaved, as the RPN's output
    p = batch.shape[0]
    centres = torch.rand(p, 2, generator=g) * 60 + 20  # few clusters: many overlaps
    sizes = torch.rand(p, 2, generator=g) * 40 + 10
    proposals = torch.cat((centres - sizes / 2, centres + sizes / 2), dim=1)
    logits = torch.randn(p, NUM_CLASSES + 1, generator=g) * 2.0
    deltas = torch.randn(p, 4 * NUM_CLASSES, generator=g) * 0.5
    image_sizes = torch.tensor([[100, 90], [50, 50], [80, 100], [100, 100]])[: len(counts)]
    return logits, deltas, proposals, batch, image_sizes


def _candidates_per_image(logits, batch, num_images, thresh):
    valid = torch.softmax(logits, dim=-1)[:, :-1] > thresh
    return torch.zeros(num_images, dtype=torch.int64).index_add(0, batch, valid.sum(1))


def _assert_same(det, expected):
    boxes, scores, classes, batch_index, rank = expected
    assert det.batch_index.tolist() == batch_index.tolist()
    assert det.classes.tolist() == classes.tolist()
    assert det.rank.tolist() == rank.tolist()
    assert torch.equal(det.scores, scores)
    assert torch.equal(det.boxes, boxes)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("thresh", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("top_k", [100, 3, -1])
def test_identical_to_previous_within_the_bound(seed, thresh, top_k):
    logits, deltas, proposals, batch, sizes = _batch(seed)
    most = int(_candidates_per_image(logits, batch, sizes.shape[0], thresh).max())
    expected = reference_inference(_heads(), logits, deltas, proposals, batch, sizes, thresh, top_k)
    assert expected[0].shape[0] > 0
    # The default bound, and one just large enough for the image with the most candidates.
    for bound in (ROIHeadsConfig().pre_nms_topk_test, most):
        det = _heads(pre_nms_topk_test=bound).inference(logits, deltas, proposals, batch, sizes, thresh, top_k)
        _assert_same(det, expected)


@pytest.mark.parametrize("seed", [0, 3])
def test_above_the_bound_the_lowest_candidates_are_dropped(seed):
    """An image over the bound gives the detections of its ``bound`` best candidates alone."""
    thresh, bound = 0.02, 100
    logits, deltas, proposals, batch, sizes = _batch(seed)
    counts = _candidates_per_image(logits, batch, sizes.shape[0], thresh)
    assert counts.max() > bound and counts[counts > 0].min() <= bound  # both cases in one batch
    det = _heads(pre_nms_topk_test=bound).inference(logits, deltas, proposals, batch, sizes, thresh, -1)
    scores = torch.softmax(logits, dim=-1)[:, :-1]
    for image in range(sizes.shape[0]):
        rows = (batch == image).nonzero().squeeze(1)
        image_scores = scores[rows].flatten()
        # The reference on this image alone, thresholded at its bound-th best candidate.
        cut = max(thresh, image_scores.sort(descending=True).values[bound].item()) if counts[image] > bound else thresh
        expected = reference_inference(
            _heads(),
            logits[rows],
            deltas[rows],
            proposals[rows],
            torch.zeros_like(rows),
            sizes[image : image + 1],
            cut,
            -1,
        )
        mine = det.batch_index == image
        assert det.classes[mine].tolist() == expected[2].tolist()
        assert torch.equal(det.scores[mine], expected[1]) and torch.equal(det.boxes[mine], expected[0])
        assert det.rank[mine].tolist() == list(range(int(mine.sum())))


def test_empty_inputs():
    heads = _heads()
    logits, deltas, proposals, batch, sizes = _batch(0)
    det = heads.inference(logits, deltas, proposals, batch, sizes, score_thresh=1.0)  # no candidate
    assert det.boxes.shape == (0, 4) and det.rank.shape == (0,) and det.batch_index.shape == (0,)
    det = heads.inference(logits[:0], deltas[:0], proposals[:0], batch[:0], sizes)  # no proposal
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0,) and det.classes.shape == (0,)


def test_low_precision_inputs_are_scored_in_float32():
    """bf16 network outputs: scores, boxes and NMS in float32, as for the upcast inputs."""
    heads = _heads()
    logits, deltas, proposals, batch, sizes = _batch(1)
    logits, deltas = logits.bfloat16(), deltas.bfloat16()
    det = heads.inference(logits, deltas, proposals, batch, sizes, 0.05, 100)
    assert det.scores.dtype == torch.float32 and det.boxes.dtype == torch.float32
    _assert_same(det, reference_inference(heads, logits.float(), deltas.float(), proposals, batch, sizes, 0.05, 100))


def test_default_bound_is_below_tensorrt_topk_limit():
    assert ROIHeadsConfig().pre_nms_topk_test < 3840


def test_traced_inference_matches_eager_on_other_sizes():
    """The traced graph holds for other batch sizes, proposal counts and per-image candidate
    counts on either side of the bound (k = min(S * K, bound) stays a graph value)."""
    import warnings

    heads = _heads(pre_nms_topk_test=200)

    def run(logits, deltas, proposals, batch, sizes, thresh, top_k):
        det = heads.inference(logits, deltas, proposals, batch, sizes, thresh, top_k)
        return det.boxes, det.scores, det.classes, det.batch_index, det.rank

    example = (*_batch(0, counts=(5, 12)), torch.tensor(0.05), torch.tensor(4))  # S * K = 72 < 200
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(run, example, check_trace=False)
    for counts, thresh, top_k in (((40, 0, 75, 23), 0.0, 100), ((60, 9, 33), 0.05, -1), ((7,), 0.3, 2)):
        args = (*_batch(1, counts), torch.tensor(thresh), torch.tensor(top_k))
        for got, want in zip(traced(*args), run(*args)):
            assert torch.equal(got, want)


class _Inference(torch.nn.Module):
    """``BoxROIHeads.inference`` as a module to trace or export: -> (boxes, classes, batch index)."""

    def __init__(self, heads: BoxROIHeads) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, logits, deltas, proposals, batch, sizes):
        # Options as tensors, as the exported graph's inputs are.
        det = self.heads.inference(logits, deltas, proposals, batch, sizes, torch.tensor(0.0), torch.tensor(100))
        return det.boxes, det.classes, det.batch_index


def _runner(kind: str, module: _Inference, example: tuple, tmp_path):
    """``module`` eager, traced (TorchScript) or exported to ONNX (run by ONNX Runtime), traced on
    ``example``: a function of the same inputs -> the same outputs as tensors."""
    import warnings

    if kind == "eager":
        return module
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if kind == "torchscript":
            return torch.jit.trace(module, example, check_trace=False)
        import onnxruntime as ort

        names = ["logits", "deltas", "proposals", "batch", "sizes"]
        axes = {"logits": {0: "p"}, "deltas": {0: "p"}, "proposals": {0: "p"}, "batch": {0: "p"}, "sizes": {0: "b"}}
        torch.onnx.export(
            module,
            example,
            str(tmp_path / "inference.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=names,
            dynamic_axes=axes,
        )
    session = ort.InferenceSession(str(tmp_path / "inference.onnx"), providers=["CPUExecutionProvider"])
    return lambda *args: [torch.from_numpy(a) for a in session.run(None, dict(zip(names, (a.numpy() for a in args))))]


@pytest.mark.parametrize("kind", ["eager", "torchscript", "onnx"])
def test_an_images_detections_do_not_depend_on_its_batch_mates_at_the_nms_threshold(kind, tmp_path):
    """Two boxes of the last of 80 classes whose IoU is just below the NMS threshold (0.4993 <
    0.5: both kept). Alone, or as the 8th image of a batch whose other images have boxes as large
    as the image, the image keeps both: its NMS runs on its own boxes, in eager mode, in a traced
    graph and in ONNX. (One NMS call for the batch moved this group by 639 group widths of 1,334
    px, where float32 steps by 1/16 px: that rounded the IoU to 0.5024 and dropped a box.)"""
    classes = 80
    heads = BoxROIHeads(
        ROIHeadsConfig(num_classes=classes, fc_dim=16, score_thresh_test=0.0, nms_thresh_test=0.5), in_channels=2
    ).eval()
    x = 3.34  # IoU of [0, 0, 10, 10] and [x, 0, 10 + x, 10] = (10 - x) / (10 + x)
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0], [x, 0.0, 10.0 + x, 10.0]])
    logits = torch.full((2, classes + 1), -10.0)
    logits[:, classes - 1] = 10.0  # the last class, nothing else

    def inputs(batch: int):
        mates = torch.tensor([[0.0, 0.0, 1333.0, 800.0]]).repeat(batch - 1, 1)
        all_proposals = torch.cat((mates, proposals))
        all_logits = torch.cat((torch.zeros(batch - 1, classes + 1), logits))
        all_deltas = torch.zeros(batch + 1, 4 * classes)
        images = torch.cat((torch.arange(batch - 1), torch.full((2,), batch - 1)))
        sizes = torch.tensor([[800, 1333]]).repeat(batch, 1)
        return all_logits, all_deltas, all_proposals, images, sizes

    run = _runner(kind, _Inference(heads), inputs(3), tmp_path)

    def last_image(batch: int):
        boxes, labels, images = run(*inputs(batch))
        return boxes[(images == batch - 1) & (labels == classes - 1)]

    alone = last_image(1)
    assert alone.shape[0] == 2
    assert torch.equal(last_image(8), alone)
