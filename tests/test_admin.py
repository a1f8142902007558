"""The Django admin, where staff review conversations and their transcripts."""

import html
import json
import re
import uuid
from datetime import timedelta
from html.parser import HTMLParser
from typing import Any

import pytest
import redis
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client
from django.utils import formats, timezone

from chat.models import Conversation, Message
from chat.services import (
    conversation_create,
    message_send,
    reply_complete,
    reply_fail,
    reply_regenerate,
    reply_requeue,
    reply_start,
)
from llmworker.redis import jobs_reserved_key, jobs_stream_key
from tests.support.transcripts import answered

pytestmark = pytest.mark.django_db(transaction=True)

CONVERSATIONS = "/admin/chat/conversation/"
MESSAGES = "/admin/chat/message/"


@pytest.fixture
def superuser() -> Client:
    """A client signed in as a superuser (staff with every permission). No password: the
    client signs in without one, and hashing one costs most of a second."""
    root = User.objects.create_superuser("root", "root@example.com", None)
    client = Client()
    client.force_login(root)
    return client


def failed(conversation: Conversation, question: str, error: str) -> Message:
    sent = message_send(conversation=conversation, content=question)
    start = reply_start(reply_id=sent.reply.id, default_model="test-model")
    assert start is not None
    assert reply_fail(reply_id=sent.reply.id, attempt=start.attempt, error=error)
    return Message.objects.get(id=sent.reply.id)


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


class _Cells(HTMLParser):
    """The rows of an admin page's tables, each cell's text under its column's field name
    (the admin gives a cell the class field-<name>); a yes/no icon reads as its alt text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self.field: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag == "tr":
            self.rows.append({})
        elif tag in ("td", "th") and self.rows:
            fields = [name.removeprefix("field-") for name in classes if name.startswith("field-")]
            self.field = fields[0] if fields else None
            if self.field:
                self.rows[-1][self.field] = ""
        elif tag == "img" and self.field:
            self.rows[-1][self.field] += attributes.get("alt") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self.field = None

    def handle_data(self, data: str) -> None:
        if self.field:
            self.rows[-1][self.field] += data


def table_rows(page: str) -> list[dict[str, str]]:
    """What a reader sees in each row of the changelist or of the inline transcript."""
    cells = _Cells()
    cells.feed(page)
    return [
        {field: " ".join(text.split()) for field, text in row.items()} for row in cells.rows if row
    ]


def changelist_rows(client: Client, url: str, **params: str) -> list[dict[str, str]]:
    response = client.get(url, params)
    assert response.status_code == 200, response.content[:500]
    return table_rows(response.content.decode())


def transcript_rows(client: Client, conversation: Conversation) -> list[dict[str, str]]:
    response = client.get(f"{CONVERSATIONS}{conversation.id}/change/")
    assert response.status_code == 200, response.content[:500]
    return table_rows(response.content.decode())


def exported(client: Client, action: str, conversations: list[Conversation]) -> Any:
    """The download an export action of the conversation changelist answers with."""
    response = client.post(
        CONVERSATIONS,
        {"action": action, "_selected_action": [str(c.id) for c in conversations]},
    )
    assert response.status_code == 200, response.content[:500]
    return response


def assert_in_order(text: str, parts: list[str]) -> None:
    positions = [text.index(part) for part in parts]
    assert positions == sorted(positions), parts


def change_form(*, owner: User, title: str) -> dict[str, Any]:
    """What a conversation's change page posts, with an empty transcript inline."""
    inline = {f"messages-{name}_FORMS": "0" for name in ("TOTAL", "INITIAL", "MIN_NUM", "MAX_NUM")}
    return {"owner": owner.pk, "title": title, "model": "", "system_prompt": "", **inline}


USAGE = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}


def transcripts_bulk(*, owners: list[User], conversations: int, turns: int) -> list[Conversation]:
    """Conversations of `turns` turns each, written in bulk (the pipeline's statement per turn
    would take most of a test at this size): every reply complete with usage, but the last
    one of every other conversation failed. Their owners and models alternate."""
    made = Conversation.objects.bulk_create(
        Conversation(
            owner=owners[i % len(owners)],
            title=f"Conversation {i}",
            model=["gpt-4o", "gpt-4o-mini"][i % 2],
        )
        for i in range(conversations)
    )
    now = timezone.now()
    messages = []
    for i, conversation in enumerate(made):
        for turn in range(turns):
            fails = i % 2 == 0 and turn == turns - 1
            question = Message(
                conversation=conversation,
                position=2 * turn + 1,
                role=Message.Role.USER,
                content=f"question {turn}",
            )
            reply = Message(
                conversation=conversation,
                position=2 * turn + 2,
                role=Message.Role.ASSISTANT,
                status=Message.Status.FAILED if fails else Message.Status.COMPLETE,
                content="" if fails else f"answer {turn}",
                error="boom" if fails else "",
                job_id=uuid.uuid4(),
                attempt=1,
                model=conversation.model,
                finished_at=now,
                **({} if fails else USAGE),
            )
            messages += [question, reply]
    Message.objects.bulk_create(messages, batch_size=1000)
    return made


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


@pytest.mark.parametrize("page", ["the message list", "a message"])
def test_it_redirects_a_non_staff_user_away_from_the_messages(alice, page):
    conversation = conversation_create(owner=alice, title="Private")
    sent = message_send(conversation=conversation, content="my private question")
    url = MESSAGES if page == "the message list" else f"{MESSAGES}{sent.message.id}/change/"
    client = Client()
    client.force_login(alice)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert b"my private question" not in response.content


def test_it_refuses_an_export_to_a_non_staff_user(alice):
    conversation = conversation_create(owner=alice, title="Private")
    message_send(conversation=conversation, content="my private question")
    client = Client()
    client.force_login(alice)
    response = client.post(
        CONVERSATIONS, {"action": "export_json", "_selected_action": [str(conversation.id)]}
    )
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    assert "Content-Disposition" not in response
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


def test_it_lists_each_conversations_owner_model_messages_tokens_activity_and_failure(
    superuser, alice, bob
):
    fine = conversation_create(owner=alice, title="Fine", model="gpt-4o")
    answered(fine, "question one", "answer one", usage=USAGE)
    answered(fine, "question two", "answer two", usage=USAGE)
    broken = conversation_create(owner=bob, title="Broken")
    reply = failed(broken, "question", "boom")
    # The reply ended after the conversation was last touched: that is its last activity.
    ended = timezone.now() + timedelta(hours=1)
    Message.objects.filter(id=reply.id).update(updated_at=ended, finished_at=ended)
    empty = conversation_create(owner=alice, title="Empty")
    rows = {row["__str__"]: row for row in changelist_rows(superuser, CONVERSATIONS)}
    columns = ["owner", "model", "message_count", "tokens_used", "has_failed_reply"]
    assert [rows["Fine"][column] for column in columns] == ["alice", "gpt-4o", "4", "84", "False"]
    assert [rows["Broken"][column] for column in columns] == ["bob", "-", "2", "0", "True"]
    assert [rows["Empty"][column] for column in columns] == ["alice", "-", "0", "0", "False"]
    assert rows["Broken"]["last_activity"] == formats.localize(timezone.localtime(ended))
    assert rows["Empty"]["last_activity"] == formats.localize(timezone.localtime(empty.updated_at))


def test_it_counts_each_message_once_when_a_search_matches_several(superuser, alice):
    honey = conversation_create(owner=alice, title="Bears")
    answered(honey, "Do bears like honey?", "Yes, honey.", usage=USAGE)
    failed(honey, "More honey?", "no more honey")
    rows = changelist_rows(
        superuser, filter_link(superuser, f"{CONVERSATIONS}?q=honey", "With a failed reply")
    )
    assert [(row["__str__"], row["message_count"], row["tokens_used"]) for row in rows] == [
        ("Bears", "4", "42")
    ]


def test_it_filters_conversations_by_the_status_of_their_replies(superuser, alice):
    fine = conversation_create(owner=alice, title="Fine")
    answered(fine, "question", "answer")
    broken = conversation_create(owner=alice, title="Broken")
    answered(broken, "question", "answer")
    failed(broken, "second question", "boom")
    waiting = conversation_create(owner=alice, title="Waiting")
    message_send(conversation=waiting, content="question")
    stopped = conversation_create(owner=alice, title="Stopped")
    answered(stopped, "question", "half an ans", status="cancelled")
    for choice, expected in [
        ("With a failed reply", [broken]),
        ("With a reply in progress", [waiting]),
        ("With a cancelled reply", [stopped]),
    ]:
        assert listed(superuser, filter_link(superuser, CONVERSATIONS, choice)) == expected


def test_it_filters_conversations_by_owner_among_those_who_have_one(superuser, alice, bob):
    conversation_create(owner=alice, title="Alice's")
    bobs = conversation_create(owner=bob, title="Bob's")
    User.objects.create_user("carol", password="carol-password-1")
    assert listed(superuser, filter_link(superuser, CONVERSATIONS, "bob")) == [bobs]
    # Every user ever made would crowd the sidebar; carol has no conversation.
    assert ">carol</a>" not in superuser.get(CONVERSATIONS).content.decode()


def test_it_filters_conversations_by_the_date_they_were_started(superuser, alice):
    recent = conversation_create(owner=alice, title="Recent")
    old = conversation_create(owner=alice, title="Old")
    Conversation.objects.filter(id=old.id).update(created_at=timezone.now() - timedelta(days=60))
    assert listed(superuser, filter_link(superuser, CONVERSATIONS, "Past 7 days")) == [recent]


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


def test_it_finds_a_conversation_by_words_of_its_title_and_of_its_messages(superuser, alice, bob):
    wanted = conversation_create(owner=alice, title="Bears")
    answered(wanted, "Do they like honey?", "Very much.")
    conversation_create(owner=alice, title="Bears and salmon")
    wolves = conversation_create(owner=bob, title="Wolves")
    answered(wolves, "Do wolves like honey?", "No.")
    assert listed(superuser, CONVERSATIONS, q="bears honey") == [wanted]
    assert listed(superuser, CONVERSATIONS, q='"they like honey"') == [wanted]


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
    contents = ["question one", "answer one", "question two", "answer two", "question three"]
    assert_in_order(response.content.decode(), [*contents, "the provider refused"])


def test_it_shows_each_replys_status_error_usage_latency_and_attempts(superuser, alice):
    conversation = conversation_create(owner=alice, title="Details")
    fine = answered(conversation, "question one", "answer one", usage=USAGE)
    # Delivered twice: the first worker died mid-reply, the second met the provider's refusal.
    sent = message_send(conversation=conversation, content="question two")
    assert reply_start(reply_id=sent.reply.id, default_model="test-model")
    second = reply_start(reply_id=sent.reply.id, default_model="test-model")
    assert second is not None
    assert reply_fail(reply_id=sent.reply.id, attempt=second.attempt, error="the provider refused")
    # Failed once, retried by an operator (llm_dead_letters retry), then answered.
    retried = failed(conversation, "question three", "timeout")
    reply_requeue(reply_id=retried.id)
    third = reply_start(reply_id=retried.id, default_model="test-model")
    assert third is not None
    assert reply_complete(
        reply_id=retried.id, attempt=third.attempt, content="answer three", usage=USAGE
    )
    sent_at = timezone.now() - timedelta(minutes=1)
    for reply, took in [(fine, 2.5), (sent.reply, 7.5), (retried, 31)]:
        Message.objects.filter(id=reply.id).update(
            created_at=sent_at, finished_at=sent_at + timedelta(seconds=took)
        )
    columns = ["position", "role", "status", "error", "model", "tokens", "latency", "attempts"]
    rows = [[row[column] for column in columns] for row in transcript_rows(superuser, conversation)]
    tokens = "42 (12 in, 30 out)"
    assert rows == [
        ["1", "User", "Complete", "-", "-", "-", "-", "-"],
        ["2", "Assistant", "Complete", "-", "test-model", tokens, "2.5 s", "1"],
        ["3", "User", "Complete", "-", "-", "-", "-", "-"],
        ["4", "Assistant", "Failed", "the provider refused", "test-model", "-", "7.5 s", "2"],
        ["5", "User", "Complete", "-", "-", "-", "-", "-"],
        ["6", "Assistant", "Complete", "-", "test-model", tokens, "31.0 s", "2 (1 before a retry)"],
    ]


def regenerated(conversation: Conversation, question: str, old: str, new: str) -> None:
    """A turn whose answer `old` the user regenerated, and its new answer `new`."""
    reply = answered(conversation, question, old)
    again = reply_regenerate(conversation=conversation, reply_id=reply.id).reply
    start = reply_start(reply_id=again.id, default_model="test-model")
    assert start is not None
    assert reply_complete(reply_id=again.id, attempt=start.attempt, content=new, usage=None)


def test_it_shows_a_regenerated_answer_in_the_transcript_marked(superuser, alice):
    conversation = conversation_create(owner=alice)
    regenerated(conversation, "question", "the first answer", "the second answer")
    columns = ["position", "role", "content", "regenerated"]
    rows = [[row[column] for column in columns] for row in transcript_rows(superuser, conversation)]
    assert rows == [
        ["1", "User", "question", "-"],
        ["2", "Assistant", "the first answer", "replaced by a regenerated answer"],
        ["3", "Assistant", "the second answer", "-"],
    ]


def test_it_exports_a_regenerated_answer_marked(superuser, alice):
    conversation = conversation_create(owner=alice, title="Again")
    regenerated(conversation, "question", "the first answer", "the second answer")
    [exported_json] = json.loads(exported(superuser, "export_json", [conversation]).content)[
        "conversations"
    ]
    markdown = exported(superuser, "export_markdown", [conversation]).content.decode()
    assert [(m["content"], m["superseded"]) for m in exported_json["messages"]] == [
        ("question", False),
        ("the first answer", True),
        ("the second answer", False),
    ]
    assert exported_json["messages"][1]["superseded_at"]
    assert_in_order(
        markdown,
        [
            "## 2. Assistant · complete · test-model · ",
            " · 1 attempt · replaced by a regenerated answer · ",
            "\n\nthe first answer\n",
            "## 3. Assistant · complete · test-model · ",
            "\n\nthe second answer\n",
        ],
    )
    assert markdown.count("replaced by a regenerated answer") == 1


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
            **change_form(owner=alice, title="After"),
            "messages-TOTAL_FORMS": "3",
            "messages-INITIAL_FORMS": "2",
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


def test_it_does_not_move_a_conversation_up_its_owners_list_when_staff_save_it(superuser, alice):
    older = conversation_create(owner=alice, title="Older")
    newer = conversation_create(owner=alice, title="Newer")
    before = Conversation.objects.get(id=older.id).updated_at
    response = superuser.post(
        f"{CONVERSATIONS}{older.id}/change/",
        change_form(owner=alice, title="Older, renamed by staff"),
    )
    assert response.status_code == 302
    older.refresh_from_db()
    assert older.title == "Older, renamed by staff"
    assert older.updated_at == before
    # Newest first, as her conversation list and the API order them.
    assert list(Conversation.objects.filter(owner=alice).order_by("-updated_at")) == [newer, older]


# --- The message changelist ---------------------------------------------------------------


def test_it_lists_messages_with_their_owner_and_a_link_to_their_conversation(superuser, alice):
    conversation = conversation_create(owner=alice, title="Linked")
    failed(conversation, "a doomed question", "boom")
    page = superuser.get(MESSAGES).content.decode()
    columns = ["role", "status", "excerpt", "error_excerpt", "model", "attempts", "owner"]
    assert [[row[column] for column in columns] for row in table_rows(page)] == [
        ["Assistant", "Failed", "-", "boom", "test-model", "1", "alice"],
        ["User", "Complete", "a doomed question", "-", "-", "-", "alice"],
    ]
    links = re.findall(r'<td class="field-conversation_link"><a href="([^"]+)">Linked</a>', page)
    assert links == [f"{CONVERSATIONS}{conversation.id}/change/"] * 2
    assert "a doomed question" in superuser.get(links[0]).content.decode()


def test_it_filters_messages_by_model(superuser, alice):
    big = conversation_create(owner=alice, model="gpt-4o")
    answered(big, "question", "a big answer")
    small = conversation_create(owner=alice)
    answered(small, "question", "a small answer")
    replies = listed(superuser, filter_link(superuser, MESSAGES, "gpt-4o"))
    assert [m.content for m in replies] == ["a big answer"]


def test_it_shows_a_message_read_only_and_refuses_to_change_it(superuser, alice):
    conversation = conversation_create(owner=alice)
    reply = answered(conversation, "question", "the saved answer")
    url = f"{MESSAGES}{reply.id}/change/"
    page = superuser.get(url)
    assert page.status_code == 200
    assert "the saved answer" in page.content.decode()
    assert 'name="_save"' not in page.content.decode()
    # A save would write the whole row back, over what a worker wrote since.
    response = superuser.post(url, {"content": "rewritten by staff", "status": "queued"})
    assert response.status_code == 403
    after = Message.objects.get(id=reply.id)
    assert (after.content, after.status, after.updated_at) == (
        "the saved answer",
        Message.Status.COMPLETE,
        reply.updated_at,
    )


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


# --- Exports ------------------------------------------------------------------------------


def bears_and_wolves(alice: User, bob: User) -> tuple[Conversation, Conversation]:
    """Two conversations to export (bears the newer), and one of bob's that is not chosen."""
    wolves = conversation_create(owner=bob, title="Wolves", system_prompt="Be brief.")
    answered(wolves, "Do wolves howl?", "They do.", usage=USAGE)
    bears = conversation_create(owner=alice, title="Bears", model="gpt-4o")
    answered(bears, "Do bears like honey?", "Yes, **very** much.", usage=USAGE)
    failed(bears, "And salmon?", "the provider refused")
    conversation_create(owner=bob, title="Not chosen")
    return bears, wolves


def test_it_exports_the_selected_conversations_as_json(superuser, alice, bob):
    bears, wolves = bears_and_wolves(alice, bob)
    response = exported(superuser, "export_json", [bears, wolves])
    assert response["Content-Type"] == "application/json; charset=utf-8"
    assert re.fullmatch(
        r'attachment; filename="conversations-\d{8}-\d{6}\.json"',
        response["Content-Disposition"],
    )
    exports = json.loads(response.content)["conversations"]
    assert [(c["id"], c["owner"], c["title"], c["model"]) for c in exports] == [
        (str(bears.id), "alice", "Bears", "gpt-4o"),
        (str(wolves.id), "bob", "Wolves", ""),
    ]
    assert exports[1]["system_prompt"] == "Be brief."
    messages = exports[0]["messages"]
    assert [
        (m["position"], m["role"], m["status"], m["content"], m["error"]) for m in messages
    ] == [
        (1, "user", "complete", "Do bears like honey?", ""),
        (2, "assistant", "complete", "Yes, **very** much.", ""),
        (3, "user", "complete", "And salmon?", ""),
        (4, "assistant", "failed", "", "the provider refused"),
    ]
    assert [(m["usage"], m["attempts"], m["model"]) for m in messages[1::2]] == [
        (USAGE, 1, "gpt-4o"),
        (None, 1, "gpt-4o"),
    ]
    assert all(m["latency_seconds"] >= 0 for m in messages[1::2])
    assert messages[0]["latency_seconds"] is None


def test_it_exports_the_selected_conversations_as_markdown(superuser, alice, bob):
    bears, wolves = bears_and_wolves(alice, bob)
    response = exported(superuser, "export_markdown", [bears, wolves])
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    assert re.fullmatch(
        r'attachment; filename="conversations-\d{8}-\d{6}\.md"', response["Content-Disposition"]
    )
    text = response.content.decode()
    assert_in_order(
        text,
        [
            "# Bears\n",
            f"- Conversation: `{bears.id}`\n- Owner: alice\n- Model: gpt-4o\n",
            "## 1. User · ",
            "\n\nDo bears like honey?\n",
            "## 2. Assistant · complete · gpt-4o · 42 tokens · ",
            "\n\nYes, **very** much.\n",
            "## 3. User · ",
            "## 4. Assistant · failed · gpt-4o · ",
            "_(no content)_\n\n> Error: the provider refused\n",
            "\n---\n\n# Wolves\n",
            "- Owner: bob\n- Model: the default\n",
            "## System prompt\n\nBe brief.\n",
            "\n\nThey do.\n",
        ],
    )
    assert "Not chosen" not in text


# --- Review never disturbs users ----------------------------------------------------------


def admin_pages(client: Client, conversation: Conversation) -> list[str]:
    """Every page of the admin's chat part for this conversation, with each link of the two
    changelists (filters, sorting)."""
    messages = list(conversation.messages.all())
    pages = ["/admin/", "/admin/chat/", f"{CONVERSATIONS}?q=question", f"{MESSAGES}?q=boom"]
    pages += [f"{CONVERSATIONS}{conversation.id}/{page}/" for page in ("change", "history")]
    pages += [f"{CONVERSATIONS}add/"]
    pages += [
        f"{MESSAGES}{message.id}/{page}/" for message in messages for page in ("change", "history")
    ]
    for changelist in (CONVERSATIONS, MESSAGES):
        links = re.findall(r'href="(\?[^"]*)"', client.get(changelist).content.decode())
        pages += [changelist + html.unescape(link) for link in set(links)]
    return pages


def test_it_enqueues_nothing_and_changes_no_message_while_staff_browse_and_export(superuser, alice):
    conversation = conversation_create(owner=alice, title="Under review")
    answered(conversation, "first question", "first answer", usage=USAGE)
    failed(conversation, "second question", "boom")
    message_send(conversation=conversation, content="a question still queued")
    before = list(Message.objects.order_by("position").values())
    pages = admin_pages(superuser, conversation)
    assert len(pages) > 30
    for page in pages:
        assert superuser.get(page).status_code == 200, page
    for action in ("export_json", "export_markdown"):
        exported(superuser, action, [conversation])
    assert list(Message.objects.order_by("position").values()) == before
    queue = redis.Redis.from_url(settings.REDIS_URL)
    try:
        streams = [jobs_stream_key("normal"), jobs_stream_key("high")]
        assert [queue.xlen(stream) for stream in streams] == [0, 0]
        assert queue.exists(jobs_reserved_key()) == 0
    finally:
        queue.close()


# Each page's queries, whatever the number of rows. Every request: the session, the user.
# The conversation list: the owners of the owner filter, the count after the filters and
# search, the count before them, the rows with their activity, the models of the model
# filter. The message list: the two counts, the rows, the models. A transcript: the
# conversation with its activity, its messages, its owner (for the owner field), the content
# type (for its history link). An export: the list's own queries but the rows, the
# conversations with their owners, their messages.
CONVERSATION_LIST_QUERIES = 7
MESSAGE_LIST_QUERIES = 6
TRANSCRIPT_QUERIES = 6
EXPORT_QUERIES = 8


@pytest.mark.parametrize("conversations", [5, 500])
@pytest.mark.parametrize("query", ["", "?replies=failed&q=question"])
def test_it_lists_conversations_in_the_same_queries_however_many_there_are(
    superuser, alice, bob, django_assert_max_num_queries, conversations, query
):
    transcripts_bulk(owners=[alice, bob], conversations=conversations, turns=2)
    with django_assert_max_num_queries(CONVERSATION_LIST_QUERIES):
        response = superuser.get(CONVERSATIONS + query)
    shown = conversations if not query else (conversations + 1) // 2
    assert len(table_rows(response.content.decode())) == min(shown, 100)


@pytest.mark.parametrize("conversations", [5, 500])
def test_it_lists_messages_in_the_same_queries_however_many_there_are(
    superuser, alice, bob, django_assert_max_num_queries, conversations
):
    transcripts_bulk(owners=[alice, bob], conversations=conversations, turns=1)
    with django_assert_max_num_queries(MESSAGE_LIST_QUERIES):
        response = superuser.get(MESSAGES)
    assert len(table_rows(response.content.decode())) == min(2 * conversations, 100)


@pytest.mark.parametrize("turns", [2, 150])
def test_it_shows_a_transcript_in_the_same_queries_however_long_it_is(
    superuser, alice, django_assert_max_num_queries, turns
):
    [conversation] = transcripts_bulk(owners=[alice], conversations=1, turns=turns)
    with django_assert_max_num_queries(TRANSCRIPT_QUERIES):
        response = superuser.get(f"{CONVERSATIONS}{conversation.id}/change/")
    assert len(table_rows(response.content.decode())) == 2 * turns


@pytest.mark.parametrize("conversations", [5, 100])
def test_it_exports_conversations_in_the_same_queries_however_many_there_are(
    superuser, alice, bob, django_assert_max_num_queries, conversations
):
    made = transcripts_bulk(owners=[alice, bob], conversations=conversations, turns=2)
    with django_assert_max_num_queries(EXPORT_QUERIES):
        response = exported(superuser, "export_json", made)
    assert len(json.loads(response.content)["conversations"]) == conversations
