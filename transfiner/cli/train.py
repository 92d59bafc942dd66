"""``transfiner train``: train on a COCO-format data set."""

from __future__ import annotations

import argparse
import math

from transfiner.model.config import PRESET_NAMES
from transfiner.model.training.train import SolverConfig, default_lr, train
from transfiner.model.weights.default import resolve_weights


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SolverConfig()
    parser.add_argument("--config", default="small", choices=PRESET_NAMES, help="model preset")
    parser.add_argument("--data", required=True, help="training annotations (COCO json)")
    parser.add_argument("--val", default=None, help="validation annotations, evaluated at the end")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pth")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT")
    parser.add_argument(
        "--weights",
        default=None,
        help="initialise from a checkpoint (e.g. a converted official one; 'default': the shipped model)",
    )
    parser.add_argument("--image-root", default=None, help="folder of --data's images (default: next to the json)")
    parser.add_argument("--val-image-root", default=None, help="folder of --val's images (default: next to its json)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="(default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="(default %(default)s)")
    parser.add_argument(
        "--optimizer", default=defaults.optimizer, choices=["sgd", "adamw"], help="(default %(default)s)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help="(default: 0.02 x batch size / 16 with sgd, as detectron2; 0.0004 with adamw)",
    )
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="(default %(default)s)")
    parser.add_argument("--warmup-iters", type=int, default=defaults.warmup_iters, help="(default %(default)s)")
    parser.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument(
        "--checkpoint-period", type=int, default=defaults.checkpoint_period, help="(default %(default)s)"
    )
    parser.add_argument("--log-period", type=int, default=defaults.log_period, help="(default %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="(default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="(default %(default)s)")
    parser.add_argument("--no-semantic-loss", action="store_true")
    parser.add_argument("--no-boundary-loss", action="store_true")


def cmd_train(args: argparse.Namespace) -> int:
    for name in ("iters", "batch_size", "checkpoint_period", "log_period"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    lr = default_lr(args.optimizer, args.batch_size) if args.lr is None else args.lr
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError("--lr must be a positive number")
    if args.warmup_iters < 0:
        raise ValueError("--warmup-iters cannot be negative")
    weights = resolve_weights(args.weights)  # 'default' is the shipped model, as for --model
    solver = SolverConfig(
        iters=args.iters,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=lr,
        weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters,
        clip_grad=args.clip_grad,
        amp=not args.no_amp,
        checkpoint_period=args.checkpoint_period,
        log_period=args.log_period,
        seed=args.seed,
        workers=args.workers,
        semantic_loss=not args.no_semantic_loss,
        boundary_loss=not args.no_boundary_loss,
    )
    final = train(
        args.config,
        args.data,
        args.out,
        solver,
        args.val,
        args.resume,
        weights,
        args.device,
        args.image_root,
        val_image_root=args.val_image_root,
        overwrite=args.overwrite,
    )
    print(f"wrote {final}")
    return 0
