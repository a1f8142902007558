"""Hostile or careless clients: tokens kept out of logs, oversized and arbitrary frames,
idle sockets. None of it may raise, close another socket, or save a row it should not."""

import asyncio
import json

import pytest
import websockets
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from websockets.typing import Subprotocol

from chat.models import Message
from chat.services import conversation_create
from grizz.asgi import application
from tests.support.fake_openai import Behaviour
from tests.support.sockets import ChatSocket, token_for

pytestmark = [pytest.mark.django_db(transaction=True)]

KNOWN_ERROR_CODES = {"invalid", "too_long"}


@pytest.mark.asyncio
async def test_it_takes_the_token_as_a_subprotocol(alice, conversation):
    communicator = WebsocketCommunicator(
        application,
        f"/ws/chat/{conversation.id}/",
        subprotocols=["grizz", f"jwt.{token_for(alice)}"],
    )
    connected, subprotocol = await communicator.connect()
    hello = json.loads((await communicator.receive_output())["text"])
    await communicator.disconnect()

    assert connected
    assert subprotocol == "grizz"  # never the token
    assert hello["type"] == "hello"


@pytest.mark.asyncio
async def test_it_closes_4401_for_a_bad_subprotocol_token(conversation):
    communicator = WebsocketCommunicator(
        application, f"/ws/chat/{conversation.id}/", subprotocols=["grizz", "jwt.forged"]
    )
    await communicator.connect()
    output = await communicator.receive_output()
    assert (output["type"], output["code"]) == ("websocket.close", 4401)


@pytest.mark.asyncio
async def test_tokens_never_reach_the_logs(alice, fake_llm, daphne, worker):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    token = token_for(alice)
    base = f"ws://127.0.0.1:{daphne.port}/ws/chat/{conversation.id}/"
    async with websockets.connect(f"{base}?token={token}") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "message", "content": "Hi"}))
        while json.loads(await asyncio.wait_for(ws.recv(), 15))["type"] != "done":
            pass
    async with websockets.connect(
        base, subprotocols=[Subprotocol("grizz"), Subprotocol(f"jwt.{token}")]
    ) as ws:
        await ws.recv()
    async with websockets.connect(f"{base}?token=forged.{token[:20]}") as forged:
        await asyncio.wait_for(forged.wait_closed(), 15)

    daphne.stop()
    assert forged.close_code == 4401
    assert "WSCONNECT" in daphne.output  # the access log is on...
    assert token not in daphne.output  # ...and holds no token, valid or not
    assert token[:20] not in daphne.output


@pytest.mark.asyncio
async def test_it_refuses_frames_over_the_byte_limit(alice, conversation, settings):
    settings.WS_MAX_FRAME_BYTES = 1024
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()

    # 400 euro signs are 400 characters but 1200 bytes.
    await socket.send({"type": "message", "content": "€" * 400})
    error = await socket.receive()
    await socket.send({"type": "ping"})
    pong = await socket.receive()

    assert (error["type"], error["code"]) == ("error", "too_long")
    assert pong == {"type": "pong"}
    assert await Message.objects.acount() == 0
    await socket.close()


@pytest.mark.asyncio
async def test_it_keeps_an_idle_socket_open_while_a_reply_streams(
    alice, conversation, settings, fake_llm, worker
):
    settings.WS_IDLE_TIMEOUT_SECONDS = 1
    fake_llm.default = Behaviour(tokens=[" z"] * 30, interval=0.1)
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()
    await socket.send({"type": "message", "content": "A long one"})

    frames = await socket.receive_until("done", timeout=30)  # three seconds, silent client

    assert frames[-1]["content"] == " z" * 30
    assert await socket.close_code(timeout=10) == 4408


# Frames a client may throw: anything but a well-formed message with acceptable content.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_bad_messages = st.fixed_dictionaries(
    {
        "type": st.just("message"),
        "content": st.one_of(
            st.just(""),
            st.text(alphabet=" \t\n\r", max_size=5),
            _json_values.filter(lambda v: not isinstance(v, str)),
            st.text(min_size=33, max_size=40).filter(str.strip),
        ),
    }
)
_frames = st.one_of(
    # (the test communicator cannot send an empty frame)
    st.text(min_size=1, max_size=50).map(lambda text: ("text", text)),
    st.binary(min_size=1, max_size=50).map(lambda data: ("bytes", data)),
    _json_values.map(lambda value: ("text", json.dumps(value))),
    st.dictionaries(st.sampled_from(["type", "content", "job_id", "after"]), _json_values).map(
        lambda value: ("text", json.dumps(value))
    ),
    _bad_messages.map(lambda value: ("text", json.dumps(value))),
)


@hypothesis_settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(frames=st.lists(_frames, min_size=1, max_size=8))
def test_arbitrary_frames_get_a_well_formed_answer_and_save_nothing(
    alice, conversation, settings, frames
):
    settings.CHAT_MAX_MESSAGE_CHARS = 32
    async_to_sync(_throw_frames)(alice, conversation, frames)


async def _throw_frames(alice, conversation, frames) -> None:
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()
    for kind, payload in frames:
        if kind == "bytes":
            await socket.communicator.send_to(bytes_data=payload)
        else:
            await socket.communicator.send_to(text_data=payload)
        answer = await socket.receive()
        if answer["type"] != "pong":
            assert answer["type"] == "error", answer
            assert answer["code"] in KNOWN_ERROR_CODES, answer
            assert isinstance(answer["message"], str)
    await socket.send({"type": "ping"})
    assert await socket.receive() == {"type": "pong"}
    await socket.close()
    assert await Message.objects.acount() == 0
