"""Closed-loop load: `concurrency` slots, each running one conversation turn after another
(send, wait for the whole reply, think, send again) for a fixed window.

Slots start at random offsets within `stagger_s` so that the first turns do not all start in
the same millisecond (a thundering herd would measure the burst, not the load). Only turns
sent inside the window count; turns sent during the stagger warm up the pipeline. A slot
stops after an error (its conversation may still be busy server-side), and every error is
kept, whenever it happened.
"""

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bench.load import Turn
from bench.protocol import ReplyShape

TURN_SLACK_S = 12.0  # beyond the model's own duration, before a turn counts as lost


class Turner(Protocol):
    async def turn(self, text: str, timeout: float) -> Turn: ...


@dataclass(frozen=True)
class Plan:
    shape: ReplyShape
    concurrency: int
    window_s: float
    stagger_s: float = 0.0
    think_s: tuple[float, float] = (0.0, 0.0)
    max_turns: int | None = None  # stop early once this many turns were counted


@dataclass
class Outcome:
    turns: list[Turn]  # counted turns (sent inside the window), failed ones included
    other_failures: list[Turn]  # failed turns sent outside the window
    every: list[Turn]  # all turns, for totals over the whole run (tokens, CPU)
    window_start_ns: int
    window_end_ns: int


async def run_plan(
    turners: Sequence[Turner], plan: Plan, *, seed: int = 1, start_ns: int | None = None
) -> Outcome:
    """Slot i rotates over turners i, i+C, i+2C...: with more turners than slots, one
    conversation's history does not grow with every turn of a long run. `start_ns` (a
    CLOCK_MONOTONIC instant, shared by all processes) lets the load generator's processes
    run one plan on one clock."""
    rng = random.Random(seed)
    now = time.monotonic_ns() if start_ns is None else start_ns
    await sleep_until(now)
    start, end = now + int(plan.stagger_s * 1e9), now + int((plan.stagger_s + plan.window_s) * 1e9)
    outcome = Outcome([], [], [], start, end)
    slots = [
        _slot(turners[i :: plan.concurrency], plan, rng.random(), outcome)
        for i in range(plan.concurrency)
    ]
    await asyncio.gather(*slots)
    return outcome


async def _slot(
    turners: Sequence[Turner],
    plan: Plan,
    offset: float,
    outcome: Outcome,
) -> None:
    rng = random.Random(offset)
    await asyncio.sleep(offset * plan.stagger_s)
    timeout = plan.shape.duration_s + TURN_SLACK_S
    index = 0
    while time.monotonic_ns() < outcome.window_end_ns and not _enough(plan, outcome.turns):
        turn = await turners[index % len(turners)].turn(plan.shape.message(), timeout)
        index += 1
        outcome.every.append(turn)
        if outcome.window_start_ns <= turn.t_send < outcome.window_end_ns:
            outcome.turns.append(turn)
        elif turn.error:
            outcome.other_failures.append(turn)
        if turn.error:
            return
        await asyncio.sleep(rng.uniform(*plan.think_s))


def _enough(plan: Plan, counted: list[Turn]) -> bool:
    return plan.max_turns is not None and len(counted) >= plan.max_turns


async def run_burst(
    turners: Sequence[Turner], shape: ReplyShape, instants: Sequence[int]
) -> Outcome:
    """Every turner sends at each instant (CLOCK_MONOTONIC ns) at once: what a page reload
    of many users, or a broadcast prompt, does. Each round waits for all its replies; every
    turn counts. A turner whose turn failed sits out the later rounds."""
    outcome = Outcome([], [], [], instants[0] if instants else 0, 0)
    live = list(turners)
    timeout = shape.duration_s + TURN_SLACK_S
    for instant in instants:
        await sleep_until(instant)
        turns = await asyncio.gather(*(t.turn(shape.message(), timeout) for t in live))
        outcome.turns += turns
        outcome.every += turns
        live = [t for t, turn in zip(live, turns, strict=True) if not turn.error]
    outcome.window_end_ns = time.monotonic_ns()
    return outcome


async def sleep_until(instant_ns: int) -> None:
    delay = (instant_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)
