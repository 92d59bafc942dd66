"""Both engines of ``transfiner serve`` under overload, in one run, on one machine: does the Ray
Serve engine admit as well as the FastAPI engine?

For ``--engine fastapi`` and ``--engine ray`` (one replica on a local Ray instance, holding every
core), in turn, with the same model, images and client (``scripts.bench_overload``'s):

1. capacity: a closed loop of ``2 x max_batch_size`` clients for ``--capacity-s``; images/s;
2. overload: Poisson arrivals at ``--factor`` x that capacity for ``--overload-s``, every request
   with the service's default deadline (``X-Request-Timeout: --deadline``).

Printed per engine: capacity, answers by status and by error code, whether every refusal carried
Retry-After, goodput (200s/s) as a share of the engine's own capacity, the share of the images the
model computed that reached a waiting client, and the mean batch size. Goals: goodput >= 95% of
capacity, no 504.

Ray binds some of its ports to every interface; as root, the run moves itself into a network
namespace that has nothing but loopback (``unshare -n``), where the servers and the client run.

    python -m scripts.bench_ray_overload --model default --out bench-results/ray-overload
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from scripts.bench_overload import Client, capacity, machine, open_loop
from scripts.bench_service import synthetic_png
from scripts.results import markdown_table, write_report
from transfiner.service.loadtest.servers import SERVE_COMMAND, free_port, stop_process_group, wait_for_server

ENGINES = ("fastapi", "ray")


def server_command(engine: str, args: argparse.Namespace, port: int) -> list[str]:
    command = [
        *SERVE_COMMAND,
        "--model",
        args.model,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--max-batch-size",
        str(args.max_batch_size),
        "--log-level",
        "warning",
    ]
    if engine == "ray":
        # One replica holding every core, as the FastAPI engine's one worker does (Ray gives an
        # actor as many torch threads as the CPUs it reserves).
        command += ["--engine", "ray", "--ray-address", "local", "--replicas", "1"]
        command += ["--replica-cpus", str(os.cpu_count())]
    return command


async def measure(engine: str, url: str, pid: int | None, args: argparse.Namespace) -> dict:
    images = [synthetic_png(480, 640, seed) for seed in range(4)]
    client = Client(url, args.deadline, images)
    try:
        print(f"{engine}: capacity ...", flush=True)
        result = {"capacity": await capacity(client, 2 * args.max_batch_size, args.capacity_s)}
        rate = args.factor * result["capacity"]["images_per_s"]
        print(f"{engine}:   {result['capacity']['images_per_s']:.2f} images/s", flush=True)
        print(f"{engine}: overload: {rate:.2f}/s ({args.factor} x) for {args.overload_s} s ...", flush=True)
        result["overload"] = await open_loop(client, url, rate, args.overload_s, pid, seed=1)
    finally:
        await client.http.aclose()
    overload = result["overload"]
    overload["goodput_share"] = overload["answers_per_s"] / result["capacity"]["images_per_s"]
    return result


def run_engine(engine: str, args: argparse.Namespace, out: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = out / f"{engine}.log"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("w") as handle:
        process = subprocess.Popen(
            server_command(engine, args, port), env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_server(process, url, log, timeout=600)
        # The FastAPI engine's memory is its process's; a Ray replica is a process of Ray's own.
        pid = process.pid if engine == "fastapi" else None
        result = asyncio.run(measure(engine, url, pid, args))
    finally:
        stop_process_group(process)
    return result


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def markdown(report: dict) -> str:
    rows = []
    for engine, result in report["engines"].items():
        cap, run = result["capacity"], result["overload"]
        rows.append(
            [
                engine,
                f"{cap['images_per_s']:.2f}",
                f"{run['offered_rate']:.2f}/s for {run['seconds']:.0f} s ({run['arrivals']} arrivals)",
                run["statuses"],
                run["codes"],
                run["refusals_with_retry_after"],
                f"{run['answers_per_s']:.2f}",
                f"**{100 * run['goodput_share']:.0f}%**",
                "-" if run["delivered_share"] is None else f"{100 * run['delivered_share']:.1f}%",
                "-" if run["mean_batch_size"] is None else f"{run['mean_batch_size']:.2f}",
                run["p99_ms"],
            ]
        )
    lines = [
        "# Both engines under overload",
        "",
        f"`{report['command']}` on {report['machine']}; load average (1, 5, 15 min) "
        f"{report['load_before']} before, {report['load_after']} after; deadline {report['deadline_s']:g} s.",
        "",
        *markdown_table(
            [
                "engine",
                "capacity images/s",
                "offered",
                "statuses",
                "refusals and errors",
                "refusals with Retry-After",
                "answers/s",
                "goodput vs capacity",
                "computed images delivered",
                "mean batch",
                "p99 ms",
            ],
            rows,
            align="lrllllrrrrr",
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_ray_overload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument(
        "--deadline", type=float, default=30.0, help="X-Request-Timeout (default: the service's default deadline)"
    )
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--factor", type=float, default=5.0)
    parser.add_argument("--overload-s", type=float, default=45.0)
    parser.add_argument("--out", default="bench-results/ray-overload")
    parser.add_argument("--no-netns", action="store_true", help="do not run inside a loopback-only namespace")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in the namespace
    arguments = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(arguments)
    can_isolate = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
    if not args.inside and not args.no_netns and "ray" in args.engines:
        if not can_isolate:
            parser.error("--engine ray runs in a loopback-only namespace: needs root, unshare and ip (or --no-netns)")
        script = 'ip link set lo up && exec "$0" "$@"'
        command = [sys.executable, "-m", "scripts.bench_ray_overload", *arguments, "--inside"]
        return subprocess.run(["unshare", "--net", "sh", "-c", script, *command]).returncode

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "command": " ".join(["python -m scripts.bench_ray_overload", *arguments]).replace(" --inside", ""),
        "machine": machine(),
        "deadline_s": args.deadline,
        "load_before": load(),
        "engines": {},
    }
    for engine in args.engines:
        report["engines"][engine] = run_engine(engine, args, out)
        (out / "ray-overload.json").write_text(json.dumps(report, indent=2))
    report["load_after"] = load()
    text = markdown(report)
    json_path, markdown_path = write_report(out, "ray-overload", report, text)
    print(text)
    print(f"wrote {json_path} and {markdown_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
