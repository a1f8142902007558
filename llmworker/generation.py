"""One delivery of a job: prompt from PostgreSQL, tokens from the provider, frames to the
conversation's sockets as they come, the whole answer back to PostgreSQL.

It says what the worker must do with the job's entry afterwards (`Outcome`); the worker
loop (worker.py) does it. Exactly-once effects come from the attempt number: PostgreSQL
and the reply's frames accept writes only from the attempt that began last.
"""

import asyncio
import contextlib
import enum
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from django.conf import settings

from chat import services as chat_services
from chat.services import ReplyStart
from grizz import metrics
from grizz.database import database_call
from grizz.logs import log_context_bind, milliseconds
from llmworker.admission import user_release
from llmworker.breaker import CircuitBreaker, Permit, breaker_for
from llmworker.faults import fault_point
from llmworker.jobs import Job
from llmworker.providers import Chunk, Provider, ProviderError, model_default
from llmworker.redis import entry_age_seconds
from llmworker.replies import AttemptStart, ReplyPublisher, StaleAttempt

logger = logging.getLogger(__name__)

T = TypeVar("T")

UNAVAILABLE_MESSAGE = "The model provider is unavailable; your reply will continue when it is back."

# Awaited on the event loop, not on a database thread (grizz/database.py LoopConnections).
reply_start = chat_services.reply_start_async
reply_complete = chat_services.reply_complete_async
reply_fail = chat_services.reply_fail_async
reply_for_job = database_call(chat_services.reply_for_job)


class Outcome(enum.Enum):
    ACK = "ack"  # finished (or found finished): acknowledge
    DEAD_LETTER = "dead_letter"  # failed for good: move to the dead-letter stream
    ABANDON = "abandon"  # another delivery owns the job now: touch nothing


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    reason: str = ""
    attempts: int = 0


@dataclass(frozen=True)
class Answered:
    """A reply that completed: what it was asked and what it said (for its title)."""

    prompt: list[dict[str, str]]
    model: str
    content: str


class CancelledByUser(Exception):
    pass


class ResultTimeout(Exception):
    """The provider sent nothing for LLM_RESULT_TIMEOUT_SECONDS."""

    def __init__(self, seconds: float) -> None:
        self.message = (
            f"The model provider sent nothing for {seconds:g} seconds; the reply was stopped."
        )
        super().__init__(self.message)


class Watchdog:
    """The result timeout of one reply: how long its provider may send nothing, across
    retries and their backoff. A retry does not start the clock again (only a chunk does):
    retries cannot stretch a user's wait for a silent provider past the bound.

    Two timeouts, two jobs. The openai client's (LLM_REQUEST_TIMEOUT_SECONDS, 60) bounds
    each read of one request and turns a stalled request into a retryable error; this one
    (LLM_RESULT_TIMEOUT_SECONDS, 120) ends the reply, failed with `timeout`, when the
    retries bring nothing either. Set it below the request timeout and a stall is never
    retried. Time spent waiting for the circuit breaker does not count: the user was told
    (`llm_unavailable`) and the provider was not asked."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = 0.0
        self.kick()

    def kick(self) -> None:
        self.deadline = asyncio.get_running_loop().time() + self.seconds

    @contextlib.asynccontextmanager
    async def guarding(self) -> AsyncIterator[None]:
        """Raise ResultTimeout in the block once the deadline passes without a kick. The
        await it stops is cancelled: a provider stream cancelled mid-read closes its HTTP
        response, so nothing more is paid for.

        One timer for the whole block, which re-arms itself when it fires before a deadline
        that kicks moved on: a timeout per chunk (asyncio.timeout, rescheduled) cost several
        % of the worker's CPU per token (docs/performance.md)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def check() -> None:
            nonlocal expired
            if loop.time() < self.deadline:
                self.timer = loop.call_at(self.deadline, check)
            else:
                expired = True
                task.cancel()

        self.timer = loop.call_at(self.deadline, check)
        try:
            yield
        except asyncio.CancelledError:
            # Ours, unless the task was cancelled by someone else too: then it stays so.
            if expired and task.uncancel() == 0:
                raise ResultTimeout(self.seconds) from None
            raise
        finally:
            self.timer.cancel()

    async def within(self, awaitable: Awaitable[T]) -> T:
        """Await, raising ResultTimeout at the deadline."""
        async with self.guarding():
            return await awaitable


def retry_delay(retry: int, retry_after: float | None) -> float:
    """Exponential backoff with jitter; never shorter than what the provider asked for."""
    ceiling = min(settings.LLM_RETRY_MAX_SECONDS, settings.LLM_RETRY_BASE_SECONDS * 2.0**retry)
    jittered = ceiling / 2 + random.random() * ceiling / 2
    return max(jittered, retry_after or 0.0)


@dataclass
class ReplyGeneration:
    job: Job
    entry_id: str
    provider: Provider
    publisher: ReplyPublisher
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event)
    parts: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None
    sent_any_delta: bool = False
    # time.monotonic() at the attempt's start and at its first token, for the logs.
    started_at: float = 0.0
    first_token_at: float | None = None
    # The sockets were told the provider is unavailable, and nothing has come since.
    told_unavailable: bool = False
    answered: Answered | None = None  # set once the reply is complete and its done sent

    def __post_init__(self) -> None:
        # Shared by every job of the process that calls the same provider.
        self.breaker: CircuitBreaker = breaker_for(self.provider.base_url)
        self.metrics = metrics.worker()

    def cancel(self) -> None:
        self.cancel_requested.set()

    async def run(self) -> Result:
        start = await reply_start(
            reply_id=self.job.reply_id,
            default_model=model_default(),
            entry_id=self.entry_id,
            max_attempts=settings.LLM_MAX_ATTEMPTS,
        )
        if start is None:
            await self._final_frame_ensure()
            return Result(Outcome.ACK, reason="reply already finished")
        log_context_bind(attempt=start.attempt)  # the job's task: worker.py's _run_job
        if start.exhausted:
            return await self._give_up(start)
        self.started_at = time.monotonic()
        queued_ms = milliseconds(entry_age_seconds(self.entry_id))
        logger.info(
            "job %s: attempt %d for conversation %s, enqueued %d ms ago",
            self.job.job_id, start.attempt, self.job.conversation_id, queued_ms,
            extra={"queued_ms": queued_ms, "priority": self.job.priority},
        )  # fmt: skip
        try:
            return await self._attempt(start)
        except StaleAttempt:
            logger.warning(
                "job %s: attempt %d was superseded", self.job.job_id, start.attempt,
                extra=self._outcome_fields("superseded"),
            )  # fmt: skip
            return Result(Outcome.ABANDON)

    async def _final_frame_ensure(self) -> None:
        """The job came back finished: its worker may have died after saving the reply and
        before sending the final frame that sockets following it wait for."""
        reply = await reply_for_job(
            job_id=self.job.job_id, conversation_id=self.job.conversation_id
        )
        if reply is not None and await self.publisher.final_frame_ensure(reply):
            logger.warning("job %s: sent the final frame its attempt did not", self.job.job_id)

    async def _attempt(self, start: ReplyStart) -> Result:
        # Begun while the provider request goes out: the publisher holds the attempt's
        # frames until its fence is up (docs/performance.md).
        self.publisher.attempt_begin(start.attempt).add_done_callback(self._attempt_begun)
        try:
            await self._generate_until_cancelled(start)
        except CancelledByUser:
            return await self._finish_cancelled(start)
        except ProviderError as error:
            return await self._fail(start, error.message, summary=error.summary)
        except ResultTimeout as timeout:
            return await self._fail(start, timeout.message, code="timeout")
        content = "".join(self.parts)
        fault_point("before_reply_complete")
        if not await reply_complete(
            reply_id=self.job.reply_id, attempt=start.attempt, content=content, usage=self.usage
        ):
            raise StaleAttempt()
        # Counted once the reply is saved, before its last frame: whoever saw the reply end
        # finds it counted.
        self._complete_count()
        await self._slot_release()
        fault_point("before_final_frame")
        await self.publisher.done(
            reply_id=self.job.reply_id, status="complete", content=content, usage=self.usage
        )
        self.answered = Answered(prompt=start.prompt, model=start.model, content=content)
        fields = self._outcome_fields("complete", content)
        logger.info(
            "job %s: complete in %d ms, %d tokens, the first token after %s ms",
            self.job.job_id, fields["duration_ms"], fields["tokens"], fields["ttft_ms"] or "-",
            extra=fields,
        )  # fmt: skip
        return Result(Outcome.ACK)

    def _attempt_begun(self, begin: "asyncio.Task[AttemptStart]") -> None:
        # A cancel asked while no worker heard it (its job between a worker that died and
        # the one taking it over, say) stops the attempt as a live one would.
        if not begin.cancelled() and begin.exception() is None and begin.result().cancelled:
            self.cancel()

    def _complete_count(self) -> None:
        self.metrics.reply("complete")
        if self.first_token_at is not None:
            self.metrics.first_token_to_done.observe(time.monotonic() - self.first_token_at)
        usage = self.usage or {}
        for kind in ("prompt", "completion"):
            self.metrics.provider_tokens.labels(kind).inc(usage.get(f"{kind}_tokens", 0))

    async def _generate_until_cancelled(self, start: ReplyStart) -> None:
        work = asyncio.ensure_future(self._generate_with_retries(start))
        cancelled = asyncio.ensure_future(self.cancel_requested.wait())
        try:
            await asyncio.wait({work, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
            if not work.done():
                # Cancelling the task closes the provider's HTTP stream: no more tokens paid.
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if self.cancel_requested.is_set() and work.cancelled():
            raise CancelledByUser()
        work.result()

    async def _generate_with_retries(self, start: ReplyStart) -> None:
        watchdog = Watchdog(settings.LLM_RESULT_TIMEOUT_SECONDS)
        for retry in range(settings.LLM_RETRY_LIMIT + 1):
            try:
                return await self._call_provider(start, watchdog)
            except ProviderError as error:
                if not error.retryable or retry == settings.LLM_RETRY_LIMIT:
                    raise
                delay = retry_delay(retry, error.retry_after)
                self.metrics.reply("retried")
                logger.warning(
                    "job %s: %s; retry %d in %.1fs",
                    self.job.job_id, error.summary, retry + 1, delay,
                    extra={"retry": retry + 1, "provider_error": error.message},
                )  # fmt: skip
                await watchdog.within(asyncio.sleep(delay))

    async def _call_provider(self, start: ReplyStart, watchdog: Watchdog) -> None:
        """One provider call, once the circuit breaker lets it through; tells the breaker
        how it went."""
        permit = await self._breaker_pass(watchdog)
        try:
            await self._stream_once(start, permit, watchdog)
        except ProviderError as error:
            self._provider_error_count(error.kind, error.status)
            if error.retryable:  # a 400 says nothing about the provider's health
                permit.failed()
            raise
        except ResultTimeout:
            self._provider_error_count("timeout", None)
            permit.failed()  # a provider that hangs is as unavailable as one that refuses
            raise
        finally:
            permit.release()  # no verdict (a 400, a cancel): another job may probe

    def _provider_error_count(self, kind: str, status: int | None) -> None:
        self.metrics.provider_error(provider=self.breaker.name, kind=kind, status=status)

    async def _breaker_pass(self, watchdog: Watchdog) -> Permit:
        """Leave to call the provider. While its circuit is open the job waits: it does not
        fail, does not spend a retry, and its sockets are told once."""
        waited = False
        while (permit := self.breaker.admit()) is None:
            waited = True
            if not self.told_unavailable:
                await self._tell_unavailable()
            await self.breaker.wait_for_change()
        if waited:
            watchdog.kick()  # the wait was the breaker's, not the provider's silence
        if permit.probe:
            logger.info("job %s: probes the provider", self.job.job_id)
        return permit

    async def _tell_unavailable(self) -> None:
        # Half-open with a probe in flight, the answer is a moment away: say 1 s, not 0.
        retry_after = max(1, math.ceil(self.breaker.seconds_until_half_open()))
        logger.warning(
            "job %s: the provider's circuit is open; waiting (about %ds)",
            self.job.job_id, retry_after,
        )  # fmt: skip
        await self.publisher.notice(
            code="llm_unavailable", message=UNAVAILABLE_MESSAGE, retry_after=retry_after
        )
        self.told_unavailable = True

    async def _stream_once(self, start: ReplyStart, permit: Permit, watchdog: Watchdog) -> None:
        if self.sent_any_delta:
            # The user saw part of an answer that broke off: tell them it starts over.
            await self.publisher.restart()
        self.parts.clear()
        self.usage = None
        chunks = self.provider.stream(messages=start.prompt, model=start.model)
        try:
            async with watchdog.guarding():
                async for chunk in chunks:
                    watchdog.kick()
                    permit.succeeded()  # the provider answers: the waiting jobs may go
                    self.told_unavailable = False
                    self._take(chunk)
            await self.publisher.deltas_flush()
        finally:
            # Counted per call, not per token: the per-token path stays as it was.
            self.metrics.tokens_streamed.inc(len(self.parts))
            # Ends the HTTP stream at once if we stop early (a failed send of deltas).
            await chunks.aclose()

    def _take(self, chunk: Chunk) -> None:
        if chunk.text:
            self.parts.append(chunk.text)
            # Sent without waiting: tokens that come while Redis is busy go out together.
            self.publisher.delta_push(chunk.text)
            if not self.sent_any_delta:
                self._first_token()
        if chunk.usage is not None:
            self.usage = chunk.usage

    def _first_token(self) -> None:
        self.sent_any_delta = True
        self.first_token_at = time.monotonic()
        self.metrics.first_token.observe(entry_age_seconds(self.entry_id))

    async def _finish_cancelled(self, start: ReplyStart) -> Result:
        content = "".join(self.parts)
        if not await reply_complete(
            reply_id=self.job.reply_id,
            attempt=start.attempt,
            content=content,
            usage=self.usage,
            status="cancelled",
        ):
            raise StaleAttempt()
        self.metrics.reply("cancelled")
        await self._slot_release()
        await self.publisher.done(
            reply_id=self.job.reply_id, status="cancelled", content=content, usage=self.usage
        )
        fields = self._outcome_fields("cancelled", content)
        logger.info(
            "job %s: cancelled after %d ms, %d tokens",
            self.job.job_id, fields["duration_ms"], fields["tokens"], extra=fields,
        )  # fmt: skip
        return Result(Outcome.ACK)

    async def _fail(
        self, start: ReplyStart, message: str, *, code: str = "llm_error", summary: str = ""
    ) -> Result:
        """`summary`: what the logs say when `message` quotes the provider (ProviderError)."""
        fields = {**self._outcome_fields("failed"), "code": code}
        if summary:
            fields["provider_error"] = message
        logger.warning(
            "job %s: failed after %d ms: %s",
            self.job.job_id, fields["duration_ms"], summary or message, extra=fields,
        )  # fmt: skip
        if not await reply_fail(reply_id=self.job.reply_id, attempt=start.attempt, error=message):
            raise StaleAttempt()
        self.metrics.reply("failed")
        await self._slot_release()
        await self.publisher.error(code=code, message=message)
        return Result(Outcome.DEAD_LETTER, reason=message, attempts=start.attempt)

    def _outcome_fields(self, outcome: str, content: str = "") -> dict[str, object]:
        """The figures of the attempt's last log line. `content` is logged only with
        LOG_CONTENT (grizz/logs.py)."""
        first = self.first_token_at
        fields: dict[str, object] = {
            "outcome": outcome,
            "duration_ms": milliseconds(time.monotonic() - self.started_at),
            "ttft_ms": None if first is None else milliseconds(first - self.started_at),
            "tokens": len(self.parts),
        }
        if self.usage is not None:
            fields["usage"] = self.usage
        if content:
            fields["content"] = content
        return fields

    async def _slot_release(self) -> None:
        # Before the final frame: a user who sees the reply end may send the next message
        # at once, and must not find the finished reply still counted as in flight.
        await user_release(user_id=self.job.user_id, job_id=self.job.job_id)

    async def _give_up(self, start: ReplyStart) -> Result:
        reason = f"delivered {start.attempt} times, more than LLM_MAX_ATTEMPTS"
        logger.error(
            "job %s: %s; moving it to the dead letters", self.job.job_id, reason,
            extra={"outcome": "failed", "reason": reason},
        )  # fmt: skip
        # reply_start has already failed the reply, under the row lock.
        self.metrics.reply("failed")
        await self._slot_release()
        await self.publisher.error(
            code="llm_error", message="The reply could not be generated; please try again."
        )
        return Result(Outcome.DEAD_LETTER, reason=reason, attempts=start.attempt)
