"""Bulk segmentation: ``transfiner predict --engine ray`` against local ``predict``, in one run.

Throughput, with the same model, images and batch size, each configuration a ``transfiner predict``
process of its own:

- local: ``transfiner predict`` (one process, torch using every core);
- ray x1: one replica of ``--replica-cpus 1``; ray x2: two replicas of 1 CPU each (every core);
- ray x1 (all cores): one replica holding every core, as local does.

Each runs twice, on ``--warm-images`` and on ``--images`` images; images/s is the difference
(images / seconds between the two runs), so start-up (Ray, actors, loading the model) is left out;
end-to-end figures are reported too. Goals: ray x2 >= 1.6x ray x1, and >= 90% of local.

Driver memory: a job of ``--memory-images`` small images on two replicas (coarse masks only: the
driver's memory does not depend on the model's work), the driver's RSS read from /proc every 0.2 s;
growth from the first committed shard to the end (goal: <= +100 MB). A PNG plots it.

Ray binds some of its ports to every interface; as root, the run moves itself into a network
namespace that has nothing but loopback (``unshare -n``).

    python -m scripts.bench_bulk --model default --out bench-results/bulk
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench_overload import machine
from scripts.results import markdown_table, write_report
from transfiner.model.datasets.shapes import ShapesConfig, write_shapes

CONFIGS = {
    "local": [],
    "ray x1": ["--engine", "ray", "--ray-address", "local", "--replicas", "1", "--replica-cpus", "1"],
    "ray x2": ["--engine", "ray", "--ray-address", "local", "--replicas", "2", "--replica-cpus", "1"],
    "ray x1 (all cores)": ["--engine", "ray", "--ray-address", "local", "--replicas", "1"]
    + ["--replica-cpus", str(os.cpu_count())],
}


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def predict(
    config: str, images: Path, count: int, work: Path, args, sample_rss: bool = False, extra: tuple[str, ...] = ()
) -> dict:
    """One ``transfiner predict`` over the first ``count`` images: seconds, and the driver's RSS."""
    chosen = sorted(images.glob("*.png"))[:count]
    manifest = work / f"inputs-{count}.txt"
    manifest.write_text("".join(f"{p}\n" for p in chosen))
    name = f"{config.replace(' ', '-').replace('(', '').replace(')', '')}-{count}"
    out = work / name
    command = [sys.executable, "-m", "transfiner", "predict", "--model", args.model, "--device", "cpu"]
    command += ["--batch-size", str(args.batch_size), "--score-threshold", str(args.score_threshold)]
    command += [*CONFIGS[config], *extra]
    if config == "local":
        command += [str(p) for p in chosen] + ["--out", str(out) + ".json"]
    else:
        command += [str(manifest), "--out", str(out), "--shard-size", str(args.shard_size)]
    log = (work / f"{name}.log").open("w")
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    samples: list[tuple[float, float, int]] = []  # (seconds, RSS MB, shards committed)
    while process.poll() is None:
        if sample_rss:
            rss = rss_mb(process.pid)
            shards = len(list(out.glob("part-[0-9]*[0-9].jsonl"))) if out.exists() else 0
            if rss is not None:
                samples.append((round(time.monotonic() - started, 2), round(rss, 1), shards))
        time.sleep(0.2)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}: see {log.name}")
    return {"images": count, "seconds": round(seconds, 2), "rss": samples}


def throughput(args, images: Path, work: Path) -> dict:
    rows = {}
    for config in args.configs:
        warm = predict(config, images, args.warm_images, work, args)
        full = predict(config, images, args.images, work, args)
        rate = (args.images - args.warm_images) / (full["seconds"] - warm["seconds"])
        rows[config] = {
            "images_per_s": round(rate, 3),
            "end_to_end_images_per_s": round(args.images / full["seconds"], 3),
            "seconds": full["seconds"],
            "warm_seconds": warm["seconds"],
        }
        print(f"{config}: {rate:.2f} images/s ({args.images} images in {full['seconds']:.1f} s)", flush=True)
    return rows


def memory(args, images: Path, work: Path) -> dict:
    # The driver's memory does not depend on the model's work: coarse masks only, to keep it short.
    run = predict("ray x2", images, args.memory_images, work, args, sample_rss=True, extra=("--no-refine",))
    # Growth from the first shard: while shards stream in (up to the last), and to the process's end
    # (which includes Ray's shutdown in the driver).
    samples = run["rss"]
    shards = max(count for _, _, count in samples)
    after_first = [rss for _, rss, count in samples if count >= 1]
    streaming = [rss for _, rss, count in samples if 1 <= count < shards]
    growth = round(max(streaming) - after_first[0], 1) if streaming else None
    to_end = round(max(after_first) - after_first[0], 1) if after_first else None
    print(f"driver RSS over {args.memory_images} images: +{growth} MB while streaming, +{to_end} MB to the end")
    return {
        "images": args.memory_images,
        "seconds": run["seconds"],
        "growth_mb": growth,
        "growth_to_end_mb": to_end,
        "samples": samples,
    }


def plot(samples: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds, rss, shards = zip(*samples)
    figure, left = plt.subplots(figsize=(7, 3.5))
    left.plot(seconds, rss, color="tab:blue")
    left.set_xlabel("seconds")
    left.set_ylabel("driver RSS (MB)", color="tab:blue")
    right = left.twinx()
    right.plot(seconds, shards, color="tab:orange")
    right.set_ylabel("shards committed", color="tab:orange")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(report: dict) -> str:
    rows = report["throughput"]
    if not rows:
        lines = [f"Command: `{report['command']}`", f"Machine: {report['machine']}"]
        return "\n".join(lines + ["", memory_line(report["memory"])]) if report.get("memory") else "\n".join(lines)
    base = rows.get("ray x1", {}).get("images_per_s")
    local = rows.get("local", {}).get("images_per_s")
    lines = [f"Command: `{report['command']}`", f"Machine: {report['machine']}", ""]
    lines += markdown_table(
        ["configuration", "images/s", "vs ray x1", "vs local", "end to end images/s"],
        [
            [
                name,
                row["images_per_s"],
                f"{row['images_per_s'] / base:.2f}x" if base else "",
                f"{row['images_per_s'] / local:.0%}" if local else "",
                row["end_to_end_images_per_s"],
            ]
            for name, row in rows.items()
        ],
        "lrrrr",
    )
    if report.get("memory"):
        lines += ["", memory_line(report["memory"])]
    return "\n".join(lines)


def memory_line(memory: dict) -> str:
    return (
        f"Driver RSS over {memory['images']} images, from the first shard: +{memory['growth_mb']} MB while "
        f"shards streamed in, +{memory['growth_to_end_mb']} MB to the process's end ({memory['seconds']} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_bulk", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--warm-images", type=int, default=8)
    parser.add_argument("--score-threshold", type=float, default=0.5, help="as scripts/bench_export.py (0.5)")
    parser.add_argument("--size", default="384x384", help="make-shapes image size for the throughput runs")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument(
        "--configs", nargs="*", choices=list(CONFIGS), default=list(CONFIGS), help="none: the memory run alone"
    )
    parser.add_argument("--memory-images", type=int, default=2000, help="0 leaves the memory run out")
    parser.add_argument("--memory-size", default="128x96")
    parser.add_argument("--out", default="bench-results/bulk")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-netns", action="store_true", help="run Ray on the machine's own network")
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    if not args.inside and not args.no_netns:
        if not (os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")):
            parser.error("Ray runs in a loopback-only namespace: needs root, unshare and ip (or --no-netns)")
        script = 'ip link set lo up && exec "$0" "$@"'
        command = [sys.executable, "-m", "scripts.bench_bulk", *arguments, "--inside"]
        return subprocess.run(["unshare", "--net", "sh", "-c", script, *command]).returncode

    out = Path(args.out)
    report: dict = {
        "command": " ".join(["python -m scripts.bench_bulk", *arguments]).replace(" --inside", ""),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "load_before": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as temporary:
        work = Path(temporary)
        width, height = (int(v) for v in args.size.split("x"))
        if args.configs:
            write_shapes(ShapesConfig(num_images=args.images, seed=0, width=width, height=height), work / "big")
        report["throughput"] = throughput(args, work / "big" / "images", work)
        if args.memory_images:
            width, height = (int(v) for v in args.memory_size.split("x"))
            config = ShapesConfig(num_images=args.memory_images, seed=1, width=width, height=height)
            write_shapes(config, work / "small", workers=os.cpu_count() or 1)
            report["memory"] = memory(args, work / "small" / "images", work)
            out.mkdir(parents=True, exist_ok=True)
            plot(report["memory"]["samples"], out / "driver_rss.png")
    report["load_after"] = os.getloadavg()[0]
    text = markdown(report)
    print(text)
    write_report(out, "bulk", report, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
