"""Fair turns on a shared device: round robin between model versions, overlap for one alone."""

from __future__ import annotations

import asyncio

from transfiner.service.engine.turns import DeviceTurns


def test_turns_go_round_the_waiting_owners_one_batch_each():
    async def main() -> list[str]:
        turns = DeviceTurns()
        order: list[str] = []
        release = asyncio.Event()

        async def batch(owner: str, label: str, hold: asyncio.Event | None = None) -> None:
            async with turns.turn(owner):
                order.append(label)
                if hold is not None:
                    await hold.wait()
                await asyncio.sleep(0)

        first = asyncio.create_task(batch("flood", "flood-0", release))
        await asyncio.sleep(0)
        # While flood-0 runs, the quiet model asks for a turn, then the flood for two, then the quiet again.
        waiting = []
        for owner, label in (("quiet", "quiet-0"), ("flood", "flood-1"), ("flood", "flood-2"), ("quiet", "quiet-1")):
            waiting.append(asyncio.create_task(batch(owner, label)))
            await asyncio.sleep(0)
        release.set()
        await asyncio.gather(first, *waiting)
        return order

    # One batch each in turn: the quiet model never waits behind the flood's whole queue.
    assert asyncio.run(main()) == ["flood-0", "quiet-0", "flood-1", "quiet-1", "flood-2"]


def test_an_owner_alone_keeps_running_batches_side_by_side():
    async def main() -> int:
        turns = DeviceTurns()
        running = most = 0

        async def batch() -> None:
            nonlocal running, most
            async with turns.turn("alone"):
                running += 1
                most = max(most, running)
                await asyncio.sleep(0.01)
                running -= 1

        await asyncio.gather(batch(), batch())
        return most

    assert asyncio.run(main()) == 2  # a worker process's next batch overlaps the running one


def test_a_waiter_that_gives_up_does_not_keep_the_device():
    async def main() -> list[str]:
        turns = DeviceTurns()
        order: list[str] = []
        release = asyncio.Event()

        async def batch(owner: str, hold: asyncio.Event | None = None) -> None:
            async with turns.turn(owner):
                order.append(owner)
                if hold is not None:
                    await hold.wait()

        first = asyncio.create_task(batch("a", release))
        await asyncio.sleep(0)
        gives_up = asyncio.create_task(batch("b"))
        await asyncio.sleep(0)
        gives_up.cancel()
        release.set()
        await first
        await asyncio.wait_for(batch("c"), 1.0)  # the device is free again
        return order

    assert asyncio.run(main()) == ["a", "c"]
