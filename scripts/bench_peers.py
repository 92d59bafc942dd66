"""Our service against its peers, in one run, on one machine, with one model, one workload and one
client: ``transfiner serve`` (FastAPI engine), the same app on Ray Serve (``transfiner serve
--engine ray``, one replica on a local Ray instance) and a plain LitServe server wrapping our
``Predictor`` (``scripts.litserve_peer``). Closed loop at each concurrency (1, 4, 16 by default):
throughput, p50 and p99 of ``transfiner bench``'s client (``service.loadtest.client``).

    python -m scripts.bench_peers [--requests 24] [--concurrency 1 4 16] [--out bench-results/peers]

* Every server gets the same model (``--model``, the default one), the same batching (at most
  ``--max-batch-size`` images per forward pass, waiting at most 5 ms for batch-mates), one model
  worker, and all the machine's cores for torch's threads.
* The client sends every image as a multipart upload (field ``image``, the score threshold as a
  form field): all three servers read that form without custom code (LitServe's
  ``decode_request`` takes the form as its documentation shows), and a real client reads each
  JSON answer.
* LitServe is installed by this script in a virtual environment of its own (``--litserve-venv``,
  pinned ``--litserve-version``); the model stack (torch, numpy, this repository) is shared with
  the project's environment through a ``.pth`` file, read-only, after LitServe's own packages.
* As root, with ``unshare``, the servers and the client run in a network namespace that has only
  loopback (Ray binds some ports to every interface); ``--no-netns`` runs them as they are.

Writes ``report.json``, ``report.md`` and ``peers.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from datetime import datetime, timezone
from pathlib import Path

from scripts.results import markdown_table
from transfiner.cli.bench import generate_images, machine_info
from transfiner.service.loadtest.client import InvalidAnswer, SegmentClient, WorkloadImage, run_closed_loop
from transfiner.service.loadtest.report import StepResult
from transfiner.service.loadtest.servers import SERVE_COMMAND, free_port, stop_process_group, wait_for_server

REPO = Path(__file__).resolve().parents[1]

SERVERS = ("fastapi", "ray", "litserve")
LABELS = {
    "fastapi": "transfiner serve (FastAPI)",
    "ray": "transfiner serve --engine ray (Ray Serve)",
    "litserve": "LitServe + Predictor",
}


class MultipartSegmentClient(SegmentClient):
    """``transfiner bench``'s client (connection pool, drivers, the JSON check), posting each image
    as a multipart upload with the parameters as form fields, which every peer reads as is."""

    async def send(self, index: int) -> int:
        image = self.images[index % len(self.images)]
        response = await self.http.post(
            "/v1/segment",
            files={"image": (image.name, image.data, image.content_type)},
            data=self.params,
        )
        if response.is_success:
            try:
                json.loads(response.content)
            except ValueError:
                raise InvalidAnswer(f"status {response.status_code} with a body that is not JSON") from None
        return response.status_code


# -- LitServe's own environment ---------------------------------------------------------------------


def ensure_litserve(venv: Path, version: str) -> Path:
    """A virtual environment holding LitServe ``version``; returns its Python."""
    python = venv / "bin" / "python"
    marker = venv / f".litserve-{version}"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"litserve=={version}"], check=True)
        marker.touch()
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The model stack from the project's environment, after LitServe's own packages. As a site
    # directory, so its own .pth files run too: the installed transfiner is one of them. Written
    # at every run, so an environment made for another checkout serves this one.
    ours = sysconfig.get_paths()["purelib"]
    (Path(site) / "transfiner-model-stack.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    return python


# -- the servers ------------------------------------------------------------------------------------


def start_server(name: str, args: argparse.Namespace, port: int, log: Path, litserve_python: Path | None):
    batch = ["--max-batch-size", str(args.max_batch_size)]
    common = ["--model", args.model, "--port", str(port), *batch]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    if name == "fastapi":
        command = [
            *SERVE_COMMAND,
            *common,
            "--device",
            "cpu",
            "--max-delay-ms",
            "5",
            "--log-level",
            "warning",
        ]
    elif name == "ray":
        # One replica holding every core (Ray gives an actor as many torch threads as CPUs).
        command = [
            *SERVE_COMMAND,
            "--engine",
            "ray",
            "--ray-address",
            "local",
            "--replicas",
            "1",
            "--replica-cpus",
            str(os.cpu_count()),
            *common,
            "--device",
            "cpu",
            "--max-delay-ms",
            "5",
            "--log-level",
            "warning",
        ]
    else:
        command = [str(litserve_python), "-m", "scripts.litserve_peer", *common, "--batch-timeout", "0.005"]
    handle = log.open("w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


async def measure(url: str, images: list[WorkloadImage], args: argparse.Namespace) -> list[StepResult]:
    params = {"score_threshold": str(args.score_threshold)}
    steps = []
    async with MultipartSegmentClient(url, images, params=params, max_connections=max(args.concurrency)) as client:
        status = await client.send(0)
        if status != 200:
            raise RuntimeError(f"{url}: the test request answered {status}")
        for concurrency in args.concurrency:
            await run_closed_loop(client.send, min(args.warmup, concurrency), requests=args.warmup)
            run = await run_closed_loop(client.send, concurrency, requests=args.requests, duration_s=args.duration)
            step = StepResult.from_run("closed", run, None, concurrency=concurrency)
            steps.append(step)
            lat = step.latency
            print(
                f"  c={concurrency}: {step.ok}/{step.requests} ok, {step.images_per_s:.2f} img/s"
                + (f", p50 {lat.p50_s * 1000:.0f} ms, p99 {lat.p99_s * 1000:.0f} ms" if lat else ""),
                flush=True,
            )
    return steps


# -- report ---------------------------------------------------------------------------------------


def _row(step: StepResult) -> dict:
    lat = step.latency
    return {
        "concurrency": step.concurrency,
        "requests": step.requests,
        "ok": step.ok,
        "errors": step.errors,
        "duration_s": round(step.duration_s, 3),
        "images_per_s": round(step.images_per_s, 3),
        "p50_ms": round(lat.p50_s * 1000, 1) if lat else None,
        "p99_ms": round(lat.p99_s * 1000, 1) if lat else None,
    }


def verdicts(results: dict[str, list[dict]]) -> list[str]:
    """Where our FastAPI service is not at least as fast as a peer at no worse a p99, said plainly."""
    lines = []
    ours = {row["concurrency"]: row for row in results.get("fastapi", [])}
    for peer in (p for p in SERVERS if p != "fastapi" and p in results):
        for row in results[peer]:
            mine = ours.get(row["concurrency"])
            if mine is None or mine["p99_ms"] is None or row["p99_ms"] is None:
                continue
            faster = mine["images_per_s"] >= row["images_per_s"]
            tighter = mine["p99_ms"] <= row["p99_ms"]
            if not (faster and tighter):
                lines.append(
                    f"c={row['concurrency']}: FastAPI {mine['images_per_s']:.2f} img/s, p99 {mine['p99_ms']:.0f} ms vs "
                    f"{LABELS[peer]} {row['images_per_s']:.2f} img/s, p99 {row['p99_ms']:.0f} ms: "
                    + ("lower throughput" if not faster else "")
                    + (" and " if not faster and not tighter else "")
                    + ("higher p99" if not tighter else "")
                )
    return lines


def markdown(report: dict) -> str:
    machine = report["machine"]
    out = [
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), no GPU; client and servers on the same machine"
        + (", in a network namespace with only loopback" if report["netns"] else "")
        + f"; 1-minute load average {report['load_average_1m']['before']} before, "
        f"{report['load_average_1m']['after']} after.",
        f"Workload: {report['workload']['images']} `make-shapes` images {report['workload']['size']}, model "
        f"`{report['model']}`, score threshold {report['score_threshold']}, max batch {report['max_batch_size']}; "
        f"closed loop, {report['requests_per_step'] or ''}"
        + (" requests" if report["requests_per_step"] else f"{report['duration_s']} s")
        + " per step after "
        f"{report['warmup']} warm-up requests.",
        "",
        *markdown_table(
            ["server", "clients", "ok/requests", "img/s", "p50 ms", "p99 ms"],
            (
                [
                    LABELS[name],
                    row["concurrency"],
                    f"{row['ok']}/{row['requests']}",
                    f"{row['images_per_s']:.2f}",
                    f"{row['p50_ms']:.0f}",
                    f"{row['p99_ms']:.0f}",
                ]
                for name, rows in report["results"].items()
                for row in rows
            ),
            align="lrrrrr",
        ),
        "",
    ]
    if report["verdicts"]:
        out.append("Where the FastAPI service is not ahead (throughput >= and p99 <= the peer's):")
        out += [f"* {line}" for line in report["verdicts"]]
    else:
        out.append("The FastAPI service's throughput is >= each peer's at a p99 <= the peer's, at every concurrency.")
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in report["results"].items():
        levels = [r["concurrency"] for r in rows]
        left.plot(levels, [r["images_per_s"] for r in rows], marker="o", label=LABELS[name])
        right.plot(levels, [r["p99_ms"] for r in rows], marker="o", label=LABELS[name])
    for axis, title in ((left, "throughput (img/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(report["concurrency"], [str(c) for c in report["concurrency"]])
        axis.set_xlabel("concurrent clients (closed loop)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"Peers on {report['machine']['cpus']} CPUs, same model, images and client")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, default=None, help="measured requests per step (default 24)")
    amount.add_argument("--duration", type=float, default=None, help="or seconds per step")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each step")
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--image-size", default="384x384")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "bench-results" / "peers"))
    parser.add_argument("--litserve-version", default="0.2.19")
    parser.add_argument("--litserve-venv", default=str(Path.home() / ".cache" / "transfiner" / "litserve-venv"))
    parser.add_argument("--no-netns", action="store_true", help="do not run inside a loopback-only namespace")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # already in the namespace
    args = parser.parse_args(argv)
    if args.requests is None and args.duration is None:
        args.requests = 24
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    litserve_python = None
    if "litserve" in args.servers:
        # Before entering the namespace: pip needs the network.
        litserve_python = ensure_litserve(Path(args.litserve_venv), args.litserve_version)
    can_isolate = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
    if not args.inside and not args.no_netns and can_isolate:
        script = 'ip link set lo up && exec "$0" "$@"'
        arguments = argv if argv is not None else sys.argv[1:]
        command = [sys.executable, "-m", "scripts.bench_peers", *arguments, "--inside"]
        return subprocess.run(["unshare", "--net", "sh", "-c", script, *command]).returncode

    images = generate_images(out, args.num_images, args.image_size, args.seed)
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {}
    for name in args.servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = out / f"{name}.log"
        print(f"{LABELS[name]}: starting on {url}", flush=True)
        started = time.monotonic()
        process = start_server(name, args, port, log, litserve_python)
        try:
            ready_path = "/health" if name == "litserve" else "/health/ready"
            wait_for_server(process, url, log, timeout=300, path=ready_path)
            print(f"  ready in {time.monotonic() - started:.1f} s", flush=True)
            results[name] = [_row(step) for step in asyncio.run(measure(url, images, args))]
        finally:
            stop_process_group(process, 90)
    report = {
        "command": " ".join(["python -m scripts.bench_peers", *(argv if argv is not None else sys.argv[1:])]).replace(
            " --inside", ""
        ),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "netns": args.inside,
        "model": args.model,
        "workload": {"images": len(images), "size": args.image_size, "seed": args.seed},
        "score_threshold": args.score_threshold,
        "max_batch_size": args.max_batch_size,
        "concurrency": args.concurrency,
        "requests_per_step": args.requests,
        "duration_s": args.duration,
        "warmup": args.warmup,
        "litserve_version": args.litserve_version,
        "results": results,
        # Other work on the machine skews every figure; the 1-minute load average says how much.
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    report["verdicts"] = verdicts(results)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "peers.png")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
