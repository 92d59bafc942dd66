"""Results of a load test: per-step dataclasses, ``report.json`` and the Markdown tables.

Client-side numbers come from the requests this process sent; server-side numbers from the
``/metrics`` difference over the same step (``metrics_delta``). Latency statistics are over the
successful (2xx) requests: a fast 503 must not make the service look quick. Errors are counted
by status, or by exception class when no HTTP answer came.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transfiner.service.loadtest.client import RunResult
from transfiner.service.loadtest.metrics_delta import ServerBreakdown, StageTiming


@dataclass
class LatencyStats:
    """Seconds. Percentiles interpolate linearly between the sorted samples (numpy's default)."""

    mean_s: float
    p50_s: float
    p90_s: float
    p99_s: float
    max_s: float

    @classmethod
    def of(cls, samples: list[float]) -> LatencyStats | None:
        if not samples:
            return None
        values = np.asarray(samples, dtype=float)
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return cls(float(values.mean()), float(p50), float(p90), float(p99), float(values.max()))


@dataclass
class StepResult:
    mode: str  # "closed" (fixed concurrency) or "open" (Poisson arrivals at offered_rate)
    concurrency: int | None
    offered_rate: float | None  # target arrivals per second (open loop)
    arrival_rate: float | None  # arrivals actually drawn / arrival window (open loop)
    requests: int  # answered or failed, warm-up excluded
    ok: int
    dropped: int  # open loop: arrivals over --max-outstanding, never sent
    duration_s: float  # start of the step to its last answer
    throughput_rps: float  # all answers (any status) per second
    images_per_s: float  # successful answers per second (one image per request)
    latency: LatencyStats | None  # successful requests only
    # Closed loop: successful answers per second while the loop was full, between the
    # concurrency-th answer and the concurrency-th from last (``steady_rate``); None when the step
    # is too short to have such a window.
    steady_images_per_s: float | None
    errors: dict[str, int]  # "503" -> count, or "ConnectError" -> count for no answer
    server: ServerBreakdown | None  # None when /metrics could not be scraped
    latencies_s: list[float] = field(default_factory=list)  # every successful request, in send order
    error_latencies_s: list[float] = field(default_factory=list)  # failed requests: how long until they failed

    @property
    def label(self) -> str:
        if self.mode == "closed":
            return f"closed c={self.concurrency}"
        return f"open {self.offered_rate:g} req/s"

    @classmethod
    def from_run(
        cls,
        mode: str,
        run: RunResult,
        server: ServerBreakdown | None,
        *,
        concurrency: int | None = None,
        offered_rate: float | None = None,
    ) -> StepResult:
        errors: dict[str, int] = {}
        for record in run.records:
            if not record.ok:
                key = str(record.status) if record.status is not None else (record.error or "error")
                errors[key] = errors.get(key, 0) + 1
        latencies = [r.latency_s for r in run.records if r.ok]
        duration = max(run.duration_s, 1e-9)
        arrival_rate = None
        if mode == "open" and run.arrival_window_s > 0:
            arrival_rate = run.arrivals / run.arrival_window_s
        return cls(
            mode=mode,
            concurrency=concurrency,
            offered_rate=offered_rate,
            arrival_rate=arrival_rate,
            requests=len(run.records),
            ok=len(latencies),
            dropped=run.dropped,
            duration_s=run.duration_s,
            throughput_rps=len(run.records) / duration,
            images_per_s=len(latencies) / duration,
            latency=LatencyStats.of(latencies),
            steady_images_per_s=steady_rate([r.finished_s for r in run.records if r.ok], concurrency)
            if mode == "closed"
            else None,
            errors=dict(sorted(errors.items())),
            server=server,
            latencies_s=latencies,
            error_latencies_s=[r.latency_s for r in run.records if not r.ok],
        )


def steady_rate(finished_s: list[float], concurrency: int | None) -> float | None:
    """Answers per second of a closed loop once it is full and before it drains.

    A closed loop of c users starts with c requests at once and ends with fewer than c in flight,
    so a dynamic batcher sees ramp-up and drain batches that a steady load never makes; with a
    few hundred requests these edges weigh on the overall rate. Here: the answers that came after
    the c-th answer and no later than the c-th from last, over the time between those two. Counted
    by time, not by position, because a batch's answers share one time: counting positions from
    inside one batch to inside another would leave some of the window's answers out. None when
    there are fewer than 2c + 1 answers or they share one time.
    """
    if not concurrency or len(finished_s) < 2 * concurrency + 1:
        return None
    times = sorted(finished_s)
    start, end = times[concurrency - 1], times[len(times) - concurrency]
    if end <= start:
        return None
    return sum(start < t <= end for t in times) / (end - start)


@dataclass
class BenchReport:
    command: str
    started_at: str  # ISO 8601, UTC
    machine: dict[str, Any]  # where the client ran
    target: dict[str, Any]  # url, metrics urls, the server's /v1/models answer
    workload: dict[str, Any]  # images, parameters, warm-up, drivers' settings
    steps: list[StepResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def write_report(report: BenchReport, out_dir: Path) -> tuple[Path, Path]:
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(report.to_json() + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


# -- Markdown -----------------------------------------------------------------------------------


def _ms(seconds: float | None, digits: int = 0) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.{digits}f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) if counts else "-"


def _timing(stage: StageTiming) -> str:
    return _ms(stage.mean_s) if stage.count else "-"


def client_table(steps: list[StepResult]) -> str:
    # Open loops: the rate the Poisson draw actually offered, which a short run can miss by 10%+.
    open_loop = any(s.mode == "open" for s in steps)
    lines = [
        "| step | "
        + ("arrivals/s | " if open_loop else "")
        + "requests | ok | errors | dropped | req/s | img/s | steady img/s | p50 ms | p90 ms | p99 ms | max ms "
        "| mean ms |",
        "|---|" + ("---:|" if open_loop else "") + "---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in steps:
        lat = s.latency
        arrivals = ""
        if open_loop:
            arrivals = ("-" if s.arrival_rate is None else f"{s.arrival_rate:.2f}") + " | "
        lines.append(
            f"| {s.label} | {arrivals}{s.requests} | {s.ok} | {_counts(s.errors)} | {s.dropped} "
            f"| {s.throughput_rps:.2f} "
            f"| {s.images_per_s:.2f} | {'-' if s.steady_images_per_s is None else f'{s.steady_images_per_s:.2f}'} "
            f"| {_ms(lat and lat.p50_s)} | {_ms(lat and lat.p90_s)} "
            f"| {_ms(lat and lat.p99_s)} | {_ms(lat and lat.max_s)} | {_ms(lat and lat.mean_s)} |"
        )
    return "\n".join(lines)


def server_table(steps: list[StepResult]) -> str:
    lines = [
        "| step | server request ms | queue wait ms | decode ms | inference ms/batch | inference ms/image "
        "| postprocess ms | batches | mean batch | batch sizes | rejections |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for s in steps:
        b = s.server
        if b is None:
            lines.append(f"| {s.label} | (no /metrics) |  |  |  |  |  |  |  |  |  |")
            continue
        mean_batch = "-" if b.mean_batch_size is None else f"{b.mean_batch_size:.2f}"
        sizes = " ".join(f"{k}:{v}" for k, v in b.batch_size_distribution.items()) or "-"
        lines.append(
            f"| {s.label} | {_timing(b.request)} | {_timing(b.queue_wait)} | {_ms(b.decode.mean_s, 1)} "
            f"| {_timing(b.inference)} | {_ms(b.inference_per_image_s)} | {_ms(b.postprocess.mean_s, 1)} "
            f"| {b.batches} | {mean_batch} | {sizes} | {_counts(b.rejections)} |"
        )
    return "\n".join(lines)


def markdown(report: BenchReport) -> str:
    card = (report.target.get("models") or [{}])[0]
    batching = card.get("batching", {})
    machine = report.machine
    workload = report.workload
    replicas = next((s.server.replicas for s in report.steps if s.server is not None), 0)
    lines = [
        f"# Load test of {report.target['url']}",
        "",
        f"`{report.command}` ({report.started_at})",
        "",
        f"* model: {card.get('name', '?')} (version {card.get('version', '?')}, backend {card.get('backend', '?')}, "
        f"precision {card.get('precision', '?')}, "
        f"device {','.join(card.get('device', []) or ['?'])}); batching: max_batch_size "
        f"{batching.get('max_batch_size', '?')}, max_delay_ms {batching.get('max_delay_ms', '?')}, "
        f"workers {batching.get('workers', '?')}",
        f"* workload: {workload['images']} images ({workload['source']}), parameters "
        f"{workload['params'] or 'server defaults'}, {workload['warmup']} warm-up requests per step",
        f"* client machine: {machine['cpus']} CPUs ({machine.get('cpu_model') or 'unknown CPU'}), "
        f"{machine['platform']}",
        "",
        "Client side (latency of successful requests; open loop: from the scheduled arrival):",
        "",
        client_table(report.steps),
        "",
        f"Server side (difference of /metrics over each step, summed over {replicas} replica(s); means; "
        "inference per batch and per image):",
        "",
        server_table(report.steps),
        "",
    ]
    return "\n".join(lines)
