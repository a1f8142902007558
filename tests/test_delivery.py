"""Delivery guarantees: once the server said `queued`, exactly one complete answer or a clear
failure, through killed and stalled workers, provider faults, lost Redis data and cancels."""

import asyncio
import json
import signal
import time
from datetime import timedelta
from typing import Any, cast

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import User

from chat.models import Message
from chat.services import (
    conversation_create,
    message_send,
    reply_cancel_queued,
    reply_complete,
    reply_start,
)
from llmworker.redis import (
    WORKER_GROUP,
    StreamEntries,
    jobs_stream_key,
    redis_get,
    reply_cancel_key,
    reply_log_key,
)
from llmworker.replies import ReplyPublisher, conversation_title_announce
from tests.support.dead_letters import dead_letters_once_written
from tests.support.fake_openai import Behaviour
from tests.support.orphans import sent_by_a_web_process_that_died
from tests.support.processes import ServiceProcess
from tests.support.restarts import reply_completed_once, reply_streaming_on_a_long_lease
from tests.support.sockets import ChatSocket, answer_of, chat_opened, message_queued, token_for

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

TOKENS = [f" tok{i}" for i in range(30)]
ANSWER = "".join(TOKENS)
FAKE_ANSWER = Behaviour().reply  # the fake model's answer unless told otherwise


@pytest.fixture
def short_lease(service_env):
    service_env["LLM_JOB_LEASE_SECONDS"] = "1"
    return service_env


@pytest.fixture
def root(transactional_db) -> User:
    return User.objects.create_user("root", password="root-password-1", is_staff=True)


@pytest.fixture
def fast_reconciler(service_env):
    service_env["LLM_RECONCILE_SECONDS"] = "1"
    # A worker killed while it runs the maintenance is replaced as its lease runs out.
    service_env["LLM_MAINTENANCE_LEASE_SECONDS"] = "2"
    return service_env


async def _entries_ever_added(priority: str) -> int:
    # Acknowledged entries are deleted; XINFO still counts every entry the stream was given.
    info = await redis_get().xinfo_stream(jobs_stream_key(priority))
    return int(info["entries-added"])


async def _replies_for(job_id: str) -> list[Message]:
    return [m async for m in Message.objects.filter(job_id=job_id)]


async def test_a_reply_survives_kill_9_of_its_worker(alice, fake_llm, short_lease, start_worker):
    fake_llm.default = Behaviour(tokens=TOKENS, interval=0.05)
    first = await asyncio.to_thread(start_worker, "first")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await socket.receive()  # text is streaming from the first worker

    await asyncio.to_thread(first.kill)
    await asyncio.to_thread(start_worker, "second")
    frames = await socket.receive_until("done", timeout=30)

    assert any(f["type"] == "restart" for f in socket.frames)
    assert answer_of(socket.frames, queued["job_id"]) == ANSWER
    assert frames[-1]["content"] == ANSWER
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.status, reply.content, reply.attempt) == ("complete", ANSWER, 2)
    assert len(fake_llm.requests) == 2
    await socket.close()


async def test_a_long_reply_on_a_healthy_worker_is_not_taken_over(
    alice, fake_llm, short_lease, start_worker
):
    # Over four seconds of generation against a one-second lease, with a rival worker ready
    # before the job exists: without renewals it would take the job over within 1.5 s.
    fake_llm.default = Behaviour(tokens=TOKENS, interval=0.15)
    workers = [await asyncio.to_thread(start_worker, name) for name in ("first", "second")]
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    frames = await socket.receive_until("done", timeout=30)

    assert frames[-1]["content"] == ANSWER
    assert not any(f["type"] == "restart" for f in socket.frames)
    [reply] = await _replies_for(queued["job_id"])
    assert reply.attempt == 1
    assert len(fake_llm.requests) == 1
    assert not any("took over" in worker.output for worker in workers)
    await socket.close()


async def test_it_retries_server_errors_unseen_by_the_user(alice, fake_llm, worker):
    fake_llm.enqueue(Behaviour(status=500), Behaviour(status=502), Behaviour(reply="Third time."))
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    frames = await socket.receive_until("done")

    assert {f["type"] for f in frames} == {"delta", "done"}
    assert answer_of(frames, queued["job_id"]) == "Third time."
    assert len(fake_llm.requests) == 3
    await socket.close()


async def test_it_waits_as_long_as_retry_after_says(alice, fake_llm, worker):
    fake_llm.enqueue(Behaviour(status=429, retry_after=1.0), Behaviour(reply="Patience."))
    socket = await chat_opened(alice)
    started = time.monotonic()
    await message_queued(socket)

    frames = await socket.receive_until("done")

    # Without Retry-After the retry would come after 0.05 s or so (LLM_RETRY_BASE_SECONDS).
    assert time.monotonic() - started >= 1.0
    assert frames[-1]["content"] == "Patience."
    await socket.close()


async def test_a_stream_cut_midway_restarts_the_answer(alice, fake_llm, worker):
    fake_llm.enqueue(Behaviour(tokens=TOKENS, interval=0.02, cut_after=10))
    fake_llm.default = Behaviour(tokens=TOKENS)
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    frames = await socket.receive_until("done")

    kinds = [f["type"] for f in frames]
    assert "restart" in kinds
    assert kinds.index("restart") > kinds.index("delta")
    assert answer_of(frames, queued["job_id"]) == ANSWER
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.content, reply.attempt) == (ANSWER, 1)
    await socket.close()


async def test_a_refused_request_fails_at_once_into_the_dead_letters(alice, fake_llm, worker):
    fake_llm.enqueue(Behaviour(status=400, error_message="Bad prompt"))
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    error = await socket.receive()

    assert (error["type"], error["code"], error["job_id"]) == (
        "error",
        "llm_error",
        queued["job_id"],
    )
    assert len(fake_llm.requests) == 1
    [reply] = await _replies_for(queued["job_id"])
    assert reply.status == "failed"
    assert "Bad prompt" in reply.error
    [dead] = await dead_letters_once_written()
    assert dead["job_id"] == queued["job_id"]
    assert "Bad prompt" in dead["reason"]
    assert await redis_get().xlen(jobs_stream_key()) == 0
    await socket.close()


async def test_jobs_lost_with_redis_data_are_enqueued_again(
    alice, fake_llm, service_env, start_worker
):
    socket_a = await chat_opened(alice)
    socket_b = await chat_opened(alice)
    queued = [await message_queued(socket_a), await message_queued(socket_b)]
    # Redis loses every key of this deployment (a restart without persistence, FLUSHALL).
    redis = redis_get()
    keys = [key async for key in redis.scan_iter(match=f"{{{settings.REDIS_KEY_PREFIX}}}*")]
    assert jobs_stream_key() in keys
    await redis.delete(*keys)

    service_env["LLM_RECONCILE_SECONDS"] = "1"
    await asyncio.to_thread(start_worker, "after-the-flush")
    done = [(await socket.receive_until("done", timeout=30))[-1] for socket in (socket_a, socket_b)]

    assert [d["job_id"] for d in done] == [q["job_id"] for q in queued]
    assert len(fake_llm.requests) == 2
    for q in queued:
        [reply] = await _replies_for(q["job_id"])
        assert reply.status == "complete"
    for socket in (socket_a, socket_b):
        await socket.close()


async def _answered_once_the_stream_is_recreated(user: User, worker: ServiceProcess) -> None:
    socket = await chat_opened(user)
    await message_queued(socket)

    frames = await socket.receive_until("done", timeout=30)

    assert frames[-1]["status"] == "complete"
    assert worker.output.count("the job stream is gone") == 1
    await socket.close()


async def test_the_worker_recreates_a_vanished_stream(alice, fake_llm, worker):
    await redis_get().delete(jobs_stream_key())

    await _answered_once_the_stream_is_recreated(alice, worker)


async def test_a_stream_lost_as_the_worker_starts_does_not_stop_it(
    alice, fake_llm, service_env, start_worker
):
    # The moment between creating the group and the first read (a Redis restart then).
    service_env["GRIZZ_FAULTS"] = "before_own_pending_read:stop"
    starting = await asyncio.to_thread(start_worker, "starting")
    await asyncio.to_thread(starting.wait_for_line, "fault: stopped at before_own_pending_read")
    await redis_get().delete(jobs_stream_key())
    starting.send_signal(signal.SIGCONT)

    await _answered_once_the_stream_is_recreated(alice, starting)


async def test_resume_after_a_dropped_connection_misses_and_repeats_nothing(
    alice, fake_llm, daphne, worker
):
    # The reply holds after ten tokens until the client has resumed: however slow the
    # reconnection, the reply is still running then.
    fake_llm.default = Behaviour(tokens=TOKENS, interval=0.02, hold_after=10)
    conversation = await sync_to_async(conversation_create)(owner=alice)
    url = f"ws://127.0.0.1:{daphne.port}/ws/chat/{conversation.id}/?token={token_for(alice)}"
    before: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws:
        await ws.recv()  # hello
        await ws.send(json.dumps({"type": "message", "content": "Go"}))
        queued = json.loads(await asyncio.wait_for(ws.recv(), 15))
        while answer_of(before, queued["job_id"]).count(" tok") < 5:
            before.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
        ws.transport.abort()  # the connection drops, no closing handshake, frames in flight

    async with websockets.connect(url) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 15))
        assert hello["active_job_id"] == queued["job_id"]
        resume = {"type": "resume", "job_id": queued["job_id"], "after": before[-1]["seq"]}
        await ws.send(json.dumps(resume))
        # Client frames are handled in order: at the pong the resume has been taken in.
        await ws.send(json.dumps({"type": "ping"}))
        after: list[dict[str, Any]] = []
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 15))) != {"type": "pong"}:
            after.append(frame)
        await asyncio.to_thread(fake_llm.release)
        while not after or after[-1]["type"] != "done":
            after.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))

    frames = before + after
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1)), frames
    assert answer_of(frames, queued["job_id"]) == ANSWER


async def test_resuming_a_finished_reply_returns_its_done_frame(alice, fake_llm, worker):
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    frames = await socket.receive_until("done")
    done = frames[-1]
    await socket.close()
    reply = await Message.objects.aget(id=queued["reply_id"])

    again = await ChatSocket.open(reply.conversation_id, user=alice)
    hello = await again.receive()
    await again.send({"type": "resume", "job_id": queued["job_id"], "after": done["seq"]})
    from_database = await again.receive()
    await again.send({"type": "resume", "job_id": queued["job_id"], "after": 0})
    # A next reply's frames come after anything the second resume would have sent.
    following = await message_queued(again, "Next")
    later = await again.receive_until("done")
    await again.close()

    assert hello["active_job_id"] is None
    assert from_database == {k: v for k, v in done.items() if k != "seq"}
    assert {f["job_id"] for f in later} == {following["job_id"]}, "the done came twice"


async def test_resume_from_the_start_replays_every_frame(alice, fake_llm, worker):
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    frames = await socket.receive_until("done")
    await socket.close()
    reply = await Message.objects.aget(id=queued["reply_id"])

    again = await ChatSocket.open(reply.conversation_id, user=alice)
    await again.receive()
    await again.send({"type": "resume", "job_id": queued["job_id"], "after": 0})
    replayed = await again.receive_until("done")
    await again.close()

    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert replayed == frames


async def test_cancel_closes_the_provider_stream_and_keeps_the_partial_answer(
    alice, fake_llm, worker
):
    fake_llm.default = Behaviour(tokens=TOKENS * 4, interval=0.05)
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    for _ in range(3):
        await socket.receive()

    cancelled_at = time.monotonic()
    await socket.send({"type": "cancel", "job_id": queued["job_id"]})
    frames = await socket.receive_until("done")
    # Recorded only for a client that left mid-answer: the stream had six seconds to go.
    provider_gone_at = await asyncio.to_thread(fake_llm.wait_for_disconnect, 10)

    assert cancelled_at <= provider_gone_at < cancelled_at + 3.0
    done = frames[-1]
    assert done["status"] == "cancelled"
    assert 0 < len(done["content"]) < len(ANSWER * 4)
    assert (ANSWER * 4).startswith(done["content"])
    assert answer_of(socket.frames, queued["job_id"]) == done["content"]
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.status, reply.content) == ("cancelled", done["content"])
    await socket.close()


async def test_cancelling_a_queued_reply_never_calls_the_provider(
    alice, fake_llm, service_env, start_worker
):
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    await socket.send({"type": "cancel", "job_id": queued["job_id"]})
    done = await socket.receive()
    worker = await asyncio.to_thread(start_worker, "late")
    await asyncio.to_thread(
        worker.wait_for_line, f"job {queued['job_id']}: acknowledged \\(reply already finished\\)"
    )

    assert (done["type"], done["status"], done["content"]) == ("done", "cancelled", "")
    assert fake_llm.requests == []
    [reply] = await _replies_for(queued["job_id"])
    assert reply.status == "cancelled"
    await socket.close()


async def test_a_cancel_found_as_the_attempt_begins_stops_the_reply(
    alice, fake_llm, service_env, start_worker
):
    # The cancel was asked while no worker listened for it: the attempt finds its key. The
    # request goes out meanwhile; a token that beats the attempt script is kept, as with any
    # cancel, and the rest of the 3-second answer is never read.
    fake_llm.default = Behaviour(tokens=TOKENS, interval=0.1)
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await redis_get().set(reply_cancel_key(queued["job_id"]), "1")
    await asyncio.to_thread(start_worker, "late")
    done = (await socket.receive_until("done"))[-1]
    if fake_llm.requests:  # it reached the model before the script answered: closed early
        await asyncio.to_thread(fake_llm.wait_for_disconnect, 10)

    assert done["status"] == "cancelled"
    assert done["content"] == answer_of(socket.frames, queued["job_id"])
    assert len(done["content"]) < len(ANSWER) / 4
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.status, reply.content) == ("cancelled", done["content"])
    await socket.close()


async def test_sigterm_hands_unfinished_replies_to_another_worker(
    alice, fake_llm, short_lease, start_worker
):
    fake_llm.default = Behaviour(tokens=TOKENS, interval=0.1)
    leaving = await asyncio.to_thread(start_worker, "leaving", grace=0.5)
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await socket.receive()

    leaving.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(leaving.wait) == 0
    await asyncio.to_thread(start_worker, "staying")
    frames = await socket.receive_until("done", timeout=30)

    assert "left 1 jobs for other workers" in leaving.output
    assert "Traceback" not in leaving.output
    assert answer_of(socket.frames, queued["job_id"]) == frames[-1]["content"] == ANSWER
    await socket.close()


def _next_worker_stalls(env: dict[str, str], *, faults: str = "") -> None:
    """The next worker started is going to stall: a long lease, so that its own renewal is
    not due when it wakes and what stops its writes is the fence under test, not a lost
    lease."""
    env.update(LLM_JOB_LEASE_SECONDS="60", GRIZZ_FAULTS=faults)


def _next_worker_takes_over(env: dict[str, str], *, faults: str = "") -> None:
    """The next worker takes over jobs whose lease (one second) has passed."""
    env.update(LLM_JOB_LEASE_SECONDS="1", GRIZZ_FAULTS=faults)


def _consumer_name(worker: ServiceProcess) -> str:
    return worker.args[3].removeprefix("--name=")


async def _sentinel_reply(socket: ChatSocket) -> list[dict[str, Any]]:
    """Frames of a next reply on the conversation, published after anything sent before:
    once it is done, a frame from earlier would have arrived."""
    following = await message_queued(socket, "Next")
    frames = await socket.receive_until("done", timeout=30)
    assert frames[-1]["job_id"] == following["job_id"]
    return frames


async def test_a_worker_woken_after_its_lease_sends_no_frame(
    alice, fake_llm, short_lease, start_worker
):
    fake_llm.enqueue(Behaviour(tokens=[" stale"] * 30, interval=0.05))
    fake_llm.default = Behaviour(reply="The fresh answer.")
    _next_worker_stalls(short_lease)
    stalled = await asyncio.to_thread(start_worker, "stalled")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await socket.receive()

    stalled.send_signal(signal.SIGSTOP)
    _next_worker_takes_over(short_lease)
    await asyncio.to_thread(start_worker, "fresh")
    frames = await socket.receive_until("done", timeout=30)
    stalled.send_signal(signal.SIGCONT)
    # It wakes mid-stream, and its next delta is refused by the frame fence.
    await asyncio.to_thread(stalled.wait_for_line, "attempt 1 was superseded")
    later = await _sentinel_reply(socket)

    assert frames[-1]["content"] == "The fresh answer."
    assert answer_of(socket.frames, queued["job_id"]) == "The fresh answer."
    assert queued["job_id"] not in {f.get("job_id") for f in later}, "stale frames arrived"
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.status, reply.content, reply.attempt) == ("complete", "The fresh answer.", 2)
    await socket.close()


async def test_a_worker_woken_after_its_lease_cannot_save_its_answer(
    alice, fake_llm, short_lease, start_worker
):
    fake_llm.enqueue(Behaviour(reply="The stale answer."), Behaviour(tokens=TOKENS, hold_after=3))
    _next_worker_stalls(short_lease, faults="before_reply_complete:stop")
    stalled = await asyncio.to_thread(start_worker, "stalled")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await asyncio.to_thread(stalled.wait_for_line, "fault: stopped at before_reply_complete")

    _next_worker_takes_over(short_lease)
    await asyncio.to_thread(start_worker, "fresh")
    # The second attempt is streaming (held by the fake) when the first one wakes up and
    # tries to save its whole answer: only the attempt number in PostgreSQL refuses it.
    await asyncio.to_thread(fake_llm.wait_for_requests, 2, 30)
    stalled.send_signal(signal.SIGCONT)
    await asyncio.to_thread(stalled.wait_for_line, "attempt 1 was superseded")
    await asyncio.to_thread(fake_llm.release)
    frames = await socket.receive_until("done", timeout=30)

    assert "restart" in [f["type"] for f in frames]  # after the stale text
    assert answer_of(socket.frames, queued["job_id"]) == frames[-1]["content"] == ANSWER
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.status, reply.content, reply.attempt) == ("complete", ANSWER, 2)
    await socket.close()


async def test_a_worker_woken_after_its_lease_cannot_acknowledge_the_job(
    alice, fake_llm, short_lease, start_worker
):
    faults = "after_commit_before_ack:stop"
    _next_worker_stalls(short_lease, faults=faults)
    stalled = await asyncio.to_thread(start_worker, "stalled")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    done = (await socket.receive_until("done"))[-1]
    await asyncio.to_thread(stalled.wait_for_line, "fault: stopped at after_commit_before_ack")
    # The job is taken over; the new owner finds the reply finished and stops before its
    # own acknowledgement: the entry is pending under its name when the first one wakes.
    _next_worker_takes_over(short_lease, faults=faults)
    fresh = await asyncio.to_thread(start_worker, "fresh")
    await asyncio.to_thread(fresh.wait_for_line, "fault: stopped at after_commit_before_ack")

    stalled.send_signal(signal.SIGCONT)
    await asyncio.to_thread(stalled.wait_for_line, "taken over meanwhile; not acknowledged")
    [pending] = await redis_get().xpending_range(jobs_stream_key(), WORKER_GROUP, "-", "+", 10)
    fresh.send_signal(signal.SIGCONT)
    await asyncio.to_thread(fresh.wait_for_line, "acknowledged \\(reply already finished\\)")

    assert pending["consumer"] == _consumer_name(fresh)
    assert await redis_get().xlen(jobs_stream_key()) == 0
    assert "not acknowledged" not in fresh.output
    assert [f["type"] for f in socket.frames].count("done") == 1
    assert (done["job_id"], done["content"]) == (queued["job_id"], FAKE_ANSWER)
    assert len(fake_llm.requests) == 1
    await socket.close()


async def test_a_worker_killed_after_saving_the_answer_leaves_no_socket_waiting(
    alice, fake_llm, short_lease, start_worker
):
    short_lease["GRIZZ_FAULTS"] = "before_final_frame"
    crashing = await asyncio.to_thread(start_worker, "crashing")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    assert await asyncio.to_thread(crashing.wait) == 137

    short_lease["GRIZZ_FAULTS"] = ""
    await asyncio.to_thread(start_worker, "survivor")
    done = (await socket.receive_until("done", timeout=30))[-1]

    assert done["content"] == answer_of(socket.frames, queued["job_id"]) == FAKE_ANSWER
    assert done["seq"] == max(f.get("seq", 0) for f in socket.frames)
    assert len(fake_llm.requests) == 1
    await socket.close()


async def test_a_worker_woken_after_saving_the_answer_sends_no_second_final_frame(
    alice, fake_llm, short_lease, start_worker
):
    faults = "before_final_frame:stop"
    _next_worker_stalls(short_lease, faults=faults)
    stalled = await asyncio.to_thread(start_worker, "stalled")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await asyncio.to_thread(stalled.wait_for_line, "fault: stopped at before_final_frame")
    _next_worker_takes_over(short_lease)
    await asyncio.to_thread(start_worker, "fresh")
    done = (await socket.receive_until("done", timeout=30))[-1]

    stalled.send_signal(signal.SIGCONT)
    await asyncio.to_thread(stalled.wait_for_line, "attempt 1 was superseded")
    later = await _sentinel_reply(socket)
    log = cast(StreamEntries, await redis_get().xrange(reply_log_key(queued["job_id"])))

    assert done["content"] == answer_of(socket.frames, queued["job_id"]) == FAKE_ANSWER
    assert queued["job_id"] not in {f.get("job_id") for f in later}, "a second final frame"
    assert [json.loads(fields["f"])["type"] for _, fields in log].count("done") == 1
    await socket.close()


async def test_a_crash_between_commit_and_ack_calls_no_provider_again(
    alice, fake_llm, short_lease, start_worker
):
    short_lease["GRIZZ_FAULTS"] = "after_commit_before_ack"
    crashing = await asyncio.to_thread(start_worker, "crashing")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await socket.receive_until("done")
    assert await asyncio.to_thread(crashing.wait) == 137

    short_lease["GRIZZ_FAULTS"] = ""
    survivor = await asyncio.to_thread(start_worker, "survivor")
    await asyncio.to_thread(
        survivor.wait_for_line, f"job {queued['job_id']}: acknowledged \\(reply already finished\\)"
    )

    assert len(fake_llm.requests) == 1
    assert await redis_get().xlen(jobs_stream_key()) == 0
    [reply] = await _replies_for(queued["job_id"])
    assert reply.attempt == 1
    await socket.close()


async def test_a_job_delivered_too_often_goes_to_the_dead_letters(
    alice, fake_llm, short_lease, start_worker
):
    short_lease["LLM_MAX_ATTEMPTS"] = "1"
    fake_llm.default = Behaviour(tokens=TOKENS, interval=0.05)
    doomed = await asyncio.to_thread(start_worker, "doomed")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await socket.receive()

    await asyncio.to_thread(doomed.kill)
    await asyncio.to_thread(start_worker, "undertaker")
    error = (await socket.receive_until("error", timeout=30))[-1]

    assert (error["code"], error["job_id"]) == ("llm_error", queued["job_id"])
    [reply] = await _replies_for(queued["job_id"])
    assert reply.status == "failed"
    [dead] = await dead_letters_once_written()
    assert (dead["job_id"], dead["attempts"]) == (queued["job_id"], "2")
    assert "LLM_MAX_ATTEMPTS" in dead["reason"]
    await socket.close()


async def test_a_pending_job_deleted_from_the_stream_fails_its_reply(
    alice, fake_llm, short_lease, start_worker
):
    fake_llm.default = Behaviour(tokens=TOKENS, interval=0.05)
    first = await asyncio.to_thread(start_worker, "first")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await socket.receive()
    await asyncio.to_thread(first.kill)
    # The entry is trimmed away while still pending (MAXLEN, XDEL by an operator).
    [(entry_id, _)] = cast(StreamEntries, await redis_get().xrange(jobs_stream_key()))
    await redis_get().xdel(jobs_stream_key(), entry_id)

    await asyncio.to_thread(start_worker, "second")
    error = (await socket.receive_until("error", timeout=30))[-1]

    assert (error["code"], error["job_id"]) == ("llm_error", queued["job_id"])
    [reply] = await _replies_for(queued["job_id"])
    assert reply.status == "failed"
    assert "lost by the queue" in reply.error
    await socket.close()


async def test_it_enqueues_a_reply_whose_web_process_died_and_frees_the_users_slot(
    alice, fake_llm, fast_reconciler, start_worker, settings
):
    settings.CHAT_MAX_INFLIGHT_PER_USER = 1
    conversation = await sync_to_async(conversation_create)(owner=alice)
    lost = await sent_by_a_web_process_that_died(alice, conversation)
    socket = await chat_opened(alice, conversation.id)
    await socket.send({"type": "message", "content": "Again?"})
    held = await socket.receive()

    await asyncio.to_thread(start_worker, "reconciling")
    done = (await socket.receive_until("done", timeout=30))[-1]
    again = await message_queued(socket, "Next")
    await socket.receive_until("done", timeout=30)

    assert (held["type"], held["code"]) == ("error", "rate_limited")  # the slot was held
    assert (done["job_id"], done["status"]) == (str(lost.reply.job_id), "complete")
    assert again["job_id"] != done["job_id"]
    assert [await _entries_ever_added(p) for p in ("normal", "high")] == [2, 0]
    await socket.close()


async def test_it_enqueues_a_staff_reply_found_by_the_reconciler_on_the_high_stream(
    root, fake_llm, fast_reconciler, start_worker
):
    conversation = await sync_to_async(conversation_create)(owner=root)
    lost = await sent_by_a_web_process_that_died(root, conversation)
    socket = await chat_opened(root, conversation.id)

    await asyncio.to_thread(start_worker, "reconciling")
    done = (await socket.receive_until("done", timeout=30))[-1]

    assert (done["job_id"], done["status"]) == (str(lost.reply.job_id), "complete")
    assert [await _entries_ever_added(p) for p in ("normal", "high")] == [0, 1]
    await socket.close()


# Which provider errors are retried


async def test_it_retries_timeouts_conflicts_rate_limits_and_server_errors(alice, fake_llm, worker):
    statuses = [408, 409, 429, 500, 503]
    socket = await chat_opened(alice)

    answers = []
    for status in statuses:
        fake_llm.enqueue(Behaviour(status=status), Behaviour(reply=f"After {status}."))
        queued = await message_queued(socket, f"Try {status}")
        frames = await socket.receive_until("done", timeout=30)
        answers.append(answer_of(frames, queued["job_id"]))

    assert answers == [f"After {status}." for status in statuses]
    assert not any(f["type"] == "error" for f in socket.frames)
    assert len(fake_llm.requests) == 2 * len(statuses)
    await socket.close()


async def test_it_does_not_retry_refused_credentials_permissions_or_unknown_models(
    alice, fake_llm, worker
):
    statuses = [401, 403, 404]
    socket = await chat_opened(alice)

    errors, job_ids = [], []
    for status in statuses:
        fake_llm.enqueue(Behaviour(status=status, error_message=f"Refused with {status}"))
        job_ids.append((await message_queued(socket, f"Try {status}"))["job_id"])
        errors.append((await socket.receive_until("error", timeout=30))[-1])
    dead = await dead_letters_once_written(len(statuses))

    assert [e["code"] for e in errors] == ["llm_error"] * len(statuses)
    assert [e["job_id"] for e in errors] == job_ids
    for status, error in zip(statuses, errors, strict=True):
        assert f"({status}): Refused with {status}" in error["message"]
    assert len(fake_llm.requests) == len(statuses)
    assert [d["job_id"] for d in dead] == job_ids
    await socket.close()


async def test_exhausted_retries_end_in_the_dead_letters_and_leave_the_queue(
    alice, fake_llm, service_env, start_worker
):
    service_env["LLM_RETRY_LIMIT"] = "2"
    fake_llm.default = Behaviour(status=503, error_message="Down for maintenance")
    await asyncio.to_thread(start_worker, "retrying")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)

    frames = await socket.receive_until("error", timeout=30)
    [dead] = await dead_letters_once_written()

    assert [f["type"] for f in frames] == ["error"]  # the retries were not shown
    assert (frames[0]["code"], frames[0]["job_id"]) == ("llm_error", queued["job_id"])
    assert "Down for maintenance" in frames[0]["message"]
    assert len(fake_llm.requests) == 3
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.status, reply.error) == ("failed", frames[0]["message"])
    assert (dead["job_id"], dead["reason"], dead["attempts"]) == (
        queued["job_id"],
        frames[0]["message"],
        "1",
    )
    # Acknowledged with the dead letter: nothing is left for a worker to take over.
    assert await redis_get().xlen(jobs_stream_key()) == 0
    assert (await redis_get().xpending(jobs_stream_key(), WORKER_GROUP))["pending"] == 0
    await socket.close()


# Restarts and the reconciler


async def test_a_worker_restarted_under_its_name_resumes_its_jobs_at_once(
    alice, fake_llm, service_env, start_worker
):
    first, socket, queued = await reply_streaming_on_a_long_lease(
        alice, fake_llm, service_env, lambda: start_worker("steady")
    )

    await asyncio.to_thread(first.kill)
    again = await asyncio.to_thread(start_worker, "steady")

    await reply_completed_once(socket, queued["job_id"])
    assert "took over" not in again.output
    await socket.close()


async def test_the_reconciler_restarts_a_reply_that_was_streaming(
    alice, fake_llm, fast_reconciler, start_worker
):
    fake_llm.enqueue(Behaviour(tokens=TOKENS, hold_after=3))
    fake_llm.default = Behaviour(tokens=TOKENS)
    first = await asyncio.to_thread(start_worker, "first")
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    await socket.receive()  # text is streaming
    await asyncio.to_thread(first.kill)
    # Redis loses the job stream (and its group) while PostgreSQL has the reply streaming.
    await redis_get().delete(jobs_stream_key())
    [streaming] = await _replies_for(queued["job_id"])

    second = await asyncio.to_thread(start_worker, "second")
    frames = await socket.receive_until("done", timeout=30)

    assert streaming.status == "streaming"
    assert "restart" in [f["type"] for f in frames]
    assert answer_of(socket.frames, queued["job_id"]) == frames[-1]["content"] == ANSWER
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.status, reply.attempt) == ("complete", 2)
    assert f"job {queued['job_id']}: found without a queue entry" in second.output
    await socket.close()


async def test_one_worker_at_a_time_reconciles(alice, fake_llm, fast_reconciler, start_worker):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    lost = await sent_by_a_web_process_that_died(alice, conversation)
    # Long orphaned already: each worker's first reconciliation finds it.
    await Message.objects.filter(id=lost.reply.id).aupdate(
        updated_at=lost.reply.updated_at - timedelta(minutes=1)
    )
    socket = await chat_opened(alice, conversation.id)
    fast_reconciler["GRIZZ_FAULTS"] = "maintenance:stop"
    workers = [await asyncio.to_thread(start_worker, name) for name in ("one", "two")]
    for worker in workers:
        await asyncio.to_thread(worker.wait_for_line, "fault: stopped at maintenance")

    # Both go on at the same moment into their first maintenance round: only the lease keeps
    # the second from finding the reply still orphaned and enqueueing it too.
    for worker in workers:
        worker.send_signal(signal.SIGCONT)
    done = (await socket.receive_until("done", timeout=30))[-1]

    assert (done["job_id"], done["status"]) == (str(lost.reply.job_id), "complete")
    assert sum(w.output.count("found without a queue entry") for w in workers) == 1
    assert await _entries_ever_added("normal") == 1
    assert len(fake_llm.requests) == 1
    await socket.close()


# Cancel


async def test_it_cancels_from_a_second_socket_and_every_socket_gets_done(alice, fake_llm, worker):
    fake_llm.default = Behaviour(tokens=TOKENS, hold_after=3)
    conversation = await sync_to_async(conversation_create)(owner=alice)
    sending = await chat_opened(alice, conversation.id)
    watching = await chat_opened(alice, conversation.id)
    queued = await message_queued(sending)
    while answer_of(sending.frames, queued["job_id"]) != "".join(TOKENS[:3]):
        await sending.receive()

    await watching.send({"type": "cancel", "job_id": queued["job_id"]})
    dones = [(await s.receive_until("done"))[-1] for s in (sending, watching)]

    for done in dones:
        assert (done["job_id"], done["status"], done["content"]) == (
            queued["job_id"],
            "cancelled",
            "".join(TOKENS[:3]),
        )
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.status, reply.content) == ("cancelled", "".join(TOKENS[:3]))
    for socket in (sending, watching):
        await socket.close()


async def test_cancelling_a_finished_reply_says_it_has_finished(alice, fake_llm, worker):
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    done = (await socket.receive_until("done"))[-1]

    await socket.send({"type": "cancel", "job_id": queued["job_id"]})
    answer = await socket.receive()

    assert answer == {
        "type": "error",
        "code": "finished",
        "message": "The reply has already finished.",
        "job_id": queued["job_id"],
        "status": "complete",
    }
    [reply] = await _replies_for(queued["job_id"])
    assert (reply.status, reply.content) == ("complete", done["content"])
    await socket.close()


# Resume of finished replies


async def _resumed_from_the_start(
    conversation_id: object, user: User, job_id: str
) -> dict[str, Any]:
    """What a new socket gets for a finished reply it resumes from seq 0: its final frame."""
    socket = await ChatSocket.open(conversation_id, user=user)
    await socket.receive()  # hello
    await socket.send({"type": "resume", "job_id": job_id, "after": 0})
    final = await socket.receive()
    await socket.close()
    return final


async def test_resuming_a_failed_reply_returns_its_error(alice, fake_llm, worker):
    fake_llm.enqueue(Behaviour(status=400, error_message="Bad prompt"))
    conversation = await sync_to_async(conversation_create)(owner=alice)
    socket = await chat_opened(alice, conversation.id)
    queued = await message_queued(socket)
    error = (await socket.receive_until("error"))[-1]
    await socket.close()

    from_log = await _resumed_from_the_start(conversation.id, alice, queued["job_id"])
    await redis_get().delete(reply_log_key(queued["job_id"]))  # the replay log expires
    from_database = await _resumed_from_the_start(conversation.id, alice, queued["job_id"])

    assert from_log == error
    assert from_database == {k: v for k, v in error.items() if k != "seq"}


async def test_resuming_a_reply_saved_before_its_final_frame_is_sent_gets_that_frame(alice):
    # The test plays a worker between saving the answer and sending its final frame.
    conversation = await sync_to_async(conversation_create)(owner=alice)
    sent = await sync_to_async(message_send)(conversation=conversation, content="Hi")
    start = await sync_to_async(reply_start)(reply_id=sent.reply.id, default_model="m")
    assert start is not None
    job_id = str(sent.reply.job_id)
    publisher = ReplyPublisher(
        job_id=job_id, conversation_id=str(conversation.id), client=redis_get()
    )
    await publisher.attempt_begin(start.attempt)
    await publisher.delta("Bears eat ")
    await publisher.delta("berries.")
    await sync_to_async(reply_complete)(
        reply_id=sent.reply.id, attempt=start.attempt, content="Bears eat berries.", usage=None
    )
    socket = await chat_opened(alice, conversation.id)

    await socket.send({"type": "resume", "job_id": job_id, "after": 1})
    replayed = await socket.receive()
    await publisher.done(
        reply_id=str(sent.reply.id), status="complete", content="Bears eat berries.", usage=None
    )
    final = await socket.receive()

    assert (replayed["seq"], replayed["content"]) == (2, "berries.")
    assert (final["type"], final.get("seq"), final["content"]) == ("done", 3, "Bears eat berries.")
    assert await socket.nothing_received(), "the final frame came twice"
    await socket.close()


async def test_resuming_a_reply_ended_before_its_log_began_gets_its_end_once(alice):
    # A reply cancelled while queued: saved as cancelled, its done not yet sent, when a socket
    # resumes it. With no log, the socket gets PostgreSQL's end; the done that follows is not
    # sent again (the title published after it comes next).
    conversation = await sync_to_async(conversation_create)(owner=alice)
    sent = await sync_to_async(message_send)(conversation=conversation, content="Hi")
    assert await sync_to_async(reply_cancel_queued)(reply_id=sent.reply.id)
    job_id = str(sent.reply.job_id)
    socket = await chat_opened(alice, conversation.id)

    await socket.send({"type": "resume", "job_id": job_id, "after": 0})
    from_database = await socket.receive()
    publisher = ReplyPublisher(
        job_id=job_id, conversation_id=str(conversation.id), client=redis_get()
    )
    await publisher.done(reply_id=str(sent.reply.id), status="cancelled", content="", usage=None)
    await conversation_title_announce(conversation_id=str(conversation.id), title="Bears")
    after = await socket.receive()

    assert (from_database["type"], from_database["status"]) == ("done", "cancelled")
    assert "seq" not in from_database
    assert after == {"type": "title", "conversation_id": str(conversation.id), "title": "Bears"}
    await socket.close()


async def test_resuming_after_the_replay_log_expired_returns_the_answer(alice, fake_llm, worker):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    socket = await chat_opened(alice, conversation.id)
    queued = await message_queued(socket)
    done = (await socket.receive_until("done"))[-1]
    await socket.close()

    await redis_get().delete(reply_log_key(queued["job_id"]))  # the replay log expires
    from_database = await _resumed_from_the_start(conversation.id, alice, queued["job_id"])

    assert from_database == {k: v for k, v in done.items() if k != "seq"}
    assert from_database["content"] == FAKE_ANSWER
