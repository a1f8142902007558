"""The job queue: one Redis Stream read by the workers through one consumer group.

Web processes call `job_enqueue`; workers use `JobQueue` to read, and acknowledge jobs.
"""

import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llmworker.jobs import InvalidJob, Job
from llmworker.redis import WORKER_GROUP, jobs_stream_key, redis_get

logger = logging.getLogger(__name__)


async def job_enqueue(*, job: Job) -> str:
    """Put a job on the stream. Call it only once the rows it names are committed."""
    return await redis_get().xadd(jobs_stream_key(), job.to_fields())


@dataclass(frozen=True)
class Delivery:
    entry_id: str
    job: Job | None  # None when the entry is malformed: it is acknowledged and dropped


class JobQueue:
    def __init__(self, *, consumer: str, client: aioredis.Redis | None = None) -> None:
        self.consumer = consumer
        self.redis = client or redis_get()
        self.stream = jobs_stream_key()

    async def group_ensure(self) -> None:
        """Create the stream and the group if missing. "0" so that a group recreated after
        Redis lost its data still sees any entry written since."""
        try:
            await self.redis.xgroup_create(self.stream, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def read(self, *, count: int, block_ms: int, own_pending: bool = False) -> list[Delivery]:
        """Read new jobs, blocking up to block_ms; with own_pending, re-read the jobs this
        consumer name was given before and never acknowledged (a restart under one name)."""
        start = "0" if own_pending else ">"
        reply = await self.redis.xreadgroup(
            WORKER_GROUP,
            self.consumer,
            {self.stream: start},
            count=count,
            block=None if own_pending else block_ms,
        )
        return [
            self._delivery(entry_id, data)
            for _, entries in reply or []
            for entry_id, data in entries
        ]

    def _delivery(self, entry_id: str, data: dict[str, str] | None) -> Delivery:
        try:
            return Delivery(entry_id, Job.from_fields(data or {}))
        except InvalidJob:
            logger.error("dropping malformed job entry %s: %r", entry_id, data)
            return Delivery(entry_id, None)

    async def ack(self, entry_id: str) -> None:
        # Deleting the acknowledged entry keeps the stream as long as the work in flight,
        # without MAXLEN trimming, which could drop entries still pending.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, WORKER_GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()
