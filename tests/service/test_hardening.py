"""A request pays only for itself: per-image options and early answers in the worker, failure
isolation, a queue that holds only live work, the pixel budget, and uploads that stall."""

from __future__ import annotations

import asyncio
import select
import socket
import sys
import time

import httpx
import numpy as np
import pytest

from tests.service.support import ThreadServer, metric, running
from tests.support import encode, scene
from transfiner.model.inference.backend import TorchBackend
from transfiner.service.engine.batcher import Batcher, DeadlineExceeded, Job
from transfiner.service.engine.pipeline import RequestOptions, network_image, records
from transfiner.service.engine.worker import SegmentJob, Worker, WorkerError
from transfiner.service.settings import ServiceSettings

pytestmark = pytest.mark.timeout(180)


def segment_job(predictor, image: np.ndarray, options: RequestOptions) -> Job:
    queued = network_image(image, image.shape[:2], predictor.cfg.input)
    return Job(SegmentJob(queued, options), deadline=time.monotonic() + 60, canvas=queued.canvas)


def answer(predictor, job: Job) -> list[dict]:
    result = job.future.result()
    return records(result.fetched, predictor.cfg, None)


# ------------------------------------------------------------------------------------------------
# The worker


class FailsOnMarkedImage:
    """The real backend, failing any batch that holds an image whose top-left pixel is pure
    white (fault injection: no real input makes the forward pass fail)."""

    def __init__(self, backend) -> None:
        self.inner, self.name, self.device, self.cfg = backend, backend.name, backend.device, backend.cfg
        self.precision = backend.precision
        self.batches: list[int] = []

    def infer(self, images, image_sizes, options):
        self.batches.append(images.shape[0])
        bgr_top_left = images[:, :, 0, 0]
        if bool((bgr_top_left >= 254.5).all(dim=1).any()):
            raise RuntimeError("injected failure")
        return self.inner.infer(images, image_sizes, options)


def test_a_failing_batch_is_retried_one_by_one_so_only_its_culprit_fails(predictor):
    backend = FailsOnMarkedImage(TorchBackend(predictor.model))
    worker = Worker(backend)
    images = [scene(seed=s) for s in range(3)]
    culprit = images[1].copy()
    culprit[:4, :4] = 255
    options = RequestOptions(score_threshold=0.0, max_detections=3)

    async def main():
        jobs = [segment_job(predictor, image, options) for image in (images[0], culprit, images[2])]
        await worker.run(jobs)
        return jobs

    try:
        jobs = asyncio.run(main())
    finally:
        worker.close()
    assert backend.batches == [3, 1, 1, 1]  # the batch, then each request alone
    with pytest.raises(WorkerError):
        jobs[1].future.result()
    for job, image in ((jobs[0], images[0]), (jobs[2], images[2])):
        got = answer(predictor, job)
        want = predictor.predict([image], score_threshold=0.0, max_detections=3)[0].coco_records(None, (3, 7))
        assert [g["bbox"] for g in got] == [w["bbox"] for w in want]
        assert [g["segmentation"] for g in got] == [w["segmentation"] for w in want]


def test_light_requests_are_answered_before_a_costly_batch_mate_is_done(predictor):
    """A request for every detection (threshold 0) batched with ordinary ones: they get their
    answers when their own masks are done, and exactly what they get without it."""
    worker = Worker(TorchBackend(predictor.model, boxes_per_group=4))
    images = [scene(seed=s) for s in range(4)]
    costly = RequestOptions(score_threshold=0.0, max_detections=10)
    ordinary = RequestOptions(score_threshold=0.3, max_detections=2)
    order: list[int] = []

    async def main(options):
        jobs = [segment_job(predictor, image, o) for image, o in zip(images, options)]
        for i, job in enumerate(jobs):
            job.future.add_done_callback(lambda _, i=i: order.append(i))
        await worker.run(jobs)
        return jobs

    try:
        mixed = asyncio.run(main([costly, ordinary, ordinary, ordinary]))
        alone = asyncio.run(main([ordinary] * 4))
    finally:
        worker.close()
    assert len(answer(predictor, mixed[0])) == 10
    assert order[3] == 0  # the costly request is answered last...
    results = [job.future.result() for job in mixed]
    assert all(r.inference_s < results[0].inference_s for r in results[1:])  # ...the others earlier
    for with_costly, without in zip(mixed[1:], alone[1:]):
        assert answer(predictor, with_costly) == answer(predictor, without)


def test_a_request_without_masks_is_not_refined(predictor):
    """``mask_format=none`` needs no masks: its detections skip the refiner (coarse masks only)."""
    worker = Worker(TorchBackend(predictor.model))
    image = scene(seed=1)
    refined = []  # boxes per refiner call (features, boxes, ...)
    hook = predictor.model.mask_head.refiner.register_forward_hook(
        lambda _, inputs, out: refined.append(len(inputs[1]))
    )

    async def main(mask_format):
        job = segment_job(
            predictor, image, RequestOptions(score_threshold=0.0, max_detections=5, mask_format=mask_format)
        )
        await worker.run([job])
        return job.future.result()

    try:
        boxes_only = asyncio.run(main("none"))
        assert len(boxes_only.fetched.scores) == 5 and sum(refined) == 0
        with_masks = asyncio.run(main("rle"))
        assert len(with_masks.fetched.segments.rles) == 5 and sum(refined) == 5
    finally:
        hook.remove()
        worker.close()
    np.testing.assert_array_equal(boxes_only.fetched.boxes, with_masks.fetched.boxes)


# ------------------------------------------------------------------------------------------------
# The queue


class Slow:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.seen: list = []

    async def run(self, jobs: list[Job]) -> None:
        self.seen += [job.payload for job in jobs]
        await asyncio.sleep(self.delay)
        for job in jobs:
            if not job.future.done():
                job.future.set_result(job.payload)


def test_a_cancelled_job_leaves_the_queue_and_its_gauge_at_once():
    depths: list[int] = []

    class Observer:
        def queue_depth(self, depth: int) -> None:
            depths.append(depth)

        def batch(self, jobs) -> None:
            pass

    async def main():
        batcher = Batcher([Slow(0.0)], max_batch_size=4, max_delay_s=0, max_queue_size=4, observer=Observer())
        jobs = [Job(i, deadline=time.monotonic() + 30) for i in range(3)]
        for job in jobs:
            batcher.submit(job)  # not started: they stay queued
        jobs[1].future.cancel()
        await asyncio.sleep(0)  # the done-callbacks run on the next loop turn
        return batcher.depth

    assert asyncio.run(main()) == 2
    assert depths[-1] == 2


def test_a_job_that_cannot_finish_by_its_deadline_never_reaches_the_model():
    async def main():
        runner = Slow(0.3)
        batcher = Batcher([runner], max_batch_size=1, max_delay_s=0, max_queue_size=8)
        batcher.start()
        first = Job("first", deadline=time.monotonic() + 30)
        batcher.submit(first)
        await first.future  # a batch time of 0.3 s on record
        doomed = Job("doomed", deadline=time.monotonic() + 0.1)  # less than one batch away
        batcher.submit(doomed)
        with pytest.raises(DeadlineExceeded):
            await doomed.future
        await batcher.close()
        return runner.seen

    assert asyncio.run(main()) == ["first"]


# ------------------------------------------------------------------------------------------------
# Over HTTP


def test_the_pixel_budget_refuses_with_503_and_retry_after(checkpoint):
    small = encode(scene())  # 96x128: queued as uint8, 36,864 bytes
    large = encode(np.tile(scene(), (6, 6, 1)))  # 576x768: resized on decode, 147,456 float bytes
    settings = ServiceSettings(model=str(checkpoint), device="cpu", max_queued_bytes=100_000, warmup_batches=0)
    with running(settings) as server:
        refused = httpx.post(server.url + "/v1/segment", content=large, timeout=60)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "memory_budget"
        assert int(refused.headers["Retry-After"]) >= 1
        assert httpx.post(server.url + "/v1/segment", content=small, timeout=60).status_code == 200
        assert metric(server.url, "transfiner_rejections_total", reason="memory_budget") == 1
        assert metric(server.url, "transfiner_queued_image_bytes") == 0  # released after the answer


def test_stalled_uploads_do_not_keep_a_normal_client_waiting(checkpoint):
    """Twenty connections that declare a 100 KB body and send 16 bytes of it, on a server with
    room for two requests in flight: a normal request is still answered at once, and the
    stalled ones get 408 once the body timeout passes."""
    settings = ServiceSettings(
        model=str(checkpoint),
        device="cpu",
        max_queue_size=1,
        max_batch_size=1,
        body_timeout_s=3.0,
        warmup_batches=0,
    )
    head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    with running(settings) as server:
        stalled = []
        for _ in range(20):
            connection = socket.create_connection(("127.0.0.1", server.port))
            connection.sendall(head + b"\x89PNG\r\n\x1a\n" + bytes(8))
            stalled.append(connection)
        try:
            response = httpx.post(server.url + "/v1/segment", content=encode(scene()), timeout=60)
            assert response.status_code == 200, response.text
            # Answered before the stalled bodies timed out: none of them has an answer yet.
            readable, _, _ = select.select(stalled, [], [], 0)
            assert not readable, "the normal request waited for the stalled ones to time out"
            for connection in stalled:
                connection.settimeout(10)
                reply = connection.recv(65536)
                assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
                assert b'"request_timeout"' in reply
        finally:
            for connection in stalled:
                connection.close()
        assert metric(server.url, "transfiner_rejections_total", reason="body_timeout") == 20


def test_an_unexpected_error_answers_500_json_and_closes_the_connection(checkpoint):
    """No route fails this way on purpose, so one is added (fault injection): the answer must say
    ``Connection: close``, or a keep-alive client would send its next request into a dead socket."""
    settings = ServiceSettings(model=str(checkpoint), device="cpu", warmup_batches=0)
    server = ThreadServer(settings)

    @server.app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("injected <_io.BytesIO object at 0x7f0000000000>")

    server.start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            response = client.get("/boom")
            assert response.status_code == 500
            assert response.headers["connection"] == "close"
            assert response.json() == {
                "error": {"code": "internal_error", "message": "internal server error (logged on the server)"}
            }
            assert client.get("/health/live").status_code == 200  # the client reconnects
    finally:
        server.stop()


def test_the_server_takes_its_gil_switch_interval_from_the_settings(checkpoint):
    default = sys.getswitchinterval()
    settings = ServiceSettings(model=str(checkpoint), device="cpu", warmup_batches=0, gil_switch_interval_ms=0.5)
    try:
        with running(settings) as server:
            assert sys.getswitchinterval() == pytest.approx(0.0005)
            assert httpx.post(server.url + "/v1/segment", content=encode(scene()), timeout=60).status_code == 200
    finally:
        sys.setswitchinterval(default)


def test_beyond_max_connections_the_answer_is_the_services_json_503(checkpoint):
    settings = ServiceSettings(model=str(checkpoint), device="cpu", warmup_batches=0, max_connections=2)
    with running(settings) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        try:
            time.sleep(0.2)  # the server has accepted them
            refused = httpx.get(server.url + "/v1/models", timeout=10)
            assert refused.status_code == 503
            assert refused.headers["content-type"] == "application/json"
            assert refused.json()["error"]["code"] == "too_many_connections"
            assert int(refused.headers["Retry-After"]) >= 1
            # The probes still say how things are: alive, and ready (a busy replica is both).
            assert httpx.get(server.url + "/health/live", timeout=10).status_code == 200
            assert httpx.head(server.url + "/health/ready", timeout=10).status_code == 200
        finally:
            for connection in idle:
                connection.close()
        time.sleep(0.2)
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200


def test_request_bodies_held_at_once_stay_within_their_budget(checkpoint):
    """Two uploads stalled after 120 kB each hold those bytes; a connection that sent only its
    headers holds nothing. A declared body that would pass max_body_bytes_total is refused at once
    (503 memory_budget, Retry-After), a chunked one as it passes; a small one still fits; once the
    stalled clients leave, the large upload fits again, with the header-only connection still open."""
    png = encode(scene(64, 64))
    settings = ServiceSettings(
        model=str(checkpoint),
        device="cpu",
        warmup_batches=0,
        max_body_bytes=200_000,
        max_body_bytes_total=300_000,
        body_timeout_s=60,
    )
    stalled_part = png + bytes(120_000 - len(png))
    with running(settings) as server:
        head = b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 150000\r\n\r\n"
        stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        try:
            stalled[0].sendall(head)  # headers only
            for connection in stalled[1:]:
                connection.sendall(head + stalled_part)  # 120 kB of 150 kB, then nothing
            middleware = _body_limit(server)  # the server runs in this process: its count can be read
            _wait_for(lambda: middleware.held == 240_000)
            refused = httpx.post(server.url + "/v1/segment", content=stalled_part, timeout=30)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "memory_budget" and int(refused.headers["Retry-After"]) >= 1

            def chunks():
                yield png
                yield bytes(70_000)

            chunked = httpx.post(server.url + "/v1/segment", content=chunks(), timeout=30)
            assert chunked.status_code == 503 and chunked.json()["error"]["code"] == "memory_budget", chunked.text
            assert httpx.post(server.url + "/v1/segment", content=png, timeout=60).status_code == 200
            for connection in stalled[1:]:
                connection.close()
            _wait_for(lambda: middleware.held == 0)
            assert httpx.post(server.url + "/v1/segment", content=stalled_part, timeout=60).status_code == 200
        finally:
            for connection in stalled:
                connection.close()
        assert metric(server.url, "transfiner_rejections_total", reason="memory_budget") == 2


def _body_limit(server: ThreadServer):
    """The running app's BodyLimitMiddleware (built by Starlette on the first request)."""
    from transfiner.service.middleware import BodyLimitMiddleware

    layer = server.app.middleware_stack
    while not isinstance(layer, BodyLimitMiddleware):
        layer = layer.app
    return layer


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
