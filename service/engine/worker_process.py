"""A model worker in a process of its own (``worker_process=true``), for ``batcher.BatchRunner``.

- Why: eager PyTorch releases the GIL around every operator and takes it back afterwards, so a
  thread that launches thousands of small GPU kernels a batch waits for the GIL each time another
  thread of its process runs Python (the event loop, decoding, JSON), up to the switch interval each
  time. In a process of its own, the thread that launches the kernels has its interpreter to itself;
  the server's process keeps HTTP, decoding and the host half of post-processing.
- The child loads its backend (``export.backends.load_backend``), warms up and then runs batches
  with the service's own ``Worker.start``: the same pre-processing, forward pass and device half of
  post-processing as the in-process worker, so the answers are the same.
- Over one pipe, the parent sends each batch (its images' layout and options, their pixels in
  shared memory: ``BatchMemory``) and the requests whose client left; the child sends back each
  step's ``FetchedDetections`` (host arrays, run lengths) as soon as it has them.
- If the child exits, a new one is started: readiness reports 503 until it is up, and
  ``transfiner_worker_restarts`` counts the restarts. The batches it had run again on the new child,
  within their requests' deadlines (``worker.run_with_retries``): the one it was computing one request
  at a time, where only a request that makes it exit again gets a 500; those queued behind as they were.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import mmap
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import reduction
from multiprocessing.connection import Connection

import torch

from transfiner.export.resolve import ResolvedModel, resolve_model
from transfiner.model.config import ModelConfig
from transfiner.service.engine.batcher import DeadlineExceeded, Job
from transfiner.service.engine.loading import LoadedModel, worker_devices
from transfiner.service.engine.pipeline import NetworkImage
from transfiner.service.engine.worker import (
    SegmentJob,
    Worker,
    WorkerExited,
    observe_batch,
    run_with_retries,
    settle,
)
from transfiner.service.settings import ServiceSettings

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
    """The child could not start, or a batch raised in it."""


@dataclass
class _Batch:
    jobs: list[Job]
    done: asyncio.Future
    started: float = field(default_factory=time.perf_counter)
    preprocess_s: float = 0.0
    observed: bool = False  # its times are in the metrics


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
        self._free_memory: list[BatchMemory] = []  # shared memory of batches no longer in flight
        self._memory_count = 0
        self._child = 0  # counts the children started, so a new one is sent the memory it has not mapped
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
            target=_child_main,
            args=(child_conn, self.spec),
            name=f"transfiner-worker-{self.index}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        try:
            message = conn.recv()
        except EOFError:
            process.join()
            raise WorkerProcessError(
                f"worker process {self.index} exited while loading (code {process.exitcode})"
            ) from None
        if message[0] != "ready":
            process.join()
            raise WorkerProcessError(f"worker process {self.index} could not load the model: {message[1]}")
        if self._closing:  # the server stopped while this child loaded
            _send_quietly(conn, ("stop",))
            process.join()
            raise WorkerProcessError(f"worker process {self.index} started after the service stopped")
        self.info, self._conn, self._process = message[1], conn, process
        self._child += 1
        threading.Thread(
            target=self._receive,
            args=(conn, process),
            name=f"transfiner-worker-{self.index}-receive",
            daemon=True,
        ).start()
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._up.set)

    # -- batches -------------------------------------------------------------------------------

    async def run(self, jobs: list[Job]) -> None:
        await run_with_retries(jobs, self._run_batch)

    async def _run_batch(self, jobs: list[Job]) -> None:
        if not await self._wait_up(jobs):
            return
        jobs = [job for job in jobs if not job.future.done()]  # their deadlines may have passed meanwhile
        if not jobs:
            return
        conn, child = self._conn, self._child
        assert conn is not None
        loop = asyncio.get_running_loop()
        batch_id = next(self._ids)
        batch = self._batches[batch_id] = _Batch(jobs, loop.create_future())
        payloads: list[SegmentJob] = [job.payload for job in jobs]
        for i, job in enumerate(jobs):
            job.future.add_done_callback(lambda future, i=i: self._cancel(future, conn, batch_id, i))
        # The batch's memory is not reused before the child is done with the batch (or gone).
        memory = self._free_memory.pop() if self._free_memory else self._new_memory()
        try:
            try:
                await loop.run_in_executor(
                    self._sender,
                    memory.send,
                    conn,
                    child,
                    batch_id,
                    [p.image for p in payloads],
                    [p.options for p in payloads],
                )
            except OSError as error:
                # The child's end of the pipe is gone (or the reader closed ours at its end):
                # the child's exit fails this batch with ``WorkerExited`` below.
                if not (isinstance(error, ConnectionError) or conn.closed):
                    raise
            await batch.done
        finally:
            del self._batches[batch_id]
            self._free_memory.append(memory)
        if not batch.observed:
            observe_batch(self.metrics, batch.preprocess_s, time.perf_counter() - batch.started)

    async def _wait_up(self, jobs: list[Job]) -> bool:
        """Waits for a child to be up (a restarted one after an exit), until the last of the jobs'
        deadlines; past it, the jobs get ``DeadlineExceeded`` (504) and this returns False."""
        while not self._up.is_set():  # again after waking: the child may have exited since
            remaining = max(job.deadline for job in jobs) - time.monotonic()
            try:
                await asyncio.wait_for(self._up.wait(), max(0.0, remaining))
            except TimeoutError:
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(DeadlineExceeded("the deadline passed while the worker restarted"))
                return False
        return True

    def _new_memory(self) -> BatchMemory:
        self._memory_count += 1  # as many as batches in flight at once: two under load (the look-ahead)
        return BatchMemory(self._memory_count - 1)

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
            inference_s = time.perf_counter() - batch.started
            if settle(batch.jobs, rest[0], batch.preprocess_s, inference_s) and not batch.observed:
                observe_batch(self.metrics, batch.preprocess_s, inference_s)
                batch.observed = True
        elif kind == "done":
            batch.done.set_result(None)
        elif kind == "error":
            batch.done.set_exception(WorkerProcessError(rest[0]))

    def _on_exit(self, exitcode: int | None) -> None:
        self._up.clear()
        if self._closing:
            return
        log.error("worker process %d (pid %s) exited with code %s; starting it again", self.index, self.pid, exitcode)
        # The child computes its batches in the order sent, so of those it had not finished, the
        # first is the one it died under (or was about to start); the others only waited behind it.
        computing = True
        for batch in self._batches.values():
            if not batch.done.done():
                batch.done.set_exception(WorkerExited(f"the worker process exited (code {exitcode})", computing))
                computing = False
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
        if self._conn is not None:  # through the sender, so it cannot split a batch from its descriptor
            try:
                self._sender.submit(_send_quietly, self._conn, ("stop",)).result(timeout=30)
            except TimeoutError:  # a child that reads nothing more: killed below
                pass
        if self._process is not None:
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._sender.shutdown(wait=True)
        for memory in self._free_memory:
            memory.close()


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
                resolved,
                settings.backend,
                settings.config,
                str(device),
                settings.torch_threads,
                settings.precision,
                settings.max_cells,
                settings.warmup_batches,
                settings.max_batch_size if device.type == "cuda" else 1,
                settings.gil_switch_interval_ms,
                settings.log_level,
                index,
            )
            worker = ProcessWorker(spec, metrics)
            workers.append(worker)
            await worker.start()
    except BaseException:
        for worker in workers:
            await asyncio.to_thread(worker.close)
        raise
    info = workers[0].info
    model = LoadedModel(
        [], resolved.name, version, settings.backend, [str(d) for d in devices], info.cfg, info.precision
    )
    return model, workers


# -- the wire --------------------------------------------------------------------------------------


# A batch's pixels (25 MB for 8 decoded 1333x800 images) cross in shared memory: pickled through
# the pipe they cost the server's process several copies under the GIL, and the child's reader
# thread another while the model thread waits for the interpreter. Each batch in flight has a
# memfd that the child maps once (its descriptor passed over the pipe, a Unix socket:
# SCM_RIGHTS) and that is reused for batch after batch, because a fresh one costs a page fault
# a page on both sides (scripts/bench_worker_transfer.py). The child's tensors read the pixels in
# place. An anonymous file lives only as long as a descriptor or mapping of it: nothing is left
# behind when either process dies.

_ALIGN = 64  # bytes: each image starts on a cache line


@dataclass(frozen=True)
class WireImage:
    """Where one image's pixels lie in its batch's shared memory, and what the child rebuilds
    from them. The pixels keep their own memory order (a permuted view of decoded HWC pixels
    stays one), so the child resizes exactly the same tensor layout as the in-process worker."""

    offset: int  # bytes from the start of the batch's memory
    dtype: torch.dtype
    shape: tuple[int, ...]  # of the pixels in memory order
    back: tuple[int, ...]  # the permutation from memory order to [3, h, w]
    resized: bool
    original: tuple[int, int]
    network: tuple[int, int]
    canvas: tuple[int, int]


class BatchMemory:
    """The shared memory of one batch in flight to a worker process, kept for the next batch and
    grown (a new memfd) when a batch needs more. Used by one thread at a time."""

    def __init__(self, index: int) -> None:
        self.index = index  # the child keeps its mapping under this key
        self.fd: int | None = None
        self.size = 0
        self._memory: mmap.mmap | None = None
        self._mapped_by: int | None = None  # the child (``ProcessWorker._child``) that has this memfd mapped

    def write(self, images: list[NetworkImage]) -> list[WireImage]:
        """The images' pixels into this memory (grown if needed) -> where each lies."""
        layout, in_memory, size = [], [], 0
        for image in images:
            pixels = image.pixels
            order = sorted(range(pixels.dim()), key=lambda d: -pixels.stride(d))
            dense = pixels.permute(order).contiguous()  # a no-op for a permuted view of dense memory
            back = tuple(order.index(d) for d in range(pixels.dim()))
            layout.append(
                WireImage(
                    size,
                    pixels.dtype,
                    tuple(dense.shape),
                    back,
                    image.resized,
                    image.original,
                    image.network,
                    image.canvas,
                )
            )
            in_memory.append(dense)
            size += -(-dense.numel() * dense.element_size() // _ALIGN) * _ALIGN
        if size > self.size:
            self.close()
            self.fd = os.memfd_create(f"transfiner-batch-{self.index}", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, size)
            self._memory, self.size = mmap.mmap(self.fd, size), size
        for wire, dense in zip(layout, in_memory):
            pixels_at(self._memory, wire).copy_(dense)  # torch's copy runs without the GIL
        return layout

    def send(self, conn: Connection, child: int, batch_id: int, images: list[NetworkImage], options: list) -> None:
        """On the sender thread: the pixels into this memory, the batch's message, and the memfd's
        descriptor when the child has not mapped it yet."""
        layout = self.write(images)
        new = self._mapped_by != child
        conn.send(("batch", batch_id, self.index, self.size if new else None, layout, options))
        if new:
            reduction.send_handle(conn, self.fd, 0)  # the destination process is only used on Windows
            self._mapped_by = child

    def close(self) -> None:
        if self._memory is not None:
            self._memory.close()
            os.close(self.fd)
        self._memory, self.fd, self.size, self._mapped_by = None, None, 0, None


def receive_memory(conn: Connection, size: int) -> mmap.mmap:
    """The child's side of the descriptor ``BatchMemory.send`` passes: that memfd, mapped (the
    descriptor itself is closed; the mapping keeps the memory)."""
    fd = reduction.recv_handle(conn)
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def pixels_at(memory: mmap.mmap, wire: WireImage) -> torch.Tensor:
    """The pixels of ``wire`` in ``memory``, in place, in memory order."""
    return torch.frombuffer(memory, dtype=wire.dtype, count=math.prod(wire.shape), offset=wire.offset).view(wire.shape)


def read_images(memory: mmap.mmap, layout: list[WireImage]) -> list[NetworkImage]:
    """A batch's images from the child's mapping of its memory, read in place."""
    return [
        NetworkImage(pixels_at(memory, wire).permute(wire.back), wire.resized, wire.original, wire.network, wire.canvas)
        for wire in layout
    ]


def _page_locked(images: list[NetworkImage]) -> list[NetworkImage]:
    """The images with their pixels copied into page-locked memory, in the same layout (torch's
    copy runs without the GIL); as they are if none can be had, and pre-processing copies them."""
    try:
        return [replace(image, pixels=image.pixels.pin_memory()) for image in images]
    except RuntimeError:
        log.warning("no page-locked memory for a batch's %d images", len(images), exc_info=True)
        return images


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
    logging.basicConfig(
        level=spec.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s[worker %(process)d]: %(message)s"
    )
    sys.setswitchinterval(spec.gil_switch_interval_ms / 1000)
    try:
        from transfiner.export.backends import load_backend

        if spec.threads:
            torch.set_num_threads(spec.threads)
        backend = load_backend(
            spec.resolved,
            spec.backend,
            spec.config,
            torch.device(spec.device),
            spec.threads,
            spec.precision,
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
    pin = torch.device(spec.device).type == "cuda"
    threading.Thread(target=_child_receive, args=(conn, batches, cancelled, pin), daemon=True).start()
    while (message := batches.get()) is not None:
        batch_id, images, options = message
        try:
            steps, preprocess_s = worker.start(images, options, lambda i, batch=batch_id: (batch, i) not in cancelled)
            conn.send(("started", batch_id, preprocess_s))
            for step in steps:
                conn.send(("step", batch_id, step))
            conn.send(("done", batch_id))
        except Exception as error:  # noqa: BLE001 - answered as this batch's failure
            log.exception("a batch failed")
            conn.send(("error", batch_id, f"inference failed in the worker process: {type(error).__name__}: {error}"))
        cancelled.difference_update({(batch_id, i) for i in range(len(images))})
        message = images = steps = None  # unmaps the batch's shared memory while the next is awaited
    worker.close()


def _child_receive(conn: Connection, batches: queue.SimpleQueue, cancelled: set[tuple[int, int]], pin: bool) -> None:
    """The child's reader thread: batches to the main thread, cancellations into ``cancelled``.

    ``pin`` (a CUDA worker): each batch's pixels are copied into page-locked memory here, where
    a batch sent ahead waits while the model runs the one before; the model thread's
    pre-processing then starts their uploads at once instead of copying them first
    (``model.transfer.to_device``), with the card idle meanwhile."""
    mappings: dict[int, mmap.mmap] = {}  # BatchMemory.index -> this child's mapping of it
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server's process is gone
            break
        if message[0] == "batch":
            _, batch_id, index, size, layout, options = message
            if size is not None:  # memory this child has not mapped yet (or grown since)
                try:
                    # A batch still queued keeps the old mapping alive through its tensors.
                    mappings[index] = receive_memory(conn, size)
                except (EOFError, OSError, RuntimeError):  # the server's process died between the two
                    break
            images = read_images(mappings[index], layout)
            batches.put((batch_id, _page_locked(images) if pin else images, options))
        elif message[0] == "cancel":
            cancelled.add((message[1], message[2]))
        else:  # stop
            break
    batches.put(None)


__all__ = [
    "BatchMemory",
    "ProcessWorker",
    "WireImage",
    "WorkerInfo",
    "WorkerProcessError",
    "WorkerSpec",
    "pixels_at",
    "read_images",
    "receive_memory",
    "start_worker_processes",
]
