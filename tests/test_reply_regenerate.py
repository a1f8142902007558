"""reply_regenerate: a new reply in place of the last answer, which is kept, marked
superseded, and left out of every later prompt."""

import pytest
from django.contrib.auth.models import User

from chat.models import Conversation, Message
from chat.services import (
    ConversationBusy,
    ReplyNotRegenerable,
    ReplyNotRetryable,
    conversation_create,
    conversation_transcript,
    message_retract,
    message_send,
    reply_regenerate,
    reply_requeue,
    reply_start,
)
from tests.support.transcripts import answered

pytestmark = pytest.mark.django_db


ONLY_THE_LAST = "Only the last answer can be regenerated."


def _refusal(conversation: Conversation, reply_id: object) -> str:
    with pytest.raises(ReplyNotRegenerable) as refused:
        reply_regenerate(conversation=conversation, reply_id=str(reply_id))
    return str(refused.value)


def _rows(conversation: Conversation) -> list[tuple[int, str, str, str, bool]]:
    messages = Message.objects.filter(conversation=conversation).order_by("position")
    return [(m.position, m.role, m.content, m.status, m.superseded) for m in messages]


def test_it_queues_a_new_reply_to_the_same_message_and_keeps_the_old_one_marked(alice):
    conversation = conversation_create(owner=alice)
    old = answered(conversation, "What do bears eat?", "Mostly berries.")
    before = Conversation.objects.get(id=conversation.id).updated_at

    sent = reply_regenerate(conversation=conversation, reply_id=old.id)

    assert (sent.message.content, sent.reply.status, sent.created) == (
        "What do bears eat?",
        "queued",
        True,
    )
    assert sent.superseded is not None and sent.superseded.id == old.id
    assert _rows(conversation) == [
        (1, "user", "What do bears eat?", "complete", False),
        (2, "assistant", "Mostly berries.", "complete", True),
        (3, "assistant", "", "queued", False),
    ]
    assert Message.objects.get(id=sent.reply.id).job_id == sent.reply.job_id
    assert Conversation.objects.get(id=conversation.id).updated_at > before


@pytest.mark.parametrize("status", ["cancelled", "failed"])
def test_it_regenerates_a_stopped_or_failed_answer(alice, status):
    conversation = conversation_create(owner=alice)
    old = answered(conversation, "Count to ten", "One, two", status="complete")
    Message.objects.filter(id=old.id).update(status=status)

    sent = reply_regenerate(conversation=conversation, reply_id=old.id)

    assert sent.reply.position == 3
    assert Message.objects.get(id=old.id).superseded


def test_it_regenerates_a_regenerated_answer_again(alice):
    conversation = conversation_create(owner=alice)
    first = answered(conversation, "Hello", "Hi.")
    second = reply_regenerate(conversation=conversation, reply_id=first.id).reply
    Message.objects.filter(id=second.id).update(status="complete", content="Hello there.")

    third = reply_regenerate(conversation=conversation, reply_id=second.id)

    assert third.message.content == "Hello"
    assert [row[4] for row in _rows(conversation)] == [False, True, True, False]


def test_it_refuses_an_answer_that_is_not_the_last(alice):
    conversation = conversation_create(owner=alice)
    first = answered(conversation, "One?", "One.")
    answered(conversation, "Two?", "Two.")

    assert _refusal(conversation, first.id) == ONLY_THE_LAST

    assert not any(row[4] for row in _rows(conversation))
    assert len(_rows(conversation)) == 4


def test_it_refuses_a_user_message(alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "One?", "One.")
    question = Message.objects.get(conversation=conversation, role="user")

    assert _refusal(conversation, question.id) == ONLY_THE_LAST


def test_it_refuses_a_superseded_answer(alice):
    conversation = conversation_create(owner=alice)
    old = answered(conversation, "Hello", "Hi.")
    new = reply_regenerate(conversation=conversation, reply_id=old.id).reply
    Message.objects.filter(id=new.id).update(status="complete")

    assert _refusal(conversation, old.id) == ONLY_THE_LAST

    assert len(_rows(conversation)) == 3


def test_it_answers_busy_while_a_reply_is_in_flight(alice):
    conversation = conversation_create(owner=alice)
    old = answered(conversation, "One?", "One.")
    in_flight = message_send(conversation=conversation, content="Two?").reply

    for reply_id in (old.id, in_flight.id):
        with pytest.raises(ConversationBusy):
            reply_regenerate(conversation=conversation, reply_id=reply_id)

    assert not any(row[4] for row in _rows(conversation))


def test_it_finds_no_reply_of_another_users_conversation(alice, bob: User):
    conversation = conversation_create(owner=alice)
    answered(conversation, "One?", "One.")
    bobs = answered(conversation_create(owner=bob), "Bob's?", "Bob's.")

    assert _refusal(conversation, bobs.id) == "No such reply in this conversation."

    assert not Message.objects.get(id=bobs.id).superseded


def test_a_retracted_regenerate_leaves_the_old_answer_the_last_again(alice):
    conversation = conversation_create(owner=alice)
    old = answered(conversation, "Hello", "Hi.")

    message_retract(sent=reply_regenerate(conversation=conversation, reply_id=old.id))

    assert _rows(conversation) == [
        (1, "user", "Hello", "complete", False),
        (2, "assistant", "Hi.", "complete", False),
    ]


def test_an_operator_cannot_retry_a_failed_answer_regenerated_since(alice):
    conversation = conversation_create(owner=alice)
    old = answered(conversation, "Hello", "")
    Message.objects.filter(id=old.id).update(status="failed", error="refused")
    new = reply_regenerate(conversation=conversation, reply_id=old.id).reply
    Message.objects.filter(id=new.id).update(status="complete", content="Hi.")

    with pytest.raises(ReplyNotRetryable):
        reply_requeue(reply_id=old.id)

    assert Message.objects.get(id=old.id).status == "failed"


def test_the_chat_page_transcript_leaves_the_superseded_answer_out(alice):
    conversation = conversation_create(owner=alice)
    old = answered(conversation, "Hello", "Hi.")
    new = reply_regenerate(conversation=conversation, reply_id=old.id).reply

    shown = conversation_transcript(conversation=conversation)

    question = Message.objects.get(conversation=conversation, role="user")
    assert [m.id for m in shown] == [question.id, new.id]


@pytest.mark.usefixtures("both_database_paths")
def test_the_prompt_of_the_new_reply_and_of_later_ones_leaves_the_old_answer_out(alice):
    conversation = conversation_create(owner=alice, system_prompt="Be brief.")
    old = answered(conversation, "What do bears eat?", "Mostly berries.")
    new = reply_regenerate(conversation=conversation, reply_id=old.id).reply

    start = reply_start(reply_id=new.id, default_model="m")
    assert start is not None
    assert start.prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What do bears eat?"},
    ]
    Message.objects.filter(id=new.id).update(status="complete", content="Fish, in autumn.")
    later = message_send(conversation=conversation, content="And in winter?").reply
    later_start = reply_start(reply_id=later.id, default_model="m")
    assert later_start is not None
    assert [m["content"] for m in later_start.prompt] == [
        "Be brief.",
        "What do bears eat?",
        "Fish, in autumn.",
        "And in winter?",
    ]
