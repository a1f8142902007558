"""Helpers for talking to the chat socket in-process (channels' WebsocketCommunicator)."""

import json
from typing import Any

import websockets
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import Client
from rest_framework_simplejwt.tokens import AccessToken

from chat.services import conversation_create
from grizz.asgi import application
from tests.support.processes import ServiceProcess


def token_for(user: User) -> str:
    return str(AccessToken.for_user(user))


def session_cookie(user: User) -> str:
    """The Cookie header of a browser in which `user` is signed in."""
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}"


def session_headers(
    user: User, *, origin: str | None = "http://testserver"
) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"cookie", session_cookie(user).encode()),
        (b"host", b"testserver"),
    ]
    if origin is not None:
        headers.append((b"origin", origin.encode()))
    return headers


class ChatSocket:
    """A socket on one conversation. `frames` keeps every frame received, in order."""

    def __init__(self, path: str, *, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        self.communicator = WebsocketCommunicator(application, path, headers=headers or [])
        self.frames: list[dict[str, Any]] = []
        self.conversation_id: object = None  # set by open()

    @classmethod
    async def open(
        cls,
        conversation_id: object,
        *,
        user: User | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> "ChatSocket":
        path = f"/ws/chat/{conversation_id}/"
        if user is not None:
            path += f"?token={token_for(user)}"
        socket = cls(path, headers=headers)
        socket.conversation_id = conversation_id
        connected, _ = await socket.communicator.connect(timeout=10)
        assert connected
        return socket

    async def send(self, frame: dict[str, Any] | str) -> None:
        text = frame if isinstance(frame, str) else json.dumps(frame)
        await self.communicator.send_to(text_data=text)

    async def receive(self, timeout: float = 10) -> dict[str, Any]:
        output = await self.communicator.receive_output(timeout)
        if output["type"] == "websocket.close":
            raise AssertionError(f"socket closed with {output.get('code')}")
        frame: dict[str, Any] = json.loads(output["text"])
        self.frames.append(frame)
        return frame

    async def receive_until(self, kind: str, timeout: float = 15) -> list[dict[str, Any]]:
        """Frames up to and including the first of type `kind`."""
        got = []
        while True:
            frame = await self.receive(timeout)
            got.append(frame)
            if frame["type"] == kind:
                return got

    async def close_code(self, timeout: float = 10) -> int:
        output = await self.communicator.receive_output(timeout)
        assert output["type"] == "websocket.close", output
        code: int = output.get("code", 1000)
        return code

    async def nothing_received(self) -> bool:
        return await self.communicator.receive_nothing(timeout=0.3)

    async def close(self) -> None:
        await self.communicator.disconnect()


async def chat_opened(user: User, conversation_id: object = None) -> ChatSocket:
    """A socket of `user` on a conversation (a new one unless given), past its hello."""
    if conversation_id is None:
        conversation_id = (await sync_to_async(conversation_create)(owner=user)).id
    socket = await ChatSocket.open(conversation_id, user=user)
    await socket.receive()  # hello
    return socket


async def message_queued(socket: ChatSocket, content: str = "Go") -> dict[str, Any]:
    """Send a message and return its `queued` frame."""
    await socket.send({"type": "message", "content": content})
    queued = await socket.receive()
    assert queued["type"] == "queued", queued
    return queued


def answer_of(frames: list[dict[str, Any]], job_id: str) -> str:
    """The text a client shows for a job: its deltas in seq order, from the last restart."""
    mine = [f for f in frames if f.get("job_id") == job_id]
    seqs = [f["seq"] for f in mine if "seq" in f]
    assert seqs == sorted(set(seqs)), f"frames out of order or repeated: {seqs}"
    text: list[str] = []
    for frame in mine:
        if frame["type"] == "restart":
            text.clear()
        elif frame["type"] == "delta":
            text.append(frame["content"])
    return "".join(text)


async def daphne_socket_ready(
    web: ServiceProcess, user: User, *, max_size: int | None = 2**20
) -> websockets.ClientConnection:
    """A real client's socket of `user` on a new conversation, through daphne, past its hello
    (`max_size`: the longest message the client takes, None for any)."""
    conversation = await sync_to_async(conversation_create)(owner=user)
    url = f"ws://127.0.0.1:{web.port}/ws/chat/{conversation.id}/?token={token_for(user)}"
    ws = await websockets.connect(url, max_size=max_size)
    assert json.loads(await ws.recv())["type"] == "hello"
    return ws
