"""The batcher alone, with runners that record what they are given: batch size, delay, canvases
and shared options, the look-ahead, deadlines, a full queue, closing."""

from __future__ import annotations

import asyncio
import time

import pytest

from transfiner.service.engine.batcher import Batcher, BatcherClosed, BatchTimes, DeadlineExceeded, Job, QueueFull

pytestmark = pytest.mark.timeout(120)


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


class KeptBatchTimes(BatchTimes):
    """The batcher's own record of batch durations, every one of them kept."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[float] = []

    def record(self, seconds: float) -> None:
        self.kept.append(seconds)
        super().record(seconds)


def test_a_worker_that_takes_its_next_batch_gets_full_ones_while_it_runs():
    async def main():
        runner = SequentialRecorder(delay=0.3)
        batcher = Batcher([runner], max_batch_size=3, max_delay_s=0.0, max_queue_size=20)
        batcher.batch_times = times = KeptBatchTimes()
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
        span = time.monotonic() - first.dispatched_at  # from the first batch's start to past the last's end
        return handed_while_partial, runner.handed, batcher.recent_batch_seconds(), times.kept, span

    handed_while_partial, handed, recent, kept, span = run(main())
    assert handed_while_partial == 1, "a partial batch waits in the queue while the worker is busy"
    # Once a full batch of the oldest job's canvas is queued it is handed over at once (the
    # oldest jobs first), while [0] still runs; what is left follows when a batch ends.
    assert handed[:2] == [([0], False), ([1, 2, 3], True)]
    assert [payloads for payloads, _ in handed] == [[0], [1, 2, 3], [4, 5, 6], [7]]
    # A batch handed over early is timed from when the one before it ended, not from its hand-over:
    # the runner runs one batch at a time, so the batch times add up to no more than the span of
    # the run (timed from their hand-overs, they would overlap by the wait of each early one).
    assert len(kept) == 4 and sum(kept) <= span, (kept, span)
    assert recent > 0.25  # each batch sleeps 0.3 s


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
        batcher = Batcher(
            [runner], max_batch_size=8, max_delay_s=0.005, max_queue_size=20, max_arrival_wait_s=arrival_wait
        )
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
        batcher = Batcher(
            [runner], max_batch_size=8, max_delay_s=0.0, max_queue_size=20, max_arrival_wait_s=arrival_wait
        )
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

    # A cap of 60 s is past run()'s 30 s guard: the batch went before it, or the test fails.
    assert run(main(True, 0.3, None)) >= 0.25  # the cap
    assert run(main(False, 60.0, None)) >= 0.1  # the decode ended
    run(main(True, 60.0, 0.05))  # a recent batch took 50 ms


def test_pixel_budget_caps_batches():
    batches = batches_of(
        lambda: [job(i, canvas=(100, 100)) for i in range(5)] + [job(5, canvas=(300, 300))],
        max_batch_size=8,
        max_delay_s=0.05,
        max_queue_size=10,
        max_batch_pixels=2 * 100 * 100,
    )
    # A canvas over the budget still runs, alone.
    assert batches == [[0, 1], [2, 3], [4], [5]]


def test_batches_hold_one_canvas_fifo_per_canvas_and_the_oldest_leads():
    batches = batches_of(
        lambda: [job(f"{c}{i}", canvas=(ord(c), 32)) for i, c in enumerate("ABAACBBAB")],
        max_batch_size=3,
        max_delay_s=0.05,
        max_queue_size=100,
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
        max_batch_size=4,
        max_delay_s=0.05,
        max_queue_size=100,
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
