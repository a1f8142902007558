"""The job queue: one Redis Stream read by the workers through one consumer group.

Web processes call `job_enqueue`; workers use `JobQueue` to read, lease, acknowledge and
dead-letter jobs. Redis delivers at least once; the worker makes the effects exactly once
with the attempt number in PostgreSQL. Every write a worker makes to a job's entry checks,
in the same script, that the entry is still pending under its own name: a worker that
stalled past its lease cannot acknowledge a job another worker has taken over.
"""

import logging
import math
from dataclasses import dataclass
from typing import cast

import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import ResponseError
from redis.typing import KeyT, StreamIdT

from llmworker.jobs import InvalidJob, Job
from llmworker.redis import (
    WORKER_GROUP,
    StreamEntries,
    StreamsRead,
    conversation_channel,
    dead_letter_key,
    jobs_reserved_key,
    jobs_stream_key,
    redis_get,
    reply_cancel_key,
    script_get,
)

logger = logging.getLogger(__name__)

_OWNED = """
local function owned(stream, group, consumer, id)
  local pending = redis.call('XPENDING', stream, group, id, id, 1)
  return #pending == 1 and pending[1][2] == consumer
end
"""

# Renews the leases of the jobs a worker runs (XCLAIM JUSTID resets the idle time without
# counting a delivery) and reports the ones it lost, and the ones whose reply was cancelled.
RENEW_SCRIPT = (
    _OWNED
    + """
local lost, cancelled = {}, {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if owned(KEYS[1], ARGV[1], ARGV[2], id) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
    if redis.call('EXISTS', KEYS[i - 1]) == 1 then table.insert(cancelled, id) end
  else
    table.insert(lost, id)
  end
end
return {lost, cancelled}
"""
)

ACK_SCRIPT = (
    _OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)

DEAD_LETTER_SCRIPT = (
    _OWNED
    + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
local fields = {}
for i = 5, #ARGV do table.insert(fields, ARGV[i]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""
)


# Removes the consumers of the group idle for ARGV[2] ms or more with no entry pending.
# XGROUP DELCONSUMER drops a consumer's pending entries, which no worker would then finish or
# take over: the check and the removal are one step, so no delivery can come in between.
CONSUMERS_REMOVE_SCRIPT = """
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local fields = {}
  for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
  if fields['idle'] >= tonumber(ARGV[2])
      and #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, fields['name']) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
    table.insert(removed, fields['name'])
  end
end
return removed
"""

# A history read from past every entry (Redis stamps ids with its clock in milliseconds):
# it delivers nothing and counts no delivery, yet it is a read by the consumer. Before
# Redis 7.2 a read that finds nothing new does not count as the consumer's activity, so an
# idle worker would look as idle as a dead one (redis/redis#9996). (Not the very last id,
# both parts the largest: Redis 7.0 answers that one without counting it as a read.)
AFTER_EVERY_ENTRY = "18446744073709551615-18446744073709551614"


# The job's entry, its admission reservation ended and the announcement of its message, in
# one atomic call: the job counts in the queue's length all along, once; no worker can read
# the job before the announcement is out, so sockets see the message before its answer;
# and a failed XADD stops the script before anything is announced (Redis does not undo a
# script's earlier writes).
ENQUEUE_SCRIPT = """
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
redis.call('ZREM', KEYS[2], ARGV[3])
if ARGV[2] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return id
"""


async def job_enqueue(*, job: Job, announcement: str | None = None) -> str:
    """Put a job on the stream. Call it only once the rows it names are committed.

    `announcement`, a frame for the conversation's sockets, is published with it."""
    fields = [part for pair in job.to_fields().items() for part in pair]
    client = redis_get()
    return str(
        await script_get(client, ENQUEUE_SCRIPT)(
            keys=[jobs_stream_key(job.priority), jobs_reserved_key()],
            args=[
                conversation_channel(job.conversation_id),
                announcement or "",
                job.job_id,
                *fields,
            ],
        )
    )


async def jobs_live() -> set[str]:
    """The ids of the jobs on the streams, delivered or not. Acknowledged entries are
    deleted, so the streams hold just the work not yet done."""
    live: set[str] = set()
    for priority in PRIORITIES:
        entries = cast(StreamEntries, await redis_get().xrange(jobs_stream_key(priority)))
        live.update(fields.get("job_id", "") for _, fields in entries)
    return live


def jobs_unfinished_count(*, client: redis.Redis) -> int:
    """Jobs waiting or running, over both streams (synchronous, for a pool's supervisor):
    acknowledged entries are deleted, so a stream's length is the work not yet done."""
    with client.pipeline(transaction=False) as pipe:
        for priority in PRIORITIES:
            pipe.xlen(jobs_stream_key(priority))
        return sum(int(length) for length in pipe.execute())


# Read in this order: high-priority jobs (staff, CHAT_PRIORITY_GROUP) before normal ones.
PRIORITIES = ("high", "normal")


async def consumers_remove_dead(*, idle_ms: int) -> dict[str, list[str]]:
    """Remove the consumers of the worker group idle for `idle_ms` or more with nothing
    pending: per priority stream, the names removed."""
    client = redis_get()
    remove = script_get(client, CONSUMERS_REMOVE_SCRIPT)
    removed: dict[str, list[str]] = {}
    for priority in PRIORITIES:
        names = await remove(keys=[jobs_stream_key(priority)], args=[WORKER_GROUP, idle_ms])
        if names:
            removed[priority] = [str(name) for name in names]
    return removed


@dataclass(frozen=True)
class Delivery:
    entry_id: str
    job: Job | None  # None when the entry is malformed: it is dead-lettered
    stream: str = ""

    @property
    def key(self) -> str:
        # Entry ids are only unique within a stream: two streams may each have <ms>-0.
        return f"{self.stream}/{self.entry_id}"


@dataclass(frozen=True)
class Reclaimed:
    deliveries: list[Delivery]
    deleted_ids: list[str]  # pending entries that Redis no longer has


@dataclass(frozen=True)
class LeaseReport:
    lost: list[str]  # Delivery.key of each
    cancelled: list[str]


class JobQueue:
    """A worker's view of the job streams, one per priority, read through one group."""

    def __init__(self, *, consumer: str, client: aioredis.Redis | None = None) -> None:
        self.consumer = consumer
        self.redis = client or redis_get()
        self.streams = [jobs_stream_key(priority) for priority in PRIORITIES]
        self.renew_script = script_get(self.redis, RENEW_SCRIPT)
        self.ack_script = script_get(self.redis, ACK_SCRIPT)
        self.dead_letter_script = script_get(self.redis, DEAD_LETTER_SCRIPT)

    async def group_ensure(self) -> None:
        """Create the streams and the group if missing. From "0", so that a group recreated
        after Redis lost its data still sees any entry written since."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

    async def read(self, *, count: int, block_ms: int) -> list[Delivery]:
        """Up to `count` new jobs, high priority first. High jobs take at most
        LLM_HIGH_PRIORITY_SHARE of the free slots while normal ones wait, so a stream of
        high jobs cannot starve the others. With nothing waiting, block up to block_ms on
        both streams (which may return one job more than `count`: one from each)."""
        high_slots = max(1, math.floor(count * settings.LLM_HIGH_PRIORITY_SHARE))
        high, normal = self.streams
        got = await self._read({high: ">"}, count=min(count, high_slots))
        if len(got) < count:
            got += await self._read({normal: ">"}, count=count - len(got))
        if not got:
            got = await self._read({high: ">", normal: ">"}, count=1, block_ms=block_ms)
        if not got:
            await self.mark_alive()
        return got

    async def mark_alive(self) -> None:
        """Show the group that this consumer is alive (its idle time starts again), so that
        the maintenance does not take an idle worker for a dead one."""
        await self._read({stream: AFTER_EVERY_ENTRY for stream in self.streams}, count=1)

    async def read_own_pending(self, *, count: int) -> list[Delivery]:
        """The jobs this consumer name was given before and never acknowledged: a worker
        restarted under the same name resumes them at once."""
        return await self._read({stream: "0" for stream in self.streams}, count=count)

    async def _read(
        self, streams: dict[KeyT, StreamIdT], *, count: int, block_ms: int | None = None
    ) -> list[Delivery]:
        reply = cast(
            StreamsRead | None,
            await self.redis.xreadgroup(
                WORKER_GROUP, self.consumer, streams, count=count, block=block_ms
            ),
        )
        return [
            self._delivery(stream, entry_id, data)
            for stream, entries in reply or []
            for entry_id, data in entries
            if data  # an own pending entry since deleted comes back without fields
        ]

    def _delivery(self, stream: str, entry_id: str, data: dict[str, str]) -> Delivery:
        try:
            return Delivery(entry_id, Job.from_fields(data), stream)
        except InvalidJob:
            logger.error("malformed job entry %s: %r", entry_id, data)
            return Delivery(entry_id, None, stream)

    async def reclaim(self, *, min_idle_ms: int, count: int) -> Reclaimed:
        """Take over up to `count` jobs whose workers stopped renewing their lease, following
        XAUTOCLAIM's cursor to the end of each stream's pending list."""
        deliveries: list[Delivery] = []
        deleted: list[str] = []
        for stream in self.streams:
            cursor = "0-0"
            while len(deliveries) < count:
                cursor, entries, gone = await self.redis.xautoclaim(
                    stream, WORKER_GROUP, self.consumer, min_idle_ms, cursor,
                    count=count - len(deliveries),
                )  # fmt: skip
                deliveries += [self._delivery(stream, i, data) for i, data in entries if data]
                deleted += gone
                if cursor == "0-0":
                    break
        return Reclaimed(deliveries, deleted)

    async def renew(self, *, deliveries: list[Delivery]) -> LeaseReport:
        report = LeaseReport([], [])
        for stream in self.streams:
            mine = [d for d in deliveries if d.stream == stream]
            if not mine:
                continue
            lost, cancelled = await self.renew_script(
                keys=[stream, *(reply_cancel_key(d.job.job_id if d.job else "") for d in mine)],
                args=[WORKER_GROUP, self.consumer, *(d.entry_id for d in mine)],
            )
            report.lost.extend(f"{stream}/{entry_id}" for entry_id in lost)
            report.cancelled.extend(f"{stream}/{entry_id}" for entry_id in cancelled)
        return report

    async def ack(self, delivery: Delivery) -> bool:
        # Deleting the acknowledged entry keeps the stream as long as the work not yet done,
        # without MAXLEN trimming, which could drop entries still pending.
        return bool(
            await self.ack_script(
                keys=[delivery.stream], args=[WORKER_GROUP, self.consumer, delivery.entry_id]
            )
        )

    async def dead_letter(self, delivery: Delivery, *, reason: str, attempts: int) -> bool:
        """Move a job to the dead-letter stream and acknowledge it, in one step."""
        fields = {
            **(delivery.job.to_fields() if delivery.job else {}),
            "entry_id": delivery.entry_id,
            "reason": reason,
            "attempts": str(attempts),
            "worker": self.consumer,
        }
        flat = [part for pair in fields.items() for part in pair]
        return bool(
            await self.dead_letter_script(
                keys=[delivery.stream, dead_letter_key()],
                args=[
                    WORKER_GROUP,
                    self.consumer,
                    delivery.entry_id,
                    settings.LLM_DEAD_LETTER_MAXLEN,  # roughly; the maintenance trims exactly
                    *flat,
                ],
            )
        )
