"""Admission: whether a new job may enter the queue, decided before anything is saved.

Per-user limits (messages per window, replies in flight) are one Redis script call, so they
hold across sockets and web processes. Backpressure reads the queue's length at most once
per `LLM_QUEUE_DEPTH_CACHE_SECONDS` per process, not once per message.
"""

import asyncio
import math
import time
from dataclasses import dataclass

from django.conf import settings

from llmworker.queue import PRIORITIES
from llmworker.redis import (
    jobs_stream_key,
    redis_get,
    script_get,
    user_inflight_key,
    user_rate_key,
)

# A reply in flight is counted until its worker releases it; this bound only stops a lost
# release (a job dropped by hand, say) from holding a user's slot for ever.
INFLIGHT_MAX_SECONDS = 3600
INFLIGHT_RETRY_AFTER_SECONDS = 5

ADMIT_SCRIPT = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local rate, inflight = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if rate > 0 and redis.call('ZCARD', KEYS[1]) >= rate then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'rate', math.ceil((tonumber(oldest[2]) + window - now) / 1000)}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if inflight > 0 and redis.call('ZCARD', KEYS[2]) >= inflight then
  return {'inflight', tonumber(ARGV[7])}
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], window)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[6]), ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return {'ok', 0}
"""


@dataclass(frozen=True)
class Refusal:
    code: str  # "rate_limited" or "overloaded"
    message: str
    retry_after: int


async def user_admit(*, user_id: int, job_id: str) -> Refusal | None:
    """Count a new job against its user's limits, or say why it may not start."""
    count, window = settings.CHAT_RATE_LIMIT
    verdict, retry_after = await script_get(redis_get(), ADMIT_SCRIPT)(
        keys=[user_rate_key(user_id), user_inflight_key(user_id)],
        args=[
            int(time.time() * 1000),
            window * 1000,
            count,
            settings.CHAT_MAX_INFLIGHT_PER_USER,
            job_id,
            INFLIGHT_MAX_SECONDS * 1000,
            INFLIGHT_RETRY_AFTER_SECONDS,
        ],
    )
    if verdict == "rate":
        return Refusal(
            "rate_limited", f"You can send {count} messages per {window} seconds.", int(retry_after)
        )
    if verdict == "inflight":
        return Refusal(
            "rate_limited",
            f"You already have {settings.CHAT_MAX_INFLIGHT_PER_USER} replies being generated.",
            int(retry_after),
        )
    return None


async def user_release(*, user_id: int | str, job_id: str) -> None:
    """The job is finished (or was never queued): it no longer counts as in flight."""
    if user_id != "":
        await redis_get().zrem(user_inflight_key(user_id), job_id)


@dataclass(frozen=True)
class QueuePressure:
    refusal: Refusal | None = None
    delay: float = 0.0  # how long to wait before enqueueing
    queue_position: int | None = None  # told to the client when the queue is long


_depth_cache: dict[asyncio.AbstractEventLoop, tuple[float, int]] = {}


async def queue_depth() -> int:
    """Jobs not finished: acknowledged entries are deleted from the stream, so its length is
    the group's lag plus its pending entries (what XINFO GROUPS would add up), in O(1)."""
    loop = asyncio.get_running_loop()
    read_at, depth = _depth_cache.get(loop, (-math.inf, 0))
    if loop.time() - read_at >= settings.LLM_QUEUE_DEPTH_CACHE_SECONDS:
        async with redis_get().pipeline(transaction=False) as pipe:
            for priority in PRIORITIES:
                pipe.xlen(jobs_stream_key(priority))
            depth = sum(await pipe.execute())
        _depth_cache[loop] = (loop.time(), depth)
    return depth


async def queue_pressure() -> QueuePressure:
    depth = await queue_depth()
    slowdown, limit = settings.LLM_SLOWDOWN_PENDING_JOBS, settings.LLM_MAX_PENDING_JOBS
    if depth >= limit:
        message = "Service is currently at capacity; please retry shortly."
        return QueuePressure(refusal=Refusal("overloaded", message, retry_after=10))
    if depth >= slowdown:
        # Up to a second, growing with the overload: senders slow down before the refusal.
        delay = min(1.0, (depth - slowdown + 1) / max(1, limit - slowdown))
        return QueuePressure(delay=delay, queue_position=depth + 1)
    return QueuePressure()
