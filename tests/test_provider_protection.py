"""Protection from a failing provider, in real worker processes against the loopback fake
OpenAI server: the circuit breaker (llmworker/breaker.py) holds replies back while the
provider is down and lets them continue when it is back; the result timeout ends a reply
whose provider sends nothing."""

import asyncio
import contextlib
import time
from typing import Any, cast

import pytest
from asgiref.sync import sync_to_async

from chat.models import Message
from chat.services import conversation_create
from llmworker.redis import StreamEntries, dead_letter_key, redis_get
from tests.support.dead_letters import dead_letters_once_written
from tests.support.fake_openai import Behaviour, FakeOpenAI
from tests.support.sockets import ChatSocket, answer_of, chat_opened, message_queued

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

TOKENS = [f" tok{i}" for i in range(30)]
ANSWER = "".join(TOKENS)
UNAVAILABLE = "The model provider is unavailable; your reply will continue when it is back."


class Arrivals:
    """When the fake provider received each of its first `count` requests (monotonic
    seconds), as the server recorded them on reading each request."""

    def __init__(self, fake: FakeOpenAI, count: int) -> None:
        self.fake, self.count = fake, count

    async def all(self) -> list[float]:
        with contextlib.suppress(TimeoutError):
            await asyncio.to_thread(self.fake.wait_for_requests, self.count, 60)
        return self.fake.arrivals[: self.count]


@pytest.fixture
def breaker_env(service_env: dict[str, str]) -> dict[str, str]:
    service_env.update(LLM_BREAKER_FAILURES="2", LLM_BREAKER_RESET_SECONDS="1", LLM_RETRY_LIMIT="5")
    return service_env


def _notices(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["type"] == "error" and f["code"] == "llm_unavailable"]


async def _reply(job_id: str) -> Message:
    return await Message.objects.aget(job_id=job_id)


async def _dead_letters() -> list[dict[str, str]]:
    entries = cast(StreamEntries, await redis_get().xrange(dead_letter_key()))
    return [fields for _, fields in entries]


# The circuit breaker


async def test_the_breaker_holds_the_reply_until_the_provider_is_back(
    alice, fake_llm, breaker_env, start_worker
):
    breaker_env.update(LLM_BREAKER_RESET_SECONDS="2", LLM_RETRY_LIMIT="2")
    fake_llm.enqueue(Behaviour(status=503), Behaviour(status=503))
    fake_llm.default = Behaviour(tokens=TOKENS)
    worker = await asyncio.to_thread(start_worker, "breaker")
    arrivals = Arrivals(fake_llm, 3)
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    notice = await socket.receive(timeout=30)
    frames = await socket.receive_until("done", timeout=30)
    times = await arrivals.all()

    retry_after = notice.pop("retry_after", None)
    assert notice == {
        "type": "error",
        "job_id": queued["job_id"],
        "seq": 1,
        "code": "llm_unavailable",
        "message": UNAVAILABLE,
    }
    assert retry_after in (1, 2)  # seconds until the probe, rounded up
    # Open for two seconds: the probe (3rd request) comes no sooner. The retries of the job
    # would have come a tenth of a second apart (LLM_RETRY_BASE_SECONDS is 0.05).
    assert len(times) == 3
    assert times[2] - times[1] >= 1.5
    assert len(fake_llm.requests) == 3
    # Two retries were spent on the two failures; waiting spent none, so the probe could go.
    assert {f["type"] for f in frames[:-1]} == {"delta"}
    assert answer_of(socket.frames, queued["job_id"]) == frames[-1]["content"] == ANSWER
    reply = await _reply(queued["job_id"])
    assert (reply.status, reply.content, reply.attempt) == ("complete", ANSWER, 1)
    assert await _dead_letters() == []
    assert "circuit open" in worker.output and "circuit closed" in worker.output
    await socket.close()


async def test_a_failed_probe_opens_the_breaker_again_and_the_socket_is_told_once(
    alice, fake_llm, breaker_env, start_worker
):
    fake_llm.enqueue(Behaviour(status=503), Behaviour(status=502), Behaviour(status=500))
    fake_llm.default = Behaviour(tokens=TOKENS)
    worker = await asyncio.to_thread(start_worker, "breaker")
    arrivals = Arrivals(fake_llm, 4)
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    frames = await socket.receive_until("done", timeout=30)
    times = await arrivals.all()

    assert len(_notices(frames)) == 1
    assert frames[0]["code"] == "llm_unavailable"
    assert len(times) == 4
    assert times[2] - times[1] >= 0.75  # the first probe, a period after the opening
    assert times[3] - times[2] >= 0.75  # the second, a period after the first failed
    assert len(fake_llm.requests) == 4
    assert answer_of(frames, queued["job_id"]) == ANSWER
    assert "the probe failed" in worker.output
    await socket.close()


async def test_waiting_replies_share_one_probe_and_all_go_on_when_it_succeeds(
    alice, bob, fake_llm, breaker_env, start_worker
):
    breaker_env.update(LLM_BREAKER_FAILURES="1", LLM_BREAKER_RESET_SECONDS="3")
    # The first probe takes a second to fail: nobody else may call meanwhile.
    fake_llm.enqueue(Behaviour(status=503), Behaviour(status=503, ttft=1.0))
    fake_llm.default = Behaviour(tokens=TOKENS)
    await asyncio.to_thread(start_worker, "breaker")
    arrivals = Arrivals(fake_llm, 5)
    sockets = [await chat_opened(user) for user in (alice, alice, bob)]
    first = await message_queued(sockets[0])
    assert (await sockets[0].receive(timeout=30))["code"] == "llm_unavailable"
    others = [
        await message_queued(socket) for socket in sockets[1:]
    ]  # sent while the circuit is open

    dones = [(await socket.receive_until("done", timeout=60))[-1] for socket in sockets]
    times = await arrivals.all()

    assert [len(_notices(socket.frames)) for socket in sockets] == [1, 1, 1]
    assert len(times) == 5
    # 3 s open, the probe's second, 3 s open again: then the second probe.
    assert times[1] - times[0] >= 2.5
    assert times[2] - times[1] >= 3.5
    # Its first chunk closes the circuit and wakes the waiting replies at once (checking
    # the state once a period instead would take them about 2 s).
    assert times[4] - times[2] < 1.5
    assert len(fake_llm.requests) == 5
    for queued, done in zip([first, *others], dones, strict=True):
        assert (done["job_id"], done["status"], done["content"]) == (
            queued["job_id"],
            "complete",
            ANSWER,
        )
    for socket in sockets:
        await socket.close()


async def test_failures_of_different_replies_add_up(alice, fake_llm, breaker_env, start_worker):
    breaker_env["LLM_RETRY_LIMIT"] = "0"
    fake_llm.enqueue(Behaviour(status=503), Behaviour(status=503))
    fake_llm.default = Behaviour(reply="Back again.")
    await asyncio.to_thread(start_worker, "breaker")
    socket = await chat_opened(alice)

    failed = []
    for _ in range(2):
        await message_queued(socket)
        failed.append((await socket.receive_until("error", timeout=30))[-1])
    last = await message_queued(socket)
    frames = await socket.receive_until("done", timeout=30)

    assert [f["code"] for f in failed] == ["llm_error", "llm_error"]
    assert frames[0]["code"] == "llm_unavailable"
    assert frames[-1]["content"] == "Back again."
    assert answer_of(frames, last["job_id"]) == "Back again."
    assert len(fake_llm.requests) == 3
    await socket.close()


async def test_refusals_do_not_open_the_breaker(alice, fake_llm, breaker_env, start_worker):
    fake_llm.enqueue(Behaviour(status=400), Behaviour(status=400), Behaviour(status=400))
    fake_llm.default = Behaviour(reply="Fine.")
    worker = await asyncio.to_thread(start_worker, "breaker")
    socket = await chat_opened(alice)

    for _ in range(3):
        await message_queued(socket)
        assert (await socket.receive_until("error", timeout=30))[-1]["code"] == "llm_error"
    await message_queued(socket)
    frames = await socket.receive_until("done", timeout=30)

    assert _notices(socket.frames) == []
    assert {f["type"] for f in frames} == {"delta", "done"}
    assert len(fake_llm.requests) == 4
    assert "circuit open" not in worker.output
    await socket.close()


# The result timeout


@pytest.fixture
def result_timeout_env(service_env: dict[str, str]) -> dict[str, str]:
    service_env["LLM_RESULT_TIMEOUT_SECONDS"] = "1"
    return service_env


async def _assert_timed_out(error: dict[str, Any], job_id: str) -> None:
    assert (error["type"], error["code"], error["job_id"]) == ("error", "timeout", job_id)
    assert "sent nothing for 1 seconds" in error["message"]
    reply = await _reply(job_id)
    assert (reply.status, reply.error) == ("failed", error["message"])
    [dead] = await dead_letters_once_written()
    assert (dead["job_id"], dead["reason"]) == (job_id, error["message"])


async def test_a_provider_that_never_answers_times_out(
    alice, fake_llm, result_timeout_env, start_worker
):
    fake_llm.default = Behaviour(hang=True)
    await asyncio.to_thread(start_worker, "timeout")
    socket = await chat_opened(alice)
    started = time.monotonic()
    queued = await message_queued(socket)

    error = (await socket.receive_until("error", timeout=30))[-1]
    gone_at = await asyncio.to_thread(fake_llm.wait_for_disconnect, 10)

    assert time.monotonic() - started >= 1.0
    assert gone_at - started < 10  # the HTTP request was closed, not left to the client
    await _assert_timed_out(error, queued["job_id"])
    assert len(fake_llm.requests) == 1  # the result timeout is final: no retry
    assert _notices(socket.frames) == []
    await socket.close()


async def test_a_stream_that_stalls_midway_times_out(
    alice, fake_llm, result_timeout_env, start_worker
):
    fake_llm.default = Behaviour(tokens=TOKENS, hang_after=3)
    await asyncio.to_thread(start_worker, "timeout")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    frames = await socket.receive_until("error", timeout=30)
    await asyncio.to_thread(fake_llm.wait_for_disconnect, 10)

    assert {f["type"] for f in frames[:-1]} == {"delta"}
    assert answer_of(frames, queued["job_id"]) == "".join(TOKENS[:3])
    await _assert_timed_out(frames[-1], queued["job_id"])
    assert len(fake_llm.requests) == 1
    await socket.close()


async def test_a_provider_nobody_listens_for_fails_the_reply_with_the_reason(
    alice, service_env, start_worker
):
    # Nothing listens on port 1: each connection is refused at once.
    service_env.update(OPENAI_BASE_URL="http://127.0.0.1:1/v1", LLM_RETRY_LIMIT="1")
    service_env.update(LLM_BREAKER_FAILURES="100")
    await asyncio.to_thread(start_worker, "refused")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    error = (await socket.receive_until("error", timeout=30))[-1]

    assert (error["code"], error["job_id"]) == ("llm_error", queued["job_id"])
    assert "could not be reached" in error["message"]
    assert "ConnectionRefusedError" in error["message"]  # the cause, not a wrapper's guess
    assert (await _reply(queued["job_id"])).status == "failed"
    await socket.close()


async def test_a_response_left_open_after_its_end_still_completes_the_reply(
    alice, fake_llm, worker
):
    # [DONE] is the answer's end: waiting on for the body's end is bounded (a second), far
    # below the request's read timeout, and that connection is closed, not reused.
    fake_llm.default = Behaviour(tokens=TOKENS, open_after_done=True)
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    frames = await socket.receive_until("done", timeout=15)
    await asyncio.to_thread(fake_llm.wait_for_disconnect, 10)

    assert (frames[-1]["status"], frames[-1]["content"]) == ("complete", ANSWER)
    assert answer_of(frames, queued["job_id"]) == ANSWER
    assert (await _reply(queued["job_id"])).status == "complete"
    await socket.close()


async def test_the_result_timeout_bounds_the_retries_of_stalled_requests(
    alice, fake_llm, service_env, start_worker
):
    # The client's own timeout (1 s) makes each stalled request a retryable error; retries
    # remain (10), but after 3 s with nothing from the provider the reply ends.
    service_env.update(
        LLM_REQUEST_TIMEOUT_SECONDS="1",
        LLM_RESULT_TIMEOUT_SECONDS="3",
        LLM_RETRY_LIMIT="10",
        LLM_BREAKER_FAILURES="100",
    )
    fake_llm.default = Behaviour(hang=True)
    await asyncio.to_thread(start_worker, "timeout")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    error = (await socket.receive_until("error", timeout=30))[-1]

    assert (error["code"], error["job_id"]) == ("timeout", queued["job_id"])
    assert 2 <= len(fake_llm.requests) <= 4
    assert (await _reply(queued["job_id"])).status == "failed"
    await socket.close()


async def test_a_waiting_reply_does_not_time_out(alice, fake_llm, breaker_env, start_worker):
    # Open for 3 s against a result timeout of 2 s: waiting for the breaker is not silence.
    breaker_env.update(LLM_BREAKER_RESET_SECONDS="3", LLM_RESULT_TIMEOUT_SECONDS="2")
    fake_llm.enqueue(Behaviour(status=503), Behaviour(status=503))
    fake_llm.default = Behaviour(tokens=TOKENS)
    await asyncio.to_thread(start_worker, "breaker")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    frames = await socket.receive_until("done", timeout=30)

    assert frames[0]["code"] == "llm_unavailable"
    assert frames[-1]["status"] == "complete"
    assert answer_of(frames, queued["job_id"]) == ANSWER
    await socket.close()


# What a socket that joins during the wait sees


async def test_a_socket_resuming_while_the_reply_waits_gets_every_frame_once(
    alice, fake_llm, breaker_env, start_worker
):
    # Text went out, the stream broke, the retry failed: the circuit opens mid-reply.
    fake_llm.enqueue(Behaviour(tokens=TOKENS, interval=0.02, cut_after=5), Behaviour(status=503))
    fake_llm.default = Behaviour(tokens=TOKENS)
    conversation = await sync_to_async(conversation_create)(owner=alice)
    watching = await chat_opened(alice, conversation.id)
    queued = await message_queued(watching)
    joining = await ChatSocket.open(conversation.id, user=alice)
    hello = await joining.receive()
    assert hello["active_job_id"] == queued["job_id"]
    await asyncio.to_thread(start_worker, "breaker")
    await watching.receive_until("error", timeout=30)  # the notice, live

    await joining.send({"type": "resume", "job_id": queued["job_id"], "after": 0})
    frames = await joining.receive_until("done", timeout=30)
    await watching.receive_until("done", timeout=30)

    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert frames == [f for f in watching.frames if "seq" in f]  # the same, in order
    assert len(_notices(frames)) == 1
    assert answer_of(frames, queued["job_id"]) == ANSWER
    await watching.close()
    await joining.close()
