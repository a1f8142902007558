"""The whole path, with no shortcut: socket → PostgreSQL → Redis Stream → run_llm_worker
process → the loopback OpenAI-compatible server → back to every socket on the conversation."""

import asyncio
import json
import signal
from collections.abc import Callable
from typing import Any, cast

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.conf import settings
from redis.asyncio import Connection

from chat.models import Message
from chat.services import conversation_create
from llmworker import replies
from llmworker.redis import StreamsRead, redis_get, reply_log_key
from llmworker.replies import reply_hub_get
from tests.support.fake_openai import Behaviour, FakeOpenAI
from tests.support.sockets import ChatSocket, answer_of, chat_opened, message_queued, token_for

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


async def test_it_streams_text_beyond_ascii_intact(alice, fake_llm, worker):
    # Every frame's text is counted in bytes on its way through Redis: accents, emoji and
    # CJK are several bytes a character.
    tokens = ["Ça", " va", " très", " bien", " 🙂", " 日本語", " ✓"]
    fake_llm.default = Behaviour(tokens=tokens, interval=0.01)
    conversation = await _conversation(alice)
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()

    await socket.send({"type": "message", "content": "Comment ça va ? 👋"})
    frames = await socket.receive_until("done")

    queued = next(frame for frame in frames if frame["type"] == "queued")
    assert answer_of(frames, queued["job_id"]) == "".join(tokens)
    assert frames[-1]["content"] == "".join(tokens)
    reply = await Message.objects.aget(id=queued["reply_id"])
    assert reply.content == "".join(tokens)
    assert fake_llm.requests[0]["messages"][-1]["content"] == "Comment ça va ? 👋"


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


async def test_it_keeps_the_providers_connection_for_the_next_reply(alice, fake_llm, worker):
    # A response closed before the end of its body closes its connection: every reply would
    # then pay a new TCP (and, to a real provider, TLS) handshake before its first token.
    socket = await chat_opened(alice)
    for text in ("One?", "Two?", "Three?"):
        await socket.send({"type": "message", "content": text})
        assert (await socket.receive_until("done"))[-1]["status"] == "complete"
    assert len(fake_llm.requests) == 3
    assert fake_llm.connection_count == 1
    await socket.close()


async def test_it_streams_to_every_socket_of_the_conversation_only(alice, bob, fake_llm, worker):
    fake_llm.default = Behaviour(reply=REPLY, interval=0.01)
    conversation = await _conversation(alice)
    first_tab = await chat_opened(alice, conversation.id)
    second_tab = await chat_opened(alice, conversation.id)
    # A socket on another conversation of alice's and one on bob's, each with a second tab
    # of its own that will speak once the reply is over.
    elsewhere = [await chat_opened(alice), await chat_opened(bob)]
    speakers = [
        await chat_opened(alice, elsewhere[0].conversation_id),
        await chat_opened(bob, elsewhere[1].conversation_id),
    ]

    await first_tab.send({"type": "message", "content": "Hello to both tabs"})
    first = await first_tab.receive_until("done")
    second = await second_tab.receive_until("done")
    for speaker in speakers:
        await message_queued(speaker, "After the reply")

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
        # One pub/sub connection carries every conversation's frames, in publish order:
        # had this socket been sent the reply's frames, they would come before this one.
        frame = await socket.receive()
        assert (frame["type"], frame["content"]) == ("user_message", "After the reply")
    for socket in (first_tab, second_tab, *elsewhere, *speakers):
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


async def _sent_from_a_slow_socket(
    user, daphne, *, held_model: FakeOpenAI | None = None
) -> tuple[ChatSocket, dict[str, Any], list[dict[str, Any]]]:
    """A message sent over a real socket that then reads nothing until another socket of
    the conversation has seen the whole reply: every frame must wait for it in the server's
    buffers, none may be dropped. The watching socket, the `queued` frame, the slow
    socket's frames. A `held_model` is released once the watcher has the first delta."""
    conversation = await _conversation(user)
    url = f"ws://127.0.0.1:{daphne.port}/ws/chat/{conversation.id}/?token={token_for(user)}"
    watcher = await ChatSocket.open(conversation.id, user=user)
    await watcher.receive()
    async with websockets.connect(url, max_queue=None) as slow:
        await slow.recv()  # hello
        await slow.send(json.dumps({"type": "message", "content": "Count"}))
        queued = json.loads(await slow.recv())
        if held_model is not None:
            await watcher.receive_until("delta")
            held_model.release()
        await watcher.receive_until("done")
        return watcher, queued, await _ws_frames_until_done(slow)


async def test_it_delivers_a_long_reply_to_a_socket_that_reads_late(
    alice, fake_llm, daphne, worker
):
    tokens = [f" t{i}" for i in range(1000)]
    fake_llm.default = Behaviour(tokens=tokens)

    watcher, queued, frames = await _sent_from_a_slow_socket(alice, daphne)

    assert answer_of(frames, queued["job_id"]) == "".join(tokens)
    assert frames[-1]["content"] == "".join(tokens)
    await watcher.close()


async def test_a_coalescing_window_merges_deltas_without_reordering_or_dropping_any(
    alice, fake_llm, daphne, service_env, start_worker
):
    service_env["LLM_FRAME_BATCH_MS"] = "30"
    await asyncio.to_thread(start_worker, "coalescing")
    tokens = [f" t{i}" for i in range(2000)]
    # The first token, then nothing until the watcher has it: held back, it never would.
    fake_llm.default = Behaviour(tokens=tokens, hold_after=1, interval=0.002)

    watcher, queued, slow_frames = await _sent_from_a_slow_socket(
        alice, daphne, held_model=fake_llm
    )

    for frames in (watcher.frames, slow_frames):
        reply = [f for f in frames if f.get("job_id") == queued["job_id"] and "seq" in f]
        deltas = [f for f in reply if f["type"] == "delta"]
        assert [f["seq"] for f in reply] == list(range(1, len(reply) + 1))
        assert "".join(f["content"] for f in deltas) == "".join(tokens)
        assert deltas[0]["content"] == tokens[0]  # the first is never held back
        assert len(deltas) < len(tokens) / 5  # the window merged them
        assert reply[-1]["content"] == "".join(tokens)
    await watcher.close()


async def test_a_busy_worker_merges_each_replys_deltas_within_its_window(
    alice, fake_llm, worker, limits
):
    # 20 replies of a token every 5 ms: 4,000 frames a second if each token went alone, far
    # above what makes a worker busy. The window (LLM_DELTA_WINDOW_MS, 30 by default) then
    # sends each reply's deltas at most every 30 ms, several tokens to a frame however late
    # the tokens come on a loaded machine; the round spacing alone (5 ms) merges few.
    tokens = [f" w{i}" for i in range(150)]
    fake_llm.default = Behaviour(tokens=tokens, ttft=0.05, interval=0.005)
    sockets = [await chat_opened(alice) for _ in range(20)]

    for socket in sockets:
        await socket.send({"type": "message", "content": "Go"})
    replies = [await socket.receive_until("done") for socket in sockets]

    deltas_sent = 0
    for frames in replies:
        reply = [f for f in frames if "seq" in f]
        deltas = [f for f in reply if f["type"] == "delta"]
        assert [f["seq"] for f in reply] == list(range(1, len(reply) + 1))
        assert "".join(f["content"] for f in deltas) == "".join(tokens)
        assert deltas[0]["content"] == tokens[0]  # the first is never held back
        deltas_sent += len(deltas)
    assert deltas_sent < len(replies) * len(tokens) / 2
    for socket in sockets:
        await socket.close()


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
    # Markdown that the page renders, so that a first-time user sees it: a table, some code.
    assert "| --- | --- |" in done["content"]
    assert "```python\n" in done["content"]
    reply = await Message.objects.aget(id=done["reply_id"])
    assert reply.model == "grizz-demo"
    await socket.close()


async def test_it_recovers_frames_lost_with_the_pubsub_connection(
    alice, fake_llm, worker, monkeypatch
):
    tokens = [f" w{i}" for i in range(60)]
    fake_llm.default = Behaviour(tokens=tokens, hold_after=5)
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    while answer_of(socket.frames, queued["job_id"]) != "".join(tokens[:5]):
        await socket.receive()
    live = [f["seq"] for f in socket.frames if "seq" in f]
    hub_lost, hub_may_reconnect = _hub_reconnect_held(monkeypatch)

    # Redis drops this web process's pub/sub connection; the rest of the reply is generated
    # and published while the hub is away, so none of it can reach the socket live.
    # (Hubs of earlier tests' event loops may have left connections of that name too.)
    assert await _pubsub_connections_killed(f"grizz-hub:{settings.REDIS_KEY_PREFIX}") >= 1
    await asyncio.wait_for(hub_lost.wait(), 15)
    fake_llm.release()
    await _reply_logged_to_the_end(queued["job_id"])
    hub_may_reconnect.set()
    done = (await socket.receive_until("done"))[-1]

    seqs = [f["seq"] for f in socket.frames if "seq" in f]
    assert seqs == list(range(1, done["seq"] + 1))  # each once, in order, none missing
    assert done["seq"] > live[-1]  # frames came after the drop: from the replay log
    assert answer_of(socket.frames, queued["job_id"]) == done["content"] == "".join(tokens)
    await socket.close()


async def test_the_hub_checks_its_connection_when_quiet_and_goes_on(
    alice, fake_llm, worker, monkeypatch
):
    monkeypatch.setattr(replies, "HUB_QUIET_SECONDS", 0.05)
    fake_llm.default = Behaviour(reply=REPLY, interval=0.01)
    socket = await chat_opened(alice)
    connection = cast(Connection, reply_hub_get().pubsub.connection)
    connection.health_check_interval, connection.next_health_check = 0.05, 0

    # Nothing is published: the reader's wait ends and it sends its health check.
    hub = f"grizz-hub:{settings.REDIS_KEY_PREFIX}"
    await _until(lambda clients: any(c["cmd"] == "ping" for c in clients if c["name"] == hub))
    queued = await message_queued(socket)
    done = (await socket.receive_until("done"))[-1]

    assert done["status"] == "complete"
    assert answer_of(socket.frames, queued["job_id"]) == REPLY
    await socket.close()


async def _until(condition: Callable[[list[dict[str, Any]]], bool]) -> None:
    """Until Redis's client list meets `condition` (within 10 s); Redis has no event for it."""
    for _ in range(200):
        if condition(await redis_get().client_list()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("Redis's client list never showed it")


def _hub_reconnect_held(monkeypatch) -> tuple[asyncio.Event, asyncio.Event]:
    """This process's reply hub signals when it has lost its connection, and reconnects only
    once allowed: the test decides what is published while it is away."""
    hub = reply_hub_get()
    lost, may_reconnect = asyncio.Event(), asyncio.Event()
    reconnect = hub._reconnect

    async def held() -> None:
        lost.set()
        await may_reconnect.wait()
        await reconnect()

    monkeypatch.setattr(hub, "_reconnect", held)
    return lost, may_reconnect


async def _pubsub_connections_killed(name: str) -> int:
    # Only the connections of this run (the name holds its key prefix): other test runs
    # may share this Redis.
    redis = redis_get()
    mine = [client["id"] for client in await redis.client_list() if client["name"] == name]
    for client_id in mine:
        await redis.client_kill_filter(_id=client_id)
    return len(mine)


async def _reply_logged_to_the_end(job_id: str) -> None:
    """Until the reply's final frame is in its replay log (the worker published it)."""
    redis, last = redis_get(), "0"
    while True:
        streams = cast(StreamsRead, await redis.xread({reply_log_key(job_id): last}, block=30_000))
        assert streams, "the reply did not finish within 30 s"
        entries = streams[0][1]
        if any(json.loads(fields["f"])["type"] == "done" for _, fields in entries):
            return
        last = entries[-1][0]
