"""message_send: a turn's two rows in one statement, a resend, a busy conversation."""

import pytest
from django.db import transaction

from chat.models import Conversation, Message
from chat.services import ConversationBusy, conversation_create, message_send
from tests.support.transcripts import answered

# Each test on both paths (tests/conftest.py): the statement and the ORM steps.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("both_database_paths")]


def test_it_saves_the_message_and_its_queued_reply_after_the_last_turn(alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "What do bears eat?", "Mostly berries.")
    before = Conversation.objects.get(id=conversation.id).updated_at
    sent = message_send(conversation=conversation, content="And in winter?")
    assert sent.created
    assert (sent.message.position, sent.reply.position) == (3, 4)
    rows = Message.objects.filter(conversation=conversation).order_by("position")
    assert [(m.position, m.role, m.content, m.status) for m in rows] == [
        (1, "user", "What do bears eat?", "complete"),
        (2, "assistant", "Mostly berries.", "complete"),
        (3, "user", "And in winter?", "complete"),
        (4, "assistant", "", "queued"),
    ]
    saved = Message.objects.get(id=sent.reply.id)
    assert (saved.job_id, saved.created_at, saved.attempt) == (
        sent.reply.job_id,
        sent.reply.created_at,
        0,
    )
    assert Conversation.objects.get(id=conversation.id).updated_at > before


def test_it_returns_the_first_send_for_a_resend(alice):
    conversation = conversation_create(owner=alice)
    first = message_send(conversation=conversation, content="Hello", client_msg_id="m-1")
    again = message_send(conversation=conversation, content="Hello", client_msg_id="m-1")
    assert not again.created
    assert (again.message.id, again.reply.id, again.reply.job_id) == (
        first.message.id,
        first.reply.id,
        first.reply.job_id,
    )
    assert Message.objects.filter(conversation=conversation).count() == 2


def test_it_refuses_a_second_message_while_a_reply_is_queued(alice):
    conversation = conversation_create(owner=alice)
    message_send(conversation=conversation, content="Hello")
    with pytest.raises(ConversationBusy):
        message_send(conversation=conversation, content="Hello again", client_msg_id="m-2")
    assert Message.objects.filter(conversation=conversation).count() == 2


def test_a_refused_message_leaves_the_callers_transaction_usable(alice):
    conversation = conversation_create(owner=alice)
    with transaction.atomic():
        message_send(conversation=conversation, content="Hello")
        with pytest.raises(ConversationBusy):
            message_send(conversation=conversation, content="Hello again")
        assert Message.objects.filter(conversation=conversation).count() == 2


def test_a_saved_message_updates_on_save(alice):
    conversation = conversation_create(owner=alice)
    sent = message_send(conversation=conversation, content="Hello")
    sent.reply.content = "Hi"
    sent.reply.save()  # an INSERT, refused, if the row were not known as saved
    assert Message.objects.get(id=sent.reply.id).content == "Hi"
    assert Message.objects.filter(conversation=conversation).count() == 2
