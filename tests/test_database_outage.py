"""PostgreSQL out of reach under a web process: messages are refused with `unavailable`,
the socket stays open, and sending works again once the database is back."""

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from chat.models import Message
from chat.services import conversation_create
from tests.support.processes import free_port
from tests.support.sockets import ChatSocket

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def _point_database_at(port: int) -> None:
    # The consumer's queries run on asgiref's thread: its connection must be closed there.
    await sync_to_async(connections.close_all)()
    connections["default"].settings_dict["PORT"] = port


async def test_it_answers_unavailable_while_the_database_is_unreachable(alice):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    chat = await ChatSocket.open(conversation.id, user=alice)
    await chat.receive()
    real_port = connections["default"].settings_dict["PORT"]

    await _point_database_at(free_port())
    try:
        await chat.send({"type": "message", "content": "Hello?"})
        refused = await chat.receive()
        await chat.send({"type": "ping"})
        pong = await chat.receive()
    finally:
        await _point_database_at(real_port)
    await chat.send({"type": "message", "content": "Hello again"})
    accepted = await chat.receive()

    assert (refused["type"], refused["code"]) == ("error", "unavailable")
    assert pong == {"type": "pong"}
    assert accepted["type"] == "queued"
    assert [m.content async for m in Message.objects.filter(role="user")] == ["Hello again"]
    await chat.close()
