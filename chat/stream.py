"""`GET /api/replies/<job_id>/stream`: one reply's frames as Server-Sent Events, for clients
without a WebSocket. Each event is a frame exactly as the socket gets it: `id:` its seq,
`event:` its type, `data:` its JSON. `Last-Event-ID` (or `?after=N`) resumes after a seq.
The stream ends after the reply's final frame (`done`, or an `error` other than
`llm_unavailable`).

An async view over an async iterator: a client waiting for tokens holds a listener of the
process's ReplyHub and no thread. A client that disconnects cancels the iterator, which
leaves the hub.
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import orjson
from django.contrib.auth.models import User
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import AuthenticationFailed

from chat import services
from chat.api_errors import UNAVAILABLE_MESSAGE, UNAVAILABLE_RETRY_AFTER_SECONDS, api_error_body
from chat.models import Message
from chat.relay import UNAVAILABLE_ERRORS
from chat.turns import REDIS_CALL_TIMEOUT
from grizz.database import database_call
from llmworker.replies import (
    frame_ends_reply,
    reply_final_frame_from_database,
    reply_hub_get,
    reply_replay,
)

logger = logging.getLogger(__name__)

# A comment this often while no frame comes: proxies and load balancers close connections
# that carry nothing for long (often 30-60 s), and the client learns the server is there.
KEEPALIVE_SECONDS = 15.0
KEEPALIVE = b": keep-alive\n\n"

reply_for_user = database_call(services.reply_for_user)
reply_for_job = database_call(services.reply_for_job)

Frame = tuple[dict[str, Any], str]  # a frame and its JSON text, as the socket gets it


@database_call
def _user_of_token(request: HttpRequest) -> User | None:
    # JWTAuthentication reads only the request's headers: a Django request does.
    found = JWTAuthentication().authenticate(cast(Any, request))
    return cast(User, found[0]) if found else None


async def _user_of(request: HttpRequest) -> User | None:
    """The token's user (`Authorization: Bearer`), else the session's; None: neither. A
    token that is invalid or expired raises AuthenticationFailed."""
    if "Authorization" in request.headers:
        user = await _user_of_token(request)
        if user is not None:
            return user
    session_user = await request.auser()
    return session_user if session_user.is_authenticated else None


def _error(status: int, code: str, message: str, **headers: str) -> JsonResponse:
    return JsonResponse(api_error_body(code, message), status=status, headers=headers)


def _after(request: HttpRequest) -> int:
    """The seq the client has: Last-Event-ID (an EventSource that reconnects sends it, with
    the URL it first opened), else ?after=; ValueError when it is not a seq."""
    raw = request.headers.get("Last-Event-ID") or request.GET.get("after") or "0"
    after = int(raw)
    if after < 0:
        raise ValueError(raw)
    return after


async def reply_stream(request: HttpRequest, job_id: uuid.UUID) -> HttpResponseBase:
    try:
        user = await _user_of(request)
        if user is None:
            return _error(
                401,
                "not_authenticated",
                "Authentication credentials were not provided.",
                **{"WWW-Authenticate": 'Bearer realm="api"'},
            )
        reply = await reply_for_user(job_id=job_id, user=user)
        if reply is None:
            return _error(404, "not_found", "No Message matches the given query.")
        after = _after(request)
        logged = await _logged_frames(reply, after)
        if logged is None:
            # Nothing more will come: 204 tells an EventSource to stop reconnecting.
            return HttpResponse(status=204)
    except AuthenticationFailed as refused:
        return _error(401, "token_not_valid", str(refused.detail), **{"WWW-Authenticate": "Bearer"})
    except ValueError:
        return _error(400, "invalid", "Last-Event-ID and after must be a seq, 0 or more.")
    except UNAVAILABLE_ERRORS:
        logger.exception("reply stream refused: a dependency is down")
        retry = str(UNAVAILABLE_RETRY_AFTER_SECONDS)
        return _error(503, "unavailable", UNAVAILABLE_MESSAGE, **{"Retry-After": retry})
    events = _events(reply, after=after, logged=logged)
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on as it comes
    return response


async def _logged_frames(reply: Message, after: int) -> list[Frame] | None:
    """The reply's frames after `after` in its replay log; None when the frame at `after`
    is the reply's last: the client has it all. (Once the log has expired this cannot be
    told, and a client that resumes gets the final frame from PostgreSQL again.)"""
    frames = [
        (orjson.loads(raw), raw)
        for _, raw in await reply_replay(job_id=str(reply.job_id), after=max(after - 1, 0))
    ]
    if after and frames and frames[0][0]["seq"] == after:
        if frame_ends_reply(frames[0][0]):
            return None
        frames = frames[1:]
    return frames


def _event(frame: dict[str, Any], raw: str) -> bytes:
    seq = frame.get("seq")  # none on a final frame read from PostgreSQL
    head = "" if seq is None else f"id: {seq}\n"
    return f"{head}event: {frame['type']}\ndata: {raw}\n\n".encode()


async def _events(reply: Message, *, after: int, logged: list[Frame]) -> AsyncIterator[bytes]:
    follower = ReplyFollower(job_id=str(reply.job_id), seen=after)
    for frame in logged:
        yield _event(*follower.sent(frame))
        if frame_ends_reply(frame[0]):
            return  # a finished reply: the stream never needs the hub
    conversation_id = str(reply.conversation_id)
    try:
        # Joined before the log is read again: a frame sent in between comes both ways,
        # and the follower sends it once.
        await asyncio.wait_for(
            reply_hub_get().join(conversation_id=conversation_id, listener=follower),
            REDIS_CALL_TIMEOUT,
        )
        async for live in follower.frames(reply):
            yield KEEPALIVE if live is None else _event(*live)
    except UNAVAILABLE_ERRORS:
        # The client resumes with Last-Event-ID, which an EventSource does by itself.
        logger.warning("reply stream of job %s ended: a dependency is down", reply.job_id)
        unavailable = {"type": "error", "code": "unavailable", "message": UNAVAILABLE_MESSAGE}
        yield _event(unavailable, orjson.dumps(unavailable).decode())
    finally:
        await _leave(conversation_id, follower)


async def _leave(conversation_id: str, follower: "ReplyFollower") -> None:
    # The hub forgets the listener before its first await: even a leave cancelled (the
    # client went away twice over) takes it off. A failed unsubscribe is mended by the hub.
    with contextlib.suppress(*UNAVAILABLE_ERRORS):
        await reply_hub_get().leave(conversation_id=conversation_id, listener=follower)


class ReplyFollower:
    """One reply's frames for one client, in seq order and each once, live from the
    ReplyHub with gaps filled from the replay log: the socket's relay (chat/relay.py) does
    the same for every reply of its conversation."""

    def __init__(self, *, job_id: str, seen: int) -> None:
        self.job_id = job_id
        self.seen = seen  # the last seq sent
        self.inbox: list[Frame | None] = []  # None: frames may have been missed
        self.arrived = asyncio.Event()

    # The ReplyHub's listener: called by its reader, for every frame of the conversation.

    def reply_frame_received(self, frame: dict[str, Any], raw: str) -> None:
        # Of this reply, and with a seq: not the announcement of its user message.
        if frame.get("job_id") == self.job_id and "seq" in frame:
            self.inbox.append((frame, raw))
            self.arrived.set()

    def reply_frames_maybe_missed(self) -> None:
        self.inbox.append(None)
        self.arrived.set()

    def sent(self, frame: Frame) -> Frame:
        self.seen = frame[0]["seq"]
        return frame

    async def frames(self, reply: Message) -> AsyncIterator[Frame | None]:
        """Every frame after `seen` to the final one: the log's, then the live ones; None
        after each KEEPALIVE_SECONDS without any."""
        for frame in await self._replay():
            yield frame
            if frame_ends_reply(frame[0]):
                return
        saved = await reply_for_job(job_id=self.job_id, conversation_id=reply.conversation_id)
        final = None if saved is None else await reply_final_frame_from_database(saved)
        if final is not None:
            yield final, orjson.dumps(final).decode()
            return
        while True:
            due = await self._due()
            if not due:
                yield None
            for frame in due:
                yield frame
                if frame_ends_reply(frame[0]):
                    return

    async def _due(self) -> list[Frame]:
        """The frames to send next, in order, once some have come (empty after a quiet
        KEEPALIVE_SECONDS)."""
        try:
            async with asyncio.timeout(KEEPALIVE_SECONDS):
                await self.arrived.wait()
        except TimeoutError:
            return []
        self.arrived.clear()
        items, self.inbox = self.inbox, []
        due: list[Frame] = []
        for item in items:
            if item is None or item[0]["seq"] > self.seen + 1:
                # Frames this client never got (pub/sub dropped some): the log has them.
                due += await self._replay()
            if item is not None and item[0]["seq"] > self.seen:
                due.append(self.sent(item))
        return due

    async def _replay(self) -> list[Frame]:
        frames = await reply_replay(job_id=self.job_id, after=self.seen)
        if frames:
            self.seen = frames[-1][0]
        return [(orjson.loads(raw), raw) for _, raw in frames]


def stream_schema_add(
    result: dict[str, Any], generator: object, request: object, public: bool
) -> dict[str, Any]:
    """drf-spectacular's postprocessing hook: the stream's operation in the schema."""
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ApiError"}}}
    result["paths"]["/api/replies/{job_id}/stream"] = {
        "get": STREAM_OPERATION
        | {
            "responses": {
                "200": {
                    "description": STREAM_EVENTS,
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                "204": {"description": "The seq resumed after is the reply's final frame."},
                "400": {"description": "`after` or Last-Event-ID is not a seq.", "content": error},
                "401": {"description": "No credentials, or an invalid token.", "content": error},
                "404": {"description": "No such reply, or another user's.", "content": error},
                "503": {"description": "Redis or PostgreSQL down.", "content": error},
            }
        }
    }
    return result


STREAM_EVENTS = (
    "Server-Sent Events, one per frame of the reply as the chat socket gets it "
    "(docs/websocket.md): `id:` its seq, `event:` its type (`delta`, `restart`, `done`, "
    "`error`), `data:` its JSON. Ends after `done` or an `error` other than `llm_unavailable`;"
    " a comment (`: keep-alive`) every 15 s while nothing comes. A reply whose replay log "
    "has expired ends with its `done` or `error` from the database, "
    "without an id. Redis failing mid-stream: an `error` event with code `unavailable`, "
    "then the end: resume with Last-Event-ID."
)
STREAM_OPERATION: dict[str, Any] = {
    "operationId": "replies_stream",
    "summary": "Follow one reply's frames (Server-Sent Events)",
    "tags": ["replies"],
    "security": [{"jwtAuth": []}, {"cookieAuth": []}],
    "parameters": [
        {
            "name": "job_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "format": "uuid"},
        },
        {
            "name": "after",
            "in": "query",
            "required": False,
            "description": "Resume after this seq (0: from the first frame).",
            "schema": {"type": "integer", "minimum": 0},
        },
        {
            "name": "Last-Event-ID",
            "in": "header",
            "required": False,
            "description": "As `after`, and taken over it: what an EventSource sends to resume.",
            "schema": {"type": "integer", "minimum": 0},
        },
    ],
}
