"""The chat WebSocket (contract: docs/websocket.md). Thin: it validates frames, sends
messages as turns (chat/turns.py, as the REST API does), calls the services, and relays the
frames of replies to the browser in seq order."""

import asyncio
import contextlib
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any, cast

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable, WebSocketDisconnectEvent
from channels.consumer import get_handler_name
from channels.db import aclose_old_connections
from channels.exceptions import StopConsumer
from django.conf import settings
from django.contrib.auth.models import User

from chat import services
from chat.auth import DATABASE_DOWN, IDENTITY, SocketIdentity
from chat.models import Conversation, Message
from chat.relay import UNAVAILABLE_ERRORS, ReplyRelay
from chat.turns import (
    REDIS_CALL_TIMEOUT,
    Queued,
    Sender,
    TurnOutcome,
    turn_regenerate,
    turn_send,
)
from grizz import metrics
from grizz.database import database_call
from grizz.logs import log_context_bind
from llmworker.replies import reply_hub_get

if TYPE_CHECKING:
    from channels.consumer import _ChannelScope

logger = logging.getLogger(__name__)

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404
CLOSE_IDLE = 4408
# Not 1013 (RFC 6455's "try again later"): daphne lets an application close only with 1000
# or 3000-4999, and turned 1013 into a 1011 and a traceback.
CLOSE_TRY_AGAIN_LATER = 4503
SUBPROTOCOL = "grizz"

reply_for_job = database_call(services.reply_for_job)


def _utf8_length_over(text: str, limit: int) -> bool:
    # A character is at most 4 bytes: only text near the limit needs encoding to be sure.
    return len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit)


def _uuid_or_none(value: object) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


class ChatConsumer(ReplyRelay):
    # Not on the Channels layer: reply frames come through the ReplyHub (llmworker/replies.py),
    # one pub/sub connection per process with a replay log behind it. A layer receive loop
    # per socket would add nothing, and a Redis blip in it would end every socket.
    channel_layer_alias = "none"
    conversation: Conversation | None = None
    user: User  # set by connect(), which refuses a socket whose user is not signed in
    priority: str  # the user's replies' (services.user_priority), set with the user
    sender: Sender | None = None  # this socket's turns' (chat/turns.py)
    counted_open = False  # in the open sockets' gauge, until its disconnect

    async def __call__(
        self, scope: "_ChannelScope", receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        # Channels' own, for a consumer without a channel layer: the client's events are
        # awaited here one at a time, in order, instead of by await_many_dispatch, which
        # awaits each in a task of its own through asyncio.wait: a task and its waiter
        # for every socket (about 2 KiB of an idle one) and per client frame.
        self.scope = scope
        self.base_send = send
        with contextlib.suppress(StopConsumer):
            while True:
                # An ASGI event TypedDict, which Channels' dispatch takes as the dict it is.
                await self.dispatch(cast(dict[str, Any], await receive()))

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Channels' own, without the close_old_connections it runs first on the one
        # thread-sensitive executor thread for every event (every client frame): this
        # consumer's database calls run on grizz.database's pool, which cleans up after
        # each call itself, and the hop cost every frame a wait behind every other socket's.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def websocket_disconnect(self, message: WebSocketDisconnectEvent) -> None:
        # Channels' own without the aclose_old_connections it ends with: a hop to the one
        # thread-sensitive thread for every socket closed (11 % of the web's samples while
        # sockets opened and closed, py-spy), to tidy a database connection that only a
        # cancel uses, and `_on_cancel` tidies it itself. On no channel layer: no groups.
        await self.disconnect(message["code"])
        raise StopConsumer()

    async def connect(self) -> None:
        self.socket_id = uuid.uuid4().hex  # tells this socket's announcements from others'
        self.relay_setup()
        if self.scope.get(DATABASE_DOWN):
            return await self._refuse(CLOSE_TRY_AGAIN_LATER)
        # Set on every socket by the stack in grizz/asgi.py.
        identity = cast(SocketIdentity | None, self.scope.get(IDENTITY))
        if identity is None:
            return await self._refuse(CLOSE_UNAUTHENTICATED)
        conversation_id = _uuid_or_none(self.scope["url_route"]["kwargs"]["conversation_id"])
        # The socket's own task (__call__): on each of its lines until it closes.
        log_context_bind(user_id=str(identity.user_id))
        try:
            # The user and the conversation in one database call: the token was checked
            # without one.
            opened = await services.conversation_open_for_user_async(
                user_id=identity.user_id, conversation_id=conversation_id
            )
            if opened is None or not identity.accepts(opened.user):
                return await self._refuse(CLOSE_UNAUTHENTICATED)
            if opened.conversation is None:
                return await self._refuse(CLOSE_NOT_FOUND)
            self.user, self.priority = opened.user, opened.priority
            # The active job first, then follow: a reply that starts in between is followed
            # from its first frame, like any reply that starts while the socket is open.
            conversation, active_job_id = opened.conversation, opened.active_job_id
            log_context_bind(conversation_id=str(conversation.id))
            if active_job_id:
                self.awaiting_resume = frozenset({active_job_id})
            await self._follow(conversation)
        except UNAVAILABLE_ERRORS:
            logger.exception("socket refused: a dependency is down")
            return await self._refuse(CLOSE_TRY_AGAIN_LATER)
        await self.accept(subprotocol=self._subprotocol())
        metrics.web().sockets_open.inc()
        self.counted_open = True
        self._idle_watch()
        await self.send_json(
            {
                "type": "hello",
                "conversation_id": str(conversation.id),
                "active_job_id": active_job_id,
            }
        )
        self.said_hello = True
        self._inbox_drain_start()

    def _subprotocol(self) -> str | None:
        # A browser that sends its token as a subprotocol ("grizz", "jwt.<token>") must see
        # one of the protocols it offered echoed back, never the token.
        return SUBPROTOCOL if SUBPROTOCOL in self.scope.get("subprotocols", []) else None

    def _idle_watch(self) -> None:
        """Close the socket after WS_IDLE_TIMEOUT_SECONDS without a client frame, unless a
        reply is streaming to it. One timer per socket, re-armed only when it fires."""
        loop = asyncio.get_running_loop()
        self.last_client_frame_at = loop.time()
        self.idle_timer = loop.call_later(settings.WS_IDLE_TIMEOUT_SECONDS, self._idle_check)

    def _idle_check(self) -> None:
        loop = asyncio.get_running_loop()
        quiet_until = self.last_client_frame_at + settings.WS_IDLE_TIMEOUT_SECONDS
        streaming = any(job not in self.finished_jobs for job in self.seen_seq)
        if loop.time() < quiet_until or streaming:
            delay = max(quiet_until - loop.time(), 1.0)
            self.idle_timer = loop.call_later(delay, self._idle_check)
            return
        self.idle_closer = asyncio.create_task(self.close(CLOSE_IDLE))

    async def _refuse(self, code: int) -> None:
        metrics.web().socket_refusals.labels(str(code)).inc()
        # A close code of our own can only be sent on an accepted socket.
        await self.accept(subprotocol=self._subprotocol())
        await self.close(code)

    async def _follow(self, conversation: Conversation) -> None:
        self.conversation = conversation
        await asyncio.wait_for(
            reply_hub_get().join(conversation_id=str(conversation.id), listener=self),
            REDIS_CALL_TIMEOUT,
        )

    async def disconnect(self, code: int) -> None:
        if self.counted_open:
            metrics.web().sockets_open.dec()
            self.counted_open = False
        if getattr(self, "idle_timer", None) is not None:
            self.idle_timer.cancel()
        if self.conversation is None:
            return
        # On failure the hub drops the subscription when it reconnects.
        with contextlib.suppress(*UNAVAILABLE_ERRORS):
            await reply_hub_get().leave(conversation_id=str(self.conversation.id), listener=self)
        if self.inbox_drainer is not None:
            self.inbox_drainer.cancel()

    # Client → server

    async def receive(
        self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any
    ) -> None:
        self.last_client_frame_at = asyncio.get_running_loop().time()
        if text_data is None:
            return await self._error("invalid", "Frames must be JSON text, not binary.")
        if _utf8_length_over(text_data, settings.WS_MAX_FRAME_BYTES):
            return await self._error(
                "too_long", f"Frames are limited to {settings.WS_MAX_FRAME_BYTES} bytes."
            )
        try:
            frame = json.loads(text_data)
        except ValueError:
            return await self._error("invalid", "The frame is not valid JSON.")
        if not isinstance(frame, dict):
            return await self._error("invalid", "The frame must be a JSON object.")
        kind = frame.get("type")
        handler = self.frame_handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            return await self._error("invalid", "Unknown frame type.")
        await handler(self, frame)

    async def _on_ping(self, frame: dict[str, Any]) -> None:
        await self.send_json({"type": "pong"})

    async def _on_message(self, frame: dict[str, Any]) -> None:
        outcome = await turn_send(
            conversation=self.followed,
            sender=self._sender(),
            content=frame.get("content"),
            client_msg_id=frame.get("client_msg_id"),
        )
        await self._send_outcome(outcome)

    async def _on_regenerate(self, frame: dict[str, Any]) -> None:
        reply_id = _uuid_or_none(frame.get("reply_id"))
        if reply_id is None:
            return await self._error("invalid", "regenerate needs a reply_id.")
        outcome = await turn_regenerate(
            conversation=self.followed, sender=self._sender(), reply_id=reply_id
        )
        await self._send_outcome(outcome)

    async def _send_outcome(self, outcome: TurnOutcome) -> None:
        if isinstance(outcome, Queued):
            return await self._send_queued(outcome.sent, outcome.queue_position)
        extra = {} if outcome.retry_after is None else {"retry_after": outcome.retry_after}
        await self._error(outcome.code, outcome.message, **extra)

    def _sender(self) -> Sender:
        # Made on the first message: most sockets send none.
        if self.sender is None:
            self.sender = Sender(user=self.user, origin=self.socket_id, priority=self.priority)
        return self.sender

    async def _send_queued(self, sent: services.SentMessage, queue_position: int | None) -> None:
        job_id = str(sent.reply.job_id)
        self.seen_seq.setdefault(job_id, 0)
        queued: dict[str, Any] = {
            "type": "queued",
            "job_id": job_id,
            "message_id": str(sent.message.id),
            "reply_id": str(sent.reply.id),
        }
        if sent.superseded is not None:
            queued["superseded_reply_id"] = str(sent.superseded.id)
        if queue_position is not None:
            queued["queue_position"] = queue_position
        await self.send_json(queued)

    async def _on_resume(self, frame: dict[str, Any]) -> None:
        job_id = _uuid_or_none(frame.get("job_id"))
        after = frame.get("after", 0)
        if job_id is None or not isinstance(after, int) or isinstance(after, bool) or after < 0:
            return await self._error("invalid", "resume needs a job_id and a seq 'after' >= 0.")
        reply = await reply_for_job(job_id=job_id, conversation_id=self.followed.id)
        if reply is None:
            return await self._error("invalid", "No such reply in this conversation.")
        metrics.web().socket_resumes.inc()
        self._inbox_put("resume", reply, after)

    async def _on_cancel(self, frame: dict[str, Any]) -> None:
        job_id = _uuid_or_none(frame.get("job_id"))
        if job_id is None:
            return await self._error("invalid", "cancel needs a job_id.")
        try:
            reply = await reply_for_job(job_id=job_id, conversation_id=self.followed.id)
            if reply is None:
                return await self._error("invalid", "No such reply in this conversation.")
            if reply.status not in Message.ACTIVE_STATUSES:
                # Said, not ignored: the client learns why its cancel changed nothing.
                return await self._error(
                    "finished",
                    "The reply has already finished.",
                    job_id=str(job_id),
                    status=reply.status,
                )
            # reply_cancel's database call runs on the thread-sensitive thread (it shares the
            # caller's transaction when a view calls it), whose connection is checked and
            # tidied around it, as Django does around a request.
            await aclose_old_connections()
            try:
                await asyncio.wait_for(services.reply_cancel(reply=reply), REDIS_CALL_TIMEOUT)
            finally:
                await aclose_old_connections()
        except UNAVAILABLE_ERRORS:
            logger.exception("cancel of job %s failed", job_id, extra={"job_id": str(job_id)})
            await self._unavailable()

    frame_handlers = {
        "ping": _on_ping,
        "message": _on_message,
        "regenerate": _on_regenerate,
        "resume": _on_resume,
        "cancel": _on_cancel,
    }

    async def _error(self, code: str, message: str, **extra: Any) -> None:
        await self.send_json({"type": "error", "code": code, "message": message, **extra})

    async def _unavailable(self) -> None:
        await self._error("unavailable", "Server busy, please retry your request.")
