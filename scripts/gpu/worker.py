"""The service's model worker without HTTP, on the HTTP case's batches: as a thread and as a process."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scripts.gpu.workload import Workload
from transfiner.model.config import ModelConfig
from transfiner.model.inference.backend import CPU_BOXES_PER_GROUP, TorchBackend
from transfiner.model.modeling.rcnn import MaskTransfiner


@contextlib.contextmanager
def busy_python(active: bool, cfg: ModelConfig, fetched: list) -> Iterator[None]:
    """While the block runs (if ``active``), a second thread keeps the interpreter busy as a
    server's event loop and post-processing threads do: COCO records and JSON of answers."""
    if not active:
        yield
        return
    from transfiner.service.engine.pipeline import records

    payload = [records(f, cfg, None) for f in fetched]
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            json.dumps([records(f, cfg, None) for f in fetched[:2]] + payload[:2])

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def bench_worker(workload: Workload, model: MaskTransfiner, images, device, log) -> list[dict]:
    """The service's worker in this thread (``Worker.start`` and its steps, as its own thread runs them).

    - Alone: what the service's device path costs against the model alone.
    - Beside a second thread that keeps the interpreter busy as the server's post-processing
      threads and event loop do, at a short GIL switch interval: a thread that launches thousands
      of small kernels waits for the lock at each of them.
    - Alone again with the other grouping of the batch's masks (one step, or groups of images,
      lightest first).
    """
    from transfiner.service.engine.pipeline import RequestOptions, network_image
    from transfiner.service.engine.worker import Worker

    precision, batch_size = workload.precisions[0], workload.http_batch_size
    backend = TorchBackend(model, precision)
    worker = Worker(backend)
    default_group = backend.boxes_per_group
    cfg = model.cfg
    queued = [
        network_image(images[i % len(images)], images[i % len(images)].shape[:2], cfg.input) for i in range(batch_size)
    ]
    default_interval = sys.getswitchinterval()
    rows = []

    preprocess: list[float] = []  # of each batch: upload, resize and pad (not in the in-process figures)
    groups: list[int] = []  # mask-head steps of each batch (``segment_lightest_first``'s groups)

    def one_batch(options) -> tuple[float, list]:
        start = time.perf_counter()
        steps, preprocess_s = worker.start(queued, [options] * batch_size)
        per_step = [[f for _, f in step] for step in steps]
        preprocess.append(preprocess_s)
        groups.append(len(per_step))
        return time.perf_counter() - start, [f for step in per_step for f in step]

    # Beside the busy thread only at a 0.2 ms switch interval: at 5 ms one batch of 8 x 100
    # detections took 86 s on an H200, and this part must not eat the run. Last, the other
    # grouping: the CPU's small groups (per-image steps at 100 detections) on a GPU, the whole
    # batch in one step on a CPU; what answering the lightest images first costs.
    other_group = CPU_BOXES_PER_GROUP if default_group != CPU_BOXES_PER_GROUP else 10**9
    cases = (
        (False, default_interval, default_group),
        (True, 0.0002, default_group),
        (False, default_interval, other_group),
    )
    try:
        for detections in workload.detections:
            options = RequestOptions(score_threshold=0.0, max_detections=detections)
            _, fetched = one_batch(options)  # warm-up
            for load, interval, group in cases:
                sys.setswitchinterval(interval)
                backend.boxes_per_group = group
                try:
                    with busy_python(load, cfg, fetched):
                        times = []
                        preprocess.clear()
                        groups.clear()
                        begin = time.perf_counter()
                        while len(times) < 2 or (
                            time.perf_counter() - begin < workload.seconds_per_case and len(times) < 30
                        ):
                            times.append(one_batch(options)[0])
                finally:
                    sys.setswitchinterval(default_interval)
                    backend.boxes_per_group = default_group
                batch_s = float(np.median(times))
                row = {
                    "precision": precision,
                    "batch": batch_size,
                    "detections": detections,
                    "busy_thread": load,
                    "worker": "thread",
                    "boxes_per_group": group,
                    "mask_steps": max(groups),
                    "switch_interval_ms": interval * 1000,
                    "batch_ms": batch_s * 1000,
                    "preprocess_ms": float(np.median(preprocess)) * 1000,
                    "images_per_s": batch_size / batch_s,
                    "runs": len(times),
                }
                rows.append(row)
                log(
                    f"worker det {detections}{' + busy thread' if load else ''} (switch {interval * 1000:g} ms, "
                    f"{max(groups)} mask steps): {row['images_per_s']:.1f} img/s, {row['batch_ms']:.0f} ms a batch"
                )
    finally:
        worker.close()
    return rows


def bench_worker_process(workload: Workload, checkpoint: Path, cfg: ModelConfig, images, device, log) -> list[dict]:
    """``bench_worker``'s batches through the service's worker in a process of its own.

    - ``ProcessWorker``, driven by an event loop as the batcher drives it.
    - Alone, and beside the same busy Python thread (here, in the server's process) at Python's
      default switch interval: the busy thread no longer shares an interpreter with the thread
      that launches the kernels.
    """
    import asyncio

    from transfiner.export.resolve import resolve_model
    from transfiner.service.engine.batcher import Job
    from transfiner.service.engine.pipeline import RequestOptions, network_image
    from transfiner.service.engine.worker import SegmentJob
    from transfiner.service.engine.worker_process import ProcessWorker, WorkerSpec

    precision, batch_size = workload.precisions[0], workload.http_batch_size
    queued = [
        network_image(images[i % len(images)], images[i % len(images)].shape[:2], cfg.input) for i in range(batch_size)
    ]
    spec = WorkerSpec(
        resolve_model(str(checkpoint)),
        "pytorch",
        None,
        str(device),
        None,
        precision,
        None,
        1,
        batch_size if device.type == "cuda" else 1,
        sys.getswitchinterval() * 1000,
        "warning",
    )
    rows = []
    preprocess: list[float] = []  # of each batch, in the child

    async def measure() -> None:
        worker = ProcessWorker(spec)
        await worker.start()

        async def one_batch(options) -> tuple[float, list]:
            jobs = [Job(SegmentJob(image, options), time.monotonic() + 600, image.canvas) for image in queued]
            start = time.perf_counter()
            await worker.run(jobs)
            preprocess.append(jobs[0].future.result().preprocess_s)
            return time.perf_counter() - start, [job.future.result().fetched for job in jobs]

        try:
            for detections in workload.detections:
                options = RequestOptions(score_threshold=0.0, max_detections=detections)
                _, fetched = await one_batch(options)  # warm-up
                for load in (False, True):
                    with busy_python(load, cfg, fetched):
                        times = []
                        preprocess.clear()
                        begin = time.perf_counter()
                        while len(times) < 2 or (
                            time.perf_counter() - begin < workload.seconds_per_case and len(times) < 30
                        ):
                            times.append((await one_batch(options))[0])
                    batch_s = float(np.median(times))
                    rows.append(
                        {
                            "precision": precision,
                            "batch": batch_size,
                            "detections": detections,
                            "busy_thread": load,
                            "worker": "process",
                            "switch_interval_ms": sys.getswitchinterval() * 1000,
                            "batch_ms": batch_s * 1000,
                            "preprocess_ms": float(np.median(preprocess)) * 1000,
                            "images_per_s": batch_size / batch_s,
                            "runs": len(times),
                        }
                    )
                    log(
                        f"worker process det {detections}{' + busy thread' if load else ''}: "
                        f"{batch_size / batch_s:.1f} img/s, {batch_s * 1000:.0f} ms a batch"
                    )
        finally:
            await asyncio.to_thread(worker.close)

    asyncio.run(measure())
    return rows
