"""The chat's business logic: plain functions the consumer, the API, the views and the worker
call. They are synchronous (the ORM); async callers wrap them with database_call
(grizz/database.py), except `reply_cancel`, which mostly talks to Redis.
"""

import contextlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypedDict

from asgiref.sync import async_to_sync, sync_to_async
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, transaction
from django.db.models import (
    Aggregate,
    Count,
    Exists,
    F,
    Max,
    Model,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.functions import Coalesce, Greatest
from django.utils import timezone

from chat import portable
from chat.models import Conversation, Message
from grizz.database import database_call, loop_database, statement_rows, statement_rows_async
from llmworker.admission import user_release
from llmworker.providers import demo_mode_active, model_default
from llmworker.redis import redis_get
from llmworker.replies import ReplyPublisher, reply_cancel_request


def _on_postgresql() -> bool:
    # The turn's statements are written for PostgreSQL; elsewhere (the quick start's SQLite
    # file) chat/portable.py takes the same steps through the ORM. Asked of the event loop's
    # wrapper: Django's `connection`, touched in a socket's task, makes one of its own there.
    return loop_database().vendor == "postgresql"


class ConversationBusy(Exception):
    """A reply is still queued or being generated in this conversation."""


class ReplyNotRetryable(Exception):
    """The reply is gone, regenerated, or not failed: it completed, was cancelled, or runs
    again."""


class ReplyNotRegenerable(Exception):
    """The reply is not the conversation's last answer (or not of this conversation); the
    message says which, in the user's words."""


def conversation_create(
    *, owner: User, title: str = "", system_prompt: str = "", model: str = ""
) -> Conversation:
    return Conversation.objects.create(
        owner=owner, title=title.strip(), system_prompt=system_prompt, model=model.strip()
    )


@dataclass(frozen=True)
class ModelChoices:
    default: str  # the model of a conversation that names none
    models: list[str]  # those a conversation may name


def model_choices() -> ModelChoices:
    """The models a conversation may use. Only the demo model answers in demo mode, whatever
    LLM_MODELS says, so it is then the only one offered."""
    if demo_mode_active():
        return ModelChoices(default=model_default(), models=[model_default()])
    return ModelChoices(default=model_default(), models=list(settings.LLM_MODELS))


def conversation_settings_check(
    *, conversation: Conversation | None, model: str | None, system_prompt: str | None
) -> None:
    """Refuse settings a conversation may not have (None: not being changed), with the
    problems of each field (a ValidationError's message_dict). Blank model: the default. A
    model the conversation already names may stay when it is no longer offered, so that
    changing the system prompt alone never fails over the model."""
    problems: dict[str, list[ValidationError]] = {}
    offered = model_choices().models
    chosen, kept = (model or "").strip(), conversation.model if conversation else ""
    if chosen and chosen not in (*offered, kept):
        problems["model"] = [
            ValidationError(
                f"{chosen!r} is not offered here; the models are {', '.join(offered)}.",
                code="invalid_choice",
            )
        ]
    limit = settings.CHAT_MAX_MESSAGE_CHARS
    if system_prompt is not None and len(system_prompt) > limit:
        # The same code as a serializer's max_length: the API's `too_long`.
        message = f"Ensure this field has no more than {limit} characters."
        problems["system_prompt"] = [ValidationError(message, code="max_length")]
    if problems:
        raise ValidationError(problems)


def conversation_update(
    *,
    conversation: Conversation,
    title: str | None = None,
    model: str | None = None,
    system_prompt: str | None = None,
) -> Conversation:
    """Change a conversation's title, model or system prompt (None: as it is), after
    conversation_settings_check. The next reply uses them: its reply_start reads both.

    Not activity: updated_at (the sidebar's order, newest first) stays as the last message
    left it, which save() and its auto_now would not."""
    conversation_settings_check(conversation=conversation, model=model, system_prompt=system_prompt)
    changes = {
        field: value
        for field, value in (
            ("title", None if title is None else title.strip()),
            ("model", None if model is None else model.strip()),
            ("system_prompt", system_prompt),
        )
        if value is not None
    }
    Conversation.objects.filter(pk=conversation.pk).update(**changes)
    conversation.refresh_from_db()
    return conversation


def user_priority(*, user: User) -> str:
    """ "high" for staff and members of CHAT_PRIORITY_GROUP: their replies are read first."""
    if user.is_staff or user.groups.filter(name=settings.CHAT_PRIORITY_GROUP).exists():
        return "high"
    return "normal"


@dataclass(frozen=True)
class OpenedConversation:
    user: User
    conversation: Conversation | None  # None: no conversation of this user's by that id
    active_job_id: str | None  # the job of its reply queued or being generated, if any
    priority: str  # the user's replies', user_priority's


def conversation_open_for_user(
    *, user_id: int, conversation_id: uuid.UUID | str | None
) -> OpenedConversation | None:
    """The user a socket opens for, the conversation it opens if it is theirs, and its reply
    in flight, and the priority of the user's replies; None when there is no such user. One
    statement, as a wave of reconnecting sockets makes one of these per socket, and the
    socket's first message would otherwise wait for another to read the priority. Written
    out, not built by the ORM: compiling the annotated query cost 1.0-1.3 ms of CPU per
    socket, and the ORM's user lookup 0.3 ms more (docs/performance.md). Whether the user
    may sign in is the caller's."""
    if not _on_postgresql():
        found = portable.user_with_conversation(user_id=user_id, conversation_id=conversation_id)
        return OpenedConversation(*found, user_priority(user=found[0])) if found else None
    params = _conversation_open_params(user_id=user_id, conversation_id=conversation_id)
    return _conversation_opened(statement_rows(_CONVERSATION_OPEN_SQL, params))


async def conversation_open_for_user_async(
    *, user_id: int, conversation_id: uuid.UUID | str | None
) -> OpenedConversation | None:
    """conversation_open_for_user, its statement awaited on the event loop rather than on a
    database thread (grizz/database.py LoopConnections): the call of every socket's
    opening."""
    if not _on_postgresql():
        return await _conversation_open_on_a_thread(
            user_id=user_id, conversation_id=conversation_id
        )
    params = _conversation_open_params(user_id=user_id, conversation_id=conversation_id)
    return _conversation_opened(await statement_rows_async(_CONVERSATION_OPEN_SQL, params))


def _conversation_open_params(
    *, user_id: int, conversation_id: uuid.UUID | str | None
) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "conversation_id": uuid.UUID(str(conversation_id)) if conversation_id else None,
        "priority_group": settings.CHAT_PRIORITY_GROUP,
    }


def _conversation_opened(rows: list[tuple[Any, ...]]) -> OpenedConversation | None:
    if not rows:
        return None
    row = rows[0]
    user = User.from_db(DEFAULT_DB_ALIAS, _USER_FIELDS, row[: len(_USER_FIELDS)])
    *values, job_id, high = row[len(_USER_FIELDS) :]
    priority = "high" if high else "normal"
    if values[0] is None:  # the conversation's id: the outer join found none
        return OpenedConversation(user, None, None, priority)
    conversation = Conversation.from_db(DEFAULT_DB_ALIAS, _CONVERSATION_FIELDS, values)
    return OpenedConversation(user, conversation, str(job_id) if job_id else None, priority)


def _sql_words(words: Iterable[str]) -> str:
    """Constants of the code (statuses) as a list written into a statement, `('a', 'b')`,
    rather than bound as an array: psycopg works out a bound list's element type by walking
    it at every call, 39 µs of the 47 it spent on the socket's opening statement's
    parameters (docs/performance.md)."""
    words = list(words)
    if not all(word.isidentifier() for word in words):
        raise ValueError(f"not plain words, which need no quoting: {words}")
    return "(" + ", ".join(f"'{word}'" for word in words) + ")"


_ACTIVE = _sql_words(Message.ACTIVE_STATUSES)


def _columns(model: type[Model], alias: str) -> str:
    return ", ".join(
        f"{alias}.{connection.ops.quote_name(str(field.column))}"
        for field in model._meta.concrete_fields
    )


_USER_FIELDS = [field.attname for field in User._meta.concrete_fields]
_CONVERSATION_FIELDS = [field.attname for field in Conversation._meta.concrete_fields]
_CONVERSATION_OPEN_SQL = f"""
SELECT {_columns(User, "account")}, {_columns(Conversation, "conversation")},
       (SELECT reply.job_id FROM {Message._meta.db_table} AS reply
        WHERE reply.conversation_id = conversation.id
          AND reply.role = 'assistant' AND reply.status IN {_ACTIVE}
        LIMIT 1),
       account.is_staff OR EXISTS (
           SELECT 1 FROM {User.groups.through._meta.db_table} AS membership
           JOIN {Group._meta.db_table} AS grp ON grp.id = membership.group_id
           WHERE membership.user_id = account.id AND grp.name = %(priority_group)s)
FROM {User._meta.db_table} AS account
LEFT JOIN {Conversation._meta.db_table} AS conversation
     ON conversation.id = %(conversation_id)s AND conversation.owner_id = account.id
WHERE account.id = %(user_id)s
"""


def conversation_active_job(*, conversation_id: uuid.UUID | str) -> str | None:
    job_id = (
        Message.objects.filter(
            conversation_id=conversation_id,
            role=Message.Role.ASSISTANT,
            status__in=Message.ACTIVE_STATUSES,
        )
        .values_list("job_id", flat=True)
        .first()
    )
    return str(job_id) if job_id else None


def conversation_untitled(*, conversation_id: uuid.UUID | str) -> bool:
    """Whether the conversation has no title (neither its owner's nor a generated one)."""
    return Conversation.objects.filter(id=conversation_id, title="").exists()


def conversation_title_generated(*, conversation_id: uuid.UUID | str, title: str) -> bool:
    """Give an untitled conversation the title the model wrote. False when it has a title
    by now: a user who named it meanwhile keeps their name. Through update(), not save():
    a title is not activity, so updated_at (the sidebar's order) stays as it was."""
    return Conversation.objects.filter(id=conversation_id, title="").update(title=title) == 1


# --- Review: the queries behind the admin's conversation pages ---------------------------


class ConversationActivity(TypedDict):
    """What conversations_with_activity adds to each conversation."""

    message_count: int
    tokens_used: int
    last_activity: datetime
    has_failed_reply: bool


def conversations_with_activity(*, conversations: QuerySet[Conversation]) -> QuerySet[Conversation]:
    """Conversations with their number of messages, tokens used, last activity (a reply
    ends after the conversation was last touched) and whether a reply failed. Subqueries,
    not a join with GROUP BY: a filter or search that joins the messages as well would
    multiply a joined count."""
    last_message = _per_conversation(Max("updated_at"))
    return conversations.annotate(
        message_count=Coalesce(_per_conversation(Count("pk")), 0),
        tokens_used=Coalesce(_per_conversation(Sum("total_tokens")), 0),
        last_activity=Greatest("updated_at", Coalesce(last_message, "updated_at")),
        has_failed_reply=Exists(_replies_in([Message.Status.FAILED])),
    )


def conversations_with_replies(
    *, conversations: QuerySet[Conversation], statuses: Iterable[str]
) -> QuerySet[Conversation]:
    """The conversations with at least one reply in one of these statuses."""
    return conversations.filter(Exists(_replies_in(statuses)))


def conversations_search(
    *, conversations: QuerySet[Conversation], terms: Iterable[str]
) -> QuerySet[Conversation]:
    """The conversations that match every term in their title, their owner's username or
    one of their messages. The messages are searched in a subquery: a join would list a
    conversation once per matching message."""
    for term in terms:
        in_messages = Message.objects.filter(conversation=OuterRef("pk"), content__icontains=term)
        conversations = conversations.filter(
            Q(title__icontains=term) | Q(owner__username__icontains=term) | Exists(in_messages)
        )
    return conversations


def conversations_with_transcripts(
    *, conversations: QuerySet[Conversation]
) -> QuerySet[Conversation]:
    """Conversations with their owner and their messages in order: three queries in all."""
    in_order = Message.objects.order_by("position")
    return conversations.select_related("owner").prefetch_related(
        Prefetch("messages", queryset=in_order)
    )


def _per_conversation(aggregate: Aggregate) -> Subquery:
    """One aggregate of the outer conversation's messages (NULL when it has none)."""
    messages = Message.objects.filter(conversation=OuterRef("pk")).order_by()
    return Subquery(messages.values("conversation").annotate(value=aggregate).values("value"))


def _replies_in(statuses: Iterable[str]) -> QuerySet[Message]:
    return Message.objects.filter(
        conversation=OuterRef("pk"), role=Message.Role.ASSISTANT, status__in=list(statuses)
    )


@dataclass(frozen=True)
class SentMessage:
    message: Message
    reply: Message
    created: bool  # False when client_msg_id named a message sent before
    superseded: Message | None = None  # the answer this reply regenerates, if it does


def message_send(
    *,
    conversation: Conversation,
    content: str,
    client_msg_id: str | None = None,
    job_id: uuid.UUID | str | None = None,
) -> SentMessage:
    """Save a user message and its queued reply. The caller enqueues the job after this
    returns, that is after the commit, so no job ever names rows that do not exist.

    A resend (a client_msg_id saved before) returns the first send's rows. Both that and a
    second active reply end in an IntegrityError from a constraint rather than in a query
    beforehand: the message of a turn is one statement (docs/performance.md)."""
    message, reply = _turn_rows(
        conversation=conversation, content=content, client_msg_id=client_msg_id, job_id=job_id
    )
    try:
        _messages_insert(conversation=conversation, message=message, reply=reply)
    except IntegrityError:
        # The same client_msg_id (a resend, or a race with one), or another active reply.
        if client_msg_id:
            earlier = message_find_sent(conversation=conversation, client_msg_id=client_msg_id)
            if earlier is not None:
                return earlier
        raise ConversationBusy() from None
    return SentMessage(message=message, reply=reply, created=True)


async def message_send_async(
    *,
    conversation: Conversation,
    content: str,
    client_msg_id: str | None = None,
    job_id: uuid.UUID | str | None = None,
) -> SentMessage:
    """message_send, its statement awaited on the event loop rather than on a database
    thread (grizz/database.py LoopConnections): the web's call of every turn."""
    if not _on_postgresql():
        return await _message_send_on_a_thread(
            conversation=conversation, content=content, client_msg_id=client_msg_id, job_id=job_id
        )
    message, reply = _turn_rows(
        conversation=conversation, content=content, client_msg_id=client_msg_id, job_id=job_id
    )
    values = _messages_insert_values(conversation=conversation, message=message, reply=reply)
    try:
        rows = await statement_rows_async(_MESSAGES_INSERT_SQL, values)
    except IntegrityError:
        if client_msg_id:
            earlier = await _message_find_sent_on_a_thread(
                conversation=conversation, client_msg_id=client_msg_id
            )
            if earlier is not None:
                return earlier
        raise ConversationBusy() from None
    _messages_inserted(message=message, reply=reply, rows=rows)
    return SentMessage(message=message, reply=reply, created=True)


def _turn_rows(
    *,
    conversation: Conversation,
    content: str,
    client_msg_id: str | None,
    job_id: uuid.UUID | str | None,
) -> tuple[Message, Message]:
    """A turn's two rows, not saved yet: the user's message and its queued reply."""
    message = Message(
        conversation=conversation,
        role=Message.Role.USER,
        content=content,
        status=Message.Status.COMPLETE,
        client_msg_id=client_msg_id,
    )
    reply = Message(
        conversation=conversation,
        role=Message.Role.ASSISTANT,
        status=Message.Status.QUEUED,
        job_id=job_id or uuid.uuid4(),
    )
    return message, reply


def _messages_insert(*, conversation: Conversation, message: Message, reply: Message) -> None:
    """Insert a turn's two rows after the conversation's last and touch the conversation, in
    one statement committed on its own. The update takes the conversation's row lock, so a
    concurrent sender waits for this commit; its positions (read from its statement's
    snapshot) are then taken, and message_unique_position refuses its rows."""
    if not _on_postgresql():
        return portable.messages_insert(conversation=conversation, message=message, reply=reply)
    values = _messages_insert_values(conversation=conversation, message=message, reply=reply)
    # Within a caller's transaction, a savepoint keeps a refused insert from aborting it.
    savepoint = transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()
    with savepoint:
        rows = statement_rows(_MESSAGES_INSERT_SQL, values)
    _messages_inserted(message=message, reply=reply, rows=rows)


def _messages_insert_values(
    *, conversation: Conversation, message: Message, reply: Message
) -> list[Any]:
    now, database = timezone.now(), loop_database()
    values: list[Any] = [now, conversation.id, conversation.id]
    for row in (message, reply):
        row.created_at = row.updated_at = now
        values.extend(
            field.get_db_prep_save(getattr(row, field.attname), database)
            for field in _INSERTED_FIELDS
        )
    return values


def _messages_inserted(*, message: Message, reply: Message, rows: list[tuple[Any, ...]]) -> None:
    message.position, reply.position = sorted(position for (position,) in rows)
    for row in (message, reply):
        row._state.adding = False  # saved: a later save() updates it, as after Model.save()
        row._state.db = DEFAULT_DB_ALIAS


# Every column of a message but its position, which the statement computes.
_INSERTED_FIELDS = [field for field in Message._meta.concrete_fields if field.attname != "position"]
_PLACEHOLDERS = ", ".join(["%s"] * len(_INSERTED_FIELDS))
_MESSAGES_INSERT_SQL = f"""
WITH touched AS (
    UPDATE {Conversation._meta.db_table} SET updated_at = %s WHERE id = %s
), last AS (
    SELECT COALESCE(MAX(position), 0) AS position FROM {Message._meta.db_table}
    WHERE conversation_id = %s
)
INSERT INTO {Message._meta.db_table}
    (position, {", ".join(connection.ops.quote_name(str(f.column)) for f in _INSERTED_FIELDS)})
VALUES ((SELECT position FROM last) + 1, {_PLACEHOLDERS}),
       ((SELECT position FROM last) + 2, {_PLACEHOLDERS})
RETURNING position
"""


def message_find_sent(*, conversation: Conversation, client_msg_id: str) -> SentMessage | None:
    message = Message.objects.filter(conversation=conversation, client_msg_id=client_msg_id).first()
    if message is None:
        return None
    reply = Message.objects.get(conversation=conversation, position=message.position + 1)
    return SentMessage(message=message, reply=reply, created=False)


def message_retract(*, sent: SentMessage) -> None:
    """Undo message_send or reply_regenerate when its job could not be queued: the user was
    told nothing was accepted, so nothing is kept, and a regenerated answer is the last again."""
    if sent.superseded is None:
        Message.objects.filter(id__in=[sent.message.id, sent.reply.id]).delete()
        return
    with transaction.atomic():
        Message.objects.filter(id=sent.reply.id).delete()
        Message.objects.filter(id=sent.superseded.id).update(superseded_at=None)


_ONLY_THE_LAST_ANSWER = "Only the last answer can be regenerated."


def reply_regenerate(
    *,
    conversation: Conversation,
    reply_id: uuid.UUID | str,
    job_id: uuid.UUID | str | None = None,
) -> SentMessage:
    """A new queued reply to the question that the conversation's last answer, `reply_id`,
    answered, in its place. The old answer is kept for review, marked superseded: later
    prompts and the chat page leave it out. The caller enqueues the job after this returns.

    One transaction, its locks taken in an order message_send's cannot cross (the old
    answer's row, the new row's keys, the conversation), so the two never deadlock. The old
    answer is checked once locked; a turn that races this one is refused by a constraint,
    message_unique_position or message_one_active_reply. Raises ConversationBusy while a
    reply is in flight, ReplyNotRegenerable for any other answer (or none)."""
    now = timezone.now()
    try:
        with transaction.atomic():
            old, question = _answer_locked(conversation=conversation, reply_id=reply_id)
            Message.objects.filter(id=old.id).update(superseded_at=now, updated_at=now)
            reply = Message.objects.create(
                conversation=conversation,
                position=old.position + 1,
                role=Message.Role.ASSISTANT,
                status=Message.Status.QUEUED,
                job_id=job_id or uuid.uuid4(),
            )
            Conversation.objects.filter(id=conversation.id).update(updated_at=now)
    except IntegrityError:
        raise ConversationBusy() from None
    old.superseded_at = now
    return SentMessage(message=question, reply=reply, created=True, superseded=old)


def _answer_locked(
    *, conversation: Conversation, reply_id: uuid.UUID | str
) -> tuple[Message, Message]:
    """The conversation's last message, locked, if it is the answer `reply_id` and has
    finished; and the user message it answered."""
    last = conversation.messages.select_for_update().order_by("-position").first()
    if last is not None and last.status in Message.ACTIVE_STATUSES:
        raise ConversationBusy()
    if last is None or str(last.id) != str(reply_id) or last.role != Message.Role.ASSISTANT:
        known = conversation.messages.filter(id=reply_id).exists()
        raise ReplyNotRegenerable(
            _ONLY_THE_LAST_ANSWER if known else "No such reply in this conversation."
        )
    question = (
        conversation.messages.filter(role=Message.Role.USER, position__lt=last.position)
        .order_by("-position")
        .first()
    )
    if question is None or last.superseded:
        raise ReplyNotRegenerable(_ONLY_THE_LAST_ANSWER)
    return last, question


def conversation_transcript(*, conversation: Conversation) -> QuerySet[Message]:
    """The messages the chat page shows, in order: not the answers regenerated since."""
    return conversation.messages.filter(superseded_at__isnull=True)


def reply_for_job(*, job_id: uuid.UUID | str, conversation_id: uuid.UUID | str) -> Message | None:
    return (
        Message.objects.select_related("conversation")
        .filter(job_id=job_id, conversation_id=conversation_id)
        .first()
    )


def reply_for_user(*, job_id: uuid.UUID | str, user: User) -> Message | None:
    """The reply of a job in one of the user's conversations; None for another user's, as
    for a job that does not exist."""
    return (
        Message.objects.select_related("conversation")
        .filter(job_id=job_id, role=Message.Role.ASSISTANT, conversation__owner=user)
        .first()
    )


@dataclass(frozen=True)
class ReplyStart:
    attempt: int
    model: str
    prompt: list[dict[str, str]]
    exhausted: bool = False  # the job was delivered too many times: the reply is now failed


def reply_start(
    *, reply_id: uuid.UUID | str, default_model: str, entry_id: str = "", max_attempts: int = 0
) -> ReplyStart | None:
    """Begin a delivery attempt of a reply. None when the reply is already finished (a
    redelivered job) or gone. The attempt number fences out writes of older attempts.

    One statement, committed on its own: the claim (a conditional UPDATE, which waits for
    and re-checks a concurrent claim of the same row) and the prompt read with it. It sits
    between the user's message and the model's first token; the ORM's transaction, locking
    SELECT, save and prompt query cost five round trips (docs/performance.md)."""
    if not _on_postgresql():
        claim = portable.reply_claim(
            reply_id=reply_id,
            default_model=default_model,
            entry_id=entry_id,
            max_attempts=max_attempts,
            error=_exhausted_error(max_attempts),
        )
        return ReplyStart(*claim) if claim else None
    params = _reply_start_params(
        reply_id=reply_id, default_model=default_model, entry_id=entry_id, max_attempts=max_attempts
    )
    return _reply_started(statement_rows(_REPLY_START_SQL, params))


async def reply_start_async(
    *, reply_id: uuid.UUID | str, default_model: str, entry_id: str = "", max_attempts: int = 0
) -> ReplyStart | None:
    """reply_start, its statement awaited on the event loop rather than on a database thread
    (grizz/database.py LoopConnections): the worker's call between every job and its
    provider request."""
    if not _on_postgresql():
        return await _reply_start_on_a_thread(
            reply_id=reply_id,
            default_model=default_model,
            entry_id=entry_id,
            max_attempts=max_attempts,
        )
    params = _reply_start_params(
        reply_id=reply_id, default_model=default_model, entry_id=entry_id, max_attempts=max_attempts
    )
    return _reply_started(await statement_rows_async(_REPLY_START_SQL, params))


def _reply_start_params(
    *, reply_id: uuid.UUID | str, default_model: str, entry_id: str, max_attempts: int
) -> dict[str, Any]:
    return {
        "reply_id": uuid.UUID(str(reply_id)),
        "entry_id": entry_id,
        "default_model": default_model,
        # The attempt about to begin is one too many when the last was the limit.
        "attempts_allowed": max_attempts or _NO_LIMIT,
        "exhausted_error": _exhausted_error(max_attempts),
        "now": timezone.now(),
    }


def _exhausted_error(max_attempts: int) -> str:
    return f"The reply could not be generated after {max_attempts} attempts."


def _reply_started(rows: list[tuple[Any, ...]]) -> ReplyStart | None:
    if not rows:
        return None
    attempt, model, status, system_prompt = rows[0][:4]
    if status == Message.Status.FAILED:
        return ReplyStart(attempt=attempt, model=model, prompt=[], exhausted=True)
    prompt = [{"role": "system", "content": system_prompt}] if system_prompt else []
    prompt.extend({"role": role, "content": content} for *_, role, content in rows if role)
    return ReplyStart(attempt=attempt, model=model, prompt=prompt)


_NO_LIMIT = 2**31 - 1  # the largest attempt number the column holds

_LEFT_OUT = _sql_words(portable.STATUSES_LEFT_OUT_OF_PROMPTS)

# The attempt about to begin is one too many: counted from the operator's last retry.
_EXHAUSTED = "reply.attempt - reply.attempts_before_retry >= %(attempts_allowed)s"

# The claimed reply, then the turns before it (none when the attempt is one too many): one
# row per earlier turn, or one row with a NULL role. The prompt read shares the statement's
# snapshot, which holds every earlier turn: the job was queued after they were committed.
_REPLY_START_SQL = f"""
WITH claimed AS (
    UPDATE {Message._meta.db_table} AS reply
    SET attempt = reply.attempt + 1,
        queue_entry_id = %(entry_id)s,
        model = COALESCE(NULLIF(conversation.model, ''), %(default_model)s),
        status = CASE WHEN {_EXHAUSTED} THEN 'failed' ELSE 'streaming' END,
        error = CASE WHEN {_EXHAUSTED} THEN %(exhausted_error)s ELSE reply.error END,
        finished_at = CASE WHEN {_EXHAUSTED} THEN %(now)s ELSE reply.finished_at END,
        updated_at = %(now)s
    FROM {Conversation._meta.db_table} AS conversation
    WHERE reply.id = %(reply_id)s
      AND reply.status IN {_ACTIVE}
      AND conversation.id = reply.conversation_id
    RETURNING reply.attempt, reply.model, reply.status, conversation.system_prompt,
              reply.conversation_id, reply.position
)
SELECT claimed.attempt, claimed.model, claimed.status, claimed.system_prompt,
       earlier.role, earlier.content
FROM claimed
LEFT JOIN {Message._meta.db_table} AS earlier
    ON claimed.status = 'streaming'
   AND earlier.conversation_id = claimed.conversation_id
   AND earlier.position < claimed.position
   AND NOT (earlier.role = 'assistant' AND earlier.status IN {_LEFT_OUT})
   AND earlier.superseded_at IS NULL
ORDER BY earlier.position
"""


def reply_complete(
    *,
    reply_id: uuid.UUID | str,
    attempt: int,
    content: str,
    usage: dict[str, int] | None,
    status: str = Message.Status.COMPLETE,
) -> bool:
    """Save the finished answer. False when this attempt no longer owns the reply."""
    return _reply_finish(
        reply_id=reply_id, attempt=attempt, status=status, content=content, usage=usage
    )


def reply_fail(*, reply_id: uuid.UUID | str, attempt: int, error: str, content: str = "") -> bool:
    return _reply_finish(
        reply_id=reply_id,
        attempt=attempt,
        status=Message.Status.FAILED,
        content=content,
        error=error,
    )


def _reply_finish(
    *,
    reply_id: uuid.UUID | str,
    attempt: int,
    status: str,
    content: str,
    usage: dict[str, int] | None = None,
    error: str | None = None,  # None: as it is
) -> bool:
    """The reply's end, if this attempt still owns it: one written-out statement, as it
    ends every reply (the ORM's update cost the worker about 0.4 ms of CPU to compile)."""
    values = _reply_finish_values(
        reply_id=reply_id, attempt=attempt, status=status, content=content, usage=usage,
        error=error,
    )  # fmt: skip
    if not _on_postgresql():
        return portable.reply_finish(**values)
    return bool(statement_rows(_REPLY_FINISH_SQL, values))


def _reply_finish_values(
    *,
    reply_id: uuid.UUID | str,
    attempt: int,
    status: str,
    content: str,
    usage: dict[str, int] | None,
    error: str | None,
) -> dict[str, Any]:
    usage = usage or {}
    tokens = {f"{kind}_tokens": usage.get(f"{kind}_tokens") for kind in _TOKEN_KINDS}
    values = {"reply_id": uuid.UUID(str(reply_id)), "attempt": attempt, "now": timezone.now()}
    return values | {"status": status, "content": content, "error": error, **tokens}


async def reply_complete_async(
    *,
    reply_id: uuid.UUID | str,
    attempt: int,
    content: str,
    usage: dict[str, int] | None,
    status: str = Message.Status.COMPLETE,
) -> bool:
    """reply_complete, its statement awaited on the event loop rather than on a database
    thread (grizz/database.py LoopConnections): the worker's call at the end of every
    reply."""
    return await _reply_finish_async(
        reply_id=reply_id, attempt=attempt, status=status, content=content, usage=usage
    )


async def reply_fail_async(
    *, reply_id: uuid.UUID | str, attempt: int, error: str, content: str = ""
) -> bool:
    """reply_fail, awaited on the event loop as reply_complete_async is."""
    return await _reply_finish_async(
        reply_id=reply_id,
        attempt=attempt,
        status=Message.Status.FAILED,
        content=content,
        error=error,
    )


async def _reply_finish_async(
    *,
    reply_id: uuid.UUID | str,
    attempt: int,
    status: str,
    content: str,
    usage: dict[str, int] | None = None,
    error: str | None = None,
) -> bool:
    if not _on_postgresql():
        return await _reply_finish_on_a_thread(
            reply_id=reply_id, attempt=attempt, status=status, content=content,
            usage=usage, error=error,
        )  # fmt: skip
    values = _reply_finish_values(
        reply_id=reply_id, attempt=attempt, status=status, content=content, usage=usage,
        error=error,
    )  # fmt: skip
    return bool(await statement_rows_async(_REPLY_FINISH_SQL, values))


_TOKEN_KINDS = ("prompt", "completion", "total")
_REPLY_FINISH_SQL = f"""
UPDATE {Message._meta.db_table}
SET status = %(status)s, content = %(content)s, error = COALESCE(%(error)s, error),
    prompt_tokens = %(prompt_tokens)s, completion_tokens = %(completion_tokens)s,
    total_tokens = %(total_tokens)s, finished_at = %(now)s, updated_at = %(now)s
WHERE id = %(reply_id)s AND attempt = %(attempt)s AND status = 'streaming'
RETURNING 1
"""


def reply_cancel_queued(*, reply_id: uuid.UUID | str) -> bool:
    """Cancel a reply no worker has started: the worker that reads its job later finds it
    finished and calls no provider. False when it has started (or finished) already."""
    now = timezone.now()
    return (
        Message.objects.filter(id=reply_id, status=Message.Status.QUEUED).update(
            status=Message.Status.CANCELLED, finished_at=now, updated_at=now
        )
        == 1
    )


def reply_requeue(*, reply_id: uuid.UUID | str) -> Message:
    """Put a failed reply back to queued, for an operator's retry of its dead-lettered job.
    Its next attempt then claims it through reply_start like any other, and LLM_MAX_ATTEMPTS
    counts afresh. A reply already queued is returned as it is: a retry stopped between this
    and the enqueue may be run again (a job enqueued twice is harmless).

    Raises ConversationBusy when the conversation has another reply in flight (the
    message_one_active_reply constraint refuses a second), ReplyNotRetryable otherwise."""
    now = timezone.now()
    try:
        # A savepoint within a caller's transaction, so that a refusal does not abort it.
        with transaction.atomic():
            Message.objects.filter(
                id=reply_id,
                role=Message.Role.ASSISTANT,
                status=Message.Status.FAILED,
                superseded_at__isnull=True,
            ).update(
                status=Message.Status.QUEUED,
                error="",
                finished_at=None,
                attempts_before_retry=F("attempt"),
                # Recent: the reconciler leaves it alone until the job is on the queue.
                updated_at=now,
            )
    except IntegrityError:
        raise ConversationBusy() from None
    reply = Message.objects.filter(id=reply_id, role=Message.Role.ASSISTANT).first()
    if reply is None:
        raise ReplyNotRetryable("its reply no longer exists")
    if reply.superseded:
        raise ReplyNotRetryable("its reply was regenerated: the user has another answer")
    if reply.status != Message.Status.QUEUED:
        raise ReplyNotRetryable(f"its reply is {reply.status}, not failed")
    return reply


def replies_fail_for_entries(*, entry_ids: list[str], error: str) -> list[Message]:
    """Fail the active replies whose queue entries Redis lost while they were pending."""
    with transaction.atomic():
        replies = list(
            Message.objects.select_for_update().filter(
                queue_entry_id__in=entry_ids, status__in=Message.ACTIVE_STATUSES
            )
        )
        now = timezone.now()
        Message.objects.filter(id__in=[r.id for r in replies]).update(
            status=Message.Status.FAILED, error=error, finished_at=now, updated_at=now
        )
    return replies


@dataclass(frozen=True)
class OrphanedReply:
    """What a job needs to be enqueued again: its reply, and whose slot it holds at what
    priority (the conversation's owner), as the web process would have enqueued it."""

    job_id: str
    reply_id: str
    conversation_id: str
    user_id: str
    priority: str


def replies_orphaned(*, live_job_ids: set[str], idle_seconds: float) -> list[OrphanedReply]:
    """Replies still queued or streaming in PostgreSQL whose job is nowhere in Redis (lost
    with Redis's data, or never enqueued because a web process died after the commit)."""
    quiet_since = timezone.now() - timedelta(seconds=idle_seconds)
    candidates = Message.objects.filter(
        role=Message.Role.ASSISTANT,
        status__in=Message.ACTIVE_STATUSES,
        updated_at__lt=quiet_since,
    ).values_list("id", "job_id", "conversation_id", "conversation__owner_id")
    orphans = [row for row in candidates if str(row[1]) not in live_job_ids]
    owners = User.objects.filter(pk__in={row[3] for row in orphans})
    priorities = {owner.pk: user_priority(user=owner) for owner in owners}
    return [
        OrphanedReply(
            job_id=str(job_id),
            reply_id=str(reply_id),
            conversation_id=str(conversation_id),
            user_id=str(owner_id),
            priority=priorities[owner_id],
        )
        for reply_id, job_id, conversation_id, owner_id in orphans
    ]


async def reply_cancel(*, reply: Message) -> None:
    """Stop a reply. A queued one is cancelled at once, before any provider call; a running
    one is stopped by its worker, wherever it runs, which saves the partial answer."""
    if reply.status not in Message.ACTIVE_STATUSES:
        return
    if await sync_to_async(reply_cancel_queued)(reply_id=reply.id):
        publisher = ReplyPublisher(
            job_id=str(reply.job_id), conversation_id=str(reply.conversation_id), client=redis_get()
        )
        await publisher.done(reply_id=str(reply.id), status="cancelled", content="", usage=None)
        await user_release(user_id=reply.conversation.owner_id, job_id=str(reply.job_id))
        return
    await reply_cancel_request(job_id=str(reply.job_id))


def conversation_delete(*, conversation: Conversation) -> None:
    """Delete a conversation and its messages. Its reply in flight is cancelled first: a
    worker would go on generating it, and holding the owner's in-flight slot, for nobody."""
    reply = conversation.messages.filter(
        role=Message.Role.ASSISTANT, status__in=Message.ACTIVE_STATUSES
    ).first()
    if reply is not None:
        async_to_sync(reply_cancel)(reply=reply)
    conversation.delete()


# The async calls' way on other databases than PostgreSQL (the quick start's SQLite): the
# ORM's steps of chat/portable.py, on a database thread.
_conversation_open_on_a_thread = database_call(conversation_open_for_user)
_message_send_on_a_thread = database_call(message_send)
_message_find_sent_on_a_thread = database_call(message_find_sent)
_reply_start_on_a_thread = database_call(reply_start)
_reply_finish_on_a_thread = database_call(_reply_finish)
