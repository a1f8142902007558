"""Replies that PostgreSQL has as queued and Redis has no job for: what the reconciler finds
and enqueues again."""

import uuid

from asgiref.sync import sync_to_async
from django.contrib.auth.models import User

from chat.models import Conversation
from chat.services import SentMessage, message_send
from llmworker.admission import job_admit


async def sent_by_a_web_process_that_died(user: User, conversation: Conversation) -> SentMessage:
    """What a web process leaves when it dies between the commit and the XADD: the user's
    in-flight slot taken by admission, the rows committed, no job in Redis."""
    job_id = str(uuid.uuid4())
    assert (await job_admit(user_id=user.id, job_id=job_id)).refusal is None
    return await sync_to_async(message_send)(
        conversation=conversation, content="Lost", job_id=job_id
    )
