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
import logging
import math
import random
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson
import redis.asyncio as aioredis
from django.conf import settings
from redis.exceptions import NoScriptError, RedisError

from chat.models import Message
from grizz import metrics
from llmworker.redis import (
    Command,
    CommandBatches,
    StreamEntries,
    cancel_channel,
    commands_packed,
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

# For a reply PostgreSQL holds as finished, found again by a worker (its job was taken over
# from a worker that died or stalled after saving it): its final frame, from the database,
# unless the log ends with one. With no log there is nothing to end: whoever resumes reads
# PostgreSQL. The attempt key goes to the finished attempt and a half: any frame that
# attempt still sends (a stalled worker) is refused, and the next attempt an operator's
# retry begins is above it.
FINAL_FRAME_ENSURE_SCRIPT = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if not last then return 0 end
redis.call('SET', KEYS[2], ARGV[5] .. '.5', 'EX', ARGV[6])
local text = last[2][2]
if string.sub(text, 1, 14) == '{"type":"done"' then return 0 end
if string.sub(text, 1, 15) == '{"type":"error"'
    and not string.find(text, '"code":"llm_unavailable"', 1, true) then return 0 end
local seq = tonumber(string.match(last[1], '%d+$')) + 1
local frame = ARGV[2] .. seq .. ARGV[3]
redis.call('XADD', KEYS[1], '0-' .. seq, 'f', frame)
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', ARGV[1], frame)
return seq
"""

# This many frames or more waiting at a round of the emitter: the worker is busy, and for
# LLM_DELTA_WINDOW_MS a reply's deltas are sent at most that often (FrameEmitter). With
# rounds LLM_FRAME_BATCH_MS (5) apart, 1,600 frames a second.
WINDOW_ROUND_FRAMES = 8

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


def frame_ends_reply(frame: Mapping[str, object]) -> bool:
    """Whether a frame is a reply's last: `done`, or an `error` other than `llm_unavailable`
    (the provider is down; the reply waits for it and goes on). FINAL_FRAME_ENSURE_SCRIPT
    tells it the same way from a frame's text."""
    if frame["type"] == "error":
        return frame.get("code") != "llm_unavailable"
    return frame["type"] == "done"


def reply_final_frame(reply: Message) -> dict[str, Any]:
    """The last frame of a finished reply, from PostgreSQL: for a client that resumes once
    its replay log has expired (the database has the whole answer; the frame carries no
    seq), and for a log whose worker died before sending it."""
    if reply.status == Message.Status.FAILED:
        return {
            "type": "error",
            "code": "llm_error",
            "message": reply.error,
            "job_id": str(reply.job_id),
        }
    return {
        "type": "done",
        "job_id": str(reply.job_id),
        "reply_id": str(reply.id),
        "status": reply.status,
        "content": reply.content,
        "usage": reply.usage,
    }


def _json(value: Any) -> str:
    # orjson: a fraction of the stdlib's cost, once per frame in the worker and the web.
    return orjson.dumps(value).decode()


def _frame_parts(kind: str, job_id: str, **body: Any) -> tuple[str, str]:
    """The JSON text of a frame before and after its seq number."""
    head = '{"type":' + _json(kind) + ',"job_id":' + _json(job_id) + ',"seq":'
    tail = "," + _json(body)[1:] if body else "}"
    return head, tail


EmitCall = tuple[list[str], list[str | int]]  # the keys and args of one EMIT_SCRIPT call
# A round: for each reply with frames in it, the frames and their script calls.
Round = list[tuple["ReplyPublisher", list["_Frame"], list[EmitCall]]]


@dataclass
class _Frame:
    """A frame waiting to be sent. A delta stays open, taking more text, until it is sent."""

    kind: str
    body: dict[str, Any]
    ttl: int | None = None
    texts: list[str] | None = None  # a delta's text, joined when it goes out
    waiter: asyncio.Future[int] | None = None  # made only when someone awaits the frame

    def waited(self) -> asyncio.Future[int]:
        if self.waiter is None:
            self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter


class FrameEmitter:
    """Sends the frames of every reply of a process to Redis, many per round trip.

    Each reply (ReplyPublisher) queues its frames here; one task sends what every reply has
    queued as one write of EVALSHA calls (CommandBatches), and while that round is on its
    way, new frames wait for the next: a worker streaming many replies makes one socket
    write and one read per round instead of per token (the write was its largest cost per
    token, docs/performance.md). Deltas that queue up behind a round merge into one frame. Rounds
    go one at a time and a reply's frames keep their order inside each, so nothing is ever
    reordered.

    Under load rounds are spaced LLM_FRAME_BATCH_MS apart, so that each carries more frames
    (each write to Redis costs the worker a system call that wakes Redis) and deltas of one
    reply that come within the spacing go as one frame; a round after a quiet spell, and
    one holding a reply's first frame, goes at once.

    While the worker is busy (a round in the last LLM_DELTA_WINDOW_MS found
    WINDOW_ROUND_FRAMES frames or more waiting), a reply sends deltas at most every
    LLM_DELTA_WINDOW_MS: one that comes sooner after the reply's last frame waits, and those
    that follow it within the window join it. Every frame costs each web process a wake-up
    and each socket a write, whatever it carries. A reply's first frame, and deltas before
    any other kind of frame, never wait for it; a worker with few replies streaming never
    holds one."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self.sha = script_get(client, EMIT_SCRIPT).sha
        self.batches = CommandBatches(client)  # the rounds, one at a time
        self.ready: dict[ReplyPublisher, None] = {}  # an ordered set: who has frames queued
        self.sender: asyncio.Task[None] | None = None
        self.spacing = settings.LLM_FRAME_BATCH_MS / 1000
        self.window = settings.LLM_DELTA_WINDOW_MS / 1000
        self.last_round_at = -math.inf
        self.busy_until = -math.inf  # the window applies until then
        self.first_frame_waits = asyncio.Event()

    def publisher_ready(self, publisher: "ReplyPublisher") -> None:
        self.ready[publisher] = None
        if not publisher.sent_any:
            self.first_frame_waits.set()
        if self.sender is None or self.sender.done():
            self.sender = asyncio.create_task(self._send_rounds())

    async def _send_rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while self.ready:
            await self._first_frame_or_wait(self.last_round_at + self.spacing - loop.time())
            round_ = self._round_take(loop.time())
            if round_:
                await self._round_send(round_)
            elif self.ready and not self.spacing:
                # Every reply waits for its window and no spacing paces the rounds
                # (LLM_FRAME_BATCH_MS=0): the next round when the first is due, not at once.
                due = min(publisher.last_sent_at for publisher in self.ready) + self.window
                await self._first_frame_or_wait(due - loop.time())

    def _round_take(self, now: float) -> Round:
        """The frames of the round that starts `now`; replies whose deltas wait for the
        window stay ready for a later one."""
        if sum(len(publisher.outgoing) for publisher in self.ready) >= WINDOW_ROUND_FRAMES:
            self.busy_until = now + self.window
        busy = now < self.busy_until
        self.last_round_at = now
        round_: Round = []
        held: dict[ReplyPublisher, None] = {}
        for publisher in self.ready:
            if not publisher.outgoing:
                continue  # its frames failed meanwhile
            if busy and publisher.deltas_held(since=now - self.window):
                held[publisher] = None
            else:
                round_.append((publisher, *publisher.frames_take(at=now)))
        self.ready = held
        return round_

    async def _first_frame_or_wait(self, seconds: float) -> None:
        """Wait `seconds`, or less if a reply's first frame comes (it goes at once)."""
        if seconds > 0 and not self.first_frame_waits.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.first_frame_waits.wait()
        self.first_frame_waits.clear()

    async def _round_send(self, round_: Round) -> None:
        calls = [call for _, _, calls in round_ for call in calls]
        try:
            results: list[Any] = await self._evalsha_all(calls)
        except asyncio.CancelledError:
            for publisher, frames, _ in round_:  # nobody may wait for ever
                publisher.frames_failed(frames, asyncio.CancelledError())
            for publisher in self.ready:
                publisher.frames_failed([], asyncio.CancelledError())
            raise
        except Exception as error:  # Redis unreachable: every frame of the round failed
            results = [error] * len(calls)
        at = 0
        for publisher, frames, _ in round_:
            publisher.frames_sent(frames, results[at : at + len(frames)])
            at += len(frames)

    async def _evalsha_all(self, calls: list[EmitCall]) -> list[Any]:
        results = await self._pipeline(calls)
        if any(isinstance(result, NoScriptError) for result in results):
            # Redis lost its script cache (a restart): none of the calls ran.
            await self.redis.script_load(EMIT_SCRIPT)
            results = await self._pipeline(calls)
        return results

    async def _pipeline(self, calls: list[EmitCall]) -> list[Any]:
        return await self.batches.run(
            [["EVALSHA", self.sha, len(keys), *keys, *args] for keys, args in calls]
        )


_emitters: "weakref.WeakKeyDictionary[aioredis.Redis, FrameEmitter]" = weakref.WeakKeyDictionary()


def frame_emitter_get(client: aioredis.Redis) -> FrameEmitter:
    emitter = _emitters.get(client)
    if emitter is None:
        emitter = _emitters[client] = FrameEmitter(client)
    return emitter


class ReplyPublisher:
    """Emits the frames of one reply. A worker's publisher is fenced by its attempt number;
    the web's (a queued reply cancelled before any worker took it) is not.

    Deltas are queued without waiting (`delta_push`); a failure to send one is raised by the
    next push or by `deltas_flush`. Every other frame is awaited."""

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
        self.outgoing: list[_Frame] = []
        self.in_flight: list[_Frame] = []
        self.failure: BaseException | None = None  # of a delta nobody awaited
        # From attempt_begin until the attempt's fence is up, frames wait (`holding`); if
        # it failed to go up, `begin_failure` says why, and nothing is ever sent.
        self.holding = False
        self.begin_failure: BaseException | None = None
        self.sent_any = False  # the first frame is never held back by the round spacing
        self.delta_frames = 0  # made so far; the first takes no later text
        self.last_sent_at = -math.inf  # when its last frames went, by the emitter's clock

    def attempt_begin(self, attempt: int) -> "asyncio.Task[AttemptStart]":
        """Make `attempt` the reply's current one, in the background: the worker sends the
        provider request meanwhile (one round trip less before the first token). Frames
        queued until then wait, and go only once the attempt's fence is up; if it never is
        (StaleAttempt: a newer attempt has begun; Redis failing), none of them ever goes.
        The task tells whether the reply was cancelled before the attempt began."""
        self.holding = True
        begin = asyncio.ensure_future(self._attempt_begin(attempt))
        begin.add_done_callback(self._attempt_begun)
        return begin

    async def _attempt_begin(self, attempt: int) -> AttemptStart:
        cancelled, last_seq = await script_get(self.redis, ATTEMPT_BEGIN_SCRIPT)(
            keys=[self.attempt_key, reply_cancel_key(self.job_id), self.log_key],
            args=[attempt, RUNNING_LOG_TTL_SECONDS],
        )
        if cancelled == -1:
            raise StaleAttempt()
        self.attempt = attempt
        self.next_seq = int(last_seq) + 1
        if last_seq and not cancelled:
            # Before anything this attempt queued meanwhile: the earlier text starts over.
            self.outgoing.insert(0, _Frame("restart", {}))
        return AttemptStart(cancelled=bool(cancelled))

    def _attempt_begun(self, begin: "asyncio.Task[AttemptStart]") -> None:
        failure = asyncio.CancelledError() if begin.cancelled() else begin.exception()
        if failure is not None:
            self.begin_failure = failure  # and the frames stay held, for good
            return self.frames_failed([], failure)
        self.holding = False
        if self.outgoing:
            self.emitter.publisher_ready(self)

    # Queueing frames

    def delta_push(self, text: str) -> None:
        # A delta still waiting takes the text that comes meanwhile, except the reply's
        # first: that one shows the first token as it came, even when later ones queue
        # behind it (the attempt's fence not up yet, a round of the emitter in flight).
        self._failure_raise()
        last = self.outgoing[-1] if self.outgoing else None
        if last is not None and last.texts is not None and self.delta_frames > 1:
            last.texts.append(text)
        else:
            self.outgoing.append(_Frame("delta", {}, texts=[text]))
            self.delta_frames += 1
        self._ready()

    async def deltas_flush(self) -> None:
        """Wait until every delta pushed so far is in Redis."""
        pending = self.outgoing or self.in_flight
        if pending:
            await pending[-1].waited()
        self._failure_raise()

    def _failure_raise(self) -> None:
        if self.begin_failure is not None:
            raise self.begin_failure
        failure, self.failure = self.failure, None
        if failure is not None:
            raise failure

    async def _emit(self, kind: str, *, ttl: int | None = None, **body: Any) -> int:
        if self.begin_failure is not None:
            raise self.begin_failure
        frame = _Frame(kind, body, ttl=ttl)
        self.outgoing.append(frame)
        self._ready()
        return await frame.waited()

    def _ready(self) -> None:
        if not self.holding:  # else they go once the attempt's fence is up
            self.emitter.publisher_ready(self)

    # The emitter's side

    def deltas_held(self, *, since: float) -> bool:
        """Whether the reply's frames wait for a later round: deltas only, its last frame
        sent after `since` (the emitter's clock)."""
        return self.last_sent_at > since and all(f.texts is not None for f in self.outgoing)

    def frames_take(self, *, at: float) -> tuple[list[_Frame], list[EmitCall]]:
        """The frames to send in this round (the emitter's clock says `at`), and their
        script calls."""
        frames, self.outgoing = self.outgoing, []
        self.in_flight = frames
        self.sent_any = True
        self.last_sent_at = at
        return frames, [self._call(frame, index) for index, frame in enumerate(frames)]

    def _call(self, frame: _Frame, index: int) -> EmitCall:
        body = {"content": "".join(frame.texts)} if frame.texts is not None else frame.body
        head, tail = _frame_parts(frame.kind, self.job_id, **body)
        fence = "" if self.attempt is None else str(self.attempt)
        expiry = frame.ttl if frame.ttl is not None else self._running_expiry_due()
        if expiry:
            self.log_expiry_renewed_at = time.monotonic()
        # Frames of one round run in order, so each guesses the seq after the one before.
        guess = "" if self.next_seq is None else self.next_seq + index
        return [self.log_key, self.attempt_key], [
            self.channel,
            head,
            tail,
            expiry or "",
            fence,
            guess,
        ]

    def frames_sent(self, frames: list[_Frame], results: list[Any]) -> None:
        self.in_flight = []
        for index, (frame, result) in enumerate(zip(frames, results, strict=True)):
            if isinstance(result, BaseException) or int(result) < 0:
                failure = result if isinstance(result, BaseException) else StaleAttempt()
                return self.frames_failed(frames[index:], failure)
            self.next_seq = int(result) + 1
            if frame.waiter is not None and not frame.waiter.done():
                frame.waiter.set_result(int(result))

    def frames_failed(self, frames: list[_Frame], failure: BaseException) -> None:
        """These frames and every one queued after them are not sent: a reply's frames
        must never have a gap."""
        self.next_seq = None  # unknown again: the script finds it next time
        self.log_expiry_renewed_at = -math.inf
        self.in_flight = []
        unsent, self.outgoing = [*frames, *self.outgoing], []
        awaited = False
        for frame in unsent:
            if frame.waiter is None or frame.waiter.done():
                continue
            if isinstance(failure, asyncio.CancelledError):
                frame.waiter.cancel()
            else:
                frame.waiter.set_exception(failure)
            awaited = True
        if not awaited:
            self.failure = failure

    def _running_expiry_due(self) -> int | None:
        """The running log's expiry, set with the first frame and then every
        RUNNING_LOG_RENEW_SECONDS rather than with every frame."""
        if time.monotonic() - self.log_expiry_renewed_at < RUNNING_LOG_RENEW_SECONDS:
            return None
        return RUNNING_LOG_TTL_SECONDS

    async def delta(self, content: str) -> int:
        """One delta on its own, awaited (the worker pushes its deltas instead)."""
        await self.deltas_flush()
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

    async def final_frame_ensure(self, reply: Message) -> int:
        """Ends the reply's log with its final frame from PostgreSQL, unless it ends with
        one or there is no log; the seq of the frame sent, else 0."""
        body = reply_final_frame(reply)
        head, tail = _frame_parts(body.pop("type"), body.pop("job_id"), **body)
        ensure = script_get(self.redis, FINAL_FRAME_ENSURE_SCRIPT)
        sent = await ensure(
            keys=[self.log_key, self.attempt_key],
            args=[
                self.channel,
                head,
                tail,
                settings.LLM_REPLAY_TTL_SECONDS,
                reply.attempt,
                RUNNING_LOG_TTL_SECONDS,
            ],
        )
        return int(sent)

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


async def conversation_title_announce(*, conversation_id: str, title: str) -> None:
    """Tell the sockets open on a conversation its new title. Live only, not in any replay
    log: a page opened later renders the title from PostgreSQL."""
    frame = {"type": "title", "conversation_id": conversation_id, "title": title}
    await redis_get().publish(conversation_channel(conversation_id), _json(frame))


async def reply_final_frame_from_database(reply: Message) -> dict[str, Any] | None:
    """The final frame of a finished reply from PostgreSQL, for a client that has not had
    it, when the log cannot bring it: the log has expired, or ended before the seq the
    client has. None while the reply runs, or while its log is there without its final
    frame: that is on its way (a worker saves a reply before it sends that frame, and the
    worker that takes a job over from one that died sends it: FINAL_FRAME_ENSURE_SCRIPT)."""
    if reply.status in Message.ACTIVE_STATUSES:
        return None
    job_id = str(reply.job_id)
    last = cast(StreamEntries, await redis_get().xrevrange(reply_log_key(job_id), count=1))
    if last and not frame_ends_reply(orjson.loads(last[0][1]["f"])):
        return None
    return reply_final_frame(reply)


async def reply_replay(*, job_id: str, after: int) -> list[tuple[int, str]]:
    """The frames of a reply with seq > after, in order: (seq, JSON text) each."""
    entries = cast(
        StreamEntries, await redis_get().xrange(reply_log_key(job_id), min=f"0-{after + 1}")
    )
    return [(int(entry_id.partition("-")[2]), fields["f"]) for entry_id, fields in entries]


class ReplyListener(Protocol):
    def reply_frame_received(self, frame: dict[str, Any], raw: str) -> None: ...

    def reply_frames_maybe_missed(self) -> None: ...


def _runs(requests: list[tuple[str, str]]) -> list[Command]:
    """Consecutive requests of one command as one command of several channels, in order:
    [(SUBSCRIBE, a), (SUBSCRIBE, b), (UNSUBSCRIBE, a)] is SUBSCRIBE a b, UNSUBSCRIBE a."""
    commands: list[Command] = []
    for command, channel in requests:
        if commands and commands[-1][0] == command:
            commands[-1].append(channel)
        else:
            commands.append([command, channel])
    return commands


# How long the hub's connection may carry nothing before the hub checks its health.
HUB_QUIET_SECONDS = 30


class ReplyHub:
    """One per web process: a single pub/sub connection shared by every socket."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self.pubsub = client.pubsub()
        self.listeners: dict[str, set[ReplyListener]] = {}
        self.confirmations: dict[str, asyncio.Future[None]] = {}
        # The channels with listeners that Redis confirmed, on the current connection.
        self.subscribed: set[str] = set()
        self.reader: asyncio.Task[None] | None = None
        self.heartbeat: asyncio.Task[None] | None = None
        # (Un)subscriptions not yet written, in the order they were asked for, and the one
        # task that writes them: the only writer of the connection besides the heartbeat.
        self.requests: list[tuple[str, str]] = []
        self.writer: asyncio.Task[None] | None = None
        # redis-py's PubSub opens its connection lazily, with an await between the check and
        # the assignment: the writer and a reconnection must not each open one.
        self.connecting = asyncio.Lock()

    async def join(self, *, conversation_id: str, listener: ReplyListener) -> None:
        channel = conversation_channel(conversation_id)
        listeners = self.listeners.setdefault(channel, set())
        listeners.add(listener)
        if channel not in self.subscribed:  # or a subscription in flight: wait for it
            await self._subscribe(channel)

    async def leave(self, *, conversation_id: str, listener: ReplyListener) -> None:
        channel = conversation_channel(conversation_id)
        listeners = self.listeners.get(channel, set())
        listeners.discard(listener)
        if not listeners and self.listeners.pop(channel, None) is not None:
            self.subscribed.discard(channel)
            # Not waited for: on failure the reader resubscribes only to channels that still
            # have listeners.
            self._request("UNSUBSCRIBE", channel)

    async def _subscribe(self, channel: str) -> None:
        # Wait until Redis confirms: a frame published after join() returns is then delivered.
        confirmation = self.confirmations.get(channel)
        if confirmation is None:
            confirmation = asyncio.get_running_loop().create_future()
            self.confirmations[channel] = confirmation
            self._request("SUBSCRIBE", channel)
        await asyncio.wait_for(asyncio.shield(confirmation), timeout=5)

    def _request(self, command: str, channel: str) -> None:
        self.requests.append((command, channel))
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._requests_write(), name="reply-hub-writer")

    async def _requests_write(self) -> None:
        """Write the (un)subscriptions asked for since the last write, in order, as one
        write: the sockets of a reconnect wave subscribe in a few commands, not one each.
        Through redis-py's PubSub.subscribe, each cost the web its retry wrapper, key
        normalising and bookkeeping, and a write of its own (docs/performance.md)."""
        while self.requests:
            requests, self.requests = self.requests, []
            try:
                await self._requests_send(requests)
            except (RedisError, OSError) as error:
                self._subscriptions_fail(requests, error)

    async def _requests_send(self, requests: list[tuple[str, str]]) -> None:
        async with self.connecting:
            if self.pubsub.connection is None:
                await self.pubsub.connect()  # type: ignore[no-untyped-call]
        # cast: None until connected, whatever redis-py's annotation says.
        connection = cast(aioredis.Connection, self.pubsub.connection)
        if not connection.is_connected:
            # Lost since: the reader reconnects and resubscribes; these sockets try again.
            raise ConnectionError("the reply hub's pub/sub connection is closed")
        self._reader_ensure()
        await connection.send_packed_command(commands_packed(_runs(requests)), check_health=False)

    def _subscriptions_fail(self, requests: list[tuple[str, str]], error: Exception) -> None:
        for command, channel in requests:
            confirmation = self.confirmations.pop(channel, None) if command == "SUBSCRIBE" else None
            if confirmation is not None and not confirmation.done():
                confirmation.set_exception(error)

    def _reader_ensure(self) -> None:
        if self.reader is None or self.reader.done():
            self.reader = asyncio.create_task(self._read_forever(), name="reply-hub-reader")
        if self.heartbeat is None or self.heartbeat.done():
            self.heartbeat = asyncio.create_task(self._health_checks(), name="reply-hub-health")

    async def _health_checks(self) -> None:
        """A PING when the connection has carried nothing for HUB_QUIET_SECONDS: a peer that
        is gone then shows as an error, and the reader reconnects. Apart from the reader, so
        that its reads need no timeout of their own (a timer per frame)."""
        while True:
            await asyncio.sleep(HUB_QUIET_SECONDS)
            # Not connected (between reconnections): the reader's to mend.
            with contextlib.suppress(RedisError, OSError, RuntimeError):
                await self.pubsub.check_health()  # type: ignore[no-untyped-call]

    async def _read_forever(self) -> None:
        backoff = 0.1
        while True:
            try:
                reply = await self._next_reply()
                backoff = 0.1
            except (RedisError, OSError) as error:
                logger.warning("reply hub lost Redis (%s); reconnecting", error)
                await asyncio.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 5.0)
                await self._reconnect()
                continue
            if reply is not None:
                self._dispatch_safely(reply)

    async def _next_reply(self) -> list[Any] | None:
        """The next reply on the pub/sub connection (None: nothing for the sockets).

        Read from the connection itself: PubSub.get_message wraps every read in a health
        check, a timeout, a retry, a timing record and a dict, the largest part of what a
        frame cost the web's reader (docs/performance.md). Of that, what the hub needs
        happens off the hot path: the health check (_health_checks) and PubSub's bookkeeping
        of its (un)subscriptions, here."""
        # None until the first subscribe, whatever redis-py's annotation says.
        connection = cast(aioredis.Connection | None, self.pubsub.connection)
        if connection is None or not connection.is_connected:
            raise ConnectionError("the reply hub's pub/sub connection is closed")
        # math.inf: no timeout (redis-py's opt-in); the health checks are _health_checks'.
        reply = await connection.read_response(
            timeout=math.inf, disconnect_on_error=False, push_request=True
        )
        if not isinstance(reply, list):
            # The health check's answer while no channel is subscribed; while some are (RESP2,
            # redis_pubsub_client), it is a ["pong", ...] list, which _dispatch ignores.
            return None
        if reply[0] != "message":
            await self.pubsub.handle_message(reply)  # type: ignore[no-untyped-call]
        return reply

    async def _reconnect(self) -> None:
        metrics.web().hub_reconnects.inc()
        async with self.connecting:
            with contextlib.suppress(RedisError, OSError):
                await self.pubsub.aclose()
            self.pubsub = self.redis.pubsub()
            self.subscribed.clear()  # until the new connection confirms them
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

    def _dispatch_safely(self, reply: list[Any]) -> None:
        # One bad message must not stop the reader: every socket of the process depends on it.
        try:
            self._dispatch(reply)
        except Exception:
            # Its kind and channel: the rest is a frame, tokens or a user's message.
            logger.exception(
                "reply hub could not dispatch %r", reply[:2], extra={"content": repr(reply)}
            )

    def _dispatch(self, reply: list[Any]) -> None:
        # ["message", channel, data], ["subscribe", channel, count], ["pong", ...], ...
        kind, channel = reply[0], reply[1]
        if kind == "subscribe":
            if channel in self.listeners:
                self.subscribed.add(channel)
            confirmation = self.confirmations.pop(channel, None)
            if confirmation is not None and not confirmation.done():
                confirmation.set_result(None)
            return
        if kind != "message":
            return
        raw = reply[2]
        frame = orjson.loads(raw)
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
