"""Oversized frames over a real daphne process: whatever the size, the client learns why.

Up to the transport limit (WS_TRANSPORT_MAX_BYTES, here 1 MiB) a frame over
WS_MAX_FRAME_BYTES is refused with `too_long` and the socket stays open; above it the
socket is closed with 1009 and a reason, never dropped. Other sockets are served meanwhile.
"""

import asyncio
import json
from typing import Any

import pytest
import websockets
from websockets.frames import Close

from chat.models import Message
from tests.support.fake_openai import Behaviour
from tests.support.sockets import daphne_socket_ready

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

LIMIT = 65536
TOO_LONG = f"Frames are limited to {LIMIT} bytes."
MIB = 1024 * 1024


@pytest.fixture
def web(start_daphne):
    return start_daphne(WS_MAX_FRAME_BYTES=str(LIMIT), WS_TRANSPORT_MAX_BYTES=str(MIB))


def _frame_of(size: int) -> str:
    """A message frame of exactly `size` bytes of UTF-8, with few enough characters to pass
    CHAT_MAX_MESSAGE_CHARS: only the byte limit can refuse it."""
    empty = json.dumps({"type": "message", "content": ""})
    euros, ascii_tail = divmod(size - len(empty), 3)
    frame = json.dumps(
        {"type": "message", "content": "€" * euros + "a" * ascii_tail}, ensure_ascii=False
    )
    assert len(frame.encode()) == size
    return frame


async def _answer(ws: websockets.ClientConnection, frame: str) -> dict[str, Any]:
    await ws.send(frame)
    answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
    return answer


async def _close_for(ws: websockets.ClientConnection, frame: str) -> Close | None:
    """The close frame the server answers `frame` with (None: the connection dropped)."""
    try:
        await ws.send(frame)
        answer = await asyncio.wait_for(ws.recv(), 30)
    except websockets.ConnectionClosed as closed:
        return closed.rcvd
    raise AssertionError(f"the socket stayed open and answered {answer[:200]!r}")


async def _pong(ws: websockets.ClientConnection) -> dict[str, Any]:
    return await _answer(ws, json.dumps({"type": "ping"}))


async def test_a_frame_at_the_limit_is_accepted(alice, web):
    ws = await daphne_socket_ready(web, alice)

    answer = await _answer(ws, _frame_of(LIMIT))

    assert answer["type"] == "queued"
    await ws.close()


@pytest.mark.parametrize("size", [LIMIT + 1, 300_000, MIB])
async def test_a_frame_over_the_limit_is_refused_and_the_socket_stays_open(alice, web, size):
    ws = await daphne_socket_ready(web, alice)

    answer = await _answer(ws, _frame_of(size))
    pong = await _pong(ws)

    assert answer == {"type": "error", "code": "too_long", "message": TOO_LONG}
    assert pong == {"type": "pong"}
    assert await Message.objects.acount() == 0
    await ws.close()


@pytest.mark.parametrize("size", [MIB + 1, 4 * MIB, 16 * MIB])
async def test_a_frame_over_the_transport_limit_closes_with_1009_and_a_reason(alice, web, size):
    bystander = await daphne_socket_ready(web, alice)
    ws = await daphne_socket_ready(web, alice)

    close, pong = await asyncio.gather(_close_for(ws, _frame_of(size)), _pong(bystander))
    pong_after = await _pong(bystander)

    assert close is not None, "the connection was dropped without a close frame"
    assert (close.code, close.reason) == (1009, TOO_LONG)
    assert pong == pong_after == {"type": "pong"}  # the process served another socket
    assert await Message.objects.acount() == 0
    await bystander.close()


async def test_a_reply_longer_than_the_transport_limit_reaches_the_client(
    alice, web, fake_llm, worker
):
    # The limit is on what clients send: a reply's done frame holds the whole answer.
    chunk = "Bears eat berries. " * 3449  # 65,531 bytes
    fake_llm.default = Behaviour(tokens=[chunk] * 17)
    ws = await daphne_socket_ready(web, alice, max_size=None)
    await ws.send(json.dumps({"type": "message", "content": "Tell me everything."}))

    frames: list[dict[str, Any]] = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
    pong = await _pong(ws)

    done = frames[-1]
    assert (done["type"], done["status"]) == ("done", "complete")
    assert len(done["content"]) > MIB and done["content"] == chunk * 17
    assert pong == {"type": "pong"}
    await ws.close()
