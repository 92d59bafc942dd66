"""The worker and the shared pipeline on the real (tiny) model: each request of a mixed batch gets
what the Predictor gives it alone; queued images and the batches made of them."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from tests.support import CATEGORY_IDS, scene, tiny_config
from transfiner.model.inference.detections import select_detections
from transfiner.model.inference.predictor import Prediction
from transfiner.model.inference.preprocess import network_shape, prepare_batch, to_rgb_tensor
from transfiner.service.engine.batcher import Job
from transfiner.service.engine.loading import TorchBackend
from transfiner.service.engine.pipeline import (
    RequestOptions,
    batch_options,
    fetch,
    network_image,
    preprocess,
    records,
)
from transfiner.service.engine.worker import SegmentJob, Worker

pytestmark = pytest.mark.timeout(120)


def test_mixed_batch_gives_each_request_what_its_own_options_give(predictor):
    """One forward pass, four requests with different options: each equals the Predictor run on
    the same batch with that request's options alone."""
    images = [scene(seed=s) for s in range(4)]
    probe = predictor(images[0], score_threshold=0.0)
    middle = float(probe.scores[len(probe) // 2])
    options = [
        RequestOptions(score_threshold=0.0, max_detections=5),
        RequestOptions(score_threshold=middle, max_detections=2, refine=False, mask_threshold=0.7),
        RequestOptions(score_threshold=0.0, max_detections=3, classes=frozenset({1})),
        RequestOptions(score_threshold=0.0, max_detections=4, mask_format="none"),
    ]
    worker = Worker(TorchBackend(predictor.model))

    async def main():
        jobs = [
            Job(SegmentJob(network_image(img, img.shape[:2], predictor.cfg.input), opt), deadline=time.monotonic() + 60)
            for img, opt in zip(images, options)
        ]
        await worker.run(jobs)
        return [j.future.result() for j in jobs]

    try:
        results = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        worker.close()
    assert {r.batch_size for r in results} == {4}
    cfg = predictor.cfg
    for i, (opt, result) in enumerate(zip(options, results)):
        got = records(result.fetched, cfg, "img")
        top_k = None if opt.classes is not None else opt.max_detections
        want = predictor.predict(
            images,
            score_threshold=opt.score_threshold,
            max_detections=top_k,
            refine=opt.refine,
            mask_threshold=opt.mask_threshold,
        )[i]
        keep = np.arange(len(want))
        if opt.classes is not None:
            keep = keep[np.isin(want.classes, sorted(opt.classes))][: opt.max_detections]
        assert len(got) == len(keep) > 0
        np.testing.assert_array_equal([g["score"] for g in got], np.round(want.scores[keep].astype(float), 5))
        assert [g["category_id"] for g in got] == [CATEGORY_IDS[c] for c in want.classes[keep]]
        if opt.mask_format == "none":
            assert all("segmentation" not in g for g in got)
            continue
        masks = mask_util.decode([g["segmentation"] for g in got]).transpose(2, 0, 1).astype(bool)
        np.testing.assert_array_equal(masks, want.masks[keep])


def test_box_only_records_are_the_predictors_boxes(predictor):
    image = scene(150, 200, seed=5)
    opt = RequestOptions(score_threshold=0.0, max_detections=10)
    batch = preprocess([network_image(image, (150, 200), predictor.cfg.input)], predictor.cfg.input, predictor.device)
    with torch.inference_mode():
        raw = predictor.model(batch.images, batch.sizes, batch_options([opt], predictor.cfg))
    none = RequestOptions(score_threshold=0.0, max_detections=10, mask_format="none")
    got = records(fetch(raw, [0], batch, [none])[0], predictor.cfg, "x")
    selected = select_detections(raw, 0, opt.score_threshold, opt.classes, opt.max_detections, opt.refine)
    full = Prediction.from_outputs(selected, 0, batch.sizes[0], (150, 200))
    want = full.coco_records("x", predictor.cfg.category_ids)
    assert len(got) == len(want) > 0
    for g, w, box in zip(got, want, full.boxes):
        assert "segmentation" not in g
        assert [g[k] for k in ("image_id", "bbox", "score", "category_id")] == [
            w[k] for k in ("image_id", "bbox", "score", "category_id")
        ]
        assert g["area"] == float((box[2] - box[0]) * (box[3] - box[1]))


TINY_INPUT = tiny_config().input  # network inputs of 96..128 pixels a side


@pytest.mark.parametrize("size", [(48, 64), (96, 128), (600, 800)])
def test_a_queued_image_holds_the_smaller_form_and_gives_the_predictor_input_exactly(size):
    """Large images wait as the float32 network input (resized on the decode thread), small ones
    as their uint8 pixels (resized by the worker); the batch is ``prepare_batch``'s to the bit."""
    rgb = scene(*size, seed=4)
    queued = network_image(rgb, size, TINY_INPUT)
    network = network_shape(*size, TINY_INPUT)
    assert queued.network == network and queued.original == size and queued.canvas == (96, 128)
    assert queued.nbytes == min(rgb.nbytes, 4 * 3 * network[0] * network[1])
    assert queued.resized == (size == (600, 800))
    got = preprocess([queued, queued], TINY_INPUT, "cpu")
    want, sizes = prepare_batch([to_rgb_tensor(rgb)] * 2, TINY_INPUT, "cpu")
    assert torch.equal(got.images, want) and torch.equal(got.sizes, sizes) and got.originals == [size, size]


def test_preprocess_refuses_a_batch_of_several_canvases():
    square, wide = (network_image(scene(h, w), (h, w), TINY_INPUT) for h, w in ((96, 96), (96, 128)))
    assert square.canvas != wide.canvas
    with pytest.raises(ValueError, match="one canvas"):
        preprocess([square, wide], TINY_INPUT, "cpu")
