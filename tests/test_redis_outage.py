"""Redis failing under a web process: refusals within seconds, the socket stays open, and
sending works again once Redis is back, with nothing restarted. A private redis-server plays
the part (conftest's private_redis), so that stopping it disturbs nobody else's Redis."""

import signal
import time

import pytest
from asgiref.sync import sync_to_async

from chat.models import Message
from chat.services import conversation_create
from chat.turns import REDIS_CALL_TIMEOUT
from tests.support.sockets import ChatSocket

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def test_a_hung_redis_is_answered_unavailable_within_seconds(alice, private_redis):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    chat = await ChatSocket.open(conversation.id, user=alice)
    await chat.receive()

    private_redis.send_signal(signal.SIGSTOP)  # Redis hangs: no error, just silence
    started = time.monotonic()
    await chat.send({"type": "message", "content": "Anyone there?"})
    error = await chat.receive(timeout=15)
    waited = time.monotonic() - started
    private_redis.send_signal(signal.SIGCONT)

    assert (error["type"], error["code"]) == ("error", "unavailable")
    # The consumer's own bound on a Redis call, plus scheduling on a loaded machine; without
    # it the client would wait for the connection's socket timeout (10 s) or forever.
    assert waited < REDIS_CALL_TIMEOUT + 3
    assert await Message.objects.acount() == 0
    await chat.send({"type": "message", "content": "And now?"})
    assert (await chat.receive(timeout=15))["type"] == "queued"
    await chat.close()
