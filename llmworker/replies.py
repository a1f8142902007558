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
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import RedisError

from llmworker.redis import (
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

# The frame is built as head + N + tail, so the script needs no JSON library and
# the seq is assigned where the frame is appended: log order and seq order always agree.
# A frame of an attempt that is no longer the current one (its worker stalled past its
# lease and another took over) is refused: -1.
EMIT_SCRIPT = """
if ARGV[5] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[5] then return -1 end
local seq = redis.call('XLEN', KEYS[1]) + 1
local frame = ARGV[2] .. seq .. ARGV[3]
redis.call('XADD', KEYS[1], '*', 'f', frame)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[1], frame)
return seq
"""

# Makes an attempt the current one, unless a newer one already is; tells whether the reply
# was cancelled meanwhile and how many frames earlier attempts left in the log.
ATTEMPT_BEGIN_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current >= tonumber(ARGV[1]) then return {-1, 0} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return {redis.call('EXISTS', KEYS[2]), redis.call('XLEN', KEYS[3])}
"""

# While a reply is running its log must outlive any pause in generation.
RUNNING_LOG_TTL_SECONDS = 3600
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
        self.script = script_get(client, EMIT_SCRIPT)

    async def attempt_begin(self, attempt: int) -> AttemptStart:
        cancelled, earlier_frames = await script_get(self.redis, ATTEMPT_BEGIN_SCRIPT)(
            keys=[self.attempt_key, reply_cancel_key(self.job_id), self.log_key],
            args=[attempt, RUNNING_LOG_TTL_SECONDS],
        )
        if cancelled == -1:
            raise StaleAttempt()
        self.attempt = attempt
        if earlier_frames and not cancelled:
            await self.restart()
        return AttemptStart(cancelled=bool(cancelled))

    async def _emit(self, kind: str, *, ttl: int = RUNNING_LOG_TTL_SECONDS, **body: Any) -> int:
        head, tail = _frame_parts(kind, self.job_id, **body)
        fence = "" if self.attempt is None else str(self.attempt)
        seq = int(
            await self.script(
                keys=[self.log_key, self.attempt_key], args=[self.channel, head, tail, ttl, fence]
            )
        )
        if seq < 0:
            raise StaleAttempt()
        return seq

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


async def reply_replay(*, job_id: str, after: int) -> list[str]:
    """The frames of a reply with seq > after, in order, as JSON text."""
    entries = await redis_get().xrange(reply_log_key(job_id))
    return [fields["f"] for _, fields in entries[after:]]


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
