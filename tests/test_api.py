"""The REST API as a client sees it: JWT and session auth, conversations, transcripts."""

import asyncio
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.middleware.csrf import get_token
from django.test import Client, RequestFactory
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import AccessToken

from chat.models import Conversation, Message
from chat.services import (
    conversation_create,
    message_send,
    reply_complete,
    reply_fail,
    reply_start,
)
from tests.support.fake_openai import Behaviour
from tests.support.sockets import answer_of, chat_opened, message_queued
from tests.support.transcripts import answered

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_URL = "/api/auth/token/"
REFRESH_URL = "/api/auth/token/refresh/"
CONVERSATIONS_URL = "/api/conversations/"


def messages_url(conversation_id: object) -> str:
    return f"/api/conversations/{conversation_id}/messages/"


def cancel_url(conversation_id: object, job_id: object) -> str:
    return f"/api/conversations/{conversation_id}/replies/{job_id}/cancel/"


def bearer(access: str) -> dict[str, Any]:
    return {"HTTP_AUTHORIZATION": f"Bearer {access}"}


def token_pair(username: str, password: str) -> dict[str, str]:
    response = APIClient().post(TOKEN_URL, {"username": username, "password": password})
    assert response.status_code == 200, response.content
    pair: dict[str, str] = response.json()
    return pair


def session_client_with_csrf(user) -> tuple[Client, str]:
    """A browser-like client signed in with the session, and the CSRF token its page has."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    request = RequestFactory().get("/")
    token = get_token(request)
    client.cookies[settings.CSRF_COOKIE_NAME] = request.META["CSRF_COOKIE"]
    return client, token


def client_as(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {AccessToken.for_user(user)}")
    return client


# --- Tokens -----------------------------------------------------------------------------


def test_it_issues_an_access_and_a_refresh_token(alice):
    response = APIClient().post(
        TOKEN_URL, {"username": "alice", "password": "alice-password-1"}, format="json"
    )
    assert response.status_code == 200
    assert set(response.json()) == {"access", "refresh"}


def test_it_refuses_a_token_for_a_wrong_password(alice):
    response = APIClient().post(
        TOKEN_URL, {"username": "alice", "password": "bob-password-1"}, format="json"
    )
    assert response.status_code == 401
    assert "access" not in response.json()


def test_it_refuses_a_token_for_an_unknown_user(alice):
    response = APIClient().post(
        TOKEN_URL, {"username": "mallory", "password": "alice-password-1"}, format="json"
    )
    assert response.status_code == 401


def test_it_refreshes_an_access_token(alice):
    refresh = token_pair("alice", "alice-password-1")["refresh"]
    response = APIClient().post(REFRESH_URL, {"refresh": refresh}, format="json")
    assert response.status_code == 200
    assert set(response.json()) == {"access"}
    listed = APIClient().get(CONVERSATIONS_URL, **bearer(response.json()["access"]))
    assert listed.status_code == 200


def test_it_refuses_to_refresh_with_an_access_token(alice):
    access = token_pair("alice", "alice-password-1")["access"]
    response = APIClient().post(REFRESH_URL, {"refresh": access}, format="json")
    assert response.status_code == 401


def test_it_refuses_to_refresh_with_a_malformed_token():
    response = APIClient().post(REFRESH_URL, {"refresh": "not-a-jwt"}, format="json")
    assert response.status_code == 401


# --- Authentication ---------------------------------------------------------------------


def test_it_authenticates_with_a_bearer_access_token(alice):
    conversation = conversation_create(owner=alice, title="Token chat")
    access = token_pair("alice", "alice-password-1")["access"]
    response = APIClient().get(CONVERSATIONS_URL, **bearer(access))
    assert response.status_code == 200
    assert [c["id"] for c in response.json()] == [str(conversation.id)]


def test_it_authenticates_with_the_session(alice):
    conversation = conversation_create(owner=alice, title="Session chat")
    client = Client()
    client.force_login(alice)
    response = client.get(CONVERSATIONS_URL)
    assert response.status_code == 200
    assert [c["id"] for c in response.json()] == [str(conversation.id)]


def test_it_returns_401_with_a_bearer_challenge_without_credentials():
    response = APIClient().get(CONVERSATIONS_URL)
    # JWTAuthentication comes first, so DRF answers 401 with its challenge, not 403.
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_it_returns_401_for_a_malformed_access_token():
    response = APIClient().get(CONVERSATIONS_URL, **bearer("not-a-jwt"))
    assert response.status_code == 401


def test_it_returns_401_for_an_expired_access_token(alice):
    token = AccessToken.for_user(alice)
    token.set_exp(lifetime=-timedelta(seconds=1))
    response = APIClient().get(CONVERSATIONS_URL, **bearer(str(token)))
    assert response.status_code == 401


def test_it_returns_401_for_a_refresh_token_used_as_access_token(alice):
    refresh = token_pair("alice", "alice-password-1")["refresh"]
    response = APIClient().get(CONVERSATIONS_URL, **bearer(refresh))
    assert response.status_code == 401


def test_it_refuses_a_post_without_credentials():
    response = APIClient().post(CONVERSATIONS_URL, {"title": "Anonymous"}, format="json")
    assert response.status_code == 401
    assert not Conversation.objects.exists()


# --- CSRF -------------------------------------------------------------------------------


def test_it_refuses_a_session_post_without_the_csrf_token(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    response = client.post(CONVERSATIONS_URL, {"title": "Forged"}, content_type="application/json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert not Conversation.objects.exists()


def test_it_accepts_a_session_post_with_the_csrf_token(alice):
    client, token = session_client_with_csrf(alice)
    response = client.post(
        CONVERSATIONS_URL,
        {"title": "Genuine"},
        content_type="application/json",
        HTTP_X_CSRFTOKEN=token,
    )
    assert response.status_code == 201
    assert Conversation.objects.get().title == "Genuine"


def test_it_accepts_a_token_post_without_a_csrf_token(alice):
    client = Client(enforce_csrf_checks=True)
    response = client.post(
        CONVERSATIONS_URL,
        {"title": "Token post"},
        content_type="application/json",
        **bearer(str(AccessToken.for_user(alice))),
    )
    assert response.status_code == 201


# --- Conversations ----------------------------------------------------------------------


def test_it_lists_only_the_callers_conversations(alice, bob):
    mine = conversation_create(owner=alice, title="Alice's")
    conversation_create(owner=bob, title="Bob's")
    response = client_as(alice).get(CONVERSATIONS_URL)
    assert response.status_code == 200
    assert [(c["id"], c["title"]) for c in response.json()] == [(str(mine.id), "Alice's")]


def test_it_lists_no_conversation_for_a_new_user(alice, bob):
    conversation_create(owner=bob, title="Bob's")
    response = client_as(alice).get(CONVERSATIONS_URL)
    assert response.status_code == 200
    assert response.json() == []


def test_it_lists_conversations_newest_first(alice):
    now = timezone.now()
    ages = {"oldest": 3, "middle": 2, "newest": 1}
    for title, hours in ages.items():
        conversation = conversation_create(owner=alice, title=title)
        then = now - timedelta(hours=hours)
        Conversation.objects.filter(id=conversation.id).update(created_at=then, updated_at=then)
    response = client_as(alice).get(CONVERSATIONS_URL)
    assert [c["title"] for c in response.json()] == ["newest", "middle", "oldest"]


def test_it_creates_a_conversation(alice):
    response = client_as(alice).post(
        CONVERSATIONS_URL,
        {"title": "Bears", "system_prompt": "You are a bear.", "model": "gpt-4o-mini"},
        format="json",
    )
    assert response.status_code == 201
    body = response.json()
    conversation = Conversation.objects.get(id=uuid.UUID(body["id"]))
    assert conversation.owner == alice
    assert body["title"] == "Bears"
    assert body["system_prompt"] == "You are a bear."
    assert body["model"] == "gpt-4o-mini"
    assert set(body) == {"id", "title", "model", "system_prompt", "created_at", "updated_at"}


def test_it_creates_a_conversation_from_an_empty_body(alice):
    response = client_as(alice).post(CONVERSATIONS_URL)
    assert response.status_code == 201
    body = response.json()
    assert (body["title"], body["system_prompt"], body["model"]) == ("", "", "")
    assert Conversation.objects.get(id=body["id"]).owner == alice


def test_it_creates_a_conversation_from_an_empty_json_object(alice):
    response = client_as(alice).post(CONVERSATIONS_URL, {}, format="json")
    assert response.status_code == 201
    assert Conversation.objects.filter(id=response.json()["id"], owner=alice).exists()


def test_it_shows_the_new_conversation_in_the_list(alice):
    client = client_as(alice)
    created = client.post(CONVERSATIONS_URL, {"title": "Fresh"}, format="json").json()
    assert [c["id"] for c in client.get(CONVERSATIONS_URL).json()] == [created["id"]]


def test_it_accepts_a_title_of_200_characters(alice):
    response = client_as(alice).post(CONVERSATIONS_URL, {"title": "t" * 200}, format="json")
    assert response.status_code == 201
    assert response.json()["title"] == "t" * 200


def test_it_rejects_a_title_over_200_characters(alice):
    response = client_as(alice).post(CONVERSATIONS_URL, {"title": "t" * 201}, format="json")
    assert response.status_code == 400
    assert "title" in response.json()
    assert not Conversation.objects.exists()


def test_it_accepts_a_system_prompt_up_to_the_message_limit(alice):
    prompt = "p" * settings.CHAT_MAX_MESSAGE_CHARS
    response = client_as(alice).post(CONVERSATIONS_URL, {"system_prompt": prompt}, format="json")
    assert response.status_code == 201
    assert Conversation.objects.get(id=response.json()["id"]).system_prompt == prompt


def test_it_rejects_a_system_prompt_over_the_message_limit(alice):
    prompt = "p" * (settings.CHAT_MAX_MESSAGE_CHARS + 1)
    response = client_as(alice).post(CONVERSATIONS_URL, {"system_prompt": prompt}, format="json")
    assert response.status_code == 400
    assert "system_prompt" in response.json()
    assert not Conversation.objects.exists()


def test_it_ignores_a_client_supplied_id_and_owner(alice, bob):
    chosen = uuid.uuid4()
    response = client_as(alice).post(
        CONVERSATIONS_URL, {"id": str(chosen), "owner": bob.id, "title": "Mine"}, format="json"
    )
    assert response.status_code == 201
    assert response.json()["id"] != str(chosen)
    assert Conversation.objects.get(id=response.json()["id"]).owner == alice


# --- One conversation: read, rename, delete -------------------------------------------


def conversation_url(conversation_id: object) -> str:
    return f"/api/conversations/{conversation_id}/"


def test_it_shows_one_of_the_callers_conversations(alice):
    conversation = conversation_create(owner=alice, title="Bears", system_prompt="Be brief.")
    response = client_as(alice).get(conversation_url(conversation.id))
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["title"], body["system_prompt"]) == (
        str(conversation.id),
        "Bears",
        "Be brief.",
    )


def test_it_renames_a_conversation_without_moving_it_in_the_list(alice):
    renamed = conversation_create(owner=alice, title="Old name")
    conversation_create(owner=alice, title="Newer")
    before = Conversation.objects.get(id=renamed.id).updated_at

    response = client_as(alice).patch(
        conversation_url(renamed.id), {"title": "  New name  "}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["title"] == "New name"
    assert Conversation.objects.get(id=renamed.id).title == "New name"
    assert Conversation.objects.get(id=renamed.id).updated_at == before
    listed = client_as(alice).get(CONVERSATIONS_URL).json()
    assert [c["title"] for c in listed] == ["Newer", "New name"]


def test_it_changes_the_system_prompt_and_model_of_a_conversation(alice):
    conversation = conversation_create(owner=alice)
    response = client_as(alice).patch(
        conversation_url(conversation.id),
        {"system_prompt": "You are a bear.", "model": "gpt-4o-mini"},
        format="json",
    )
    assert response.status_code == 200
    conversation.refresh_from_db()
    assert (conversation.system_prompt, conversation.model) == ("You are a bear.", "gpt-4o-mini")


def test_it_refuses_a_new_title_over_200_characters(alice):
    conversation = conversation_create(owner=alice, title="Kept")
    response = client_as(alice).patch(
        conversation_url(conversation.id), {"title": "t" * 201}, format="json"
    )
    assert response.status_code == 400
    assert "title" in response.json()
    assert Conversation.objects.get(id=conversation.id).title == "Kept"


def test_it_ignores_a_new_id_or_owner_in_an_update(alice, bob):
    conversation = conversation_create(owner=alice, title="Mine")
    response = client_as(alice).patch(
        conversation_url(conversation.id),
        {"id": str(uuid.uuid4()), "owner": bob.id, "title": "Still mine"},
        format="json",
    )
    assert response.status_code == 200
    assert Conversation.objects.get(id=conversation.id).owner == alice


@pytest.mark.parametrize("method", ["get", "patch", "put", "delete"])
def test_it_returns_404_for_another_users_conversation(alice, bob, method):
    conversation = conversation_create(owner=alice, title="Alice's diary")
    answered(conversation, "dear diary", "noted")
    response = getattr(client_as(bob), method)(
        conversation_url(conversation.id), {"title": "Bob was here"}, format="json"
    )
    assert response.status_code == 404
    assert b"diary" not in response.content
    assert Conversation.objects.get(id=conversation.id).title == "Alice's diary"
    assert Message.objects.filter(conversation=conversation).count() == 2


def test_it_returns_404_for_an_unknown_conversation(alice):
    assert client_as(alice).get(conversation_url(uuid.uuid4())).status_code == 404


@pytest.mark.parametrize("method", ["get", "patch", "delete"])
def test_it_returns_401_for_a_conversation_without_credentials(alice, method):
    conversation = conversation_create(owner=alice, title="Private")
    response = getattr(APIClient(), method)(conversation_url(conversation.id))
    assert response.status_code == 401
    assert Conversation.objects.filter(id=conversation.id, title="Private").exists()


def test_it_refuses_a_session_rename_without_the_csrf_token(alice):
    conversation = conversation_create(owner=alice, title="Kept")
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    response = client.patch(
        conversation_url(conversation.id), {"title": "Forged"}, content_type="application/json"
    )
    assert response.status_code == 403
    assert Conversation.objects.get(id=conversation.id).title == "Kept"


def test_it_renames_and_deletes_with_the_session_and_its_csrf_token(alice):
    conversation = conversation_create(owner=alice, title="Old")
    client, token = session_client_with_csrf(alice)

    renamed = client.patch(
        conversation_url(conversation.id),
        {"title": "New"},
        content_type="application/json",
        HTTP_X_CSRFTOKEN=token,
    )
    deleted = client.delete(conversation_url(conversation.id), HTTP_X_CSRFTOKEN=token)

    assert renamed.status_code == 200
    assert renamed.json()["title"] == "New"
    assert deleted.status_code == 204
    assert not Conversation.objects.exists()


def test_it_deletes_a_conversation_and_its_messages(alice):
    conversation = conversation_create(owner=alice, title="Gone")
    kept = conversation_create(owner=alice, title="Kept")
    answered(conversation, "Question", "Answer")
    answered(kept, "Other question", "Other answer")

    response = client_as(alice).delete(conversation_url(conversation.id))

    assert response.status_code == 204
    assert client_as(alice).get(conversation_url(conversation.id)).status_code == 404
    assert [c["title"] for c in client_as(alice).get(CONVERSATIONS_URL).json()] == ["Kept"]
    assert not Message.objects.filter(conversation_id=conversation.id).exists()
    assert Message.objects.filter(conversation=kept).count() == 2


async def test_it_cancels_the_reply_in_flight_of_a_deleted_conversation(
    alice, fake_llm, start_worker
):
    socket = await chat_opened(alice)
    queued = await message_queued(socket, "Tell me a long story")

    response = await sync_to_async(client_as(alice).delete)(
        conversation_url(socket.conversation_id)
    )
    done = await socket.receive()
    late = await asyncio.to_thread(start_worker, "late")
    await asyncio.to_thread(late.wait_for_line, f"job {queued['job_id']}: acknowledged", 60)

    assert response.status_code == 204
    assert (done["type"], done["job_id"], done["status"]) == ("done", queued["job_id"], "cancelled")
    assert fake_llm.requests == []
    assert not await Conversation.objects.filter(id=str(socket.conversation_id)).aexists()
    await socket.close()


# --- Messages ---------------------------------------------------------------------------


def test_it_lists_the_messages_in_position_order(alice):
    conversation = conversation_create(owner=alice, title="Transcript")
    answered(conversation, "What do bears eat?", "Mostly berries.")
    answered(conversation, "And in winter?", "Nothing, they sleep.")
    pending = message_send(conversation=conversation, content="Do they dream?")
    response = client_as(alice).get(messages_url(conversation.id))
    assert response.status_code == 200
    assert [(m["role"], m["content"], m["status"]) for m in response.json()] == [
        ("user", "What do bears eat?", "complete"),
        ("assistant", "Mostly berries.", "complete"),
        ("user", "And in winter?", "complete"),
        ("assistant", "Nothing, they sleep.", "complete"),
        ("user", "Do they dream?", "complete"),
        ("assistant", "", "queued"),
    ]
    assert response.json()[-1]["job_id"] == str(pending.reply.job_id)


def test_it_shows_the_fields_of_each_message(alice):
    conversation = conversation_create(owner=alice, title="Fields")
    sent = message_send(conversation=conversation, content="Hello")
    start = reply_start(reply_id=sent.reply.id, default_model="test-model")
    assert start is not None
    reply_complete(
        reply_id=sent.reply.id,
        attempt=start.attempt,
        content="Hi!",
        usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    )
    question, answer = client_as(alice).get(messages_url(conversation.id)).json()
    fields = {"id", "role", "content", "status", "job_id", "created_at", "error", "usage"}
    assert set(question) == fields
    assert set(answer) == fields
    assert question["id"] == str(sent.message.id)
    assert question["job_id"] is None
    assert question["usage"] is None
    assert question["error"] == ""
    assert answer["id"] == str(sent.reply.id)
    assert answer["job_id"] == str(sent.reply.job_id)
    assert answer["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert answer["error"] == ""
    assert answer["created_at"]


def test_it_shows_a_failed_reply_with_its_error(alice):
    conversation = conversation_create(owner=alice, title="Failing")
    sent = message_send(conversation=conversation, content="Hello")
    start = reply_start(reply_id=sent.reply.id, default_model="test-model")
    assert start is not None
    reply_fail(reply_id=sent.reply.id, attempt=start.attempt, error="provider refused")
    answer = client_as(alice).get(messages_url(conversation.id)).json()[1]
    assert (answer["status"], answer["error"], answer["usage"]) == (
        "failed",
        "provider refused",
        None,
    )


def test_it_lists_no_messages_of_a_new_conversation(alice):
    conversation = conversation_create(owner=alice)
    response = client_as(alice).get(messages_url(conversation.id))
    assert response.status_code == 200
    assert response.json() == []


def test_it_returns_404_for_the_messages_of_another_users_conversation(alice, bob):
    conversation = conversation_create(owner=bob, title="Bob's secret")
    message_send(conversation=conversation, content="bob's secret question")
    response = client_as(alice).get(messages_url(conversation.id))
    assert response.status_code == 404
    assert b"secret" not in response.content


def test_it_returns_404_for_the_messages_of_an_unknown_conversation(alice):
    response = client_as(alice).get(messages_url(uuid.uuid4()))
    assert response.status_code == 404


def test_it_returns_401_for_messages_without_credentials(alice):
    conversation = conversation_create(owner=alice)
    response = APIClient().get(messages_url(conversation.id))
    assert response.status_code == 401


def test_it_lists_messages_with_the_session(alice):
    conversation = conversation_create(owner=alice)
    message_send(conversation=conversation, content="Over the session")
    client = Client()
    client.force_login(alice)
    response = client.get(messages_url(conversation.id))
    assert response.status_code == 200
    assert [m["content"] for m in response.json()] == ["Over the session", ""]


def test_it_does_not_create_messages_through_the_list(alice):
    conversation = conversation_create(owner=alice)
    response = client_as(alice).post(
        messages_url(conversation.id), {"content": "sneaky"}, format="json"
    )
    assert response.status_code == 405
    assert not Message.objects.exists()


# --- Cancelling a reply -----------------------------------------------------------------


async def test_it_cancels_a_queued_reply_before_any_provider_call(alice, fake_llm, start_worker):
    socket = await chat_opened(alice)
    queued = await message_queued(socket, "Tell me a long story")

    response = await sync_to_async(client_as(alice).post)(
        cancel_url(socket.conversation_id, queued["job_id"])
    )
    done = await socket.receive()
    late = await asyncio.to_thread(start_worker, "late")
    await asyncio.to_thread(
        late.wait_for_line,
        f"job {queued['job_id']}: acknowledged \\(reply already finished\\)",
        60,
    )

    assert response.status_code == 202
    assert response.json() == {"job_id": queued["job_id"], "status": "cancelled"}
    assert (done["type"], done["job_id"], done["status"], done["content"]) == (
        "done",
        queued["job_id"],
        "cancelled",
        "",
    )
    reply = await Message.objects.aget(job_id=queued["job_id"])
    assert (reply.status, reply.content) == ("cancelled", "")
    assert reply.finished_at is not None
    assert fake_llm.requests == []
    await socket.close()


async def test_it_cancels_a_streaming_reply_through_its_worker(alice, fake_llm, worker):
    # Five tokens, then the provider stalls with the stream open: only the cancel can end
    # it (well before the worker's request timeout, 60 s).
    fake_llm.default = Behaviour(tokens=[" x"] * 200, hang_after=5)
    socket = await chat_opened(alice)
    queued = await message_queued(socket, "Tell me a long story")
    while answer_of(socket.frames, queued["job_id"]) != " x" * 5:
        await socket.receive(timeout=60)

    cancelled_at = time.monotonic()
    response = await sync_to_async(client_as(alice).post)(
        cancel_url(socket.conversation_id, queued["job_id"])
    )
    provider_gone_at = await asyncio.to_thread(fake_llm.wait_for_disconnect, 30)
    done = (await socket.receive_until("done", timeout=60))[-1]

    assert response.status_code == 202
    # The worker, another process, may have saved the cancel before the status was read.
    assert response.json()["job_id"] == queued["job_id"]
    assert response.json()["status"] in ("streaming", "cancelled")
    assert provider_gone_at >= cancelled_at
    assert (done["status"], done["content"]) == ("cancelled", " x" * 5)
    reply = await Message.objects.aget(job_id=queued["job_id"])
    assert (reply.status, reply.content) == ("cancelled", " x" * 5)
    assert len(fake_llm.requests) == 1
    await socket.close()


def test_it_returns_404_for_cancelling_in_another_users_conversation(alice, bob):
    conversation = conversation_create(owner=alice, title="Alice's")
    sent = message_send(conversation=conversation, content="Hello")
    response = client_as(bob).post(cancel_url(conversation.id, sent.reply.job_id))
    assert response.status_code == 404
    assert Message.objects.get(id=sent.reply.id).status == "queued"


def test_it_returns_404_for_cancelling_an_unknown_job(alice):
    conversation = conversation_create(owner=alice)
    message_send(conversation=conversation, content="Hello")
    response = client_as(alice).post(cancel_url(conversation.id, uuid.uuid4()))
    assert response.status_code == 404


def test_it_returns_404_for_cancelling_a_job_of_another_conversation(alice):
    conversation = conversation_create(owner=alice, title="Here")
    elsewhere = conversation_create(owner=alice, title="Elsewhere")
    sent = message_send(conversation=elsewhere, content="Hello")
    response = client_as(alice).post(cancel_url(conversation.id, sent.reply.job_id))
    assert response.status_code == 404
    assert Message.objects.get(id=sent.reply.id).status == "queued"


def test_it_returns_401_for_cancelling_without_credentials(alice):
    conversation = conversation_create(owner=alice)
    sent = message_send(conversation=conversation, content="Hello")
    response = APIClient().post(cancel_url(conversation.id, sent.reply.job_id))
    assert response.status_code == 401
    assert Message.objects.get(id=sent.reply.id).status == "queued"


def test_it_returns_409_for_cancelling_a_finished_reply(alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "Hello", "Hi there.")
    reply = Message.objects.get(conversation=conversation, role="assistant")
    response = client_as(alice).post(cancel_url(conversation.id, reply.job_id))
    assert response.status_code == 409
    assert response.json() == {"detail": "The reply has already finished.", "status": "complete"}
    reply.refresh_from_db()
    assert (reply.status, reply.content) == ("complete", "Hi there.")


def test_it_returns_409_for_cancelling_a_reply_twice(alice):
    conversation = conversation_create(owner=alice)
    sent = message_send(conversation=conversation, content="Hello")
    client = client_as(alice)
    first = client.post(cancel_url(conversation.id, sent.reply.job_id))
    second = client.post(cancel_url(conversation.id, sent.reply.job_id))
    assert (first.status_code, first.json()["status"]) == (202, "cancelled")
    assert second.status_code == 409
    assert second.json()["status"] == "cancelled"
