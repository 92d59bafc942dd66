"""The service under overload and attack: does every request pay only for itself?

Against one ``transfiner serve`` process on loopback (its own model, CPU or GPU), in one run:

1. capacity: a closed loop of ``2 x max_batch_size`` clients; images/s is the capacity;
2. a costly batch-mate: ordinary requests sent together, with and without one request that asks
   for every detection (``score_threshold=0``); their latency ratio (goal: at most 1.5). These
   clients wait as long as it takes;
3. overload: Poisson arrivals at ``--factor`` x capacity for ``--overload-s``; goodput (answers/s
   vs capacity, goal >= 80%), the share of the images the model computed that reached a waiting
   client (goal >= 95%), whether every refusal was a 503/429 with Retry-After, and the p99 of the
   successes against their deadline;
4. soak: ``--soak-factor`` x capacity for ``--soak-s``: errors and resident memory over time;
5. slow uploads: ``--stalled`` connections that send part of a declared body and then stall
   (reconnecting when the server times them out), next to a normal closed-loop client;
6. a 40-megapixel upload (a PNG of zeros, 116 KB): the server's resident memory before, at its
   peak, and after.

Every client sends ``X-Request-Timeout: --deadline`` and gives up 2 s after it (time for the
server's own 504 to arrive). Figures go
to ``<out>/overload.json`` and ``<out>/overload.md``.

    python -m scripts.bench_overload --model default --out bench-results/overload
    python -m scripts.bench_overload --model tiny.pth --overload-s 10 --soak-s 10 --out /tmp/o
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from scripts.bench_service import synthetic_png
from scripts.results import markdown_table
from transfiner.service.loadtest.client import TRANSPORT_ERRORS, poisson_arrivals, run_closed_loop, run_open_loop
from transfiner.service.loadtest.metrics_delta import scrape
from transfiner.service.loadtest.report import LatencyStats
from transfiner.service.loadtest.servers import SERVE_COMMAND, free_port, wait_for_server


def zeros_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


# -- one request, as a client that keeps what a refusal says --------------------------------------


@dataclass
class Outcome:
    scheduled_s: float
    latency_s: float
    status: int | None  # None: no answer within the deadline (or the connection failed)
    retry_after: bool = False
    code: str | None = None  # a refusal's or error's code, from the service's JSON error


@dataclass
class Client:
    url: str
    deadline_s: float
    images: list[bytes]
    http: httpx.AsyncClient = field(init=False)
    outcomes: list[Outcome] = field(default_factory=list)
    origin: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=self.patience_s, limits=limits)

    @property
    def patience_s(self) -> float:
        """The deadline plus 2 s: the server's own 504 at the deadline must have time to arrive."""
        return self.deadline_s + 2.0

    async def send(self, index: int, params: dict | None = None) -> int:
        scheduled = time.perf_counter()
        status, retry_after, code = None, False, None
        try:
            response = await asyncio.wait_for(
                self.http.post(
                    "/v1/segment",
                    content=self.images[index % len(self.images)],
                    params=params or {},
                    headers={"X-Request-Timeout": str(self.deadline_s), "Content-Type": "image/png"},
                ),
                self.patience_s,
            )
            status, retry_after = response.status_code, "retry-after" in response.headers
            code = error_code(response)
        except TRANSPORT_ERRORS:
            pass
        latency = time.perf_counter() - scheduled
        self.outcomes.append(Outcome(scheduled - self.origin, latency, status, retry_after, code))
        if status is None:
            raise httpx.ReadTimeout("no answer within the deadline")
        return status

    def reset(self) -> None:
        self.outcomes = []
        self.origin = time.perf_counter()


DEADLINE_PASSED = "the request's deadline passed "


def error_code(response: httpx.Response) -> str | None:
    """The ``error.code`` of an answer in the service's error shape (for a 504, with where the
    deadline passed); None for any other answer."""
    if response.status_code < 400 or not response.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if error["code"] == "deadline_exceeded":  # where: "in the queue", "waiting for the model", ...
        return f"deadline_exceeded ({error['message'].removeprefix(DEADLINE_PASSED)})"
    return error["code"]


def count_codes(outcomes: list[Outcome]) -> dict[str, int]:
    """Refusals and errors by status and code (``503 overloaded``), for telling them apart."""
    counts: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.status is not None and outcome.status >= 400:
            key = f"{outcome.status} {outcome.code or '(not the service JSON)'}"
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def latency_ms(outcomes: list[Outcome]) -> dict:
    stats = LatencyStats.of([o.latency_s for o in outcomes if o.status == 200])
    if stats is None:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": round(stats.p50_s * 1000, 1), "p99_ms": round(stats.p99_s * 1000, 1)}


def count_statuses(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        key = str(outcome.status) if outcome.status is not None else "no answer"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# -- the phases -----------------------------------------------------------------------------------


async def capacity(client: Client, concurrency: int, seconds: float) -> dict:
    await run_closed_loop(client.send, concurrency, requests=2 * concurrency)  # warm
    client.reset()
    run = await run_closed_loop(client.send, concurrency, duration_s=seconds)
    ok = sum(r.ok for r in run.records)
    return {
        "concurrency": concurrency,
        "requests": len(run.records),
        "ok": ok,
        "images_per_s": ok / run.duration_s,
        **latency_ms(client.outcomes),
    }


async def costly_batch_mate(client: Client, rounds: int, mates: int) -> dict:
    """Median latency of ``mates`` ordinary requests sent at once, alone and with a request for
    every detection (threshold 0) sent with them."""

    async def timed(index: int, params: dict | None = None) -> float | None:
        started = time.perf_counter()
        try:
            status = await client.send(index, params)
        except TRANSPORT_ERRORS:
            return None
        return time.perf_counter() - started if status == 200 else None

    alone, together, costly = [], [], []
    for _ in range(rounds):
        alone += await asyncio.gather(*(timed(i) for i in range(mates)))
        *ordinary, expensive = await asyncio.gather(
            *(timed(i) for i in range(mates)), timed(mates, {"score_threshold": "0"})
        )
        together += ordinary
        costly.append(expensive)
    failed = sum(v is None for v in alone + together + costly)
    alone, together, costly = ([v for v in values if v is not None] for values in (alone, together, costly))
    return {
        "mates": mates,
        "rounds": rounds,
        "failed": failed,
        "ordinary_alone_p50_ms": round(float(np.median(alone)) * 1000, 1),
        "ordinary_with_costly_p50_ms": round(float(np.median(together)) * 1000, 1),
        "costly_p50_ms": round(float(np.median(costly)) * 1000, 1),
        "ratio": float(np.median(together) / np.median(alone)),
    }


async def open_loop(client: Client, url: str, rate: float, seconds: float, pid: int | None, seed: int) -> dict:
    """Poisson arrivals at ``rate`` for ``seconds``; ``pid``: the server process whose resident
    memory is sampled (None: none is, as for Ray's replicas, processes of Ray's own)."""
    async with httpx.AsyncClient() as http:
        before = await scrape(http, [url + "/metrics"])
        client.reset()
        rss: list[tuple[float, float]] = []
        stop = asyncio.Event()

        async def sample_memory() -> None:
            while pid is not None and not stop.is_set():
                rss.append((time.perf_counter() - client.origin, resident_mb(pid)))
                await asyncio.sleep(5)

        sampler = asyncio.create_task(sample_memory())
        arrivals = poisson_arrivals(rate, duration_s=seconds, seed=seed)
        run = await run_open_loop(client.send, arrivals, max_outstanding=100_000)
        stop.set()
        await sampler
        after = await scrape(http, [url + "/metrics"])
    delta = after.minus(before)
    batches = delta.histogram("transfiner_batch_size")
    computed = batches.sum or 0.0
    outcomes = client.outcomes
    ok = [o for o in outcomes if o.status == 200]
    refused = [o for o in outcomes if o.status in (429, 503)]
    latest_ok = max((o.latency_s for o in ok), default=0.0)
    return {
        "offered_rate": rate,
        "seconds": seconds,
        "arrivals": len(arrivals),
        "duration_s": run.duration_s,
        "statuses": count_statuses(outcomes),
        "codes": count_codes(outcomes),
        "answers_per_s": len(ok) / run.duration_s,
        "images_computed": computed,
        "mean_batch_size": (computed / batches.count) if batches.count else None,
        "delivered_share": (len(ok) / computed) if computed else None,
        "refusals_with_retry_after": f"{sum(o.retry_after for o in refused)}/{len(refused)}",
        "max_ok_latency_s": latest_ok,
        "ok_past_deadline": sum(o.latency_s > client.deadline_s for o in ok),
        **latency_ms(outcomes),
        "rss_mb": [(round(t, 1), round(m, 1)) for t, m in rss],
    }


def stall_forever(port: int, count: int, stop: threading.Event, timed_out: list[int]) -> None:
    """``count`` connections that declare a 100 KB PNG body, send 16 bytes of it and stall; when the
    server closes one (408), it is opened again at once."""
    head = (
        b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
        b"\x89PNG\r\n\x1a\n" + bytes(8)
    )

    def open_one() -> socket.socket:
        connection = socket.create_connection(("127.0.0.1", port))
        connection.sendall(head)
        connection.setblocking(False)
        return connection

    connections = [open_one() for _ in range(count)]
    while not stop.is_set():
        time.sleep(0.2)
        for i, connection in enumerate(connections):
            try:
                data = connection.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 408"):
                timed_out.append(1)
            connection.close()
            connections[i] = open_one()
    for connection in connections:
        connection.close()


async def slow_uploads(client: Client, port: int, stalled: int, seconds: float) -> dict:
    stop, timed_out = threading.Event(), []
    attacker = threading.Thread(target=stall_forever, args=(port, stalled, stop, timed_out), daemon=True)
    attacker.start()
    await asyncio.sleep(1.0)  # every stalled connection is open
    client.reset()
    try:
        run = await run_closed_loop(client.send, 2, duration_s=seconds)
    finally:
        stop.set()
        attacker.join(timeout=30)
    ok = sum(r.ok for r in run.records)
    return {
        "stalled_connections": stalled,
        "normal_requests": len(run.records),
        "normal_ok": ok,
        "normal_images_per_s": ok / run.duration_s,
        "stalled_answered_408": len(timed_out),
        "statuses": count_statuses(client.outcomes),
        **latency_ms(client.outcomes),
    }


async def big_upload(url: str, pid: int) -> dict:
    data = zeros_png(6320)  # 39.9 megapixels
    peak = before = resident_mb(pid)
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_mb(pid))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    async with httpx.AsyncClient(timeout=300) as http:
        response = await http.post(url + "/v1/segment", content=data, params={"mask_format": "none"})
    done.set()
    await watcher
    await asyncio.sleep(2.0)
    after = resident_mb(pid)
    return {
        "upload_bytes": len(data),
        "megapixels": 6320 * 6320 / 1e6,
        "status": response.status_code,
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_after_mb": round(after, 1),
        "rise_mb": round(peak - before, 1),
        "after_vs_before": round(after / before, 3),
    }


# -- report ---------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    cap = report["capacity"]["images_per_s"]
    lines = [
        "# Overload benchmark",
        "",
        f"`{report['command']}` on {report['machine']}",
        "",
        f"Capacity: **{cap:.2f} images/s** (closed loop, {report['capacity']['concurrency']} clients; "
        f"p50 {report['capacity']['p50_ms']} ms, p99 {report['capacity']['p99_ms']} ms).",
        "",
    ]
    mates = report.get("costly_batch_mate")
    if mates:
        lines += [
            "## A costly batch-mate",
            "",
            f"{mates['mates']} ordinary requests at once, {mates['rounds']} rounds: "
            f"p50 {mates['ordinary_alone_p50_ms']} ms alone, {mates['ordinary_with_costly_p50_ms']} ms "
            "with a `score_threshold=0` request among them "
            f"(**ratio {mates['ratio']:.2f}**, goal <= 1.5); the costly one took {mates['costly_p50_ms']} ms.",
            "",
        ]
    open_loops = []
    for name in ("overload", "soak"):
        run = report.get(name)
        if run:
            delivered = "-" if run["delivered_share"] is None else f"{100 * run['delivered_share']:.1f}%"
            open_loops.append(
                [
                    name,
                    f"{run['offered_rate']:.2f}/s for {run['seconds']:.0f} s",
                    run["statuses"],
                    f"{run['answers_per_s']:.2f}",
                    f"{100 * run['answers_per_s'] / cap:.0f}%",
                    delivered,
                    run["refusals_with_retry_after"],
                    run["p50_ms"],
                    run["p99_ms"],
                    f"{run['max_ok_latency_s']:.2f}",
                ]
            )
    lines += [
        "## Open loop",
        "",
        *markdown_table(
            [
                "run",
                "offered",
                "statuses",
                "answers/s",
                "goodput vs capacity",
                "computed images delivered",
                "refusals with Retry-After",
                "p50 ms",
                "p99 ms",
                "slowest success s",
            ],
            open_loops,
            align="lrlrrrlrrr",
        ),
    ]
    soak = report.get("soak")
    if soak and soak["rss_mb"]:
        first, last = soak["rss_mb"][0][1], soak["rss_mb"][-1][1]
        lines += [
            "",
            f"Soak resident memory: {first:.0f} MB at the start, {last:.0f} MB at the end "
            f"({100 * (last - first) / first:+.1f}%).",
        ]
    slow = report.get("slow_uploads")
    if slow:
        lines += [
            "",
            "## Slow uploads",
            "",
            f"{slow['stalled_connections']} stalled uploads (reopened when timed out; "
            f"{slow['stalled_answered_408']} answered 408) next to 2 normal clients: "
            f"{slow['normal_ok']}/{slow['normal_requests']} normal requests answered 200 "
            f"({slow['normal_images_per_s']:.2f} images/s, p50 {slow['p50_ms']} ms, p99 {slow['p99_ms']} ms).",
        ]
    big = report.get("big_upload")
    if big:
        lines += [
            "",
            "## A 40-megapixel upload",
            "",
            f"{big['megapixels']:.1f} Mpx PNG of {big['upload_bytes']} bytes: status {big['status']}; resident "
            f"memory {big['rss_before_mb']} MB before, {big['rss_peak_mb']} MB at the peak "
            f"(**+{big['rise_mb']} MB**, goal < 300), {big['rss_after_mb']} MB after "
            f"({big['after_vs_before']:.3f} x before, goal within 10%).",
        ]
    return "\n".join(lines) + "\n"


PHASES = ("mates", "overload", "soak", "slow", "big")  # capacity always runs: the others are sized by it


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}"


async def main_async(args: argparse.Namespace, url: str, port: int, pid: int) -> dict:
    images = [synthetic_png(480, 640, seed) for seed in range(4)]
    client = Client(url, args.deadline, images)
    report: dict = {
        "command": " ".join(["python -m scripts.bench_overload", *sys.argv[1:]]),
        "machine": machine(),
        "deadline_s": args.deadline,
    }
    out = Path(args.out)

    def save() -> None:
        (out / "overload.json").write_text(json.dumps(report, indent=2))
        if "capacity" in report:
            (out / "overload.md").write_text(markdown(report))

    try:
        print("capacity ...", flush=True)
        report["capacity"] = await capacity(client, 2 * args.max_batch_size, args.capacity_s)
        cap = report["capacity"]["images_per_s"]
        print(f"  {cap:.2f} images/s", flush=True)
        save()
        if "mates" in args.phases:
            print("costly batch-mate ...", flush=True)
            # A patient client: the costly request takes many times an ordinary one's deadline.
            patient = Client(url, 300.0, images)  # the service's longest deadline
            try:
                report["costly_batch_mate"] = await costly_batch_mate(patient, args.rounds, args.max_batch_size - 1)
            finally:
                await patient.http.aclose()
            save()
        if "overload" in args.phases:
            print(f"overload: {args.factor} x capacity for {args.overload_s} s ...", flush=True)
            report["overload"] = await open_loop(client, url, args.factor * cap, args.overload_s, pid, seed=1)
            save()
            await asyncio.sleep(args.deadline)  # the queue empties before the next phase
        if "soak" in args.phases:
            print(f"soak: {args.soak_factor} x capacity for {args.soak_s} s ...", flush=True)
            report["soak"] = await open_loop(client, url, args.soak_factor * cap, args.soak_s, pid, seed=2)
            save()
        if "slow" in args.phases:
            print(f"slow uploads: {args.stalled} stalled connections ...", flush=True)
            report["slow_uploads"] = await slow_uploads(client, port, args.stalled, args.slow_s)
            save()
        if "big" in args.phases:
            print("a 40-megapixel upload ...", flush=True)
            report["big_upload"] = await big_upload(url, pid)
            save()
    finally:
        await client.http.aclose()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_overload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument(
        "--deadline", type=float, default=30.0, help="X-Request-Timeout (default: the service's default deadline)"
    )
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="what to run")
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--factor", type=float, default=5.0)
    parser.add_argument("--overload-s", type=float, default=60.0)
    parser.add_argument("--soak-factor", type=float, default=0.8)
    parser.add_argument("--soak-s", type=float, default=180.0)
    parser.add_argument("--stalled", type=int, default=70)
    parser.add_argument("--slow-s", type=float, default=30.0)
    parser.add_argument("--out", default="bench-results/overload")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *SERVE_COMMAND,
        "--model",
        args.model,
        "--device",
        args.device,
        "--port",
        str(port),
        "--max-batch-size",
        str(args.max_batch_size),
        "--log-level",
        "warning",
    ]
    with open(out / "server.log", "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_server(server, url, out / "server.log", timeout=600)
        report = asyncio.run(main_async(args, url, port, server.pid))
    finally:
        server.terminate()
        server.wait(timeout=120)
    print(markdown(report))
    print(f"wrote {out / 'overload.json'} and {out / 'overload.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
