"""The REST API as a client sees it: JWT and session auth, conversations, transcripts."""

import asyncio
import re
import time
import uuid
from datetime import timedelta
from typing import Any, cast

import pytest
import redis
import yaml
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.management import call_command
from django.db import connection
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
from llmworker import redis as grizz_redis
from llmworker.jobs import Job
from llmworker.redis import StreamEntries, jobs_stream_key
from tests.support.fake_openai import Behaviour
from tests.support.processes import free_port
from tests.support.sockets import answer_of, chat_opened, message_queued
from tests.support.transcripts import answered

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN_URL = "/api/auth/token/"
REFRESH_URL = "/api/auth/token/refresh/"
VERIFY_URL = "/api/auth/token/verify/"
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
    assert [c["id"] for c in response.json()["results"]] == [str(conversation.id)]


def test_it_authenticates_with_the_session(alice):
    conversation = conversation_create(owner=alice, title="Session chat")
    client = Client()
    client.force_login(alice)
    response = client.get(CONVERSATIONS_URL)
    assert response.status_code == 200
    assert [c["id"] for c in response.json()["results"]] == [str(conversation.id)]


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
    assert response.json()["error"]["code"] == "permission_denied"
    assert "CSRF" in response.json()["error"]["message"]
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
    assert [(c["id"], c["title"]) for c in response.json()["results"]] == [
        (str(mine.id), "Alice's")
    ]


def test_it_lists_no_conversation_for_a_new_user(alice, bob):
    conversation_create(owner=bob, title="Bob's")
    response = client_as(alice).get(CONVERSATIONS_URL)
    assert response.status_code == 200
    assert (response.json()["count"], response.json()["results"]) == (0, [])


def test_it_lists_conversations_newest_first(alice):
    now = timezone.now()
    ages = {"oldest": 3, "middle": 2, "newest": 1}
    for title, hours in ages.items():
        conversation = conversation_create(owner=alice, title=title)
        then = now - timedelta(hours=hours)
        Conversation.objects.filter(id=conversation.id).update(created_at=then, updated_at=then)
    response = client_as(alice).get(CONVERSATIONS_URL)
    assert [c["title"] for c in response.json()["results"]] == ["newest", "middle", "oldest"]


def test_it_creates_a_conversation(alice, offered_models):
    response = client_as(alice).post(
        CONVERSATIONS_URL,
        {"title": "Bears", "system_prompt": "You are a bear.", "model": "fake-large"},
        format="json",
    )
    assert response.status_code == 201
    body = response.json()
    conversation = Conversation.objects.get(id=uuid.UUID(body["id"]))
    assert conversation.owner == alice
    assert body["title"] == "Bears"
    assert body["system_prompt"] == "You are a bear."
    assert body["model"] == "fake-large"
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
    assert [c["id"] for c in client.get(CONVERSATIONS_URL).json()["results"]] == [created["id"]]


def test_it_accepts_a_title_of_200_characters(alice):
    response = client_as(alice).post(CONVERSATIONS_URL, {"title": "t" * 200}, format="json")
    assert response.status_code == 201
    assert response.json()["title"] == "t" * 200


def test_it_rejects_a_title_over_200_characters(alice):
    response = client_as(alice).post(CONVERSATIONS_URL, {"title": "t" * 201}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], list(error["fields"])) == ("too_long", ["title"])
    assert error["message"] == "title: Ensure this field has no more than 200 characters."
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
    error = response.json()["error"]
    assert (error["code"], list(error["fields"])) == ("too_long", ["system_prompt"])
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
    listed = client_as(alice).get(CONVERSATIONS_URL).json()["results"]
    assert [c["title"] for c in listed] == ["Newer", "New name"]


def test_it_changes_the_system_prompt_and_model_of_a_conversation(alice, offered_models):
    conversation = conversation_create(owner=alice)
    response = client_as(alice).patch(
        conversation_url(conversation.id),
        {"system_prompt": "You are a bear.", "model": "fake-large"},
        format="json",
    )
    assert response.status_code == 200
    conversation.refresh_from_db()
    assert (conversation.system_prompt, conversation.model) == ("You are a bear.", "fake-large")


def test_it_refuses_a_new_title_over_200_characters(alice):
    conversation = conversation_create(owner=alice, title="Kept")
    response = client_as(alice).patch(
        conversation_url(conversation.id), {"title": "t" * 201}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "too_long"
    assert "title" in response.json()["error"]["fields"]
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


@pytest.mark.parametrize("method", ["get", "patch", "delete"])
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
    listed = client_as(alice).get(CONVERSATIONS_URL).json()["results"]
    assert [c["title"] for c in listed] == ["Kept"]
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
    assert [(m["role"], m["content"], m["status"]) for m in response.json()["results"]] == [
        ("user", "What do bears eat?", "complete"),
        ("assistant", "Mostly berries.", "complete"),
        ("user", "And in winter?", "complete"),
        ("assistant", "Nothing, they sleep.", "complete"),
        ("user", "Do they dream?", "complete"),
        ("assistant", "", "queued"),
    ]
    assert response.json()["results"][-1]["job_id"] == str(pending.reply.job_id)


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
    question, answer = client_as(alice).get(messages_url(conversation.id)).json()["results"]
    fields = {
        "id",
        "role",
        "content",
        "status",
        "job_id",
        "created_at",
        "error",
        "usage",
        "superseded",
    }
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
    assert answer["superseded"] is False
    assert answer["created_at"]


def test_it_shows_a_failed_reply_with_its_error(alice):
    conversation = conversation_create(owner=alice, title="Failing")
    sent = message_send(conversation=conversation, content="Hello")
    start = reply_start(reply_id=sent.reply.id, default_model="test-model")
    assert start is not None
    reply_fail(reply_id=sent.reply.id, attempt=start.attempt, error="provider refused")
    answer = client_as(alice).get(messages_url(conversation.id)).json()["results"][1]
    assert (answer["status"], answer["error"], answer["usage"]) == (
        "failed",
        "provider refused",
        None,
    )


def test_it_lists_no_messages_of_a_new_conversation(alice):
    conversation = conversation_create(owner=alice)
    response = client_as(alice).get(messages_url(conversation.id))
    assert response.status_code == 200
    assert response.json() == {"next": None, "previous": None, "results": []}


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
    assert [m["content"] for m in response.json()["results"]] == ["Over the session", ""]


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
    assert response.json() == {
        "error": {
            "code": "finished",
            "message": "The reply has already finished.",
            "job_id": str(reply.job_id),
            "status": "complete",
        }
    }
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
    assert second.json()["error"]["status"] == "cancelled"


# --- Sending a message ------------------------------------------------------------------


def message_url(conversation_id: object, message_id: object) -> str:
    return f"/api/conversations/{conversation_id}/messages/{message_id}/"


def send(user, conversation, **body: object):
    return client_as(user).post(messages_url(conversation.id), body, format="json")


def test_it_sends_a_message_and_queues_its_reply(alice, conversation):
    response = send(alice, conversation, content="What do bears eat?")

    assert response.status_code == 202
    body = response.json()
    message, reply = Message.objects.order_by("position")
    assert set(body) == {"job_id", "message", "reply", "queue_position"}
    assert body["job_id"] == str(reply.job_id)
    assert (body["message"]["id"], body["message"]["role"]) == (str(message.id), "user")
    assert body["message"]["content"] == "What do bears eat?"
    assert (body["reply"]["id"], body["reply"]["status"]) == (str(reply.id), "queued")
    assert body["queue_position"] is None
    assert _queued_job_ids() == [body["job_id"]]  # on the queue, for a worker to take


def _queued_job_ids() -> list[str]:
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    entries = cast(StreamEntries, client.xrange(jobs_stream_key()))
    client.close()
    return [Job.from_fields(fields).job_id for _, fields in entries]


def test_it_answers_a_resend_of_a_client_msg_id_with_the_first_send(alice, conversation):
    first = send(alice, conversation, content="Hello", client_msg_id="m-1")
    again = send(alice, conversation, content="Hello", client_msg_id="m-1")

    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["job_id"] == first.json()["job_id"]
    assert again.json()["message"]["id"] == first.json()["message"]["id"]
    assert Message.objects.count() == 2


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({}, "invalid", "A message needs non-empty text content."),
        ({"content": "   "}, "invalid", "A message needs non-empty text content."),
        ({"content": 7}, "invalid", "A message needs non-empty text content."),
        (
            {"content": "Hi", "client_msg_id": "x" * 65},
            "invalid",
            "client_msg_id must be a string of 1-64 characters.",
        ),
        (
            {"content": "Hi", "client_msg_id": ""},
            "invalid",
            "client_msg_id must be a string of 1-64 characters.",
        ),
    ],
)
def test_it_refuses_an_invalid_message_with_400(alice, conversation, body, code, message):
    response = client_as(alice).post(messages_url(conversation.id), body, format="json")

    assert response.status_code == 400
    assert response.json() == {"error": {"code": code, "message": message}}
    assert not Message.objects.exists()


def test_it_refuses_a_message_over_the_limit_with_400_too_long(alice, conversation, settings):
    settings.CHAT_MAX_MESSAGE_CHARS = 10

    response = send(alice, conversation, content="x" * 11)

    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "too_long",
        "message": "Messages are limited to 10 characters.",
    }
    assert not Message.objects.exists()


def test_it_refuses_a_body_that_is_not_json_with_400(alice, conversation):
    response = client_as(alice).post(
        messages_url(conversation.id), "{not json", content_type="application/json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid"


def test_it_returns_409_busy_while_a_reply_is_in_flight(alice, conversation, limits):
    send(alice, conversation, content="First")

    response = send(alice, conversation, content="Second")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "busy"
    assert "Retry-After" not in response
    assert [m.content for m in Message.objects.filter(role="user")] == ["First"]


def test_it_returns_429_with_retry_after_over_the_rate_limit(alice, limits):
    limits.CHAT_RATE_LIMIT = (1, 60)
    first, second = conversation_create(owner=alice), conversation_create(owner=alice)
    send(alice, first, content="One")

    response = send(alice, second, content="Two")

    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert 0 < error["retry_after"] <= 60
    assert response["Retry-After"] == str(error["retry_after"])
    assert not Message.objects.filter(conversation=second).exists()


def test_it_returns_429_over_the_in_flight_limit(alice, limits):
    limits.CHAT_MAX_INFLIGHT_PER_USER = 1
    first, second = conversation_create(owner=alice), conversation_create(owner=alice)
    send(alice, first, content="One")

    response = send(alice, second, content="Two")

    assert response.status_code == 429
    assert response.json()["error"]["message"] == "You already have 1 replies being generated."
    assert response["Retry-After"] == "5"


def test_it_answers_a_resend_as_before_even_over_the_limits(alice, conversation, limits):
    limits.CHAT_RATE_LIMIT = (1, 60)
    first = send(alice, conversation, content="Hello", client_msg_id="m-1")

    again = send(alice, conversation, content="Hello", client_msg_id="m-1")

    assert again.status_code == 202
    assert again.json()["job_id"] == first.json()["job_id"]


def test_it_returns_503_with_retry_after_when_the_queue_is_full(alice, bob, limits):
    limits.LLM_MAX_PENDING_JOBS = 1
    send(bob, conversation_create(owner=bob), content="Bob's")

    response = send(alice, conversation_create(owner=alice), content="Alice's")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded"
    assert response["Retry-After"] == "10"
    assert not Message.objects.filter(conversation__owner=alice).exists()


def test_it_returns_503_with_retry_after_when_redis_is_down(alice, conversation, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    grizz_redis._clients.clear()

    response = send(alice, conversation, content="Hello?")

    grizz_redis._clients.clear()
    assert response.status_code == 503
    assert response.json()["error"] == {
        "code": "unavailable",
        "message": "Server busy, please retry your request.",
        "retry_after": 5,
    }
    assert response["Retry-After"] == "5"
    assert not Message.objects.exists()


def test_it_returns_503_when_postgresql_is_down(alice, conversation):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (own_pid,) = cursor.fetchone()
    real_port = connection.settings_dict["PORT"]

    # As a restart of PostgreSQL would, for the database threads the turn runs on; this
    # thread's connection (which looks up the conversation) is spared.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> %s",
            [own_pid],
        )
    connection.settings_dict["PORT"] = free_port()
    try:
        response = send(alice, conversation, content="Hello?")
    finally:
        connection.settings_dict["PORT"] = real_port
    again = send(alice, conversation, content="Hello again")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "unavailable"
    assert response["Retry-After"] == "5"
    assert again.status_code == 202
    assert [m.content for m in Message.objects.filter(role="user")] == ["Hello again"]


def test_it_returns_404_for_sending_to_another_users_conversation(alice, bob):
    conversation = conversation_create(owner=bob, title="Bob's")

    response = send(alice, conversation, content="Hi Bob")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert not Message.objects.exists()


def test_it_returns_401_for_sending_without_credentials(conversation):
    response = APIClient().post(messages_url(conversation.id), {"content": "Hi"}, format="json")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "not_authenticated"
    assert not Message.objects.exists()


async def test_it_shows_a_message_sent_over_http_to_the_sockets_on_the_conversation(alice):
    socket = await chat_opened(alice)
    conversation = await Conversation.objects.aget(id=str(socket.conversation_id))

    response = await sync_to_async(send)(alice, conversation, content="From a script")
    announced = await socket.receive()

    assert response.status_code == 202
    assert announced == {
        "type": "user_message",
        "job_id": response.json()["job_id"],
        "message_id": response.json()["message"]["id"],
        "reply_id": response.json()["reply"]["id"],
        "content": "From a script",
    }
    await socket.close()


async def test_it_streams_a_message_sent_over_http_to_its_reply(alice, fake_llm, worker):
    fake_llm.default = Behaviour(reply="Mostly berries.")
    conversation = await sync_to_async(conversation_create)(owner=alice)

    response = await sync_to_async(send)(alice, conversation, content="What do bears eat?")
    reply_id = response.json()["reply"]["id"]
    deadline = time.monotonic() + 60
    while (polled := await sync_to_async(_poll)(alice, conversation, reply_id))["status"] in (
        "queued",
        "streaming",
    ):
        assert time.monotonic() < deadline, polled
        await asyncio.sleep(0.1)  # polling, as a client without a socket does

    assert (polled["status"], polled["content"]) == ("complete", "Mostly berries.")


def _poll(user, conversation, message_id) -> dict[str, Any]:
    response = client_as(user).get(message_url(conversation.id, message_id))
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


# --- Regenerating the last answer -------------------------------------------------------


def regenerate(user, conversation, message_id: object):
    url = f"{message_url(conversation.id, message_id)}regenerate/"
    return client_as(user).post(url, format="json")


def test_it_regenerates_the_last_answer_and_lists_the_old_one_as_superseded(alice, conversation):
    old = answered(conversation, "What do bears eat?", "Mostly berries.")

    response = regenerate(alice, conversation, old.id)

    assert response.status_code == 202
    body = response.json()
    question, kept, new = Message.objects.order_by("position")
    assert set(body) == {"job_id", "message", "reply", "queue_position"}
    assert (body["job_id"], body["message"]["id"]) == (str(new.job_id), str(question.id))
    assert (body["reply"]["id"], body["reply"]["status"]) == (str(new.id), "queued")
    assert _queued_job_ids() == [body["job_id"]]
    listed = client_as(alice).get(messages_url(conversation.id)).json()["results"]
    assert [(m["id"], m["content"], m["superseded"]) for m in listed] == [
        (str(question.id), "What do bears eat?", False),
        (str(kept.id), "Mostly berries.", True),
        (str(new.id), "", False),
    ]


def test_it_returns_400_for_regenerating_an_answer_that_is_not_the_last(alice, conversation):
    first = answered(conversation, "One?", "One.")
    answered(conversation, "Two?", "Two.")

    response = regenerate(alice, conversation, first.id)

    assert response.status_code == 400
    assert response.json() == {
        "error": {"code": "invalid", "message": "Only the last answer can be regenerated."}
    }
    assert _queued_job_ids() == []


def test_it_returns_409_busy_for_regenerating_while_a_reply_is_in_flight(alice, conversation):
    old = answered(conversation, "One?", "One.")
    send(alice, conversation, content="Two?")

    response = regenerate(alice, conversation, old.id)

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "busy"
    assert not Message.objects.filter(superseded_at__isnull=False).exists()


def test_it_returns_429_for_regenerating_over_the_rate_limit(alice, conversation, limits):
    limits.CHAT_RATE_LIMIT = (1, 60)
    send(alice, conversation_create(owner=alice), content="Elsewhere")
    old = answered(conversation, "One?", "One.")

    response = regenerate(alice, conversation, old.id)

    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limited"
    assert response["Retry-After"] == str(response.json()["error"]["retry_after"])
    assert not Message.objects.get(id=old.id).superseded


def test_it_returns_404_for_regenerating_in_another_users_conversation(alice, bob):
    bobs = conversation_create(owner=bob)
    old = answered(bobs, "Bob's?", "Bob's.")

    response = regenerate(alice, bobs, old.id)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert not Message.objects.get(id=old.id).superseded


def test_it_returns_404_for_regenerating_a_message_of_another_conversation(alice, conversation):
    answered(conversation, "Here?", "Here.")
    elsewhere = answered(conversation_create(owner=alice), "There?", "There.")

    response = regenerate(alice, conversation, elsewhere.id)

    assert response.status_code == 404
    assert not Message.objects.get(id=elsewhere.id).superseded


# --- One message ------------------------------------------------------------------------


def test_it_shows_one_message(alice, conversation):
    sent = message_send(conversation=conversation, content="Hello")

    response = client_as(alice).get(message_url(conversation.id, sent.reply.id))

    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["role"], body["status"]) == (str(sent.reply.id), "assistant", "queued")
    assert body["job_id"] == str(sent.reply.job_id)


def test_it_returns_404_for_a_message_of_another_users_conversation(alice, bob):
    conversation = conversation_create(owner=bob)
    sent = message_send(conversation=conversation, content="bob's secret")

    response = client_as(alice).get(message_url(conversation.id, sent.message.id))

    assert response.status_code == 404
    assert b"secret" not in response.content


def test_it_returns_404_for_a_message_under_another_conversation(alice, conversation):
    elsewhere = conversation_create(owner=alice)
    sent = message_send(conversation=elsewhere, content="Hello")

    response = client_as(alice).get(message_url(conversation.id, sent.message.id))

    assert response.status_code == 404


def test_it_returns_401_for_a_message_without_credentials(alice, conversation):
    sent = message_send(conversation=conversation, content="Hello")
    response = APIClient().get(message_url(conversation.id, sent.message.id))
    assert response.status_code == 401


# --- Pages ------------------------------------------------------------------------------


def test_it_pages_messages_oldest_first_with_a_cursor(alice, conversation):
    for number in range(5):
        answered(conversation, f"question {number}", f"answer {number}")
    client = client_as(alice)

    pages, url = [], messages_url(conversation.id) + "?page_size=4"
    while url:
        page = client.get(url).json()
        pages.append([m["content"] for m in page["results"]])
        url = page["next"]

    assert pages == [
        ["question 0", "answer 0", "question 1", "answer 1"],
        ["question 2", "answer 2", "question 3", "answer 3"],
        ["question 4", "answer 4"],
    ]


def test_it_keeps_a_cursor_page_in_place_when_messages_are_added(alice, conversation):
    for number in range(3):
        answered(conversation, f"question {number}", f"answer {number}")
    client = client_as(alice)
    first = client.get(messages_url(conversation.id) + "?page_size=4").json()

    answered(conversation, "question 3", "answer 3")
    second = client.get(first["next"]).json()

    assert [m["content"] for m in second["results"]] == [
        "question 2",
        "answer 2",
        "question 3",
        "answer 3",
    ]


def test_it_pages_conversations_newest_first(alice):
    now = timezone.now()
    for hours in range(3, 0, -1):
        conversation = conversation_create(owner=alice, title=f"{hours} hours ago")
        then = now - timedelta(hours=hours)
        Conversation.objects.filter(id=conversation.id).update(created_at=then, updated_at=then)
    client = client_as(alice)

    first = client.get(CONVERSATIONS_URL + "?page_size=2").json()
    second = client.get(first["next"]).json()

    assert first["count"] == 3
    assert [c["title"] for c in first["results"]] == ["1 hours ago", "2 hours ago"]
    assert [c["title"] for c in second["results"]] == ["3 hours ago"]
    assert second["next"] is None


# --- Tokens: verify ---------------------------------------------------------------------


def test_it_verifies_a_valid_token(alice):
    pair = token_pair("alice", "alice-password-1")
    for token in pair.values():
        response = APIClient().post(VERIFY_URL, {"token": token}, format="json")
        assert (response.status_code, response.json()) == (200, {})


def test_it_refuses_to_verify_an_expired_token(alice):
    token = AccessToken.for_user(alice)
    token.set_exp(lifetime=-timedelta(seconds=1))

    response = APIClient().post(VERIFY_URL, {"token": str(token)}, format="json")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_not_valid"


# --- One error shape --------------------------------------------------------------------


def test_it_answers_every_error_in_one_shape(alice, conversation):
    client = client_as(alice)
    answers = [
        APIClient().get(CONVERSATIONS_URL),
        APIClient().get(CONVERSATIONS_URL, **bearer("not-a-jwt")),
        APIClient().post(TOKEN_URL, {"username": "alice", "password": "wrong"}, format="json"),
        APIClient().post(TOKEN_URL, {}, format="json"),
        client.get(messages_url(uuid.uuid4())),
        client.delete(messages_url(conversation.id)),
        client.post(CONVERSATIONS_URL, {"title": "t" * 201}, format="json"),
    ]

    assert [(a.status_code, a.json()["error"]["code"]) for a in answers] == [
        (401, "not_authenticated"),
        (401, "token_not_valid"),
        (401, "no_active_account"),
        (400, "invalid"),
        (404, "not_found"),
        (405, "method_not_allowed"),
        (400, "too_long"),
    ]
    assert all(set(a.json()) == {"error"} for a in answers)
    assert all(a.json()["error"]["message"] for a in answers)


# --- Schema and docs --------------------------------------------------------------------


def test_it_serves_a_schema_that_validates_and_names_every_endpoint(tmp_path):
    schema_file = tmp_path / "schema.yaml"
    # --fail-on-warn: any warning of drf-spectacular (an unresolvable serializer, a path
    # parameter without a type...) fails it, as does a schema invalid for OpenAPI 3.
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(schema_file))
    schema = yaml.safe_load(schema_file.read_text())

    operations = {(path, method) for path, item in schema["paths"].items() for method in item}
    assert operations == {
        ("/api/auth/token/", "post"),
        ("/api/auth/token/refresh/", "post"),
        ("/api/auth/token/verify/", "post"),
        ("/api/conversations/", "get"),
        ("/api/conversations/", "post"),
        ("/api/conversations/{conversation_id}/", "get"),
        ("/api/conversations/{conversation_id}/", "patch"),
        ("/api/conversations/{conversation_id}/", "delete"),
        ("/api/conversations/{conversation_id}/messages/", "get"),
        ("/api/conversations/{conversation_id}/messages/", "post"),
        ("/api/conversations/{conversation_id}/messages/{message_id}/", "get"),
        ("/api/conversations/{conversation_id}/messages/{message_id}/regenerate/", "post"),
        ("/api/conversations/{conversation_id}/replies/{job_id}/cancel/", "post"),
        ("/api/models/", "get"),
        ("/api/replies/{job_id}/stream", "get"),
    }
    send_op = schema["paths"]["/api/conversations/{conversation_id}/messages/"]["post"]
    assert set(send_op["responses"]) == {"202", "400", "401", "404", "409", "429", "503"}
    assert send_op["responses"]["429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ApiError"
    }
    assert set(schema["components"]["schemas"]["Turn"]["properties"]) == {
        "job_id",
        "message",
        "reply",
        "queue_position",
    }
    regenerate_op = schema["paths"][
        "/api/conversations/{conversation_id}/messages/{message_id}/regenerate/"
    ]["post"]
    assert set(regenerate_op["responses"]) == set(send_op["responses"])
    assert regenerate_op["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Turn"
    }
    superseded = schema["components"]["schemas"]["Message"]["properties"]["superseded"]
    assert (superseded["type"], superseded["readOnly"]) == ("boolean", True)
    assert "regenerated" in superseded["description"]


def test_it_serves_the_schema_and_its_docs_without_any_cdn(client):
    schema = client.get("/api/schema/")
    docs = client.get("/api/docs/")
    html = docs.content.decode()
    bundle = re.search(r'src="([^"]*swagger-ui-bundle\.js)"', html)

    assert schema.status_code == 200
    assert b"/api/replies/{job_id}/stream" in schema.content
    assert docs.status_code == 200
    assert "http://" not in html and "https://" not in html
    assert bundle is not None and bundle.group(1).startswith("/static/drf_spectacular_sidecar/")
    assert client.get(bundle.group(1)).status_code == 200
