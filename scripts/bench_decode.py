"""Benchmark: decoding an upload beside a busy Python thread, Pillow piece by piece vs one call.

A server decodes uploads on threads while its event loop runs Python. Pillow, left to itself
(``Image.open`` on the bytes), decodes 64 KB at a time and a PNG one IDAT chunk at a time, taking
the GIL back between pieces; each time the loop holds it, the decode waits for up to a switch
interval (5 ms). ``model.inference.images.open_image`` hands the decoder the whole upload in one call.

Both openers are followed by the same ``image_to_rgb`` and give the same pixels (checked). Each is
timed alone and beside a thread that runs Python for a given share of the time (the event loop's
stand-in: it spins for 1 ms, then sleeps as long as the share leaves): median milliseconds an
image. Uploads: a photo-like 1333x800 image as a
PNG written by Pillow (64 KB IDAT chunks), the same PNG in 8 KB chunks (libpng's default, as
browsers and OpenCV write), and a JPEG.

    python -m scripts.bench_decode --out bench-results/decode
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Self

import numpy as np
import PIL
from PIL import Image

from scripts.results import markdown_table, write_report
from transfiner.model.inference.images import image_to_rgb, open_image


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1333x800", help="image WxH")
    parser.add_argument("--busy", default="0,0.5,1", help="shares of time the other thread runs Python")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-results/decode")
    return parser.parse_args()


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """[H, W, 3] uint8: smooth colour gradients with grain, which compresses like a photo
    (a PNG of about 2 bytes a pixel)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([120 + 100 * np.sin(x / 97 + c) * np.cos(y / 71 - c) for c in (0.0, 1.3, 2.6)], axis=-1)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def png_in_chunks(data: bytes, chunk: int) -> bytes:
    """The same PNG with its pixel stream re-split into IDAT chunks of ``chunk`` bytes."""
    offset, head, stream, tail = 8, [data[:8]], [], []
    while offset < len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        piece = data[offset : offset + 12 + length]
        if kind == b"IDAT":
            stream.append(piece[8:-4])
        else:
            (tail if stream else head).append(piece)
        offset += 12 + length
    joined = b"".join(stream)
    idats = [
        struct.pack(">I4s", len(part), b"IDAT") + part + struct.pack(">I", zlib.crc32(part, zlib.crc32(b"IDAT")))
        for part in (joined[i : i + chunk] for i in range(0, len(joined), chunk))
    ]
    return b"".join(head + idats + tail)


def uploads(height: int, width: int, seed: int) -> dict[str, bytes]:
    picture = Image.fromarray(photo_like(height, width, seed))
    png, jpeg = io.BytesIO(), io.BytesIO()
    picture.save(png, "PNG")
    picture.save(jpeg, "JPEG", quality=90)
    return {
        "PNG, 64 KB IDAT chunks": png.getvalue(),
        "PNG, 8 KB IDAT chunks": png_in_chunks(png.getvalue(), 8192),
        "JPEG, quality 90": jpeg.getvalue(),
    }


def piecewise(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return image_to_rgb(image)


def one_call(data: bytes) -> np.ndarray:
    with open_image(data) as image:
        return image_to_rgb(image)


class BusyThread:
    """Runs Python for ``share`` of the time: 1 ms spins, sleeps between."""

    def __init__(self, share: float) -> None:
        self.share, self._stop = share, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pause = 0.001 * (1 - self.share) / self.share
        while not self._stop.is_set():
            end = time.perf_counter() + 0.001
            while time.perf_counter() < end:
                pass
            if pause:
                time.sleep(pause)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def median_ms(decode, data: bytes, share: float, repeats: int) -> float:
    decode(data)  # warm-up
    times = []
    with BusyThread(share) if share else contextlib.nullcontext():
        for _ in range(repeats):
            start = time.perf_counter()
            decode(data)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    args = parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    shares = [float(s) for s in args.busy.split(",")]
    rows = []
    for name, data in uploads(height, width, args.seed).items():
        if not np.array_equal(piecewise(data), one_call(data)):
            raise SystemExit(f"{name}: the two openers give different pixels")
        for share in shares:
            row = {"upload": name, "bytes": len(data), "busy_share": share}
            for label, decode in (("piecewise", piecewise), ("one_call", one_call)):
                row[f"{label}_ms"] = round(median_ms(decode, data, share, args.repeats), 2)
            row["speedup"] = round(row["piecewise_ms"] / row["one_call_ms"], 2)
            rows.append(row)
            print(row, flush=True)

    result = {
        "image_wxh": [width, height],
        "repeats": args.repeats,
        "seed": args.seed,
        "switch_interval_ms": 1000 * sys.getswitchinterval(),
        "pillow": PIL.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "results": rows,
    }

    table = [
        f"# Decoding a {width}x{height} upload beside a busy Python thread",
        "",
        (
            f"Pillow {PIL.__version__}, Python {platform.python_version()}, switch interval "
            f"{result['switch_interval_ms']:g} ms. Median of {args.repeats} decodes (to the RGB array); "
            "both give the same pixels. Busy: the share of time the other thread runs Python."
        ),
        "",
        *markdown_table(
            ["upload", "busy", "Pillow piecewise ms", "one call ms", "speed-up"],
            (
                [
                    f"{r['upload']} ({r['bytes'] / 1e6:.2f} MB)",
                    f"{100 * r['busy_share']:.0f}%",
                    f"{r['piecewise_ms']:.1f}",
                    f"{r['one_call_ms']:.1f}",
                    f"{r['speedup']:.1f}x",
                ]
                for r in rows
            ),
            align="lrrrr",
        ),
    ]
    markdown = "\n".join(table) + "\n"
    print(markdown)
    write_report(Path(args.out), "bench_decode", result, markdown)


if __name__ == "__main__":
    main()
