"""Redis failing under the socket: a clear error, the socket stays open, nothing half-saved."""

import pytest
from asgiref.sync import sync_to_async

from chat.models import Message
from chat.services import conversation_create
from llmworker import redis as grizz_redis
from llmworker.redis import jobs_stream_key, redis_get
from tests.support.sockets import ChatSocket, chat_opened, message_queued

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def test_it_answers_unavailable_when_redis_fails_at_admission(alice, settings):
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


async def test_it_takes_a_message_back_when_its_job_cannot_be_queued(alice, settings):
    settings.CHAT_MAX_INFLIGHT_PER_USER = 1
    socket = await chat_opened(alice)
    other_tab = await chat_opened(alice, socket.conversation_id)
    # Admission passes (it only reads the stream's length), the rows are committed, then
    # XADD fails: the stream's last id is the largest there is, so nothing can follow it.
    await redis_get().xadd(jobs_stream_key(), {"f": "v"}, id=LAST_POSSIBLE_ID)
    await redis_get().xdel(jobs_stream_key(), LAST_POSSIBLE_ID)

    await socket.send({"type": "message", "content": "Lost?"})
    error = await socket.receive()
    rows_left = await Message.objects.acount()
    await redis_get().delete(jobs_stream_key())
    again = await message_queued(socket, "Again")

    assert (error["type"], error["code"]) == ("error", "unavailable")
    assert rows_left == 0  # the user message and its reply were taken back
    # Her only in-flight slot was given back: the next message is not rate_limited.
    assert again["type"] == "queued"
    assert [m.content async for m in Message.objects.filter(role="user")] == ["Again"]
    # The other tab never heard of the message taken back: the first it hears of is "Again".
    announced = await other_tab.receive()
    assert (announced["type"], announced["content"]) == ("user_message", "Again")
    await socket.close()
    await other_tab.close()


LAST_POSSIBLE_ID = "18446744073709551615-18446744073709551615"
