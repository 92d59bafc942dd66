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
        load_backend(model_from_args(args), backend, args.config, args.device, precision=args.precision)
    )


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
    ("serve", "run the REST service (FastAPI, dynamic batching)", add_serve_arguments, cmd_serve),
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (CheckpointError, DatasetError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
