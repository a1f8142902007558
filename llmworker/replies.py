"""Reply streams: how a reply being generated reaches every socket on its conversation.

Each reply (job) has a replay log, a Redis Stream holding every frame sent for it in order,
and each conversation has a pub/sub channel for live delivery. The worker emits a frame with
one script call that numbers it (seq), appends it to the log and publishes it: one command
per coalesced batch of deltas. Web processes hold one pub/sub connection each (`ReplyHub`),
so idle sockets cost Redis nothing; a socket that missed frames (a reconnect, a dropped
pub/sub connection) reads them back from the log by seq.
"""

import asyncio
import contextlib
import json
import logging
import math
import random
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import NoScriptError, RedisError

from llmworker.redis import (
    StreamEntries,
    cancel_channel,
    conversation_channel,
    redis_get,
    redis_pubsub_client,
    reply_attempt_key,
    reply_cancel_key,
    reply_log_key,
    script_get,
)

logger = logging.getLogger(__name__)

# The frame is built as head + N + tail, so the script needs no JSON library. Each frame's
# entry id in the log is 0-<seq>: Redis refuses an id not above the last, so the log can
# never hold two frames with one seq or seqs out of order, and a replay reads from a seq
# directly. The publisher knows the next seq (it is the reply's only writer, one frame at
# a time); when it does not (ARGV[6] empty: a new publisher, or its last call failed), or
# its guess is taken, the script appends after the last frame.
# A frame of an attempt that is no longer the current one (its worker stalled past its
# lease and another took over) is refused: -1. In the common case the script runs three
# commands: GET, XADD, PUBLISH (EXPIRE only when the publisher asks for it).
EMIT_SCRIPT = """
if ARGV[5] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[5] then return -1 end
local function after_last()
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
  return last and tonumber(string.match(last[1], '%d+$')) + 1 or 1
end
local seq = tonumber(ARGV[6]) or after_last()
local frame = ARGV[2] .. seq .. ARGV[3]
local added = redis.pcall('XADD', KEYS[1], '0-' .. seq, 'f', frame)
if type(added) == 'table' and added.err then
  seq = after_last()
  frame = ARGV[2] .. seq .. ARGV[3]
  redis.call('XADD', KEYS[1], '0-' .. seq, 'f', frame)
end
if ARGV[4] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
redis.call('PUBLISH', ARGV[1], frame)
return seq
"""

# Makes an attempt the current one, unless a newer one already is; tells whether the reply
# was cancelled meanwhile and the seq of the last frame earlier attempts left in the log.
ATTEMPT_BEGIN_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current >= tonumber(ARGV[1]) then return {-1, 0} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
local last_seq = last and tonumber(string.match(last[1], '%d+$')) or 0
return {redis.call('EXISTS', KEYS[2]), last_seq}
"""

# While a reply is running its log must outlive any pause in generation; the publisher
# renews the expiry this often rather than with every frame.
RUNNING_LOG_TTL_SECONDS = 3600
RUNNING_LOG_RENEW_SECONDS = 600
CANCEL_TTL_SECONDS = 3600


class StaleAttempt(Exception):
    """Another delivery of the job has taken over; this one must stop writing."""


@dataclass(frozen=True)
class AttemptStart:
    cancelled: bool


def _frame_parts(kind: str, job_id: str, **body: Any) -> tuple[str, str]:
    """The JSON text of a frame before and after its seq number."""
    head = '{"type":' + json.dumps(kind) + ',"job_id":' + json.dumps(job_id) + ',"seq":'
    tail = "," + json.dumps(body, separators=(",", ":"))[1:] if body else "}"
    return head, tail


EmitCall = tuple[list[str], list[str | int]]  # the keys and args of one EMIT_SCRIPT call


class FrameEmitter:
    """Sends the frames of every reply of a process to Redis, many per round trip.

    Frames emitted while a batch is on its way wait and go out together in the next one, as
    one pipeline of EVALSHA calls: a worker streaming many replies makes one socket write and
    one read per batch instead of per frame (the write was its largest cost per token,
    docs/performance.md). No timer: with nothing in flight a frame goes at once. A reply
    awaits each of its frames before the next, so batching never reorders them."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self.sha = script_get(client, EMIT_SCRIPT).sha
        self.waiting: list[tuple[EmitCall, asyncio.Future[int]]] = []
        self.sender: asyncio.Task[None] | None = None

    def emit(self, keys: list[str], args: list[str | int]) -> asyncio.Future[int]:
        """The seq the frame got (or -1, a superseded attempt), once Redis has it."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting.append(((keys, args), future))
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self._send_waiting())
        return future

    async def _send_waiting(self) -> None:
        while self.waiting:
            # A frame whose reply stopped waiting for it (cancelled) is not sent.
            batch = [(call, future) for call, future in self.waiting if not future.done()]
            self.waiting = []
            try:
                results = await self._evalsha_all([call for call, _ in batch])
            except asyncio.CancelledError:
                for _, future in [*batch, *self.waiting]:  # nobody may wait for ever
                    future.cancel()
                raise
            except Exception as error:  # Redis unreachable: every frame of the batch failed
                results = [error] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(int(result))

    async def _evalsha_all(self, calls: list[EmitCall]) -> list[Any]:
        results = await self._pipeline(calls)
        if any(isinstance(result, NoScriptError) for result in results):
            # Redis lost its script cache (a restart): none of the calls ran.
            await self.redis.script_load(EMIT_SCRIPT)
            results = await self._pipeline(calls)
        return results

    async def _pipeline(self, calls: list[EmitCall]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(self.sha, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)


_emitters: "weakref.WeakKeyDictionary[aioredis.Redis, FrameEmitter]" = weakref.WeakKeyDictionary()


def frame_emitter_get(client: aioredis.Redis) -> FrameEmitter:
    emitter = _emitters.get(client)
    if emitter is None:
        emitter = _emitters[client] = FrameEmitter(client)
    return emitter


class ReplyPublisher:
    """Emits the frames of one reply. A worker's publisher is fenced by its attempt number;
    the web's (a queued reply cancelled before any worker took it) is not."""

    def __init__(
        self,
        *,
        job_id: str,
        conversation_id: str,
        client: aioredis.Redis,
        attempt: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.channel = conversation_channel(conversation_id)
        self.log_key = reply_log_key(job_id)
        self.attempt_key = reply_attempt_key(job_id)
        self.attempt = attempt
        self.redis = client
        self.emitter = frame_emitter_get(client)
        self.next_seq: int | None = None  # None: unknown, the script finds it
        self.log_expiry_renewed_at = -math.inf

    async def attempt_begin(self, attempt: int) -> AttemptStart:
        cancelled, last_seq = await script_get(self.redis, ATTEMPT_BEGIN_SCRIPT)(
            keys=[self.attempt_key, reply_cancel_key(self.job_id), self.log_key],
            args=[attempt, RUNNING_LOG_TTL_SECONDS],
        )
        if cancelled == -1:
            raise StaleAttempt()
        self.attempt = attempt
        self.next_seq = int(last_seq) + 1
        if last_seq and not cancelled:
            await self.restart()
        return AttemptStart(cancelled=bool(cancelled))

    async def _emit(self, kind: str, *, ttl: int | None = None, **body: Any) -> int:
        head, tail = _frame_parts(kind, self.job_id, **body)
        fence = "" if self.attempt is None else str(self.attempt)
        expiry = ttl if ttl is not None else self._running_expiry_due()
        seq_guess, self.next_seq = self.next_seq, None  # unknown again if this call fails
        seq = await self.emitter.emit(
            [self.log_key, self.attempt_key],
            [self.channel, head, tail, expiry or "", fence, seq_guess or ""],
        )
        if seq < 0:
            raise StaleAttempt()
        self.next_seq = seq + 1
        if expiry:
            self.log_expiry_renewed_at = time.monotonic()
        return seq

    def _running_expiry_due(self) -> int | None:
        """The running log's expiry, set with the first frame and then every
        RUNNING_LOG_RENEW_SECONDS rather than with every frame."""
        if time.monotonic() - self.log_expiry_renewed_at < RUNNING_LOG_RENEW_SECONDS:
            return None
        return RUNNING_LOG_TTL_SECONDS

    async def delta(self, content: str) -> int:
        return await self._emit("delta", content=content)

    async def restart(self) -> int:
        return await self._emit("restart")

    async def done(
        self, *, reply_id: str, status: str, content: str, usage: dict[str, int] | None
    ) -> int:
        return await self._emit(
            "done",
            ttl=settings.LLM_REPLAY_TTL_SECONDS,
            reply_id=reply_id,
            status=status,
            content=content,
            usage=usage,
        )

    async def notice(self, *, code: str, message: str, **extra: Any) -> int:
        """An error frame that does not end the reply (llm_unavailable): it waits and goes on,
        so the log keeps its running expiry."""
        return await self._emit("error", code=code, message=message, **extra)

    async def error(self, *, code: str, message: str) -> int:
        return await self._emit(
            "error", ttl=settings.LLM_REPLAY_TTL_SECONDS, code=code, message=message
        )


async def reply_cancel_request(*, job_id: str) -> None:
    """Ask whichever worker runs the job to stop it. The key outlives the message, so a
    worker that takes the job over later (or missed the message) sees it too."""
    client = redis_get()
    async with client.pipeline(transaction=True) as pipe:
        pipe.set(reply_cancel_key(job_id), "1", ex=CANCEL_TTL_SECONDS)
        pipe.publish(cancel_channel(), job_id)
        await pipe.execute()


async def reply_replay(*, job_id: str, after: int) -> list[tuple[int, str]]:
    """The frames of a reply with seq > after, in order: (seq, JSON text) each."""
    entries = cast(
        StreamEntries, await redis_get().xrange(reply_log_key(job_id), min=f"0-{after + 1}")
    )
    return [(int(entry_id.partition("-")[2]), fields["f"]) for entry_id, fields in entries]


class ReplyListener(Protocol):
    def reply_frame_received(self, frame: dict[str, Any], raw: str) -> None: ...

    def reply_frames_maybe_missed(self) -> None: ...


class ReplyHub:
    """One per web process: a single pub/sub connection shared by every socket."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self.pubsub = client.pubsub()
        self.listeners: dict[str, set[ReplyListener]] = {}
        self.confirmations: dict[str, asyncio.Future[None]] = {}
        self.reader: asyncio.Task[None] | None = None
        # redis-py's PubSub opens its connection lazily, with an await between the check and
        # the assignment: concurrent first subscribes would each open one, and all but the
        # last would be lost. One subscribe at a time.
        self.subscribing = asyncio.Lock()

    async def join(self, *, conversation_id: str, listener: ReplyListener) -> None:
        channel = conversation_channel(conversation_id)
        listeners = self.listeners.setdefault(channel, set())
        listeners.add(listener)
        if len(listeners) == 1 or channel in self.confirmations:
            await self._subscribe(channel)

    async def leave(self, *, conversation_id: str, listener: ReplyListener) -> None:
        channel = conversation_channel(conversation_id)
        listeners = self.listeners.get(channel, set())
        listeners.discard(listener)
        if not listeners and self.listeners.pop(channel, None) is not None:
            # On failure the reader resubscribes only to channels that still have listeners.
            with contextlib.suppress(RedisError):
                await self.pubsub.unsubscribe(channel)

    async def _subscribe(self, channel: str) -> None:
        # Wait until Redis confirms: a frame published after join() returns is then delivered.
        confirmation = self.confirmations.get(channel)
        if confirmation is None:
            confirmation = asyncio.get_running_loop().create_future()
            self.confirmations[channel] = confirmation
            async with self.subscribing:
                await self.pubsub.subscribe(channel)
            self._reader_ensure()
        await asyncio.wait_for(asyncio.shield(confirmation), timeout=5)

    def _reader_ensure(self) -> None:
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read_forever(), name="reply-hub-reader")

    async def _read_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                # A bounded wait lets the health check (a PING every 30 s) find a dead peer.
                message = await self.pubsub.get_message(timeout=30)
                backoff = 0.1
            except (RedisError, OSError) as error:
                logger.warning("reply hub lost Redis (%s); reconnecting", error)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 5.0)
                await self._reconnect()
                continue
            if message is not None:
                self._dispatch_safely(message)

    async def _reconnect(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.pubsub.aclose()
        self.pubsub = self.redis.pubsub()
        channels = list(self.listeners)
        try:
            if channels:
                await self.pubsub.subscribe(*channels)
        except (RedisError, OSError) as error:
            logger.warning("reply hub could not resubscribe: %s", error)
            return
        # Frames published while the connection was down are only in the replay logs.
        for listener in self._listeners_of(channels):
            listener.reply_frames_maybe_missed()

    def _listeners_of(self, channels: Iterable[str]) -> list[ReplyListener]:
        return [listener for channel in channels for listener in self.listeners.get(channel, ())]

    def _dispatch_safely(self, message: dict[str, Any]) -> None:
        # One bad message must not stop the reader: every socket of the process depends on it.
        try:
            self._dispatch(message)
        except Exception:
            logger.exception("reply hub could not dispatch %r", message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        if message["type"] == "subscribe":
            confirmation = self.confirmations.pop(channel, None)
            if confirmation is not None and not confirmation.done():
                confirmation.set_result(None)
            return
        if message["type"] != "message":
            return
        raw = message["data"]
        frame = json.loads(raw)
        for listener in list(self.listeners.get(channel, ())):
            listener.reply_frame_received(frame, raw)


_hubs: dict[asyncio.AbstractEventLoop, ReplyHub] = {}


def reply_hub_get() -> ReplyHub:
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        for stale in [other for other in _hubs if other.is_closed()]:
            del _hubs[stale]
        hub = _hubs[loop] = ReplyHub(redis_pubsub_client("hub"))
    return hub
