"""The event-loop watch of `python -m bench --loop-watch` (diagnosis only).

The bench puts this directory on the PYTHONPATH of the Grizz processes it starts, with
BENCH_LOOP_WATCH naming a directory; Python imports `sitecustomize` at startup. In a
process that then sets an event-loop policy and makes its loop through it (web and worker
do, grizz/eventloop.py, where uvloop is installed), it starts:

- a task on that loop that sleeps 2 ms at a time and records how late it wakes (the loop's
  lag: how long any callback of the process waited for the ones before it);
- a thread that, when the loop has not woken for 25 ms, records the loop thread's stack (the
  code that held the loop, or that was running when the process lost its core);
- a callback of the garbage collector that times every collection,

all from the loop's first turn on.

Every 5 s it writes one JSON line of what it saw to <BENCH_LOOP_WATCH>/<pid>.jsonl (stalls
and slow collections as lines of their own); bench/loopwatch.py reads them. The 2 ms
ticks cost each process a few percent of a core: figures of a watched run are not to be
compared with those of a plain one. A process without BENCH_LOOP_WATCH is not touched.
"""

import asyncio
import collections
import gc
import json
import os
import sys
import threading
import time
import traceback
from typing import Any

TICK_S = 0.002
STALL_S = 0.025
WINDOW_S = 5.0
SLOW_GC_S = 0.005
STACK_FRAMES = 8


class _Watch:
    def __init__(self, directory: str) -> None:
        path = os.path.join(directory, f"{os.getpid()}.jsonl")
        self.out = open(path, "a", buffering=1)  # noqa: SIM115 (lives as long as the process)
        self.lock = threading.Lock()
        self.loop_thread: int | None = None
        self.beat = time.monotonic()
        self.gc_started = 0.0
        self.gc_total: dict[int, float] = collections.defaultdict(float)
        self.gc_max: dict[int, float] = collections.defaultdict(float)
        self.gc_count: collections.Counter[int] = collections.Counter()
        self.write({"kind": "start", "argv": sys.argv})

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.out.write(json.dumps({"t": time.time(), **record}) + "\n")

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.gc_started = time.perf_counter()
            return
        took, generation = time.perf_counter() - self.gc_started, info["generation"]
        self.gc_total[generation] += took
        self.gc_max[generation] = max(self.gc_max[generation], took)
        self.gc_count[generation] += 1
        if took > SLOW_GC_S:
            self.write({"kind": "gc", "generation": generation, "ms": took * 1000})

    async def ticks(self) -> None:
        # Watched from the loop's first turn: what came before (imports, setup) is not serving.
        self.beat = time.monotonic()
        self.loop_thread = threading.get_ident()
        gc.callbacks.append(self.on_gc)
        lags: list[float] = []
        window_start = time.monotonic()
        while True:
            before = time.monotonic()
            await asyncio.sleep(TICK_S)
            self.beat = now = time.monotonic()
            lags.append(now - before - TICK_S)
            if now - window_start >= WINDOW_S:
                self.window_write(lags)
                lags, window_start = [], now

    def window_write(self, lags: list[float]) -> None:
        lags.sort()
        gc_ms = {g: self.gc_total[g] * 1000 for g in self.gc_total}
        gc_max_ms = {g: self.gc_max[g] * 1000 for g in self.gc_max}
        self.write(
            {
                "kind": "window",
                "ticks": len(lags),
                "lag_p50_ms": lags[len(lags) // 2] * 1000,
                "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1000,
                "lag_max_ms": lags[-1] * 1000,
                "gc_ms": gc_ms,
                "gc_max_ms": gc_max_ms,
                "gc_count": dict(self.gc_count),
            }
        )
        self.gc_total.clear()
        self.gc_max.clear()
        self.gc_count.clear()

    def stalls_watch(self) -> None:
        last_dump = 0.0
        while True:
            time.sleep(TICK_S * 2)
            now = time.monotonic()
            stalled = now - self.beat
            if self.loop_thread is None or stalled < STALL_S or now - last_dump < STALL_S:
                continue
            frame = sys._current_frames().get(self.loop_thread)
            if frame is None:
                continue
            stack = traceback.format_stack(frame)[-STACK_FRAMES:]
            self.write({"kind": "stall", "ms": stalled * 1000, "stack": [s.strip() for s in stack]})
            last_dump = time.monotonic()


def _install(directory: str) -> None:
    """Watch the first loop the process's policy makes: web and worker install uvloop's
    policy (grizz/eventloop.py) before they make their loop."""
    watch: _Watch | None = None
    policy_set = asyncio.set_event_loop_policy

    def watched(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        nonlocal watch
        if watch is None:
            watch = _Watch(directory)
            ticks = watch.ticks
            loop.call_soon(lambda: loop.create_task(ticks()))
            threading.Thread(target=watch.stalls_watch, name="loop-watch", daemon=True).start()
        return loop

    def set_event_loop_policy(policy: asyncio.AbstractEventLoopPolicy | None) -> None:
        if policy is not None:
            make = policy.new_event_loop
            policy.new_event_loop = lambda: watched(make())  # type: ignore[method-assign]
        policy_set(policy)

    asyncio.set_event_loop_policy = set_event_loop_policy


if os.environ.get("BENCH_LOOP_WATCH"):
    _install(os.environ["BENCH_LOOP_WATCH"])
