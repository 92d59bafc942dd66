"""GPU benchmark: in-process model and HTTP service on one card, in a few minutes.

R50-FPN with random weights (FrozenBN calibrated, so the random network yields distinct boxes)
at 800x1333, score threshold 0 so every image has exactly the asked number of detections, all
refined. In this order (each part a module of ``scripts.gpu``):

- the card's matmul peak and the key-masked attention kernels side by side (``attention``);
- in-process at the service's precision, 10 and 100 detections, batch 1 and 8, with per-stage
  times (CUDA events around the model's own modules), peak GPU memory and the refiner's achieved
  TFLOP/s (``in_process``);
- one forward pass under torch.profiler (``profiler``); NMS layouts (``nms``); the refiner's
  encoder run different ways (``refiner``);
- the service's worker on the same batches without HTTP: alone, beside a busy Python thread, in a
  process of its own (``worker``);
- the same checkpoint behind ``transfiner serve`` loaded by ``transfiner bench`` with the same
  images, a worker thread and a worker process (``http_service``);
- fp32 in-process.

    python -m scripts.bench_gpu --out bench-results/gpu            # on a GPU machine, ~6 minutes
    python -m scripts.bench_gpu --quick --out bench-results/gpu    # small, on the CPU

Writes ``bench_gpu.json``, ``bench_gpu.md`` and ``bench_gpu.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch

from scripts.bench_model import calibrate_frozen_bn
from scripts.gpu.attention import bench_attention
from scripts.gpu.http_service import bench_http
from scripts.gpu.in_process import bench_in_process
from scripts.gpu.nms import bench_nms
from scripts.gpu.plot import plot
from scripts.gpu.profiler import bench_profile
from scripts.gpu.refiner import bench_refiner_variants
from scripts.gpu.report import markdown
from scripts.gpu.timing import matmul_peak
from scripts.gpu.worker import bench_worker, bench_worker_process
from scripts.gpu.workload import FULL, QUICK, make_images
from scripts.results import write_report
from transfiner.model.config import preset
from transfiner.model.inference.preprocess import prepare_batch
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.weights.checkpoint import build_model, save_checkpoint

PARTS = ("attention", "in-process", "worker", "http", "profile", "nms", "refiner")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and images, for the CPU")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--out", default="bench-results/gpu", help="bench_gpu.json and bench_gpu.md go here")
    parser.add_argument(
        "--work", default=None, help="images, checkpoint, server log, load-test reports (default: OUT/work)"
    )
    parser.add_argument("--no-http", action="store_true", help="in-process only")
    parser.add_argument(
        "--parts",
        default=None,
        help="comma-separated subset of: "
        + ",".join(PARTS)
        + " (default: all); e.g. a rerun of what a run cut short missed",
    )
    parser.add_argument(
        "--plot",
        default=None,
        metavar="BENCH_GPU_JSON",
        help="only draw bench_gpu.png next to an earlier run's bench_gpu.json",
    )
    parser.add_argument(
        "--http-servers",
        default=None,
        help="comma-separated indices into the workload's HTTP servers (default: thread and "
        "process; 2 adds two worker processes on one card)",
    )
    args = parser.parse_args()
    args.parts = set(args.parts.split(",") if args.parts else PARTS)
    if unknown := args.parts - set(PARTS):
        parser.error(f"unknown parts: {sorted(unknown)}")
    return args


def main() -> int:
    args = parse_args()
    if args.plot:
        source = Path(args.plot)
        return 0 if plot(json.loads(source.read_text()), source.with_suffix(".png")) else 1

    workload = QUICK if args.quick else FULL
    parts = args.parts
    chosen_servers = workload.default_http_servers if args.http_servers is None else args.http_servers
    servers = tuple(workload.http_servers[int(i)] for i in chosen_servers.split(","))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {message}", flush=True)

    report: dict = {
        "config": workload.config,
        "image": [workload.height, workload.width],
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "torch": torch.__version__,
        "http_batch_size": workload.http_batch_size,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "matmul_tflops": {},
        "in_process": [],
        "errors": [],
    }

    def save() -> None:
        """After every part, so a run cut short still leaves what it measured."""
        report["seconds"] = time.perf_counter() - began
        write_report(out, "bench_gpu", report, markdown(report))
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
            report["matmul_tflops"][name] = attempt(f"matmul peak {name}", partial(matmul_peak, device, dtype))
    if device.type == "cuda" and "attention" in parts:
        report["attention"] = attempt("attention", lambda: bench_attention(device, log))

    def in_process(precisions: tuple[str, ...]) -> None:
        rows = attempt(
            f"in-process {precisions}",
            lambda: bench_in_process(workload, precisions, model, images, device, report["matmul_tflops"], log),
        )
        report["in_process"] += rows or []
        save()

    # The service's precision (auto) first; then the short measurements (a few seconds each,
    # and twice cut off when they came after HTTP); then the worker and HTTP; then fp32.
    if "in-process" in parts:
        in_process(workload.precisions[:1])
    if "profile" in parts:
        report["profile"] = attempt("profile", lambda: bench_profile(workload, model, images, device, log))
    if "nms" in parts:
        report["nms"] = attempt("nms", lambda: bench_nms(workload, device, log))
    if "refiner" in parts:
        report["refiner_variants"] = attempt(
            "refiner variants", lambda: bench_refiner_variants(workload, model, images, device, log)
        )
    if "worker" in parts:
        report["worker"] = attempt("worker", lambda: bench_worker(workload, model, images, device, log))
        report["worker"] = (report["worker"] or []) + (
            attempt(
                "worker process", lambda: bench_worker_process(workload, checkpoint, model.cfg, images, device, log)
            )
            or []
        )
    if "http" in parts and not args.no_http:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the server shares the card
        report["http"] = []
        for variant in servers:
            name = f"http (switch {variant.switch_interval_ms:g} ms, {variant.name})"
            report["http"] += (
                attempt(
                    name, partial(bench_http, workload, checkpoint, work / "images", work, str(device), variant, log)
                )
                or []
            )
    if "in-process" in parts:
        in_process(workload.precisions[1:])
    checkpoint.unlink(missing_ok=True)
    save()
    print(markdown(report))
    log(f"wrote {out / 'bench_gpu.json'} and {out / 'bench_gpu.md'}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
