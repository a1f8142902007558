"""The circuit breaker on its own clock (llmworker/breaker.py): a job that waits for it is
let through once it half-opens, whenever in its wait that happens."""

import asyncio

import pytest

from llmworker.breaker import CircuitBreaker

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _opened(clock: Clock) -> CircuitBreaker:
    """A breaker opened for a second by one failure, at time 0."""
    breaker = CircuitBreaker(name="provider", failures=1, reset_seconds=1.0, clock=clock)
    permit = breaker.admit()
    assert permit is not None
    permit.failed()
    return breaker


async def test_a_job_that_asked_just_before_the_breaker_half_opened_is_let_through():
    clock = Clock()
    breaker = _opened(clock)
    clock.now = 0.9999
    assert breaker.admit() is None  # a moment early: a timer fired before its time
    clock.now = 1.0  # the breaker half-opens before the job starts its wait

    await asyncio.wait_for(breaker.wait_for_change(), 1)  # no change will come to wake it
    permit = breaker.admit()

    assert permit is not None and permit.probe


async def test_a_job_waits_for_the_probe_in_flight_and_goes_when_it_succeeds():
    clock = Clock()
    breaker = _opened(clock)
    clock.now = 1.0
    probe = breaker.admit()
    assert probe is not None and probe.probe
    assert breaker.admit() is None

    waiting = asyncio.create_task(breaker.wait_for_change())
    await asyncio.sleep(0)
    assert not waiting.done()  # the probe has no verdict yet
    probe.succeeded()
    await asyncio.wait_for(waiting, 1)

    assert breaker.state() == "closed"
    assert breaker.admit() is not None
