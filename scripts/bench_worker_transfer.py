"""What it costs to hand a batch of images to a worker process (``service.worker_process``).

Two ways, side by side in one run, on batches of decoded 1333x800 images (uint8 [3, h, w] views
of HWC pixels, as the server queues them):

- ``pipe``: the pixels pickled through the worker's pipe (how batches crossed before shared memory);
- ``shared memory``: ``BatchMemory.send`` (the pixels into the batch's memfd, reused batch after
  batch; its descriptor over the pipe the first time), ``read_images`` in the child from its
  mapping (how they cross now).

For each: CPU time of the server's sending thread (it holds the GIL for most of it), CPU time of
the child's reader thread up to the tensors and then of one full read of the pixels (as
pre-processing reads them), and the wall time from send to the child's acknowledgement. Prints a
table and writes ``worker_transfer.json`` (default ``bench-results/worker-transfer``).

    python -m scripts.bench_worker_transfer [--batch 8] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from scripts.results import markdown_table
from transfiner.service.engine.pipeline import NetworkImage
from transfiner.service.engine.worker_process import BatchMemory, read_images, receive_memory

METHODS = ("pipe", "shared memory")


def child(conn) -> None:
    """Receives batches either way, reads every pixel once, answers with its CPU times."""
    torch.set_num_threads(1)
    mappings = {}
    while True:
        start = time.thread_time()  # CPU time: waiting in recv does not count, reading and unpickling do
        if (message := conn.recv()) is None:
            break
        if message[0] == "pipe":
            pixels = [torch.from_numpy(array).permute(2, 0, 1) for array in message[1]]
        else:
            _, _, index, size, layout, _ = message
            if size is not None:
                mappings[index] = receive_memory(conn, size)
            pixels = [image.pixels for image in read_images(mappings[index], layout)]
        received = time.thread_time()
        total = sum(int(p.sum(dtype=torch.int64)) for p in pixels)  # one full read, as pre-processing does
        conn.send((received - start, time.thread_time() - received, total))
        del pixels


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_worker_transfer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--out", default="bench-results/worker-transfer")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    decoded = [rng.integers(0, 256, (800, 1333, 3), dtype=np.uint8) for _ in range(args.batch)]
    images = [
        NetworkImage(torch.from_numpy(hwc).permute(2, 0, 1), False, (800, 1333), (800, 1333), (800, 1344))
        for hwc in decoded
    ]
    expected = sum(int(hwc.sum(dtype=np.int64)) for hwc in decoded)
    megabytes = sum(hwc.nbytes for hwc in decoded) / 1e6

    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(target=child, args=(child_conn,), daemon=True)
    process.start()
    child_conn.close()
    rows = []
    memory = BatchMemory(0)
    try:
        for method in METHODS:
            send_cpu, receive_cpu, read_cpu, wall = [], [], [], []
            for round_ in range(args.batches + 2):  # the first two warm up
                begin_wall, begin_cpu = time.perf_counter(), time.thread_time()
                if method == "pipe":
                    conn.send(("pipe", decoded))
                else:
                    memory.send(conn, 1, round_, images, [None] * len(images))
                sent_cpu = time.thread_time() - begin_cpu
                received, read, total = conn.recv()
                assert total == expected, "the child read other pixels"
                if round_ >= 2:
                    send_cpu.append(sent_cpu)
                    receive_cpu.append(received)
                    read_cpu.append(read)
                    wall.append(time.perf_counter() - begin_wall)
            row = {
                "method": method,
                "batch": args.batch,
                "megabytes": megabytes,
                **{
                    name: 1000 * statistics.median(values)
                    for name, values in (
                        ("send_cpu_ms", send_cpu),
                        ("child_receive_cpu_ms", receive_cpu),
                        ("child_read_cpu_ms", read_cpu),
                        ("wall_ms", wall),
                    )
                },
            }
            rows.append(row)
    finally:
        conn.send(None)
        process.join(timeout=10)
        memory.close()

    print(
        f"{args.batch} decoded 1333x800 images a batch ({megabytes:.1f} MB), median of {args.batches} batches, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    )
    print(
        "\n".join(
            markdown_table(
                [
                    "method",
                    "server's sending thread CPU ms",
                    "child: to tensors CPU ms",
                    "child: one read CPU ms",
                    "wall ms",
                ],
                (
                    [
                        row["method"],
                        f"{row['send_cpu_ms']:.1f}",
                        f"{row['child_receive_cpu_ms']:.1f}",
                        f"{row['child_read_cpu_ms']:.1f}",
                        f"{row['wall_ms']:.1f}",
                    ]
                    for row in rows
                ),
                align="lrrrr",
            )
        )
    )
    pipe, shared = rows
    print(
        f"shared memory against pipe: sending CPU {pipe['send_cpu_ms'] / shared['send_cpu_ms']:.1f}x less, "
        f"wall {pipe['wall_ms'] / shared['wall_ms']:.1f}x less"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "worker_transfer.json").write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out / 'worker_transfer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
