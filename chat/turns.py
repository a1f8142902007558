"""A turn: a user's message admitted, saved and queued for its reply. One path for every way
a message comes in, the chat socket (consumers.py) and the REST API (api.py), so that both
get the same limits, the same idempotency (client_msg_id) and the same queue. A regenerate
of the last answer is a turn too, with a new reply to the same message instead of two rows.

The steps, in order: admission (backpressure and the user's limits, one Redis call), the
rows (chat/services.py), the job on its stream with the announcement other sockets on the
conversation see. A refusal or a failure at any step gives back what earlier steps took.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from django.conf import settings
from django.contrib.auth.models import User

from chat import services
from chat.models import Conversation
from chat.relay import UNAVAILABLE_ERRORS
from grizz import metrics
from grizz.database import database_call
from grizz.logs import log_context, milliseconds
from llmworker.admission import Refusal, admission_withdraw, job_admit
from llmworker.jobs import Job
from llmworker.queue import job_enqueue

logger = logging.getLogger(__name__)

REDIS_CALL_TIMEOUT = 5.0
CLIENT_MSG_ID_MAX_CHARS = 64  # Message.client_msg_id's max_length

message_send = services.message_send_async  # on the event loop (grizz/database.py)
reply_regenerate = database_call(services.reply_regenerate)
message_retract = database_call(services.message_retract)
message_find_sent = database_call(services.message_find_sent)
user_priority = database_call(services.user_priority)

# Tasks that outlive the call that started them, kept here so they are not collected.
_background_tasks: set[asyncio.Task[None]] = set()


@dataclass
class Sender:
    """Who sends: the user, and where from (`origin`: a socket's id, so that the sending
    socket is not told of its own message). The user's priority, when not given (a socket
    read it with its user), is read on the first turn."""

    user: User
    origin: str
    priority: str | None = None

    @property
    def limited(self) -> bool:
        return not (settings.CHAT_LIMITS_EXEMPT_STAFF and self.user.is_staff)


@dataclass(frozen=True)
class Queued:
    """The message is saved and its reply queued (or was, by an earlier send of the same
    client_msg_id)."""

    sent: services.SentMessage
    queue_position: int | None  # told when the queue is long


@dataclass(frozen=True)
class Refused:
    """Nothing was saved. `code` is the socket's: invalid (also a regenerate of anything but
    the last answer), too_long, rate_limited and overloaded (both with retry_after), busy (a
    reply is in flight in the conversation), unavailable (Redis or PostgreSQL failed)."""

    code: str
    message: str
    retry_after: int | None = None


TurnOutcome = Queued | Refused

BUSY = Refused("busy", "A reply is still being generated; wait or cancel it.")
UNAVAILABLE = Refused("unavailable", "Server busy, please retry your request.")


async def turn_send(
    *, conversation: Conversation, sender: Sender, content: object, client_msg_id: object
) -> TurnOutcome:
    """Check, admit, save and queue a user message; `content` and `client_msg_id` as the
    client sent them."""
    checked = _checked(content=content, client_msg_id=client_msg_id)
    if isinstance(checked, Refused):
        return checked
    text, msg_id = checked
    job_id = str(uuid.uuid4())
    save = partial(
        message_send, conversation=conversation, content=text, client_msg_id=msg_id, job_id=job_id
    )
    # A resend of a message accepted before is answered as before, whatever the limits.
    earlier = (
        partial(message_find_sent, conversation=conversation, client_msg_id=msg_id)
        if msg_id
        else None
    )
    with log_context(job_id=job_id):
        return await _turn(sender, job_id, save=save, earlier=earlier)


async def turn_regenerate(
    *, conversation: Conversation, sender: Sender, reply_id: uuid.UUID
) -> TurnOutcome:
    """Admit, save and queue a new reply in place of the conversation's last answer,
    `reply_id`."""
    job_id = str(uuid.uuid4())
    save = partial(reply_regenerate, conversation=conversation, reply_id=reply_id, job_id=job_id)
    with log_context(job_id=job_id):
        return await _turn(sender, job_id, save=save)


async def _turn(
    sender: Sender,
    job_id: str,
    *,
    save: Callable[[], Awaitable[services.SentMessage]],
    earlier: Callable[[], Awaitable[services.SentMessage | None]] | None = None,
) -> TurnOutcome:
    """The steps of every turn, around its saving of rows (`save`). A refused admission
    answers with what `earlier` finds (a resend's first send) rather than a refusal."""
    received_at = time.monotonic()
    try:
        refusal, queue_position = await asyncio.wait_for(_admit(sender, job_id), REDIS_CALL_TIMEOUT)
        if refusal is not None:
            _refusal_count(refusal.reason)
            found = earlier and await earlier()
            if found:
                return Queued(found, None)
            return Refused(refusal.code, refusal.message, refusal.retry_after)
        sent = await save()
    except services.ConversationBusy:
        _refusal_count("busy")
        await _withdraw(sender, job_id)
        return BUSY
    except services.ReplyNotRegenerable as error:
        await _withdraw(sender, job_id)
        return Refused("invalid", str(error))
    except UNAVAILABLE_ERRORS:
        logger.exception("message refused: a dependency is down")
        _withdraw_in_background(sender, job_id)
        _refusal_count("unavailable")
        return UNAVAILABLE
    if not sent.created:
        await _withdraw(sender, job_id)  # a resend: the first send holds the place
    elif not await _enqueue(sender, sent, received_at=received_at):
        _refusal_count("unavailable")
        return UNAVAILABLE
    return Queued(sent, queue_position)


def _refusal_count(reason: str) -> None:
    # Not the checks of the message itself (invalid, too_long): those are the client's bugs.
    metrics.web().message_refusals.labels(reason).inc()


def _checked(*, content: object, client_msg_id: object) -> Refused | tuple[str, str | None]:
    """The message's text and client_msg_id, or why it may not be sent as it came."""
    if not isinstance(content, str) or not content.strip():
        return Refused("invalid", "A message needs non-empty text content.")
    if len(content) > settings.CHAT_MAX_MESSAGE_CHARS:
        limit = settings.CHAT_MAX_MESSAGE_CHARS
        return Refused("too_long", f"Messages are limited to {limit} characters.")
    if client_msg_id is None or (
        isinstance(client_msg_id, str) and 0 < len(client_msg_id) <= CLIENT_MSG_ID_MAX_CHARS
    ):
        return content, client_msg_id
    return Refused("invalid", "client_msg_id must be a string of 1-64 characters.")


async def _admit(sender: Sender, job_id: str) -> tuple[Refusal | None, int | None]:
    """Backpressure and the user's limits, in one Redis call; a slowed sender waits."""
    admission = await job_admit(user_id=sender.user.id, job_id=job_id, limited=sender.limited)
    if admission.refusal is None and admission.delay:
        await asyncio.sleep(admission.delay)  # this sender waits; the event loop does not
    return admission.refusal, admission.queue_position


async def _withdraw(sender: Sender, job_id: str) -> None:
    """Give back the admitted job's place and the user's slot before answering: the
    client that sees the refusal may send again at once."""
    with contextlib.suppress(*UNAVAILABLE_ERRORS):
        await asyncio.wait_for(
            admission_withdraw(user_id=sender.user.id, job_id=job_id), REDIS_CALL_TIMEOUT
        )


def _withdraw_in_background(sender: Sender, job_id: str) -> None:
    """After a failure: the answer to the client must not wait on a Redis that may be the
    reason for it."""
    task = asyncio.create_task(_withdraw(sender, job_id))
    _background_tasks.add(task)
    task.add_done_callback(_background_tasks.discard)


async def _enqueue(sender: Sender, sent: services.SentMessage, *, received_at: float) -> bool:
    if sender.priority is None:
        sender.priority = await user_priority(user=sender.user)
    job = Job(
        job_id=str(sent.reply.job_id),
        reply_id=str(sent.reply.id),
        conversation_id=str(sent.reply.conversation_id),
        user_id=str(sender.user.id),
        priority=sender.priority,
    )
    announcement = _announcement(sent, origin=sender.origin)
    try:
        await asyncio.wait_for(
            job_enqueue(job=job, announcement=json.dumps(announcement)), REDIS_CALL_TIMEOUT
        )
    except UNAVAILABLE_ERRORS:
        logger.exception("job %s not queued: Redis error", job.job_id)
        await message_retract(sent=sent)
        _withdraw_in_background(sender, job.job_id)
        return False
    _enqueued_log(job, sent, received_at=received_at)
    return True


def _announcement(sent: services.SentMessage, *, origin: str) -> dict[str, str]:
    """What sockets on the conversation learn of the turn, on the channel its reply frames
    will follow, so that they always see it before the answer: the message, or, for a
    regenerate, the answer to hide and the reply that takes its place."""
    ids = {
        "job_id": str(sent.reply.job_id),
        "message_id": str(sent.message.id),
        "reply_id": str(sent.reply.id),
    }
    if sent.superseded is not None:
        superseded = {"superseded_reply_id": str(sent.superseded.id)}
        return {"type": "regenerated", **ids, **superseded, "origin": origin}
    return {"type": "user_message", **ids, "content": sent.message.content, "origin": origin}


def _enqueued_log(job: Job, sent: services.SentMessage, *, received_at: float) -> None:
    # From the message to the job on the queue: admission, the durable commit, the XADD.
    duration_ms = milliseconds(time.monotonic() - received_at)
    logger.info(
        "job %s: enqueued for conversation %s in %d ms",
        job.job_id, job.conversation_id, duration_ms,
        extra={
            **job.log_fields(), "priority": job.priority, "duration_ms": duration_ms,
            "content": sent.message.content,
        },
    )  # fmt: skip
