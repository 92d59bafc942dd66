"""The ``transfiner`` command line: one table of sub-commands over ``model``, ``export`` and ``service``.

It sits above the three packages because its commands come from all of them, while each package
only looks down (``model`` imports neither ``export`` nor ``service``; ``export`` not ``service``).
Each sub-command's arguments and implementation live next to the code it runs; this module only
wires them, and builds the predictor of ``predict`` and ``evaluate`` on any backend (eager,
TorchScript, ONNX Runtime), which needs ``export``.

Every sub-command reports bad input as one clear line on stderr and exit status 2 (1 for a
failed check such as an incomplete checkpoint conversion), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from pydantic import ValidationError

from export.cli import add_export_arguments, cmd_export
from export.runtimes import load_backend
from model.checkpoint_io import CheckpointError
from model.cli import add_convert_arguments, add_predict_arguments, cmd_convert_official, cmd_predict
from model.data import DatasetError
from model.default_model import model_from_args
from model.evaluate import add_evaluate_arguments, cmd_evaluate
from model.predictor import Predictor
from model.shapes import add_make_shapes_arguments, cmd_make_shapes
from model.train import add_train_arguments, cmd_train
from service.cli import add_serve_arguments, cmd_serve
from service.loadtest.cli import add_bench_arguments, cmd_bench


def predictor_from_args(args: argparse.Namespace) -> Predictor:
    """The Predictor ``--model``, ``--backend``, ``--config``, ``--device`` and ``--precision`` name."""
    backend = getattr(args, "backend", None) or "pytorch"
    return Predictor.from_backend(
        load_backend(model_from_args(args), backend, args.config, args.device, precision=args.precision,
                     max_cells=getattr(args, "max_cells", None))
    )


# ``transfiner serve --engine``: the FastAPI server (default), or the same app as a Ray Serve
# application on a Ray cluster (service/ray_serve.py; Ray is the optional extra ``transfiner[ray]``).
_RAY_FLAGS = ("ray_address", "replicas", "min_replicas", "max_replicas", "replica_cpus", "replica_gpus",
              "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s", "metrics_export_port")


def add_serve_engine_arguments(parser: argparse.ArgumentParser) -> None:
    add_serve_arguments(parser)
    parser.add_argument("--engine", choices=["fastapi", "ray"], default="fastapi",
                        help="fastapi: this process serves (default); ray: Ray Serve replicas on a Ray cluster")
    ray = parser.add_argument_group("--engine ray")
    ray.add_argument("--ray-address", default=None,
                     help="the cluster to join (e.g. auto, HOST:6379), or local to start one here (default)")
    ray.add_argument("--replicas", type=int, default=None, help="fixed number of replicas (default 1)")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscaling: at least this many replicas")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscaling: at most this many replicas")
    ray.add_argument("--target-ongoing-requests", type=float, default=None,
                     help="autoscaling: requests in flight per replica to aim for (default: --max-batch-size)")
    ray.add_argument("--upscale-delay-s", type=float, default=None,
                     help="autoscaling: how long load must stay high before replicas are added (10)")
    ray.add_argument("--downscale-delay-s", type=float, default=None,
                     help="autoscaling: how long load must stay low before replicas are removed (300)")
    ray.add_argument("--replica-cpus", type=float, default=None, help="CPUs Ray reserves per replica (default 1)")
    ray.add_argument("--replica-gpus", type=float, default=None,
                     help="GPUs per replica, fractions allowed (0.5: two replicas share a GPU); default 1 with "
                          "--device cuda, else 0")
    ray.add_argument("--metrics-export-port", type=int, default=None,
                     help="with --ray-address local: the port of Ray's Prometheus metrics (ray_serve_*)")


def cmd_serve_engine(args: argparse.Namespace) -> int:
    if args.engine == "fastapi":
        given = [f"--{name.replace('_', '-')}" for name in _RAY_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --engine ray")
        return cmd_serve(args)
    try:
        from service.ray_serve import Scaling, serve_on_ray
    except ImportError as error:
        raise ValueError(f"--engine ray needs Ray Serve: pip install 'transfiner[ray]' ({error})") from None
    from service.cli import checked_settings

    if args.workers is not None:
        raise ValueError("--workers: with --engine ray each replica runs one model worker; scale with --replicas")
    if args.worker_process:
        raise ValueError("--worker-process: with --engine ray each replica is a process of Ray's own")
    autoscale = args.min_replicas is not None or args.max_replicas is not None
    tuning = [f"--{n.replace('_', '-')}" for n in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")
              if getattr(args, n) is not None]
    if tuning and not autoscale:
        raise ValueError(f"{', '.join(tuning)}: only with --min-replicas/--max-replicas (autoscaling)")
    settings = checked_settings(args)
    gpus = args.replica_gpus
    if gpus is None:
        gpus = 1.0 if settings.device.startswith("cuda") else 0.0
    scaling = Scaling(
        replicas=args.replicas if autoscale or args.replicas is not None else 1, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, replica_cpus=1.0 if args.replica_cpus is None else args.replica_cpus,
        replica_gpus=gpus, target_ongoing_requests=args.target_ongoing_requests,
        **{name: getattr(args, name) for name in ("upscale_delay_s", "downscale_delay_s")
           if getattr(args, name) is not None},
    )
    if args.metrics_export_port is not None and (args.ray_address or "local") != "local":
        raise ValueError("--metrics-export-port applies to a cluster started here (--ray-address local); "
                         "a running cluster's nodes set theirs with `ray start --metrics-export-port`")
    return serve_on_ray(settings, scaling, args.ray_address or "local", args.metrics_export_port)


# name, help, add its arguments, run it
COMMANDS = (
    ("predict", "segment images, write COCO results JSON", add_predict_arguments,
     lambda args: cmd_predict(args, predictor_from_args)),
    ("convert-official", "convert an official SysCV/transfiner checkpoint", add_convert_arguments,
     cmd_convert_official),
    ("make-shapes", "write a synthetic fine-detail COCO data set", add_make_shapes_arguments, cmd_make_shapes),
    ("train", "train on a COCO-format data set", add_train_arguments, cmd_train),
    ("evaluate", "box, mask and boundary AP of coarse vs refined masks", add_evaluate_arguments,
     lambda args: cmd_evaluate(args, predictor_from_args)),
    ("serve", "run the REST service (FastAPI, dynamic batching; or Ray Serve with --engine ray)",
     add_serve_engine_arguments, cmd_serve_engine),
    ("export", "export as TorchScript or ONNX (and check the TensorRT path)", add_export_arguments, cmd_export),
    ("bench", "load-test a running service", add_bench_arguments, cmd_bench),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="transfiner", description="Mask Transfiner: predict, train, serve, export.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, command in COMMANDS:
        sub = commands.add_parser(name, help=help_text)
        add_arguments(sub)
        sub.set_defaults(func=command)
    return parser


def one_line(error: Exception) -> str:
    """A settings error (pydantic's, several lines with links) as ``field: what is wrong; ...``."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(part) for part in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                         for e in error.errors())
    return str(error)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """A warning as a user of the command reads it: what happened, not where in our code."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shown_as, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        return _run(args)
    finally:
        warnings.formatwarning = shown_as  # main() also runs inside other programs (the tests)


def _run(args: argparse.Namespace) -> int:
    if getattr(args, "batch_size", 1) < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CheckpointError, DatasetError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
