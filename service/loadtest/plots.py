"""PNG figures of a load test (matplotlib, Agg backend: no display needed).

* ``latency_cdf.png``: the fraction of successful requests answered within a latency, one curve
  per step; the tail is where closed and open loops differ.
* ``throughput_p99.png``: throughput and p99 latency against the load (concurrency for closed
  loops, offered rate for open loops, with the offered rate drawn as the ideal throughput).
* ``batch_sizes.png``: how many batches of each size the server ran in each step.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

from transfiner.service.loadtest.report import BenchReport, StepResult  # noqa: E402


def write_plots(report: BenchReport, out_dir: Path) -> list[Path]:
    paths = [out_dir / "latency_cdf.png", out_dir / "throughput_p99.png", out_dir / "batch_sizes.png"]
    latency_cdf(report.steps, paths[0])
    throughput_p99(report.steps, paths[1])
    batch_sizes(report.steps, paths[2])
    return paths


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latency_cdf(steps: list[StepResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_ms: list[float] = []
    for step in steps:
        ms = sorted(v * 1000 for v in step.latencies_s)
        if not ms:
            continue
        all_ms += ms
        fractions = [(i + 1) / len(ms) for i in range(len(ms))]
        ax.step(ms, fractions, where="post", label=step.label)
    # Latencies of a sweep span orders of magnitude (c=1 vs an overloaded open loop).
    if all_ms and min(all_ms) > 0 and max(all_ms) / min(all_ms) > 20:
        ax.set_xscale("log")
    if not all_ms:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title("latency CDF (successful requests)")
    ax.grid(alpha=0.3)
    if all_ms:
        ax.legend(fontsize=8)
    _save(fig, path)


def throughput_p99(steps: list[StepResult], path: Path) -> None:
    modes = [m for m in ("closed", "open") if any(s.mode == m for s in steps)] or ["closed"]
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 4 * len(modes)), squeeze=False)
    for row, mode in zip(axes, modes):
        series = [s for s in steps if s.mode == mode]
        if mode == "closed":
            series.sort(key=lambda s: s.concurrency)
            xs = [s.concurrency for s in series]
            xlabel = "concurrency (requests in flight)"
        else:
            series.sort(key=lambda s: s.offered_rate)
            xs = [s.offered_rate for s in series]
            xlabel = "offered rate (requests/s, Poisson)"
        left, right = row
        left.plot(xs, [s.images_per_s for s in series], marker="o", label="achieved (images/s)")
        if mode == "open" and xs:
            left.plot(xs, xs, "--", color="grey", label="offered (target)")
            # What the Poisson draw actually sent; short runs can miss the target noticeably.
            drawn = [(x, s.arrival_rate) for x, s in zip(xs, series) if s.arrival_rate is not None]
            left.plot([x for x, _ in drawn], [y for _, y in drawn], "x", color="grey", label="arrivals drawn")
        p99 = [(x, s.latency.p99_s * 1000) for x, s in zip(xs, series) if s.latency is not None]
        right.plot([x for x, _ in p99], [y for _, y in p99], marker="o", color="tab:red")
        for axis, title in ((left, f"{mode} loop: throughput"), (right, f"{mode} loop: p99 latency (ms)")):
            axis.set_xlabel(xlabel)
            axis.set_title(title)
            axis.grid(alpha=0.3)
            if mode == "closed" and xs and max(xs) / min(xs) >= 4:
                axis.set_xscale("log", base=2)
                axis.set_xticks(xs, [str(x) for x in xs])
                axis.minorticks_off()
        left.set_ylim(bottom=0)
        right.set_ylim(bottom=0)
        left.legend(fontsize=8)
    _save(fig, path)


def batch_sizes(steps: list[StepResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    with_server = [s for s in steps if s.server is not None and s.server.batches > 0]
    # Bucket labels are "1", "2", "5-6", ">256": order them by their first number.
    labels = sorted(
        {label for s in with_server for label in s.server.batch_size_distribution},
        key=lambda label: int(label.lstrip(">").split("-")[0]),
    )
    if not labels:
        ax.text(0.5, 0.5, "no batches in the server metrics", ha="center", va="center", transform=ax.transAxes)
    width = 0.8 / max(len(with_server), 1)
    for i, step in enumerate(with_server):
        dist = step.server.batch_size_distribution
        fractions = [dist.get(label, 0) / step.server.batches for label in labels]
        positions = [j + (i - (len(with_server) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(positions, fractions, width=width, label=f"{step.label} (mean {step.server.mean_batch_size:.2f})")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("images per forward pass")
    ax.set_ylabel("fraction of batches")
    ax.set_title("batch sizes formed by the server")
    ax.grid(alpha=0.3, axis="y")
    if with_server:
        ax.legend(fontsize=8)
    _save(fig, path)
