"""GPU benchmark: in-process model and HTTP service on one card, in a few minutes.

R50-FPN with random weights (FrozenBN calibrated, so the random network yields distinct boxes)
at 800x1333, score threshold 0 so every image has exactly the asked number of detections, all
refined. By default, in this order: the card's matmul peak and the key-masked attention kernels
side by side; in-process at the service's precision, 10 and 100 detections, batch 1 and 8, with
per-stage times (CUDA events around the model's own modules), peak GPU memory and the refiner's
achieved TFLOP/s; one forward pass under torch.profiler; NMS layouts; the refiner's encoder run
different ways; the service's worker on the same batches without HTTP (alone, beside a busy
Python thread, in a process of its own); the same checkpoint behind ``transfiner serve`` loaded
by ``transfiner bench`` with the same images (a worker thread and a worker process); fp32
in-process. Parts whose question is answered run only when named (``--parts``): the refiner's
token budget, channels-last, nvJPEG, torch.compile.

    python scripts/bench_gpu.py --out bench-results/gpu            # on a GPU machine, ~6 minutes
    python scripts/bench_gpu.py --quick --out bench-results/gpu    # small, on the CPU

Writes ``bench_gpu.json``, ``bench_gpu.md`` and ``bench_gpu.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_model's calibration
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, when run from elsewhere

from bench_model import calibrate_frozen_bn  # noqa: E402

from transfiner.model.config import ModelConfig, preset  # noqa: E402
from transfiner.model.datasets.shapes import ShapesConfig, render_image  # noqa: E402
from transfiner.model.inference.backend import CPU_BOXES_PER_GROUP, TorchBackend  # noqa: E402
from transfiner.model.inference.detections import image_detections  # noqa: E402
from transfiner.model.inference.precision import autocast  # noqa: E402
from transfiner.model.inference.preprocess import prepare_batch  # noqa: E402
from transfiner.model.inference.rle import masks_to_rle  # noqa: E402
from transfiner.model.modeling.rcnn import InferenceOptions, MaskTransfiner  # noqa: E402
from transfiner.model.modeling.refiner import CONTEXT_SIZE  # noqa: E402
from transfiner.model.weights.checkpoint import build_model, save_checkpoint  # noqa: E402
from transfiner.service.loadtest.servers import free_port, wait_for_server  # noqa: E402

# The `transfiner` command without relying on an installed console script (GPU images lack it).
TRANSFINER = [sys.executable, "-m", "transfiner"]


@dataclass
class Workload:
    config: str
    height: int
    width: int
    detections: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    precisions: tuple[str, ...]
    seconds_per_case: float  # measure each case for about this long (at least 2 batches)
    http_requests: int
    http_concurrency: tuple[int, ...]
    http_batch_size: int
    http_servers: tuple["HttpServer", ...]  # measured side by side
    default_http_servers: str  # indices into http_servers that a run measures unless told otherwise
    chunk_tokens: tuple[int, ...]  # refiner token budgets per pass, swept at the largest case


# bf16 first: the service runs it (precision auto on a GPU), and HTTP is compared with it.
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


# A worker thread and a worker process (the CUDA default) at every concurrency; two worker
# processes sharing the card (one launches while the other's kernels run) at the highest, only
# when named (`--http-servers 2`: measured on an H200 on 2026-11-27, README). A server at a 1 ms
# GIL switch interval gained nothing there and was dropped.
SERVERS = (HttpServer(), HttpServer(worker_process=True), HttpServer(worker_process=True, workers=2, concurrency=(32,)))
FULL = Workload("R50-FPN", 800, 1333, (10, 100), (1, 8), ("bf16", "fp32"), 1.5, 96, (8, 32), 8, SERVERS, "0,1",
                 (65_536, 131_072, 262_144, 393_216, 786_432))
QUICK = Workload("small", 384, 640, (5, 20), (1, 2), ("bf16", "fp32"), 0.5, 8, (2,), 2,
                 (HttpServer(), HttpServer(worker_process=True),
                  HttpServer(worker_process=True, workers=2, concurrency=(4,))), "0,1,2", (4_096, 65_536))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall-clock time of the model's stages, from hooks on its own modules (so the benchmark
    times the real ``MaskTransfiner.forward``, not a copy of it). Gaps between modules are the
    stages that are methods: RPN proposals (after the backbone) and box inference (before the
    mask head). CUDA events keep the GPU running; the times are read after the forward pass."""

    MARKS = ("start", "backbone", "rpn", "box_head", "box_inference", "mask_head")

    def __init__(self, model: MaskTransfiner, device: torch.device) -> None:
        self.device = device
        self.marks: dict[str, object] = {}
        self.refiner_s = 0.0
        self.handles = [
            model.backbone.register_forward_hook(lambda *_: self._mark("backbone")),
            model.roi_heads.register_forward_pre_hook(lambda *_: self._mark("rpn")),
            model.roi_heads.register_forward_hook(lambda *_: self._mark("box_head")),
            model.mask_head.register_forward_pre_hook(lambda *_: self._mark("box_inference")),
            model.mask_head.register_forward_hook(lambda *_: self._mark("mask_head")),
            model.mask_head.refiner.register_forward_pre_hook(lambda *_: self._mark("refiner_start")),
            model.mask_head.refiner.register_forward_hook(lambda *_: self._mark("refiner_end")),
        ]

    def _mark(self, name: str) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[name] = event
        else:
            self.marks[name] = time.perf_counter()

    def start(self) -> None:
        self.marks = {}
        self._mark("start")

    def _between(self, a: str, b: str) -> float:
        if a not in self.marks or b not in self.marks:
            return 0.0
        if self.device.type == "cuda":
            return self.marks[a].elapsed_time(self.marks[b]) / 1000
        return self.marks[b] - self.marks[a]

    def stages(self) -> dict[str, float]:
        sync(self.device)
        out = {b: self._between(a, b) for a, b in zip(self.MARKS, self.MARKS[1:])}
        out["refiner"] = self._between("refiner_start", "refiner_end")
        return out

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def refiner_flops(cfg: ModelConfig, chunks: list[tuple[int, int]]) -> float:
    """Model FLOPs of refining ``chunks`` [(boxes, padded sequence length)] as the refiner ran
    them: node encoder, sequence encoder (attention counted as QK^T and PV), pixel decoder.
    Matmuls only; 2 FLOPs per multiply-add."""
    t = cfg.transfiner
    d, ff, c = t.d_model, t.dim_feedforward, cfg.fpn.out_channels
    total = 0.0
    for boxes, length in chunks:
        per_layer = 2 * length * d * 3 * d + 4 * length * length * d + 2 * length * d * d + 4 * length * d * ff
        encoder = 2 * length * (c + 1) * d
        decoder = 2 * length * d * d + 2 * length * d
        total += boxes * (t.num_layers * per_layer + encoder + decoder)
    return total


class ChunkRecorder:
    """(boxes, padded sequence length) of every refiner chunk of the last forward pass."""

    def __init__(self, model: MaskTransfiner) -> None:
        self.refiner = model.mask_head.refiner
        self.plan = self.refiner.chunks
        self.chunks: list[tuple[int, int]] = []

        def recorded(incoherence):
            planned = self.plan(incoherence)
            self.chunks.extend((len(index), CONTEXT_SIZE**2 + sum(level.nodes.shape[1] for level in levels))
                               for index, levels in planned)
            return planned

        self.refiner.chunks = recorded

    def close(self) -> None:
        del self.refiner.chunks


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """Measured dense matmul TFLOP/s (the card's practical peak for the head's kind of work)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def nms_layouts(boxes, scores, image, group, groups: int, batch: int, per_image: int, step: float) -> dict:
    """``bench_nms``'s three layouts of one NMS problem (images of ``per_image`` boxes in a row,
    ``groups`` groups an image), as functions that return the kept indices."""
    from torchvision.ops import batched_nms, nms

    def one_call():
        return nms(boxes + ((image * groups + group) * step)[:, None].to(boxes), scores, 0.5)

    def per_image_calls():
        kept = []
        for b in range(batch):
            index = torch.arange(b * per_image, (b + 1) * per_image, device=boxes.device)
            moved = boxes[index] + (group[index] * step)[:, None].to(boxes)
            kept.append(index[nms(moved, scores[index], 0.5)])
        return torch.cat(kept)

    def torchvision_batched():
        return batched_nms(boxes, scores, image * groups + group, 0.5)

    return {"one call": one_call, "per image": per_image_calls, "batched_nms": torchvision_batched}


def bench_nms(workload: Workload, device, log, repeats: int = 10) -> list[dict]:
    """NMS laid out three ways for a batch (the largest batch size) on synthetic boxes shaped like
    the model's: box inference (3,000 candidates an image over 80 classes, the pre-NMS bound at
    threshold 0) and the RPN (about 4,700 proposals an image over 5 levels). ``one call``: every
    group moved apart by the coordinate trick (what box inference does, one op in an exported
    graph); ``per image``: one call per image, its groups moved apart; ``batched_nms``:
    torchvision's, which makes one call per group above 5,000 boxes on CUDA (what the RPN does).
    All three keep the same boxes (checked); which is fastest on a GPU decides the layout."""
    batch = max(workload.batch_sizes)
    height, width = workload.height, workload.width
    generator = torch.Generator().manual_seed(0)
    rows = []
    for name, per_image, groups in (("box inference", 3000, 80), ("RPN", 4700, 5)):
        count = batch * per_image
        centers = torch.rand(count, 2, generator=generator) * torch.tensor([width, height])
        sizes = 8 + torch.rand(count, 2, generator=generator) * 300
        boxes = torch.cat((centers - sizes / 2, centers + sizes / 2), 1).clamp(min=0)
        boxes = torch.minimum(boxes, torch.tensor([width, height, width, height], dtype=torch.float32))
        scores = torch.rand(count, generator=generator)
        image = torch.arange(batch).repeat_interleave(per_image)
        group = torch.randint(groups, (count,), generator=generator)
        boxes, scores, image, group = (t.to(device) for t in (boxes, scores, image, group))
        layouts = nms_layouts(boxes, scores, image, group, groups, batch, per_image, float(max(width, height)) + 1)
        reference = None
        for layout, fn in layouts.items():
            kept = fn()
            sync(device)
            kept_set = set(kept.tolist())
            reference = kept_set if reference is None else reference
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            sync(device)
            ms = (time.perf_counter() - start) / repeats * 1000
            rows.append({"case": name, "layout": layout, "batch": batch, "boxes": count, "groups": batch * groups,
                         "ms": ms, "same_as_one_call": kept_set == reference})
            log(f"nms {name}, {layout}: {ms:.1f} ms for {count} boxes ({'same' if kept_set == reference else 'DIFFERENT'})")
    return rows


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


def time_case(model, batch, sizes, originals, options, precision, device, seconds) -> dict:
    """One (batch, detections, precision) case: median per-batch time and stages, peak memory."""
    timer = StageTimer(model, device)
    recorder = ChunkRecorder(model)
    try:
        with torch.inference_mode(), autocast(precision, device):
            raw = model(batch, sizes, options)  # warm-up (and the detection count check)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs = []
            begin = time.perf_counter()
            while len(runs) < 2 or (time.perf_counter() - begin < seconds and len(runs) < 50):
                timer.start()
                recorder.chunks = []
                start = time.perf_counter()
                raw = model(batch, sizes, options)
                sync(device)
                forward_s = time.perf_counter() - start
                stages = timer.stages()
                start = time.perf_counter()
                for i, original in enumerate(originals):
                    detections = image_detections(raw, i, sizes[i], original)  # as the Predictor's
                    masks_to_rle(detections.mask_probs, detections.boxes, original, 0.5)
                post_s = time.perf_counter() - start
                runs.append({"forward_s": forward_s, "postprocess_s": post_s, **stages})
    finally:
        timer.close()
        recorder.close()
    median = {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
    return {
        "runs": len(runs),
        "detections_found": int(len(raw.scores)),
        "refiner_chunks": recorder.chunks,  # [(boxes, padded length)] of the last pass
        "refiner_tokens": sum(boxes * length for boxes, length in recorder.chunks),
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        **median,
    }


def bench_in_process(
    workload: Workload, precisions: tuple[str, ...], model: MaskTransfiner, images, device, peak_tflops, log
) -> list[dict]:
    rows = []
    for precision in precisions:
        for batch_size in workload.batch_sizes:
            chosen = [torch.from_numpy(images[i % len(images)]).permute(2, 0, 1) for i in range(batch_size)]
            batch, sizes = prepare_batch(chosen, model.cfg.input, device)
            originals = [tuple(image.shape[-2:]) for image in chosen]
            for detections in workload.detections:
                options = InferenceOptions(score_threshold=0.0, max_detections=detections)
                case = {"precision": precision, "batch": batch_size, "detections": detections}
                try:
                    result = time_case(
                        model, batch, sizes, originals, options, precision, device, workload.seconds_per_case
                    )
                except Exception as error:  # noqa: BLE001 - one failed case must not lose the others
                    case["error"] = f"{type(error).__name__}: {error}"
                    log(f"in-process {case}: {case['error']}")
                    rows.append(case)
                    continue
                flops = refiner_flops(model.cfg, result["refiner_chunks"])
                result["refiner_tflops"] = flops / result["refiner"] / 1e12 if result["refiner"] else None
                result["refiner_share_of_peak"] = (
                    result["refiner_tflops"] / peak_tflops[precision]
                    if result["refiner_tflops"] and peak_tflops.get(precision) else None
                )
                result["images_per_s"] = batch_size / (result["forward_s"] + result["postprocess_s"])
                case.update(result)
                rows.append(case)
                log(
                    f"in-process {precision} batch {batch_size} det {detections}: "
                    f"{case['images_per_s']:.1f} img/s, forward {result['forward_s'] * 1000:.0f} ms, "
                    f"box inference {result['box_inference'] * 1000:.1f} ms, mask head "
                    f"{result['mask_head'] * 1000:.0f} ms, peak {result['peak_gpu_gib'] or 0:.1f} GiB"
                )
    return rows


def bench_profile(workload: Workload, model: MaskTransfiner, images, device, log, top: int = 15) -> dict:
    """One forward pass of the largest case (the service's precision) under ``torch.profiler``:
    how much of its wall time the device spends in kernels (the rest is the host launching them
    or waiting), how many kernels it launches, and the operators that take the most device time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    precision, batch_size, detections = workload.precisions[0], max(workload.batch_sizes), max(workload.detections)
    chosen = [torch.from_numpy(images[i % len(images)]).permute(2, 0, 1) for i in range(batch_size)]
    batch, sizes = prepare_batch(chosen, model.cfg.input, device)
    options = InferenceOptions(score_threshold=0.0, max_detections=detections)
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch.inference_mode(), autocast(precision, device):
        model(batch, sizes, options)  # warm-up
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            model(batch, sizes, options)
            sync(device)
            wall_s = time.perf_counter() - start
    averages = prof.key_averages()

    def self_time_us(event) -> float:  # the device's time on CUDA (attribute names vary by version), else the CPU's
        if not on_cuda:
            return event.self_cpu_time_total
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    # Device time counted once: by the operators (host-side events, which the profiler credits
    # with the kernels each launched), not also by the kernels' own events.
    operators = [event for event in averages if event.device_type == DeviceType.CPU and self_time_us(event) > 0]
    busy_us = sum(self_time_us(event) for event in operators)
    launches = sum(event.count for event in averages if "LaunchKernel" in event.key)
    aten_calls = sum(event.count for event in averages if event.key.startswith("aten::"))
    rows = sorted(operators, key=self_time_us, reverse=True)[:top]
    result = {
        "precision": precision, "batch": batch_size, "detections": detections, "wall_ms": wall_s * 1000,
        "device_busy_ms": busy_us / 1000, "kernel_launches": launches, "aten_calls": aten_calls,
        "top": [{"op": event.key, "calls": event.count, "self_ms": self_time_us(event) / 1000,
                 "share": self_time_us(event) / busy_us if busy_us else None} for event in rows],
    }
    log(f"profile {precision} batch {batch_size} det {detections}: wall {wall_s * 1000:.0f} ms, device busy "
        f"{busy_us / 1000:.0f} ms, {launches} kernel launches, {aten_calls} aten calls")
    return result


def bench_compile(workload: Workload, model: MaskTransfiner, images, device, log) -> dict:
    """The refiner's encoder layers under ``torch.compile`` (dynamic shapes: a pass's length varies
    with the detections) against eager, at the largest case: the first compiled forward pass (the
    compile time), the mask head's median, and how far the masks move. A measurement; the model
    runs eager."""
    precision, batch_size, detections = workload.precisions[0], max(workload.batch_sizes), max(workload.detections)
    chosen = [torch.from_numpy(images[i % len(images)]).permute(2, 0, 1) for i in range(batch_size)]
    batch, sizes = prepare_batch(chosen, model.cfg.input, device)
    options = InferenceOptions(score_threshold=0.0, max_detections=detections)

    def masks() -> torch.Tensor:
        with torch.inference_mode(), autocast(precision, device):
            return model(batch, sizes, options).mask_probs.float()

    eager = time_case(model, batch, sizes, [], options, precision, device, workload.seconds_per_case)
    reference = masks()
    layers = list(model.mask_head.refiner.sequence_encoder.layers)
    try:
        for layer in layers:
            layer.forward = torch.compile(layer.forward, dynamic=True)  # an instance attribute, removed below
        start = time.perf_counter()
        compiled_masks = masks()
        sync(device)
        first_s = time.perf_counter() - start
        compiled = time_case(model, batch, sizes, [], options, precision, device, workload.seconds_per_case)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        torch._dynamo.reset()
    result = {
        "precision": precision, "batch": batch_size, "detections": detections, "first_forward_s": first_s,
        "eager_mask_head_s": eager["mask_head"], "compiled_mask_head_s": compiled["mask_head"],
        "eager_refiner_s": eager["refiner"], "compiled_refiner_s": compiled["refiner"],
        "max_mask_prob_change": float((compiled_masks - reference).abs().max()) if reference.numel() else 0.0,
    }
    log(f"torch.compile encoder layers: first forward {first_s:.1f} s, mask head {eager['mask_head'] * 1000:.0f} -> "
        f"{compiled['mask_head'] * 1000:.0f} ms, masks moved by at most {result['max_mask_prob_change']:.2e}")
    return result


def bench_refiner_variants(workload: Workload, model: MaskTransfiner, images, device, log) -> list[dict]:
    """Ways to run the refiner's encoder, side by side at the largest case and the service's
    precision: the model as it is; the feed-forward ReLU separate from its matmul (as before
    ``linear_relu``); the layers on packed real tokens with FlashAttention's variable-length
    kernel (``SequenceEncoder.packed``, off by default). With the largest change of a mask
    probability against the model as it is."""
    import transfiner.model.modeling.refiner as transfiner

    precision, batch_size, detections = workload.precisions[0], max(workload.batch_sizes), max(workload.detections)
    chosen = [torch.from_numpy(images[i % len(images)]).permute(2, 0, 1) for i in range(batch_size)]
    batch, sizes = prepare_batch(chosen, model.cfg.input, device)
    options = InferenceOptions(score_threshold=0.0, max_detections=detections)
    encoder = model.mask_head.refiner.sequence_encoder
    fused = transfiner.linear_relu

    @contextlib.contextmanager
    def separate_relu():
        transfiner.linear_relu = lambda linear, x: F.relu(linear(x))
        try:
            yield
        finally:
            transfiner.linear_relu = fused

    @contextlib.contextmanager
    def packed():
        encoder.packed = True
        try:
            yield
        finally:
            encoder.packed = False

    def masks() -> torch.Tensor:
        with torch.inference_mode(), autocast(precision, device):
            return model(batch, sizes, options).mask_probs.float()

    reference = masks()
    rows = []
    for name, variant in (("the model", contextlib.nullcontext), ("separate ReLU", separate_relu),
                          ("packed attention", packed)):
        try:
            with variant():
                change = float((masks() - reference).abs().max()) if reference.numel() else 0.0
                result = time_case(model, batch, sizes, [], options, precision, device, workload.seconds_per_case)
        except Exception as error:  # noqa: BLE001 - an unsupported kernel is a result too
            rows.append({"variant": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"})
            log(f"refiner variant {name}: {rows[-1]['error']}")
            continue
        rows.append({"variant": name, "precision": precision, "batch": batch_size, "detections": detections,
                     "forward_s": result["forward_s"], "mask_head_s": result["mask_head"],
                     "refiner_s": result["refiner"], "peak_gpu_gib": result["peak_gpu_gib"],
                     "max_mask_prob_change": change})
        log(f"refiner variant {name}: forward {result['forward_s'] * 1000:.0f} ms, refiner "
            f"{result['refiner'] * 1000:.0f} ms, masks moved by at most {change:.1e}")
    return rows


def bench_chunks(workload: Workload, model: MaskTransfiner, images, device, log) -> list[dict]:
    """Tokens refined per pass (the GPU's chunk budget) against speed and peak memory, at the
    largest in-process case; the box cap is lifted so the token budget alone sets the chunks."""
    precision, batch_size, detections = workload.precisions[0], max(workload.batch_sizes), max(workload.detections)
    chosen = [torch.from_numpy(images[i % len(images)]).permute(2, 0, 1) for i in range(batch_size)]
    batch, sizes = prepare_batch(chosen, model.cfg.input, device)
    options = InferenceOptions(score_threshold=0.0, max_detections=detections)
    refiner = model.mask_head.refiner
    defaults = refiner.tokens_per_chunk, refiner.gpu_tokens_per_chunk, refiner.boxes_per_chunk
    rows = []
    refiner.boxes_per_chunk = 1 << 20
    try:
        for budget in workload.chunk_tokens:
            refiner.tokens_per_chunk = refiner.gpu_tokens_per_chunk = budget
            result = time_case(model, batch, sizes, [], options, precision, device, workload.seconds_per_case / 3)
            chunks = result["refiner_chunks"]
            mean_boxes = sum(boxes for boxes, _ in chunks) / max(len(chunks), 1)
            rows.append({"tokens_per_chunk": budget, "boxes_per_chunk": mean_boxes, "precision": precision,
                         "batch": batch_size, "detections": detections, "mask_head_s": result["mask_head"],
                         "refiner_s": result["refiner"], "forward_s": result["forward_s"],
                         "peak_gpu_gib": result["peak_gpu_gib"]})
            log(f"chunk budget {budget} tokens ({mean_boxes:.0f} boxes): mask head "
                f"{result['mask_head'] * 1000:.0f} ms, peak {result['peak_gpu_gib'] or 0:.1f} GiB")
    finally:
        refiner.tokens_per_chunk, refiner.gpu_tokens_per_chunk, refiner.boxes_per_chunk = defaults
    return rows


def bench_attention(device: torch.device, log) -> list[dict]:
    """Key-masked attention at the refiner's shape: the kernels SDPA offers for it, side by side."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows_, heads, length, dim = 64, 4, 2788, 64
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(rows_, heads, length, dim, device=device, dtype=torch.bfloat16, generator=gen)
               for _ in range(3))
    padding = torch.rand(rows_, length, device=device, generator=gen) < 0.05
    padding[:, :CONTEXT_SIZE**2] = False
    keep = ~padding[:, None, None, :]
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep)

    def masked(backend):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return run

    def unmasked():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    # Packed: only each box's real tokens, one after another ([T, heads, dim]), as FlashAttention's
    # variable-length kernel takes them (torch.nn.attention.varlen, where this torch has it): no
    # mask and no padded keys or queries. Compared at the real queries only.
    valid = ~padding  # [rows, length]
    lengths = valid.sum(dim=1)
    packed_q, packed_k, packed_v = (t.transpose(1, 2)[valid] for t in (q, k, v))  # [T, heads, dim]
    cumulative = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    packed_reference = reference.transpose(1, 2)[valid]

    def packed():
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(packed_q, packed_k, packed_v, cumulative, cumulative, longest, longest)

    variants = {
        "bool mask, SDPA's choice (the model)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
        "bool mask, memory-efficient": masked(SDPBackend.EFFICIENT_ATTENTION),
        "bool mask, cuDNN": masked(SDPBackend.CUDNN_ATTENTION),
        "no mask, flash (a bound: wrong result)": unmasked,
        "packed real tokens, flash varlen": packed,
    }
    # TFLOP/s of the work each variant does: the padded square, or the packed boxes' own squares.
    flops = 4 * rows_ * heads * length * length * dim
    packed_flops = 4 * heads * dim * float((lengths.double() ** 2).sum())
    results = []
    for name, fn in variants.items():
        row = {"variant": name}
        try:
            out = fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(5):
                out = fn()
            sync(device)
            seconds = (time.perf_counter() - start) / 5
            is_packed = fn is packed
            expected = packed_reference if is_packed else reference
            row.update(ms=seconds * 1000, tflops=(packed_flops if is_packed else flops) / seconds / 1e12,
                       max_abs_error=float((out.float() - expected).abs().max()))
        except Exception as error:  # noqa: BLE001 - unsupported kernels are a result too
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        results.append(row)
        log(f"attention {name}: {row.get('ms', 0):.2f} ms, {row.get('tflops', 0):.0f} TFLOP/s {row.get('error', '')}")
    return results


def boxes_matched(reference, other, tolerance: float = 0.5) -> float:
    """The share of ``reference``'s boxes with a box of the same image in ``other`` within
    ``tolerance`` px on every coordinate. Near-equal scores may swap places, and at the edge of
    the top-k a different box may get in, so boxes are matched, not compared in order."""
    matched = 0
    for image in reference.batch_index.unique().tolist():
        a = reference.boxes[reference.batch_index == image].float()
        b = other.boxes[other.batch_index == image].float()
        if len(b):
            distance = (a[:, None, :] - b[None, :, :]).abs().amax(dim=2)  # [Na, Nb]
            matched += int((distance.amin(dim=1) <= tolerance).sum())
    return matched / max(len(reference.boxes), 1)


def bench_channels_last(workload: Workload, model: MaskTransfiner, images, device, log) -> list[dict]:
    """The convolutions (backbone, FPN, semantic and mask heads) in channels-last memory format
    against the default, at the service's precision and the HTTP batch size: cuDNN's tensor-core
    kernels work on NHWC and transpose NCHW inputs around each convolution. Not what the model
    does: a measurement to decide whether it should (the boxes moving by float rounding only)."""
    import copy

    precision, batch_size = workload.precisions[0], workload.http_batch_size
    chosen = [torch.from_numpy(images[i % len(images)]).permute(2, 0, 1) for i in range(batch_size)]
    batch, sizes = prepare_batch(chosen, model.cfg.input, device)
    originals = [tuple(image.shape[-2:]) for image in chosen]
    nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
    rows = []
    try:
        for detections in workload.detections:
            options = InferenceOptions(score_threshold=0.0, max_detections=detections)
            with torch.inference_mode():  # the layout's own effect, in float32
                matched = boxes_matched(
                    model(batch, sizes, options), nhwc(batch.contiguous(memory_format=torch.channels_last), sizes, options)
                )
            for name, net, inputs in (("NCHW", model, batch), ("channels_last", nhwc,
                                                               batch.contiguous(memory_format=torch.channels_last))):
                result = time_case(net, inputs, sizes, originals, options, precision, device,
                                   workload.seconds_per_case / 2)
                rows.append({"memory_format": name, "precision": precision, "batch": batch_size,
                             "detections": detections, "forward_s": result["forward_s"],
                             "backbone": result["backbone"], "mask_head": result["mask_head"],
                             "fp32_boxes_matched": matched})
                log(f"{name} det {detections}: forward {result['forward_s'] * 1000:.0f} ms (backbone "
                    f"{result['backbone'] * 1000:.0f}, mask head {result['mask_head'] * 1000:.0f}); "
                    f"fp32 boxes matched within 0.5 px: {100 * matched:.1f}%")
    finally:
        del nhwc
    return rows


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
    """The service's worker without HTTP (``service.worker.Worker.start`` and its steps, in this
    thread, as the worker's own thread runs them) on the HTTP case's batches: what the service's
    device path costs against the model alone. Then the same with a second thread that keeps
    the interpreter busy as the server's post-processing threads and event loop do (COCO records
    and JSON of earlier answers), at a short GIL switch interval: a thread that launches
    thousands of small kernels waits for the lock at each of them. Then alone again with the
    batch's masks in one step instead of groups of images, lightest first."""
    from transfiner.service.engine.pipeline import RequestOptions, network_image
    from transfiner.service.engine.worker import Worker

    precision, batch_size = workload.precisions[0], workload.http_batch_size
    backend = TorchBackend(model, precision)
    worker = Worker(backend)
    default_group = backend.boxes_per_group
    cfg = model.cfg
    queued = [network_image(images[i % len(images)], images[i % len(images)].shape[:2], cfg.input)
              for i in range(batch_size)]
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
    # detections took 86 s on an H200 (README), and this part must not eat the run. Last, the
    # other grouping: the CPU's small groups (per-image steps at 100 detections) on a GPU, the
    # whole batch in one step on a CPU; what answering the lightest images first costs.
    other_group = CPU_BOXES_PER_GROUP if default_group != CPU_BOXES_PER_GROUP else 10**9
    cases = ((False, default_interval, default_group), (True, 0.0002, default_group),
             (False, default_interval, other_group))
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
                        while len(times) < 2 or (time.perf_counter() - begin < workload.seconds_per_case
                                                 and len(times) < 30):
                            times.append(one_batch(options)[0])
                finally:
                    sys.setswitchinterval(default_interval)
                    backend.boxes_per_group = default_group
                batch_s = float(np.median(times))
                row = {"precision": precision, "batch": batch_size, "detections": detections, "busy_thread": load,
                       "worker": "thread", "boxes_per_group": group, "mask_steps": max(groups),
                       "switch_interval_ms": interval * 1000, "batch_ms": batch_s * 1000,
                       "preprocess_ms": float(np.median(preprocess)) * 1000,
                       "images_per_s": batch_size / batch_s, "runs": len(times)}
                rows.append(row)
                log(f"worker det {detections}{' + busy thread' if load else ''} (switch {interval * 1000:g} ms, "
                    f"{max(groups)} mask steps): {row['images_per_s']:.1f} img/s, {row['batch_ms']:.0f} ms a batch")
    finally:
        worker.close()
    return rows


def bench_worker_process(workload: Workload, checkpoint: Path, cfg: ModelConfig, images, device, log) -> list[dict]:
    """``bench_worker``'s batches through the service's worker in a process of its own
    (``service.worker_process.ProcessWorker``, driven by an event loop as the batcher drives it),
    alone and beside the same busy Python thread, here in the server's process, at Python's
    default switch interval: the busy thread no longer shares an interpreter with the thread that
    launches the kernels."""
    import asyncio

    from transfiner.export.resolve import resolve_model
    from transfiner.service.engine.batcher import Job
    from transfiner.service.engine.pipeline import RequestOptions, network_image
    from transfiner.service.engine.worker import SegmentJob
    from transfiner.service.engine.worker_process import ProcessWorker, WorkerSpec

    precision, batch_size = workload.precisions[0], workload.http_batch_size
    queued = [network_image(images[i % len(images)], images[i % len(images)].shape[:2], cfg.input)
              for i in range(batch_size)]
    spec = WorkerSpec(resolve_model(str(checkpoint)), "pytorch", None, str(device), None, precision, None, 1,
                      batch_size if device.type == "cuda" else 1, sys.getswitchinterval() * 1000, "warning")
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
                        while len(times) < 2 or (time.perf_counter() - begin < workload.seconds_per_case
                                                 and len(times) < 30):
                            times.append((await one_batch(options))[0])
                    batch_s = float(np.median(times))
                    rows.append({"precision": precision, "batch": batch_size, "detections": detections,
                                 "busy_thread": load, "worker": "process",
                                 "switch_interval_ms": sys.getswitchinterval() * 1000, "batch_ms": batch_s * 1000,
                                 "preprocess_ms": float(np.median(preprocess)) * 1000,
                                 "images_per_s": batch_size / batch_s, "runs": len(times)})
                    log(f"worker process det {detections}{' + busy thread' if load else ''}: "
                        f"{batch_size / batch_s:.1f} img/s, {batch_s * 1000:.0f} ms a batch")
        finally:
            await asyncio.to_thread(worker.close)

    asyncio.run(measure())
    return rows


def bench_jpeg_decode(workload: Workload, images, device, log) -> list[dict]:
    """JPEG decoding as the server does it (Pillow, reduced DCT towards the network size, resize on
    the decode thread when shrinking; ``service.imaging.decode_image`` + ``pipeline.network_image``,
    one image per thread, a pool of every core) against nvJPEG (``torchvision.io.decode_jpeg`` on
    the device, a batch at a time, then ``model.preprocess.resize_image`` there): images/s for
    the workload's size and for 12-megapixel phone photos (4032x3024), so the service can take
    the GPU decoder where it measures faster."""
    import concurrent.futures

    from torchvision.io import decode_jpeg

    from transfiner.model.config import preset as config_preset
    from transfiner.model.inference.preprocess import network_shape, resize_image
    from transfiner.service.engine.pipeline import network_image
    from transfiner.service.imaging import decode_image

    cfg = config_preset(workload.config).input
    cores = os.cpu_count() or 1
    photo = np.asarray(Image.fromarray(images[0]).resize((4032, 3024), Image.BILINEAR))
    photo = np.clip(photo + np.random.default_rng(0).integers(-12, 13, photo.shape), 0, 255).astype(np.uint8)
    cases = {f"{workload.width}x{workload.height}": images[:8], "4032x3024": [photo] * 8}
    rows = []
    for name, arrays in cases.items():
        jpegs = []
        for rgb in arrays:
            buffer = io.BytesIO()
            Image.fromarray(rgb).save(buffer, "JPEG", quality=90)
            jpegs.append(buffer.getvalue())

        def on_cpu(data: bytes):
            decoded = decode_image(data, 100_000_000, reduce_to=lambda h, w: network_shape(h, w, cfg))
            return network_image(decoded.rgb, decoded.size, cfg)

        with concurrent.futures.ThreadPoolExecutor(cores) as pool:
            list(pool.map(on_cpu, jpegs))  # warm-up
            start = time.perf_counter()
            rounds = 0
            while rounds < 2 or time.perf_counter() - start < workload.seconds_per_case:
                list(pool.map(on_cpu, jpegs))
                rounds += 1
            cpu_rate = rounds * len(jpegs) / (time.perf_counter() - start)
        row = {"image": name, "jpeg_kib": sum(map(len, jpegs)) / len(jpegs) / 1024, "cpu_threads": cores,
               "cpu_images_per_s": cpu_rate, "device_images_per_s": None}
        if device.type == "cuda":
            encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]

            def on_device():
                decoded = decode_jpeg(encoded, device=device)
                for pixels in decoded:
                    resize_image(pixels, network_shape(*pixels.shape[-2:], cfg), device)
                sync(device)

            on_device()  # warm-up
            start = time.perf_counter()
            rounds = 0
            while rounds < 2 or time.perf_counter() - start < workload.seconds_per_case:
                on_device()
                rounds += 1
            row["device_images_per_s"] = rounds * len(jpegs) / (time.perf_counter() - start)
        rows.append(row)
        log(f"JPEG {name}: CPU ({cores} threads) {cpu_rate:.0f} img/s, "
            f"device {row['device_images_per_s'] or 0:.0f} img/s")
    return rows


def process_usage(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of one process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def child_pids(pid: int) -> list[int]:
    """The live children of a process (the service's model worker processes)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def server_cpu(pid: int) -> tuple[float, float, int]:
    """(CPU seconds of the server's own process, of its worker processes, the server's page
    faults) so far."""
    workers = 0.0
    for child in child_pids(pid):
        try:
            workers += process_usage(child)[0]
        except (FileNotFoundError, ProcessLookupError):
            pass
    seconds, faults = process_usage(pid)
    return seconds, workers, faults


def bench_http(
    workload: Workload, checkpoint: Path, image_dir: Path, work: Path, device: str, variant: HttpServer, log,
) -> list[dict]:
    """The same checkpoint behind ``transfiner serve``, loaded with ``transfiner bench``."""
    switch_interval_ms = variant.switch_interval_ms
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [*TRANSFINER, "serve", "--model", str(checkpoint), "--device", device, "--port", str(port),
         "--max-batch-size", str(workload.http_batch_size), "--max-queue-size", "256", "--log-level", "warning",
         "--workers", str(variant.workers)],
        stdout=server_log, stderr=subprocess.STDOUT,
        env=dict(os.environ, TRANSFINER_GIL_SWITCH_INTERVAL_MS=str(switch_interval_ms),
                 TRANSFINER_WORKER_PROCESS=str(variant.worker_process).lower()),
    )
    results = []
    try:
        wait_for_server(server, url, work / "server.log", timeout=180)
        for detections in sorted(workload.detections, reverse=True):
            for concurrency in variant.concurrency or workload.http_concurrency:
                before, started = server_cpu(server.pid), time.perf_counter()
                rows = http_step(workload, url, image_dir, work, detections, concurrency, variant, log)
                after, seconds = server_cpu(server.pid), time.perf_counter() - started
                for row in rows:
                    if "error" not in row:  # the step's one closed loop, warm-up requests included
                        answered = row["requests"] + http_warmup(workload)
                        row["server_cpu_ms_per_image"] = 1000 * (after[0] - before[0]) / answered
                        row["server_page_faults_per_image"] = (after[2] - before[2]) / answered
                        row["server_cpu_cores"] = (after[0] - before[0]) / seconds
                        row["worker_cpu_ms_per_image"] = 1000 * (after[1] - before[1]) / answered
                log(f"server process: {1000 * (after[0] - before[0]):.0f} ms CPU over {seconds:.1f} s; "
                    f"worker processes {1000 * (after[1] - before[1]):.0f} ms")
                results += rows
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()
    return results


def http_warmup(workload: Workload) -> int:
    """Requests each ``transfiner bench`` loop sends before it measures."""
    return 2 * workload.http_batch_size


def http_step(workload: Workload, url: str, image_dir: Path, work: Path, detections: int, concurrency: int,
              variant: HttpServer, log) -> list[dict]:
    """One ``transfiner bench`` closed loop against the running server. At least 6 requests a
    client, so the steady rate (``service.loadtest.report.steady_rate``: the loop full, neither
    filling nor draining) has a window of 4 requests a client."""
    step_out = work / f"http-{detections}-{concurrency}"
    command = [
        *TRANSFINER, "bench", "--url", url, "--images", str(image_dir), "--concurrency", str(concurrency),
        "--requests", str(max(workload.http_requests, 6 * concurrency)),
        "--warmup", str(http_warmup(workload)), "--param", "score_threshold=0",
        "--param", f"max_detections={detections}", "--out", str(step_out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        log(f"http det {detections} c={concurrency}: failed: {done.stderr.strip()[-400:]}\nserver log:\n"
            + (work / "server.log").read_text()[-2000:])
        return [{"detections": detections, "concurrency": concurrency, "error": done.stderr.strip()[-400:]}]
    report = json.loads((step_out / "report.json").read_text())
    card = (report["target"].get("models") or [{}])[0]
    rows = []
    for step in report["steps"]:
        rows.append({
            "detections": detections, "switch_interval_ms": variant.switch_interval_ms, "worker": variant.name,
            "concurrency": step["concurrency"], "ok": step["ok"], "requests": step["requests"],
            "images_per_s": step["images_per_s"], "steady_images_per_s": step.get("steady_images_per_s"),
            "p50_ms": (step.get("latency") or {}).get("p50_s", 0) * 1000,
            "p99_ms": (step.get("latency") or {}).get("p99_s", 0) * 1000,
            "precision": card.get("precision"), "server": step.get("server") or {},
        })
        steady = step.get("steady_images_per_s")
        log(f"http det {detections} c={step['concurrency']} switch {variant.switch_interval_ms:g} ms, worker "
            f"{variant.name}: {step['images_per_s']:.1f} img/s, steady {steady or 0:.1f} "
            f"({step['ok']}/{step['requests']} ok), precision {card.get('precision')}")
    return rows


def share_of_in_process(report: dict, precision: str, batch: int, detections: int, images_per_s: float) -> str:
    """``images_per_s`` as a share of the in-process figure of the same case, or "-"."""
    same = next((r for r in report["in_process"] if r.get("precision") == precision and r.get("batch") == batch
                 and r.get("detections") == detections and "error" not in r), None)
    return f"{100 * images_per_s / same['images_per_s']:.0f}%" if same else "-"


def _ms(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def _mean_ms(row: dict, metric: str) -> str:
    """The mean of one of the server's time histograms in an HTTP row, in ms."""
    values = row.get("server", {}).get(metric) or {}
    return "-" if values.get("mean_s") is None else f"{1000 * values['mean_s']:.1f}"


def _server_cpu(row: dict) -> str:
    if row.get("server_cpu_ms_per_image") is None:
        return "-"
    faults = row.get("server_page_faults_per_image")
    return (f"{row['server_cpu_ms_per_image']:.1f} ({row['server_cpu_cores']:.2f})"
            + ("" if faults is None else f", {faults:.0f} faults"))


def _tflops(value: float | None) -> str:
    return f"{value:.0f} TFLOP/s" if value else "not measured"


def markdown(report: dict) -> str:
    lines = [
        f"# GPU benchmark: {report['config']} at {report['image'][0]}x{report['image'][1]}, {report['device_name']}",
        "",
        f"{report['date']}, torch {report['torch']}; score threshold 0, every detection refined. "
        f"Measured matmul peak: bf16 {_tflops(report['matmul_tflops'].get('bf16'))}, "
        f"fp32 {_tflops(report['matmul_tflops'].get('fp32'))}.",
        "",
        "## In-process (per batch, median)",
        "",
        "| precision | batch | det/img | img/s | forward ms | backbone | RPN | box head | box inference "
        "| mask head | refiner | refined tokens/box | refiner TFLOP/s (% of peak) | post-process ms | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["in_process"]:
        if "error" in r:
            lines.append(f"| {r['precision']} | {r['batch']} | {r['detections']} | error: {r['error'][:80]} |")
            continue
        ms = {k: r[k] * 1000 for k in ("forward_s", "backbone", "rpn", "box_head", "box_inference", "mask_head",
                                        "refiner", "postprocess_s")}
        share = f" ({100 * r['refiner_share_of_peak']:.0f}%)" if r.get("refiner_share_of_peak") else ""
        tflops = f"{r['refiner_tflops']:.0f}{share}" if r.get("refiner_tflops") else "-"
        peak = f"{r['peak_gpu_gib']:.1f}" if r.get("peak_gpu_gib") is not None else "-"
        lines.append(
            f"| {r['precision']} | {r['batch']} | {r['detections']} | {r['images_per_s']:.1f} | {ms['forward_s']:.0f} "
            f"| {ms['backbone']:.0f} | {ms['rpn']:.0f} | {ms['box_head']:.0f} | {ms['box_inference']:.1f} "
            f"| {ms['mask_head']:.0f} | {ms['refiner']:.0f} | {r['refiner_tokens'] / max(r['detections_found'], 1):.0f} "
            f"| {tflops} | {ms['postprocess_s']:.1f} | {peak} |"
        )
    if report.get("worker"):
        lines += ["", "## The service's worker without HTTP (batch of the HTTP case)", "",
                  "| det/img | model worker | mask steps a batch | busy Python thread | GIL switch interval ms | img/s "
                  "| ms a batch | of which pre-processing | vs in-process |",
                  "|---:|---|---:|---|---:|---:|---:|---:|---:|"]
        for w in report["worker"]:
            ratio = share_of_in_process(report, w["precision"], w["batch"], w["detections"], w["images_per_s"])
            pre = f"{w['preprocess_ms']:.0f}" if "preprocess_ms" in w else "-"
            lines.append(f"| {w['detections']} | {w.get('worker', 'thread')} | {w.get('mask_steps', '-')} "
                         f"| {'yes' if w['busy_thread'] else 'no'} "
                         f"| {w['switch_interval_ms']:g} | {w['images_per_s']:.1f} | {w['batch_ms']:.0f} | {pre} "
                         f"| {ratio} |")
    if report.get("http"):
        lines += [
            "", f"## HTTP (`transfiner serve --max-batch-size {report['http_batch_size']}`, `transfiner bench`, "
            f"{report['image'][1]}x{report['image'][0]} PNGs)", "",
            "| det/img | clients | GIL switch interval ms | model worker | precision | ok | img/s | p50 ms | p99 ms "
            f"| vs in-process batch {report['http_batch_size']} | steady img/s | steady vs in-process "
            "| decode ms (mean) | pre-processing ms a batch (mean) | server process CPU ms/img (cores), page faults/img "
            "| worker processes CPU ms/img |",
            "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for h in report["http"]:
            if "error" in h:
                lines.append(f"| {h['detections']} | {h.get('concurrency', '')} | | error: {h['error'][:100]} |")
                continue
            ratio = share_of_in_process(
                report, h["precision"], report["http_batch_size"], h["detections"], h["images_per_s"]
            )
            steady = h.get("steady_images_per_s")
            steady_ratio = share_of_in_process(
                report, h["precision"], report["http_batch_size"], h["detections"], steady
            ) if steady else "-"
            lines.append(
                f"| {h['detections']} | {h['concurrency']} | {h.get('switch_interval_ms', 5):g} "
                f"| {h.get('worker', 'thread')} | {h['precision']} "
                f"| {h['ok']}/{h['requests']} "
                f"| {h['images_per_s']:.1f} | {h['p50_ms']:.0f} | {h['p99_ms']:.0f} | {ratio} "
                f"| {f'{steady:.1f}' if steady else '-'} | {steady_ratio} | {_mean_ms(h, 'decode')} "
                f"| {_mean_ms(h, 'preprocess')} | {_server_cpu(h)} "
                f"| {_ms(h.get('worker_cpu_ms_per_image')) if h.get('worker') != 'thread' else '-'} |"
            )
        lines += ["", "(steady: answers per second while the closed loop was full, leaving out its filling "
                  "and draining; `transfiner bench`'s steady img/s. Decode: an upload's time on its decode "
                  "thread; pre-processing: a batch's, on the worker's device, from the server's metrics. "
                  "Server process CPU: HTTP, decoding and post-processing, and with a worker thread the "
                  "model's host side too, per answered image (warm-up included), and in cores while the loop "
                  "ran. One Python interpreter holds the GIL for most of it, so its ms per image bound the "
                  "rate.)"]
    compiled = report.get("compile")
    if compiled:
        lines += [
            "", f"## `torch.compile` of the refiner's encoder layers ({compiled['precision']}, batch "
            f"{compiled['batch']}, {compiled['detections']} detections; a measurement, the model runs eager)", "",
            "| | mask head ms | refiner ms |", "|---|---:|---:|",
            f"| eager | {compiled['eager_mask_head_s'] * 1000:.0f} | {compiled['eager_refiner_s'] * 1000:.0f} |",
            f"| compiled (dynamic shapes) | {compiled['compiled_mask_head_s'] * 1000:.0f} "
            f"| {compiled['compiled_refiner_s'] * 1000:.0f} |", "",
            f"First compiled forward pass: {compiled['first_forward_s']:.1f} s. Largest change of a mask "
            f"probability: {compiled['max_mask_prob_change']:.2e}.",
        ]
    profile = report.get("profile")
    if profile:
        lines += [
            "", f"## Where one forward pass spends its time ({profile['precision']}, batch {profile['batch']}, "
            f"{profile['detections']} detections, torch.profiler)", "",
            f"Wall {profile['wall_ms']:.0f} ms (profiled); operators busy on the device for "
            f"{profile['device_busy_ms']:.0f} ms; {profile['kernel_launches']} kernel launches, "
            f"{profile['aten_calls']} aten calls.", "",
            "| operator | calls | self ms | share of busy time |", "|---|---:|---:|---:|",
        ]
        for row in profile["top"]:
            share = f"{100 * row['share']:.1f}%" if row["share"] is not None else "-"
            lines.append(f"| `{row['op']}` | {row['calls']} | {row['self_ms']:.1f} | {share} |")
    if report.get("nms"):
        lines += ["", "## NMS layouts (synthetic boxes shaped like the model's)", "",
                  "| case | layout | batch | boxes | groups | ms | keeps the same boxes |", "|---|---|---:|---:|---:|---:|---|"]
        for n in report["nms"]:
            lines.append(f"| {n['case']} | {n['layout']} | {n['batch']} | {n['boxes']} | {n['groups']} | {n['ms']:.1f} "
                         f"| {'yes' if n['same_as_one_call'] else 'NO'} |")
    if report.get("refiner_variants"):
        lines += ["", "## The refiner's encoder, run different ways (the largest in-process case)", "",
                  "| variant | forward ms | mask head ms | refiner ms | largest mask probability change |",
                  "|---|---:|---:|---:|---:|"]
        for v in report["refiner_variants"]:
            if "error" in v:
                lines.append(f"| {v['variant']} | failed: {v['error'][:90]} | | | |")
            else:
                lines.append(f"| {v['variant']} | {v['forward_s'] * 1000:.0f} | {v['mask_head_s'] * 1000:.0f} "
                             f"| {v['refiner_s'] * 1000:.0f} | {v['max_mask_prob_change']:.1e} |")
    if report.get("chunks"):
        lines += ["", "## Tokens per refinement pass (the largest in-process case)", "",
                  "| tokens per chunk | boxes per chunk (mean) | mask head ms | refiner ms | forward ms | peak GiB |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for c in report["chunks"]:
            peak = f"{c['peak_gpu_gib']:.1f}" if c.get("peak_gpu_gib") is not None else "-"
            lines.append(f"| {c['tokens_per_chunk']} | {c['boxes_per_chunk']:.0f} | {c['mask_head_s'] * 1000:.0f} "
                         f"| {c['refiner_s'] * 1000:.0f} | {c['forward_s'] * 1000:.0f} | {peak} |")
    if report.get("attention"):
        lines += ["", "## Key-masked attention, 64 boxes x 4 heads x 2788 tokens x 64, bf16", "",
                  "| variant | ms | TFLOP/s | max abs error vs fp32 |", "|---|---:|---:|---:|"]
        for a in report["attention"]:
            if "error" in a:
                lines.append(f"| {a['variant']} | unsupported: {a['error'][:90]} | | |")
            else:
                lines.append(f"| {a['variant']} | {a['ms']:.2f} | {a['tflops']:.0f} | {a['max_abs_error']:.4f} |")
    if report.get("memory_format"):
        lines += ["", "## Channels-last convolutions (a measurement; the model runs NCHW)", "",
                  "| memory format | det/img | forward ms | backbone ms | mask head ms | fp32 boxes within 0.5 px of NCHW's |",
                  "|---|---:|---:|---:|---:|---:|"]
        for m in report["memory_format"]:
            lines.append(f"| {m['memory_format']} | {m['detections']} | {m['forward_s'] * 1000:.0f} "
                         f"| {m['backbone'] * 1000:.0f} | {m['mask_head'] * 1000:.0f} | {100 * m['fp32_boxes_matched']:.1f}% |")
    if report.get("jpeg"):
        lines += ["", "## JPEG decoding to the network input (CPU threads vs nvJPEG)", "",
                  "| image | JPEG KiB | CPU threads | CPU img/s (Pillow, reduced DCT) | GPU img/s (decode_jpeg, batch 8) |",
                  "|---|---:|---:|---:|---:|"]
        for j in report["jpeg"]:
            gpu = f"{j['device_images_per_s']:.0f}" if j.get("device_images_per_s") else "-"
            lines.append(f"| {j['image']} | {j['jpeg_kib']:.0f} | {j['cpu_threads']} | {j['cpu_images_per_s']:.0f} | {gpu} |")
    if report.get("errors"):
        lines += ["", "## Errors", ""] + [f"* {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    """bench_gpu.png: images/s at each detection count, in-process (batch 1 and the HTTP batch
    size, the service's precision) beside every HTTP server and client count; and where one
    in-process forward pass spends its time. False where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    precision = report["in_process"][0]["precision"] if report["in_process"] else None
    rows = [r for r in report["in_process"] if r.get("precision") == precision and "error" not in r]
    detections = sorted({r["detections"] for r in rows} | {h["detections"] for h in report.get("http") or []})
    if not detections:
        return False
    fig, (rates, stages) = plt.subplots(1, 2, figsize=(13, 4.8))
    bars: dict[str, dict[int, float]] = {}
    for r in sorted(rows, key=lambda r: r["batch"]):
        bars.setdefault(f"in-process, batch {r['batch']}", {})[r["detections"]] = r["images_per_s"]
    for h in report.get("http") or []:
        bars.setdefault(f"HTTP, {h['worker']}, {h['concurrency']} clients", {})[h["detections"]] = h["images_per_s"]
    width = 0.8 / max(len(bars), 1)
    for i, (name, values) in enumerate(bars.items()):
        xs = [detections.index(d) + (i - (len(bars) - 1) / 2) * width for d in values]
        rates.bar(xs, list(values.values()), width, label=name, hatch="" if name.startswith("in-process") else "//")
    rates.set_xticks(range(len(detections)), [f"{d} detections/image" for d in detections])
    rates.set(ylabel="images/s", title=f"{report['device_name']}, {precision}")
    rates.legend(fontsize=7)
    rates.grid(axis="y", alpha=0.3)
    names = ("backbone", "rpn", "box_head", "box_inference", "mask_head")
    labels = [f"b{r['batch']} x {r['detections']}" for r in rows]
    bottom = np.zeros(len(rows))
    for name in names:
        ms = np.array([r.get(name, 0.0) * 1000 for r in rows])
        stages.bar(labels, ms, bottom=bottom, label=name.replace("_", " "))
        bottom += ms
    stages.set(ylabel="ms a forward pass", title="in-process stages (batch x detections/image)")
    stages.legend(fontsize=7)
    stages.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


PARTS = ("attention", "in-process", "worker", "http", "profile", "nms", "refiner", "chunks", "memory-format", "jpeg",
         "compile")
# Parts whose question an H200 has answered (docs/gpu-performance.md) run only when named, so
# the default run stays under 6 minutes there: the token sweep (gpu_tokens_per_chunk),
# channels-last and nvJPEG (no gain for the model, not needed by the server), torch.compile.
DECIDED_PARTS = ("chunks", "memory-format", "jpeg", "compile")
DEFAULT_PARTS = tuple(part for part in PARTS if part not in DECIDED_PARTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and images, for the CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", default="bench-results/gpu", help="bench_gpu.json and bench_gpu.md go here")
    parser.add_argument("--work", default=None, help="images, checkpoint, server log, load-test reports "
                        "(default: OUT/work)")
    parser.add_argument("--no-http", action="store_true", help="in-process only")
    parser.add_argument("--parts", default=None, help="comma-separated subset of: " + ",".join(PARTS)
                        + " (default: all but " + ",".join(DECIDED_PARTS) + "); e.g. a rerun of what a run cut short missed")
    parser.add_argument("--plot", default=None, metavar="BENCH_GPU_JSON",
                        help="only draw bench_gpu.png next to an earlier run's bench_gpu.json")
    parser.add_argument("--http-servers", default=None,
                        help="comma-separated indices into the workload's HTTP servers (default: thread and "
                        "process; 2 adds two worker processes on one card)")
    args = parser.parse_args()
    if args.plot:
        source = Path(args.plot)
        return 0 if plot(json.loads(source.read_text()), source.with_suffix(".png")) else 1

    workload = QUICK if args.quick else FULL
    parts = set(args.parts.split(",") if args.parts else DEFAULT_PARTS)
    if unknown := parts - set(PARTS):
        parser.error(f"unknown parts: {sorted(unknown)}")
    chosen_servers = workload.default_http_servers if args.http_servers is None else args.http_servers
    servers = tuple(workload.http_servers[int(i)] for i in chosen_servers.split(","))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {message}", flush=True)

    report: dict = {
        "config": workload.config, "image": [workload.height, workload.width], "date": time.strftime("%Y-%m-%d"),
        "device": str(device), "torch": torch.__version__, "http_batch_size": workload.http_batch_size,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "matmul_tflops": {}, "in_process": [], "errors": [],
    }

    def save() -> None:
        """After every part, so a run cut short still leaves what it measured."""
        report["seconds"] = time.perf_counter() - began
        (out / "bench_gpu.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "bench_gpu.md").write_text(markdown(report))
        plot(report, out / "bench_gpu.png")

    def attempt(name: str, fn):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - later parts still run and the report is written
            report["errors"].append(f"{name}: {type(error).__name__}: {error}")
            log(f"{name} failed:\n{traceback.format_exc()}")
            return None
        finally:
            save()

    torch.manual_seed(0)
    images = make_images(workload, 8, work / "images")
    model = MaskTransfiner(preset(workload.config)).eval()
    calibration, _ = prepare_batch([torch.from_numpy(images[0]).permute(2, 0, 1)], model.cfg.input, "cpu")
    calibrate_frozen_bn(model, calibration)
    checkpoint = work / "random-calibrated.pth"
    save_checkpoint(checkpoint, model)  # the same weights in-process and behind HTTP
    model = build_model(model.cfg, checkpoint, device)
    log(f"model ready on {report['device_name']}")

    if device.type == "cuda":  # a few seconds; every part that reports TFLOP/s compares with it
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            report["matmul_tflops"][name] = attempt(f"matmul peak {name}", lambda: matmul_peak(device, dtype))
    if device.type == "cuda" and "attention" in parts:
        report["attention"] = attempt("attention", lambda: bench_attention(device, log))

    def in_process(precisions: tuple[str, ...]) -> None:
        rows = attempt(f"in-process {precisions}", lambda: bench_in_process(
            workload, precisions, model, images, device, report["matmul_tflops"], log))
        report["in_process"] += rows or []
        save()

    # The service's precision (auto) first; then the short measurements (a few seconds each,
    # and twice cut off when they came after HTTP); then the worker and HTTP; then the rest.
    if "in-process" in parts:
        in_process(workload.precisions[:1])
    if "profile" in parts:
        report["profile"] = attempt("profile", lambda: bench_profile(workload, model, images, device, log))
    if "nms" in parts:
        report["nms"] = attempt("nms", lambda: bench_nms(workload, device, log))
    if "refiner" in parts:
        report["refiner_variants"] = attempt("refiner variants",
                                             lambda: bench_refiner_variants(workload, model, images, device, log))
    if "memory-format" in parts:
        report["memory_format"] = attempt("memory format",
                                          lambda: bench_channels_last(workload, model, images, device, log))
    if "jpeg" in parts:
        report["jpeg"] = attempt("jpeg", lambda: bench_jpeg_decode(workload, images, device, log))
    if "worker" in parts:
        report["worker"] = attempt("worker", lambda: bench_worker(workload, model, images, device, log))
        report["worker"] = (report["worker"] or []) + (attempt("worker process", lambda: bench_worker_process(
            workload, checkpoint, model.cfg, images, device, log)) or [])
    if "http" in parts and not args.no_http:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the server shares the card
        report["http"] = []
        for variant in servers:
            name = f"http (switch {variant.switch_interval_ms:g} ms, {variant.name})"
            report["http"] += attempt(name, lambda: bench_http(  # noqa: B023
                workload, checkpoint, work / "images", work, str(device), variant, log)) or []
    if "in-process" in parts:
        in_process(workload.precisions[1:])
    if "chunks" in parts:
        report["chunks"] = attempt("chunks", lambda: bench_chunks(workload, model, images, device, log))
    save()
    # Last: compiling can take a minute, and a run cut short keeps everything before it.
    if "compile" in parts:
        report["compile"] = attempt("compile", lambda: bench_compile(workload, model, images, device, log))
    checkpoint.unlink(missing_ok=True)
    save()
    print(markdown(report))
    log(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.md'}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
