"""A model worker: runs batches on one backend in a dedicated thread, off the event loop.

Torch releases the GIL inside its kernels, so the event loop keeps accepting and decoding while
a batch runs. The worker only does pre-processing and the forward pass; each request pastes and
encodes its own masks afterwards (``service.pipeline.postprocess`` in the post-processing pool),
so the worker is free for the next batch as soon as the forward pass ends.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from model.rcnn import InferenceOptions, RawOutputs

from .backends import Backend
from .batcher import Job
from .pipeline import (
    NetworkImage, PreparedBatch, RequestOptions, batch_options, network_image, postprocess, preprocess,
)


@dataclass
class SegmentJob:
    """A job's payload: the image, as it waits for the network, and the request's options."""

    image: NetworkImage
    options: RequestOptions


@dataclass
class InferenceResult:
    """What a request gets back from its batch: the shared outputs and where it sits in them."""

    raw: RawOutputs
    index: int
    input_size: torch.Tensor  # (h, w) of the network input
    original: tuple[int, int]  # (h, w) of the uploaded image
    batch_size: int
    preprocess_s: float
    inference_s: float


class WorkerError(Exception):
    """The forward pass failed; the batch's requests answer 500, the worker keeps running."""


class Worker:
    """Implements ``batcher.BatchRunner`` for one backend."""

    def __init__(self, backend: Backend, index: int = 0, metrics=None) -> None:
        self.backend = backend
        self.index = index
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"transfiner-worker-{index}")

    def forward(
        self, images: list[NetworkImage], options: InferenceOptions
    ) -> tuple[PreparedBatch, RawOutputs, float, float]:
        """Synchronous: pre-process and run one batch of one canvas (called in the worker thread)."""
        started = time.perf_counter()
        prepared = preprocess(images, self.backend.cfg.input, self.backend.device)
        ready = time.perf_counter()
        raw = self.backend.infer(prepared.images, prepared.sizes, options)
        return prepared, raw, ready - started, time.perf_counter() - ready

    async def run(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if not job.future.done()]
        if not live:
            return
        payloads: list[SegmentJob] = [job.payload for job in live]
        options = batch_options([p.options for p in payloads], self.backend.cfg)
        loop = asyncio.get_running_loop()
        try:
            prepared, raw, pre_s, infer_s = await loop.run_in_executor(
                self._executor, self.forward, [p.image for p in payloads], options
            )
        except Exception as error:  # noqa: BLE001 - reported per request, logged by the batcher
            raise WorkerError(f"inference failed: {type(error).__name__}") from error
        if self.metrics is not None:
            self.metrics.preprocess_seconds.observe(pre_s)
            self.metrics.inference_seconds.observe(infer_s)
        for i, job in enumerate(live):
            if not job.future.done():
                job.future.set_result(InferenceResult(
                    raw, i, prepared.sizes[i], prepared.originals[i], len(live), pre_s, infer_s,
                ))

    def warm_up(self, batches: int, batch_size: int) -> None:
        """Synchronous: runs ``batches`` synthetic batches (in the worker thread) so the first real
        request does not pay for lazy initialisation (allocator, kernels, thread pools)."""
        cfg = self.backend.cfg
        side = cfg.input.min_size_test
        rng = np.random.default_rng(0)
        rgb = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
        rgb[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = (200, 60, 40)  # something to find
        image = network_image(rgb, (side, side), cfg.input)
        request = RequestOptions(score_threshold=0.0, max_detections=5)

        def one_batch() -> None:
            prepared, raw, _, _ = self.forward([image] * batch_size, batch_options([request], cfg))
            postprocess(raw, 0, prepared.sizes[0], prepared.originals[0], request, cfg, None)

        for _ in range(batches):
            self._executor.submit(one_batch).result()  # on the worker's own thread, as real batches

    def close(self) -> None:
        self._executor.shutdown(wait=True)
