"""Redis failing under the socket: a clear error, the socket stays open, nothing half-saved."""

import pytest
from asgiref.sync import sync_to_async

from chat.models import Message
from chat.services import conversation_create
from llmworker import redis as grizz_redis
from tests.support.sockets import ChatSocket

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def test_it_answers_unavailable_when_the_job_cannot_be_queued(alice, settings):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()  # hello
    # Redis becomes unreachable after the socket was set up: nothing listens on port 1.
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    grizz_redis._clients.clear()

    await socket.send({"type": "message", "content": "hello"})
    error = await socket.receive()

    assert (error["type"], error["code"]) == ("error", "unavailable")
    assert await Message.objects.acount() == 0
    await socket.send({"type": "ping"})
    assert await socket.receive() == {"type": "pong"}
    await socket.close()
