"""The written-out statements of chat/services.py, through the ORM instead, for databases
other than PostgreSQL: the quick start's SQLite file (`make run` without DATABASE_URL).

Same results, more round trips and more CPU per turn: services.py calls these only when the
connection is not PostgreSQL's, which tests, CI and production use.
"""

import uuid
from datetime import datetime

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Max, OuterRef, Subquery
from django.utils import timezone

from chat.models import Conversation, Message

# A failed reply has no text worth sending back; a cancelled one keeps the part the user saw.
# (Nor does an answer a regenerate replaced, whatever its status: superseded_at.)
STATUSES_LEFT_OUT_OF_PROMPTS = (Message.Status.FAILED, Message.Status.QUEUED)


def user_with_conversation(
    *, user_id: int, conversation_id: uuid.UUID | str | None
) -> tuple[User, Conversation | None, str | None] | None:
    """(user, their conversation or None, its active job); None when there is no such user."""
    user = User.objects.filter(pk=user_id).first()
    if user is None:
        return None
    found = conversation_id and _conversation_with_active_job(
        conversation_id=conversation_id, owner_id=user.id
    )
    return (user, *found) if found else (user, None, None)


def _conversation_with_active_job(
    *, conversation_id: uuid.UUID | str, owner_id: int
) -> tuple[Conversation, str | None] | None:
    active = Message.objects.filter(
        conversation=OuterRef("pk"),
        role=Message.Role.ASSISTANT,
        status__in=Message.ACTIVE_STATUSES,
    ).values("job_id")[:1]
    conversation = (
        Conversation.objects.filter(id=conversation_id, owner_id=owner_id)
        .annotate(active_job_id=Subquery(active))
        .first()
    )
    if conversation is None:
        return None
    job_id = conversation.active_job_id  # the annotation
    return conversation, str(job_id) if job_id else None


def messages_insert(*, conversation: Conversation, message: Message, reply: Message) -> None:
    """A turn's two rows after the conversation's last: the update takes the conversation's
    row lock (SQLite: the database's write lock), so positions are gap-free."""
    now = timezone.now()
    with transaction.atomic():
        Conversation.objects.filter(id=conversation.id).update(updated_at=now)
        last = conversation.messages.aggregate(last=Max("position"))["last"] or 0
        message.position, reply.position = last + 1, last + 2
        Message.objects.bulk_create([message, reply])


def reply_claim(
    *, reply_id: uuid.UUID | str, default_model: str, entry_id: str, max_attempts: int, error: str
) -> tuple[int, str, list[dict[str, str]], bool] | None:
    """(attempt, model, prompt, exhausted) of a new delivery attempt; None when the reply is
    finished or gone."""
    with transaction.atomic():
        reply = (
            Message.objects.select_for_update()
            .select_related("conversation")
            .filter(id=reply_id, status__in=Message.ACTIVE_STATUSES)
            .first()
        )
        if reply is None:
            return None
        reply.attempt += 1
        reply.queue_entry_id = entry_id
        reply.model = reply.conversation.model or default_model
        attempts = reply.attempt - reply.attempts_before_retry
        exhausted = bool(max_attempts) and attempts > max_attempts
        if exhausted:
            reply.status, reply.error = Message.Status.FAILED, error
            reply.finished_at = timezone.now()
        else:
            reply.status = Message.Status.STREAMING
        reply.save()
    return reply.attempt, reply.model, [] if exhausted else _prompt(reply=reply), exhausted


def _prompt(*, reply: Message) -> list[dict[str, str]]:
    prompt = []
    if reply.conversation.system_prompt:
        prompt.append({"role": "system", "content": reply.conversation.system_prompt})
    earlier = (
        Message.objects.filter(conversation_id=reply.conversation_id, position__lt=reply.position)
        .exclude(role=Message.Role.ASSISTANT, status__in=STATUSES_LEFT_OUT_OF_PROMPTS)
        .filter(superseded_at__isnull=True)
        .order_by("position")
        .values_list("role", "content")
    )
    prompt.extend({"role": role, "content": content} for role, content in earlier)
    return prompt


def reply_finish(
    *,
    reply_id: uuid.UUID | str,
    attempt: int,
    now: datetime,
    error: str | None,
    **values: object,
) -> bool:
    """The reply's end, if the attempt still owns it (error None: as it is)."""
    if error is not None:
        values["error"] = error
    updated = Message.objects.filter(
        id=reply_id, attempt=attempt, status=Message.Status.STREAMING
    ).update(finished_at=now, updated_at=now, **values)
    return updated == 1
