"""Priorities: staff and members of CHAT_PRIORITY_GROUP are served first, without starving
everyone else."""

import asyncio

import pytest
from django.contrib.auth.models import Group, User

from llmworker.redis import jobs_stream_key, redis_get
from tests.support.fake_openai import Behaviour
from tests.support.sockets import ChatSocket, chat_opened, message_queued

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def root(transactional_db) -> User:
    return User.objects.create_user("root", password="root-password-1", is_staff=True)


@pytest.fixture
def carol(transactional_db) -> User:
    carol = User.objects.create_user("carol", password="carol-password-1")
    carol.groups.add(Group.objects.create(name="priority"))
    return carol


async def _send(user: User, content: str) -> ChatSocket:
    socket = await chat_opened(user)
    await message_queued(socket, content)
    return socket


def _asked(fake_llm) -> list[str]:
    return [request["messages"][-1]["content"] for request in fake_llm.requests]


async def test_staff_and_the_priority_group_go_on_the_high_stream(alice, root, carol, settings):
    settings.CHAT_RATE_LIMIT = (0, 60)
    for user in (alice, root, carol):
        await _send(user, f"from {user.username}")
    redis = redis_get()
    assert await redis.xlen(jobs_stream_key("high")) == 2
    assert await redis.xlen(jobs_stream_key("normal")) == 1


async def test_a_high_job_overtakes_waiting_normal_ones(alice, root, fake_llm, start_worker):
    # The first reply holds the worker's only slot until every other job is queued.
    fake_llm.enqueue(Behaviour(tokens=[" x"] * 10, hold_after=1))
    fake_llm.default = Behaviour(tokens=[" x"] * 10)
    await asyncio.to_thread(start_worker, "single", concurrency=1)
    first = await _send(alice, "normal 1")
    await asyncio.to_thread(fake_llm.wait_for_requests, 1)  # the worker is busy with it
    others = [await _send(alice, f"normal {i}") for i in (2, 3)]
    staff = await _send(root, "high")
    await asyncio.to_thread(fake_llm.release)

    for socket in (first, *others, staff):
        await socket.receive_until("done", timeout=30)

    assert _asked(fake_llm) == ["normal 1", "high", "normal 2", "normal 3"]


async def test_high_jobs_leave_normal_ones_a_share(
    alice, root, fake_llm, service_env, start_worker, settings
):
    settings.CHAT_MAX_INFLIGHT_PER_USER = 0
    service_env["LLM_HIGH_PRIORITY_SHARE"] = "0.5"
    fake_llm.default = Behaviour(tokens=[" x"] * 10, interval=0.05)
    sockets = [await _send(root, f"high {i}") for i in range(4)]
    sockets += [await _send(alice, f"normal {i}") for i in range(2)]

    await asyncio.to_thread(start_worker, "shared", concurrency=4)
    first_four = await asyncio.to_thread(fake_llm.wait_for_requests, 4)

    assert sorted(r["messages"][-1]["content"] for r in first_four[:4]) == [
        "high 0", "high 1", "normal 0", "normal 1",
    ]  # fmt: skip
    for socket in sockets:
        await socket.receive_until("done", timeout=30)
