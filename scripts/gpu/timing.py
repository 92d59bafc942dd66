"""Timing the model in-process: its stages, its refiner's chunks, and the card's matmul peak."""

from __future__ import annotations

import time

import numpy as np
import torch

from scripts.gpu.workload import Case
from transfiner.model.config import ModelConfig
from transfiner.model.inference.detections import image_detections
from transfiner.model.inference.precision import autocast
from transfiner.model.inference.rle import masks_to_rle
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.modeling.refiner import CONTEXT_SIZE


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall-clock time of the model's stages, from hooks on its own modules.

    - The benchmark so times the real ``MaskTransfiner.forward``, not a copy of it.
    - Gaps between modules are the stages that are methods: RPN proposals (after the backbone)
      and box inference (before the mask head).
    - CUDA events keep the GPU running; the times are read after the forward pass.
    """

    MARKS = ("start", "backbone", "rpn", "box_head", "box_inference", "mask_head")

    def __init__(self, model: MaskTransfiner, device: torch.device) -> None:
        self.device = device
        self.marks: dict[str, object] = {}
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


class ChunkRecorder:
    """(boxes, padded sequence length) of every refiner chunk of the last forward pass."""

    def __init__(self, model: MaskTransfiner) -> None:
        self.refiner = model.mask_head.refiner
        self.plan = self.refiner.chunks
        self.chunks: list[tuple[int, int]] = []

        def recorded(incoherence):
            planned = self.plan(incoherence)
            self.chunks.extend(
                (len(index), CONTEXT_SIZE**2 + sum(level.nodes.shape[1] for level in levels))
                for index, levels in planned
            )
            return planned

        self.refiner.chunks = recorded

    def close(self) -> None:
        del self.refiner.chunks


def refiner_flops(cfg: ModelConfig, chunks: list[tuple[int, int]]) -> float:
    """Model FLOPs of refining ``chunks`` [(boxes, padded sequence length)] as the refiner ran them.

    - Node encoder, sequence encoder (attention counted as QK^T and PV), pixel decoder.
    - Matmuls only; 2 FLOPs per multiply-add.
    """
    t = cfg.transfiner
    d, ff, c = t.d_model, t.dim_feedforward, cfg.fpn.out_channels
    total = 0.0
    for boxes, length in chunks:
        per_layer = 2 * length * d * 3 * d + 4 * length * length * d + 2 * length * d * d + 4 * length * d * ff
        encoder = 2 * length * (c + 1) * d
        decoder = 2 * length * d * d + 2 * length * d
        total += boxes * (t.num_layers * per_layer + encoder + decoder)
    return total


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


def time_case(
    model: MaskTransfiner, case: Case, device: torch.device, seconds: float, postprocess: bool = True
) -> dict:
    """Median per-batch time and stages of one case, and its peak memory.

    - Runs for about ``seconds``: at least 2 batches, at most 50.
    - ``postprocess``: also each image's detections and RLE masks, as the Predictor makes them.
    """
    originals = case.originals if postprocess else []
    timer = StageTimer(model, device)
    recorder = ChunkRecorder(model)
    try:
        with torch.inference_mode(), autocast(case.precision, device):
            raw = model(case.batch, case.sizes, case.options)  # warm-up (and the detection count check)
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runs = []
            begin = time.perf_counter()
            while len(runs) < 2 or (time.perf_counter() - begin < seconds and len(runs) < 50):
                timer.start()
                recorder.chunks = []
                start = time.perf_counter()
                raw = model(case.batch, case.sizes, case.options)
                sync(device)
                forward_s = time.perf_counter() - start
                stages = timer.stages()
                start = time.perf_counter()
                for i, original in enumerate(originals):
                    detections = image_detections(raw, i, case.sizes[i], original)
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
