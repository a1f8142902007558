"""The worker loop: reads jobs from the stream and runs many of them at once on one event
loop (the provider calls are I/O-bound). It owns concurrency, leases, takeovers, cancels,
shutdown and failures; what happens to one job lives in generation.py, the deployment's
chores (the reconciler among them), which the worker only starts and stops, in
maintenance.py."""

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from django.conf import settings
from redis.exceptions import ResponseError

from chat import services as chat_services
from grizz import metrics
from grizz.database import database_call
from grizz.logs import log_context_bind
from llmworker.faults import fault_point
from llmworker.generation import Outcome, ReplyGeneration, Result
from llmworker.jobs import Job
from llmworker.maintenance import MaintenanceRunner
from llmworker.providers import Provider, provider_get
from llmworker.queue import Delivery, JobQueue
from llmworker.redis import (
    TRANSIENT_ERRORS,
    cancel_channel,
    entry_age_seconds,
    redis_get,
    redis_pubsub_client,
)
from llmworker.replies import ReplyPublisher
from llmworker.snapshots import SnapshotTaker, snapshot_publish, snapshot_remove
from llmworker.titles import first_answer, title_writer_for

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 5000
CANCELS_POLL_SECONDS = 1.0

replies_fail_for_entries = database_call(chat_services.replies_fail_for_entries)


def _means_stream_gone(error: ResponseError) -> bool:
    # NOGROUP: the group is missing; UNBLOCKED: the stream was deleted under a blocked read.
    return str(error).startswith(("NOGROUP", "UNBLOCKED"))


@dataclass
class RunningJob:
    delivery: Delivery
    task: asyncio.Task[None]
    generation: ReplyGeneration | None = None


class Backoff:
    """Exponential waits after consecutive failures, so that a dependency that is down
    produces one log line every few seconds, not a hot loop."""

    def __init__(self, *, first: float = 0.2, most: float = 10.0) -> None:
        self.first, self.most, self.failures = first, most, 0

    def next_delay(self) -> float:
        self.failures += 1
        delay = min(self.most, self.first * 2.0 ** (self.failures - 1))
        return delay / 2 + random.random() * delay / 2

    def reset(self) -> None:
        self.failures = 0


class Worker:
    def __init__(
        self, *, name: str, concurrency: int, grace: float, provider: Provider | None = None
    ) -> None:
        self.name = name
        self.concurrency = concurrency
        self.grace = grace
        self.provider = provider or provider_get()
        self.queue = JobQueue(consumer=name)
        self.running: dict[str, RunningJob] = {}
        self.shutdown = asyncio.Event()
        self.lease = settings.LLM_JOB_LEASE_SECONDS
        self.read_backoff = Backoff(first=0.5)
        self.maintenance = MaintenanceRunner(name=name, shutdown=self.shutdown)
        # Jobs this name was given before a restart come first: read once, on the first step.
        self.own_pending_read = False
        self.metrics = metrics.worker()
        self.metrics.slots_free.set(concurrency)
        self.snapshots = SnapshotTaker(name=name, concurrency=concurrency)
        self.titles = title_writer_for(self.provider)

    # The loop

    async def run(self) -> None:
        log_context_bind(consumer=self.name)  # on every line of the process, from here on
        logger.info(
            "worker %s: started, concurrency %d, provider %s",
            self.name, self.concurrency, self.provider.name,
        )  # fmt: skip
        await self._group_ensure()
        logger.info("worker %s: ready", self.name)
        chores = [
            asyncio.create_task(self._every(self.lease / 3, self._leases_renew)),
            asyncio.create_task(self._every(self.lease / 2, self._jobs_reclaim)),
            asyncio.create_task(
                self._every(settings.LLM_WORKER_SNAPSHOT_SECONDS, self._snapshot_publish)
            ),
        ]
        # Not cancelled but left to end: it hands the maintenance over before the drain.
        maintenance = asyncio.create_task(self.maintenance.run())
        # Not cancelled but left to end: cancelling redis-py's (8.1) PubSub.get_message soon
        # after the subscription can hang for ever, and with it a worker told to stop.
        cancels = asyncio.create_task(self._cancels_listen())
        while not self.shutdown.is_set():
            await self._step()
        for chore in chores:
            chore.cancel()
        await asyncio.gather(*chores, return_exceptions=True)
        await maintenance
        await self._drain()
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await snapshot_remove(self.name)
        await cancels
        if self.titles is not None:
            await self.titles.aclose()
        await self.provider.aclose()
        logger.info("worker %s: stopped", self.name)

    async def _group_ensure(self) -> None:
        backoff = Backoff()
        while not self.shutdown.is_set():
            try:
                return await self.queue.group_ensure()
            except TRANSIENT_ERRORS as error:
                delay = backoff.next_delay()
                logger.warning(
                    "worker %s: Redis unavailable (%s); retry in %.1fs", self.name, error, delay
                )
                await self._pause(delay)

    async def _step(self) -> None:
        free = self.concurrency - len(self.running)
        if free == 0:
            await asyncio.wait(
                [job.task for job in self.running.values()], return_when=asyncio.FIRST_COMPLETED
            )
            return
        try:
            self._start_jobs(await self._jobs_next(free))
            self.read_backoff.reset()
        except ResponseError as error:
            await self._read_failed(error, stream_gone=_means_stream_gone(error))
        except TRANSIENT_ERRORS as error:
            await self._read_failed(error, stream_gone=False)

    async def _read_failed(self, error: Exception, *, stream_gone: bool) -> None:
        delay = self.read_backoff.next_delay()
        if stream_gone:
            # Redis lost the stream and the group (a restart without persistence, FLUSHALL).
            logger.warning("worker %s: the job stream is gone; recreating it", self.name)
        else:
            logger.warning(
                "worker %s: cannot read jobs (%s); retry in %.1fs", self.name, error, delay
            )
        await self._pause(delay)
        if stream_gone:
            await self._group_ensure()

    async def _jobs_next(self, count: int) -> list[Delivery]:
        # Through _step, so that a stream lost (or Redis down) right after the start is
        # handled like any failed read, not a crash.
        if not self.own_pending_read:
            fault_point("before_own_pending_read")
            own = await self.queue.read_own_pending(count=count)
            self.own_pending_read = True
            self.metrics.reply("reclaimed", len(own))
            return own
        return self._queue_waits_count(await self._read_until_shutdown(count))

    def _queue_waits_count(self, deliveries: list[Delivery]) -> list[Delivery]:
        """First deliveries only: a job taken over waited for a lease, not in the queue."""
        for delivery in deliveries:
            self.metrics.queue_wait.observe(entry_age_seconds(delivery.entry_id))
        return deliveries

    async def _read_until_shutdown(self, count: int) -> list[Delivery]:
        read = asyncio.ensure_future(self.queue.read(count=count, block_ms=READ_BLOCK_MS))
        stop = asyncio.ensure_future(self.shutdown.wait())
        await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not read.done():
            # An entry delivered to a cancelled read stays pending under this name: it is read
            # again when a worker of this name restarts, or taken over after its lease.
            read.cancel()
            return []
        return read.result()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on shutdown."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.shutdown.wait(), seconds)

    async def _every(self, seconds: float, chore: Callable[[], Awaitable[None]]) -> None:
        while not self.shutdown.is_set():
            await self._pause(seconds * (0.8 + random.random() * 0.4))
            try:
                await chore()
            except TRANSIENT_ERRORS as error:
                logger.warning("worker %s: %s failed: %s", self.name, chore.__name__, error)
            except Exception:
                logger.exception("worker %s: %s failed", self.name, chore.__name__)

    # One job

    def _start_jobs(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            if delivery.key in self.running:
                continue
            task = asyncio.create_task(self._run_job(delivery), name=f"job-{delivery.entry_id}")
            self.running[delivery.key] = RunningJob(delivery, task)
            task.add_done_callback(functools.partial(self._forget, delivery.key))
            self._slots_count(+1)

    def _forget(self, key: str, task: asyncio.Task[None]) -> None:
        if self.running.pop(key, None) is not None:
            self._slots_count(-1)

    def _slots_count(self, taken: int) -> None:
        self.metrics.slots_busy.inc(taken)
        self.metrics.slots_free.dec(taken)

    async def _run_job(self, delivery: Delivery) -> None:
        if delivery.job is None:
            await self._dead_letter(delivery, reason="malformed job entry", attempts=0)
            return
        # The job's own task: its ids stay on its lines and go with it.
        log_context_bind(**delivery.job.log_fields())
        generation = ReplyGeneration(
            job=delivery.job,
            entry_id=delivery.entry_id,
            provider=self.provider,
            publisher=self._publisher(delivery.job),
        )
        self.running[delivery.key].generation = generation
        try:
            result = await generation.run()
        except Exception:
            # Left pending: another delivery takes it over once the lease has passed.
            logger.exception("job %s: failed unexpectedly", delivery.job.job_id)
            return
        try:
            await self._settle(delivery, result)
        except TRANSIENT_ERRORS as error:
            # Still pending: the next delivery finds the reply finished and just settles it.
            logger.warning("job %s: not acknowledged (%s)", delivery.job.job_id, error)
        self._title_write(delivery.job, generation)

    def _title_write(self, job: Job, generation: ReplyGeneration) -> None:
        """After the reply's done frame and its ack: a title never delays a reply."""
        answered = generation.answered
        if self.titles is None or answered is None:
            return
        first = first_answer(
            conversation_id=job.conversation_id,
            model=answered.model,
            prompt=answered.prompt,
            answer=answered.content,
        )
        if first is not None:
            self.titles.write(first)

    async def _settle(self, delivery: Delivery, result: Result) -> None:
        assert delivery.job is not None
        if result.outcome is Outcome.ACK:
            fault_point("after_commit_before_ack")
            if not await self.queue.ack(delivery):
                # Stalled past the lease: the entry is another worker's now, which settles it.
                logger.warning(
                    "job %s: taken over meanwhile; not acknowledged", delivery.job.job_id
                )
            elif result.reason:
                logger.info("job %s: acknowledged (%s)", delivery.job.job_id, result.reason)
        elif result.outcome is Outcome.DEAD_LETTER:
            await self._dead_letter(delivery, reason=result.reason, attempts=result.attempts)

    async def _dead_letter(self, delivery: Delivery, *, reason: str, attempts: int) -> None:
        if await self.queue.dead_letter(delivery, reason=reason, attempts=attempts):
            self.metrics.reply("dead_lettered")

    def _publisher(self, job: Job) -> ReplyPublisher:
        return ReplyPublisher(
            job_id=job.job_id, conversation_id=job.conversation_id, client=redis_get()
        )

    # Chores

    async def _leases_renew(self) -> None:
        report = await self.queue.renew(deliveries=[job.delivery for job in self.running.values()])
        for key in report.lost:
            job = self.running.get(key)
            if job is not None:
                logger.warning(
                    "worker %s: lost the lease of %s; abandoning it", self.name, key,
                    extra=job.delivery.job.log_fields() if job.delivery.job else None,
                )  # fmt: skip
                job.task.cancel()
        for key in report.cancelled:
            self._cancel(self.running.get(key))

    async def _jobs_reclaim(self) -> None:
        free = self.concurrency - len(self.running)
        if free <= 0:
            return
        reclaimed = await self.queue.reclaim(min_idle_ms=int(self.lease * 1000), count=free)
        if reclaimed.deliveries:
            logger.info("worker %s: took over %d jobs", self.name, len(reclaimed.deliveries))
            self.metrics.reply("reclaimed", len(reclaimed.deliveries))
        self._start_jobs(reclaimed.deliveries)
        if reclaimed.deleted_ids:
            await self._fail_deleted_entries(reclaimed.deleted_ids)

    async def _fail_deleted_entries(self, entry_ids: list[str]) -> None:
        message = "The reply's job was lost by the queue; please send your message again."
        for reply in await replies_fail_for_entries(entry_ids=entry_ids, error=message):
            ids = {
                "job_id": str(reply.job_id),
                "reply_id": str(reply.id),
                "conversation_id": str(reply.conversation_id),
            }
            logger.error(
                "job %s: its queue entry was deleted while pending", ids["job_id"], extra=ids
            )
            publisher = ReplyPublisher(
                job_id=ids["job_id"], conversation_id=ids["conversation_id"], client=redis_get()
            )
            await publisher.error(code="llm_error", message=message)

    async def _snapshot_publish(self) -> None:
        await snapshot_publish(self.snapshots.take(slots_busy=len(self.running)))

    async def _cancels_listen(self) -> None:
        """Until the shutdown, within CANCELS_POLL_SECONDS of it."""
        backoff = Backoff()
        while not self.shutdown.is_set():
            pubsub = redis_pubsub_client().pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(cancel_channel())
                backoff.reset()
                while not self.shutdown.is_set():
                    message = await pubsub.get_message(timeout=CANCELS_POLL_SECONDS)
                    if message is not None:
                        self._cancel_job(message["data"])
            except TRANSIENT_ERRORS as error:
                # Cancels missed meanwhile are found by the lease renewal (the cancel key).
                delay = backoff.next_delay()
                logger.warning("worker %s: cancel channel lost (%s)", self.name, error)
                await self._pause(delay)
            finally:
                await pubsub.aclose()

    def _cancel_job(self, job_id: str) -> None:
        for job in list(self.running.values()):
            if job.delivery.job is not None and job.delivery.job.job_id == job_id:
                self._cancel(job)

    def _cancel(self, job: RunningJob | None) -> None:
        if job is not None and job.generation is not None:
            job.generation.cancel()

    # Shutdown

    async def _drain(self) -> None:
        if not self.running:
            return
        tasks = [job.task for job in self.running.values()]
        logger.info("worker %s: waiting up to %ss for %d jobs", self.name, self.grace, len(tasks))
        _, unfinished = await asyncio.wait(tasks, timeout=self.grace)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        if unfinished:
            logger.info("worker %s: left %d jobs for other workers", self.name, len(unfinished))
