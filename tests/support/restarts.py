"""A reply caught streaming when its worker dies, and resumed by the worker that comes back
under the same name: for the tests of restarts (a worker's, a pool slot's)."""

import asyncio
from collections.abc import Callable
from typing import Any

from django.contrib.auth.models import User

from chat.models import Message
from tests.support.fake_openai import Behaviour, FakeOpenAI
from tests.support.processes import ServiceProcess
from tests.support.sockets import ChatSocket, answer_of, chat_opened, message_queued

TOKENS = [f" tok{i}" for i in range(30)]
ANSWER = "".join(TOKENS)


async def reply_streaming_on_a_long_lease(
    user: User, fake_llm: FakeOpenAI, env: dict[str, str], start: Callable[[], ServiceProcess]
) -> tuple[ServiceProcess, ChatSocket, dict[str, Any]]:
    """The process `start` gives, and a socket whose reply it streams (the first request
    holds after three tokens; the next ones answer at once)."""
    # A lease far longer than any wait of the tests: no takeover could bring the job back.
    env["LLM_JOB_LEASE_SECONDS"] = "60"
    fake_llm.enqueue(Behaviour(tokens=TOKENS, hold_after=3))
    fake_llm.default = Behaviour(tokens=TOKENS)
    process = await asyncio.to_thread(start)
    socket = await chat_opened(user)
    queued = await message_queued(socket)
    await socket.receive()  # text is streaming
    return process, socket, queued


async def reply_completed_once(socket: ChatSocket, job_id: str) -> None:
    """After the restart: the reply starts again and completes, the user sees one answer."""
    frames = await socket.receive_until("done", timeout=20)

    assert "restart" in [f["type"] for f in frames]
    assert answer_of(socket.frames, job_id) == frames[-1]["content"] == ANSWER
    assert [f["type"] for f in socket.frames].count("done") == 1
    [reply] = [m async for m in Message.objects.filter(job_id=job_id)]
    assert (reply.status, reply.content, reply.attempt) == ("complete", ANSWER, 2)
