"""CUDA smoke tests: the service's worker (per-image options, masks in steps) and a TorchScript
export on the GPU give what the CPU gives. They skip without a CUDA device and run in
scripts/gpu_checks.sh on a lent GPU."""

from __future__ import annotations

import asyncio
import copy
import time

import numpy as np
import pytest
import torch

from tests.support import scene
from transfiner.export.backends import load_backend
from transfiner.model.inference.backend import TorchBackend
from transfiner.model.inference.predictor import load_predictor
from transfiner.service.engine.batcher import Job
from transfiner.service.engine.pipeline import RequestOptions, network_image, records
from transfiner.service.engine.worker import SegmentJob, Worker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run_worker(backend, images, options) -> list[list[dict]]:
    worker = Worker(backend)
    cfg = backend.cfg

    async def main():
        jobs = []
        for image, opt in zip(images, options):
            queued = network_image(image, image.shape[:2], cfg.input)
            jobs.append(Job(SegmentJob(queued, opt), deadline=time.monotonic() + 120, canvas=queued.canvas))
        await worker.run(jobs)
        return [job.future.result() for job in jobs]

    try:
        results = asyncio.run(main())
    finally:
        worker.close()
    return [records(r.fetched, cfg, None) for r in results]


def test_cuda_worker_with_per_image_options_matches_the_cpu(checkpoint):
    predictor = load_predictor(checkpoint, None, "cpu")
    images = [scene(seed=s) for s in range(4)]
    options = [
        RequestOptions(score_threshold=0.0, max_detections=10),
        RequestOptions(score_threshold=0.3, max_detections=2),
        RequestOptions(score_threshold=0.0, max_detections=3, classes=frozenset({1})),
        RequestOptions(score_threshold=0.0, max_detections=4, mask_format="none"),
    ]
    cpu = run_worker(TorchBackend(predictor.model, "fp32", boxes_per_group=4), images, options)
    gpu_model = copy.deepcopy(predictor.model).to("cuda")
    gpu = run_worker(TorchBackend(gpu_model, "fp32", boxes_per_group=4), images, options)
    for got, want in zip(gpu, cpu):
        assert [g["category_id"] for g in got] == [w["category_id"] for w in want]
        np.testing.assert_allclose([g["bbox"] for g in got], [w["bbox"] for w in want], atol=0.5)
        for g, w in zip(got, want):
            if "segmentation" in w:
                assert abs(g["area"] - w["area"]) <= 0.02 * max(w["area"], 50)


def test_torchscript_export_runs_on_cuda(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFINER_CACHE", str(tmp_path))  # the export is cached there
    backend = load_backend(checkpoint, "torchscript", device="cuda")
    assert backend.device.type == "cuda"
    images = [scene(seed=s) for s in range(2)]
    options = [RequestOptions(score_threshold=0.0, max_detections=5)] * 2
    got = run_worker(backend, images, options)
    want = run_worker(load_backend(checkpoint, "pytorch", device="cpu", precision="fp32"), images, options)
    for g, w in zip(got, want):
        assert len(g) == len(w) > 0
        np.testing.assert_allclose([x["bbox"] for x in g], [x["bbox"] for x in w], atol=0.5)
