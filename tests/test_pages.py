"""The browser pages as a browser sees them: sign-in, the conversation list, the chat page."""

import re
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

from chat.models import Conversation, Message
from chat.services import conversation_create, message_send, reply_regenerate
from tests.support.transcripts import answered

pytestmark = pytest.mark.django_db(transaction=True)

LOGIN_URL = "/accounts/login/"
LOGOUT_URL = "/accounts/logout/"
LIST_URL = "/"
DEMO_BANNER = "Demo model: answers are canned"
EMPTY_HIDDEN = re.compile(r'<p id="transcript-empty"[^>]*\shidden[\s>]')
STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


def chat_url(conversation_id: object) -> str:
    return f"/c/{conversation_id}/"


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def served(response) -> bytes:
    body = b"".join(response.streaming_content) if response.streaming else response.content
    response.close()
    return body


# --- Signing in and out -----------------------------------------------------------------


def test_it_renders_the_login_page():
    response = Client().get(LOGIN_URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert 'name="username"' in html
    assert 'name="password"' in html
    assert "csrfmiddlewaretoken" in html


def test_it_redirects_a_good_login_to_the_conversation_list(alice):
    client = Client()
    response = client.post(
        LOGIN_URL, {"username": "alice", "password": "alice-password-1"}, follow=True
    )
    assert response.redirect_chain == [(LIST_URL, 302)]
    assert response.status_code == 200
    assert response.context["user"] == alice
    assert "Your conversations" in response.content.decode()


def test_it_redirects_a_good_login_to_the_page_asked_for(alice):
    conversation = conversation_create(owner=alice, title="Where I was")
    response = Client().post(
        LOGIN_URL,
        {"username": "alice", "password": "alice-password-1", "next": chat_url(conversation.id)},
    )
    assert response.status_code == 302
    assert response["Location"] == chat_url(conversation.id)


def test_it_shows_an_error_for_a_bad_login(alice):
    client = Client()
    response = client.post(LOGIN_URL, {"username": "alice", "password": "bob-password-1"})
    assert response.status_code == 200
    html = response.content.decode()
    assert 'class="form-errors" role="alert"' in html
    assert "Please enter a correct username and password" in html
    assert "_auth_user_id" not in client.session
    assert client.get(LIST_URL).status_code == 302


def test_it_logs_out_on_post(alice):
    client = client_for(alice)
    response = client.post(LOGOUT_URL)
    assert response.status_code == 302
    assert response["Location"] == LOGIN_URL
    assert "_auth_user_id" not in client.session
    assert client.get(LIST_URL)["Location"] == f"{LOGIN_URL}?next=/"


def test_it_does_not_log_out_on_get(alice):
    client = client_for(alice)
    assert client.get(LOGOUT_URL).status_code == 405
    assert client.get(LIST_URL).status_code == 200


def test_it_offers_the_logout_button_to_a_signed_in_user(alice):
    html = client_for(alice).get(LIST_URL).content.decode()
    assert f'action="{LOGOUT_URL}"' in html
    assert 'title="Signed in as alice"' in html


# --- Anonymous visitors -----------------------------------------------------------------


def test_it_redirects_an_anonymous_visitor_from_the_list_to_login():
    response = Client().get(LIST_URL)
    assert response.status_code == 302
    assert response["Location"] == f"{LOGIN_URL}?next=/"


def test_it_redirects_an_anonymous_visitor_from_a_chat_page_to_login(alice):
    conversation = conversation_create(owner=alice, title="Private thoughts")
    message_send(conversation=conversation, content="private question")
    response = Client().get(chat_url(conversation.id))
    assert response.status_code == 302
    assert response["Location"] == f"{LOGIN_URL}?next={chat_url(conversation.id)}"
    assert b"private" not in response.content.lower()


def test_it_creates_nothing_for_an_anonymous_post(alice):
    response = Client().post(LIST_URL, {"title": "Sneaky"})
    assert response.status_code == 302
    assert response["Location"].startswith(LOGIN_URL)
    assert not Conversation.objects.exists()


# --- The conversation list --------------------------------------------------------------


def test_it_lists_only_the_users_own_conversations(alice, bob):
    conversation_create(owner=alice, title="Alice plans a picnic")
    conversation_create(owner=bob, title="Bob hides the honey")
    response = client_for(alice).get(LIST_URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert "Alice plans a picnic" in html
    assert "Bob hides the honey" not in html
    assert [c.title for c in response.context["conversations"]] == ["Alice plans a picnic"]


def test_it_links_each_conversation_to_its_chat_page(alice):
    conversation = conversation_create(owner=alice, title="Linked")
    html = client_for(alice).get(LIST_URL).content.decode()
    assert f'href="{chat_url(conversation.id)}"' in html


def test_it_says_so_when_there_is_no_conversation_yet(alice, bob):
    conversation_create(owner=bob, title="Bob's only")
    html = client_for(alice).get(LIST_URL).content.decode()
    assert "No conversations yet" in html


def test_it_creates_a_conversation_and_redirects_to_it(alice):
    response = client_for(alice).post(
        LIST_URL, {"title": "  Bears  ", "system_prompt": "You are a bear."}
    )
    conversation = Conversation.objects.get()
    assert response.status_code == 302
    assert response["Location"] == chat_url(conversation.id)
    assert conversation.owner == alice
    assert conversation.title == "Bears"
    assert conversation.system_prompt == "You are a bear."


def test_it_creates_an_untitled_conversation_from_an_empty_form(alice):
    response = client_for(alice).post(LIST_URL, {})
    conversation = Conversation.objects.get()
    assert response["Location"] == chat_url(conversation.id)
    assert (conversation.title, conversation.system_prompt) == ("", "")


def test_it_refuses_a_title_over_200_characters(alice):
    response = client_for(alice).post(LIST_URL, {"title": "t" * 201, "system_prompt": "Hi"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "Ensure this value has at most 200 characters (it has 201)." in html
    assert "t" * 201 in html  # the form keeps what was typed
    assert not Conversation.objects.exists()


def test_it_accepts_a_title_of_200_characters(alice):
    response = client_for(alice).post(LIST_URL, {"title": "t" * 200})
    assert response.status_code == 302
    assert Conversation.objects.get().title == "t" * 200


def test_it_refuses_a_system_prompt_over_the_message_limit(alice):
    prompt = "p" * (settings.CHAT_MAX_MESSAGE_CHARS + 1)
    response = client_for(alice).post(LIST_URL, {"system_prompt": prompt})
    assert response.status_code == 200
    assert "Ensure this value has at most" in response.content.decode()
    assert not Conversation.objects.exists()


# --- The chat page ----------------------------------------------------------------------


def test_it_renders_the_transcript_in_order(alice):
    conversation = conversation_create(owner=alice, title="Bear facts")
    answered(conversation, "What do bears eat?", "Mostly berries.")
    answered(conversation, "And in winter?", "Nothing, they sleep.")
    response = client_for(alice).get(chat_url(conversation.id))
    assert response.status_code == 200
    html = response.content.decode()
    turns = [
        'data-role="user"',
        "What do bears eat?",
        'data-role="assistant"',
        "Mostly berries.",
        'data-role="user"',
        "And in winter?",
        'data-role="assistant"',
        "Nothing, they sleep.",
    ]
    at = html.index('id="transcript"')
    for turn in turns:
        at = html.find(turn, at + 1)
        assert at != -1, f"{turn!r} missing or out of order"
    assert "Bear facts" in html
    assert EMPTY_HIDDEN.search(html)  # the "No messages yet" line is hidden


def test_it_shows_the_tokens_an_answer_used(alice):
    conversation = conversation_create(owner=alice)
    usage = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    answered(conversation, "Counted?", "Counted.", usage=usage)
    answered(conversation, "And this one?", "Not counted.")  # a provider that sent no usage

    html = client_for(alice).get(chat_url(conversation.id)).content.decode()

    assert html.count('class="msg-usage"') == 1
    assert '<span class="msg-usage" title="12 in, 30 out">42 tokens</span>' in html


def test_it_shows_the_regenerated_reply_in_place_of_the_answer_it_replaced(alice):
    conversation = conversation_create(owner=alice)
    old = answered(conversation, "What do bears eat?", "The replaced answer.")
    sent = reply_regenerate(conversation=conversation, reply_id=old.id)

    html = client_for(alice).get(chat_url(conversation.id)).content.decode()

    assert "The replaced answer." not in html
    assert str(old.id) not in html
    assert f'data-job-id="{sent.reply.job_id}" data-status="queued"' in html
    assert html.count('data-role="assistant"') == 1


def test_it_marks_a_reply_still_queued(alice):
    conversation = conversation_create(owner=alice)
    sent = message_send(conversation=conversation, content="Anyone there?")
    html = client_for(alice).get(chat_url(conversation.id)).content.decode()
    assert f'data-job-id="{sent.reply.job_id}" data-status="queued"' in html
    assert "waiting…" in html


def test_it_shows_an_empty_transcript_prompt_for_a_new_conversation(alice):
    conversation = conversation_create(owner=alice)
    html = client_for(alice).get(chat_url(conversation.id)).content.decode()
    assert "No messages yet" in html
    assert not EMPTY_HIDDEN.search(html)
    assert '<h1 id="chat-title">New chat</h1>' in html


def test_it_escapes_the_html_in_messages(alice):
    conversation = conversation_create(owner=alice, title="<b>bold</b> title")
    answered(conversation, "<script>alert(1)</script>", "<img src=x onerror=alert(2)>")
    html = client_for(alice).get(chat_url(conversation.id)).content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" not in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html
    assert "<img src=x" not in html
    assert "&lt;b&gt;bold&lt;/b&gt; title" in html
    assert "<b>bold</b>" not in html


def test_it_gives_the_script_the_conversation_and_socket_path(alice):
    conversation = conversation_create(owner=alice)
    html = client_for(alice).get(chat_url(conversation.id)).content.decode()
    assert f'data-conversation-id="{conversation.id}"' in html
    assert f'data-ws-path="/ws/chat/{conversation.id}/"' in html
    assert 'src="/static/chat/chat.js"' in html
    assert f'maxlength="{settings.CHAT_MAX_MESSAGE_CHARS}"' in html


def test_it_shows_the_system_prompt_on_the_chat_page(alice):
    conversation = conversation_create(owner=alice, system_prompt="You are a <grizzly> bear.")
    html = client_for(alice).get(chat_url(conversation.id)).content.decode()
    assert "You are a &lt;grizzly&gt; bear." in html


def test_it_returns_404_for_another_users_chat_page(alice, bob):
    conversation = conversation_create(owner=alice, title="Alice's diary")
    message_send(conversation=conversation, content="dear diary")
    response = client_for(bob).get(chat_url(conversation.id))
    assert response.status_code == 404
    assert b"diary" not in response.content


def test_it_returns_404_for_an_unknown_chat_page(alice):
    assert client_for(alice).get(chat_url(uuid.uuid4())).status_code == 404


def test_it_does_not_accept_posts_on_the_chat_page(alice):
    conversation = conversation_create(owner=alice)
    response = client_for(alice).post(chat_url(conversation.id), {"content": "sneaky"})
    assert response.status_code == 405
    assert not Message.objects.exists()


# --- The sidebar and page titles --------------------------------------------------------


def test_it_lists_conversations_in_the_sidebar_newest_first_with_the_current_one_marked(alice):
    older = conversation_create(owner=alice, title="Older")
    current = conversation_create(owner=alice, title="Current")
    newest = conversation_create(owner=alice, title="Newest")
    html = client_for(alice).get(chat_url(current.id)).content.decode()
    sidebar = html[html.index('id="conversation-list"') :]
    assert [sidebar.index(f'data-conversation-id="{c.id}"') for c in (newest, current, older)] == (
        sorted(sidebar.index(f'data-conversation-id="{c.id}"') for c in (newest, current, older))
    )
    assert f'href="{chat_url(current.id)}" aria-current="page"' in html
    assert html.count('aria-current="page"') == 1


def test_it_titles_an_untitled_conversation_with_the_first_words_of_its_first_message(alice):
    conversation = conversation_create(owner=alice)
    answered(
        conversation, "  How   do bears <survive> the long winter months without food?", "Fat."
    )
    answered(conversation, "Later question", "Later answer.")
    html = client_for(alice).get(chat_url(conversation.id)).content.decode()
    title = "How do bears &lt;survive&gt; the long winter months…"
    assert f"<title>{title} · Grizz</title>" in html
    assert f'<span class="conversation-title">{title}</span>' in html
    assert f'<h1 id="chat-title">{title}</h1>' in html


def test_it_titles_a_conversation_without_any_message_new_chat(alice):
    conversation = conversation_create(owner=alice)
    html = client_for(alice).get(chat_url(conversation.id)).content.decode()
    assert "<title>New chat · Grizz</title>" in html
    assert "data-untitled" in html


def test_it_names_the_conversation_in_the_page_title(alice):
    conversation = conversation_create(owner=alice, title="Salmon <season>")
    html = client_for(alice).get(chat_url(conversation.id)).content.decode()
    assert "<title>Salmon &lt;season&gt; · Grizz</title>" in html


def test_it_offers_a_new_chat_button_that_needs_no_form(alice):
    client = client_for(alice)
    html = client.get(LIST_URL).content.decode()
    assert '<button type="submit" id="new-chat"' in html
    response = client.post(LIST_URL, {})
    assert response["Location"] == chat_url(Conversation.objects.get().id)


def test_it_gives_the_page_scripts_the_csrf_token(alice):
    html = client_for(alice).get(LIST_URL).content.decode()
    assert re.search(r'<meta name="csrf-token" content="[^"]{32,}">', html)


def test_it_redirects_favicon_ico_to_the_svg_icon_every_page_links():
    html = Client().get(LOGIN_URL).content.decode()
    assert '<link rel="icon" href="/static/chat/favicon.svg" type="image/svg+xml">' in html
    response = Client().get("/favicon.ico")
    assert response.status_code == 302
    assert response["Location"] == "/static/chat/favicon.svg"
    icon = Client().get("/static/chat/favicon.svg")
    assert icon.status_code == 200
    assert served(icon).startswith(b"<svg")


# --- The demo banner --------------------------------------------------------------------


def test_it_shows_the_demo_banner_without_an_api_key(alice, settings):
    settings.OPENAI_API_KEY = ""
    conversation = conversation_create(owner=alice)
    client = client_for(alice)
    assert DEMO_BANNER in client.get(LIST_URL).content.decode()
    assert DEMO_BANNER in client.get(chat_url(conversation.id)).content.decode()


def test_it_hides_the_demo_banner_with_an_api_key(alice, settings):
    settings.OPENAI_API_KEY = "sk-test-key"
    conversation = conversation_create(owner=alice)
    client = client_for(alice)
    assert DEMO_BANNER not in client.get(LIST_URL).content.decode()
    assert DEMO_BANNER not in client.get(chat_url(conversation.id)).content.decode()


# --- Static files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("chat/chat.js", "text/javascript"),
        ("chat/markdown.js", "text/javascript"),
        ("chat/sidebar.js", "text/javascript"),
        ("chat/style.css", "text/css"),
        ("vendor/marked/marked.umd.js", "text/javascript"),
        ("vendor/dompurify/purify.min.js", "text/javascript"),
        ("vendor/highlight/highlight.min.js", "text/javascript"),
    ],
)
def test_it_serves_the_static_files_from_the_source_tree(path, content_type):
    response = Client().get(f"/static/{path}")
    assert response.status_code == 200
    assert response["Content-Type"].startswith(content_type)
    # Whitenoise's finders serve static/ itself, not an older collectstatic copy.
    assert served(response) == (STATIC_DIR / path).read_bytes()


def test_it_links_the_stylesheet_from_every_page():
    html = Client().get(LOGIN_URL).content.decode()
    assert 'href="/static/chat/style.css"' in html


def test_it_returns_404_for_an_unknown_static_file():
    assert Client().get("/static/chat/missing.js").status_code == 404


def test_it_refuses_a_conversation_form_without_its_csrf_token(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)

    response = client.post("/", {"title": "Forged"})

    assert response.status_code == 403
    assert not Conversation.objects.filter(title="Forged").exists()


def test_it_accepts_the_conversation_form_with_its_csrf_token(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', client.get("/").text)
    assert token is not None

    response = client.post("/", {"title": "Genuine", "csrfmiddlewaretoken": token.group(1)})

    assert response.status_code == 302
    assert Conversation.objects.filter(title="Genuine", owner=alice).exists()


# --- The session an open chat page keeps alive -------------------------------------------

SESSION_REFRESH_URL = "/session/refresh/"


def test_the_chat_page_says_when_to_renew_its_session(alice):
    client = client_for(alice)
    session = client.session
    session.set_expiry(120)  # two minutes left: renew in one
    session.save()
    conversation = conversation_create(owner=alice)

    page = client.get(chat_url(conversation.id)).content.decode()

    assert 'data-session-refresh-ms="60000"' in page
    assert f'data-login-url="{LOGIN_URL}?next=/c/{conversation.id}/"' in page


def test_it_renews_a_signed_in_session_for_another_full_age(alice):
    client = client_for(alice)
    session = client.session
    session.set_expiry(120)
    session.save()

    response = client.post(SESSION_REFRESH_URL)

    assert response.status_code == 200
    assert response.json()["expires_in"] == settings.SESSION_COOKIE_AGE
    assert response.cookies[settings.SESSION_COOKIE_NAME]["max-age"] == settings.SESSION_COOKIE_AGE
    assert client.session.get_expiry_age() == settings.SESSION_COOKIE_AGE


def test_it_refuses_to_renew_a_session_that_is_gone():
    response = Client().post(SESSION_REFRESH_URL)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthenticated"


def test_a_session_renewal_needs_its_csrf_token_and_a_post(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)

    assert client.post(SESSION_REFRESH_URL).status_code == 403
    assert client.get(SESSION_REFRESH_URL).status_code == 405
