"""PostgreSQL out of reach under a web process: messages are refused with `unavailable`,
the socket stays open, and sending works again once the database is back."""

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections

from chat.models import Message
from chat.services import conversation_create
from grizz import database
from tests.support.processes import free_port
from tests.support.sockets import ChatSocket

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


def _connections_end(*, sparing: int) -> None:
    # As a restart of PostgreSQL would: the connections the consumer's database threads and
    # its event loop hold (grizz/database.py) break, and their next use reconnects. The
    # test's own (the main thread's, which pytest-django flushes the database with) is
    # spared.
    with connections["default"].cursor() as cursor:
        cursor.execute(
            # With a timeout, it returns once each backend has exited.
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND pid <> %s",
            [sparing],
        )
    connections.close_all()


@pytest.fixture
def test_backend_pid(alice) -> int:
    """The main thread's connection (a sync fixture runs there), which flushes the database
    after the test."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


async def _database_unreachable(*, sparing: int) -> None:
    await sync_to_async(_connections_end)(sparing=sparing)
    connections["default"].settings_dict["PORT"] = free_port()


async def _database_back(port: int) -> None:
    connections["default"].settings_dict["PORT"] = port


async def test_it_answers_unavailable_while_the_database_is_unreachable(alice, test_backend_pid):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    chat = await ChatSocket.open(conversation.id, user=alice)
    await chat.receive()
    real_port = connections["default"].settings_dict["PORT"]

    await _database_unreachable(sparing=test_backend_pid)
    try:
        await chat.send({"type": "message", "content": "Hello?"})
        refused = await chat.receive()
        await chat.send({"type": "ping"})
        pong = await chat.receive()
    finally:
        await _database_back(real_port)
    await chat.send({"type": "message", "content": "Hello again"})
    accepted = await chat.receive()

    assert (refused["type"], refused["code"]) == ("error", "unavailable")
    assert pong == {"type": "pong"}
    assert accepted["type"] == "queued"
    assert [m.content async for m in Message.objects.filter(role="user")] == ["Hello again"]
    await chat.close()


@pytest.fixture
def one_database_thread(settings):
    """The process's database calls on one thread, whose connection the test can end."""
    settings.DATABASE_THREADS = 1
    database._executor.cache_clear()
    yield
    database._executor.cache_clear()


async def test_it_queues_a_message_on_a_connection_postgresql_ended_right_after_its_use(
    alice, test_backend_pid, one_database_thread
):
    # The socket's opening used the database thread's connection a moment ago, so its
    # health check's round trip is spared (grizz/database.py) unless the server's goodbye
    # is seen on its socket.
    conversation = await sync_to_async(conversation_create)(owner=alice)
    chat = await ChatSocket.open(conversation.id, user=alice)
    await chat.receive()

    await sync_to_async(_connections_end)(sparing=test_backend_pid)
    await chat.send({"type": "message", "content": "Still there?"})
    accepted = await chat.receive()

    assert accepted["type"] == "queued"
    assert [m.content async for m in Message.objects.filter(role="user")] == ["Still there?"]
    await chat.close()


async def _cancelled(chat: ChatSocket, content: str) -> dict[str, Any]:
    # No worker runs here: the reply stays queued, and the web alone answers its cancel.
    await chat.send({"type": "message", "content": content})
    queued = await chat.receive()
    await chat.send({"type": "cancel", "job_id": queued["job_id"]})
    answer = await chat.receive()
    return {key: answer.get(key) for key in ("type", "status", "code")}


async def test_a_cancel_works_after_postgresql_ended_the_connections(alice, test_backend_pid):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    chat = await ChatSocket.open(conversation.id, user=alice)
    await chat.receive()
    first = await _cancelled(chat, "One")

    # Off the thread-sensitive thread, whose connection the cancel uses: ended by the
    # server, not closed by Django there.
    await sync_to_async(_connections_end, thread_sensitive=False)(sparing=test_backend_pid)
    second = await _cancelled(chat, "Two")

    done = {"type": "done", "status": "cancelled", "code": None}
    assert (first, second) == (done, done)
    await chat.close()


@pytest.mark.parametrize("idle_bound", [10, 0], ids=["seen by a poll", "checked by a query"])
async def test_a_socket_opens_on_connections_postgresql_ended(
    alice, test_backend_pid, settings, idle_bound
):
    # The socket's opening statement runs on a connection of the event loop's (grizz/
    # database.py LoopConnections), which the first socket left open. Used within the bound,
    # a poll of its socket finds the server's goodbye; idle past it, a `SELECT 1` fails.
    settings.DATABASE_HEALTH_CHECK_IDLE_SECONDS = idle_bound
    conversation = await sync_to_async(conversation_create)(owner=alice)
    first = await ChatSocket.open(conversation.id, user=alice)
    await first.receive()

    await sync_to_async(_connections_end)(sparing=test_backend_pid)
    second = await ChatSocket.open(conversation.id, user=alice)
    hello = await second.receive()

    assert hello["type"] == "hello"
    await first.close()
    await second.close()


async def test_a_socket_is_refused_while_the_database_is_unreachable_and_opens_after(
    alice, test_backend_pid
):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    opened = await ChatSocket.open(conversation.id, user=alice)
    await opened.receive()  # the event loop's connection is open, and then ended
    real_port = connections["default"].settings_dict["PORT"]

    await _database_unreachable(sparing=test_backend_pid)
    try:
        refused = await ChatSocket.open(conversation.id, user=alice)
        code = await refused.close_code()
    finally:
        await _database_back(real_port)
    again = await ChatSocket.open(conversation.id, user=alice)
    hello = await again.receive()

    assert (code, hello["type"]) == (4503, "hello")
    await opened.close()
    await again.close()
