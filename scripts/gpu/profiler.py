"""One forward pass under ``torch.profiler``: device busy time, kernel launches, the costliest operators."""

from __future__ import annotations

import time

import torch

from scripts.gpu.timing import sync
from scripts.gpu.workload import Workload, largest_case
from transfiner.model.inference.precision import autocast
from transfiner.model.modeling.rcnn import MaskTransfiner


def bench_profile(workload: Workload, model: MaskTransfiner, images, device, log, top: int = 15) -> dict:
    """One forward pass of the largest case, at the service's precision, under ``torch.profiler``.

    - How much of its wall time the device spends in kernels (the rest is the host launching
      them or waiting), and how many kernels it launches.
    - The ``top`` operators by device time.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    case = largest_case(workload, model, images, device)
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch.inference_mode(), autocast(case.precision, device):
        model(case.batch, case.sizes, case.options)  # warm-up
        sync(device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            model(case.batch, case.sizes, case.options)
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
        "precision": case.precision,
        "batch": case.batch_size,
        "detections": case.detections,
        "wall_ms": wall_s * 1000,
        "device_busy_ms": busy_us / 1000,
        "kernel_launches": launches,
        "aten_calls": aten_calls,
        "top": [
            {
                "op": event.key,
                "calls": event.count,
                "self_ms": self_time_us(event) / 1000,
                "share": self_time_us(event) / busy_us if busy_us else None,
            }
            for event in rows
        ],
    }
    log(
        f"profile {case.precision} batch {case.batch_size} det {case.detections}: wall {wall_s * 1000:.0f} ms, "
        f"device busy {busy_us / 1000:.0f} ms, {launches} kernel launches, {aten_calls} aten calls"
    )
    return result
