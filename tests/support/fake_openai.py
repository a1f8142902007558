"""A deterministic, OpenAI-compatible chat-completions server with fault injection.

Tests start it in a background thread and point the real ``openai`` client at
``FakeOpenAI.base_url``; benchmarks run it as a process::

    python -m tests.support.fake_openai --port 8001 --tokens 20 --interval-ms 5

It speaks just enough HTTP/1.1 for the ``openai`` client (keep-alive, chunked
streaming) and is built on asyncio streams only, so it adds no dependency.
Every request to ``POST /v1/chat/completions`` takes the next scripted
:class:`Behaviour` (see :meth:`FakeOpenAI.enqueue`) or the default one, which
decides how it is answered: a stream of tokens, an error status, a stall or a
dropped connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http
import itertools
import json
import logging
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

MODEL_ID = "fake-model"

# A fixed timestamp keeps responses byte-for-byte reproducible between runs.
_CREATED = 1_700_000_000
_READ_SIZE = 64 * 1024
_MAX_HEAD = 64 * 1024
_MAX_BODY = 16 * 1024 * 1024
# Words keep their leading whitespace so that joining the tokens gives back the reply;
# the second alternative only matches trailing whitespace.
_TOKEN_RE = re.compile(r"\s*\S+|\s+")
_END_OF_CHUNKED_BODY = b"0\r\n\r\n"


@dataclass
class Behaviour:
    """How the server answers one chat-completions request."""

    reply: str = "Hello from the fake model."
    tokens: list[str] | None = None  # explicit tokens; override ``reply``
    ttft: float = 0.0  # seconds before the first token (or before an error response)
    interval: float = 0.0  # seconds between consecutive tokens
    status: int = 200  # anything else is answered with an OpenAI-style error body
    error_message: str = "Injected failure from the fake OpenAI server."
    retry_after: float | None = None  # ``Retry-After`` header on error responses
    hang: bool = False  # accept the request, never answer, until the client leaves
    hang_after: int | None = None  # send N tokens, then stall with the connection open
    cut_after: int | None = None  # send N tokens, then drop the connection mid-body
    # Send N tokens, then wait for ``FakeOpenAI.release()`` (not streamed: wait, then answer).
    hold_after: int | None = None
    open_after_done: bool = False  # send [DONE], then keep the response open, never ending it
    usage: bool = True  # report usage (streams only when ``include_usage`` is asked)

    def __post_init__(self) -> None:
        # Reject nonsense at construction, where the mistake is, not mid-test.
        if self.hang_after is not None and self.cut_after is not None:
            raise ValueError("hang_after and cut_after are mutually exclusive")
        for name in ("hang_after", "cut_after", "hold_after", "ttft", "interval"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value!r}")
        if not 200 <= self.status <= 599:
            raise ValueError(f"status must be within 200..599, got {self.status!r}")

    def token_list(self) -> list[str]:
        """The tokens to send, in order; their concatenation is the reply."""
        if self.tokens is not None:
            return list(self.tokens)
        return _TOKEN_RE.findall(self.reply)


class FakeOpenAI:
    """An OpenAI-compatible chat server running on its own thread and event loop.

    All public methods are thread-safe and meant to be called from the test's
    thread; the asyncio machinery stays on the server's thread.
    """

    def __init__(
        self,
        default: Behaviour | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_history: int | None = None,
    ) -> None:
        """``max_history`` bounds how many request bodies are kept (None: all of them),
        so that a long benchmark run does not grow without limit."""
        self._host = host
        self._requested_port = port
        self._state = threading.Condition()
        self._default = default if default is not None else Behaviour()
        self._script: deque[Behaviour] = deque()
        self._requests: deque[dict[str, Any]] = deque(maxlen=max_history)
        self._request_count = 0
        self._arrivals: list[float] = []
        self._disconnects: list[float] = []
        self._active = 0
        # Bumped by reset(): a response still running from before it no longer counts.
        self._generation = 0
        self._connection_count = 0
        self._completion_ids = itertools.count(1)
        # Owned by the server's event loop.
        self._port: int | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._released: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeOpenAI:
        """Serve from a daemon thread; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeOpenAI is already running")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failures: list[BaseException] = []
        thread = threading.Thread(
            target=self._run_loop, args=(loop, ready, failures), name="fake-openai", daemon=True
        )
        thread.start()
        ready.wait()
        if failures:
            thread.join()
            raise failures[0]
        self._loop, self._thread = loop, thread
        return self

    def stop(self) -> None:
        """Drop every connection and stop the server thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._loop = self._thread = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _run_loop(
        self, loop: asyncio.AbstractEventLoop, ready: threading.Event, failures: list[BaseException]
    ) -> None:
        try:
            try:
                loop.run_until_complete(self._open())
            except Exception as error:  # e.g. the port is taken: report it to start()
                failures.append(error)
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
        finally:
            loop.close()

    async def _open(self) -> None:
        # A backlog for a burst: the bench starts hundreds of streams at one instant, and a
        # connection beyond asyncio's default backlog (100) would wait a second for its SYN
        # to be sent again, as no real provider makes a client wait.
        self._server = await asyncio.start_server(
            self._on_connection, self._host, self._requested_port, backlog=2048
        )
        self._port = self._server.sockets[0].getsockname()[1]
        self._released = asyncio.Event()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Stalled responses never end by themselves; cancel them so nothing is left pending.
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # ------------------------------------------------------------------ inspection

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FakeOpenAI is not started")
        return self._port

    @property
    def base_url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}/v1"

    @property
    def default(self) -> Behaviour:
        with self._state:
            return self._default

    @default.setter
    def default(self, behaviour: Behaviour) -> None:
        with self._state:
            self._default = behaviour

    def enqueue(self, *behaviours: Behaviour) -> None:
        """Script the next requests, first in first out; later ones get the default."""
        with self._state:
            self._script.extend(behaviours)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """JSON bodies of the chat-completions requests received, oldest first."""
        with self._state:
            return list(self._requests)

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Block until at least ``n`` chat requests arrived; return the recorded bodies."""
        with self._state:
            if not self._state.wait_for(lambda: self._request_count >= n, timeout):
                raise TimeoutError(
                    f"{self._request_count} of {n} requests arrived within {timeout}s"
                )
            return list(self._requests)

    @property
    def arrivals(self) -> list[float]:
        """``time.monotonic()`` at which each chat request was received, oldest first: taken
        by the server as it reads the request, not when a waiting test thread wakes up."""
        with self._state:
            return list(self._arrivals)

    def release(self) -> None:
        """Let every response held by ``hold_after`` (and every later one) go on."""
        self._on_loop(self._release_holds)

    def _release_holds(self) -> None:
        assert self._released is not None
        self._released.set()

    def _rearm_holds(self) -> None:
        # Responses held before a reset go on; later ones hold until the next release().
        assert self._released is not None
        self._released.set()
        self._released = asyncio.Event()

    def _on_loop(self, callback: Any) -> None:
        """Run a callback on the server's loop and wait for it: the change is in place
        before the caller sends its next request."""
        if self._loop is None:
            raise RuntimeError("FakeOpenAI is not started")

        async def run() -> None:
            callback()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    @property
    def disconnects(self) -> list[float]:
        """``time.monotonic()`` of each client that left while its answer was in progress."""
        with self._state:
            return list(self._disconnects)

    def wait_for_disconnect(self, timeout: float = 10.0, *, n: int = 1) -> float:
        """Block until ``n`` disconnects were recorded; return the time of the n-th."""
        with self._state:
            if not self._state.wait_for(lambda: len(self._disconnects) >= n, timeout):
                raise TimeoutError(
                    f"{len(self._disconnects)} of {n} disconnects seen within {timeout}s"
                )
            return self._disconnects[n - 1]

    def wait_for_active_streams(self, n: int, timeout: float = 10.0) -> None:
        """Block until exactly ``n`` chat responses are in progress: a client that has read a
        whole answer may get there before the server has finished with it."""
        with self._state:
            if not self._state.wait_for(lambda: self._active == n, timeout):
                raise TimeoutError(f"{self._active} streams active, not {n}, after {timeout}s")

    @property
    def active_streams(self) -> int:
        """Chat responses in progress (streaming, stalled or waiting to answer)."""
        with self._state:
            return self._active

    @property
    def connection_count(self) -> int:
        """TCP connections accepted since the start or the last reset (shows keep-alive)."""
        with self._state:
            return self._connection_count

    def reset(self) -> None:
        """Forget the script, the recorded requests, arrivals, disconnects, active streams
        and connection count; responses held from before go on, later ones hold again."""
        with self._state:
            self._script.clear()
            self._requests.clear()
            self._request_count = 0
            self._arrivals.clear()
            self._disconnects.clear()
            self._active = 0
            self._generation += 1
            self._connection_count = 0
        if self._loop is not None:
            self._on_loop(self._rearm_holds)

    # ------------------------------------------------------------------ bookkeeping

    def _admit(self, body: dict[str, Any]) -> tuple[Behaviour, _ChatCall, int]:
        """Record a chat request and pick the behaviour that answers it."""
        with self._state:
            self._requests.append(body)
            self._request_count += 1
            self._arrivals.append(time.monotonic())
            behaviour = self._script.popleft() if self._script else self._default
            completion_id = f"chatcmpl-fake-{next(self._completion_ids)}"
            self._active += 1
            self._state.notify_all()
        return behaviour, _ChatCall.from_body(body, completion_id), self._generation

    def _finish(self, generation: int, gone_at: float | None) -> None:
        # One lock for both updates: whoever sees the disconnect also sees the stream ended.
        with self._state:
            if generation != self._generation:
                return  # counted before the last reset(), which forgot it
            self._active -= 1
            if gone_at is not None:
                self._disconnects.append(gone_at)
            self._state.notify_all()

    def _count_connection(self) -> None:
        with self._state:
            self._connection_count += 1

    # ------------------------------------------------------------------ HTTP serving

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._count_connection()
        try:
            await self._serve_then_close(_Connection(reader, writer))
        except asyncio.CancelledError:
            # Only _close() cancels us. Python 3.11's start_server calls task.exception() on
            # our finished task, which raises (and logs a traceback) if the task ended
            # cancelled, so the cancellation ends here.
            pass
        finally:
            self._connections.discard(task)

    async def _serve_then_close(self, conn: _Connection) -> None:
        try:
            await self._serve_connection(conn)
        except _ClientGone:
            pass  # the client hung up; there is nobody left to answer
        except Exception:
            # A broken client must never take the server down; stay quiet unless asked.
            logger.debug("fake OpenAI connection failed", exc_info=True)
        finally:
            await conn.close()

    async def _serve_connection(self, conn: _Connection) -> None:
        """Answer requests on one connection until either side ends it."""
        while True:
            try:
                request = await _read_request(conn)
            except _BadRequest as error:
                await conn.write(_error_response(error.status, str(error), keep_alive=False))
                return
            if not await self._route(conn, request):
                return

    async def _route(self, conn: _Connection, request: _Request) -> bool:
        """Answer one request; return whether the connection can be reused."""
        if (request.method, request.path) == ("POST", "/v1/chat/completions"):
            return await self._chat(conn, request)
        if (request.method, request.path) == ("GET", "/v1/models"):
            await conn.write(_json_response(200, _models_list(), keep_alive=request.keep_alive))
        else:
            message = f"Invalid URL ({request.method} {request.path})"
            await conn.write(_error_response(404, message, keep_alive=request.keep_alive))
        return request.keep_alive

    async def _chat(self, conn: _Connection, request: _Request) -> bool:
        body = _parse_json_object(request.body)
        if body is None:
            message = "The request body is not a JSON object."
            await conn.write(_error_response(400, message, keep_alive=request.keep_alive))
            return request.keep_alive
        behaviour, call, generation = self._admit(body)
        assert self._released is not None
        exchange = _Exchange(conn, self._released)
        gone_at: float | None = None
        try:
            return await _respond(exchange, call, behaviour, request.keep_alive)
        except _ClientGone:
            gone_at = conn.closed_at or time.monotonic()
            return False
        finally:
            await exchange.aclose()
            self._finish(generation, gone_at)


# ---------------------------------------------------------------------- connection I/O


class _ClientGone(Exception):
    """The client closed (or reset) the connection."""


class _BadRequest(Exception):
    """The request cannot be parsed; answered with ``status`` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Connection:
    """Buffered reads and eager writes on one client connection.

    The buffer lets a watcher read ahead while a response is being sent (to see
    the client hang up) without losing bytes that belong to the next request.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()
        self.closed_at: float | None = None  # monotonic time the client was seen leaving

    async def _fill(self) -> None:
        if self.closed_at is not None:
            raise _ClientGone
        try:
            data = await self._reader.read(_READ_SIZE)
        except OSError:  # a reset is just a ruder way of leaving
            data = b""
        if not data:
            self.closed_at = time.monotonic()
            raise _ClientGone
        self._buffer += data

    async def read_until(self, separator: bytes, limit: int) -> bytes:
        """Bytes up to ``separator``, which is consumed but not returned."""
        while (index := self._buffer.find(separator)) < 0:
            if len(self._buffer) > limit:
                raise _BadRequest(431, "Request header fields too large.")
            await self._fill()
        data = bytes(self._buffer[:index])
        del self._buffer[: index + len(separator)]
        return data

    async def read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def wait_until_closed(self) -> None:
        """Return once the client has closed the connection."""
        with contextlib.suppress(_ClientGone):
            while True:
                await self._fill()

    async def write(self, data: bytes) -> None:
        """Send ``data`` and wait until it is handed to the kernel (no buffering)."""
        # Writing to a closed transport is silently dropped and then logged by asyncio.
        if self.closed_at is not None or self._writer.transport.is_closing():
            raise _ClientGone
        try:
            self._writer.write(data)
            await self._writer.drain()
        except OSError as error:
            self.closed_at = self.closed_at or time.monotonic()
            raise _ClientGone from error

    def abort(self) -> None:
        """Drop the connection on the spot: no terminating chunk, no graceful close."""
        self._writer.transport.abort()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


class _Exchange:
    """The I/O of one chat response, watching for the client leaving meanwhile.

    The watch task reads ahead for EOF, so that a client that goes away while the
    server sleeps or stalls is noticed at once, not at the next (failing) write.
    """

    def __init__(self, conn: _Connection, released: asyncio.Event) -> None:
        self._conn = conn
        self._released = released
        self._watch = asyncio.create_task(conn.wait_until_closed())

    async def send(self, data: bytes) -> None:
        await self._conn.write(data)

    async def pause(self, seconds: float) -> None:
        """Sleep, but raise ``_ClientGone`` as soon as the client leaves."""
        if seconds > 0:
            await asyncio.wait({self._watch}, timeout=seconds)
        if self._watch.done():
            raise _ClientGone

    async def hang(self) -> NoReturn:
        """Answer nothing more, until the client gives up."""
        await asyncio.wait({self._watch})
        raise _ClientGone

    async def hold(self) -> None:
        """Wait for ``FakeOpenAI.release()``; raise ``_ClientGone`` if the client leaves first."""
        released = asyncio.create_task(self._released.wait())
        try:
            await asyncio.wait({self._watch, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
        if self._watch.done():
            raise _ClientGone

    def abort(self) -> None:
        self._conn.abort()

    async def aclose(self) -> None:
        self._watch.cancel()
        # asyncio.wait rather than await: the watch's own cancellation is expected.
        await asyncio.wait({self._watch})


# ---------------------------------------------------------------------- HTTP parsing


@dataclass(frozen=True)
class _Request:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # names lower-cased
    body: bytes
    keep_alive: bool


async def _read_request(conn: _Connection) -> _Request:
    """Read one HTTP/1.x request; raises ``_ClientGone`` when the client is done."""
    head = await conn.read_until(b"\r\n\r\n", _MAX_HEAD)
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, f"Malformed request line: {request_line!r}")
    method, target, version = parts
    headers = _parse_headers(header_lines)
    body = await _read_body(conn, headers)
    return _Request(
        method=method,
        path=target.split("?", 1)[0],
        headers=headers,
        body=body,
        keep_alive=_wants_keep_alive(version, headers),
    )


def _parse_headers(lines: Sequence[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise _BadRequest(400, f"Malformed header line: {line!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def _wants_keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"


async def _read_body(conn: _Connection, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked_body(conn)
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise _BadRequest(400, f"Invalid Content-Length: {length!r}")
    if int(length) > _MAX_BODY:
        raise _BadRequest(413, "Request body too large.")
    return await conn.read_exactly(int(length))


async def _read_chunked_body(conn: _Connection) -> bytes:
    body = bytearray()
    while True:
        size_line = await conn.read_until(b"\r\n", _MAX_HEAD)
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError:
            raise _BadRequest(400, "Malformed chunk size.") from None
        if size == 0:
            break
        body += await conn.read_exactly(size)
        if len(body) > _MAX_BODY:
            raise _BadRequest(413, "Request body too large.")
        if await conn.read_exactly(2) != b"\r\n":
            raise _BadRequest(400, "Malformed chunk terminator.")
    while await conn.read_until(b"\r\n", _MAX_HEAD):
        pass  # trailers carry nothing we need
    return bytes(body)


def _parse_json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


# ---------------------------------------------------------------------- HTTP responses


def _response_head(status: int, headers: dict[str, str], *, keep_alive: bool) -> bytes:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    all_headers = {**headers, "Connection": "keep-alive" if keep_alive else "close"}
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in all_headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_response(
    status: int,
    payload: dict[str, Any],
    *,
    keep_alive: bool,
    headers: dict[str, str] | None = None,
) -> bytes:
    body = json.dumps(payload).encode()
    all_headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        **(headers or {}),
    }
    return _response_head(status, all_headers, keep_alive=keep_alive) + body


def _error_response(
    status: int, message: str, *, keep_alive: bool, headers: dict[str, str] | None = None
) -> bytes:
    error_type, code = _error_kind(status)
    payload = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    return _json_response(status, payload, keep_alive=keep_alive, headers=headers)


def _error_kind(status: int) -> tuple[str, str | None]:
    """The ``type`` and ``code`` OpenAI uses for a status."""
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status == 401:
        return "invalid_request_error", "invalid_api_key"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def _models_list() -> dict[str, Any]:
    model = {"id": MODEL_ID, "object": "model", "created": _CREATED, "owned_by": "grizz-tests"}
    return {"object": "list", "data": [model]}


# ---------------------------------------------------------------------- chat completions


@dataclass(frozen=True)
class _ChatCall:
    """What an answer needs to know about the chat request."""

    completion_id: str
    model: str
    stream: bool
    include_usage: bool
    prompt_tokens: int

    @classmethod
    def from_body(cls, body: dict[str, Any], completion_id: str) -> _ChatCall:
        model = body.get("model")
        options = body.get("stream_options")
        return cls(
            completion_id=completion_id,
            model=model if isinstance(model, str) else MODEL_ID,
            stream=body.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            prompt_tokens=_count_prompt_words(body.get("messages")),
        )

    def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._envelope("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        usage = self.usage(completion_tokens)
        return {**self._envelope("chat.completion.chunk"), "choices": [], "usage": usage}

    def completion(self, content: str, usage: dict[str, int] | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": content, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
        return {**self._envelope("chat.completion"), "choices": [choice], "usage": usage}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.completion_id, "object": kind, "created": _CREATED, "model": self.model}


def _count_prompt_words(messages: object) -> int:
    """Whitespace-separated words in the messages' text, a stand-in for prompt tokens."""
    if not isinstance(messages, list):
        return 0
    return sum(len(text.split()) for m in messages for text in _message_texts(m))


def _message_texts(message: object) -> list[str]:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return [
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
    return []


def _sse_frame(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event wrapped in one HTTP chunk."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    event = f"data: {data}\n\n".encode()
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


async def _respond(
    exchange: _Exchange, call: _ChatCall, behaviour: Behaviour, keep_alive: bool
) -> bool:
    """Answer a chat request; return whether the connection can be reused."""
    if behaviour.hang:
        await exchange.hang()
    if behaviour.status != 200:
        return await _answer_error(exchange, behaviour, keep_alive)
    if call.stream:
        return await _answer_stream(exchange, call, behaviour, keep_alive)
    return await _answer_whole(exchange, call, behaviour, keep_alive)


async def _answer_error(exchange: _Exchange, behaviour: Behaviour, keep_alive: bool) -> bool:
    await exchange.pause(behaviour.ttft)
    headers = {}
    if behaviour.retry_after is not None:
        headers["Retry-After"] = _format_seconds(behaviour.retry_after)
    response = _error_response(
        behaviour.status, behaviour.error_message, keep_alive=keep_alive, headers=headers
    )
    await exchange.send(response)
    return keep_alive


async def _answer_stream(
    exchange: _Exchange, call: _ChatCall, behaviour: Behaviour, keep_alive: bool
) -> bool:
    tokens = behaviour.token_list()
    head = {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "Transfer-Encoding": "chunked",
    }
    # Like OpenAI, commit to the 200 and the role right away; the model "thinks" afterwards.
    role_chunk = _sse_frame(call.chunk({"role": "assistant", "content": ""}))
    await exchange.send(_response_head(200, head, keep_alive=keep_alive) + role_chunk)
    await exchange.pause(behaviour.ttft)
    stop_at = behaviour.cut_after if behaviour.cut_after is not None else behaviour.hang_after
    for index, token in enumerate(tokens[:stop_at]):
        if index == behaviour.hold_after:
            await exchange.hold()
        if index:
            await exchange.pause(behaviour.interval)
        await exchange.send(_sse_frame(call.chunk({"content": token})))
    if behaviour.hold_after is not None and behaviour.hold_after >= len(tokens[:stop_at]):
        await exchange.hold()
    if behaviour.cut_after is not None:
        exchange.abort()
        return False
    if behaviour.hang_after is not None:
        await exchange.hang()
    await exchange.send(_stream_tail(call, behaviour, len(tokens)))
    if behaviour.open_after_done:
        await exchange.hang()
    return keep_alive


def _stream_tail(call: _ChatCall, behaviour: Behaviour, completion_tokens: int) -> bytes:
    tail = _sse_frame(call.chunk({}, finish_reason="stop"))
    if call.include_usage and behaviour.usage:
        tail += _sse_frame(call.usage_chunk(completion_tokens))
    tail += _sse_frame("[DONE]")
    return tail if behaviour.open_after_done else tail + _END_OF_CHUNKED_BODY


async def _answer_whole(
    exchange: _Exchange, call: _ChatCall, behaviour: Behaviour, keep_alive: bool
) -> bool:
    """A non-streamed answer arrives when the whole stream would have ended."""
    tokens = behaviour.token_list()
    if behaviour.hang_after is not None:
        await exchange.hang()
    await exchange.pause(behaviour.ttft + behaviour.interval * max(len(tokens) - 1, 0))
    if behaviour.hold_after is not None:
        await exchange.hold()
    if behaviour.cut_after is not None:
        exchange.abort()  # there is no partial JSON worth sending: just drop the line
        return False
    usage = call.usage(len(tokens)) if behaviour.usage else None
    completion = call.completion("".join(tokens), usage)
    await exchange.send(_json_response(200, completion, keep_alive=keep_alive))
    return keep_alive


# ---------------------------------------------------------------------- standalone process


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake OpenAI chat-completions server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the 1st token")
    parser.add_argument("--interval-ms", type=float, default=0.0, help="delay between tokens")
    parser.add_argument("--tokens", type=int, default=None, help='reply " tok0", " tok1", ...')
    return parser.parse_args(argv)


def _behaviour_from_args(args: argparse.Namespace) -> Behaviour:
    tokens = None if args.tokens is None else [f" tok{i}" for i in range(args.tokens)]
    return Behaviour(tokens=tokens, ttft=args.ttft_ms / 1000, interval=args.interval_ms / 1000)


async def _serve_until_signalled(fake: FakeOpenAI) -> None:
    await fake._open()
    print(f"listening on {fake.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await fake._close()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    # Keep no request bodies: a benchmark sends far too many to hold on to.
    fake = FakeOpenAI(_behaviour_from_args(args), args.host, args.port, max_history=0)
    try:
        asyncio.run(_serve_until_signalled(fake))
    except KeyboardInterrupt:  # only before the signal handlers are installed
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
