"""What a phase cost and how noisy the machine was meanwhile: CPU seconds of each of our
processes, of the whole machine (the rest is PostgreSQL and whatever else runs here), and
the bench's own event-loop lag (a late load generator would stamp frames late)."""

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from bench.analysis import Summary
from bench.procstat import loadavg_1min, machine_busy_s, process_cpu_s

LAG_TICK_S = 0.01


@dataclass(frozen=True)
class Usage:
    wall_s: float
    cpu_s: dict[str, float]
    machine_busy_s: float
    loadavg: float
    loop_lag: Summary

    @property
    def other_cpu_s(self) -> float:
        """Busy CPU not spent by our processes (nor by PostgreSQL): other users, the kernel."""
        return max(self.machine_busy_s - sum(self.cpu_s.values()), 0.0)

    def as_dict(self) -> dict[str, object]:
        return {
            "wall_s": round(self.wall_s, 2),
            "cpu_s": {name: round(s, 2) for name, s in self.cpu_s.items()},
            "machine_busy_s": round(self.machine_busy_s, 2),
            "other_cpu_s": round(self.other_cpu_s, 2),
            "machine_busy_cores": round(self.machine_busy_s / max(self.wall_s, 1e-9), 2),
            "loadavg_1min_at_end": self.loadavg,
            "bench_loop_lag": self.loop_lag.as_dict(),
        }


CpuReader = Callable[[], float]


def _cpu_snapshot(readers: dict[str, CpuReader]) -> dict[str, float]:
    snapshot = {}
    for name, read in readers.items():
        with contextlib.suppress(OSError):  # a dead process is reported elsewhere
            snapshot[name] = read()
    return snapshot


class Meter:
    """`async with Meter(readers) as meter: ...` then `meter.usage`. A reader returns the
    CPU seconds a process (or a process tree) has used so far."""

    def __init__(self, readers: dict[str, CpuReader]) -> None:
        self.readers: dict[str, CpuReader] = {
            **readers,
            "bench": functools.partial(process_cpu_s, os.getpid()),
        }
        self.lags: list[int] = []
        self.usage: Usage | None = None

    async def __aenter__(self) -> "Meter":
        self._start = (time.monotonic(), _cpu_snapshot(self.readers), machine_busy_s())
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._ticker
        wall0, cpu0, busy0 = self._start
        cpu1 = _cpu_snapshot(self.readers)
        self.usage = Usage(
            wall_s=time.monotonic() - wall0,
            cpu_s={name: cpu1[name] - cpu0[name] for name in cpu1 if name in cpu0},
            machine_busy_s=machine_busy_s() - busy0,
            loadavg=loadavg_1min(),
            loop_lag=Summary.of(self.lags),
        )

    async def _tick(self) -> None:
        while True:
            before = time.monotonic_ns()
            await asyncio.sleep(LAG_TICK_S)
            self.lags.append(time.monotonic_ns() - before - int(LAG_TICK_S * 1e9))
