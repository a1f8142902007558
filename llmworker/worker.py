"""The worker loop: reads jobs from the stream and runs many of them at once on one event
loop (the provider calls are I/O-bound). It owns concurrency, shutdown and failures; what
happens to one job lives in generation.py."""

import asyncio
import logging

from asgiref.sync import sync_to_async
from django.db import close_old_connections

from llmworker.generation import reply_generate
from llmworker.jobs import Job
from llmworker.providers import Provider, provider_get
from llmworker.queue import Delivery, JobQueue
from llmworker.redis import redis_get
from llmworker.replies import ReplyPublisher

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 5000


class Worker:
    def __init__(
        self, *, name: str, concurrency: int, grace: float, provider: Provider | None = None
    ) -> None:
        self.name = name
        self.concurrency = concurrency
        self.grace = grace
        self.provider = provider or provider_get()
        self.queue = JobQueue(consumer=name)
        self.running: set[asyncio.Task[None]] = set()
        self.shutdown = asyncio.Event()

    async def run(self) -> None:
        logger.info(
            "worker %s: started, concurrency %d, provider %s",
            self.name,
            self.concurrency,
            self.provider.name,
        )
        await self.queue.group_ensure()
        logger.info("worker %s: ready", self.name)
        # Jobs this name was given before a restart and never acknowledged come first.
        self._start_jobs(
            await self.queue.read(count=self.concurrency, block_ms=0, own_pending=True)
        )
        while not self.shutdown.is_set():
            await self._step()
        await self._drain()
        logger.info("worker %s: stopped", self.name)

    async def _step(self) -> None:
        free = self.concurrency - len(self.running)
        if free == 0:
            await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
            return
        deliveries = await self._read_until_shutdown(free)
        self._start_jobs(deliveries)

    async def _read_until_shutdown(self, count: int) -> list[Delivery]:
        read = asyncio.ensure_future(self.queue.read(count=count, block_ms=READ_BLOCK_MS))
        stop = asyncio.ensure_future(self.shutdown.wait())
        await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not read.done():
            # An entry delivered to a cancelled read stays pending under this name and is
            # read again when a worker of this name restarts.
            read.cancel()
            return []
        return read.result()

    def _start_jobs(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            task = asyncio.create_task(self._run_job(delivery), name=f"job-{delivery.entry_id}")
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _run_job(self, delivery: Delivery) -> None:
        if delivery.job is not None:
            try:
                await self._generate(delivery.job)
            except Exception:
                # Left unacknowledged: the job stays pending for a later delivery.
                logger.exception("job %s: failed unexpectedly", delivery.job.job_id)
                return
        await self.queue.ack(delivery.entry_id)

    async def _generate(self, job: Job) -> None:
        publisher = ReplyPublisher(
            job_id=job.job_id, conversation_id=job.conversation_id, client=redis_get()
        )
        try:
            await reply_generate(job=job, provider=self.provider, publisher=publisher)
        finally:
            await sync_to_async(close_old_connections)()

    async def _drain(self) -> None:
        if not self.running:
            return
        logger.info(
            "worker %s: waiting up to %ss for %d jobs", self.name, self.grace, len(self.running)
        )
        _, unfinished = await asyncio.wait(self.running, timeout=self.grace)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
