"""A model repository under load: version swaps, two models side by side, a flood on one.

Against one ``transfiner serve --model-repository`` process on loopback (CPU), in one run:

1. swap: a closed loop of ``--clients`` on model ``a``; its p99 in steady state, then while
   version 2 is copied into the repository (from the copy until version 1 has unloaded, plus
   ``--after-s``): errors, and the p99 against the steady one (goal: 0 errors, at most 2x);
2. memory: the server's resident memory with one model loaded, then two (model ``b`` added to
   the repository): the host memory an extra loaded model costs;
3. share: the images/s of ``a`` and of ``b`` each alone (the other idle) and both at once under
   the same closed loops (goal: each at least 45% of its alone figure);
4. flood: ``b`` at ``--quiet-factor`` x its capacity (Poisson) alone, then with ``a`` flooded at
   ``--flood-factor`` x its capacity: ``b``'s goodput against its alone figure (goal: at least 80%).

Both models are copies of ``--model`` (the shipped model by default): two models of the same
cost, so that their shares can be read off directly. Figures go to ``<out>/repository.json`` and
``<out>/repository.md``.

    python -m scripts.bench_repository --out bench-results/repository
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from scripts.bench_overload import resident_mb
from scripts.bench_service import synthetic_png
from scripts.results import markdown_table
from transfiner.export.resolve import resolve_model
from transfiner.service.loadtest.client import (
    poisson_arrivals,
    run_closed_loop,
    run_open_loop,
    segment_path,
)
from transfiner.service.loadtest.report import LatencyStats
from transfiner.service.loadtest.servers import SERVE_COMMAND, free_port, wait_for_server


def add_version(root: Path, name: str, version: int, weights: Path) -> None:
    """A version copied beside the repository, then renamed into it (a poll never sees half)."""
    staging = root.parent / f"staging-{name}-{version}"
    staging.mkdir()
    shutil.copy(weights, staging / "model.pth")
    (root / name).mkdir(exist_ok=True)
    os.rename(staging, root / name / str(version))


class Sender:
    """Posts the workload's image to one model; a client that gives up 2 s after the deadline."""

    def __init__(self, http: httpx.AsyncClient, model: str, png: bytes) -> None:
        self.http, self.path, self.png = http, segment_path(model), png

    async def send(self, index: int) -> int:
        response = await self.http.post(self.path, content=self.png, headers={"Content-Type": "image/png"})
        return response.status_code


def p99_ms(records) -> float | None:
    stats = LatencyStats.of([r.latency_s for r in records if r.ok])
    return None if stats is None else round(stats.p99_s * 1000, 1)


def images_per_s(run) -> float:
    return sum(r.ok for r in run.records) / run.duration_s


def index(url: str) -> list[dict]:
    return httpx.get(url + "/v1/repository/index", timeout=10).json()


async def wait_until(condition, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > end:
            raise RuntimeError("timed out")
        await asyncio.sleep(0.1)


async def measure(args: argparse.Namespace, url: str, root: Path, weights: Path, pid: int) -> dict:
    png = synthetic_png(args.image_size, args.image_size)
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=url, timeout=args.deadline + 2, limits=limits) as http:
        a, b = Sender(http, "a", png), Sender(http, "b", png)
        figures: dict = {}

        # 1. swap under load
        await run_closed_loop(a.send, args.clients, requests=2 * args.clients)  # warm
        steady = await run_closed_loop(a.send, args.clients, duration_s=args.steady_s)
        # The same closed loop, on while version 2 is copied in, loads, warms up and takes over.
        swap_window: list[float] = []

        async def swap() -> None:
            await asyncio.sleep(args.after_s)
            swap_window.append(time.perf_counter())
            await asyncio.to_thread(add_version, root, "a", 2, weights)
            await wait_until(lambda: [r.get("version") for r in index(url) if r["name"] == "a"] == ["2"])
            swap_window.append(time.perf_counter())

        swapping = asyncio.create_task(swap())
        run_started = time.perf_counter()
        during = await run_closed_loop(a.send, args.clients, duration_s=args.steady_s)
        await swapping
        swapped_s = swap_window[1] - swap_window[0]
        # The requests sent from the copy until ``after_s`` after version 1 had gone.
        window = (swap_window[0] - run_started, swap_window[1] + args.after_s - run_started)
        swap_records = [r for r in during.records if window[0] <= r.scheduled_s <= window[1]]
        errors = sum(not r.ok for r in swap_records)
        figures["swap"] = {
            "clients": args.clients,
            "steady_requests": len(steady.records),
            "steady_statuses": statuses(steady.records),
            "steady_p99_ms": p99_ms(steady.records),
            "swap_requests": len(swap_records),
            "all_errors_of_the_swap_run": sum(not r.ok for r in during.records),
            "swap_statuses": statuses(swap_records),
            "swap_errors": errors,
            "swap_p99_ms": p99_ms(swap_records),
            "swap_s": round(swapped_s, 2),
        }
        figures["swap"]["p99_ratio"] = round(figures["swap"]["swap_p99_ms"] / figures["swap"]["steady_p99_ms"], 2)

        # 2. memory per extra loaded model
        await asyncio.sleep(2)
        one = resident_mb(pid)
        await asyncio.to_thread(add_version, root, "b", 1, weights)
        await wait_until(lambda: any(r["name"] == "b" and r["state"] == "READY" for r in index(url)))
        await run_closed_loop(b.send, args.clients, requests=2 * args.clients)  # b warm as a was
        await asyncio.sleep(2)
        two = resident_mb(pid)
        figures["memory"] = {"rss_one_model_mb": round(one, 1), "rss_two_models_mb": round(two, 1)}
        figures["memory"]["extra_model_mb"] = round(two - one, 1)
        figures["memory"]["weights_mb"] = round(weights.stat().st_size / 2**20, 1)

        # 3. throughput shares
        concurrency = 2 * args.max_batch_size
        alone_a = await run_closed_loop(a.send, concurrency, duration_s=args.capacity_s)
        alone_b = await run_closed_loop(b.send, concurrency, duration_s=args.capacity_s)
        both_a, both_b = await asyncio.gather(
            run_closed_loop(a.send, concurrency, duration_s=args.capacity_s),
            run_closed_loop(b.send, concurrency, duration_s=args.capacity_s),
        )
        cap_a, cap_b = images_per_s(alone_a), images_per_s(alone_b)
        figures["share"] = {
            "concurrency_each": concurrency,
            "a_alone_images_per_s": round(cap_a, 3),
            "b_alone_images_per_s": round(cap_b, 3),
            "a_both_images_per_s": round(images_per_s(both_a), 3),
            "b_both_images_per_s": round(images_per_s(both_b), 3),
        }
        figures["share"]["statuses"] = {
            name: statuses(run.records)
            for name, run in (("a_alone", alone_a), ("b_alone", alone_b), ("a_both", both_a), ("b_both", both_b))
        }
        figures["share"]["a_share"] = round(images_per_s(both_a) / cap_a, 3)
        figures["share"]["b_share"] = round(images_per_s(both_b) / cap_b, 3)

        # 4. a flood on a, b's goodput
        async def open_loop(sender: Sender, rate: float, seed: int):
            arrivals = poisson_arrivals(rate, duration_s=args.flood_s, seed=seed)
            return await run_open_loop(sender.send, arrivals, max_outstanding=1000)

        quiet_rate, flood_rate = args.quiet_factor * cap_b, args.flood_factor * cap_a
        quiet_alone = await open_loop(b, quiet_rate, 1)
        flood, quiet = await asyncio.gather(open_loop(a, flood_rate, 2), open_loop(b, quiet_rate, 1))
        goodput = lambda run: sum(r.ok for r in run.records) / args.flood_s  # noqa: E731
        figures["flood"] = {
            "b_offered_per_s": round(quiet_rate, 3),
            "a_offered_per_s": round(flood_rate, 3),
            "b_alone_goodput_per_s": round(goodput(quiet_alone), 3),
            "b_flooded_goodput_per_s": round(goodput(quiet), 3),
            "b_alone_statuses": statuses(quiet_alone.records),
            "b_flooded_statuses": statuses(quiet.records),
            "a_flood_statuses": statuses(flood.records),
            "a_flood_goodput_per_s": round(goodput(flood), 3),
        }
        figures["flood"]["b_ratio"] = round(goodput(quiet) / goodput(quiet_alone), 3)
        return figures


def statuses(records) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        key = str(record.status) if record.status is not None else (record.error or "no answer")
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "repository.json").write_text(json.dumps(result, indent=2) + "\n")
    f = result["figures"]
    rows = [
        ["swap: errors", f["swap"]["swap_errors"], "0"],
        ["swap: p99 steady / during swap (ms)", f"{f['swap']['steady_p99_ms']} / {f['swap']['swap_p99_ms']}", ""],
        ["swap: p99 ratio", f["swap"]["p99_ratio"], "<= 2"],
        ["memory: extra loaded model (MB, host RSS)", f["memory"]["extra_model_mb"], "reported"],
        ["share: a both / alone", f["share"]["a_share"], ">= 0.45"],
        ["share: b both / alone", f["share"]["b_share"], ">= 0.45"],
        ["flood on a: b goodput / alone", f["flood"]["b_ratio"], ">= 0.8"],
    ]
    table = "\n".join(markdown_table(["figure", "value", "goal"], rows))
    text = f"# Model repository benchmark\n\n{result['command']}\n\n{table}"
    (out / "repository.md").write_text(text + "\n")
    print(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="the checkpoint both models copy (default: the shipped one)")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients of the swap phase")
    parser.add_argument("--steady-s", type=float, default=30.0)
    parser.add_argument("--after-s", type=float, default=5.0)
    parser.add_argument("--capacity-s", type=float, default=30.0)
    parser.add_argument("--flood-s", type=float, default=45.0)
    parser.add_argument("--quiet-factor", type=float, default=0.4)
    parser.add_argument("--flood-factor", type=float, default=5.0)
    parser.add_argument("--deadline", type=float, default=30.0, help="the server's default request deadline")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--out", default="bench-results/repository")
    args = parser.parse_args()

    weights = resolve_model(args.model).path
    with tempfile.TemporaryDirectory(prefix="bench-repository-") as tmp:
        root = Path(tmp) / "repository"
        root.mkdir()
        add_version(root, "a", 1, weights)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "server.log"
        command = [
            *SERVE_COMMAND,
            "--model-repository",
            str(root),
            "--device",
            "cpu",
            "--port",
            str(port),
            "--max-batch-size",
            str(args.max_batch_size),
            "--repository-poll-s",
            "0.5",
            "--log-level",
            "warning",
        ]
        with open(log, "w") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_server(process, url, log, timeout=300)
            figures = asyncio.run(measure(args, url, root, weights, process.pid))
        finally:
            process.terminate()
            process.wait(timeout=60)
    result = {
        "command": "python -m scripts.bench_repository "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d"),
        "figures": figures,
    }
    write(Path(args.out), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
