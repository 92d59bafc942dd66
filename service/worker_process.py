"""A model worker in a process of its own (``worker_process=true``), for ``batcher.BatchRunner``.

Why: eager PyTorch releases the GIL around every operator and takes it back afterwards, so a
thread that launches thousands of small GPU kernels a batch waits for the GIL each time another
thread of its process runs Python (the event loop, decoding, JSON), up to the switch interval
each time. In a process of its own, the thread that launches the kernels has its interpreter to
itself; the server's process keeps HTTP, decoding and the host half of post-processing.

The child loads its backend (``export.runtimes.load_backend``), warms up and then runs batches
with the service's own ``Worker.start``: the same pre-processing, forward pass and device half of
post-processing as the in-process worker, so the answers are the same. Over one pipe, the parent
sends each batch (the queued images as numpy arrays, their options) and the requests whose client
left; the child sends back each step's ``FetchedDetections`` (host arrays, run lengths) as soon as
it has them. If the child exits, the requests of its batch are retried one at a time (only one
that makes it exit again gets a 500), readiness reports 503 until a new child is up, and
``transfiner_worker_restarts`` counts the restarts.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
import torch

from export.resolve import ResolvedModel, resolve_model
from model.config import ModelConfig

from .backends import LoadedModel, worker_devices
from .batcher import Job
from .pipeline import NetworkImage
from .settings import ServiceSettings
from .worker import SegmentJob, Worker, run_with_retries, settle

log = logging.getLogger("service")

# A restart that fails (the model cannot load again) is tried again after this long, doubling up to the cap.
RESTART_BACKOFF_S = (1.0, 30.0)


@dataclass(frozen=True)
class WorkerSpec:
    """What a child needs to load its backend and warm up (sent to it when it starts)."""

    resolved: ResolvedModel
    backend: str
    config: str | None
    device: str
    threads: int | None
    precision: str
    max_cells: tuple[int, int, int] | None
    warmup_batches: int
    warmup_batch_size: int
    gil_switch_interval_ms: float
    log_level: str
    index: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    """A child's first message, once its model is loaded and warm."""

    cfg: ModelConfig
    precision: str
    pid: int


class WorkerProcessError(RuntimeError):
    """The child failed a batch, or exited while it ran."""


@dataclass
class _Batch:
    jobs: list[Job]
    done: asyncio.Future
    started: float = field(default_factory=time.perf_counter)
    preprocess_s: float = 0.0


class ProcessWorker:
    """Implements ``batcher.BatchRunner`` with a child process that holds the model."""

    # The child runs its batches in the order sent; a batch sent while one runs has its images
    # in the child before the model is free (they cross the pipe during the forward pass).
    takes_next_batch = True

    def __init__(self, spec: WorkerSpec, metrics=None) -> None:
        self.spec = spec
        self.index = spec.index
        self.metrics = metrics
        self.info: WorkerInfo | None = None
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._sender = ThreadPoolExecutor(1, thread_name_prefix=f"transfiner-worker-{spec.index}-send")
        self._batches: dict[int, _Batch] = {}
        self._ids = itertools.count()
        self._conn: Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._up = asyncio.Event()
        self._closing = False
        self._restarting: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def alive(self) -> bool:
        return self._up.is_set()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> WorkerInfo:
        """Starts the child and waits until its model is loaded and warm; raises if it cannot."""
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._spawn)
        assert self.info is not None
        return self.info

    def _spawn(self) -> None:
        """Blocking: a new child, up and warm, with a thread that reads its messages."""
        conn, child_conn = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_child_main, args=(child_conn, self.spec), name=f"transfiner-worker-{self.index}", daemon=True,
        )
        process.start()
        child_conn.close()
        try:
            message = conn.recv()
        except EOFError:
            process.join()
            raise WorkerProcessError(f"worker process {self.index} exited while loading (code {process.exitcode})") from None
        if message[0] != "ready":
            process.join()
            raise WorkerProcessError(f"worker process {self.index} could not load the model: {message[1]}")
        if self._closing:  # the server stopped while this child loaded
            _send_quietly(conn, ("stop",))
            process.join()
            raise WorkerProcessError(f"worker process {self.index} started after the service stopped")
        self.info, self._conn, self._process = message[1], conn, process
        threading.Thread(
            target=self._receive, args=(conn, process), name=f"transfiner-worker-{self.index}-receive", daemon=True,
        ).start()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._up.set)

    # -- batches -------------------------------------------------------------------------------

    async def run(self, jobs: list[Job]) -> None:
        await run_with_retries(jobs, self._run_batch)

    async def _run_batch(self, jobs: list[Job]) -> None:
        await self._up.wait()
        conn = self._conn
        assert conn is not None
        loop = asyncio.get_running_loop()
        batch_id = next(self._ids)
        batch = self._batches[batch_id] = _Batch(jobs, loop.create_future())
        payloads: list[SegmentJob] = [job.payload for job in jobs]
        message = ("batch", batch_id, [_image_to_wire(p.image) for p in payloads], [p.options for p in payloads])
        for i, job in enumerate(jobs):
            job.future.add_done_callback(lambda future, i=i: self._cancel(future, conn, batch_id, i))
        try:
            await loop.run_in_executor(self._sender, conn.send, message)
            await batch.done
        finally:
            del self._batches[batch_id]
        if self.metrics is not None:
            self.metrics.preprocess_seconds.observe(batch.preprocess_s)
            self.metrics.inference_seconds.observe(time.perf_counter() - batch.started)

    def _cancel(self, future: asyncio.Future, conn: Connection, batch_id: int, index: int) -> None:
        """A request whose client left (or whose deadline passed) needs no masks: the child skips
        them if it has not fetched them yet."""
        if future.cancelled() and batch_id in self._batches:
            self._sender.submit(_send_quietly, conn, ("cancel", batch_id, index))

    def _receive(self, conn: Connection, process) -> None:
        """The reader thread: each message to the event loop; at the end, the child's exit."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            self._loop.call_soon_threadsafe(self._on_message, message)
        conn.close()
        process.join()
        self._loop.call_soon_threadsafe(self._on_exit, process.exitcode)

    def _on_message(self, message: tuple) -> None:
        kind, batch_id, *rest = message
        batch = self._batches.get(batch_id)
        if batch is None or batch.done.done():
            return
        if kind == "started":  # pre-processed; the forward pass starts
            batch.preprocess_s, batch.started = rest[0], time.perf_counter()
        elif kind == "step":
            settle(batch.jobs, rest[0], batch.preprocess_s, time.perf_counter() - batch.started)
        elif kind == "done":
            batch.done.set_result(None)
        elif kind == "error":
            batch.done.set_exception(WorkerProcessError(rest[0]))

    def _on_exit(self, exitcode: int | None) -> None:
        self._up.clear()
        if self._closing:
            return
        log.error("worker process %d (pid %s) exited with code %s; starting it again", self.index, self.pid, exitcode)
        error = WorkerProcessError(f"the worker process exited (code {exitcode})")
        for batch in self._batches.values():
            if not batch.done.done():
                batch.done.set_exception(error)
        self._restarting = asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        delay, cap = RESTART_BACKOFF_S
        while not self._closing:
            try:
                await asyncio.to_thread(self._spawn)
            except Exception as error:  # noqa: BLE001 - logged; tried again
                log.error("worker process %d could not start again (%s); next try in %.0f s", self.index, error, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, cap)
                continue
            self.restarts += 1
            if self.metrics is not None:
                self.metrics.worker_restarts.inc()
            log.info("worker process %d is up again (pid %s)", self.index, self.pid)
            return

    def close(self) -> None:
        """Blocking: asks the child to finish its batch and exit (killed after 30 s)."""
        self._closing = True
        if self._conn is not None:
            _send_quietly(self._conn, ("stop",))
        if self._process is not None:
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._sender.shutdown(wait=True)


async def start_worker_processes(settings: ServiceSettings, metrics=None) -> tuple[LoadedModel, list[ProcessWorker]]:
    """One child per worker device (``backends.worker_devices``), started one after another (the
    first may export a checkpoint into the shared cache that the next ones then read)."""
    resolved = await asyncio.to_thread(resolve_model, settings.model, settings.backend)
    version = await asyncio.to_thread(lambda: resolved.weights_digest)
    devices = worker_devices(settings.device, settings.workers)
    workers = []
    try:
        for index, device in enumerate(devices):
            spec = WorkerSpec(
                resolved, settings.backend, settings.config, str(device), settings.torch_threads, settings.precision,
                settings.max_cells, settings.warmup_batches, settings.max_batch_size if device.type == "cuda" else 1,
                settings.gil_switch_interval_ms, settings.log_level, index,
            )
            worker = ProcessWorker(spec, metrics)
            workers.append(worker)
            await worker.start()
    except BaseException:
        for worker in workers:
            await asyncio.to_thread(worker.close)
        raise
    info = workers[0].info
    model = LoadedModel([], resolved.name, version, settings.backend, [str(d) for d in devices], info.cfg, info.precision)
    return model, workers


# -- the wire --------------------------------------------------------------------------------------


def _image_to_wire(image: NetworkImage) -> tuple:
    """The image with its pixels as a numpy array in their own memory order (a permuted view of
    decoded HWC pixels stays one), so the child resizes exactly the same tensor layout."""
    pixels = image.pixels
    order = sorted(range(pixels.dim()), key=lambda d: -pixels.stride(d))
    dense = pixels.permute(order).contiguous()  # a no-op for a permuted view of dense memory
    back = [order.index(d) for d in range(pixels.dim())]
    return dense.numpy(), back, image.resized, image.original, image.network, image.canvas


def _image_from_wire(wire: tuple) -> NetworkImage:
    array, back, *rest = wire
    return NetworkImage(torch.from_numpy(array).permute(back), *rest)


def _send_quietly(conn: Connection, message: tuple) -> None:
    try:
        conn.send(message)
    except (OSError, ValueError):  # the child is gone; its exit is handled by the reader
        pass


# -- the child -------------------------------------------------------------------------------------


def _child_main(conn: Connection, spec: WorkerSpec) -> None:
    # The server's process decides when its workers stop (a "stop" message after draining, or
    # the pipe closing when it exits): a Ctrl-C sent to the terminal's whole process group must
    # not kill a worker before the server has drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[worker %(process)d]: %(message)s")
    sys.setswitchinterval(spec.gil_switch_interval_ms / 1000)
    try:
        from export.runtimes import load_backend

        if spec.threads:
            torch.set_num_threads(spec.threads)
        backend = load_backend(
            spec.resolved, spec.backend, spec.config, torch.device(spec.device), spec.threads, spec.precision,
            spec.max_cells,
        )
        worker = Worker(backend, spec.index)
        worker.warm_up(spec.warmup_batches, spec.warmup_batch_size)
    except Exception as error:  # noqa: BLE001 - the parent reports it
        log.exception("the model could not be loaded")
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", WorkerInfo(backend.cfg, backend.precision, os.getpid())))

    batches: queue.SimpleQueue = queue.SimpleQueue()
    cancelled: set[tuple[int, int]] = set()
    threading.Thread(target=_child_receive, args=(conn, batches, cancelled), daemon=True).start()
    while (message := batches.get()) is not None:
        _, batch_id, images, options = message
        try:
            steps, preprocess_s = worker.start(
                [_image_from_wire(image) for image in images], options, lambda i: (batch_id, i) not in cancelled,
            )
            conn.send(("started", batch_id, preprocess_s))
            for step in steps:
                conn.send(("step", batch_id, step))
            conn.send(("done", batch_id))
        except Exception as error:  # noqa: BLE001 - answered as this batch's failure
            log.exception("a batch failed")
            conn.send(("error", batch_id, f"inference failed in the worker process: {type(error).__name__}: {error}"))
        cancelled.difference_update({(batch_id, i) for i in range(len(images))})
    worker.close()


def _child_receive(conn: Connection, batches: queue.SimpleQueue, cancelled: set[tuple[int, int]]) -> None:
    """The child's reader thread: batches to the main thread, cancellations into ``cancelled``."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server's process is gone
            break
        if message[0] == "batch":
            batches.put(message)
        elif message[0] == "cancel":
            cancelled.add((message[1], message[2]))
        else:  # stop
            break
    batches.put(None)


__all__ = ["ProcessWorker", "WorkerInfo", "WorkerProcessError", "WorkerSpec", "start_worker_processes"]
