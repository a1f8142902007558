"""daphne's own cost, for the bench's `floor` scenario: an ASGI application served by
`python -m grizz.server` (the web's server, with its changes to daphne) whose sockets do
nothing of Grizz's. A socket is accepted and sent `hello` at once (no token, no database,
no Redis); one opened with `?frames=1` is then sent a delta-sized frame 20 times a second
until it closes, by one ticker for all sockets, every 5 ms a tenth of them, as the reply
hub relays a round of the worker's frames. One opened with `?hops=1` answers each message
by bench/hops.py's way to a first token. The consumer is Grizz's own (its way of
awaiting the client's events and of sending), with none of its work: what this process
spends is the floor under the web's CPU per socket opened and per frame relayed."""

import asyncio
import itertools
import json
import os
import uuid
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "grizz.settings")
django.setup()

from bench.hops import WebHops  # noqa: E402
from chat.consumers import ChatConsumer  # noqa: E402  (its models need the setup)

TICK_S = 0.005
SLICES = 10  # each socket's turn comes every TICK_S * SLICES: 20 frames a second
HELLO = json.dumps({"type": "hello"})
FRAME_SUFFIX = ', "content": " w1234567"}'


class FloorConsumer(ChatConsumer):
    async def connect(self) -> None:
        await self.accept()
        await self.send(text_data=HELLO)
        self.slice: set[FloorConsumer] | None = None
        query = self.scope.get("query_string", b"")
        self.hops = b"hops=1" in query
        if b"frames=1" in query:
            job = json.dumps(str(uuid.uuid4()))
            self.frame_prefix = '{"type": "delta", "job_id": ' + job + ', "seq": '
            self.seq = 0
            self.slice = _slices[next(_joined) % SLICES]
            self.slice.add(self)
            _ticker_ensure()

    async def disconnect(self, code: int) -> None:
        if self.slice is not None:
            self.slice.discard(self)

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        if self.hops:  # the others get only the load generator's pings
            await _hops.turn(self.send)

    async def frame_send(self) -> None:
        self.seq += 1
        # A delta as the web relays it (the bytes from Redis, not encoded again): its job,
        # its seq and a stamped token.
        await self.send(text_data=self.frame_prefix + str(self.seq) + FRAME_SUFFIX)


_slices: list[set[FloorConsumer]] = [set() for _ in range(SLICES)]
_joined = itertools.count()
_hops = WebHops()
_ticker: list[asyncio.Task[None]] = []


def _ticker_ensure() -> None:
    if not _ticker:
        _ticker.append(asyncio.get_running_loop().create_task(_tick_forever()))


async def _tick_forever() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for tick in itertools.count(1):
        for consumer in list(_slices[tick % SLICES]):
            await consumer.frame_send()
        await asyncio.sleep(max(start + tick * TICK_S - loop.time(), 0))


application: Any = FloorConsumer.as_asgi()
