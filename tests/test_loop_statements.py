"""The turn's calls that web and worker await on the event loop (chat/services.py's `_async`
twins, on grizz/database.py's LoopConnections): they save and refuse what the calls on a
database thread do, on PostgreSQL's statements and on the ORM's steps of other databases."""

import uuid

import pytest
from asgiref.sync import sync_to_async

from chat.models import Message
from chat.services import (
    ConversationBusy,
    conversation_create,
    message_send_async,
    reply_complete_async,
    reply_fail_async,
    reply_start_async,
)
from tests.support.transcripts import answered

# Each test on both paths (tests/conftest.py): the statement and the ORM steps.
pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("both_database_paths"),
]


async def _messages(conversation_id: uuid.UUID) -> list[tuple[int, str, str, str]]:
    rows = Message.objects.filter(conversation_id=conversation_id).order_by("position")
    return [(m.position, m.role, m.status, m.content) async for m in rows]


async def test_it_saves_a_message_its_resend_and_refuses_a_second_one(alice):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    await sync_to_async(answered)(conversation, "Hello", "Hi.")

    sent = await message_send_async(conversation=conversation, content="Bears?", client_msg_id="c1")
    resent = await message_send_async(
        conversation=conversation, content="Bears?", client_msg_id="c1"
    )
    with pytest.raises(ConversationBusy):
        await message_send_async(conversation=conversation, content="Wolves?")

    assert (sent.created, resent.created) == (True, False)
    assert (resent.message.id, resent.reply.id) == (sent.message.id, sent.reply.id)
    assert (sent.message.position, sent.reply.position) == (3, 4)
    assert await _messages(conversation.id) == [
        (1, "user", "complete", "Hello"),
        (2, "assistant", "complete", "Hi."),
        (3, "user", "complete", "Bears?"),
        (4, "assistant", "queued", ""),
    ]


async def test_it_starts_completes_and_fences_a_reply(alice):
    conversation = await sync_to_async(conversation_create)(owner=alice, system_prompt="Be brief.")
    sent = await message_send_async(conversation=conversation, content="Bears?")

    first = await reply_start_async(reply_id=sent.reply.id, default_model="bear-1")
    second = await reply_start_async(reply_id=sent.reply.id, default_model="bear-1")
    assert first is not None and second is not None
    stale = await reply_fail_async(reply_id=sent.reply.id, attempt=first.attempt, error="Late")
    done = await reply_complete_async(
        reply_id=sent.reply.id, attempt=second.attempt, content="Berries.", usage=None
    )
    again = await reply_start_async(reply_id=sent.reply.id, default_model="bear-1")

    assert first.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Bears?"},
    ]
    assert (first.attempt, second.attempt, first.model) == (1, 2, "bear-1")
    assert (stale, done, again) == (False, True, None)
    assert (await _messages(conversation.id))[-1] == (2, "assistant", "complete", "Berries.")
