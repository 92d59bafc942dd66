"""``transfiner serve``: flags override ``TRANSFINER_*`` environment variables, which override defaults.

SIGTERM (or Ctrl-C) drains instead of dropping work: readiness turns 503 and new segment requests
are refused, queued and in-flight requests finish (up to ``drain_timeout_s``), readiness stays
503 for at least ``shutdown_grace_s`` so load balancers notice, then the port closes. A second
signal skips the wait.
"""

from __future__ import annotations

import argparse
import logging
import sys

from model.default_model import (
    add_backend_argument, add_max_cells_argument, add_model_arguments, add_precision_argument,
)

# Flag -> settings field, for the flags that map one to one.
_FLAGS = (
    "config", "device", "backend", "precision", "max_cells", "workers", "max_batch_size", "max_delay_ms",
    "max_arrival_wait_ms", "max_queue_size", "host", "port", "log_level", "worker_process",
)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_backend_argument(parser)
    add_precision_argument(parser)
    add_max_cells_argument(parser)
    # None = not given, so TRANSFINER_DEVICE (or the settings default) applies.
    parser.set_defaults(device=None)
    parser.add_argument("--workers", type=int, default=None, help="model workers (default: one per GPU, or 1)")
    parser.add_argument(
        "--worker-process", action=argparse.BooleanOptionalAction, default=None,
        help="each model worker in a process of its own, or not (TRANSFINER_WORKER_PROCESS; default: on CUDA "
        "devices yes, on the CPU no)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="images per forward pass (default: 8 on GPUs, 4 on the CPU)",
    )
    parser.add_argument("--max-delay-ms", type=float, default=None, help="how long a batch waits to fill (5)")
    parser.add_argument(
        "--max-arrival-wait-ms", type=float, default=None,
        help="how long a batch that is not full waits for requests still being decoded (100)",
    )
    parser.add_argument("--max-queue-size", type=int, default=None, help="queued requests before 503 (64)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=None, help="default 8000 (0: any free port)")
    parser.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(args: argparse.Namespace):
    from .settings import ServiceSettings

    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    model = args.weights or args.model
    if model is not None:
        overrides["model"] = str(model)
    return ServiceSettings(**overrides)


def checked_settings(args: argparse.Namespace):
    """The settings, once the model they name is known to exist and to suit the backend (for every
    engine): a wrong --model fails here, as one line, before binding the port."""
    from export.resolve import resolve_model

    settings = settings_from_args(args)
    resolve_model(settings.model, settings.backend)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Serves until a signal (exit 0), or until the model fails to load (exit 2): a server that
    can never answer should end, so that Docker or Kubernetes restarts it and shows why."""
    from model.predictor import resolve_device

    from .app import create_app
    from .server import DrainingServer, listening_sockets, uvicorn_config

    settings = checked_settings(args)
    resolve_device(settings.device)  # a GPU asked for must be here (Ray's replicas check on their own nodes)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    listening = listening_sockets(settings.host, settings.port)
    server = DrainingServer(uvicorn_config(app, settings), app.state.runtime)
    server.run(sockets=listening)
    if server.failure is not None:
        print(f"error: {server.failure}", file=sys.stderr)
        return 2
    return 0
