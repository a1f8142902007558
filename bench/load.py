"""The load generator's clients: an authenticated chat socket ("the browser") and a direct
OpenAI client (the baseline). Both run one turn at a time and return a `Turn` holding the
CLOCK_MONOTONIC time of every frame, taken the moment the frame reaches our code.

The hot path (`ChatClient._on_frame`) only timestamps and appends: every microsecond spent
here would show up as latency Grizz did not add.
"""

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from bench.deployment import Deployment, Seed
from llmworker.providers import OpenAIProvider, ProviderError

PING = json.dumps({"type": "ping"})
PING_EVERY_S = 30.0  # static/chat/chat.js


@dataclass
class Turn:
    t_send: int  # ns, CLOCK_MONOTONIC, just before the message (or request) is sent
    t_queued: int | None = None
    job_id: str | None = None
    deltas: list[tuple[int, int, str]] = field(default_factory=list)  # (t_recv, seq, content)
    restarts: int = 0  # the reply was started again (its worker was lost)
    t_done: int | None = None
    content: str | None = None  # the done frame's whole answer
    error: str | None = None


class ChatClient:
    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task[None] | None = None
        self.keepalive: asyncio.Task[None] | None = None
        self.turn_now: Turn | None = None
        self.finished: asyncio.Future[None] | None = None
        self.closed_reason: str | None = None
        # A failed turn (a timeout) may leave its reply running: the conversation is busy.
        self.last_failed = False

    async def open(self, timeout: float = 60.0) -> int:
        """Connect and wait for hello; returns how long that took, in ns."""
        start = time.monotonic_ns()
        # Like a browser: no WebSocket pings (the app pings, below), compression offered.
        self.ws = await connect(self.url, ping_interval=None, open_timeout=timeout, max_size=None)
        hello = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if hello.get("type") != "hello":
            raise RuntimeError(f"expected hello, got {hello}")
        elapsed = time.monotonic_ns() - start
        self.reader = asyncio.create_task(self._read())
        self.keepalive = asyncio.create_task(self._ping_forever(random.uniform(0, PING_EVERY_S)))
        return elapsed

    async def _ping_forever(self, first_after: float) -> None:
        """Ping like Grizz's page does: the server closes sockets that stay silent."""
        assert self.ws is not None
        await asyncio.sleep(first_after)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.ws.send(PING)
                await asyncio.sleep(PING_EVERY_S)

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                self._on_frame(time.monotonic_ns(), raw)
        except ConnectionClosed as closed:
            self.closed_reason = f"closed {closed.rcvd.code if closed.rcvd else 'abnormally'}"
        self.closed_reason = self.closed_reason or "closed by the server"
        self._finish(f"socket {self.closed_reason} mid-turn")

    def _on_frame(self, t_recv: int, raw: str | bytes) -> None:
        turn = self.turn_now
        if turn is None:
            return  # pongs, other tabs: nothing this bench waits for
        frame = json.loads(raw)
        kind = frame.get("type")
        if kind == "delta":
            turn.deltas.append((t_recv, frame["seq"], frame["content"]))
        elif kind == "queued":
            turn.t_queued, turn.job_id = t_recv, frame["job_id"]
        elif kind == "restart":
            turn.restarts += 1
        elif kind == "done":
            turn.t_done, turn.content = t_recv, frame.get("content")
            self._finish(None)
        elif kind == "error":
            self._finish(f"error frame {frame.get('code')}: {frame.get('message')}")

    def _finish(self, error: str | None) -> None:
        if self.turn_now is not None and error is not None:
            self.turn_now.error = self.turn_now.error or error
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    async def turn(self, text: str, timeout: float) -> Turn:
        assert self.ws is not None
        turn = self.turn_now = Turn(t_send=time.monotonic_ns())
        self.finished = asyncio.get_running_loop().create_future()
        try:
            if self.closed_reason:
                raise ConnectionClosed(None, None)
            await self.ws.send(json.dumps({"type": "message", "content": text}))
            await asyncio.wait_for(asyncio.shield(self.finished), timeout)
        except TimeoutError:
            turn.error = f"no done frame within {timeout:.0f} s"
        except ConnectionClosed:
            turn.error = f"socket {self.closed_reason or 'closed'} before sending"
        finally:
            self.turn_now = None
        self.last_failed = turn.error is not None
        return turn

    async def close(self) -> None:
        if self.keepalive is not None:
            self.keepalive.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader


# Handshakes in flight at once. The web process opens sockets one after the other (its
# database calls share one thread), so more would only queue there, and a socket not
# accepted within daphne's connect timeout is dropped.
OPEN_PARALLEL = 16


class SocketPool:
    """Chat sockets on the seeded conversations, opened on demand and kept open."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.clients: list[ChatClient] = []
        self.next_seed = 0  # each conversation gets at most one socket at a time
        self.open_ns: list[int] = []
        self.failures: list[str] = []

    async def grow(self, count: int, *, parallel: int = OPEN_PARALLEL) -> None:
        """Open sockets until `count` are open, less any that fail (recorded in `failures`)
        or that no seeded conversation is left for."""
        wanted = max(count - len(self.clients), 0)
        seeds = self.deployment.seeds[self.next_seed : self.next_seed + wanted]
        self.next_seed += len(seeds)
        gate = asyncio.Semaphore(parallel)
        opened = await asyncio.gather(*(self._open_one(seed, gate) for seed in seeds))
        self.clients.extend(client for client in opened if client is not None)

    async def _open_one(self, seed: Seed, gate: asyncio.Semaphore) -> ChatClient | None:
        async with gate:
            client = ChatClient(self.deployment.ws_url(seed))
            try:
                self.open_ns.append(await client.open())
            except (OSError, TimeoutError, WebSocketException, RuntimeError) as error:
                self.failures.append(f"{type(error).__name__}: {error}")
                return None
            return client

    async def close_all(self, *, parallel: int = 200) -> None:
        gate = asyncio.Semaphore(parallel)

        async def close(client: ChatClient) -> None:
            async with gate:
                await client.close()

        await asyncio.gather(*(close(c) for c in self.clients), return_exceptions=True)
        self.clients.clear()
        self.next_seed = 0

    def first(self, count: int) -> Sequence[ChatClient]:
        if len(self.clients) < count:
            raise RuntimeError(f"{count} sockets wanted, {len(self.clients)} open")
        return self.clients[:count]


class DirectClient:
    """The baseline: the same request, straight to the model server, through Grizz's own
    provider client (llmworker/providers.py: the openai client's generic `post` on its
    aiohttp transport, the event stream's bytes split into lines, orjson per event), so the
    direct path reads each token exactly as the worker does and differs from Grizz only by
    what Grizz adds. Until 2026-12-07 it read through the SDK's `with_streaming_response`
    and httpx's `iter_lines` on the default transport: 0.34-0.36 ms of CPU per token, which
    made the load generator, not the machine, the limit of the direct path at 300
    conversations."""

    def __init__(self, provider: OpenAIProvider) -> None:
        self.provider = provider

    async def turn(self, text: str, timeout: float) -> Turn:
        turn = Turn(t_send=time.monotonic_ns())
        try:
            await asyncio.wait_for(self._stream(turn, text), timeout)
        except TimeoutError:
            turn.error = f"no end of stream within {timeout:.0f} s"
        except ProviderError as error:
            turn.error = f"{type(error).__name__}: {error}"
        return turn

    async def _stream(self, turn: Turn, text: str) -> None:
        messages = [{"role": "user", "content": text}]
        seq = 0
        async for chunk in self.provider.stream(messages=messages, model="bench-model"):
            if chunk.text:
                seq += 1
                turn.deltas.append((time.monotonic_ns(), seq, chunk.text))
        turn.t_done = time.monotonic_ns()
        turn.content = "".join(part for _, _, part in turn.deltas)


def direct_clients(model_url: str, count: int) -> tuple[OpenAIProvider, list[DirectClient]]:
    """`count` baseline turners sharing one provider client, as the worker does."""
    provider = OpenAIProvider(api_key="bench-key", base_url=model_url, timeout=120)
    return provider, [DirectClient(provider) for _ in range(count)]
