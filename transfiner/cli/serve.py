"""``transfiner serve``: flags override ``TRANSFINER_*`` environment variables, which override defaults.

SIGTERM (or Ctrl-C) drains instead of dropping work: readiness turns 503 and new segment requests
are refused, queued and in-flight requests finish (up to ``drain_timeout_s``), readiness stays
503 for at least ``shutdown_grace_s`` so load balancers notice, then the port closes. A second
signal skips the wait.
"""

from __future__ import annotations

import argparse
import sys

from transfiner.cli.arguments import (
    add_backend_argument,
    add_max_cells_argument,
    add_model_arguments,
    add_precision_argument,
    add_ray_cluster_arguments,
    replica_gpus,
)

# Flag -> settings field, for the flags that map one to one.
_FLAGS = (
    "config",
    "device",
    "backend",
    "precision",
    "max_cells",
    "workers",
    "max_batch_size",
    "max_delay_ms",
    "max_arrival_wait_ms",
    "max_queue_size",
    "host",
    "port",
    "grpc_port",
    "grpc_max_message_bytes",
    "log_level",
    "log_format",
    "worker_process",
    "model_repository",
    "default_model",
    "repository_poll_s",
    "max_loaded_models",
    "max_model_host_bytes",
    "max_model_gpu_bytes",
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
        "--worker-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each model worker in a process of its own, or not (TRANSFINER_WORKER_PROCESS; default: on CUDA "
        "devices yes, on the CPU no)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="images per forward pass (default: 8 on GPUs, 4 on the CPU)",
    )
    parser.add_argument("--max-delay-ms", type=float, default=None, help="how long a batch waits to fill (5)")
    parser.add_argument(
        "--max-arrival-wait-ms",
        type=float,
        default=None,
        help="how long a batch that is not full waits for requests still being decoded (100)",
    )
    parser.add_argument("--max-queue-size", type=int, default=None, help="queued requests before 503 (64)")
    parser.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=None, help="default 8000 (0: any free port)")
    parser.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="the Open Inference Protocol over gRPC on this port (default 8001; 0: no gRPC server)",
    )
    parser.add_argument(
        "--grpc-max-message-bytes",
        type=int,
        default=None,
        metavar="B",
        help="largest gRPC message received or sent (default: the HTTP body limit, max_body_bytes)",
    )
    parser.add_argument("--log-level", default=None, choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument(
        "--log-format",
        default=None,
        choices=["text", "json"],
        help="json: one object a line, uvicorn's access log and a line per request included (TRANSFINER_LOG_FORMAT; "
        "default text)",
    )
    repo = parser.add_argument_group("model repository")
    repo.add_argument(
        "--model-repository",
        default=None,
        metavar="DIR",
        help="serve the models of DIR (NAME/VERSION/ holding a checkpoint or an export folder, optional "
        "NAME/config.yaml) instead of --model (TRANSFINER_MODEL_REPOSITORY)",
    )
    repo.add_argument(
        "--default-model", default=None, metavar="NAME", help="the model of POST /v1/segment (default: the only one)"
    )
    repo.add_argument(
        "--repository-poll-s",
        type=float,
        default=None,
        metavar="S",
        help="load new versions, and unload removed ones, found in the repository every S seconds",
    )
    repo.add_argument("--max-loaded-models", type=int, default=None, metavar="N", help="models loaded at once")
    repo.add_argument(
        "--max-model-host-bytes", type=int, default=None, metavar="B", help="host memory for all loaded weights"
    )
    repo.add_argument(
        "--max-model-gpu-bytes", type=int, default=None, metavar="B", help="GPU memory for all loaded weights"
    )


def settings_from_args(args: argparse.Namespace):
    from transfiner.service.settings import ServiceSettings

    overrides = {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None}
    model = args.weights or args.model
    if model is not None:
        if args.model_repository is not None:
            raise ValueError("give --model or --model-repository, not both")
        overrides["model"] = str(model)
    return ServiceSettings(**overrides)


def checked_settings(args: argparse.Namespace):
    """The settings, once the model they name is known to exist and to suit the backend (for every
    engine): a wrong --model fails here, as one line, before binding the port."""
    from transfiner.export.resolve import resolve_model
    from transfiner.service.repository.layout import scan_repository

    settings = settings_from_args(args)
    if settings.model_repository is not None:
        scan_repository(settings.model_repository)  # a folder that is not there fails here
    else:
        resolve_model(settings.model, settings.backend)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Serves until a signal (exit 0), or until the model fails to load (exit 2): a server that
    can never answer should end, so that Docker or Kubernetes restarts it and shows why."""
    from transfiner.model.inference.predictor import resolve_device
    from transfiner.service.app import create_app
    from transfiner.service.server import DrainingServer, listening_sockets, uvicorn_config
    from transfiner.service.telemetry.logs import configure_logging

    settings = checked_settings(args)
    resolve_device(settings.device)  # a GPU asked for must be here (Ray's replicas check on their own nodes)
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    listening = listening_sockets(settings.host, settings.port)
    server = DrainingServer(uvicorn_config(app, settings), app.state.runtime)
    server.run(sockets=listening)
    if server.failure is not None:
        print(f"error: {server.failure}", file=sys.stderr)
        return 2
    return 0


# ``transfiner serve --engine``: the FastAPI server (default), or the same app as a Ray Serve
# application on a Ray cluster (service/ray_serve.py; Ray is the optional extra ``transfiner[ray]``).
_RAY_FLAGS = (
    "ray_address",
    "replicas",
    "min_replicas",
    "max_replicas",
    "replica_cpus",
    "replica_gpus",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "metrics_export_port",
)


def add_serve_engine_arguments(parser: argparse.ArgumentParser) -> None:
    add_serve_arguments(parser)
    parser.add_argument(
        "--engine",
        choices=["fastapi", "ray"],
        default="fastapi",
        help="fastapi: this process serves (default); ray: Ray Serve replicas on a Ray cluster",
    )
    ray = parser.add_argument_group("--engine ray")
    add_ray_cluster_arguments(ray, "Ray Serve replicas")
    ray.add_argument(
        "--target-ongoing-requests",
        type=float,
        default=None,
        help="autoscaling: requests in flight per replica to aim for (default: --max-batch-size)",
    )
    ray.add_argument(
        "--upscale-delay-s",
        type=float,
        default=None,
        help="autoscaling: how long load must stay high before replicas are added (10)",
    )
    ray.add_argument(
        "--downscale-delay-s",
        type=float,
        default=None,
        help="autoscaling: how long load must stay low before replicas are removed (300)",
    )
    ray.add_argument(
        "--metrics-export-port",
        type=int,
        default=None,
        help="with --ray-address local: the port of Ray's Prometheus metrics (ray_serve_*)",
    )


def cmd_serve_engine(args: argparse.Namespace) -> int:
    if args.engine == "fastapi":
        given = [f"--{name.replace('_', '-')}" for name in _RAY_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --engine ray")
        return cmd_serve(args)
    try:
        from transfiner.service.ray_serve import Scaling, serve_on_ray
    except ImportError as error:
        raise ValueError(f"--engine ray needs Ray Serve: pip install 'transfiner[ray]' ({error})") from None
    from transfiner.cli.serve import checked_settings

    if args.grpc_port or args.grpc_max_message_bytes is not None:
        raise ValueError("--grpc-port, --grpc-max-message-bytes: --engine ray serves HTTP only (docs/guide/grpc.md)")
    if args.workers is not None:
        raise ValueError("--workers: with --engine ray each replica runs one model worker; scale with --replicas")
    if args.worker_process:
        raise ValueError("--worker-process: with --engine ray each replica is a process of Ray's own")
    autoscale = args.min_replicas is not None or args.max_replicas is not None
    tuning = [
        f"--{n.replace('_', '-')}"
        for n in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")
        if getattr(args, n) is not None
    ]
    if tuning and not autoscale:
        raise ValueError(f"{', '.join(tuning)}: only with --min-replicas/--max-replicas (autoscaling)")
    settings = checked_settings(args)
    scaling = Scaling(
        replicas=args.replicas if autoscale or args.replicas is not None else 1,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        replica_cpus=1.0 if args.replica_cpus is None else args.replica_cpus,
        replica_gpus=replica_gpus(args.replica_gpus, settings.device),
        target_ongoing_requests=args.target_ongoing_requests,
        **{
            name: getattr(args, name)
            for name in ("upscale_delay_s", "downscale_delay_s")
            if getattr(args, name) is not None
        },
    )
    if args.metrics_export_port is not None and (args.ray_address or "local") != "local":
        raise ValueError(
            "--metrics-export-port applies to a cluster started here (--ray-address local); "
            "a running cluster's nodes set theirs with `ray start --metrics-export-port`"
        )
    return serve_on_ray(settings, scaling, args.ray_address or "local", args.metrics_export_port)
