"""The Django admin, where staff review conversations and their transcripts."""

import html
import re
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.test import Client

from chat.models import Conversation, Message
from chat.services import (
    conversation_create,
    message_send,
    reply_fail,
    reply_start,
)
from tests.support.transcripts import answered

pytestmark = pytest.mark.django_db(transaction=True)

CONVERSATIONS = "/admin/chat/conversation/"
MESSAGES = "/admin/chat/message/"


@pytest.fixture
def superuser() -> Client:
    """A client signed in as a superuser (staff with every permission)."""
    root = User.objects.create_superuser("root", "root@example.com", "root-password-1")
    client = Client()
    client.force_login(root)
    return client


def failed(conversation: Conversation, question: str, error: str) -> None:
    sent = message_send(conversation=conversation, content=question)
    start = reply_start(reply_id=sent.reply.id, default_model="test-model")
    assert start is not None
    assert reply_fail(reply_id=sent.reply.id, attempt=start.attempt, error=error)


def listed(client: Client, url: str, **params: str) -> list[Any]:
    """The objects a changelist shows, after its filters and search."""
    response = client.get(url, params)
    assert response.status_code == 200, response.content[:500]
    return list(response.context["cl"].result_list)


def filter_link(client: Client, url: str, text: str) -> str:
    """The address of the filter choice `text` in the changelist's sidebar at `url`: a list
    filter that is not declared has no link, even though the admin would accept its query."""
    page = client.get(url).content.decode()
    links = re.findall(rf'<li[^>]*>\s*<a href="(\?[^"]*)">{re.escape(text)}</a></li>', page)
    assert len(links) == 1, f"{text!r} is not a filter choice of {url}"
    return url.split("?")[0] + html.unescape(links[0])


# --- Who may enter ----------------------------------------------------------------------


def test_it_redirects_a_non_staff_user_to_the_admin_login(alice):
    client = Client()
    client.force_login(alice)
    response = client.get(CONVERSATIONS)
    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={CONVERSATIONS}"


def test_it_redirects_a_non_staff_user_away_from_a_transcript(alice):
    conversation = conversation_create(owner=alice, title="Private")
    message_send(conversation=conversation, content="my private question")
    client = Client()
    client.force_login(alice)
    response = client.get(f"{CONVERSATIONS}{conversation.id}/change/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert b"my private question" not in response.content


def test_it_redirects_an_anonymous_visitor_to_the_admin_login():
    response = Client().get(CONVERSATIONS)
    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={CONVERSATIONS}"


# --- The conversation changelist ---------------------------------------------------------


def test_it_shows_every_users_conversations_to_a_superuser(superuser, alice, bob):
    conversation_create(owner=alice, title="Alice on bears")
    conversation_create(owner=bob, title="Bob on wolves")
    response = superuser.get(CONVERSATIONS)
    assert response.status_code == 200
    assert b"Alice on bears" in response.content
    assert b"Bob on wolves" in response.content


def test_it_filters_conversations_by_model(superuser, alice):
    big = conversation_create(owner=alice, title="Big", model="gpt-4o")
    conversation_create(owner=alice, title="Small", model="gpt-4o-mini")
    assert listed(superuser, filter_link(superuser, CONVERSATIONS, "gpt-4o")) == [big]


def test_it_searches_conversations_by_title(superuser, alice):
    bears = conversation_create(owner=alice, title="All about bears")
    conversation_create(owner=alice, title="All about wolves")
    assert listed(superuser, CONVERSATIONS, q="bears") == [bears]


def test_it_searches_conversations_by_owner_username(superuser, alice, bob):
    conversation_create(owner=alice, title="One")
    bobs = conversation_create(owner=bob, title="Two")
    assert listed(superuser, CONVERSATIONS, q="bob") == [bobs]


def test_it_searches_conversations_by_message_content(superuser, alice):
    honey = conversation_create(owner=alice, title="First")
    conversation_create(owner=alice, title="Second")
    answered(honey, "Do bears like honey?", "Yes, bears love honey.")
    # Two matching messages, one conversation: it is listed once.
    assert listed(superuser, CONVERSATIONS, q="honey") == [honey]


def test_it_searches_and_filters_conversations_together(superuser, alice, bob):
    wanted = conversation_create(owner=alice, title="Salmon", model="gpt-4o")
    conversation_create(owner=alice, title="Salmon", model="gpt-4o-mini")
    conversation_create(owner=bob, title="Trout", model="gpt-4o")
    searched = f"{CONVERSATIONS}?q=salmon"
    assert listed(superuser, filter_link(superuser, searched, "gpt-4o")) == [wanted]


# --- A conversation's transcript ---------------------------------------------------------


def test_it_shows_the_transcript_inline_in_order(superuser, alice):
    conversation = conversation_create(owner=alice, title="Transcript")
    answered(conversation, "question one", "answer one")
    answered(conversation, "question two", "answer two")
    failed(conversation, "question three", "the provider refused")
    response = superuser.get(f"{CONVERSATIONS}{conversation.id}/change/")
    assert response.status_code == 200
    html = response.content.decode()
    contents = [
        "question one",
        "answer one",
        "question two",
        "answer two",
        "question three",
        "the provider refused",
    ]
    positions = [html.index(content) for content in contents]
    assert positions == sorted(positions)


def test_it_escapes_message_content_in_the_transcript(superuser, alice):
    conversation = conversation_create(owner=alice)
    message_send(conversation=conversation, content="<script>alert(1)</script>")
    html = superuser.get(f"{CONVERSATIONS}{conversation.id}/change/").content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" not in html


def test_it_offers_no_form_to_add_a_message_in_the_inline(superuser, alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "question", "answer")
    html = superuser.get(f"{CONVERSATIONS}{conversation.id}/change/").content.decode()
    # The admin's JavaScript shows "Add another" only below MAX_NUM_FORMS, from the empty
    # form it clones; neither is there.
    assert 'name="messages-MAX_NUM_FORMS" value="0"' in html
    assert 'id="messages-empty"' not in html


def test_it_offers_no_message_inline_on_the_add_conversation_page(superuser):
    html = superuser.get(f"{CONVERSATIONS}add/").content.decode()
    assert 'name="messages-MAX_NUM_FORMS" value="0"' in html
    assert 'id="messages-empty"' not in html


def test_it_saves_a_conversation_and_ignores_a_message_posted_in_the_inline(superuser, alice):
    conversation = conversation_create(owner=alice, title="Before")
    sent = message_send(conversation=conversation, content="the only question")
    response = superuser.post(
        f"{CONVERSATIONS}{conversation.id}/change/",
        {
            "owner": alice.pk,
            "title": "After",
            "model": "",
            "system_prompt": "",
            "messages-TOTAL_FORMS": "3",
            "messages-INITIAL_FORMS": "2",
            "messages-MIN_NUM_FORMS": "0",
            "messages-MAX_NUM_FORMS": "0",
            "messages-0-id": sent.message.id,
            "messages-0-conversation": conversation.id,
            "messages-1-id": sent.reply.id,
            "messages-1-conversation": conversation.id,
            "messages-2-conversation": conversation.id,
            "messages-2-position": "3",
            "messages-2-role": "assistant",
            "messages-2-content": "injected by staff",
        },
    )
    assert response.status_code == 302
    conversation.refresh_from_db()
    assert conversation.title == "After"
    assert list(conversation.messages.values_list("content", flat=True)) == [
        "the only question",
        "",
    ]


# --- The message changelist ---------------------------------------------------------------


def test_it_filters_messages_by_status(superuser, alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "fine question", "fine answer")
    failed(conversation, "bad question", "boom")
    failures = listed(superuser, filter_link(superuser, MESSAGES, "Failed"))
    assert [(m.role, m.error) for m in failures] == [("assistant", "boom")]


def test_it_filters_messages_by_role(superuser, alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "first question", "first answer")
    answered(conversation, "second question", "second answer")
    users = listed(superuser, filter_link(superuser, MESSAGES, "User"))
    assert sorted(m.content for m in users) == ["first question", "second question"]


def test_it_filters_messages_by_status_and_role(superuser, alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "question", "answer")
    pending = message_send(conversation=conversation, content="waiting")
    queued = filter_link(superuser, MESSAGES, "Queued")
    assert listed(superuser, filter_link(superuser, queued, "Assistant")) == [pending.reply]
    assert listed(superuser, filter_link(superuser, queued, "User")) == []


def test_it_searches_messages_by_content(superuser, alice):
    conversation = conversation_create(owner=alice)
    answered(conversation, "where do otters sleep", "in holts")
    assert [m.content for m in listed(superuser, MESSAGES, q="otters")] == ["where do otters sleep"]


def test_it_finds_a_reply_by_its_job_id(superuser, alice):
    conversation = conversation_create(owner=alice)
    sent = message_send(conversation=conversation, content="question")
    assert listed(superuser, MESSAGES, q=str(sent.reply.job_id)) == [sent.reply]


def test_it_does_not_offer_to_add_a_message(superuser):
    assert superuser.get(f"{MESSAGES}add/").status_code == 403
    assert superuser.post(f"{MESSAGES}add/", {}).status_code == 403
    assert not Message.objects.exists()
