"""Admission of new messages: per-user limits and backpressure on the queue. Every refusal
is a typed error on a socket that stays open, and nothing is saved."""

import asyncio
import json
from typing import Any

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User

from chat.models import Message
from tests.support.sockets import ChatSocket, chat_opened, daphne_socket_ready

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def sam(transactional_db: None) -> User:
    """Staff, not a superuser."""
    return User.objects.create_user("sam", password="sam-password-1", is_staff=True)


async def _send(socket: ChatSocket, content: str = "Hi", **extra: object) -> dict[str, Any]:
    await socket.send({"type": "message", "content": content, **extra})
    return await socket.receive()


async def _assert_still_open(socket: ChatSocket) -> None:
    await socket.send({"type": "ping"})
    assert await socket.receive() == {"type": "pong"}


async def test_it_refuses_messages_over_the_rate_limit(alice, limits):
    limits.CHAT_RATE_LIMIT = (2, 60)
    sockets = [await chat_opened(alice) for _ in range(3)]

    answers = [await _send(socket, f"message {i}") for i, socket in enumerate(sockets)]

    assert [a["type"] for a in answers] == ["queued", "queued", "error"]
    assert answers[2]["code"] == "rate_limited"
    assert 0 < answers[2]["retry_after"] <= 60
    contents = [m.content async for m in Message.objects.filter(role="user")]
    assert sorted(contents) == ["message 0", "message 1"]
    await _assert_still_open(sockets[2])


async def test_the_rate_limit_is_per_user(alice, bob, limits):
    limits.CHAT_RATE_LIMIT = (1, 60)
    alice_first = await _send(await chat_opened(alice))
    alice_second = await _send(await chat_opened(alice))
    bob_first = await _send(await chat_opened(bob))

    assert alice_first["type"] == "queued"
    assert (alice_second["type"], alice_second["code"]) == ("error", "rate_limited")
    assert bob_first["type"] == "queued"  # alice's use does not count against bob


async def test_it_limits_replies_in_flight_across_conversations(alice, limits):
    limits.CHAT_MAX_INFLIGHT_PER_USER = 2
    sockets = [await chat_opened(alice) for _ in range(3)]
    first, _ = [await _send(socket) for socket in sockets[:2]]

    refused = await _send(sockets[2])
    await sockets[0].send({"type": "cancel", "job_id": first["job_id"]})
    assert (await sockets[0].receive())["status"] == "cancelled"
    accepted = await _send(sockets[2])

    assert (refused["type"], refused["code"]) == ("error", "rate_limited")
    assert refused["retry_after"] > 0
    assert accepted["type"] == "queued"


async def test_a_finished_reply_frees_its_slot(alice, limits, worker):
    limits.CHAT_MAX_INFLIGHT_PER_USER = 1
    first, second = await chat_opened(alice), await chat_opened(alice)
    await _send(first)
    await first.receive_until("done")

    assert (await _send(second))["type"] == "queued"


async def test_a_resent_message_is_answered_even_at_the_limit(alice, limits):
    limits.CHAT_RATE_LIMIT = (1, 60)
    socket = await chat_opened(alice)
    first = await _send(socket, client_msg_id="m-1")
    again = await _send(socket, client_msg_id="m-1")
    other = await _send(socket, "another message")

    assert first == again
    assert first["type"] == "queued"
    assert (other["type"], other["code"]) == ("error", "rate_limited")  # the limit is on


@pytest.mark.parametrize("exempt", [False, True])
async def test_staff_are_limited_unless_exempt(sam, limits, exempt):
    limits.CHAT_RATE_LIMIT = (1, 60)
    limits.CHAT_LIMITS_EXEMPT_STAFF = exempt

    answers = [await _send(await chat_opened(sam)) for _ in range(2)]

    expected = ["queued", "queued"] if exempt else ["queued", "error"]
    assert [a["type"] for a in answers] == expected


async def test_it_refuses_new_work_when_the_queue_is_full(alice, limits):
    limits.LLM_MAX_PENDING_JOBS = 2
    sockets = [await chat_opened(alice) for _ in range(3)]

    answers = [await _send(socket, f"message {i}") for i, socket in enumerate(sockets)]

    assert [a["type"] for a in answers] == ["queued", "queued", "error"]
    assert answers[2]["code"] == "overloaded"
    assert answers[2]["retry_after"] > 0
    assert await Message.objects.filter(content="message 2").aexists() is False
    await _assert_still_open(sockets[2])


async def test_a_message_refused_after_admission_gives_its_place_back(alice, limits):
    limits.LLM_MAX_PENDING_JOBS = 2
    busy, other = await chat_opened(alice), await chat_opened(alice)
    await _send(busy, "first")

    refused = await _send(busy, "while the first is pending")
    accepted = await _send(other, "second")

    assert (refused["type"], refused["code"]) == ("error", "busy")
    assert accepted["type"] == "queued"  # the busy message holds no place in the queue


async def test_it_tells_the_place_in_a_long_queue(alice, limits):
    limits.LLM_SLOWDOWN_PENDING_JOBS = 1
    limits.LLM_MAX_PENDING_JOBS = 1000
    first, second = await chat_opened(alice), await chat_opened(alice)

    calm = await _send(first)
    crowded = await _send(second)

    assert "queue_position" not in calm
    assert crowded["queue_position"] == 2


async def test_a_slowed_sender_waits_without_holding_up_other_sockets(alice, limits):
    limits.LLM_SLOWDOWN_PENDING_JOBS = 1
    limits.LLM_MAX_PENDING_JOBS = 2  # one job queued: the next waits the longest delay, 1 s
    await _send(await chat_opened(alice))
    slowed, other = await chat_opened(alice), await chat_opened(alice)
    loop = asyncio.get_running_loop()

    sent_at = loop.time()
    await slowed.send({"type": "message", "content": "wait for me"})
    await other.send({"type": "ping"})
    pong = await other.receive()
    ponged_at = loop.time()
    queued = await slowed.receive()
    queued_at = loop.time()

    assert pong == {"type": "pong"}
    assert ponged_at < queued_at  # the other socket was served while the sender waited
    assert queued_at - sent_at >= 0.95  # the sender did wait
    assert queued["queue_position"] == 2
    await asyncio.gather(slowed.close(), other.close())


# Over real daphne processes: the limit is one for all web processes and any burst.

LIMIT = 3


@pytest.fixture
def two_web_processes(start_daphne):
    limits = {"CHAT_MAX_INFLIGHT_PER_USER": "0", "CHAT_RATE_LIMIT": "0/min"}
    return [start_daphne(LLM_MAX_PENDING_JOBS=str(LIMIT), **limits) for _ in range(2)]


async def _answer(ws: websockets.ClientConnection, content: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "message", "content": content}))
    answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 15))
    return answer


async def test_a_burst_across_web_processes_queues_exactly_the_limit(alice, bob, two_web_processes):
    carol = await sync_to_async(User.objects.create_user)("carol", password="carol-password-1")
    users = [alice, bob, carol] * 2
    sockets = [
        await daphne_socket_ready(two_web_processes[i % 2], user) for i, user in enumerate(users)
    ]

    answers = await asyncio.gather(*(_answer(ws, f"burst {i}") for i, ws in enumerate(sockets)))

    queued = [i for i, a in enumerate(answers) if a["type"] == "queued"]
    refused = [a for a in answers if a["type"] != "queued"]
    assert len(queued) == LIMIT
    assert {(a["type"], a["code"]) for a in refused} == {("error", "overloaded")}
    assert all(a["retry_after"] > 0 for a in refused)
    saved = [m.content async for m in Message.objects.filter(role="user")]
    assert sorted(saved) == sorted(f"burst {i}" for i in queued)
    for ws in sockets:
        await ws.close()
