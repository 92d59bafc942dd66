"""``transfiner export --format {onnx,torchscript,tensorrt} --model M --out DIR``.

Writes the model file and ``metadata.json`` into DIR, then (unless ``--no-check``) runs the
exported file in its runtime on a fresh input unlike the tracing example and compares it with
eager PyTorch. ``--format tensorrt`` writes the ONNX file, checks its operators against
TensorRT's support matrix and says how to build the engine: TensorRT is not installed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from transfiner.cli.arguments import add_max_cells_argument, add_model_arguments, model_from_args
from transfiner.export.resolve import resolve_model, runtime_for


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", required=True, choices=["onnx", "torchscript", "tensorrt"])
    add_model_arguments(parser)
    parser.set_defaults(device="cpu")
    parser.add_argument("--out", required=True, help="output folder (model file + metadata.json)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17; 17 to 21)")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check against eager PyTorch")
    add_max_cells_argument(parser)  # the graph's shapes are static: its caps are chosen here


def parity_check(model, fmt: str, out: Path) -> dict:
    """Eager vs the exported file on two seeded images of sizes the trace never saw."""
    from transfiner.export.backends import load_backend
    from transfiner.model.inference.backend import TorchBackend
    from transfiner.model.inference.preprocess import prepare_batch
    from transfiner.model.modeling.rcnn import InferenceOptions

    runtime = load_backend(out, runtime_for(fmt), device=model.device)
    generator = torch.Generator().manual_seed(1)
    images = [(torch.rand(3, h, w, generator=generator) * 255).to(torch.uint8) for h, w in ((211, 317), (290, 180))]
    batch, sizes = prepare_batch(images, model.cfg.input, model.device)
    options = InferenceOptions(score_threshold=0.0, max_detections=5)
    expected = TorchBackend(model).infer(batch, sizes, options)
    got = runtime.infer(batch, sizes, options)
    return compare_outputs(expected, got)


def mask_iou(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-instance IoU of two [N, S, S] probability stacks at ``threshold``; 1 where both are empty."""
    a, b = a > threshold, b > threshold
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


# A runtime may round in the last bits where eager PyTorch does not (ONNX Runtime's RoiAlign does).
# Where a cell's incoherence sits on a node-selection threshold, one of them then refines the cell
# and the other does not, which moves the 16 pixels of a 28-grid cell in the 112x112 mask (the
# bilinear upsampling blurs its edge into a few more). So a mask matches when it differs from
# eager's in at most 1% of the pixels either marks (IoU >= 0.99), or in at most 16 pixels: the
# first alone would fail a 50-pixel mask over one pixel.
MASK_PIXELS_OFF_TOLERATED = 16


def masks_match(a: torch.Tensor, b: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per instance of two [N, S, S] probability stacks: IoU >= 0.99 at ``threshold``, or at most
    ``MASK_PIXELS_OFF_TOLERATED`` pixels on different sides of it."""
    a, b = a > threshold, b > threshold
    off = (a ^ b).flatten(1).sum(1)
    union = (a | b).flatten(1).sum(1)
    return (off <= MASK_PIXELS_OFF_TOLERATED) | (100 * off <= union)


def compare_outputs(expected, got) -> dict:
    """How far ``got`` is from ``expected`` (both ``RawOutputs``): the figures the parity tests bound."""
    same_rows = expected.classes.shape == got.classes.shape
    report = {"detections": [int(expected.classes.numel()), int(got.classes.numel())], "same_rows": same_rows}
    masks_ok = True
    if same_rows:
        report["same_classes"] = bool(torch.equal(expected.classes.cpu(), got.classes.cpu()))
        report["same_batch_index"] = bool(torch.equal(expected.batch_index.cpu(), got.batch_index.cpu()))
        if expected.classes.numel():
            e, g = expected.boxes.cpu().float(), got.boxes.cpu().float()
            report["box_max_rel_diff"] = float(((e - g).abs() / e.abs().clamp(min=1.0)).max())
            for name, key in (("mask_probs", "mask"), ("coarse_probs", "coarse_mask")):
                e, g = getattr(expected, name).cpu(), getattr(got, name).cpu()
                report[f"{key}_min_iou"] = float(mask_iou(e, g).min())
                report[f"{key}_max_pixels_off"] = int(((e > 0.5) ^ (g > 0.5)).flatten(1).sum(1).max())
                masks_ok = masks_ok and bool(masks_match(e, g).all())
            report["mask_max_abs_diff"] = float((expected.mask_probs.cpu() - got.mask_probs.cpu()).abs().max())
    report["masks_match"] = masks_ok
    report["ok"] = bool(
        same_rows
        and report.get("same_classes", False)
        and report.get("same_batch_index", False)
        and report.get("box_max_rel_diff", 0.0) <= 1e-3
        and masks_ok
    )
    return report


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from transfiner.export.exporter import DEFAULT_OPSET, ExportError, export_model
    from transfiner.export.tensorrt import build_instructions, check_onnx, tensorrt_available
    from transfiner.model.inference.predictor import resolve_device
    from transfiner.model.weights.checkpoint import load_model

    if args.opset is not None and args.format == "torchscript":
        raise ValueError("--opset applies to ONNX exports (--format onnx or tensorrt)")
    # Exporting runs the eager model, so --model must name a checkpoint (or the default).
    weights = resolve_model(model_from_args(args), "pytorch").path
    fmt = "onnx" if args.format == "tensorrt" else args.format
    out = Path(args.out)
    steps = ["load", "export"] + ([] if args.no_check else ["check"]) + (["tensorrt"] if fmt == "onnx" else [])
    progress = tqdm(steps, desc="export", unit="step", disable=None)
    progress.set_postfix_str("load")
    model = load_model(weights, args.config, resolve_device(args.device), args.max_cells)
    progress.update()
    progress.set_postfix_str(f"trace + {fmt}")
    result = export_model(model, fmt, out, source=weights, opset=args.opset or DEFAULT_OPSET)
    progress.update()
    summary = {
        "format": fmt,
        "file": str(result.model_file),
        "size_mb": round(result.size_bytes / 2**20, 2),
        "seconds": round(result.seconds, 1),
    }
    if not args.no_check:
        progress.set_postfix_str("parity check")
        try:
            summary["parity"] = parity_check(model, fmt, out)
        except ExportError:  # the runtime cannot load what was written: nothing to keep
            result.model_file.unlink(missing_ok=True)
            result.metadata_file.unlink(missing_ok=True)
            raise
        progress.update()
    report = None
    if fmt == "onnx":
        progress.set_postfix_str("TensorRT operator check")
        report = check_onnx(result.model_file)
        summary["tensorrt_operator_check"] = {
            "tensorrt": report.tensorrt_version,
            "ok": report.ok,
            "problems": report.problems,
            "topk_max_k": max(report.topk_bounds),
        }
        progress.update()
    progress.close()
    print(json.dumps(summary, indent=2))
    if "parity" in summary and not summary["parity"]["ok"]:
        # Left in place, the folder would later be loaded as a working export, without a word.
        result.model_file.unlink(missing_ok=True)
        result.metadata_file.unlink(missing_ok=True)
        print(
            f"error: the exported model does not match eager PyTorch (see parity above), so {result.model_file} "
            "and its metadata.json were removed; --no-check keeps an export without checking it",
            file=sys.stderr,
        )
        return 1
    if args.format == "tensorrt":
        # No engine is built here either way: engines belong to the GPU and TensorRT version
        # that will run them. Without TensorRT the requested artifact does not exist: exit 2.
        installed = tensorrt_available()
        print(build_instructions(result.model_file, model.cfg.input, installed), file=sys.stderr)
        return 0 if installed and report is not None and report.ok else 2
    return 0
