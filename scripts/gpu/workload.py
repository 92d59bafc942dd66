"""What the GPU benchmark measures: model size, image size, cases, and the HTTP servers to compare."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from transfiner.model.datasets.shapes import ShapesConfig, render_image
from transfiner.model.inference.preprocess import prepare_batch
from transfiner.model.modeling.rcnn import InferenceOptions, MaskTransfiner


@dataclass(frozen=True)
class HttpServer:
    """One way to run ``transfiner serve``."""

    switch_interval_ms: float = 5.0  # TRANSFINER_GIL_SWITCH_INTERVAL_MS
    worker_process: bool = False  # TRANSFINER_WORKER_PROCESS
    workers: int = 1  # model workers (processes or threads) on the one GPU
    concurrency: tuple[int, ...] | None = None  # None: the workload's

    @property
    def name(self) -> str:
        """How the model workers run: "thread", "process", "2 processes"."""
        kind = "process" if self.worker_process else "thread"
        return kind if self.workers == 1 else f"{self.workers} {kind}{'es' if self.worker_process else 's'}"


@dataclass
class Workload:
    config: str
    height: int
    width: int
    detections: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    precisions: tuple[str, ...]  # bf16 first: the service runs it (precision auto on a GPU)
    seconds_per_case: float  # measure each case for about this long (at least 2 batches)
    http_requests: int
    http_concurrency: tuple[int, ...]
    http_batch_size: int
    http_servers: tuple[HttpServer, ...]  # measured side by side
    default_http_servers: str  # indices into http_servers that a run measures unless told otherwise


# A worker thread and a worker process (the CUDA default) at every concurrency; two worker
# processes sharing the card (one launches while the other's kernels run) at the highest, only
# when named (`--http-servers 2`: measured on an H200 on 2026-11-27). A server at a 1 ms GIL
# switch interval gained nothing there and was dropped.
SERVERS = (HttpServer(), HttpServer(worker_process=True), HttpServer(worker_process=True, workers=2, concurrency=(32,)))
FULL = Workload("R50-FPN", 800, 1333, (10, 100), (1, 8), ("bf16", "fp32"), 1.5, 96, (8, 32), 8, SERVERS, "0,1")
QUICK = Workload(
    "small",
    384,
    640,
    (5, 20),
    (1, 2),
    ("bf16", "fp32"),
    0.5,
    8,
    (2,),
    2,
    (HttpServer(), HttpServer(worker_process=True), HttpServer(worker_process=True, workers=2, concurrency=(4,))),
    "0,1,2",
)


@dataclass
class Case:
    """One batch as the model takes it, at one precision and detection count."""

    precision: str
    batch_size: int
    detections: int
    batch: torch.Tensor  # pre-processed and padded, on the device
    sizes: torch.Tensor  # each image's size in the batch
    originals: list[tuple[int, int]]  # each image's size before pre-processing
    options: InferenceOptions


def make_case(
    model: MaskTransfiner, images: list[np.ndarray], device, precision: str, batch_size: int, detections: int
) -> Case:
    """The first ``batch_size`` images (repeated as needed), pre-processed as the Predictor does.
    Score threshold 0: every image has exactly ``detections`` detections, all refined."""
    chosen = [torch.from_numpy(images[i % len(images)]).permute(2, 0, 1) for i in range(batch_size)]
    batch, sizes = prepare_batch(chosen, model.cfg.input, device)
    options = InferenceOptions(score_threshold=0.0, max_detections=detections)
    return Case(precision, batch_size, detections, batch, sizes, [tuple(i.shape[-2:]) for i in chosen], options)


def largest_case(workload: Workload, model: MaskTransfiner, images: list[np.ndarray], device) -> Case:
    """The largest batch with the most detections, at the service's precision."""
    return make_case(model, images, device, workload.precisions[0], max(workload.batch_sizes), max(workload.detections))


def make_images(workload: Workload, count: int, folder: Path) -> list[np.ndarray]:
    """``count`` make-shapes scenes at the workload's size, also written as PNGs for HTTP."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    shapes = ShapesConfig(num_images=count, seed=7, width=workload.width, height=workload.height)
    for index in range(count):
        rgb, _ = render_image(shapes, index)
        Image.fromarray(rgb).save(folder / f"{index:03d}.png")
        images.append(rgb)
    return images
