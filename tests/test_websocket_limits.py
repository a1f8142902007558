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
