"""Relaying the frames of replies to one socket: in seq order, each once, filling gaps
from the reply's replay log. Part of the chat consumer (consumers.py), kept apart so that
the consumer reads as what it does with the client's frames."""

import asyncio
import logging
from typing import Any

import orjson
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.db import DatabaseError
from redis.exceptions import RedisError

from chat import services
from chat.models import Conversation, Message
from grizz.database import database_call
from llmworker.replies import (
    frame_ends_reply,
    reply_final_frame_from_database,
    reply_replay,
)

logger = logging.getLogger(__name__)

# Redis or PostgreSQL failing: the user is told to retry, the socket stays open.
UNAVAILABLE_ERRORS = (RedisError, OSError, DatabaseError, asyncio.TimeoutError)

conversation_active_job = database_call(services.conversation_active_job)

# What chat/turns.py publishes of a turn (a message; a regenerate), before its reply's frames.
TURN_ANNOUNCEMENTS = frozenset({"user_message", "regenerated"})


class ReplyRelay(AsyncJsonWebsocketConsumer):
    """The chat consumer's base: the ReplyHub hands it frames, one task sends them."""

    conversation: Conversation | None
    socket_id: str

    @property
    def followed(self) -> Conversation:
        """The socket's conversation, once connect() has found it: the only kind of socket
        whose frames are relayed or handled."""
        assert self.conversation is not None
        return self.conversation

    # Shared empty defaults until a socket has something to keep: most sockets idle, and each
    # empty set, deque or finished task of its own costs an idle socket 0.2-0.7 KiB.
    finished_jobs: set[str] | frozenset[str] = frozenset()
    # The reply running when the socket opened: the client says from where it wants its
    # frames (resume); until then only its final frame is sent, which holds everything.
    awaiting_resume: frozenset[str] = frozenset()
    inbox_drainer: asyncio.Task[None] | None = None
    said_hello = False  # frames wait in the inbox until the hello is out

    def relay_setup(self) -> None:
        self.seen_seq: dict[str, int] = {}
        # A list, taken whole by the drainer: an empty one is 56 bytes, a deque 760.
        self.inbox: list[tuple[Any, ...]] = []

    def reply_frame_received(self, frame: dict[str, Any], raw: str) -> None:
        self._inbox_put("frame", frame, raw)

    def reply_frames_maybe_missed(self) -> None:
        self._inbox_put("catch_up")

    def _inbox_put(self, *item: Any) -> None:
        self.inbox.append(item)
        self._inbox_drain_start()

    def _inbox_drain_start(self) -> None:
        if not (self.inbox and self.said_hello):
            return
        if self.inbox_drainer is None or self.inbox_drainer.done():
            self.inbox_drainer = asyncio.create_task(self._drain_inbox())

    async def _drain_inbox(self) -> None:
        while self.inbox:
            # Items put while these are relayed wait in the new list, in order.
            items, self.inbox = self.inbox, []
            for item in items:
                await self._inbox_item_handle(*item)
        self.inbox_drainer = None  # done: not kept by an idle socket

    async def _inbox_item_handle(self, kind: str, *args: Any) -> None:
        try:
            if kind == "frame":
                await self._relay(*args)
            elif kind == "resume":
                await self._resume(*args)
            else:
                await self._catch_up()
        except UNAVAILABLE_ERRORS:
            logger.warning("could not replay reply frames; the client may resume later")
        except Exception:
            # One bad item must not stall the frames queued behind it.
            logger.exception("could not relay %s to a socket", kind)

    async def _relay(self, frame: dict[str, Any], raw: str) -> None:
        if frame["type"] in TURN_ANNOUNCEMENTS:
            return await self._relay_announcement(frame)
        if frame["type"] == "title":  # the conversation's, not a reply's: no seq
            return await self.send(text_data=raw)
        job_id, seq = frame["job_id"], frame["seq"]
        if job_id in self.awaiting_resume:
            if frame_ends_reply(frame):
                await self.send(text_data=raw)
                self._mark_seen(job_id, seq, frame)
            return
        seen = self.seen_seq.get(job_id, 0)
        if seq > seen + 1:
            # Frames this socket never got (it joined mid-reply, or pub/sub dropped some):
            # the replay log has them, in order.
            seen = await self._replay(job_id, after=seen)
        if seq > seen and not self._ended_already(job_id, frame):
            await self.send(text_data=raw)
            self._mark_seen(job_id, seq, frame)

    def _ended_already(self, job_id: str, frame: dict[str, Any]) -> bool:
        """A final frame of a reply whose end the socket has: from PostgreSQL, which has no
        seq to tell it by (a resume between its writer's commit and its final frame)."""
        return job_id in self.finished_jobs and frame_ends_reply(frame)

    async def _relay_announcement(self, frame: dict[str, Any]) -> None:
        # The frame is shared by every socket of the process: read it, never change it.
        if frame["origin"] != self.socket_id:
            self.seen_seq.setdefault(frame["job_id"], 0)
            await self.send_json({k: v for k, v in frame.items() if k != "origin"})

    async def _replay(self, job_id: str, *, after: int) -> int:
        for seq, raw in await reply_replay(job_id=job_id, after=after):
            await self.send(text_data=raw)
            self._mark_seen(job_id, seq, orjson.loads(raw))
            after = seq
        return after

    def _mark_seen(self, job_id: str, seq: int, frame: dict[str, Any]) -> None:
        self.seen_seq[job_id] = seq
        if frame_ends_reply(frame):
            self._mark_finished(job_id)
        elif job_id in self.finished_jobs:
            self._mark_unfinished(job_id)  # an operator's retry of a reply that had failed

    def _mark_finished(self, job_id: str) -> None:
        if not isinstance(self.finished_jobs, set):
            self.finished_jobs = set()
        self.finished_jobs.add(job_id)

    def _mark_unfinished(self, job_id: str) -> None:
        assert isinstance(self.finished_jobs, set)  # it holds job_id
        self.finished_jobs.discard(job_id)

    async def _resume(self, reply: Message, after: int) -> None:
        job_id = str(reply.job_id)
        self.awaiting_resume -= {job_id}
        seen = max(after, self.seen_seq.get(job_id, 0))
        self.seen_seq[job_id] = seen
        if job_id in self.finished_jobs:
            return
        await self._replay(job_id, after=seen)
        if job_id in self.finished_jobs:
            return
        final = await reply_final_frame_from_database(reply)
        if final is not None:
            self._mark_finished(job_id)
            await self.send_json(final)

    async def _catch_up(self) -> None:
        active = await conversation_active_job(conversation_id=self.followed.id)
        jobs = {job for job in self.seen_seq if job not in self.finished_jobs}
        jobs.update([active] if active else [])
        for job_id in jobs - self.awaiting_resume:
            await self._replay(job_id, after=self.seen_seq.get(job_id, 0))
