"""Client frames the socket refuses, and how: errors never close a healthy socket."""

import json

import pytest

from chat.models import Message
from tests.support.sockets import ChatSocket

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.fixture
async def socket(alice, conversation):
    socket = await ChatSocket.open(conversation.id, user=alice)
    await socket.receive()  # hello
    yield socket
    await socket.close()


async def _assert_refused(socket: ChatSocket, frame: object, code: str) -> None:
    await socket.send(frame if isinstance(frame, str) else json.dumps(frame))
    error = await socket.receive()
    assert error["type"] == "error"
    assert error["code"] == code
    assert error["message"]
    # The socket is still healthy afterwards.
    await socket.send({"type": "ping"})
    assert await socket.receive() == {"type": "pong"}


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1, 2]",
        '"a string"',
        {"type": "shout"},
        {"no": "type"},
        {"type": "message"},
        {"type": "message", "content": ""},
        {"type": "message", "content": "   \n\t"},
        {"type": "message", "content": 42},
        {"type": "message", "content": "hi", "client_msg_id": 7},
        {"type": "resume", "job_id": "nope"},
    ],
)
async def test_it_answers_invalid_to_a_bad_frame(socket, frame):
    await _assert_refused(socket, frame, "invalid")
    assert await Message.objects.acount() == 0


async def test_it_answers_invalid_to_a_binary_frame(socket):
    await socket.communicator.send_to(bytes_data=b"\x00\x01")
    error = await socket.receive()
    assert (error["type"], error["code"]) == ("error", "invalid")


async def test_it_answers_too_long_over_the_limit(socket, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 10
    await _assert_refused(socket, {"type": "message", "content": "x" * 11}, "too_long")
    assert await Message.objects.acount() == 0


async def test_it_accepts_a_message_at_the_limit(socket, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 10
    await socket.send({"type": "message", "content": "x" * 10})
    assert (await socket.receive())["type"] == "queued"


async def test_it_answers_busy_while_a_reply_is_queued(socket):
    await socket.send({"type": "message", "content": "first"})
    queued = await socket.receive()
    assert queued["type"] == "queued"
    await _assert_refused(socket, {"type": "message", "content": "second"}, "busy")
    contents = [m.content async for m in Message.objects.filter(role="user")]
    assert contents == ["first"]


async def test_it_returns_the_original_job_for_a_resent_client_msg_id(socket):
    frame = {"type": "message", "content": "once", "client_msg_id": "c-1"}
    await socket.send(frame)
    first = await socket.receive()
    await socket.send(frame)
    second = await socket.receive()
    assert first == second
    assert first["type"] == "queued"
    assert await Message.objects.acount() == 2


async def test_it_saves_the_message_and_a_queued_reply(socket, conversation):
    await socket.send({"type": "message", "content": "hello"})
    queued = await socket.receive()
    assert set(queued) == {"type", "job_id", "message_id", "reply_id"}
    user_message = await Message.objects.aget(id=queued["message_id"])
    reply = await Message.objects.aget(id=queued["reply_id"])
    assert (user_message.role, user_message.content) == ("user", "hello")
    assert (reply.role, reply.status, str(reply.job_id)) == (
        "assistant",
        "queued",
        queued["job_id"],
    )
    assert reply.conversation_id == user_message.conversation_id == conversation.id
