"""The refiner's encoder run different ways, side by side at the largest case."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from scripts.gpu.timing import time_case
from scripts.gpu.workload import Workload, largest_case
from transfiner.model.inference.precision import autocast
from transfiner.model.modeling.rcnn import MaskTransfiner


def bench_refiner_variants(workload: Workload, model: MaskTransfiner, images, device, log) -> list[dict]:
    """Ways to run the refiner's encoder, at the largest case and the service's precision.

    - The model as it is.
    - The feed-forward ReLU separate from its matmul (as before ``linear_relu``).
    - The layers on packed real tokens with FlashAttention's variable-length kernel
      (``SequenceEncoder.packed``, off by default).
    - Each with the largest change of a mask probability against the model as it is.
    """
    import transfiner.model.modeling.refiner as refiner_module

    case = largest_case(workload, model, images, device)
    encoder = model.mask_head.refiner.sequence_encoder
    fused = refiner_module.linear_relu

    @contextlib.contextmanager
    def separate_relu():
        refiner_module.linear_relu = lambda linear, x: F.relu(linear(x))
        try:
            yield
        finally:
            refiner_module.linear_relu = fused

    @contextlib.contextmanager
    def packed():
        encoder.packed = True
        try:
            yield
        finally:
            encoder.packed = False

    def masks() -> torch.Tensor:
        with torch.inference_mode(), autocast(case.precision, device):
            return model(case.batch, case.sizes, case.options).mask_probs.float()

    reference = masks()
    rows = []
    for name, variant in (
        ("the model", contextlib.nullcontext),
        ("separate ReLU", separate_relu),
        ("packed attention", packed),
    ):
        try:
            with variant():
                change = float((masks() - reference).abs().max()) if reference.numel() else 0.0
                result = time_case(model, case, device, workload.seconds_per_case, postprocess=False)
        except Exception as error:  # noqa: BLE001 - an unsupported kernel is a result too
            rows.append({"variant": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"})
            log(f"refiner variant {name}: {rows[-1]['error']}")
            continue
        rows.append(
            {
                "variant": name,
                "precision": case.precision,
                "batch": case.batch_size,
                "detections": case.detections,
                "forward_s": result["forward_s"],
                "mask_head_s": result["mask_head"],
                "refiner_s": result["refiner"],
                "peak_gpu_gib": result["peak_gpu_gib"],
                "max_mask_prob_change": change,
            }
        )
        log(
            f"refiner variant {name}: forward {result['forward_s'] * 1000:.0f} ms, refiner "
            f"{result['refiner'] * 1000:.0f} ms, masks moved by at most {change:.1e}"
        )
    return rows
