"""conversation_open_for_user: the user and the conversation a socket opens with, in one
statement."""

import uuid

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group, User

from chat.models import Conversation
from chat.services import (
    OpenedConversation,
    conversation_create,
    conversation_open_for_user,
    conversation_open_for_user_async,
    message_send,
)
from tests.support.transcripts import answered

# Each test on both paths (tests/conftest.py): the statement and the ORM steps.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("both_database_paths")]


def test_it_opens_the_users_conversation_as_the_orm_reads_it(alice):
    created = conversation_create(owner=alice, title="Bears", model="bear-1", system_prompt="Hi")
    opened = conversation_open_for_user(user_id=alice.id, conversation_id=created.id)
    assert opened is not None and opened.conversation is not None
    saved = Conversation.objects.get(id=created.id)
    fields = ("id", "owner_id", "title", "model", "system_prompt", "created_at", "updated_at")
    assert [getattr(opened.conversation, f) for f in fields] == [getattr(saved, f) for f in fields]
    assert opened.active_job_id is None


def test_it_reads_the_user_as_the_orm_does(alice):
    created = conversation_create(owner=alice)
    opened = conversation_open_for_user(user_id=alice.id, conversation_id=created.id)
    assert opened is not None
    fields = ("id", "username", "password", "is_active", "is_staff", "date_joined")
    assert [getattr(opened.user, f) for f in fields] == [getattr(alice, f) for f in fields]
    assert opened.user.is_authenticated


def test_it_names_the_reply_in_flight_and_only_that_one(alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "Done?", "Yes.")
    sent = message_send(conversation=conversation, content="And now?")
    opened = conversation_open_for_user(user_id=alice.id, conversation_id=str(conversation.id))
    assert opened is not None
    assert opened.active_job_id == str(sent.reply.job_id)


def test_it_finds_the_user_but_not_another_users_or_a_missing_conversation(alice, bob):
    conversation = conversation_create(owner=alice)
    others = conversation_open_for_user(user_id=bob.id, conversation_id=conversation.id)
    missing = conversation_open_for_user(user_id=alice.id, conversation_id=uuid.uuid4())
    no_id = conversation_open_for_user(user_id=alice.id, conversation_id=None)
    found = [o and (o.user.id, o.conversation, o.active_job_id) for o in (others, missing, no_id)]
    assert found == [
        (bob.id, None, None),
        (alice.id, None, None),
        (alice.id, None, None),
    ]


def test_it_finds_nothing_for_a_user_that_does_not_exist(alice):
    conversation = conversation_create(owner=alice)
    gone = alice.id + 1000
    assert conversation_open_for_user(user_id=gone, conversation_id=conversation.id) is None


def test_it_reads_the_priority_of_the_users_replies(alice, bob, settings):
    settings.CHAT_PRIORITY_GROUP = "priority"
    bob.groups.add(Group.objects.create(name="priority"))
    carol = User.objects.create_user("carol", password="carol-password-1")
    carol.groups.add(Group.objects.create(name="other"))
    root = User.objects.create_user("root", password="root-password-1", is_staff=True)

    priorities = {
        user.username: opened.priority
        for user in (alice, bob, carol, root)
        if (opened := conversation_open_for_user(user_id=user.id, conversation_id=None))
    }

    assert priorities == {"alice": "normal", "bob": "high", "carol": "normal", "root": "high"}


def _seen(opened: OpenedConversation | None) -> tuple[object, ...] | None:
    if opened is None:
        return None
    user_fields = ("id", "username", "password", "is_active", "is_staff", "date_joined")
    conversation = opened.conversation
    return (
        tuple(getattr(opened.user, f) for f in user_fields),
        conversation and (conversation.id, conversation.title, conversation.updated_at),
        opened.active_job_id,
        opened.priority,
    )


async def test_it_opens_on_the_event_loop_what_it_opens_on_a_thread(alice, bob):
    # The socket's call (chat/consumers.py): its statement awaited on the event loop, on a
    # connection of its own (grizz/database.py LoopConnections).
    conversation = await sync_to_async(conversation_create)(owner=alice, title="Bears")
    await sync_to_async(message_send)(conversation=conversation, content="In flight")
    asked = [
        (alice.id, conversation.id),
        (bob.id, conversation.id),
        (alice.id, uuid.uuid4()),
        (alice.id, None),
        (alice.id + 1000, conversation.id),
    ]

    on_the_loop = [
        _seen(await conversation_open_for_user_async(user_id=user_id, conversation_id=c_id))
        for user_id, c_id in asked
    ]
    open_on_a_thread = sync_to_async(conversation_open_for_user)
    on_a_thread = [
        _seen(await open_on_a_thread(user_id=user_id, conversation_id=c_id))
        for user_id, c_id in asked
    ]

    assert on_the_loop == on_a_thread
    in_flight = [seen and seen[2] is not None for seen in on_the_loop]
    assert in_flight == [True, False, False, False, None]
