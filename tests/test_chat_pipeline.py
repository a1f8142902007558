"""The whole path, with no shortcut: socket → PostgreSQL → Redis Stream → run_llm_worker
process → the loopback OpenAI-compatible server → back to every socket on the conversation."""

import asyncio
import json
import signal
from typing import Any

import pytest
import websockets
from asgiref.sync import sync_to_async

from chat.models import Message
from chat.services import conversation_create
from llmworker.redis import redis_get
from tests.support.fake_openai import Behaviour
from tests.support.sockets import ChatSocket, answer_of, token_for

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

REPLY = "The quick brown fox jumps over the lazy dog."


async def _conversation(owner, **fields):
    return await sync_to_async(conversation_create)(owner=owner, **fields)


async def _ws_frames_until_done(ws) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
    return frames


async def test_it_streams_a_reply_through_daphne_and_a_worker(alice, fake_llm, daphne, worker):
    fake_llm.default = Behaviour(reply=REPLY, interval=0.01)
    conversation = await _conversation(alice, title="Foxes")
    url = f"ws://127.0.0.1:{daphne.port}/ws/chat/{conversation.id}/?token={token_for(alice)}"

    async with websockets.connect(url) as ws:
        hello = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "message", "content": "Tell me about foxes"}))
        frames = await _ws_frames_until_done(ws)

    queued, *deltas, done = frames
    assert hello["active_job_id"] is None
    assert queued["type"] == "queued"
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert answer_of(frames, queued["job_id"]) == REPLY
    assert done["status"] == "complete"
    assert done["content"] == REPLY
    assert done["reply_id"] == queued["reply_id"]
    assert done["usage"]["completion_tokens"] == len(Behaviour(reply=REPLY).token_list())
    reply = await Message.objects.aget(id=queued["reply_id"])
    assert (reply.status, reply.content, str(reply.job_id)) == ("complete", REPLY, queued["job_id"])
    assert reply.total_tokens == done["usage"]["total_tokens"]
    assert fake_llm.requests[0]["model"] == "fake-model"
    assert fake_llm.requests[0]["messages"] == [{"role": "user", "content": "Tell me about foxes"}]


async def test_it_sends_the_earlier_turns_in_the_prompt(alice, fake_llm, worker):
    fake_llm.enqueue(Behaviour(reply="First answer."), Behaviour(reply="Second answer."))
    conversation = await _conversation(alice, system_prompt="Be brief.")
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()

    for text in ("One?", "Two?"):
        await socket.send({"type": "message", "content": text})
        await socket.receive_until("done")

    assert fake_llm.requests[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "One?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Two?"},
    ]
    await socket.close()


async def test_it_streams_to_every_socket_of_the_conversation_only(alice, bob, fake_llm, worker):
    fake_llm.default = Behaviour(reply=REPLY, interval=0.01)
    conversation = await _conversation(alice)
    alices_other = await _conversation(alice)
    bobs = await _conversation(bob)
    first_tab = await ChatSocket.open(conversation.id, user=alice)
    second_tab = await ChatSocket.open(conversation.id, user=alice)
    elsewhere = [
        await ChatSocket.open(alices_other.id, user=alice),
        await ChatSocket.open(bobs.id, user=bob),
    ]
    for socket in (first_tab, second_tab, *elsewhere):
        await socket.receive()  # hello

    await first_tab.send({"type": "message", "content": "Hello to both tabs"})
    first = await first_tab.receive_until("done")
    second = await second_tab.receive_until("done")

    job_id = first[0]["job_id"]
    assert second[0] == {
        "type": "user_message",
        "job_id": job_id,
        "message_id": first[0]["message_id"],
        "reply_id": first[0]["reply_id"],
        "content": "Hello to both tabs",
    }
    assert answer_of(first, job_id) == answer_of(second, job_id) == REPLY
    assert second[-1] == first[-1]
    for socket in elsewhere:
        # Frames reach every socket through one reader, in order: had these sockets been
        # subscribed, the frames would be in their queues by now.
        assert await socket.nothing_received()
    for socket in (first_tab, second_tab, *elsewhere):
        await socket.close()


async def test_it_reports_a_provider_refusal_as_llm_error(alice, fake_llm, worker):
    fake_llm.enqueue(Behaviour(status=400, error_message="This model does not exist"))
    conversation = await _conversation(alice)
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()

    await socket.send({"type": "message", "content": "Hi"})
    queued, error = await socket.receive_until("error")

    assert error["code"] == "llm_error"
    assert error["job_id"] == queued["job_id"]
    assert "This model does not exist" in error["message"]
    reply = await Message.objects.aget(id=queued["reply_id"])
    assert reply.status == "failed"
    assert "This model does not exist" in reply.error
    # The conversation is free again: the next message is accepted.
    await socket.send({"type": "message", "content": "Again"})
    assert (await socket.receive())["type"] == "queued"
    await socket.close()


async def test_it_delivers_a_long_reply_to_a_socket_that_reads_late(
    alice, fake_llm, daphne, worker
):
    tokens = [f" t{i}" for i in range(1000)]
    fake_llm.default = Behaviour(tokens=tokens)
    conversation = await _conversation(alice)
    url = f"ws://127.0.0.1:{daphne.port}/ws/chat/{conversation.id}/?token={token_for(alice)}"

    watcher = await ChatSocket.open(conversation.id, user=alice)
    await watcher.receive()

    async with websockets.connect(url, max_queue=None) as ws:
        await ws.recv()  # hello
        await ws.send(json.dumps({"type": "message", "content": "Count"}))
        queued = json.loads(await ws.recv())
        # This socket reads nothing until another one has seen the whole reply: every
        # frame must wait for it in the server's buffers, none may be dropped.
        await watcher.receive_until("done")
        frames = await _ws_frames_until_done(ws)

    assert answer_of(frames, queued["job_id"]) == "".join(tokens)
    assert frames[-1]["content"] == "".join(tokens)
    await watcher.close()


async def test_one_worker_carries_several_replies_at_once(alice, fake_llm, worker):
    fake_llm.default = Behaviour(tokens=[" x"] * 20, interval=0.1)
    sockets = []
    for _ in range(2):
        conversation = await _conversation(alice)
        socket = await ChatSocket.open(conversation.id, user=alice)
        await socket.receive()
        await socket.send({"type": "message", "content": "Go"})
        sockets.append(socket)

    await asyncio.to_thread(fake_llm.wait_for_requests, 2)
    # Each reply takes two seconds; both requests are in before the first one ended.
    assert fake_llm.active_streams == 2
    for socket in sockets:
        frames = await socket.receive_until("done")
        assert frames[-1]["content"] == " x" * 20
        await socket.close()


async def test_the_worker_finishes_its_replies_on_sigterm(alice, fake_llm, worker):
    fake_llm.default = Behaviour(tokens=[" y"] * 10, interval=0.1)
    conversation = await _conversation(alice)
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()
    await socket.send({"type": "message", "content": "Go"})
    await asyncio.to_thread(fake_llm.wait_for_requests, 1)

    worker.send_signal(signal.SIGTERM)
    frames = await socket.receive_until("done")

    assert frames[-1]["content"] == " y" * 10
    assert await asyncio.to_thread(worker.wait) == 0
    assert "Traceback" not in worker.output
    assert "stopped" in worker.output
    await socket.close()


async def test_the_demo_model_answers_without_an_api_key(alice, service_env, start_worker):
    service_env["OPENAI_API_KEY"] = ""
    await asyncio.to_thread(start_worker, "demo")
    conversation = await _conversation(alice)
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()

    await socket.send({"type": "message", "content": "Hi"})
    done = (await socket.receive_until("done"))[-1]

    assert done["content"].startswith("[Demo model]")
    reply = await Message.objects.aget(id=done["reply_id"])
    assert reply.model == "grizz-demo"
    await socket.close()


async def test_it_recovers_frames_lost_with_the_pubsub_connection(alice, fake_llm, worker):
    fake_llm.default = Behaviour(tokens=[f" w{i}" for i in range(60)], interval=0.02)
    conversation = await _conversation(alice)
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()
    await socket.send({"type": "message", "content": "Go"})
    queued = await socket.receive()
    await socket.receive()  # the first delta: the reply is streaming

    # Redis drops every pub/sub connection: frames published until the hub has
    # reconnected reach no socket live; they must come from the replay log.
    redis = redis_get()
    assert await redis.client_kill_filter(_type="pubsub") >= 1
    frames = await socket.receive_until("done")

    assert answer_of(socket.frames, queued["job_id"]) == "".join(f" w{i}" for i in range(60))
    assert frames[-1]["content"] == "".join(f" w{i}" for i in range(60))
    await socket.close()
