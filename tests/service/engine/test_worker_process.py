"""Model workers in processes of their own (``worker_process=true``), through the real server.

The answers must be the in-process worker's, to the byte, for batched images of mixed sizes (and
so both ways an image waits in the queue: decoded uint8 pixels, or resized on decode). A worker
process that dies is started again: readiness reports it, the requests of its batch, a lone one
included, run again on the new process and get the answers they would have got, within their
deadlines; only a request the process dies under twice gets a JSON 500, which says so.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import signal
import subprocess
import time
from multiprocessing import Pipe
from pathlib import Path

import httpx
import pytest
import torch

from tests.service.support import ThreadServer, assert_same, free_port, metric, running, wait_ready
from tests.support import CATEGORY_IDS, REPO, encode, scene, tiny_config
from transfiner.model.inference.predictor import load_predictor
from transfiner.service.engine.pipeline import network_image
from transfiner.service.engine.worker_process import BatchMemory, _page_locked, read_images, receive_memory
from transfiner.service.loadtest.servers import SERVE_COMMAND
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(300)

# (height, width): landscape and portrait canvases, and one large enough to be resized on decode.
SIZES = [(96, 128), (96, 128), (128, 96), (400, 520)]


def segment(url: str, image, timeout: float = 120) -> httpx.Response:
    return httpx.post(
        url + "/v1/segment",
        content=encode(image),
        headers={"Content-Type": "image/png"},
        params={"score_threshold": 0.0, "max_detections": 6},
        timeout=timeout,
    )


def expected_records(predictor, image) -> list[dict]:
    prediction = predictor(image, score_threshold=0.0, max_detections=6)
    return prediction.coco_records(None, CATEGORY_IDS)


def test_images_cross_to_the_worker_process_in_shared_memory_in_their_memory_layout():
    decoded = network_image(scene(96, 128).copy(), (96, 128), tiny_config().input)  # a [3, h, w] view of HWC
    resized = network_image(scene(400, 520).copy(), (400, 520), tiny_config().input)  # float32, resized here
    small = network_image(scene(64, 64, seed=3).copy(), (64, 64), tiny_config().input)
    assert not decoded.resized and resized.resized
    memory = BatchMemory(0)
    sender, receiver = Pipe(duplex=True)  # the worker's pipe: the memfd's descriptor crosses as it does
    try:
        received = {}  # what the child's reader keeps: index -> its mapping

        def cross(images: list, child: int) -> list:
            memory.send(sender, child, 7, images, [None] * len(images))
            _, batch_id, index, size, layout, _ = receiver.recv()
            if size is not None:
                received[index] = receive_memory(receiver, size)
            return read_images(received[index], layout), layout, size

        images = [decoded, resized, decoded]
        back, layout, size = cross(images, child=1)
        assert size is not None  # a new child is sent the descriptor
        for got, image in zip(back, images, strict=True):
            assert got.pixels.stride() == image.pixels.stride() and got.pixels.dtype == image.pixels.dtype
            assert torch.equal(got.pixels, image.pixels)
            assert (got.resized, got.original, got.network, got.canvas) == (
                image.resized,
                image.original,
                image.network,
                image.canvas,
            )
        # The child's tensors read the one shared mapping in place.
        starts = [got.pixels.data_ptr() - back[0].pixels.data_ptr() for got in back]
        assert starts == [wire.offset - layout[0].offset for wire in layout]

        # The next batch reuses the memory the child has mapped: no descriptor, the new pixels.
        back, _, size = cross([small], child=1)
        assert size is None and torch.equal(back[0].pixels, small.pixels)
        # A batch larger than the memory grows it: a new descriptor, the child maps it anew.
        first_mapping = received[0]
        back, _, size = cross([resized, resized, resized, decoded], child=1)
        assert size is not None and received[0] is not first_mapping
        assert torch.equal(back[3].pixels, decoded.pixels) and torch.equal(back[2].pixels, resized.pixels)
        # A restarted child has mapped nothing: it gets the descriptor again.
        _, _, size = cross([small], child=2)
        assert size is not None
    finally:
        memory.close()
        sender.close()
        receiver.close()


def test_a_cuda_workers_batch_is_copied_into_page_locked_memory_as_it_arrives(caplog):
    """On a GPU host the copies are page-locked, in the same layout; where none can be had (no
    CUDA driver: here on a CPU host), the batch goes on as it came and pre-processing copies it."""
    images = [
        network_image(scene(96, 128).copy(), (96, 128), tiny_config().input),
        network_image(scene(400, 520).copy(), (400, 520), tiny_config().input),
    ]
    staged = _page_locked(images)
    if torch.cuda.is_available():
        for got, image in zip(staged, images, strict=True):
            assert got.pixels.is_pinned() and got.pixels.data_ptr() != image.pixels.data_ptr()
            assert got.pixels.stride() == image.pixels.stride() and torch.equal(got.pixels, image.pixels)
            assert (got.resized, got.original, got.network, got.canvas) == (
                image.resized,
                image.original,
                image.network,
                image.canvas,
            )
    else:
        assert staged is images
        assert "no page-locked memory" in caplog.text


def test_answers_equal_the_predictors_alone_and_batched(checkpoint, predictor):
    images = [scene(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    settings = ServiceSettings(
        model=str(checkpoint),
        device="cpu",
        worker_process=True,
        max_batch_size=4,
        max_delay_ms=300,
    )
    with running(settings) as server:
        alone = []
        for image in images:  # one at a time: batches of one, as the Predictor's of one image
            response = segment(server.url, image)
            assert response.status_code == 200, response.text
            alone.append(response.json()["instances"])
            assert_same(alone[-1], expected_records(predictor, image))
        batches = metric(server.url, "transfiner_batch_size_count")

        with concurrent.futures.ThreadPoolExecutor(len(images)) as pool:
            responses = list(pool.map(lambda image: segment(server.url, image), images))
        # The three images on the 96x128 canvas share a forward pass (across the process boundary).
        assert metric(server.url, "transfiner_batch_size_count") - batches == 2
        batched = predictor.predict(images, score_threshold=0.0, max_detections=6)  # one pass per canvas
        for response, prediction in zip(responses, batched):
            assert response.status_code == 200, response.text
            assert_same(response.json()["instances"], prediction.coco_records(None, CATEGORY_IDS), 1e-5)

        # Polygon windows and box-only answers cross the pipe too: the same detections as the RLE answer's.
        rle = alone[0]
        for mask_format in ("polygon", "none"):
            response = httpx.post(
                server.url + "/v1/segment",
                content=encode(images[0]),
                headers={"Content-Type": "image/png"},
                params={"score_threshold": 0.0, "max_detections": 6, "mask_format": mask_format},
                timeout=120,
            )
            assert response.status_code == 200, response.text
            instances = response.json()["instances"]
            assert [(i["bbox"], i["score"]) for i in instances] == [(i["bbox"], i["score"]) for i in rle]
            if mask_format == "polygon":
                assert all(isinstance(i["segmentation"], list) and i["segmentation"] for i in instances)

        card = httpx.get(server.url + "/v1/models").json()["models"][0]
        assert card["name"] == "default" and card["precision"] == "fp32" and card["device"] == ["cpu"]
        assert card["ready"] is True and card["batching"]["worker_process"] is True


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def kill_with_a_batch_in_its_pipe(server, pid: int, image, count: int, after_kill=lambda: None) -> list:
    """Freezes the worker process ``pid``, sends ``count`` requests, waits until their batch has
    gone down its pipe, kills it, runs ``after_kill`` and returns the requests' responses."""
    batches = metric(server.url, "transfiner_batch_size_count")
    os.kill(pid, signal.SIGSTOP)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        pending = [pool.submit(segment, server.url, image) for _ in range(count)]
        wait_for(lambda: metric(server.url, "transfiner_batch_size_count") >= batches + 1)
        time.sleep(0.2)  # the batch goes down the pipe
        os.kill(pid, signal.SIGKILL)
        after_kill()
        return [p.result() for p in pending]


def test_a_worker_process_that_dies_is_started_again(checkpoint, predictor):
    image = scene(96, 128, seed=3)
    expected = expected_records(predictor, image)
    settings = ServiceSettings(
        model=str(checkpoint),
        device="cpu",
        worker_process=True,
        max_batch_size=3,
        max_delay_ms=500,
    )
    with running(settings) as server:
        worker = server.runtime.models.find(None).workers[0]
        first_pid = worker.pid
        before = segment(server.url, image)  # the answer without a crash
        assert before.status_code == 200, before.text
        assert_same(before.json()["instances"], expected)

        # A batch of three is in the pipe of a frozen worker when it is killed: its requests run
        # again on the new process, and all get the answer they get without a crash.
        batches = metric(server.url, "transfiner_batch_size_count")
        images = metric(server.url, "transfiner_batch_size_sum")
        responses = kill_with_a_batch_in_its_pipe(
            server,
            first_pid,
            image,
            3,
            after_kill=lambda: wait_for(
                lambda: httpx.get(server.url + "/health/ready").json()["status"] == "restarting"
            ),
        )
        assert metric(server.url, "transfiner_batch_size_count") - batches == 1
        assert metric(server.url, "transfiner_batch_size_sum") - images == 3  # one batch of three
        for response in responses:
            assert response.status_code == 200, response.text
            assert response.json()["instances"] == before.json()["instances"]
        assert worker.pid != first_pid and worker.alive
        assert metric(server.url, "transfiner_worker_restarts_total") == 1
        assert httpx.get(server.url + "/health/ready").status_code == 200

        # So does a lone request.
        second_pid = worker.pid
        [response] = kill_with_a_batch_in_its_pipe(server, second_pid, image, 1)
        assert response.status_code == 200, response.text
        assert response.json()["instances"] == before.json()["instances"]
        assert worker.pid != second_pid and worker.alive
        assert metric(server.url, "transfiner_worker_restarts_total") == 2


def on_restart(action) -> logging.Handler:
    """A handler for the ``service`` logger that calls ``action(pid)`` when a worker process is up
    again (as process ``pid``): the event loop logs it as it wakes the batches that waited for it,
    before the new process can have computed any."""

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg.startswith("worker process %d is up again"):
                action(record.args[1])

    return Handler()


def test_only_a_request_the_worker_process_dies_under_twice_fails(checkpoint, predictor, caplog):
    """Two requests share a batch that the worker process dies under; whichever of them the new
    process computes first, it dies under again. That request gets a 500 that says so; the other
    one runs on the next process and gets its answer."""
    caplog.set_level(logging.INFO, logger="service")  # the "is up again" line
    images = [scene(96, 128, seed=11), scene(96, 128, seed=12)]  # one canvas: one batch
    settings = ServiceSettings(
        model=str(checkpoint),
        device="cpu",
        worker_process=True,
        max_batch_size=2,
        max_delay_ms=2000,
    )
    with running(settings) as server:
        worker = server.runtime.models.find(None).workers[0]
        first_pid = worker.pid
        frozen = []  # the restarted process, frozen as it comes up with a retry on its way

        def freeze_once(pid: int) -> None:
            if not frozen:
                frozen.append(pid)
                os.kill(pid, signal.SIGSTOP)

        handler = on_restart(freeze_once)
        logging.getLogger("service").addHandler(handler)
        try:
            batches = metric(server.url, "transfiner_batch_size_count")
            os.kill(first_pid, signal.SIGSTOP)
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                pending = [pool.submit(segment, server.url, image) for image in images]
                wait_for(lambda: metric(server.url, "transfiner_batch_size_count") >= batches + 1)
                time.sleep(0.2)  # the batch goes down the pipe
                os.kill(first_pid, signal.SIGKILL)
                wait_for(lambda: bool(frozen))
                time.sleep(0.2)  # the first retry goes down the new process's pipe
                os.kill(frozen[0], signal.SIGKILL)
                responses = [p.result() for p in pending]
        finally:
            logging.getLogger("service").removeHandler(handler)
        assert metric(server.url, "transfiner_batch_size_count") - batches == 1  # both in one batch

        statuses = sorted(response.status_code for response in responses)
        assert statuses == [200, 500], [response.text for response in responses]
        for image, response in zip(images, responses):
            if response.status_code == 500:
                assert response.json()["error"] == {
                    "code": "internal_error",
                    "message": "the model worker process exited twice while computing this request",
                }
            else:
                assert_same(response.json()["instances"], expected_records(predictor, image))
        wait_for(lambda: worker.alive and worker.pid not in (first_pid, frozen[0]))
        assert metric(server.url, "transfiner_worker_restarts_total") == 2
        response = segment(server.url, images[0])  # the server keeps serving
        assert response.status_code == 200
        assert_same(response.json()["instances"], expected_records(predictor, images[0]))


def spawned_children() -> set[int]:
    """This process's children that ``multiprocessing`` spawned (worker processes among them)."""
    found = set()
    for pid in children(os.getpid()):
        try:
            if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(pid)
        except OSError:
            pass
    return found


def test_a_request_whose_worker_process_is_not_back_by_its_deadline_gets_504(checkpoint, predictor):
    image = scene(96, 128, seed=4)
    settings = ServiceSettings(model=str(checkpoint), device="cpu", worker_process=True, max_delay_ms=50)
    with running(settings) as server:
        worker = server.runtime.models.find(None).workers[0]
        first_pid = worker.pid
        before = spawned_children()
        loading = []  # the new process, frozen while it loads the model

        def freeze_the_next_process() -> None:
            wait_for(lambda: bool(spawned_children() - before))
            loading.extend(spawned_children() - before)
            for pid in loading:
                os.kill(pid, signal.SIGSTOP)

        os.kill(first_pid, signal.SIGSTOP)
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(
                    httpx.post,
                    server.url + "/v1/segment",
                    content=encode(image),
                    headers={"Content-Type": "image/png", "X-Request-Timeout": "2"},
                    timeout=60,
                )
                batches = metric(server.url, "transfiner_batch_size_count")
                wait_for(lambda: metric(server.url, "transfiner_batch_size_count") >= batches + 1)
                os.kill(first_pid, signal.SIGKILL)
                freeze_the_next_process()
                response = pending.result()
            assert response.status_code == 504, response.text
            assert response.json()["error"]["code"] == "deadline_exceeded"
            assert httpx.get(server.url + "/health/ready").json()["status"] == "restarting"
        finally:
            for pid in loading:
                os.kill(pid, signal.SIGCONT)
        wait_for(lambda: worker.alive and worker.pid != first_pid)
        assert metric(server.url, "transfiner_worker_restarts_total") == 1
        response = segment(server.url, image)
        assert response.status_code == 200, response.text
        assert_same(response.json()["instances"], expected_records(predictor, image))


def test_the_next_full_batch_crosses_to_the_worker_process_while_one_runs(checkpoint, predictor):
    image = scene(96, 128, seed=5)
    expected = expected_records(predictor, image)
    settings = ServiceSettings(
        model=str(checkpoint),
        device="cpu",
        worker_process=True,
        max_batch_size=2,
        max_delay_ms=100,
    )
    with running(settings) as server:
        pid = server.runtime.models.find(None).workers[0].pid
        batches = metric(server.url, "transfiner_batch_size_count")
        os.kill(pid, signal.SIGSTOP)  # the worker holds its first batch for as long as we like
        try:
            with concurrent.futures.ThreadPoolExecutor(6) as pool:
                pending = [pool.submit(segment, server.url, image) for _ in range(6)]
                # The first batch, then the next full one, go to the worker; the third waits.
                wait_for(
                    lambda: (
                        metric(server.url, "transfiner_batch_size_count") == batches + 2
                        and metric(server.url, "transfiner_queue_depth") == 2
                    )
                )
                time.sleep(0.3)
                assert metric(server.url, "transfiner_batch_size_count") == batches + 2
                os.kill(pid, signal.SIGCONT)
                responses = [p.result() for p in pending]
        finally:
            os.kill(pid, signal.SIGCONT)
        for response in responses:
            assert response.status_code == 200, response.text
            assert_same(response.json()["instances"], expected, 1e-5)  # batched with copies of itself


def test_a_model_the_worker_process_cannot_load_fails_readiness(tmp_path: Path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    settings = ServiceSettings(model=str(broken), device="cpu", worker_process=True)
    server = ThreadServer(settings)
    server._thread.start()
    try:
        wait_for(lambda: server.runtime.state == "failed", timeout=120)
        ready = httpx.get(server.url + "/health/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "failed" and "could not load the model" in body["detail"]
        assert httpx.get(server.url + "/health/live").status_code == 200
    finally:
        server.stop()


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_ctrl_c_drains_the_server_before_its_worker_process_stops(checkpoint, tmp_path):
    """Ctrl-C reaches the terminal's whole process group, the worker process included: the
    worker must keep running until the server has drained (its in-flight requests answered),
    then stop with it, leaving no process behind."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, TRANSFINER_DEVICE="cpu", TRANSFINER_TORCH_THREADS="1", TRANSFINER_SHUTDOWN_GRACE_S="0.5")
    log = open(tmp_path / "serve.log", "w+")
    command = [
        *SERVE_COMMAND,
        "--worker-process",
        "--model",
        str(checkpoint),
        "--port",
        str(port),
        "--grpc-port",
        "0",
        "--max-delay-ms",
        "300",
        "--log-level",
        "info",
    ]
    proc = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
    )  # its own process group, as a shell gives a job
    try:
        wait_ready(url, timeout=120)
        workers = children(proc.pid)
        assert workers, "the worker process runs as a child of the server"
        png = encode(scene())
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            inflight = [pool.submit(httpx.post, url + "/v1/segment", content=png, timeout=60) for _ in range(3)]
            wait_for(lambda: metric(url, "transfiner_inflight_requests") == 3, timeout=30)
            os.killpg(proc.pid, signal.SIGINT)
            assert [f.result().status_code for f in inflight] == [200] * 3
        assert proc.wait(timeout=60) == 0
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        output = log.read()
        log.close()
    assert "Traceback" not in output and "exited with code" not in output, output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_worker_process_answers_as_the_in_process_worker(checkpoint):
    images = [scene(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    answers = {}
    for worker_process in (False, True):
        settings = ServiceSettings(model=str(checkpoint), device="cuda", worker_process=worker_process)
        with running(settings) as server:
            answers[worker_process] = []
            for image in images:
                response = segment(server.url, image)
                assert response.status_code == 200, response.text
                answers[worker_process].append(response.json()["instances"])
            assert httpx.get(server.url + "/v1/models").json()["models"][0]["device"] == ["cuda:0"]
    for in_thread, in_process in zip(answers[False], answers[True]):
        assert_same(in_process, in_thread, 1e-5)  # the same kernels; a tolerance in case cuDNN picks others


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_a_batch_is_in_the_metrics_before_its_answers_go_out(checkpoint, kind):
    """``transfiner bench`` counts each load step's batches from /metrics scraped after the step's
    last answer; a batch counted only once its worker got round to it afterwards fell into the next
    step. So a batch's times are observed before any of its answers can be sent: by the time the
    event loop runs a callback of its last answer, they are in."""
    import asyncio

    from transfiner.export.resolve import resolve_model
    from transfiner.model.inference.backend import TorchBackend
    from transfiner.service.engine.batcher import Job
    from transfiner.service.engine.pipeline import RequestOptions
    from transfiner.service.engine.worker import SegmentJob, Worker
    from transfiner.service.engine.worker_process import ProcessWorker, WorkerSpec
    from transfiner.service.metrics import ServiceMetrics

    registry = ServiceMetrics()
    metrics = registry.for_version("tiny", "1")
    predictor = load_predictor(str(checkpoint), device="cpu")
    image = network_image(scene(seed=2), scene(seed=2).shape[:2], predictor.cfg.input)
    labels = {"model": "tiny", "version": "1"}
    count = lambda: registry.registry.get_sample_value("transfiner_inference_seconds_count", labels)  # noqa: E731

    async def main() -> list[float]:
        if kind == "thread":
            worker = Worker(TorchBackend(predictor.model), metrics=metrics)
        else:
            spec = WorkerSpec(
                resolve_model(str(checkpoint)), "pytorch", None, "cpu", 1, "fp32", None, 1, 1, 5.0, "warning"
            )
            worker = ProcessWorker(spec, metrics)
            await worker.start()
        seen = []
        try:
            for _ in range(3):
                jobs = [
                    Job(SegmentJob(image, RequestOptions(score_threshold=0.0)), time.monotonic() + 60, image.canvas)
                    for _ in range(2)
                ]
                jobs[-1].future.add_done_callback(lambda _: seen.append(count()))
                await worker.run(jobs)
        finally:
            await asyncio.to_thread(worker.close)
        return seen

    assert asyncio.run(main()) == [1.0, 2.0, 3.0]
