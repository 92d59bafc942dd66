"""bench_gpu.png: images/s in-process beside every HTTP server, and the forward pass's stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot(report: dict, path: Path) -> bool:
    """Draws the report's two charts; False where matplotlib is missing or nothing was measured.

    - Left: images/s at each detection count, in-process (each batch size, the service's
      precision) beside every HTTP server and client count.
    - Right: where each in-process forward pass spends its time.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    precision = report["in_process"][0]["precision"] if report["in_process"] else None
    rows = [r for r in report["in_process"] if r.get("precision") == precision and "error" not in r]
    detections = sorted({r["detections"] for r in rows} | {h["detections"] for h in report.get("http") or []})
    if not detections:
        return False
    fig, (rates, stages) = plt.subplots(1, 2, figsize=(13, 4.8))
    bars: dict[str, dict[int, float]] = {}
    for r in sorted(rows, key=lambda r: r["batch"]):
        bars.setdefault(f"in-process, batch {r['batch']}", {})[r["detections"]] = r["images_per_s"]
    for h in report.get("http") or []:
        if "error" not in h:
            bars.setdefault(f"HTTP, {h['worker']}, {h['concurrency']} clients", {})[h["detections"]] = h["images_per_s"]
    width = 0.8 / max(len(bars), 1)
    for i, (name, values) in enumerate(bars.items()):
        xs = [detections.index(d) + (i - (len(bars) - 1) / 2) * width for d in values]
        rates.bar(xs, list(values.values()), width, label=name, hatch="" if name.startswith("in-process") else "//")
    rates.set_xticks(range(len(detections)), [f"{d} detections/image" for d in detections])
    rates.set(ylabel="images/s", title=f"{report['device_name']}, {precision}")
    rates.legend(fontsize=7)
    rates.grid(axis="y", alpha=0.3)
    names = ("backbone", "rpn", "box_head", "box_inference", "mask_head")
    labels = [f"b{r['batch']} x {r['detections']}" for r in rows]
    bottom = np.zeros(len(rows))
    for name in names:
        ms = np.array([r.get(name, 0.0) * 1000 for r in rows])
        stages.bar(labels, ms, bottom=bottom, label=name.replace("_", " "))
        bottom += ms
    stages.set(ylabel="ms a forward pass", title="in-process stages (batch x detections/image)")
    stages.legend(fontsize=7)
    stages.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
