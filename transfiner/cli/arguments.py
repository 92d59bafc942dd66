"""Arguments several commands share: the model, its backend, precision and node caps."""

from __future__ import annotations

import argparse
from pathlib import Path

from transfiner.export.backends import load_backend
from transfiner.model.config import PRESET_NAMES, parse_max_cells
from transfiner.model.inference.backend import BACKEND_NAMES
from transfiner.model.inference.precision import PRECISIONS
from transfiner.model.inference.predictor import Predictor


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``/``--weights``, ``--config`` and ``--device``, the same for every command."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", default=None, help="'default' (the shipped model, the default) or a checkpoint")
    group.add_argument("--weights", default=None, help="checkpoint file (same as --model FILE)")
    parser.add_argument(
        "--config", default=None, choices=PRESET_NAMES, help="model preset (default: the one stored in the checkpoint)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def model_from_args(args: argparse.Namespace) -> str | Path:
    """What ``--model``/``--weights`` name; the default model when neither is given."""
    return args.weights or args.model or "default"


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default=None,
        choices=BACKEND_NAMES,
        help="pytorch (eager, the default), torchscript or onnxruntime; --model may then also be a "
        "`transfiner export` folder (a checkpoint is exported once into ~/.cache/transfiner)",
    )


def _max_cells_flag(text: str) -> tuple[int, int, int]:
    try:
        return parse_max_cells(text)
    except ValueError as error:  # argparse shows an ArgumentTypeError's own words, not the function's name
        raise argparse.ArgumentTypeError(str(error)) from None


def add_max_cells_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-cells",
        default=None,
        type=_max_cells_flag,
        metavar="A,B,C",
        help="node caps per quadtree level, 28-cells of the 28/56/112 levels (default: the checkpoint's; "
        "784,784,784 selects exactly the official nodes; smaller is faster and differs where a box "
        "has more incoherent cells). Exported models keep the caps they were exported with",
    )


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="auto (the default: bf16 on CUDA that supports it, else fp32), fp32, bf16 or fp16; exported "
        "models run fp32",
    )


def add_ray_cluster_arguments(ray: argparse._ArgumentGroup, replicas: str) -> None:
    """The flags ``serve`` and ``predict`` share for ``--engine ray``: the cluster and the replicas
    (``replicas``: what a replica is, for the help)."""
    ray.add_argument(
        "--ray-address",
        default=None,
        help="the cluster to join (e.g. auto, HOST:6379), or local to start one here (default)",
    )
    ray.add_argument("--replicas", type=int, default=None, help=f"fixed number of {replicas} (default 1)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling: at least this many replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling: at most this many replicas")
    ray.add_argument("--replica-cpus", type=float, default=None, help="CPUs Ray reserves per replica (default 1)")
    ray.add_argument(
        "--replica-gpus",
        type=float,
        default=None,
        help="GPUs per replica, fractions allowed (0.5: two replicas share a GPU); default 1 with "
        "--device cuda, else 0",
    )


def replica_gpus(given: float | None, device: str) -> float:
    """``--replica-gpus``, or by default a GPU a replica on a CUDA device and none on the CPU."""
    if given is not None:
        return given
    return 1.0 if device.startswith("cuda") else 0.0


def predictor_from_args(args: argparse.Namespace) -> Predictor:
    """The Predictor ``--model``, ``--backend``, ``--config``, ``--device`` and ``--precision`` name."""
    backend = getattr(args, "backend", None) or "pytorch"
    return Predictor.from_backend(
        load_backend(
            model_from_args(args),
            backend,
            args.config,
            args.device,
            precision=args.precision,
            max_cells=getattr(args, "max_cells", None),
        )
    )
