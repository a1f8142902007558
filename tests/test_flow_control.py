"""Admission of new messages: per-user limits and backpressure on the queue. Every refusal
is a typed error on a socket that stays open, and nothing is saved."""

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from chat.models import Message
from tests.support.sockets import ChatSocket, chat_opened

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def no_limits(settings):
    settings.CHAT_RATE_LIMIT = (0, 60)
    settings.CHAT_MAX_INFLIGHT_PER_USER = 0
    settings.LLM_QUEUE_DEPTH_CACHE_SECONDS = 0
    return settings


async def _send(socket: ChatSocket, content: str = "Hi", **extra: object) -> dict[str, Any]:
    await socket.send({"type": "message", "content": content, **extra})
    return await socket.receive()


async def _assert_still_open(socket: ChatSocket) -> None:
    await socket.send({"type": "ping"})
    assert await socket.receive() == {"type": "pong"}


async def test_it_refuses_messages_over_the_rate_limit(alice, no_limits):
    no_limits.CHAT_RATE_LIMIT = (2, 60)
    sockets = [await chat_opened(alice) for _ in range(3)]

    answers = [await _send(socket, f"message {i}") for i, socket in enumerate(sockets)]

    assert [a["type"] for a in answers] == ["queued", "queued", "error"]
    assert answers[2]["code"] == "rate_limited"
    assert 0 < answers[2]["retry_after"] <= 60
    contents = [m.content async for m in Message.objects.filter(role="user")]
    assert sorted(contents) == ["message 0", "message 1"]
    await _assert_still_open(sockets[2])


async def test_the_rate_limit_is_per_user(alice, bob, no_limits):
    no_limits.CHAT_RATE_LIMIT = (1, 60)
    first = await _send(await chat_opened(alice))
    second = await _send(await chat_opened(bob))
    assert (first["type"], second["type"]) == ("queued", "queued")


async def test_it_limits_replies_in_flight_across_conversations(alice, no_limits):
    no_limits.CHAT_MAX_INFLIGHT_PER_USER = 2
    sockets = [await chat_opened(alice) for _ in range(3)]
    first, _ = [await _send(socket) for socket in sockets[:2]]

    refused = await _send(sockets[2])
    await sockets[0].send({"type": "cancel", "job_id": first["job_id"]})
    assert (await sockets[0].receive())["status"] == "cancelled"
    accepted = await _send(sockets[2])

    assert (refused["type"], refused["code"]) == ("error", "rate_limited")
    assert refused["retry_after"] > 0
    assert accepted["type"] == "queued"


async def test_a_finished_reply_frees_its_slot(alice, no_limits, worker):
    no_limits.CHAT_MAX_INFLIGHT_PER_USER = 1
    first, second = await chat_opened(alice), await chat_opened(alice)
    await _send(first)
    await first.receive_until("done")

    assert (await _send(second))["type"] == "queued"


async def test_a_resent_message_is_answered_even_at_the_limit(alice, no_limits):
    no_limits.CHAT_RATE_LIMIT = (1, 60)
    socket = await chat_opened(alice)
    first = await _send(socket, client_msg_id="m-1")
    again = await _send(socket, client_msg_id="m-1")
    assert first == again
    assert first["type"] == "queued"


async def test_staff_may_be_exempt(no_limits, django_user_model):
    root = await sync_to_async(django_user_model.objects.create_user)(
        "root", password="root-password-1", is_staff=True
    )
    no_limits.CHAT_RATE_LIMIT = (1, 60)
    no_limits.CHAT_LIMITS_EXEMPT_STAFF = True
    answers = [await _send(await chat_opened(root)) for _ in range(2)]
    assert [a["type"] for a in answers] == ["queued", "queued"]


async def test_it_refuses_new_work_when_the_queue_is_full(alice, no_limits):
    no_limits.LLM_MAX_PENDING_JOBS = 2
    sockets = [await chat_opened(alice) for _ in range(3)]

    answers = [await _send(socket, f"message {i}") for i, socket in enumerate(sockets)]

    assert [a["type"] for a in answers] == ["queued", "queued", "error"]
    assert answers[2]["code"] == "overloaded"
    assert answers[2]["retry_after"] > 0
    assert await Message.objects.filter(content="message 2").aexists() is False
    await _assert_still_open(sockets[2])


async def test_it_tells_the_place_in_a_long_queue(alice, no_limits):
    no_limits.LLM_SLOWDOWN_PENDING_JOBS = 1
    no_limits.LLM_MAX_PENDING_JOBS = 1000
    first, second = await chat_opened(alice), await chat_opened(alice)

    calm = await _send(first)
    crowded = await _send(second)

    assert "queue_position" not in calm
    assert crowded["queue_position"] == 2


async def test_a_slowed_sender_does_not_hold_up_other_sockets(alice, no_limits):
    no_limits.LLM_SLOWDOWN_PENDING_JOBS = 1
    no_limits.LLM_MAX_PENDING_JOBS = 2  # one job queued: the next waits the longest delay
    await _send(await chat_opened(alice))
    slowed, other = await chat_opened(alice), await chat_opened(alice)

    await slowed.send({"type": "message", "content": "wait for me"})
    await other.send({"type": "ping"})
    pong = await other.receive(timeout=0.5)  # well inside the second the sender waits
    queued = await slowed.receive()

    assert pong == {"type": "pong"}
    assert queued["queue_position"] == 2
    await asyncio.gather(slowed.close(), other.close())
