"""The queue as an operator sees it (`manage.py llm_status`): streams, consumers, dead
letters and Redis memory, read without disturbing a live system.

Read-only on purpose: XLEN, XPENDING (summary), XINFO, XRANGE/XREVRANGE, INFO and TIME
only. No XREADGROUP or XCLAIM, which would deliver jobs or reset their leases.

Ages come from entry ids (the milliseconds of their XADD) against Redis's own clock (TIME),
so that a status taken on a host whose clock drifts still tells the truth.
"""

from dataclasses import dataclass
from typing import Any, cast

from redis.exceptions import ResponseError

from llmworker.dead_letters import DeadLetter, dead_letters_count, dead_letters_list
from llmworker.queue import PRIORITIES
from llmworker.redis import (
    WORKER_GROUP,
    StreamEntries,
    entry_id_ms,
    jobs_stream_key,
    redis_get,
    redis_now_ms,
)
from llmworker.snapshots import WorkerSnapshot, worker_snapshots

RECENT_DEAD_LETTERS = 3


@dataclass(frozen=True)
class StreamStatus:
    priority: str
    key: str
    length: int  # jobs not yet finished: acknowledged entries are deleted
    pending: int  # delivered to a worker and not acknowledged (running, or to take over)
    waiting: int  # not yet delivered to any worker
    oldest_waiting_age_seconds: float | None  # the oldest job no worker has taken yet
    oldest_pending_age_seconds: float | None  # the oldest job a worker holds, since its enqueue


@dataclass(frozen=True)
class ConsumerStatus:
    name: str
    pending: int  # jobs it holds, over both streams
    idle_seconds: float  # since its last read or lease renewal, the least over both streams


@dataclass(frozen=True)
class DeadLettersStatus:
    count: int
    oldest_age_seconds: float | None
    recent: list[DeadLetter]  # newest first


@dataclass(frozen=True)
class RedisMemory:
    used_bytes: int
    used_human: str
    max_bytes: int  # 0: no limit


@dataclass(frozen=True)
class QueueStatus:
    redis_time_ms: int
    streams: list[StreamStatus]
    consumers: list[ConsumerStatus]
    dead_letters: DeadLettersStatus
    redis_memory: RedisMemory
    workers: list[WorkerSnapshot]  # each live worker's latest figures (snapshots.py)


async def queue_status() -> QueueStatus:
    client = redis_get()
    now_ms = await redis_now_ms()
    streams = [await _stream_status(priority, now_ms=now_ms) for priority in PRIORITIES]
    memory = await client.info("memory")
    return QueueStatus(
        redis_time_ms=now_ms,
        streams=streams,
        consumers=await _consumers(),
        dead_letters=await _dead_letters_status(now_ms=now_ms),
        redis_memory=RedisMemory(
            used_bytes=int(memory["used_memory"]),
            used_human=str(memory["used_memory_human"]),
            max_bytes=int(memory.get("maxmemory", 0)),
        ),
        workers=await worker_snapshots(),
    )


def age_seconds(entry_id: str | None, *, now_ms: int) -> float | None:
    if not entry_id:
        return None
    return max(0.0, (now_ms - entry_id_ms(entry_id)) / 1000)


async def _stream_status(priority: str, *, now_ms: int) -> StreamStatus:
    client = redis_get()
    key = jobs_stream_key(priority)
    length = int(await client.xlen(key))
    summary = await _pending_summary(key) if length else {}
    pending = int(summary.get("pending", 0))
    return StreamStatus(
        priority=priority,
        key=key,
        length=length,
        pending=pending,
        # Every entry on the stream is either pending or not yet delivered (the finished
        # ones are deleted), which holds even where XINFO's lag is unknown after deletions.
        waiting=length - pending,
        oldest_waiting_age_seconds=age_seconds(await _oldest_undelivered(key), now_ms=now_ms),
        oldest_pending_age_seconds=age_seconds(summary.get("min"), now_ms=now_ms),
    )


async def _pending_summary(key: str) -> dict[str, Any]:
    try:
        return dict(await redis_get().xpending(key, WORKER_GROUP))
    except ResponseError:  # jobs enqueued before any worker made the group: none pending
        return {}


async def _oldest_undelivered(key: str) -> str | None:
    client = redis_get()
    try:
        groups = await client.xinfo_groups(key)
    except ResponseError:  # no such stream: no worker has started yet
        return None
    last_delivered = next(
        (g["last-delivered-id"] for g in groups if g["name"] == WORKER_GROUP), "0-0"
    )
    first = cast(StreamEntries, await client.xrange(key, min=f"({last_delivered}", count=1))
    return first[0][0] if first else None


async def _consumers() -> list[ConsumerStatus]:
    client = redis_get()
    merged: dict[str, ConsumerStatus] = {}
    for priority in PRIORITIES:
        try:
            found = await client.xinfo_consumers(jobs_stream_key(priority), WORKER_GROUP)
        except ResponseError:  # no stream or no group yet
            continue
        for consumer in found:
            name, idle = str(consumer["name"]), int(consumer["idle"]) / 1000
            earlier = merged.get(name)
            merged[name] = ConsumerStatus(
                name=name,
                pending=int(consumer["pending"]) + (earlier.pending if earlier else 0),
                idle_seconds=min(idle, earlier.idle_seconds) if earlier else idle,
            )
    return sorted(merged.values(), key=lambda c: c.name)


async def _dead_letters_status(*, now_ms: int) -> DeadLettersStatus:
    oldest = await dead_letters_list(limit=1, oldest_first=True)
    return DeadLettersStatus(
        count=await dead_letters_count(),
        oldest_age_seconds=age_seconds(oldest[0].entry_id if oldest else None, now_ms=now_ms),
        recent=await dead_letters_list(limit=RECENT_DEAD_LETTERS),
    )


# The human form: a table that fits 100 columns.

WIDTH = 100


def status_table(status: QueueStatus, *, local_time: str = "") -> str:
    now_ms = status.redis_time_ms
    lines = [f"Grizz queue status{f' at {local_time}' if local_time else ''}", ""]
    lines.append(
        f"{'STREAM':<40} {'LENGTH':>7} {'WAITING':>8} {'PENDING':>8} "
        f"{'OLDEST WAITING':>15} {'OLDEST PENDING':>15}"
    )
    for stream in status.streams:
        lines.append(
            f"{_clip(stream.key, 40):<40} {stream.length:>7} {stream.waiting:>8} "
            f"{stream.pending:>8} {duration(stream.oldest_waiting_age_seconds):>15} "
            f"{duration(stream.oldest_pending_age_seconds):>15}"
        )
    lines += ["", f"{'CONSUMER':<60} {'PENDING':>8} {'IDLE':>10}"]
    for consumer in status.consumers:
        lines.append(
            f"{_clip(consumer.name, 60):<60} {consumer.pending:>8} "
            f"{duration(consumer.idle_seconds):>10}"
        )
    if not status.consumers:
        lines.append("(none: no worker has read from the streams yet)")
    dead = status.dead_letters
    oldest = f", oldest {duration(dead.oldest_age_seconds)} ago" if dead.count else ""
    lines += ["", f"DEAD LETTERS  {dead.count}{oldest}"]
    for letter in dead.recent:
        age = duration(age_seconds(letter.entry_id, now_ms=now_ms))
        head = f"  {letter.entry_id:<16} {age:>7} ago  "
        lines.append(head + _clip(letter.reason, WIDTH - len(head)))
    memory = status.redis_memory
    limit = f"of {_bytes(memory.max_bytes)} maxmemory" if memory.max_bytes else "(no maxmemory)"
    lines += ["", f"REDIS MEMORY  {memory.used_human} used {limit}", ""]
    lines += _workers_table(status.workers)
    return "\n".join(lines)


def _workers_table(workers: list[WorkerSnapshot]) -> list[str]:
    """Each worker's replies over about the last minute, its slots and breakers."""
    lines = [
        f"{'WORKER':<36} {'SLOTS':>11} {'DONE/MIN':>9} {'FAILED/MIN':>10} "
        f"{'TOKENS/MIN':>10} {'CIRCUIT':>9} {'OVER':>6}"
    ]
    for worker in workers:
        minute = worker.last_minute
        slots = f"{worker.slots_busy}/{worker.concurrency}"
        lines.append(
            f"{_clip(worker.name, 36):<36} {slots:>11} {minute['complete']:>9} "
            f"{minute['failed']:>10} {minute['tokens']:>10} {_worst(worker.circuits):>9} "
            f"{duration(worker.window_seconds):>6}"
        )
    if not workers:
        lines.append("(none: no worker has published its figures in the last few seconds)")
    return lines + _pools_lines(workers)


def _pools_lines(workers: list[WorkerSnapshot]) -> list[str]:
    """The supervised pools the workers run in, by host and supervisor."""
    pools: dict[tuple[str, int], list[str]] = {}
    for worker in workers:
        if worker.supervisor_pid is not None:
            pools.setdefault((worker.host, worker.supervisor_pid), []).append(worker.name)
    lines = [f"{'POOL':<36} {'PROCESSES':>11}  WORKERS"] if pools else []
    for (host, pid), names in sorted(pools.items()):
        head = f"{_clip(f'{host}, supervisor pid {pid}', 36):<36} {len(names):>11}  "
        lines.append(head + _clip(", ".join(sorted(names)), WIDTH - len(head)))
    return ["", *lines] if lines else []


def _worst(circuits: dict[str, str]) -> str:
    """The breaker most in the way, of a worker's providers ("-": none called yet)."""
    for state in ("open", "half_open", "closed"):
        if state in circuits.values():
            return state
    return "-"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _bytes(count: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if count < 1024:
            return f"{count}{unit}"
        count //= 1024
    return f"{count}T"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line, whatever the reason held
    return text if len(text) <= width else text[: width - 1] + "…"
