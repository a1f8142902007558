"""The result timeout's one timer (generation.Watchdog): it ends a silent block, kicks keep
a talking one alive, and a cancel from elsewhere stays a cancel."""

import asyncio

import pytest

from llmworker.generation import ResultTimeout, Watchdog

pytestmark = pytest.mark.asyncio


async def test_it_stops_a_block_that_hears_nothing():
    watchdog = Watchdog(0.05)
    started = asyncio.get_running_loop().time()
    with pytest.raises(ResultTimeout):
        async with watchdog.guarding():
            await asyncio.Event().wait()
    assert asyncio.get_running_loop().time() - started < 1


async def test_kicks_keep_a_block_alive_past_the_bound():
    watchdog = Watchdog(0.05)
    async with watchdog.guarding():
        for _ in range(10):  # 0.2 s in all, each step well inside the bound
            await asyncio.sleep(0.02)
            watchdog.kick()


async def test_it_stops_a_block_once_the_kicks_stop():
    watchdog = Watchdog(0.05)
    with pytest.raises(ResultTimeout):
        async with watchdog.guarding():
            for _ in range(5):
                await asyncio.sleep(0.02)
                watchdog.kick()
            await asyncio.Event().wait()


async def test_a_cancel_from_elsewhere_stays_a_cancel():
    watchdog = Watchdog(60)
    inside = asyncio.Event()

    async def guarded() -> None:
        async with watchdog.guarding():
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(guarded())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_task_goes_on_normally_after_a_timeout():
    watchdog = Watchdog(0.05)
    with pytest.raises(ResultTimeout):
        await watchdog.within(asyncio.Event().wait())
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0  # no cancel of the watchdog's left on the task
    await asyncio.sleep(0.01)  # and none delivered at the next await
