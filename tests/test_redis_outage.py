"""Redis failing under a web process: refusals within seconds, the socket stays open, and
sending works again once Redis is back, with nothing restarted. A private redis-server plays
the part, so that stopping it disturbs nobody else's Redis."""

import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from asgiref.sync import sync_to_async

from chat.consumers import REDIS_CALL_TIMEOUT
from chat.models import Message
from chat.services import conversation_create
from llmworker import redis as grizz_redis
from llmworker import replies
from tests.support.processes import free_port
from tests.support.sockets import ChatSocket

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def private_redis(settings) -> Iterator[subprocess.Popen[bytes]]:
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:  # a new server needs a moment before it listens; nothing to wait on but it
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
    grizz_redis._clients.clear()
    replies._hubs.clear()
    yield server
    server.send_signal(signal.SIGCONT)
    server.terminate()
    server.wait(timeout=10)
    grizz_redis._clients.clear()
    replies._hubs.clear()


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
