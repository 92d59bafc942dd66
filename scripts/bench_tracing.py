"""What does tracing cost? The service with tracing off, then on (OTLP/HTTP to a loopback sink).

``transfiner serve`` runs in a subprocess twice per round: without any ``OTEL_*`` variable, then
with ``OTEL_TRACES_EXPORTER=otlp`` and the endpoint of a sink in this process that accepts every
export and drops it (counting its spans, to show that they were sent). Each server is driven by a
closed loop of ``--concurrency`` clients (``service.loadtest``, as ``transfiner bench``) after a
warm-up; rounds alternate off and on, so that a machine's drift falls on both. The report gives
throughput and p50/p99 latency side by side (the median round of each) and the ratio of the
throughputs (goal: tracing on at least 0.97 of off).

    python -m scripts.bench_tracing --model default --requests 400 --rounds 3 --out bench-results/tracing
    python -m scripts.bench_tracing --model tiny.pth --requests 24 --rounds 1 --out /tmp/tracing
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from scripts.bench_service import summarise, synthetic_png
from scripts.results import markdown_table, write_report
from transfiner.service.loadtest.client import SegmentClient, WorkloadImage, run_closed_loop
from transfiner.service.loadtest.servers import SERVE_COMMAND, free_port, stop_process_group, wait_for_server


class DroppingSink:
    """An OTLP/HTTP endpoint on loopback that answers every export with success and keeps only
    the number of spans it was sent."""

    def __init__(self) -> None:
        self.spans = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                request = ExportTraceServiceRequest()
                request.ParseFromString(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def server_environment(tracing: bool, endpoint: str, torch_threads: int | None) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    if tracing:
        env.update(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)
    if torch_threads:
        env["TRANSFINER_TORCH_THREADS"] = str(torch_threads)
    return env


async def drive(url: str, image: WorkloadImage, concurrency: int, requests: int) -> dict:
    async with SegmentClient(url, [image], timeout_s=600, max_connections=concurrency) as client:
        await run_closed_loop(client.send, concurrency, requests=2 * concurrency)  # warm-up
        return summarise(await run_closed_loop(client.send, concurrency, requests=requests))


def run_server(args: argparse.Namespace, tracing: bool, sink: DroppingSink, image: WorkloadImage, log: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [*SERVE_COMMAND, "--model", args.model, "--device", args.device, "--port", str(port)]
    command += ["--max-queue-size", str(max(64, 4 * args.concurrency)), "--log-level", "warning"]
    if args.max_batch_size:
        command += ["--max-batch-size", str(args.max_batch_size)]
    env = server_environment(tracing, sink.endpoint, args.torch_threads)
    with open(log, "w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_server(server, url, log, timeout=600)
        before = sink.spans
        result = asyncio.run(drive(url, image, args.concurrency, args.requests))
    finally:
        stop_process_group(server)  # its last spans are exported at shutdown
    return {**result, "spans_exported": sink.spans - before}


def median_round(rounds: list[dict]) -> dict:
    """The round of median throughput (its latencies with it, from one run)."""
    ordered = sorted(rounds, key=lambda r: r["throughput"])
    return ordered[(len(ordered) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_tracing", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' or a checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    parser.add_argument("--requests", type=int, default=200, help="measured requests per server")
    parser.add_argument("--rounds", type=int, default=1, help="off/on pairs, alternating")
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: the server's")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--out", default="bench-results/tracing")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = synthetic_png(args.height, args.width)
    image = WorkloadImage("bench.png", png, "image/png", args.width, args.height)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    sink = DroppingSink()
    try:
        for round_index in range(args.rounds):
            for mode in ("off", "on"):
                print(f"round {round_index + 1}/{args.rounds}: tracing {mode} ...", flush=True)
                log = out / f"server-{mode}-{round_index + 1}.log"
                runs[mode].append(run_server(args, mode == "on", sink, image, log))
    finally:
        sink.close()

    chosen = {mode: median_round(rounds) for mode, rounds in runs.items()}
    ratio = chosen["on"]["throughput"] / chosen["off"]["throughput"]
    ratios = [on["throughput"] / off["throughput"] for off, on in zip(runs["off"], runs["on"])]
    lines = markdown_table(
        ["tracing", "requests", "images/s", "p50 ms", "p99 ms", "spans exported"],
        (
            [
                mode,
                r["requests"],
                f"{r['throughput']:.2f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                r["spans_exported"],
            ]
            for mode, r in chosen.items()
        ),
        align="lrrrrr",
    )
    summary = (
        f"Throughput on / off: {ratio:.3f} (goal >= 0.97); per round: {', '.join(f'{x:.3f}' for x in ratios)}. "
        f"p99 on / off: {chosen['on']['p99_ms'] / chosen['off']['p99_ms']:.3f}."
    )
    print("\n".join(lines))
    print(summary)
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    report = {
        "settings": vars(args),
        "machine": machine,
        "runs": runs,
        "median_round": chosen,
        "throughput_ratio_on_over_off": ratio,
        "ratios_per_round": ratios,
    }
    markdown = "# Tracing overhead\n\n" + "\n".join(lines) + f"\n\n{summary}\n\nSettings: `{vars(args)}`\n"
    paths = write_report(out, "bench_tracing", report, markdown)
    print("wrote " + ", ".join(map(str, paths)))


if __name__ == "__main__":
    main()
