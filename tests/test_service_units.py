"""The service's parts without HTTP: batcher, worker + shared pipeline vs the Predictor, image
decoding vs ``model.images.load_image_rgb``, polygon tracing vs pycocotools, settings, parameters."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import time
import zlib

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from transfiner.model.inference.detections import select_detections
from transfiner.model.inference.images import load_image_rgb
from transfiner.model.inference.polygons import mask_to_polygons
from transfiner.model.inference.predictor import Prediction, Predictor, load_predictor
from transfiner.model.inference.preprocess import network_shape, prepare_batch, to_rgb_tensor
from transfiner.service.engine.batcher import Batcher, BatcherClosed, DeadlineExceeded, Job, QueueFull
from transfiner.service.engine.loading import TorchBackend, max_batch_size_for, uses_worker_process
from transfiner.service.engine.pipeline import (
    RequestOptions,
    batch_options,
    fetch,
    network_image,
    preprocess,
    records,
)
from transfiner.service.engine.worker import SegmentJob, Worker
from transfiner.service.errors import ServiceError, error_response
from transfiner.service.imaging import decode_image, sniff_format
from transfiner.service.schemas import SegmentParams
from transfiner.service.settings import ServiceSettings

from .test_service_support import CATEGORY_IDS, encode, scene, tiny_config

pytestmark = pytest.mark.timeout(120)

# ------------------------------------------------------------------------------------------------
# Batcher


class Recorder:
    """A batch runner that records what it is given (the batcher's contract, nothing more)."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.delay = delay
        self.fail = fail
        self.batches: list[list] = []

    async def run(self, jobs: list[Job]) -> None:
        self.batches.append([job.payload for job in jobs])
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        for job in jobs:
            if not job.future.done():
                job.future.set_result(job.payload)


def job(payload, timeout: float = 30.0, canvas=(100, 100), shares=None) -> Job:
    return Job(payload, deadline=time.monotonic() + timeout, canvas=canvas, shares=shares)


def batches_of(make_jobs, **batcher_settings) -> list[list]:
    """The batches one recording runner gets when ``make_jobs()``'s jobs are all queued before
    the batcher starts."""
    async def main():
        runner = Recorder()
        batcher = Batcher([runner], **batcher_settings)
        jobs = make_jobs()
        for j in jobs:
            batcher.submit(j)
        batcher.start()
        await asyncio.gather(*(j.future for j in jobs))
        await batcher.close()
        return runner.batches

    return run(main())


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_batches_fill_up_to_max_size():
    async def main():
        runner = Recorder()
        batcher = Batcher([runner], max_batch_size=3, max_delay_s=0.05, max_queue_size=100)
        batcher.start()
        jobs = [job(i) for i in range(7)]
        for j in jobs:
            batcher.submit(j)
        results = await asyncio.gather(*(j.future for j in jobs))
        await batcher.close()
        return runner.batches, results

    batches, results = run(main())
    assert batches == [[0, 1, 2], [3, 4, 5], [6]] and results == list(range(7))


def test_answered_jobs_are_never_formatted():
    """A job leaves the queue when its future settles; the usual job was taken into a batch
    already, and looking for it must not format it (its payload is a whole image, and it would
    be formatted on the event loop for every answer)."""

    class Image:
        formatted = 0

        def __repr__(self) -> str:
            Image.formatted += 1
            return "Image()"

    async def main():
        batcher = Batcher([Recorder()], max_batch_size=2, max_delay_s=0.01, max_queue_size=10)
        batcher.start()
        jobs = [job(Image()) for _ in range(5)]
        for j in jobs:
            batcher.submit(j)
        await asyncio.gather(*(j.future for j in jobs))
        await asyncio.sleep(0)  # the done callbacks have run
        await batcher.close()
        formatted = Image.formatted
        return formatted, repr(job(Image()))

    formatted, text = run(main())
    assert formatted == 0
    assert "Image" not in text and "deadline" in text  # nor in logs that show a job


def test_lone_job_waits_max_delay_then_runs_alone():
    async def main():
        runner = Recorder()
        batcher = Batcher([runner], max_batch_size=4, max_delay_s=0.2, max_queue_size=10)
        batcher.start()
        j = job("a")
        batcher.submit(j)
        await j.future
        waited = j.dispatched_at - j.enqueued_at
        await batcher.close()
        return runner.batches, waited

    batches, waited = run(main())
    assert batches == [["a"]] and waited >= 0.19


def test_busy_worker_means_the_next_batch_forms_without_delay():
    async def main():
        runner = Recorder(delay=0.3)
        batcher = Batcher([runner], max_batch_size=8, max_delay_s=0.0, max_queue_size=10)
        batcher.start()
        first = job(0)
        batcher.submit(first)
        await asyncio.sleep(0.05)  # the worker is busy with job 0
        rest = [job(i) for i in range(1, 4)]
        for j in rest:
            batcher.submit(j)
        await asyncio.gather(first.future, *(j.future for j in rest))
        await batcher.close()
        return runner.batches

    assert run(main()) == [[0], [1, 2, 3]]


class SequentialRecorder(Recorder):
    """A runner that takes its next batch while one runs (as a worker process does) and runs
    its batches one after another, in the order given; records when each batch was handed over."""

    takes_next_batch = True

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.handed: list[tuple[list, bool]] = []  # (payloads, whether another batch was running)
        self._lock = asyncio.Lock()
        self._running = 0

    async def run(self, jobs: list[Job]) -> None:
        self.handed.append(([job.payload for job in jobs], self._running > 0))
        self._running += 1
        try:
            async with self._lock:
                await super().run(jobs)
        finally:
            self._running -= 1


def test_a_worker_that_takes_its_next_batch_gets_full_ones_while_it_runs():
    async def main():
        runner = SequentialRecorder(delay=0.3)
        batcher = Batcher([runner], max_batch_size=3, max_delay_s=0.0, max_queue_size=20)
        batcher.start()
        first = job(0)
        batcher.submit(first)
        await asyncio.sleep(0.05)  # batch [0] runs
        partial = [job(i) for i in (1, 2)]
        for j in partial:
            batcher.submit(j)
        await asyncio.sleep(0.05)
        handed_while_partial = len(runner.handed)
        later = [job(i) for i in range(3, 8)]
        for j in later:
            batcher.submit(j)
        await asyncio.gather(*(j.future for j in [first, *partial, *later]))
        await batcher.close()
        return handed_while_partial, runner.handed, batcher.recent_batch_seconds()

    handed_while_partial, handed, recent = run(main())
    assert handed_while_partial == 1, "a partial batch waits in the queue while the worker is busy"
    # Once a full batch of the oldest job's canvas is queued it is handed over at once (the
    # oldest jobs first), while [0] still runs; what is left follows when a batch ends.
    assert handed[:2] == [([0], False), ([1, 2, 3], True)]
    assert [payloads for payloads, _ in handed] == [[0], [1, 2, 3], [4, 5, 6], [7]]
    # A batch handed over early is timed from when the one before it ended, not from its hand-over.
    assert 0.25 < recent < 0.45


def test_a_look_ahead_batch_drops_jobs_whose_deadline_passes_before_it_can_start():
    async def main():
        runner = SequentialRecorder(delay=0.3)
        batcher = Batcher([runner], max_batch_size=2, max_delay_s=0.0, max_queue_size=20)
        batcher.start()
        warm = job("warm")
        batcher.submit(warm)
        await warm.future  # a batch takes 0.3 s
        first = job("first")
        batcher.submit(first)
        await asyncio.sleep(0.05)  # "first" runs until about 0.3 s from its start
        # Handed over now, this batch would end about 0.55 s from now: 0.45 s is too short.
        doomed, fine = job("doomed", timeout=0.45), job("fine")
        batcher.submit(doomed)
        batcher.submit(fine)
        await asyncio.gather(first.future, fine.future)
        with pytest.raises(DeadlineExceeded):
            await doomed.future
        await batcher.close()
        return runner.handed

    assert [payloads for payloads, _ in run(main())] == [["warm"], ["first"], ["fine"]]


def test_the_look_ahead_never_takes_a_younger_canvas_first():
    async def main():
        runner = SequentialRecorder(delay=0.2)
        batcher = Batcher([runner], max_batch_size=2, max_delay_s=0.0, max_queue_size=20)
        batcher.start()
        first = job("a0", canvas=(64, 64))
        batcher.submit(first)
        await asyncio.sleep(0.05)
        # The oldest queued job is of canvas A (alone); canvas B has a full batch behind it.
        queued = [job("a1", canvas=(64, 64)), job("b1", canvas=(32, 32)), job("b2", canvas=(32, 32))]
        for j in queued:
            batcher.submit(j)
        await asyncio.gather(first.future, *(j.future for j in queued))
        await batcher.close()
        return runner.handed

    assert [payloads for payloads, _ in run(main())] == [["a0"], ["a1"], ["b1", "b2"]]


def test_expired_and_cancelled_jobs_never_reach_the_runner():
    async def main():
        runner = Recorder()
        batcher = Batcher([runner], max_batch_size=4, max_delay_s=0.3, max_queue_size=10)
        expired, cancelled, expiring, alive = job("expired", -1), job("cancelled"), job("expiring", 0.1), job("ok")
        for j in (expired, cancelled, expiring, alive):
            batcher.submit(j)
        cancelled.future.cancel()  # the client went away
        batcher.start()
        assert await alive.future == "ok"
        for j in (expired, expiring):
            with pytest.raises(DeadlineExceeded):
                await j.future
        await batcher.close()
        return runner.batches

    # "expiring" was live when taken but its deadline passed while the batch waited to fill.
    assert run(main()) == [["ok"]]


def test_a_batch_whose_jobs_all_died_is_not_run():
    async def main():
        runner = Recorder()
        batcher = Batcher([runner], max_batch_size=4, max_delay_s=0.2, max_queue_size=10)
        batcher.start()
        j = job("late", 0.05)
        batcher.submit(j)
        with pytest.raises(DeadlineExceeded):
            await j.future
        await asyncio.sleep(0.25)
        await batcher.close()
        return runner.batches

    assert run(main()) == []


def test_queue_full_with_retry_after_from_recent_batch_times():
    async def main():
        runner = Recorder(delay=0.2)
        batcher = Batcher([runner], max_batch_size=1, max_delay_s=0.0, max_queue_size=2)
        batcher.start()
        warm = job("warm")
        batcher.submit(warm)
        await warm.future  # one batch of history: about 0.2 s
        jobs = [job(i) for i in range(3)]
        batcher.submit(jobs[0])
        await asyncio.sleep(0.05)  # the worker takes job 0
        batcher.submit(jobs[1])
        batcher.submit(jobs[2])
        with pytest.raises(QueueFull) as full:
            batcher.submit(job("one too many"))
        per_batch = batcher.recent_batch_seconds()
        await asyncio.gather(*(j.future for j in jobs))
        await batcher.close()
        return full.value.retry_after, per_batch

    retry_after, per_batch = run(main())
    # One running, two queued, batches of one: the running batch, the two ahead and its own.
    assert per_batch >= 0.19 and retry_after == pytest.approx(4 * per_batch)


def test_a_full_queue_of_dead_requests_turns_no_new_one_away():
    """Queued requests whose clients left or whose deadline passed give their places up when a
    new one arrives, not only when the busy worker next takes a batch."""

    async def main():
        runner = Recorder(delay=0.3)
        batcher = Batcher([runner], max_batch_size=1, max_delay_s=0.0, max_queue_size=2)
        batcher.start()
        busy = job("busy")
        batcher.submit(busy)
        await asyncio.sleep(0.05)  # the only worker is busy for 0.3 s from here
        left, expired = job("left"), job("expired", timeout=0.01)
        batcher.submit(left)
        batcher.submit(expired)
        with pytest.raises(QueueFull):
            batcher.submit(job("while both are live"))
        left.future.cancel()  # the client went away
        await asyncio.sleep(0.02)  # the other's deadline passes
        fresh = [job("fresh 1"), job("fresh 2")]
        for j in fresh:
            batcher.submit(j)  # no QueueFull: the two dead places are free
        assert await asyncio.gather(*(j.future for j in fresh)) == ["fresh 1", "fresh 2"]
        with pytest.raises(DeadlineExceeded):
            await expired.future
        await busy.future
        await batcher.close()
        return runner.batches

    # The dead requests never reached the worker.
    assert run(main()) == [["busy"], ["fresh 1"], ["fresh 2"]]


def test_close_drains_the_queue_or_fails_it():
    async def main(drain: bool):
        runner = Recorder(delay=0.05)
        batcher = Batcher([runner], max_batch_size=2, max_delay_s=0.0, max_queue_size=10)
        batcher.start()
        jobs = [job(i) for i in range(5)]
        for j in jobs:
            batcher.submit(j)
        await asyncio.sleep(0)
        await batcher.close(drain=drain)
        with pytest.raises(BatcherClosed):
            batcher.submit(job("after"))
        return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)

    assert run(main(True)) == [0, 1, 2, 3, 4]
    failed = run(main(False))
    assert any(isinstance(r, BatcherClosed) for r in failed)


def test_a_filling_batch_waits_for_requests_still_arriving():
    """Three queued, five still decoding (they arrive 50 ms later, well past max_delay): one
    full batch. Without the arrival wait: a batch of three, then one of five."""

    async def main(arrival_wait: float):
        runner = Recorder()
        batcher = Batcher([runner], max_batch_size=8, max_delay_s=0.005, max_queue_size=20,
                          max_arrival_wait_s=arrival_wait)
        batcher.start()
        first = [job(i) for i in range(3)]
        later = [job(i) for i in range(3, 8)]

        async def decode_then_submit(j):
            with batcher.arriving():
                await asyncio.sleep(0.05)
            batcher.submit(j)

        decoding = [asyncio.create_task(decode_then_submit(j)) for j in later]
        await asyncio.sleep(0)  # every decode has begun
        for j in first:
            batcher.submit(j)
        await asyncio.gather(*decoding, *(j.future for j in first + later))
        await batcher.close()
        return runner.batches

    assert run(main(1.0)) == [list(range(8))]
    assert run(main(0.0)) == [[0, 1, 2], [3, 4, 5, 6, 7]]


def test_the_arrival_wait_is_bounded_and_ends_when_arrivals_stop():
    """A decode that never submits (its upload was bad) holds a filling batch no longer than
    max_arrival_wait, and not at all once it has ended; the wait is also capped by the recent
    batch time."""

    async def main(never_submits: bool, arrival_wait: float, recent_batch: float | None):
        runner = Recorder()
        batcher = Batcher([runner], max_batch_size=8, max_delay_s=0.0, max_queue_size=20,
                          max_arrival_wait_s=arrival_wait)
        if recent_batch is not None:
            batcher.batch_times.record(recent_batch)
        batcher.start()
        release = asyncio.Event()

        async def failing_decode():
            with batcher.arriving():
                await release.wait()

        decode = asyncio.create_task(failing_decode())
        await asyncio.sleep(0)
        queued = job(0)
        start = time.monotonic()
        batcher.submit(queued)
        if not never_submits:
            await asyncio.sleep(0.1)
            release.set()  # the decode fails after 0.1 s: the batch goes then
        await queued.future
        waited = time.monotonic() - start
        release.set()
        await decode
        await batcher.close()
        return waited

    assert 0.25 <= run(main(True, 0.3, None)) < 1.0  # the cap
    assert 0.1 <= run(main(False, 5.0, None)) < 1.0  # the decode ended
    assert run(main(True, 5.0, 0.05)) < 1.0  # a recent batch took 50 ms


def test_pixel_budget_caps_batches():
    batches = batches_of(
        lambda: [job(i, canvas=(100, 100)) for i in range(5)] + [job(5, canvas=(300, 300))],
        max_batch_size=8, max_delay_s=0.05, max_queue_size=10, max_batch_pixels=2 * 100 * 100,
    )
    # A canvas over the budget still runs, alone.
    assert batches == [[0, 1], [2, 3], [4], [5]]


def test_batches_hold_one_canvas_fifo_per_canvas_and_the_oldest_leads():
    batches = batches_of(
        lambda: [job(f"{c}{i}", canvas=(ord(c), 32)) for i, c in enumerate("ABAACBBAB")],
        max_batch_size=3, max_delay_s=0.05, max_queue_size=100,
    )
    # Each batch: the oldest job still waiting, then the next ones of its canvas, in order.
    assert batches == [["A0", "A2", "A3"], ["B1", "B5", "B6"], ["C4"], ["A7"], ["B8"]]


def test_a_filling_batch_takes_later_arrivals_of_its_canvas_only():
    async def main():
        runner = Recorder()
        batcher = Batcher([runner], max_batch_size=4, max_delay_s=0.3, max_queue_size=100)
        batcher.start()
        first = job("A0", canvas=(64, 64))
        batcher.submit(first)
        await asyncio.sleep(0.05)  # the batch of A0 is filling
        later = [job("B1", canvas=(64, 96)), job("A2", canvas=(64, 64)), job("B3", canvas=(64, 96))]
        for j in later:
            batcher.submit(j)
        await asyncio.gather(first.future, *(j.future for j in later))
        await batcher.close()
        return runner.batches

    assert run(main()) == [["A0", "A2"], ["B1", "B3"]]


def test_batches_hold_one_value_of_what_jobs_share():
    """Same canvas, other ``shares`` (an exported graph's batch-wide options): never one batch."""
    shared = [(0.5, 100), (0.0, 100), (0.5, 100), None, (0.5, 100), None]
    batches = batches_of(
        lambda: [job(f"{i}", canvas=(64, 64), shares=shares) for i, shares in enumerate(shared)],
        max_batch_size=4, max_delay_s=0.05, max_queue_size=100,
    )
    assert batches == [["0", "2", "4"], ["1"], ["3", "5"]]


def test_a_failing_batch_fails_its_jobs_and_the_batcher_goes_on():
    async def main():
        bad = Recorder(fail=True)
        batcher = Batcher([bad], max_batch_size=2, max_delay_s=0.0, max_queue_size=10)
        batcher.start()
        first = job("a")
        batcher.submit(first)
        with pytest.raises(RuntimeError):
            await first.future
        bad.fail = False
        second = job("b")
        batcher.submit(second)
        result = await second.future
        await batcher.close()
        return result

    assert run(main()) == "b"


def test_several_runners_share_the_queue():
    async def main():
        runners = [Recorder(delay=0.1), Recorder(delay=0.1)]
        batcher = Batcher(runners, max_batch_size=1, max_delay_s=0.0, max_queue_size=10)
        batcher.start()
        jobs = [job(i) for i in range(4)]
        for j in jobs:
            batcher.submit(j)
        await asyncio.gather(*(j.future for j in jobs))
        await batcher.close()
        return runners

    runners = run(main())
    assert all(r.batches for r in runners) and sum(len(r.batches) for r in runners) == 4


# ------------------------------------------------------------------------------------------------
# Worker + shared pipeline on the real (tiny) model


@pytest.fixture(scope="module")
def predictor(checkpoint) -> Predictor:
    return load_predictor(checkpoint, None, "cpu")


def test_mixed_batch_gives_each_request_what_its_own_options_give(predictor):
    """One forward pass, four requests with different options: each equals the Predictor run on
    the same batch with that request's options alone."""
    images = [scene(seed=s) for s in range(4)]
    probe = predictor(images[0], score_threshold=0.0)
    middle = float(probe.scores[len(probe) // 2])
    options = [
        RequestOptions(score_threshold=0.0, max_detections=5),
        RequestOptions(score_threshold=middle, max_detections=2, refine=False, mask_threshold=0.7),
        RequestOptions(score_threshold=0.0, max_detections=3, classes=frozenset({1})),
        RequestOptions(score_threshold=0.0, max_detections=4, mask_format="none"),
    ]
    worker = Worker(TorchBackend(predictor.model))

    async def main():
        jobs = [
            Job(SegmentJob(network_image(img, img.shape[:2], predictor.cfg.input), opt), deadline=time.monotonic() + 60)
            for img, opt in zip(images, options)
        ]
        await worker.run(jobs)
        return [j.future.result() for j in jobs]

    try:
        results = run(main())
    finally:
        worker.close()
    assert {r.batch_size for r in results} == {4}
    cfg = predictor.cfg
    for i, (opt, result) in enumerate(zip(options, results)):
        got = records(result.fetched, cfg, "img")
        top_k = None if opt.classes is not None else opt.max_detections
        want = predictor.predict(
            images, score_threshold=opt.score_threshold, max_detections=top_k, refine=opt.refine,
            mask_threshold=opt.mask_threshold,
        )[i]
        keep = np.arange(len(want))
        if opt.classes is not None:
            keep = keep[np.isin(want.classes, sorted(opt.classes))][: opt.max_detections]
        assert len(got) == len(keep) > 0
        np.testing.assert_array_equal([g["score"] for g in got], np.round(want.scores[keep].astype(float), 5))
        assert [g["category_id"] for g in got] == [CATEGORY_IDS[c] for c in want.classes[keep]]
        if opt.mask_format == "none":
            assert all("segmentation" not in g for g in got)
            continue
        masks = mask_util.decode([g["segmentation"] for g in got]).transpose(2, 0, 1).astype(bool)
        np.testing.assert_array_equal(masks, want.masks[keep])


def test_box_only_records_are_the_predictors_boxes(predictor):
    image = scene(150, 200, seed=5)
    opt = RequestOptions(score_threshold=0.0, max_detections=10)
    batch = preprocess([network_image(image, (150, 200), predictor.cfg.input)], predictor.cfg.input, predictor.device)
    with torch.inference_mode():
        raw = predictor.model(batch.images, batch.sizes, batch_options([opt], predictor.cfg))
    none = RequestOptions(score_threshold=0.0, max_detections=10, mask_format="none")
    got = records(fetch(raw, [0], batch, [none])[0], predictor.cfg, "x")
    selected = select_detections(raw, 0, opt.score_threshold, opt.classes, opt.max_detections, opt.refine)
    full = Prediction.from_outputs(selected, 0, batch.sizes[0], (150, 200))
    want = full.coco_records("x", predictor.cfg.category_ids)
    assert len(got) == len(want) > 0
    for g, w, box in zip(got, want, full.boxes):
        assert "segmentation" not in g
        assert [g[k] for k in ("image_id", "bbox", "score", "category_id")] == [w[k] for k in ("image_id", "bbox", "score", "category_id")]
        assert g["area"] == float((box[2] - box[0]) * (box[3] - box[1]))


# ------------------------------------------------------------------------------------------------
# Image decoding: same pixels as the training/CLI reader, by sniffing, with a pixel guard


def _as_file_and_bytes(tmp_path, picture: Image.Image, fmt: str, **save_args) -> tuple[np.ndarray, bytes]:
    data = encode(picture, fmt, **save_args)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    return load_image_rgb(path), data


def _pictures():
    rgb = Image.fromarray(scene(40, 60, seed=7))
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees anticlockwise on display
    grey16 = Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16))
    return {
        "grey PNG": (rgb.convert("L"), "PNG", {}),
        "RGBA PNG": (rgb.convert("RGBA"), "PNG", {}),
        "LA PNG": (rgb.convert("LA"), "PNG", {}),
        "palette PNG": (rgb.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", {}),
        "16-bit grey PNG": (grey16, "PNG", {}),
        "CMYK JPEG": (rgb.convert("CMYK"), "JPEG", {}),
        "EXIF-rotated JPEG": (rgb, "JPEG", {"exif": exif.tobytes()}),
        "1-bit BMP": (rgb.convert("1"), "BMP", {}),
        "RGB TIFF": (rgb, "TIFF", {}),
        "lossless WEBP": (rgb, "WEBP", {"lossless": True}),
        "GIF": (rgb, "GIF", {}),
    }


@pytest.mark.parametrize("name", list(_pictures()))
def test_decode_matches_load_image_rgb(tmp_path, name):
    picture, fmt, save_args = _pictures()[name]
    expected, data = _as_file_and_bytes(tmp_path, picture, fmt, **save_args)
    decoded = decode_image(data, max_pixels=10_000)
    assert decoded.format == fmt and sniff_format(data) == fmt
    np.testing.assert_array_equal(decoded.rgb, expected)
    assert decoded.size == expected.shape[:2]
    if name.startswith("EXIF"):
        assert decoded.rgb.shape == (60, 40, 3)
    # Asked for no less than the full size, nothing is reduced (JPEGs included).
    np.testing.assert_array_equal(decode_image(data, 10_000, reduce_to=lambda h, w: (h, w)).rgb, expected)


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (30, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    decoded = decode_image(buffer.getvalue(), max_pixels=10_000)
    assert decoded.rgb.shape == (20, 30, 3)
    assert tuple(decoded.rgb[10, 10]) == (255, 0, 0)


def _large_jpeg(height: int, width: int, **save_args) -> bytes:
    """A smooth photo-like JPEG (a scene scaled up, so reduced decoding has detail to keep)."""
    picture = Image.fromarray(scene(96, 128, seed=3)).resize((width, height), Image.Resampling.BILINEAR)
    return encode(picture, "JPEG", quality=92, **save_args)


TINY_INPUT = tiny_config().input  # network inputs of 96..128 pixels a side


def test_large_jpeg_is_decoded_at_reduced_scale_but_never_below_the_network_input():
    data = _large_jpeg(1000, 1250)
    network = network_shape(1000, 1250, TINY_INPUT)  # (96, 120)
    decoded = decode_image(data, 2_000_000, reduce_to=lambda h, w: network_shape(h, w, TINY_INPUT))
    assert decoded.size == (1000, 1250) and (decoded.height, decoded.width) == (1000, 1250)
    assert decoded.rgb.shape == (125, 157, 3)  # 1/8 scale: the largest that keeps >= 96x120
    assert decoded.rgb.shape[0] >= network[0] and decoded.rgb.shape[1] >= network[1]
    # The network input from the reduced decode is close to the one from the full decode.
    full = decode_image(data, 2_000_000)
    assert full.rgb.shape == (1000, 1250, 3)
    reduced_input = preprocess([network_image(decoded.rgb, decoded.size, TINY_INPUT)], TINY_INPUT, "cpu")
    full_input = preprocess([network_image(full.rgb, full.size, TINY_INPUT)], TINY_INPUT, "cpu")
    assert torch.equal(reduced_input.sizes, full_input.sizes)
    assert (reduced_input.images - full_input.images).abs().mean() < 2.0


def test_reduced_jpeg_decoding_respects_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1250 wide x 1000 high, shown 1000 wide x 1250 high
    data = _large_jpeg(1000, 1250, exif=exif.tobytes())
    decoded = decode_image(data, 2_000_000, reduce_to=lambda h, w: network_shape(h, w, TINY_INPUT))
    assert decoded.size == (1250, 1000)
    assert decoded.rgb.shape == (157, 125, 3)
    network = network_shape(1250, 1000, TINY_INPUT)
    assert decoded.rgb.shape[0] >= network[0] and decoded.rgb.shape[1] >= network[1]


def test_other_formats_are_always_decoded_in_full():
    big = np.asarray(Image.fromarray(scene(96, 128, seed=3)).resize((1250, 1000)))
    for fmt in ("PNG", "WEBP", "BMP"):
        save_args = {"lossless": True} if fmt == "WEBP" else {}
        decoded = decode_image(encode(big, fmt, **save_args), 2_000_000, reduce_to=lambda h, w: (96, 120))
        np.testing.assert_array_equal(decoded.rgb, big)


@pytest.mark.parametrize("size", [(48, 64), (96, 128), (600, 800)])
def test_a_queued_image_holds_the_smaller_form_and_gives_the_predictor_input_exactly(size):
    """Large images wait as the float32 network input (resized on the decode thread), small ones
    as their uint8 pixels (resized by the worker); the batch is ``prepare_batch``'s to the bit."""
    rgb = scene(*size, seed=4)
    queued = network_image(rgb, size, TINY_INPUT)
    network = network_shape(*size, TINY_INPUT)
    assert queued.network == network and queued.original == size and queued.canvas == (96, 128)
    assert queued.nbytes == min(rgb.nbytes, 4 * 3 * network[0] * network[1])
    assert queued.resized == (size == (600, 800))
    got = preprocess([queued, queued], TINY_INPUT, "cpu")
    want, sizes = prepare_batch([to_rgb_tensor(rgb)] * 2, TINY_INPUT, "cpu")
    assert torch.equal(got.images, want) and torch.equal(got.sizes, sizes) and got.originals == [size, size]


def test_preprocess_refuses_a_batch_of_several_canvases():
    square, wide = (network_image(scene(h, w), (h, w), TINY_INPUT) for h, w in ((96, 96), (96, 128)))
    assert square.canvas != wide.canvas
    with pytest.raises(ValueError, match="one canvas"):
        preprocess([square, wide], TINY_INPUT, "cpu")


def test_decode_errors():
    png = encode(scene(40, 60))
    cases = [
        (b"", 400, "bad_request"),
        (b"%PDF-1.7 not an image", 415, "unsupported_media_type"),
        (b"\x00\x00\x01\x00" + bytes(100), 415, "unsupported_media_type"),  # ICO: not accepted
        (png[: len(png) // 2], 422, "invalid_image"),
        (b"\x89PNG\r\n\x1a\n" + bytes(50), 422, "invalid_image"),
    ]
    for data, status, code in cases:
        with pytest.raises(ServiceError) as error:
            decode_image(data, max_pixels=10_000)
        assert (error.value.status, error.value.code) == (status, code), data[:12]
    with pytest.raises(ServiceError) as error:
        decode_image(png, max_pixels=40 * 60 - 1)
    assert (error.value.status, error.value.reason) == (413, "too_large")


# ------------------------------------------------------------------------------------------------
# Polygons: traced along pixel corners, rasterised back by pycocotools


def _rasterise(polygons, height, width) -> np.ndarray:
    if not polygons:
        return np.zeros((height, width), dtype=bool)
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, height, width))).astype(bool)


def _shapes() -> dict[str, np.ndarray]:
    h, w = 40, 50
    yy, xx = np.mgrid[:h, :w]
    shapes = {}
    rect = np.zeros((h, w), bool)
    rect[5:20, 8:30] = True
    shapes["rectangle"] = rect
    ell = rect.copy()
    ell[20:35, 8:15] = True
    shapes["L"] = ell
    shapes["disk"] = (yy - 20) ** 2 + (xx - 25) ** 2 < 12**2
    shapes["ellipse at the border"] = ((yy - 0) / 15.0) ** 2 + ((xx - 49) / 20.0) ** 2 < 1
    two = np.zeros((h, w), bool)
    two[2:8, 2:8] = True
    two[20:30, 30:45] = True
    shapes["two parts"] = two
    single = np.zeros((h, w), bool)
    single[7, 9] = True
    shapes["one pixel"] = single
    stairs = np.zeros((h, w), bool)
    for i in range(10):
        stairs[10 + i, 10 : 12 + i] = True
    shapes["staircase"] = stairs
    diagonal = np.zeros((h, w), bool)
    diagonal[10, 10] = diagonal[11, 11] = diagonal[12, 12] = True
    shapes["diagonal pixels"] = diagonal
    rng = np.random.default_rng(0)
    blobs = np.zeros((h, w), bool)
    for cy, cx, r in zip(rng.integers(5, 35, 6), rng.integers(5, 45, 6), rng.integers(3, 9, 6)):
        blobs |= (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    shapes["overlapping disks"] = blobs
    return shapes


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every background region not reachable from the border (8-connected
    background, the dual of the tracer's 4-connected foreground)."""
    outside = np.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = ~mask[0, :], ~mask[-1, :], ~mask[:, 0], ~mask[:, -1]
    while True:
        padded = np.pad(outside, 1)
        grown = np.zeros_like(outside)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grown |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
        grown &= ~mask
        if (grown == outside).all():
            return ~outside
        outside = grown


@pytest.mark.parametrize("name", list(_shapes()))
def test_polygons_rasterise_back_to_the_mask(name):
    mask = _shapes()[name]
    polygons = mask_to_polygons(mask)
    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    drawn = _rasterise(polygons, *mask.shape)
    iou = (drawn & mask).sum() / (drawn | mask).sum()
    assert iou >= 0.9, iou
    np.testing.assert_array_equal(drawn, _fill_holes(mask))  # exact, but for holes


def test_polygons_of_a_ring_lose_only_the_hole():
    yy, xx = np.mgrid[:40, :40]
    distance = (yy - 20) ** 2 + (xx - 20) ** 2
    ring = (distance < 15**2) & (distance >= 6**2)
    polygons = mask_to_polygons(ring)
    assert len(polygons) == 1  # the outer boundary; COCO polygons cannot cut holes
    np.testing.assert_array_equal(_rasterise(polygons, 40, 40), distance < 15**2)
    assert (ring.sum() / (distance < 15**2).sum()) >= 0.8


def test_polygons_of_an_empty_mask():
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []


# ------------------------------------------------------------------------------------------------
# Settings and parameters


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("TRANSFINER_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("TRANSFINER_API_KEY", "abc")
    monkeypatch.setenv("TRANSFINER_HOST", "0.0.0.0")
    settings = ServiceSettings()
    assert (settings.max_batch_size, settings.api_key.get_secret_value(), settings.host) == (7, "abc", "0.0.0.0")
    assert "abc" not in repr(settings)  # the key never lands in logs
    assert ServiceSettings(max_batch_size=2).max_batch_size == 2  # explicit values beat the environment
    monkeypatch.setenv("TRANSFINER_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError):
        ServiceSettings()


def test_worker_process_by_default_on_cuda_only(monkeypatch):
    """Unset, the model worker gets a process of its own where its device is a GPU; the
    environment and explicit values decide otherwise; the runtime holds the resolved value."""
    from transfiner.service.engine.runtime import ServiceRuntime

    assert uses_worker_process(None, "cpu", None) is False
    assert uses_worker_process(None, "auto", 2) is torch.cuda.is_available()
    assert uses_worker_process(True, "cpu", None) is True
    assert uses_worker_process(False, "auto", None) is False
    monkeypatch.setenv("TRANSFINER_WORKER_PROCESS", "false")
    assert ServiceSettings().worker_process is False
    monkeypatch.delenv("TRANSFINER_WORKER_PROCESS")
    assert ServiceSettings().worker_process is None
    assert ServiceRuntime(ServiceSettings(device="cpu")).settings.worker_process is False


def test_max_batch_size_by_default_8_on_gpus_4_on_the_cpu(monkeypatch):
    """Unset, a batch holds 8 images where a model worker is on a GPU and 4 on the CPU; the
    environment and explicit values decide otherwise; the runtime holds the resolved value."""
    from transfiner.service.engine.runtime import ServiceRuntime

    assert max_batch_size_for(None, "cpu", None) == 4
    assert max_batch_size_for(None, "cuda", None) == 8  # told to use a GPU, whether or not one is here
    assert max_batch_size_for(None, "auto", 2) == (8 if torch.cuda.is_available() else 4)
    assert max_batch_size_for(3, "cuda", None) == 3
    assert ServiceSettings().max_batch_size is None
    runtime = ServiceRuntime(ServiceSettings(device="cpu", workers=2))
    assert runtime.settings.max_batch_size == 4 and runtime.capacity == 64 + 2 * 4
    monkeypatch.setenv("TRANSFINER_MAX_BATCH_SIZE", "16")
    assert ServiceRuntime(ServiceSettings(device="cuda")).settings.max_batch_size == 16


def test_a_body_budget_smaller_than_one_body_is_refused():
    """Else an upload of an allowed size would get 503 memory_budget for ever."""
    with pytest.raises(ValueError, match="max_body_bytes_total must be at least max_body_bytes"):
        ServiceSettings(max_body_bytes=200_000, max_body_bytes_total=100_000)
    assert ServiceSettings(max_body_bytes=200_000, max_body_bytes_total=200_000).max_body_bytes_total == 200_000


def test_thread_pools_default_to_the_cores(monkeypatch):
    from transfiner.service.settings import available_cores

    settings = ServiceSettings()
    assert settings.decode_threads == settings.postprocess_threads == available_cores() >= 1
    monkeypatch.setenv("TRANSFINER_DECODE_THREADS", "3")
    assert (ServiceSettings().decode_threads, ServiceSettings(postprocess_threads=5).postprocess_threads) == (3, 5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only case")
def test_no_gpu_metrics_without_a_gpu():
    from transfiner.service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    assert metrics.enable_gpu_metrics() is False
    assert b"transfiner_gpu" not in metrics.render()


def test_segment_params_parsing():
    params = SegmentParams.model_validate({"classes": ["1,square", "7"], "image_id": "42", "refine": "false"})
    assert params.classes == [1, "square", 7] and params.image_id == 42 and params.refine is False
    assert SegmentParams.model_validate({"image_id": "0042"}).image_id == "0042"
    assert SegmentParams.model_validate({"classes": 3}).classes == [3]
    assert SegmentParams().model_dump() == {
        "score_threshold": 0.5, "max_detections": 100, "classes": None, "mask_threshold": 0.5,
        "mask_format": "rle", "refine": True, "image_id": None,
    }
    for bad in ({"score_threshold": -0.1}, {"max_detections": 101}, {"mask_format": "png"}, {"nope": 1}):
        with pytest.raises(ValueError):
            SegmentParams.model_validate(bad)


@pytest.mark.parametrize("items, message", [
    ([("score_threshold", "nan")], "score_threshold: Input should be a finite number"),
    ([("score_threshold", "0.5"), ("score_threshold", "0.6")], "score_threshold: given more than once"),
    ([("image_id", "x" * 2000)], "image_id: Input should be a valid integer, unable to parse string as an "
     "integer or String should have at most"),
    ([("classes", "")], "classes: name at least one class (ids or names), or leave classes out for all of them"),
    ([("score_threshold", True)], "score_threshold: a number, not true or false"),  # JSON true
    ([("image_id", False)], "image_id: a number, not true or false"),
])
def test_parameter_errors_name_the_parameter_as_the_client_sent_it(items, message):
    """Each problem once, under the parameter's own name: not pydantic's names for the members of
    a union (``image_id.int``, ``image_id.constrained-str``), nor 'should be <= 1' for a NaN."""
    from transfiner.service.uploads import _multi, validate_params

    with pytest.raises(ServiceError) as caught:
        validate_params(_multi(items))
    assert (caught.value.status, caught.value.code) == (422, "invalid_parameter")
    assert caught.value.message.startswith(message), caught.value.message
    assert _multi([("classes", "1"), ("classes", "3")]) == {"classes": ["1", "3"]}


def test_image_errors_speak_of_the_upload_not_of_pillows_internals():
    """A bomb is refused against the service's limit (not also Pillow's own, which the client
    never set); Pillow's file object is 'the upload', not a heap address."""
    def png_header(width: int, height: int) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")

    with pytest.raises(ServiceError) as bomb:
        decode_image(png_header(100_000, 100_000), 40_000_000)
    assert bomb.value.status == 413
    assert bomb.value.message == "image has 10000000000 pixels, more than the limit 40000000"
    with pytest.raises(ServiceError) as empty:
        decode_image(png_header(0, 0), 40_000_000)
    body = json.loads(error_response(empty.value.status, empty.value.code, empty.value.message).body)
    assert body["error"]["message"].endswith("cannot identify image file (the upload))"), body
