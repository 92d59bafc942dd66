"""Benchmark: tracing COCO polygons (``mask_format=polygon``) from speckled masks.

A speckled mask (each pixel foreground with probability 0.5, seeded) is the worst case for the
tracer: about one piece per 15 pixels, each its own polygon. ``model.polygons.mask_to_polygons``
is timed on a 2000x2000 one (the figure the README quotes) and, with the tracer it replaced
(``scripts.reference.polygons``, quadratic in the number of pieces), on small ones, where both
answers are checked to be identical. Median seconds over the repeats.

    python -m scripts.bench_polygons --out bench-results/polygons
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from scripts.reference.polygons import reference_mask_to_polygons
from scripts.results import markdown_table, write_report
from transfiner.model.inference.polygons import mask_to_polygons


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_polygons", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000, help="side of the large speckled mask")
    parser.add_argument(
        "--reference-sizes",
        default="50,100,150",
        help="sides of the small masks both tracers run on (comma-separated; empty for none)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results/polygons")
    return parser.parse_args()


def speckled(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((side, side)) < 0.5


def median_s(fn, repeats: int) -> tuple[float, list]:
    times, answer = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        answer = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), answer


def main() -> None:
    args = parse_args()
    rows = []
    for side in [int(s) for s in args.reference_sizes.split(",") if s.strip()]:
        mask = speckled(side, args.seed)
        linear_s, polygons = median_s(lambda mask=mask: mask_to_polygons(mask), args.repeats)
        reference_s, expected = median_s(lambda mask=mask: reference_mask_to_polygons(mask), 1)
        if polygons != expected:
            raise SystemExit(f"{side}x{side}: mask_to_polygons differs from the reference tracer")
        rows.append(
            {
                "side": side,
                "polygons": len(polygons),
                "seconds": round(linear_s, 4),
                "reference_seconds": round(reference_s, 3),
            }
        )
    mask = speckled(args.size, args.seed)
    seconds, polygons = median_s(lambda mask=mask: mask_to_polygons(mask), args.repeats)
    rows.append({"side": args.size, "polygons": len(polygons), "seconds": round(seconds, 3), "reference_seconds": None})

    result = {
        "mask": "speckled, p=0.5",
        "repeats": args.repeats,
        "seed": args.seed,
        "vertices": sum(len(p) // 2 for p in polygons),
        "results": rows,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        # Other work on the machine slows every figure: the 1-minute load average when it ended.
        "load_average": round(os.getloadavg()[0], 1),
    }
    table = [
        "# Polygon tracing of speckled masks (p=0.5)",
        "",
        f"Median of {args.repeats} runs (the reference tracer: 1 run); where both ran, the answers are identical. "
        f"{os.cpu_count()} CPUs, load average {result['load_average']} at the end.",
        "",
        *markdown_table(
            ["mask", "polygons", "mask_to_polygons s", "reference tracer s"],
            (
                [
                    f"{r['side']}x{r['side']}",
                    f"{r['polygons']:,}",
                    f"{r['seconds']:.3f}",
                    "not run" if r["reference_seconds"] is None else f"{r['reference_seconds']:.2f}",
                ]
                for r in rows
            ),
            align="lrrr",
        ),
    ]
    markdown = "\n".join(table) + "\n"
    print(markdown)
    write_report(Path(args.out), "bench_polygons", result, markdown)


if __name__ == "__main__":
    main()
