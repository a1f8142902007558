"""reply_start: the claim of a delivery attempt and the prompt it reads, one statement; and
the end of the attempt (reply_complete, reply_fail), fenced by its number."""

import pytest

from chat.models import Message
from chat.services import (
    conversation_create,
    message_send,
    reply_cancel_queued,
    reply_complete,
    reply_fail,
    reply_start,
)
from tests.support.transcripts import answered

# Each test on both paths (tests/conftest.py): the statement and the ORM steps.
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("both_database_paths")]


def test_it_reads_the_system_prompt_and_the_earlier_turns_in_order(alice):
    conversation = conversation_create(owner=alice, system_prompt="You are a bear.")
    answered(conversation, "What do bears eat?", "Mostly berries.")
    sent = message_send(conversation=conversation, content="And in winter?")
    start = reply_start(reply_id=sent.reply.id, default_model="test-model")
    assert start is not None
    assert start.prompt == [
        {"role": "system", "content": "You are a bear."},
        {"role": "user", "content": "What do bears eat?"},
        {"role": "assistant", "content": "Mostly berries."},
        {"role": "user", "content": "And in winter?"},
    ]
    assert (start.attempt, start.model, start.exhausted) == (1, "test-model", False)


def test_it_leaves_failed_replies_out_and_keeps_what_a_cancelled_one_said(alice):
    conversation = conversation_create(owner=alice)
    failed = message_send(conversation=conversation, content="First")
    attempt = reply_start(reply_id=failed.reply.id, default_model="m")
    assert attempt is not None
    reply_fail(reply_id=failed.reply.id, attempt=attempt.attempt, error="refused")
    answered(conversation, "Second", "Half an ans", status="cancelled")
    sent = message_send(conversation=conversation, content="Third")
    start = reply_start(reply_id=sent.reply.id, default_model="m")
    assert start is not None
    assert [m["content"] for m in start.prompt] == ["First", "Second", "Half an ans", "Third"]


def test_it_prefers_the_conversations_model_to_the_default(alice):
    conversation = conversation_create(owner=alice, model="bear-1")
    sent = message_send(conversation=conversation, content="Hello")
    start = reply_start(reply_id=sent.reply.id, default_model="test-model")
    assert start is not None
    assert start.model == "bear-1"
    reply = Message.objects.get(id=sent.reply.id)
    assert (reply.status, reply.model, reply.attempt) == ("streaming", "bear-1", 1)


def test_it_counts_each_delivery_as_a_new_attempt(alice):
    conversation = conversation_create(owner=alice)
    sent = message_send(conversation=conversation, content="Hello")
    first = reply_start(reply_id=sent.reply.id, default_model="m", entry_id="1-0")
    second = reply_start(reply_id=sent.reply.id, default_model="m", entry_id="2-0")
    assert first is not None and second is not None
    assert (first.attempt, second.attempt) == (1, 2)
    assert Message.objects.get(id=sent.reply.id).queue_entry_id == "2-0"
    # The first attempt is fenced out: its answer is not saved.
    assert not reply_complete(reply_id=sent.reply.id, attempt=1, content="old", usage=None)
    assert reply_complete(reply_id=sent.reply.id, attempt=2, content="new", usage=None)
    assert Message.objects.get(id=sent.reply.id).content == "new"


def test_it_fails_the_reply_on_the_attempt_past_the_limit(alice):
    conversation = conversation_create(owner=alice)
    sent = message_send(conversation=conversation, content="Hello")
    for expected in (1, 2):
        start = reply_start(reply_id=sent.reply.id, default_model="m", max_attempts=2)
        assert start is not None
        assert (start.attempt, start.exhausted) == (expected, False)
    start = reply_start(reply_id=sent.reply.id, default_model="m", max_attempts=2)
    assert start is not None
    assert (start.attempt, start.exhausted, start.prompt) == (3, True, [])
    reply = Message.objects.get(id=sent.reply.id)
    assert reply.status == "failed"
    assert reply.error == "The reply could not be generated after 2 attempts."
    assert reply.finished_at is not None


def test_it_finds_nothing_to_start_for_a_finished_or_cancelled_reply(alice):
    conversation = conversation_create(owner=alice)
    done = message_send(conversation=conversation, content="Hello")
    answered_start = reply_start(reply_id=done.reply.id, default_model="m")
    assert answered_start is not None
    reply_complete(reply_id=done.reply.id, attempt=1, content="Hi", usage=None)
    assert reply_start(reply_id=done.reply.id, default_model="m") is None
    withdrawn = message_send(conversation=conversation, content="Again")
    assert reply_cancel_queued(reply_id=withdrawn.reply.id)
    assert reply_start(reply_id=withdrawn.reply.id, default_model="m") is None
    assert Message.objects.get(id=withdrawn.reply.id).attempt == 0


def test_it_saves_the_answer_and_its_usage_for_the_current_attempt_only(alice):
    conversation = conversation_create(owner=alice)
    sent = message_send(conversation=conversation, content="Hello")
    first = reply_start(reply_id=sent.reply.id, default_model="m")
    second = reply_start(reply_id=sent.reply.id, default_model="m")  # taken over
    assert first is not None and second is not None
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}

    assert not reply_complete(
        reply_id=sent.reply.id, attempt=first.attempt, content="stale", usage=usage
    )
    assert reply_complete(reply_id=sent.reply.id, attempt=second.attempt, content="Hi", usage=usage)
    assert not reply_fail(reply_id=sent.reply.id, attempt=second.attempt, error="too late")

    reply = Message.objects.get(id=sent.reply.id)
    assert (reply.status, reply.content, reply.error, reply.usage) == ("complete", "Hi", "", usage)
    assert reply.finished_at is not None and reply.updated_at == reply.finished_at


def test_it_saves_a_failure_with_its_error_and_the_part_said(alice):
    conversation = conversation_create(owner=alice)
    sent = message_send(conversation=conversation, content="Hello")
    start = reply_start(reply_id=sent.reply.id, default_model="m")
    assert start is not None

    assert reply_fail(
        reply_id=sent.reply.id, attempt=start.attempt, error="The model failed.", content="Hal"
    )

    reply = Message.objects.get(id=sent.reply.id)
    assert (reply.status, reply.content, reply.error, reply.usage) == (
        "failed", "Hal", "The model failed.", None,
    )  # fmt: skip
    assert reply.finished_at is not None
