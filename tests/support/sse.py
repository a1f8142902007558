"""Server-Sent Events as a client reads them: a parser, and a client of the reply stream
in-process (the ASGI application itself, so a test can disconnect it and look at the
process's ReplyHub) or over HTTP (aiohttp, against daphne)."""

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from asgiref.testing import ApplicationCommunicator

from grizz.asgi import application


@dataclass(frozen=True)
class Event:
    id: int | None = None
    event: str | None = None
    data: dict[str, Any] = field(default_factory=dict)  # empty for a comment
    comment: str | None = None  # a line starting with ":" (a keep-alive)


class EventParser:
    """Feed it the body as it comes; it returns each event once whole."""

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, chunk: bytes) -> list[Event]:
        self.buffer += chunk.decode()
        *blocks, self.buffer = self.buffer.split("\n\n")
        return [_event_of(block) for block in blocks]


def _event_of(block: str) -> Event:
    fields: dict[str, str] = {}
    for line in block.split("\n"):
        name, _, value = line.partition(":")
        fields[name or "comment"] = value.removeprefix(" ")
    return Event(
        id=int(fields["id"]) if "id" in fields else None,
        event=fields.get("event"),
        data=json.loads(fields["data"]) if "data" in fields else {},
        comment=fields.get("comment"),
    )


def stream_path(job_id: object, query: str = "") -> str:
    return f"/api/replies/{job_id}/stream" + (f"?{query}" if query else "")


class InProcessStream:
    """One request to the ASGI application, its body read chunk by chunk."""

    def __init__(self, path: str, headers: dict[str, str] | None = None) -> None:
        path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(b"host", b"testserver")]
            + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self.communicator = ApplicationCommunicator(application, scope)
        self.parser = EventParser()
        self.ended = False
        self.status = 0
        self.headers: dict[str, str] = {}

    async def open(self, timeout: float = 10) -> "InProcessStream":
        await self.communicator.send_input({"type": "http.request", "body": b""})
        start = await self.communicator.receive_output(timeout)
        assert start["type"] == "http.response.start", start
        self.status = start["status"]
        self.headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
        return self

    async def chunk(self, timeout: float = 10) -> bytes:
        message = await self.communicator.receive_output(timeout)
        assert message["type"] == "http.response.body", message
        self.ended = not message.get("more_body", False)
        body: bytes = message.get("body", b"")
        return body

    async def body(self, timeout: float = 10) -> bytes:
        parts = [await self.chunk(timeout)]
        while not self.ended:
            parts.append(await self.chunk(timeout))
        return b"".join(parts)

    async def events(self, count: int = 1, timeout: float = 10) -> list[Event]:
        """The next `count` events (keep-alives included), or fewer if the body ends."""
        got: list[Event] = []
        while len(got) < count and not self.ended:
            got += self.parser.feed(await self.chunk(timeout))
        return got

    async def events_to_end(self, timeout: float = 30) -> list[Event]:
        got: list[Event] = []
        while not self.ended:
            got += self.parser.feed(await self.chunk(timeout))
        return got

    async def disconnect(self, timeout: float = 10) -> None:
        await self.communicator.send_input({"type": "http.disconnect"})
        await asyncio.wait_for(self.communicator.wait(), timeout)


async def events_over_http(
    response: aiohttp.ClientResponse,
    *,
    until: Callable[[list[Event]], bool] | None = None,
    timeout: float = 60,
) -> list[Event]:
    """Events from a live HTTP response: until the server ends the body, or until
    `until(the events so far)`."""
    parser, got = EventParser(), []
    async with asyncio.timeout(timeout):
        async for chunk in response.content.iter_any():
            for event in parser.feed(chunk):
                got.append(event)
                if until is not None and until(got):
                    return got
    return got


def text_of(events: list[Event]) -> str:
    """The answer a client shows from a reply's events: its deltas, from the last restart."""
    text: list[str] = []
    for event in events:
        if event.event == "restart":
            text.clear()
        elif event.event == "delta" and event.data is not None:
            text.append(event.data["content"])
    return "".join(text)
