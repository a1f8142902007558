"""The hot path's written-out statements (grizz/database.py statement_rows): prepared once
per connection by default, plain server-bound statements when DATABASE_PREPARED_STATEMENTS
is off. What each returns is tested on every path in the services' own tests."""

import pytest
from django.db import connection

from chat.services import (
    conversation_create,
    conversation_open_for_user,
    message_send,
    reply_start,
)

pytestmark = pytest.mark.django_db


def _prepared_statements() -> list[str]:
    """The statements this connection holds prepared, by their first words."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements ORDER BY prepare_time")
        return [" ".join(text.replace('"', "").split()[:2]) for (text,) in cursor.fetchall()]


def _a_turn_started(alice) -> None:
    conversation = conversation_create(owner=alice)
    conversation_open_for_user(user_id=alice.id, conversation_id=conversation.id)
    sent = message_send(conversation=conversation, content="Hello")
    assert reply_start(reply_id=sent.reply.id, default_model="m") is not None


def test_it_prepares_each_statement_once_per_connection(alice, bob):
    _a_turn_started(alice)
    _a_turn_started(bob)

    assert _prepared_statements() == ["SELECT account.id,", "WITH touched", "WITH claimed"]


def test_it_prepares_nothing_when_told_not_to(alice, settings):
    settings.DATABASE_PREPARED_STATEMENTS = False
    _a_turn_started(alice)

    assert _prepared_statements() == []
