"""``transfiner convert-official``: an official SysCV/transfiner checkpoint in our format."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transfiner.model.config import PRESET_NAMES
from transfiner.model.modeling.rcnn import MaskTransfiner
from transfiner.model.weights.checkpoint import convert_official_state_dict, official_config, save_checkpoint
from transfiner.model.weights.files import read_state_dict


def cmd_convert_official(args: argparse.Namespace) -> int:
    official = read_state_dict(args.input, allow_pickle=args.allow_pickle)
    model = MaskTransfiner(official_config(args.config))
    converted, report = convert_official_state_dict(official, model)
    print(report.format())
    if not report.ok:
        print(
            f"error: {args.input} cannot be used as {args.config}: keys are missing or have the wrong shape",
            file=sys.stderr,
        )
        return 1
    model.load_state_dict(converted)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.output, model, source=str(args.input))
    print(f"wrote {args.output} ({args.config}, {sum(t.numel() for t in converted.values()) / 1e6:.2f} M values)")
    return 0


def add_convert_arguments(convert: argparse.ArgumentParser) -> None:
    convert.add_argument("input", help="detectron2-format .pth (or .pkl with --allow-pickle)")
    convert.add_argument("output", help="where to write our checkpoint")
    convert.add_argument("--config", required=True, choices=[n for n in PRESET_NAMES if n != "small"])
    convert.add_argument(
        "--allow-pickle", action="store_true", help="allow reading .pkl files (numpy arrays only; pickle can run code)"
    )
