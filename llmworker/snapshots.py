"""Each worker's latest figures in Redis, for `manage.py llm_status`: replies and tokens
since it started and over about the last minute, its breakers and its slots.

A worker puts a small snapshot every LLM_WORKER_SNAPSHOT_SECONDS (not per reply or token:
one pipeline of three commands), kept for three periods, so that a worker that died drops
out of llm_status on its own. The counts are its metrics' (grizz/metrics.py); the last
minute is the difference with the snapshot of about a minute before, kept in the worker.
"""

import json
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import cast

from django.conf import settings

from grizz import metrics
from llmworker.breaker import breaker_states
from llmworker.names import host_name
from llmworker.redis import redis_get, worker_snapshot_key, worker_snapshots_key
from llmworker.supervisor import PARENT_ENV

WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class WorkerSnapshot:
    name: str
    pid: int
    at_ms: int  # when it was taken, on the worker's clock
    concurrency: int
    slots_busy: int
    totals: dict[str, int]  # replies by outcome and "tokens", since the worker started
    last_minute: dict[str, int]  # the same, over the last `window_seconds`
    window_seconds: float  # about a minute; less for a worker younger than that
    circuits: dict[str, str]  # provider base URL -> closed, half_open or open
    host: str = ""
    supervisor_pid: int | None = None  # of its pool's supervisor, if it runs in one


class SnapshotTaker:
    """A worker's snapshots, with the history the last minute is computed from."""

    def __init__(self, *, name: str, concurrency: int) -> None:
        self.name, self.concurrency = name, concurrency
        self.history: deque[tuple[float, dict[str, int]]] = deque(
            [(time.monotonic(), metrics.worker().totals())]
        )

    def take(self, *, slots_busy: int) -> WorkerSnapshot:
        now, totals = time.monotonic(), metrics.worker().totals()
        self.history.append((now, totals))
        # The base: the newest snapshot at least a minute old (or the first one).
        while len(self.history) > 1 and self.history[1][0] <= now - WINDOW_SECONDS:
            self.history.popleft()
        base_at, base = self.history[0]
        return WorkerSnapshot(
            name=self.name,
            pid=os.getpid(),
            at_ms=int(time.time() * 1000),
            concurrency=self.concurrency,
            slots_busy=slots_busy,
            totals=totals,
            last_minute={name: count - base.get(name, 0) for name, count in totals.items()},
            window_seconds=round(now - base_at, 1),
            circuits=breaker_states(),
            host=host_name(),
            supervisor_pid=_supervisor_pid(),
        )


def _supervisor_pid() -> int | None:
    supervisor = os.environ.get(PARENT_ENV)
    return int(supervisor) if supervisor else None


def _ttl_ms() -> int:
    return int(settings.LLM_WORKER_SNAPSHOT_SECONDS * 3 * 1000)


async def snapshot_publish(snapshot: WorkerSnapshot) -> None:
    async with redis_get().pipeline(transaction=False) as pipe:
        pipe.set(worker_snapshot_key(snapshot.name), json.dumps(asdict(snapshot)), px=_ttl_ms())
        pipe.zadd(worker_snapshots_key(), {snapshot.name: snapshot.at_ms})
        # Names of workers gone for long: their snapshots have expired.
        pipe.zremrangebyscore(worker_snapshots_key(), "-inf", snapshot.at_ms - 10 * _ttl_ms())
        await pipe.execute()


async def snapshot_remove(name: str) -> None:
    """A worker that stops leaves llm_status at once, rather than after the TTL."""
    async with redis_get().pipeline(transaction=False) as pipe:
        pipe.delete(worker_snapshot_key(name))
        pipe.zrem(worker_snapshots_key(), name)
        await pipe.execute()


async def worker_snapshots() -> list[WorkerSnapshot]:
    """The snapshots of live workers, by name (read-only: ZRANGE and MGET)."""
    client = redis_get()
    names = sorted(cast(list[str], await client.zrange(worker_snapshots_key(), 0, -1)))
    if not names:
        return []
    found = await client.mget([worker_snapshot_key(name) for name in names])
    return [WorkerSnapshot(**json.loads(text)) for text in found if text is not None]
