"""conversation_open_for_user: what a socket opens with, in one statement."""

import uuid

import pytest

from chat.models import Conversation
from chat.services import conversation_create, conversation_open_for_user, message_send
from tests.support.transcripts import answered

# Each test on both paths (tests/conftest.py): the statement and the ORM steps.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("both_database_paths")]


def test_it_opens_the_users_conversation_as_the_orm_reads_it(alice):
    created = conversation_create(owner=alice, title="Bears", model="bear-1", system_prompt="Hi")
    opened = conversation_open_for_user(conversation_id=created.id, user=alice)
    assert opened is not None
    saved = Conversation.objects.get(id=created.id)
    fields = ("id", "owner_id", "title", "model", "system_prompt", "created_at", "updated_at")
    assert [getattr(opened.conversation, f) for f in fields] == [getattr(saved, f) for f in fields]
    assert opened.active_job_id is None


def test_it_names_the_reply_in_flight_and_only_that_one(alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "Done?", "Yes.")
    sent = message_send(conversation=conversation, content="And now?")
    opened = conversation_open_for_user(conversation_id=str(conversation.id), user=alice)
    assert opened is not None
    assert opened.active_job_id == str(sent.reply.job_id)


def test_it_finds_nothing_of_another_users_or_a_missing_conversation(alice, bob):
    conversation = conversation_create(owner=alice)
    assert conversation_open_for_user(conversation_id=conversation.id, user=bob) is None
    assert conversation_open_for_user(conversation_id=uuid.uuid4(), user=alice) is None
