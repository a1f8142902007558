"""The size of an autoscaled pool (`run_llm_worker --autoscale MIN,MAX`): the rule, and the
backlog it follows.

The backlog is the jobs not yet finished, waiting or running (the job streams' lengths),
sampled every SAMPLE_SECONDS; the pool's capacity is its processes times their concurrency.
- Up one process when the backlog is above HIGH_WATER of the capacity on GROW_SAMPLES
  samples in a row: the pool is nearly full, and a burst shorter than that (about as long
  as a process takes to start) passes without one.
- Down one when it is below LOW_WATER of the capacity of one process fewer on every sample
  for a whole cool-down, and at least SHRINK_SAMPLES_LEAST samples: slower than up, since a
  process stopped too early is started again at the next burst.
- Between steps, at least a cool-down; the samples in a row start again after each step,
  against the new capacity, and after a sample that could not be read.
The gap between the two marks is the hysteresis: after a step up from P (backlog above
80 % of P processes), the step back down needs the backlog below 50 % of those same P.

Redis down or hung: the sample fails within SAMPLE_TIMEOUT, the pool holds its size, and
the failure is logged once (and its end), never read as an empty queue.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from redis.exceptions import RedisError

from llmworker.queue import jobs_unfinished_count
from llmworker.redis import redis_sync_client

logger = logging.getLogger(__name__)

SAMPLE_SECONDS = 1.0
# The supervisor's loop waits for a sample this long at most; its children's exits wait too.
SAMPLE_TIMEOUT = 0.5
HIGH_WATER = 0.8
LOW_WATER = 0.5
GROW_SAMPLES = 3
SHRINK_SAMPLES_LEAST = 5


def _processes(count: int) -> str:
    return f"{count} process" if count == 1 else f"{count} processes"


class BacklogReader:
    """The backlog from Redis, or None when Redis does not answer (logged once an outage)."""

    def __init__(self) -> None:
        self.client = redis_sync_client(purpose="autoscale", timeout=SAMPLE_TIMEOUT)
        self.missed = 0  # samples in a row that Redis did not answer

    def __call__(self) -> int | None:
        try:
            backlog = jobs_unfinished_count(client=self.client)
        except (RedisError, OSError) as error:
            if not self.missed:
                logger.warning(
                    "autoscale: cannot read the backlog from Redis (%s); holding the pool at "
                    "its size until it answers", error,
                )  # fmt: skip
            self.missed += 1
            return None
        if self.missed:
            logger.info(
                "autoscale: Redis answers again after %d samples missed; backlog %d",
                self.missed, backlog,
            )  # fmt: skip
            self.missed = 0
        return backlog


@dataclass
class Autoscaler:
    least: int
    most: int
    concurrency: int
    cooldown: float
    backlog_read: Callable[[], int | None]
    sample_at: float = 0.0  # monotonic time of the next sample
    stepped_at: float = -math.inf
    above: int = 0  # samples in a row above the high water
    below: int = 0  # ... below the low water

    def describe(self) -> str:
        return (
            f"autoscale {self.least}..{self.most} processes of concurrency {self.concurrency}:"
            f" one more when the backlog is above {HIGH_WATER:.0%} of the capacity on"
            f" {GROW_SAMPLES} samples in a row, one fewer when below {LOW_WATER:.0%} of one"
            f" process fewer's on {self._shrink_samples()}; steps {self.cooldown:g}s apart"
        )

    def _shrink_samples(self) -> int:
        return max(SHRINK_SAMPLES_LEAST, math.ceil(self.cooldown / SAMPLE_SECONDS))

    def size_next(self, *, processes: int, now: float) -> int:
        """The pool's size after the sample due at `now`, if one is (else `processes`)."""
        if now < self.sample_at:
            return processes
        self.sample_at = now + SAMPLE_SECONDS
        backlog = self.backlog_read()
        if backlog is None:
            self.above = self.below = 0
            return processes
        size = self._step(backlog=backlog, processes=processes, now=now)
        if size != processes:
            self._log_step(before=processes, after=size, backlog=backlog)
            self.stepped_at = now
            self.above = self.below = 0
        return size

    def _step(self, *, backlog: int, processes: int, now: float) -> int:
        self.above = self.above + 1 if backlog > self._water(processes, up=True) else 0
        self.below = self.below + 1 if backlog < self._water(processes - 1, up=False) else 0
        if now - self.stepped_at < self.cooldown:
            return processes
        if processes < self.most and self.above >= GROW_SAMPLES:
            return processes + 1
        if processes > self.least and self.below >= self._shrink_samples():
            return processes - 1
        return processes

    def _water(self, processes: int, *, up: bool) -> float:
        return (HIGH_WATER if up else LOW_WATER) * processes * self.concurrency

    def _log_step(self, *, before: int, after: int, backlog: int) -> None:
        up = after > before
        counted = before if up else after  # the processes whose capacity the mark is of
        logger.info(
            "autoscale: %d -> %s: backlog %d %s water %g (%.0f%% of %s x concurrency %d) "
            "on %d samples in a row",
            before, _processes(after), backlog, "above the high" if up else "below the low",
            self._water(counted, up=up), (HIGH_WATER if up else LOW_WATER) * 100,
            _processes(counted), self.concurrency, self.above if up else self.below,
        )  # fmt: skip
