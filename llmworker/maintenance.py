"""The deployment's periodic chores, run by one worker at a time: the holder of the
maintenance lease (a Redis key holding its consumer name). Every worker runs a
MaintenanceRunner; the one that takes the lease does the chores and renews the lease every
third of LLM_MAINTENANCE_LEASE_SECONDS, the others try to take it as often. A holder killed
is replaced once its lease has run out; one that stops releases it, for the next try of
another. A stalled holder that wakes past its lease finds its renewal refused and stops.

The chores, each logged (with counts) only when it did something:
- the reconciler (every LLM_RECONCILE_SECONDS): replies PostgreSQL has as unfinished and
  Redis has no job for are enqueued again;
- dead consumers (every LLM_MAINTENANCE_SECONDS): consumers of the worker group idle past
  LLM_CONSUMER_REMOVE_IDLE_SECONDS with nothing pending are removed;
- dead letters (as often): none older than LLM_DEAD_LETTER_MAX_AGE_DAYS, at most
  LLM_DEAD_LETTER_MAXLEN.

Each chore is harmless if two workers ran it at once (a holder that stalled mid-chore and its
successor): a job enqueued twice finds its reply finished the second time, the removal of a
consumer checks in one script that nothing is pending, and trimming twice trims nothing more.
"""

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from django.conf import settings

from chat import services as chat_services
from grizz.database import database_call
from llmworker.dead_letters import dead_letters_trim
from llmworker.faults import fault_point
from llmworker.jobs import Job
from llmworker.queue import consumers_remove_dead, job_enqueue, jobs_live
from llmworker.redis import TRANSIENT_ERRORS, Lease, maintenance_lease_key

logger = logging.getLogger(__name__)

replies_orphaned = database_call(chat_services.replies_orphaned)

# Consumer names listed in one log line; the count says how many more.
NAMES_LOGGED = 10


@dataclass
class Chore:
    run: Callable[[], Awaitable[None]]
    every: float
    due: float = 0.0  # on the event loop's clock; 0: at the next round


def _jittered(seconds: float) -> float:
    # So that workers started together do not all call Redis at the same moment.
    return seconds * (0.8 + random.random() * 0.4)


class MaintenanceRunner:
    def __init__(self, *, name: str, shutdown: asyncio.Event) -> None:
        self.name = name
        self.shutdown = shutdown
        lease_seconds = settings.LLM_MAINTENANCE_LEASE_SECONDS
        self.lease = Lease(
            key=maintenance_lease_key(), holder=name, ttl_ms=int(lease_seconds * 1000)
        )
        self.lease_every = lease_seconds / 3
        self.held = False
        self.chores = [
            Chore(self._reconcile, settings.LLM_RECONCILE_SECONDS),
            Chore(self._consumers_remove, settings.LLM_MAINTENANCE_SECONDS),
            Chore(self._dead_letters_trim, settings.LLM_MAINTENANCE_SECONDS),
        ]

    async def run(self) -> None:
        """Until the shutdown; then the lease goes back at once."""
        while not self.shutdown.is_set():
            fault_point("maintenance")
            if await self._lease_kept():
                await self._chores_due()
            await self._pause(self._next_round_in())
        await self._release()

    async def _lease_kept(self) -> bool:
        try:
            if self.held and await self.lease.extend():
                return True
            if self.held:
                logger.warning("worker %s: lost the maintenance lease", self.name)
                self.held = False
            if await self.lease.take():
                self.held = True
                logger.info("worker %s: runs the maintenance", self.name)
                for chore in self.chores:
                    chore.due = 0.0  # a new holder catches up at once
        except TRANSIENT_ERRORS as error:
            # Held or not, the chores wait: a lease that runs out meanwhile is another's.
            logger.warning("worker %s: maintenance lease unavailable: %s", self.name, error)
            return False
        return self.held

    async def _chores_due(self) -> None:
        loop = asyncio.get_running_loop()
        for chore in self.chores:
            if loop.time() < chore.due:
                continue
            try:
                await chore.run()
            except TRANSIENT_ERRORS as error:
                logger.warning("worker %s: %s failed: %s", self.name, chore.run.__name__, error)
            except Exception:
                logger.exception("worker %s: %s failed", self.name, chore.run.__name__)
            chore.due = loop.time() + _jittered(chore.every)

    def _next_round_in(self) -> float:
        wait = _jittered(self.lease_every)
        if self.held:
            now = asyncio.get_running_loop().time()
            wait = min([wait, *(chore.due - now for chore in self.chores)])
        return max(0.0, wait)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.shutdown.wait(), seconds)

    async def _release(self) -> None:
        if not self.held:
            return
        try:
            await self.lease.release()
            logger.info("worker %s: handed the maintenance over", self.name)
        except TRANSIENT_ERRORS as error:
            logger.warning(
                "worker %s: maintenance lease not released (%s); it runs out in %ss",
                self.name, error, settings.LLM_MAINTENANCE_LEASE_SECONDS,
            )  # fmt: skip
        self.held = False

    # The chores

    async def _reconcile(self) -> None:
        """Put back on the queue the replies PostgreSQL has as unfinished but Redis has no
        job for (Redis lost its data, a web process died between its commit and the XADD)."""
        live = await jobs_live()
        orphans = await replies_orphaned(
            live_job_ids=live, idle_seconds=settings.LLM_RECONCILE_SECONDS
        )
        for reply in orphans:
            # The owner and priority too: the finished job must release the owner's slot.
            job = Job(
                job_id=reply.job_id,
                reply_id=reply.reply_id,
                conversation_id=reply.conversation_id,
                user_id=reply.user_id,
                priority=reply.priority,
            )
            await job_enqueue(job=job)
            logger.warning(
                "job %s: found without a queue entry; enqueued again", job.job_id,
                extra=job.log_fields(),
            )  # fmt: skip
        if orphans:
            logger.info("maintenance: enqueued %d replies again", len(orphans))

    async def _consumers_remove(self) -> None:
        idle_seconds = settings.LLM_CONSUMER_REMOVE_IDLE_SECONDS
        removed = await consumers_remove_dead(idle_ms=int(idle_seconds * 1000))
        names = [f"{name} ({priority})" for priority, got in removed.items() for name in got]
        if names:
            more = len(names) - NAMES_LOGGED
            logger.info(
                "maintenance: removed %d consumers idle over %ss with nothing pending: %s%s",
                len(names), idle_seconds, ", ".join(names[:NAMES_LOGGED]),
                f" and {more} more" if more > 0 else "",
            )  # fmt: skip

    async def _dead_letters_trim(self) -> None:
        max_age_days = settings.LLM_DEAD_LETTER_MAX_AGE_DAYS
        maxlen = settings.LLM_DEAD_LETTER_MAXLEN
        by_age, by_count = await dead_letters_trim(maxlen=maxlen, max_age_days=max_age_days)
        if by_age or by_count:
            logger.info(
                "maintenance: removed %d dead letters older than %s days and %d beyond %d",
                by_age, max_age_days, by_count, maxlen,
            )  # fmt: skip
