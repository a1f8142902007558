"""Admission: whether a new job may enter the queue, decided before anything is saved.

One Redis script call decides it, so the limits hold however fast messages come and however
many web processes send them: backpressure on the number of unfinished jobs, then the
user's limits (messages per window, replies in flight).

A job admitted is counted at once, as a reservation, because it reaches the stream only
after its rows are committed: without it, a burst of messages would all read the same
length and all pass. `job_enqueue` turns the reservation into the stream entry in one
transaction, and `admission_withdraw` gives it back when the job will not be enqueued.
"""

import time
from dataclasses import dataclass

from django.conf import settings

from llmworker.queue import PRIORITIES
from llmworker.redis import (
    jobs_reserved_key,
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
# Between admission and enqueue lie the slow-down wait (at most a second) and one commit.
# A web process that dies in between leaves its reservation to expire after this long
# (the reconciler enqueues the reply, which then counts on the stream).
RESERVATION_MAX_SECONDS = 60
OVERLOADED_RETRY_AFTER_SECONDS = 10

ADMIT_SCRIPT = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local depth = redis.call('ZCARD', KEYS[1])
for i = 2, 3 do depth = depth + redis.call('XLEN', KEYS[i]) end
if depth >= tonumber(ARGV[3]) then return {'overloaded', depth} end
if ARGV[5] == '1' then
  local window, rate, inflight = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - window)
  if rate > 0 and redis.call('ZCARD', KEYS[4]) >= rate then
    local oldest = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
    return {'rate', math.ceil((tonumber(oldest[2]) + window - now) / 1000)}
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
  if inflight > 0 and redis.call('ZCARD', KEYS[5]) >= inflight then
    return {'inflight', tonumber(ARGV[10])}
  end
  redis.call('ZADD', KEYS[4], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[4], window)
  redis.call('ZADD', KEYS[5], now + tonumber(ARGV[9]), ARGV[2])
  redis.call('PEXPIRE', KEYS[5], ARGV[9])
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'ok', depth}
"""


@dataclass(frozen=True)
class Refusal:
    code: str  # "rate_limited" or "overloaded"
    message: str
    retry_after: int
    reason: str  # overloaded, rate or inflight (the metrics tell the two rate_limited apart)


@dataclass(frozen=True)
class Admission:
    refusal: Refusal | None = None
    delay: float = 0.0  # how long the sender waits before its job is enqueued
    queue_position: int | None = None  # told to the client when the queue is long


async def job_admit(*, user_id: int, job_id: str, limited: bool = True) -> Admission:
    """Reserve a place in the queue for a new job and count it against its user's limits
    (unless `limited` is off), or say why it may not start."""
    count, window = settings.CHAT_RATE_LIMIT
    verdict, number = await script_get(redis_get(), ADMIT_SCRIPT)(
        keys=[
            jobs_reserved_key(),
            *(jobs_stream_key(priority) for priority in PRIORITIES),
            user_rate_key(user_id),
            user_inflight_key(user_id),
        ],
        args=[
            int(time.time() * 1000),
            job_id,
            settings.LLM_MAX_PENDING_JOBS,
            RESERVATION_MAX_SECONDS * 1000,
            "1" if limited else "0",
            window * 1000,
            count,
            settings.CHAT_MAX_INFLIGHT_PER_USER,
            INFLIGHT_MAX_SECONDS * 1000,
            INFLIGHT_RETRY_AFTER_SECONDS,
        ],
    )
    if verdict == "ok":
        return _slowdown(depth=int(number))
    return Admission(refusal=_refusal(verdict, int(number), count=count, window=window))


def _refusal(verdict: str, number: int, *, count: int, window: int) -> Refusal:
    if verdict == "overloaded":
        message = "Service is currently at capacity; please retry shortly."
        return Refusal("overloaded", message, OVERLOADED_RETRY_AFTER_SECONDS, "overloaded")
    if verdict == "rate":
        message = f"You can send {count} messages per {window} seconds."
        return Refusal("rate_limited", message, number, "rate")
    inflight = settings.CHAT_MAX_INFLIGHT_PER_USER
    message = f"You already have {inflight} replies being generated."
    return Refusal("rate_limited", message, number, "inflight")


def _slowdown(*, depth: int) -> Admission:
    """Above LLM_SLOWDOWN_PENDING_JOBS senders wait up to a second, growing with the
    overload, and learn their place: they slow down before anyone is refused."""
    slowdown, limit = settings.LLM_SLOWDOWN_PENDING_JOBS, settings.LLM_MAX_PENDING_JOBS
    if depth < slowdown:
        return Admission()
    delay = min(1.0, (depth - slowdown + 1) / max(1, limit - slowdown))
    return Admission(delay=delay, queue_position=depth + 1)


async def admission_withdraw(*, user_id: int | str, job_id: str) -> None:
    """The admitted job will not be enqueued (refused later, a resend, a failure): give
    back its place in the queue and its user's slot."""
    async with redis_get().pipeline(transaction=False) as pipe:
        pipe.zrem(jobs_reserved_key(), job_id)
        pipe.zrem(user_inflight_key(user_id), job_id)
        await pipe.execute()


async def user_release(*, user_id: int | str, job_id: str) -> None:
    """The job is finished: it no longer counts as in flight."""
    if user_id != "":
        await redis_get().zrem(user_inflight_key(user_id), job_id)
