"""The ``transfiner`` command: one table of sub-commands, each in a module of its own.

- Every argparse parser of the product lives in this package; the library below takes plain values.
- Every sub-command reports bad input as one clear line on stderr and exit status 2 (1 for a failed
  check such as an incomplete checkpoint conversion), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from pydantic import ValidationError

from transfiner.cli.bench import add_bench_arguments, cmd_bench
from transfiner.cli.convert import add_convert_arguments, cmd_convert_official
from transfiner.cli.evaluate import add_evaluate_arguments, cmd_evaluate
from transfiner.cli.export import add_export_arguments, cmd_export
from transfiner.cli.make_shapes import add_make_shapes_arguments, cmd_make_shapes
from transfiner.cli.predict import add_predict_arguments, cmd_predict
from transfiner.cli.serve import add_serve_engine_arguments, cmd_serve_engine
from transfiner.cli.train import add_train_arguments, cmd_train
from transfiner.model.datasets.coco import DatasetError
from transfiner.model.weights.files import CheckpointError

# name, help, add its arguments, run it
COMMANDS = (
    ("predict", "segment images, write COCO results JSON", add_predict_arguments, cmd_predict),
    (
        "convert-official",
        "convert an official SysCV/transfiner checkpoint",
        add_convert_arguments,
        cmd_convert_official,
    ),
    ("make-shapes", "write a synthetic fine-detail COCO data set", add_make_shapes_arguments, cmd_make_shapes),
    ("train", "train on a COCO-format data set", add_train_arguments, cmd_train),
    ("evaluate", "box, mask and boundary AP of coarse vs refined masks", add_evaluate_arguments, cmd_evaluate),
    (
        "serve",
        "run the REST service (FastAPI, dynamic batching; or Ray Serve with --engine ray)",
        add_serve_engine_arguments,
        cmd_serve_engine,
    ),
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
        return "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        )
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
