"""GET /api/replies/<job_id>/stream: a reply's frames as Server-Sent Events, as an HTTP-only
client sees them: over daphne with the real worker and the fake model, and in-process
(the ASGI application itself) where a test must see the process's ReplyHub or set the
frames itself with a ReplyPublisher."""

import time
import uuid
from typing import Any

import aiohttp
import pytest
from asgiref.sync import sync_to_async

from chat import stream
from chat.models import Conversation, Message
from chat.services import (
    SentMessage,
    conversation_create,
    message_send,
    reply_complete,
    reply_fail,
    reply_start,
)
from llmworker import redis as grizz_redis
from llmworker.redis import conversation_channel, redis_get
from llmworker.replies import ReplyPublisher, reply_hub_get
from tests.support.fake_openai import Behaviour
from tests.support.sockets import session_cookie, token_for
from tests.support.sse import Event, InProcessStream, events_over_http, stream_path, text_of
from tests.support.transcripts import answered

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

ANSWER = "Bears eat berries, roots, insects, fish and, now and then, honey."


def bearer(user) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_for(user)}"}


def frames_of(events: list[Event]) -> list[Event]:
    return [event for event in events if event.comment is None]


async def queued_reply(user) -> SentMessage:
    """A message of `user`'s and its queued reply, with no job: the test plays the worker."""
    conversation = await sync_to_async(conversation_create)(owner=user)
    return await sync_to_async(message_send)(conversation=conversation, content="Hi")


def publisher_of(sent: SentMessage) -> ReplyPublisher:
    return ReplyPublisher(
        job_id=str(sent.reply.job_id),
        conversation_id=str(sent.reply.conversation_id),
        client=redis_get(),
    )


async def done(publisher: ReplyPublisher, sent: SentMessage, content: str) -> int:
    return await publisher.done(
        reply_id=str(sent.reply.id), status="complete", content=content, usage=None
    )


async def opened(path: str, headers: dict[str, str]) -> InProcessStream:
    return await InProcessStream(path, headers).open()


# --- Over daphne, with the worker and the model ----------------------------------------


@pytest.fixture
def web(daphne) -> str:
    return f"http://127.0.0.1:{daphne.port}"


async def _post_message(http: aiohttp.ClientSession, conversation: Conversation) -> dict[str, Any]:
    async with http.post(
        f"/api/conversations/{conversation.id}/messages/", json={"content": "What do bears eat?"}
    ) as posted:
        assert posted.status == 202, await posted.text()
        turn: dict[str, Any] = await posted.json()
        return turn


async def test_it_streams_a_reply_sent_over_http_from_its_deltas_to_done(
    alice, fake_llm, worker, web
):
    fake_llm.default = Behaviour(reply=ANSWER, interval=0.02)
    conversation = await sync_to_async(conversation_create)(owner=alice)
    async with aiohttp.ClientSession(web, headers=bearer(alice)) as http:
        turn = await _post_message(http, conversation)
        async with http.get(stream_path(turn["job_id"])) as response:
            content_type = response.headers["Content-Type"]
            events = frames_of(await events_over_http(response))  # the server ends it

    assert content_type.startswith("text/event-stream")
    *deltas, last = events
    assert len(deltas) > 1 and {e.event for e in deltas} == {"delta"}
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert all(e.data["seq"] == e.id and e.data["type"] == e.event for e in events)
    assert all(e.data["job_id"] == turn["job_id"] for e in events)
    assert text_of(deltas) == ANSWER
    assert (last.event, last.data["status"], last.data["content"]) == ("done", "complete", ANSWER)
    reply = await Message.objects.aget(job_id=turn["job_id"])
    assert (reply.status, reply.content) == ("complete", ANSWER)


async def test_it_resumes_after_last_event_id_with_each_later_frame_once(
    alice, fake_llm, worker, web
):
    # Four tokens, then the model waits for the test: the client leaves mid-answer.
    fake_llm.default = Behaviour(reply=ANSWER, hold_after=4)
    first_words = "".join(Behaviour(reply=ANSWER).token_list()[:4])
    conversation = await sync_to_async(conversation_create)(owner=alice)
    async with aiohttp.ClientSession(web, headers=bearer(alice)) as http:
        turn = await _post_message(http, conversation)
        path = stream_path(turn["job_id"])
        async with http.get(path) as response:
            before = frames_of(
                await events_over_http(response, until=lambda got: text_of(got) == first_words)
            )
        fake_llm.release()
        last_seen = before[-1].id
        assert last_seen is not None
        # An EventSource reconnects to the URL it opened, with the header: the header wins.
        resumed_headers = {"Last-Event-ID": str(last_seen)}
        async with http.get(path + "?after=0", headers=resumed_headers) as response:
            after = frames_of(await events_over_http(response))
        async with http.get(path, headers={"Last-Event-ID": str(after[-1].id)}) as response:
            again_status = response.status

    ids = [e.id for e in before + after]
    assert ids == list(range(1, len(ids) + 1))  # every frame, each once, in order
    assert after[0].id == last_seen + 1
    assert text_of(before + after) == ANSWER
    assert (after[-1].event, after[-1].data["content"]) == ("done", ANSWER)
    assert again_status == 204  # the client has it all: an EventSource stops reconnecting


async def test_it_returns_404_for_another_users_reply_over_http(alice, bob, fake_llm, worker, web):
    fake_llm.default = Behaviour(reply=ANSWER)
    conversation = await sync_to_async(conversation_create)(owner=alice)
    async with aiohttp.ClientSession(web, headers=bearer(alice)) as http:
        turn = await _post_message(http, conversation)
    async with (
        aiohttp.ClientSession(web, headers=bearer(bob)) as http,
        http.get(stream_path(turn["job_id"])) as response,
    ):
        status, body = response.status, await response.json()

    assert status == 404
    assert body["error"]["code"] == "not_found"
    assert "bears" not in str(body)


# --- In-process: frames set by the test ------------------------------------------------


async def test_it_follows_live_frames_and_goes_on_after_llm_unavailable(alice):
    sent = await queued_reply(alice)
    events = await opened(stream_path(sent.reply.job_id), bearer(alice))
    publisher = publisher_of(sent)

    await publisher.delta("Bears ")
    await publisher.notice(code="llm_unavailable", message="The model is down.", retry_after=3)
    await publisher.delta("eat berries.")
    await done(publisher, sent, "Bears eat berries.")
    got = frames_of(await events.events_to_end())

    assert [(e.id, e.event) for e in got] == [
        (1, "delta"),
        (2, "error"),
        (3, "delta"),
        (4, "done"),
    ]
    assert got[1].data["code"] == "llm_unavailable"
    assert text_of(got) == "Bears eat berries."
    assert events.ended


async def test_it_resumes_after_the_after_parameter(alice):
    sent = await queued_reply(alice)
    publisher = publisher_of(sent)
    for word in ("Bears ", "eat ", "berries."):
        await publisher.delta(word)
    await done(publisher, sent, "Bears eat berries.")

    events = await opened(stream_path(sent.reply.job_id, "after=2"), bearer(alice))
    got = await events.events_to_end()

    assert [(e.id, e.event) for e in got] == [(3, "delta"), (4, "done")]
    assert got[0].data["content"] == "berries."


async def test_it_answers_204_to_a_client_that_has_the_final_frame(alice):
    sent = await queued_reply(alice)
    publisher = publisher_of(sent)
    await publisher.delta("Bears eat berries.")
    last = await done(publisher, sent, "Bears eat berries.")

    events = await opened(
        stream_path(sent.reply.job_id), {"Last-Event-ID": str(last)} | bearer(alice)
    )

    assert events.status == 204
    assert await events.body() == b""


async def test_it_sends_a_finished_reply_from_the_database_once_its_log_has_expired(alice):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    await sync_to_async(answered)(conversation, "What do bears eat?", "Mostly berries.")
    reply = await Message.objects.aget(role="assistant")

    events = await opened(stream_path(reply.job_id, "after=7"), bearer(alice))
    got = await events.events_to_end()

    assert len(got) == 1
    assert (got[0].id, got[0].event) == (None, "done")
    assert got[0].data == {
        "type": "done",
        "job_id": str(reply.job_id),
        "reply_id": str(reply.id),
        "status": "complete",
        "content": "Mostly berries.",
        "usage": None,
    }


async def test_it_waits_for_the_final_frame_of_a_reply_saved_before_that_frame_is_sent(
    alice, monkeypatch
):
    # A worker saves the answer, then sends its final frame. A client that resumes in
    # between gets that frame, with its id, not the database's copy without one.
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.1)
    sent = await queued_reply(alice)
    start = await sync_to_async(reply_start)(reply_id=sent.reply.id, default_model="m")
    assert start is not None
    publisher = publisher_of(sent)
    await publisher.attempt_begin(start.attempt)
    await publisher.delta("Bears eat berries.")
    await sync_to_async(reply_complete)(
        reply_id=sent.reply.id, attempt=start.attempt, content="Bears eat berries.", usage=None
    )

    events = await opened(stream_path(sent.reply.job_id, "after=1"), bearer(alice))
    waiting = await events.events(1)
    last = await done(publisher, sent, "Bears eat berries.")
    got = frames_of(await events.events_to_end())

    assert [e.comment for e in waiting] == ["keep-alive"]  # following the reply live
    assert [(e.id, e.event, e.data["content"]) for e in got] == [
        (last, "done", "Bears eat berries.")
    ]


async def test_it_sends_a_failed_reply_as_its_error_from_the_database(alice):
    sent = await queued_reply(alice)
    start = await sync_to_async(reply_start)(reply_id=sent.reply.id, default_model="m")
    assert start is not None
    await sync_to_async(reply_fail)(
        reply_id=sent.reply.id, attempt=start.attempt, error="The provider refused."
    )

    got = await (await opened(stream_path(sent.reply.job_id), bearer(alice))).events_to_end()

    assert [(e.event, e.data["code"], e.data["message"]) for e in got] == [
        ("error", "llm_error", "The provider refused.")
    ]


async def test_it_sends_keep_alive_comments_while_nothing_comes(alice, monkeypatch):
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.1)
    sent = await queued_reply(alice)
    events = await opened(stream_path(sent.reply.job_id), bearer(alice))

    got = await events.events(2)
    await events.disconnect()

    assert [e.comment for e in got] == ["keep-alive", "keep-alive"]


async def test_it_leaves_the_hub_when_the_client_disconnects(alice):
    sent = await queued_reply(alice)
    channel = conversation_channel(str(sent.reply.conversation_id))
    hub = reply_hub_get()
    events = await opened(stream_path(sent.reply.job_id), bearer(alice))
    deadline = time.monotonic() + 10
    while not hub.listeners.get(channel):  # the stream joins once its body is under way
        assert time.monotonic() < deadline, "the stream never joined the hub"
        await events.communicator.receive_nothing(0.02)
    joined = len(hub.listeners[channel])

    await events.disconnect()

    assert joined == 1
    assert channel not in hub.listeners


# --- In-process: who may stream ---------------------------------------------------------


async def test_it_streams_with_the_session(alice):
    sent = await queued_reply(alice)
    publisher = publisher_of(sent)
    await done(publisher, sent, "Over the session.")

    cookie = await sync_to_async(session_cookie)(alice)
    got = await (await opened(stream_path(sent.reply.job_id), {"Cookie": cookie})).events_to_end()

    assert [(e.event, e.data["content"]) for e in got] == [("done", "Over the session.")]


async def test_it_returns_404_for_another_users_reply(alice, bob):
    sent = await queued_reply(alice)

    events = await opened(stream_path(sent.reply.job_id), bearer(bob))

    assert events.status == 404
    assert (await events.body()).startswith(b'{"error": {"code": "not_found"')


async def test_it_returns_404_for_an_unknown_job(alice):
    events = await opened(stream_path(uuid.uuid4()), bearer(alice))
    assert events.status == 404


async def test_it_returns_401_without_credentials(alice):
    sent = await queued_reply(alice)

    events = await opened(stream_path(sent.reply.job_id), {})

    assert events.status == 401
    assert events.headers["www-authenticate"].startswith("Bearer")
    assert b'"not_authenticated"' in await events.body()


async def test_it_returns_401_for_an_invalid_token(alice):
    sent = await queued_reply(alice)

    events = await opened(stream_path(sent.reply.job_id), {"Authorization": "Bearer not-a-jwt"})

    assert events.status == 401
    assert b'"token_not_valid"' in await events.body()


@pytest.mark.parametrize("header", ["-1", "seven"])
async def test_it_returns_400_for_a_last_event_id_that_is_not_a_seq(alice, header):
    sent = await queued_reply(alice)

    events = await opened(stream_path(sent.reply.job_id), {"Last-Event-ID": header} | bearer(alice))

    assert events.status == 400
    assert b'"invalid"' in await events.body()


async def test_it_returns_503_with_retry_after_when_redis_is_down(alice, settings):
    sent = await queued_reply(alice)
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    grizz_redis._clients.clear()

    events = await opened(stream_path(sent.reply.job_id), bearer(alice))

    assert events.status == 503
    assert events.headers["retry-after"] == "5"
    assert b'"unavailable"' in await events.body()
    grizz_redis._clients.clear()
