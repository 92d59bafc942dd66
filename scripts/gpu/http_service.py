"""The same checkpoint behind ``transfiner serve``, loaded by ``transfiner bench``, with the server's CPU time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from scripts.gpu.workload import HttpServer, Workload
from transfiner.service.loadtest.servers import free_port, wait_for_server

# The `transfiner` command without relying on an installed console script (GPU images lack it).
TRANSFINER = [sys.executable, "-m", "transfiner"]


def process_usage(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds, minor page faults) of one process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def child_pids(pid: int) -> list[int]:
    """The live children of a process (the service's model worker processes)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def server_cpu(pid: int) -> tuple[float, float, int]:
    """(CPU seconds of the server's own process, of its worker processes, the server's page faults) so far."""
    workers = 0.0
    for child in child_pids(pid):
        try:
            workers += process_usage(child)[0]
        except (FileNotFoundError, ProcessLookupError):
            pass
    seconds, faults = process_usage(pid)
    return seconds, workers, faults


def bench_http(
    workload: Workload,
    checkpoint: Path,
    image_dir: Path,
    work: Path,
    device: str,
    variant: HttpServer,
    log,
) -> list[dict]:
    """One server run as ``variant`` says, loaded at each detection count and client count."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = (work / "server.log").open("w")
    server = subprocess.Popen(
        [
            *TRANSFINER,
            "serve",
            "--model",
            str(checkpoint),
            "--device",
            device,
            "--port",
            str(port),
            "--max-batch-size",
            str(workload.http_batch_size),
            "--max-queue-size",
            "256",
            "--log-level",
            "warning",
            "--workers",
            str(variant.workers),
        ],
        stdout=server_log,
        stderr=subprocess.STDOUT,
        env=dict(
            os.environ,
            TRANSFINER_GIL_SWITCH_INTERVAL_MS=str(variant.switch_interval_ms),
            TRANSFINER_WORKER_PROCESS=str(variant.worker_process).lower(),
        ),
    )
    results = []
    try:
        wait_for_server(server, url, work / "server.log", timeout=180)
        for detections in sorted(workload.detections, reverse=True):
            for concurrency in variant.concurrency or workload.http_concurrency:
                before, started = server_cpu(server.pid), time.perf_counter()
                rows = http_step(workload, url, image_dir, work, detections, concurrency, variant, log)
                after, seconds = server_cpu(server.pid), time.perf_counter() - started
                for row in rows:
                    if "error" not in row:  # the step's one closed loop, warm-up requests included
                        answered = row["requests"] + http_warmup(workload)
                        row["server_cpu_ms_per_image"] = 1000 * (after[0] - before[0]) / answered
                        row["server_page_faults_per_image"] = (after[2] - before[2]) / answered
                        row["server_cpu_cores"] = (after[0] - before[0]) / seconds
                        row["worker_cpu_ms_per_image"] = 1000 * (after[1] - before[1]) / answered
                log(
                    f"server process: {1000 * (after[0] - before[0]):.0f} ms CPU over {seconds:.1f} s; "
                    f"worker processes {1000 * (after[1] - before[1]):.0f} ms"
                )
                results += rows
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        server_log.close()
    return results


def http_warmup(workload: Workload) -> int:
    """Requests each ``transfiner bench`` loop sends before it measures."""
    return 2 * workload.http_batch_size


def http_step(
    workload: Workload,
    url: str,
    image_dir: Path,
    work: Path,
    detections: int,
    concurrency: int,
    variant: HttpServer,
    log,
) -> list[dict]:
    """One ``transfiner bench`` closed loop against the running server.

    At least 6 requests a client, so the steady rate (``service.loadtest.report.steady_rate``:
    the loop full, neither filling nor draining) has a window of 4 requests a client.
    """
    step_out = work / f"http-{detections}-{concurrency}"
    command = [
        *TRANSFINER,
        "bench",
        "--url",
        url,
        "--images",
        str(image_dir),
        "--concurrency",
        str(concurrency),
        "--requests",
        str(max(workload.http_requests, 6 * concurrency)),
        "--warmup",
        str(http_warmup(workload)),
        "--param",
        "score_threshold=0",
        "--param",
        f"max_detections={detections}",
        "--out",
        str(step_out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        log(
            f"http det {detections} c={concurrency}: failed: {done.stderr.strip()[-400:]}\nserver log:\n"
            + (work / "server.log").read_text()[-2000:]
        )
        return [{"detections": detections, "concurrency": concurrency, "error": done.stderr.strip()[-400:]}]
    report = json.loads((step_out / "report.json").read_text())
    card = (report["target"].get("models") or [{}])[0]
    rows = []
    for step in report["steps"]:
        rows.append(
            {
                "detections": detections,
                "switch_interval_ms": variant.switch_interval_ms,
                "worker": variant.name,
                "concurrency": step["concurrency"],
                "ok": step["ok"],
                "requests": step["requests"],
                "images_per_s": step["images_per_s"],
                "steady_images_per_s": step.get("steady_images_per_s"),
                "p50_ms": (step.get("latency") or {}).get("p50_s", 0) * 1000,
                "p99_ms": (step.get("latency") or {}).get("p99_s", 0) * 1000,
                "precision": card.get("precision"),
                "server": step.get("server") or {},
            }
        )
        steady = step.get("steady_images_per_s")
        log(
            f"http det {detections} c={step['concurrency']} switch {variant.switch_interval_ms:g} ms, worker "
            f"{variant.name}: {step['images_per_s']:.1f} img/s, steady {steady or 0:.1f} "
            f"({step['ok']}/{step['requests']} ok), precision {card.get('precision')}"
        )
    return rows
