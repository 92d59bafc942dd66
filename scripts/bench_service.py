"""Benchmark the service: in-process vs over HTTP, and dynamic batching on vs off.

For every (mode, batching, concurrency) it runs a closed loop of ``concurrency`` clients that each
send the next request as soon as the previous answer arrives, and reports throughput (images/s),
p50/p99 latency and the mean batch size the server formed.

* in-process: the service's own runtime (decode -> batcher -> worker -> paste + RLE) driven from
  Python in this process, no HTTP: the ceiling for the HTTP numbers;
* http: ``transfiner serve`` in a subprocess, httpx clients here, PNG bodies, JSON answers.

The HTTP/in-process throughput ratio at the highest concurrency with batching on is the
"HTTP overhead at saturation" figure (goal: at least 0.95). Batching off is ``max_batch_size=1``.

The closed loop, the HTTP client and the /metrics differences are those of ``transfiner bench``
(``service.loadtest``); for load tests of a deployed service (open loop, sweeps, server
breakdown) use that command. This script is the in-process vs HTTP and batching comparison.

    python -m scripts.bench_service --model default --out bench-results/service
    python -m scripts.bench_service --model tiny.pth --requests 16 --concurrency 1 4 --out /tmp/b
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from scripts.results import markdown_table
from transfiner.service.engine.runtime import ServiceRuntime
from transfiner.service.loadtest.client import RunResult, SegmentClient, WorkloadImage, run_closed_loop
from transfiner.service.loadtest.metrics_delta import Scrape, scrape
from transfiner.service.loadtest.report import LatencyStats
from transfiner.service.loadtest.servers import SERVE_COMMAND, free_port, wait_for_server
from transfiner.service.settings import ServiceSettings


def synthetic_png(height: int, width: int, seed: int = 0) -> bytes:
    """A picture with a few filled shapes (random weights or not, the model gets work to do)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 40, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(6):
        cy, cx, r = (
            rng.integers(0, height),
            rng.integers(0, width),
            rng.integers(min(height, width) // 12, min(height, width) // 4),
        )
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.integers(60, 255, 3)
    img = img + rng.integers(0, 12, img.shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, "PNG")
    return buffer.getvalue()


def summarise(run: RunResult) -> dict:
    """Throughput and latency of a closed-loop run; any failed request aborts the benchmark."""
    failed = [r for r in run.records if not r.ok]
    if failed:
        raise SystemExit(
            f"{len(failed)} of {len(run.records)} requests failed, e.g. {failed[0].status or failed[0].error}"
        )
    stats = LatencyStats.of([r.latency_s for r in run.records])
    return {
        "requests": len(run.records),
        "throughput": len(run.records) / run.duration_s,
        "p50_ms": stats.p50_s * 1000,
        "p99_ms": stats.p99_s * 1000,
        "mean_ms": stats.mean_s * 1000,
    }


def mean_batch(before: Scrape, after: Scrape) -> float:
    return after.minus(before).histogram("transfiner_batch_size").mean or 0.0


# -- in-process ------------------------------------------------------------------------------------


async def run_in_process(
    settings: ServiceSettings, png: bytes, params: dict, plan: list[tuple[int, int]]
) -> list[dict]:
    from transfiner.service.schemas import SegmentParams

    runtime = ServiceRuntime(settings)
    await runtime.start()
    if not runtime.ready:
        raise SystemExit(f"in-process runtime failed: {runtime.detail}")
    segment_params = SegmentParams.model_validate(params)

    async def send(index: int) -> int:
        async with runtime.admission("bench") as model:
            await model.segment(png, segment_params, time.monotonic() + 600)
        return 200  # a refusal raises ServiceError, which aborts the benchmark

    def metrics() -> Scrape:
        return Scrape.parse(runtime.metrics.render().decode())

    rows = []
    try:
        for concurrency, total in plan:
            await run_closed_loop(send, concurrency, requests=min(total, 2 * concurrency))  # warm this concurrency
            before = metrics()
            run = await run_closed_loop(send, concurrency, requests=total)
            rows.append({"concurrency": concurrency, **summarise(run), "mean_batch": mean_batch(before, metrics())})
    finally:
        await runtime.stop()
    return rows


# -- over HTTP -------------------------------------------------------------------------------------


async def run_http(
    settings: ServiceSettings, png: bytes, params: dict, plan: list[tuple[int, int]], log_path: Path
) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *SERVE_COMMAND,
        "--model",
        settings.model,
        "--port",
        str(port),
        "--max-batch-size",
        str(settings.max_batch_size),
        "--max-delay-ms",
        str(settings.max_delay_ms),
        "--max-queue-size",
        str(settings.max_queue_size),
        "--log-level",
        "warning",
    ]
    if settings.device:
        command += ["--device", settings.device]
    if settings.workers:
        command += ["--workers", str(settings.workers)]
    env = dict(os.environ)
    if settings.torch_threads:
        env["TRANSFINER_TORCH_THREADS"] = str(settings.torch_threads)
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_server(server, url, log_path, timeout=600)
        rows = []
        from PIL import Image

        width, height = Image.open(io.BytesIO(png)).size
        image = WorkloadImage("bench.png", png, "image/png", width, height)
        metrics_urls = [url + "/metrics"]
        for concurrency, total in plan:
            # A client per concurrency, with exactly that many connections, as `transfiner bench` does.
            async with SegmentClient(
                url, [image], params={k: str(v) for k, v in params.items()}, timeout_s=600, max_connections=concurrency
            ) as client:
                await run_closed_loop(client.send, concurrency, requests=min(total, 2 * concurrency))
                before = await scrape(client.http, metrics_urls)
                run = await run_closed_loop(client.send, concurrency, requests=total)
                after = await scrape(client.http, metrics_urls)
            rows.append({"concurrency": concurrency, **summarise(run), "mean_batch": mean_batch(before, after)})
        return rows
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()


# -- report ----------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    return "\n".join(
        markdown_table(
            ["mode", "batching", "concurrency", "images/s", "p50 ms", "p99 ms", "mean batch"],
            (
                [
                    r["mode"],
                    r["batching"],
                    r["concurrency"],
                    f"{r['throughput']:.2f}",
                    f"{r['p50_ms']:.1f}",
                    f"{r['p99_ms']:.1f}",
                    f"{r['mean_batch']:.2f}",
                ]
                for r in rows
            ),
            align="llrrrrr",
        )
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in ("in-process", "http"):
        for batching, style in (("on", "-"), ("off", "--")):
            series = sorted(
                (r for r in rows if r["mode"] == mode and r["batching"] == batching), key=lambda r: r["concurrency"]
            )
            if not series:
                continue
            xs = [r["concurrency"] for r in series]
            label = f"{mode}, batching {batching}"
            left.plot(xs, [r["throughput"] for r in series], style, marker="o", label=label)
            right.plot(xs, [r["p99_ms"] for r in series], style, marker="o", label=label)
    ticks = sorted({r["concurrency"] for r in rows})
    for axis, title in ((left, "throughput (images/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_service", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' or a checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--requests", type=int, default=64, help="measured requests per configuration (min 2x concurrency)"
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="batching on")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--image", default=None, help="an image file instead of the synthetic picture")
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--max-detections", type=int, default=100)
    parser.add_argument("--mask-format", default="rle", choices=["rle", "polygon", "none"])
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--modes", nargs="+", default=["in-process", "http"], choices=["in-process", "http"])
    parser.add_argument("--out", default="bench-results/service")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = Path(args.image).read_bytes() if args.image else synthetic_png(args.height, args.width)
    params = {
        "score_threshold": args.score_threshold,
        "max_detections": args.max_detections,
        "mask_format": args.mask_format,
    }
    plan = [(c, max(args.requests, 2 * c)) for c in args.concurrency]

    rows = []
    for batching, batch_size in (("on", args.max_batch_size), ("off", 1)):
        settings = ServiceSettings(
            model=args.model,
            device=args.device,
            max_batch_size=batch_size,
            max_delay_ms=args.max_delay_ms,
            max_queue_size=max(64, 4 * max(args.concurrency)),
            torch_threads=args.torch_threads,
            warmup_batches=2,
        )
        for mode in args.modes:
            print(f"{mode}, batching {batching} (max_batch_size={batch_size}) ...", flush=True)
            if mode == "in-process":
                results = asyncio.run(run_in_process(settings, png, params, plan))
            else:
                results = asyncio.run(run_http(settings, png, params, plan, out / f"server-batching-{batching}.log"))
            rows.extend({"mode": mode, "batching": batching, **r} for r in results)

    def find(mode: str, batching: str, concurrency: int) -> dict | None:
        return next(
            (r for r in rows if (r["mode"], r["batching"], r["concurrency"]) == (mode, batching, concurrency)), None
        )

    top = max(args.concurrency)
    http, local = find("http", "on", top), find("in-process", "on", top)
    ratio = http["throughput"] / local["throughput"] if http and local else None
    gains = {}
    for mode in args.modes:
        for c in args.concurrency:
            on, off = find(mode, "on", c), find(mode, "off", c)
            if on and off:
                gains[f"{mode}@{c}"] = on["throughput"] / off["throughput"]

    report = {
        "settings": {**vars(args), "image_bytes": len(png)},
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows,
        "http_over_in_process_throughput_at_saturation": ratio,
        "batching_gain": gains,
    }
    try:
        import torch

        report["machine"]["torch"] = torch.__version__
        report["machine"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - machine details are informative only
        pass

    text = table(rows)
    summary = [
        f"HTTP / in-process throughput at concurrency {top}, batching on: "
        + (f"{ratio:.3f} (goal >= 0.95)" if ratio is not None else "n/a"),
        "Batching on / off throughput: " + ", ".join(f"{k} {v:.2f}x" for k, v in gains.items()),
    ]
    print(text)
    print("\n".join(summary))
    (out / "bench_service.json").write_text(json.dumps(report, indent=2))
    (out / "bench_service.md").write_text(
        "# Service benchmark\n\n"
        + text
        + "\n\n"
        + "\n\n".join(summary)
        + "\n\n"
        + f"Settings: `{json.dumps(report['settings'])}`\n\nMachine: `{json.dumps(report['machine'])}`\n"
    )
    plot(rows, out / "bench_service.png")
    print(f"wrote {out}/bench_service.json, .md, .png")


if __name__ == "__main__":
    main()
