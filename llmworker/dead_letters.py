"""The dead letters as an operator handles them (`manage.py llm_dead_letters`): jobs that
failed for good, kept on their own stream by the workers (queue.py, DEAD_LETTER_SCRIPT)
with why, after how many attempts and on which worker.

A retry puts the job back on its stream under its original ids, so the reply completes as
any other and every socket on the conversation sees it. The reply first leaves `failed`
in PostgreSQL (chat.services.reply_requeue), then the job is enqueued, and only then is
the dead letter removed: a retry cut short anywhere can be run again.
"""

from dataclasses import dataclass
from typing import cast

from redis.exceptions import ResponseError

from chat import services as chat_services
from grizz.database import database_call
from llmworker.jobs import InvalidJob, Job
from llmworker.queue import job_enqueue
from llmworker.redis import StreamEntries, dead_letter_key, entry_id_ms, redis_get, redis_now_ms

reply_requeue = database_call(chat_services.reply_requeue)

DAY_MS = 86_400_000


class DeadLetterNotFound(Exception):
    pass


class DeadLetterNotRetryable(Exception):
    pass


@dataclass(frozen=True)
class DeadLetter:
    entry_id: str  # in the dead-letter stream
    fields: dict[str, str]  # as the worker wrote them: the job's, then why it failed

    @property
    def job(self) -> Job | None:
        try:
            return Job.from_fields(self.fields)
        except InvalidJob:  # a malformed job entry is dead-lettered as it was
            return None

    @property
    def reason(self) -> str:
        return self.fields.get("reason", "")

    @property
    def attempts(self) -> str:
        return self.fields.get("attempts", "")

    @property
    def worker(self) -> str:
        return self.fields.get("worker", "")

    @property
    def added_ms(self) -> int:
        return entry_id_ms(self.entry_id)


async def dead_letters_count() -> int:
    return int(await redis_get().xlen(dead_letter_key()))


async def dead_letters_list(
    *, limit: int | None = None, oldest_first: bool = False
) -> list[DeadLetter]:
    """Newest first, unless `oldest_first`; all of them without a limit."""
    client = redis_get()
    if oldest_first:
        entries = await client.xrange(dead_letter_key(), count=limit)
    else:
        entries = await client.xrevrange(dead_letter_key(), count=limit)
    return [DeadLetter(entry_id, fields) for entry_id, fields in cast(StreamEntries, entries)]


async def dead_letter_get(*, entry_id: str) -> DeadLetter:
    try:
        entries = await redis_get().xrange(dead_letter_key(), min=entry_id, max=entry_id)
    except ResponseError:  # not an entry id at all
        raise DeadLetterNotFound(
            f"{entry_id!r} is not a stream entry id (like 1712345678901-0)"
        ) from None
    found = cast(StreamEntries, entries)
    if not found:
        raise DeadLetterNotFound(f"no dead letter {entry_id}")
    return DeadLetter(*found[0])


async def dead_letter_retry(*, entry_id: str) -> Job:
    """Enqueue the dead letter's job again and remove the dead letter.

    Raises DeadLetterNotFound, DeadLetterNotRetryable (no job in it, or its reply is no
    longer failed), or chat.services.ConversationBusy (another reply of the conversation
    is in flight: retry once it has finished)."""
    letter = await dead_letter_get(entry_id=entry_id)
    job = letter.job
    if job is None:
        raise DeadLetterNotRetryable(f"dead letter {entry_id} holds no job: {letter.reason}")
    try:
        await reply_requeue(reply_id=job.reply_id)
    except chat_services.ReplyNotRetryable as error:
        raise DeadLetterNotRetryable(f"dead letter {entry_id}: {error}") from None
    # Not counted against the user's in-flight limit: an operator's retry, not a message.
    await job_enqueue(job=job)
    await redis_get().xdel(dead_letter_key(), entry_id)
    return job


async def dead_letters_purge(
    *, entry_id: str | None = None, older_than_days: float | None = None
) -> int:
    """Remove one dead letter, those older than `older_than_days`, or all of them; the
    number removed."""
    client = redis_get()
    if entry_id is not None:
        await dead_letter_get(entry_id=entry_id)  # a clear error for an unknown one
        return int(await client.xdel(dead_letter_key(), entry_id))
    if older_than_days is None:
        return int(await client.xtrim(dead_letter_key(), maxlen=0, approximate=False))
    return await _older_removed(days=older_than_days)


async def dead_letters_trim(*, maxlen: int, max_age_days: float) -> tuple[int, int]:
    """Keep no dead letter older than `max_age_days`, and of the others the newest `maxlen`:
    how many were removed for their age, how many beyond the count."""
    by_age = await _older_removed(days=max_age_days)
    trim = await redis_get().xtrim(dead_letter_key(), maxlen=maxlen, approximate=False)
    return by_age, int(trim)


async def _older_removed(*, days: float) -> int:
    # Entry ids are their XADD's milliseconds: MINID keeps those added since the cut-off,
    # taken on the same clock, Redis's.
    cutoff_ms = await redis_now_ms() - int(days * DAY_MS)
    return int(await redis_get().xtrim(dead_letter_key(), minid=cutoff_ms, approximate=False))
