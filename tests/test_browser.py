"""The chat page in a real browser: Debian's Chromium, headless, driven by Playwright,
against a live daphne with a real worker and the fake model server.

One browser for the module, a fresh context (cookies, storage) per test. Playwright's sync
API keeps an event loop running on this thread while the browser is open, which Django takes
for an async context; the module lets the ORM run anyway (the ORM is only ever called from
this thread here), and closes the browser at its end, before other modules' async tests.

The suite writes screenshots of the main screens to docs/screenshots/ (see the README).
"""

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.test import Client
from playwright.sync_api import Browser, Page, expect, sync_playwright

from chat.models import Conversation, Message
from chat.services import conversation_create
from tests.conftest import RUN_ID, service_env_for
from tests.support.fake_openai import Behaviour, FakeOpenAI
from tests.support.processes import ServiceProcess, daphne_start, free_port, worker_start
from tests.support.transcripts import answered

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
ANSWER = "#transcript li.msg-assistant"
# Long enough for any step of a page on this shared 2-core machine.
expect.set_options(timeout=20_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            yield browser
            browser.close()
    finally:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


@pytest.fixture(scope="module")
def module_services(
    fake_llm_server: FakeOpenAI, django_db_setup: None
) -> Iterator[tuple[ServiceProcess, ServiceProcess]]:
    """One daphne and one worker for the module: starting them takes seconds a test. Each
    test still starts from an empty database and none of the run's Redis keys."""
    # Two models to choose from in a conversation's settings (fake-model is the default).
    env = {**service_env_for(fake_llm_server), "LLM_MODELS": "fake-model,fake-large"}
    web = daphne_start(env=env, port=free_port())
    worker = worker_start(env=env, name=f"browser-{RUN_ID}")
    yield web, worker
    for process in (web, worker):
        process.stop()


@pytest.fixture
def site(module_services, fake_llm, transactional_db) -> Iterator[str]:
    web, worker = module_services
    yield f"http://127.0.0.1:{web.port}"
    print(f"--- worker output ---\n{worker.output}\n--- daphne output ---\n{web.output}")


class Tab:
    """A page with what it reported: dialogs it opened and script errors it raised."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


@pytest.fixture
def open_tab(browser: Browser, site: str) -> Iterator[Callable[..., Tab]]:
    """A new browser context signed in as `user` (its session cookie), or signed out."""
    contexts = []

    def open_(user=None, *, width: int = 1280, height: int = 820) -> Tab:
        # Reduced motion: no transition or blinking caret half-way in a screenshot.
        context = browser.new_context(
            base_url=site, viewport={"width": width, "height": height}, reduced_motion="reduce"
        )
        contexts.append(context)
        if user is not None:
            client = Client()
            client.force_login(user)
            session = client.cookies[settings.SESSION_COOKIE_NAME].value
            context.add_cookies(
                [{"name": settings.SESSION_COOKIE_NAME, "value": session, "url": site}]
            )
        return Tab(context.new_page())

    yield open_
    for context in contexts:
        context.close()


def chat_page(tab: Tab, conversation: Conversation) -> Page:
    tab.page.goto(f"/c/{conversation.id}/")
    expect(tab.page.locator("#connection-status")).to_have_text("Connected")
    return tab.page


def send(page: Page, text: str) -> None:
    expect(page.locator("#send-button")).to_be_enabled()
    page.fill("#composer-input", text)
    page.press("#composer-input", "Enter")


def answer_text(page: Page) -> str:
    return page.locator(ANSWER).last.locator(".msg-content").inner_text()


def wait_for_answer(page: Page, condition: str) -> str:
    """The last answer's text once `condition` (JS, over `text`) holds for it."""
    handle = page.wait_for_function(
        f"""() => {{
            const items = document.querySelectorAll({ANSWER!r});
            const last = items[items.length - 1];
            const text = last ? last.querySelector(".msg-content").textContent : "";
            return ({condition}) ? text : null;
        }}"""
    )
    return str(handle.json_value())


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def words(n: int, stem: str = "w") -> list[str]:
    return [f" {stem}{i}" for i in range(n)]


MARKDOWN_ANSWER = (
    "Here is a comparison:\n\n"
    "| Bear | Weight |\n| --- | --- |\n| Grizzly | 300 kg |\n| Panda | 100 kg |\n\n"
    "And some code:\n\n"
    "```python\ndef roar(times):\n    return 'roar ' * times\n```\n\n"
    "That is **all**."
)


# --- Signing in and starting a chat ---------------------------------------------------------


def test_it_signs_in_and_opens_a_new_chat_at_once(open_tab, alice):
    tab = open_tab()
    page = tab.page
    page.goto("/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "alice-password-1")
    page.click("button[type=submit]")
    expect(page.get_by_role("heading", name="Your conversations")).to_be_visible()

    page.get_by_role("button", name="+ New chat").click()

    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    expect(page.locator("#transcript-empty")).to_be_visible()
    expect(page.locator("#connection-status")).to_have_text("Connected")
    expect(page).to_have_title("New chat · Grizz")
    current = page.locator(".conversation-item.is-current")
    expect(current).to_have_count(1)
    expect(current.locator("a")).to_have_attribute("aria-current", "page")
    conversation = Conversation.objects.get(owner=alice)
    assert page.url.endswith(f"/c/{conversation.id}/")
    assert tab.errors == []


def test_it_names_the_conversation_after_its_first_message(open_tab, alice, fake_llm):
    conversation = conversation_create(owner=alice)
    page = chat_page(open_tab(alice), conversation)

    send(page, "What do grizzly bears eat in the spring?")

    title = "What do grizzly bears eat in the spring?"
    expect(page.locator(".conversation-item.is-current .conversation-title")).to_have_text(title)
    expect(page.locator("#chat-title")).to_have_text(title)
    expect(page).to_have_title(f"{title} · Grizz")
    # The sidebar changes as the message leaves; the server has it once it is answered.
    expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")
    page.reload()
    expect(page.locator(".conversation-item.is-current .conversation-title")).to_have_text(title)


def test_it_shows_the_title_the_model_writes_without_a_reload(
    open_tab, alice, fake_llm, start_daphne, start_worker
):
    # Processes of its own with titles on, under a Redis key prefix of their own: the
    # module's worker (titles off) never takes this test's job.
    own = {"REDIS_KEY_PREFIX": f"{settings.REDIS_KEY_PREFIX}-titles", "LLM_TITLES": "1"}
    web = start_daphne(**own)
    start_worker("browser-titles", env=own)
    fake_llm.enqueue(
        Behaviour(reply="Mostly grass, roots and winter-killed elk."),
        Behaviour(reply='"Grizzly diet in spring."'),
    )
    conversation = conversation_create(owner=alice)
    page = open_tab(alice).page
    page.goto(f"http://127.0.0.1:{web.port}/c/{conversation.id}/")
    expect(page.locator("#connection-status")).to_have_text("Connected")
    page.evaluate("window.sameDocument = true")

    send(page, "What do grizzly bears eat in the spring?")

    title = "Grizzly diet in spring"
    expect(page.locator(".conversation-item.is-current .conversation-title")).to_have_text(title)
    expect(page.locator("#chat-title")).to_have_text(title)
    expect(page).to_have_title(f"{title} · Grizz")
    assert page.evaluate("window.sameDocument") is True  # no reload
    assert answer_text(page) == "Mostly grass, roots and winter-killed elk."
    page.reload()
    expect(page.locator(".conversation-item.is-current .conversation-title")).to_have_text(title)


# --- Streaming and Markdown ---------------------------------------------------------------


def test_it_grows_the_answer_token_by_token_and_renders_markdown(open_tab, alice, fake_llm):
    fake_llm.default = Behaviour(reply=MARKDOWN_ANSWER, interval=0.06)
    conversation = conversation_create(owner=alice, title="Bears compared")
    tab = open_tab(alice)
    page = chat_page(tab, conversation)

    send(page, "Compare bears, with code")
    early = wait_for_answer(page, "text.includes('Grizzly') && !text.includes('roar')")
    expect(page.locator("#composer-status")).to_have_text("Grizz is writing…")
    expect(page.locator("#send-button")).to_be_disabled()
    later = wait_for_answer(page, "text.includes('def roar') && !text.includes('all')")
    expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")

    assert early != later and len(later) > len(early)
    answer = page.locator(ANSWER).last
    expect(answer.locator("table th")).to_have_text(["Bear", "Weight"])
    expect(answer.locator("table tbody tr")).to_have_count(2)
    code = answer.locator(".code-block pre code")
    expect(code).to_have_class(re.compile(r"\bhljs\b"))
    expect(code.locator(".hljs-keyword").first).to_have_text("def")
    expect(answer.locator(".code-block .copy-code")).to_have_text("Copy")
    expect(answer.locator("strong")).to_have_text("all")
    expect(answer.locator(".copy-answer")).to_be_visible()
    expect(page.locator("#send-button")).to_be_enabled()
    assert "| Bear |" not in answer_text(page)  # no raw Markdown left
    usage = Message.objects.get(conversation=conversation, role="assistant").usage
    assert usage is not None
    expect(answer.locator(".msg-usage")).to_have_text(f"{usage['total_tokens']} tokens")
    screenshot(page, "chat")
    assert tab.errors == []


def test_it_copies_an_answer_and_a_code_block(open_tab, alice, fake_llm):
    conversation = conversation_create(owner=alice)
    answered(conversation, "Code please", "Try this:\n\n```sh\necho hello\n```\n")
    tab = open_tab(alice)
    tab.page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = chat_page(tab, conversation)

    page.locator(".copy-code").click()
    copied_code = page.evaluate("navigator.clipboard.readText()")
    page.locator(".copy-answer").click()
    copied_answer = page.evaluate("navigator.clipboard.readText()")

    assert copied_code.strip() == "echo hello"
    assert copied_answer == "Try this:\n\n```sh\necho hello\n```\n"


def test_it_stops_an_answer_mid_way(open_tab, alice, fake_llm):
    fake_llm.default = Behaviour(tokens=words(50), hold_after=5)
    conversation = conversation_create(owner=alice)
    page = chat_page(open_tab(alice), conversation)

    send(page, "Count slowly")
    wait_for_answer(page, "text.includes('w4')")
    page.get_by_role("button", name="Stop").click()

    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-status", "cancelled")
    expect(answer.locator(".msg-state")).to_have_text("stopped")
    expect(page.locator("#composer-status")).to_have_text(
        "Stopped. The part written so far is kept."
    )
    expect(page.get_by_role("button", name="Stop")).to_be_hidden()
    expect(page.locator("#send-button")).to_be_enabled()
    assert answer_text(page).strip() == "w0 w1 w2 w3 w4"
    reply = Message.objects.get(role="assistant")
    assert (reply.status, reply.content) == ("cancelled", "".join(words(5)))


def test_it_resumes_a_streaming_answer_after_a_reload_without_repeats(open_tab, alice, fake_llm):
    tokens = words(40)
    fake_llm.default = Behaviour(tokens=tokens, hold_after=12)
    conversation = conversation_create(owner=alice)
    page = chat_page(open_tab(alice), conversation)
    send(page, "Count to forty")
    wait_for_answer(page, "text.includes('w11')")

    page.reload()
    # The database has no text of a reply in flight: the socket's resume replays it.
    resumed = wait_for_answer(page, "text.includes('w11')")
    fake_llm.release()
    expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")

    assert resumed.split() == [t.strip() for t in tokens[:12]]
    assert answer_text(page).split() == [t.strip() for t in tokens]


def test_it_shows_a_second_tab_the_same_answer(open_tab, alice, fake_llm):
    fake_llm.default = Behaviour(tokens=words(30, "t"), interval=0.02)
    conversation = conversation_create(owner=alice)
    first = chat_page(open_tab(alice), conversation)
    second = chat_page(open_tab(alice), conversation)

    send(first, "Hello from the first tab")

    for page in (first, second):
        expect(page.locator("#transcript li.msg-user")).to_have_text(
            re.compile("Hello from the first tab")
        )
        expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")
    assert answer_text(first) == answer_text(second)
    assert answer_text(second).split() == [t.strip() for t in words(30, "t")]


def test_it_renders_hostile_markdown_inert(open_tab, alice, fake_llm):
    hostile = (
        'Look: <img src=x onerror="window.pwned = 1; alert(1)">\n\n'
        "<script>window.pwned = 2; alert(2)</script>\n\n"
        '<a href="#" onclick="window.pwned = 3">click me</a>\n\n'
        "[a javascript link](javascript:window.pwned=4) and ![pic](x)\n\n"
        '<p onmouseover="window.pwned = 5">hover</p> the end'
    )
    fake_llm.default = Behaviour(reply=hostile)
    conversation = conversation_create(owner=alice)
    tab = open_tab(alice)
    page = chat_page(tab, conversation)

    send(page, "Be nasty")
    answer = page.locator(ANSWER).last
    expect(answer).to_have_attribute("data-status", "complete")
    _assert_inert(tab, answer)
    page.reload()  # the server-rendered transcript goes through the same rendering
    answer = page.locator(ANSWER).last
    expect(answer.locator(".msg-content")).to_contain_text("the end")
    _assert_inert(tab, answer)


def _assert_inert(tab: Tab, answer) -> None:
    page = tab.page
    content = answer.locator(".msg-content")
    expect(content).to_contain_text("<script>window.pwned = 2")  # shown, as text
    assert content.locator("img, script, [onclick], [onerror], [onmouseover]").count() == 0
    link = content.get_by_text("a javascript link")
    assert link.get_attribute("href") is None
    link.click()
    content.get_by_text("click me").click()
    content.get_by_text("hover").hover()
    assert page.evaluate("window.pwned") is None
    assert tab.dialogs == []


# --- Composer states and errors -----------------------------------------------------------


def test_it_shows_a_failed_answer_inline_with_a_retry(open_tab, alice, fake_llm):
    fake_llm.enqueue(Behaviour(status=400, error_message="Model says no."))
    fake_llm.default = Behaviour(reply="Second time lucky.")
    conversation = conversation_create(owner=alice)
    page = chat_page(open_tab(alice), conversation)

    send(page, "Try me")
    failed = page.locator(ANSWER).last
    expect(failed).to_have_attribute("data-status", "failed")
    expect(failed.locator(".msg-error")).to_contain_text("Model says no.")
    expect(page.locator("#composer-status")).to_have_text("The reply failed.")
    failed.get_by_role("button", name="Retry").click()

    expect(page.locator(ANSWER)).to_have_count(2)
    expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")
    assert answer_text(page) == "Second time lucky."
    assert [m["content"] for m in fake_llm.requests[1]["messages"] if m["role"] == "user"] == [
        "Try me",
        "Try me",
    ]


def test_it_regenerates_the_last_answer_in_place(open_tab, alice, fake_llm):
    regenerated = words(20, "r")
    fake_llm.enqueue(
        Behaviour(reply="The first answer."), Behaviour(tokens=regenerated, hold_after=5)
    )
    conversation = conversation_create(owner=alice)
    answered(conversation, "An earlier question", "An earlier answer.")
    tab = open_tab(alice)
    page = chat_page(tab, conversation)
    other_tab = chat_page(open_tab(alice), conversation)
    send(page, "Tell me something")
    expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")

    button = page.get_by_role("button", name="Regenerate answer")
    expect(button).to_have_count(1)  # on the last answer alone
    expect(
        page.locator(ANSWER).last.get_by_role("button", name="Regenerate answer")
    ).to_be_enabled()
    button.focus()
    page.keyboard.press("Enter")

    wait_for_answer(page, "text.includes('r4')")
    expect(page.get_by_role("button", name="Regenerate answer")).to_have_count(0)
    expect(page.locator("#composer-input")).to_be_focused()  # not lost with the old answer
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(page.locator("#send-button")).to_be_disabled()
    fake_llm.release()
    expected = [t.strip() for t in regenerated]
    for shown in (page, other_tab):
        expect(shown.locator(ANSWER)).to_have_count(2)
        expect(shown.locator(ANSWER).last).to_have_attribute("data-status", "complete")
        assert answer_text(shown).split() == expected
        expect(shown.get_by_text("The first answer.")).to_have_count(0)
    expect(page.get_by_role("button", name="Regenerate answer")).to_be_enabled()
    page.reload()
    expect(page.locator(ANSWER)).to_have_count(2)
    assert answer_text(page).split() == expected
    expect(page.get_by_text("The first answer.")).to_have_count(0)
    assert fake_llm.requests[1]["messages"] == [
        {"role": "user", "content": "An earlier question"},
        {"role": "assistant", "content": "An earlier answer."},
        {"role": "user", "content": "Tell me something"},
    ]
    assert tab.errors == []


def test_it_gives_a_rate_limited_message_back_with_the_wait(
    open_tab, alice, fake_llm, start_daphne
):
    daphne = start_daphne(CHAT_RATE_LIMIT="1/min")
    conversation = conversation_create(owner=alice)
    tab = open_tab(alice)
    page = tab.page
    page.goto(f"http://127.0.0.1:{daphne.port}/c/{conversation.id}/")
    send(page, "First")
    expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")

    send(page, "Second, too soon")

    notice = page.locator("#notice")
    expect(notice).to_contain_text(re.compile(r"Try again in \d+ s\."))
    expect(notice.get_by_role("button", name="Retry")).to_be_disabled()
    expect(page.locator("#composer-input")).to_have_value("Second, too soon")
    expect(page.locator("#transcript li.msg-user")).to_have_count(1)


def test_it_shows_a_banner_while_disconnected_and_resumes_the_answer(
    open_tab, alice, fake_llm, start_daphne, service_env
):
    fake_llm.default = Behaviour(tokens=words(30), hold_after=10)
    first = start_daphne()
    conversation = conversation_create(owner=alice)
    page = open_tab(alice).page
    page.goto(f"http://127.0.0.1:{first.port}/c/{conversation.id}/")
    send(page, "Keep going")
    wait_for_answer(page, "text.includes('w9')")

    first.kill()
    banner = page.locator("#connection-banner")
    expect(banner).to_contain_text("Connection lost. Reconnecting in")
    again = daphne_start(env=service_env, port=first.port)
    try:
        expect(banner).to_be_hidden()
        fake_llm.release()
        expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")
        assert answer_text(page).split() == [t.strip() for t in words(30)]
    finally:
        again.stop()


# --- The sidebar ------------------------------------------------------------------------


def test_it_renames_deletes_and_searches_in_the_sidebar(open_tab, alice, bob, fake_llm):
    picnic = conversation_create(owner=alice, title="Picnic plans")
    conversation_create(owner=alice, title="Honey recipes")
    untitled = conversation_create(owner=alice)
    answered(untitled, "Where do salmon swim in autumn and why do bears care?", "Upstream.")
    conversation_create(owner=bob, title="Bob's secret")
    current = conversation_create(owner=alice, title="Today")
    page = chat_page(open_tab(alice), current)
    titles = page.locator("#conversation-list .conversation-title")

    expect(titles).to_have_text(
        ["Today", "Where do salmon swim in autumn and why…", "Honey recipes", "Picnic plans"]
    )
    expect(page.locator("#conversation-search-empty")).to_be_hidden()
    page.fill("#conversation-search", "HONEY")
    expect(page.locator("#conversation-list .conversation-item:visible")).to_have_count(1)
    expect(page.locator(".conversation-item:visible .conversation-title")).to_have_text(
        "Honey recipes"
    )
    page.fill("#conversation-search", "nothing like it")
    expect(page.locator("#conversation-search-empty")).to_have_text("No title matches.")
    page.fill("#conversation-search", "")
    expect(page.locator("#conversation-list .conversation-item:visible")).to_have_count(4)
    screenshot(page, "sidebar")

    page.get_by_role("button", name="Rename Picnic plans").click()
    page.get_by_label("New title").fill("Picnic by the river")
    page.get_by_label("New title").press("Enter")
    expect(titles.nth(3)).to_have_text("Picnic by the river")
    page.get_by_role("button", name="Rename Today").click()
    page.get_by_label("New title").fill("Today's bears")
    page.get_by_label("New title").press("Enter")
    expect(page.locator("#chat-title")).to_have_text("Today's bears")
    expect(page).to_have_title("Today's bears · Grizz")

    page.get_by_role("button", name="Delete Honey recipes").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Honey recipes and all its messages will be deleted")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    expect(titles).to_have_count(4)
    page.get_by_role("button", name="Delete Honey recipes").click()
    dialog.get_by_role("button", name="Delete").click()
    expect(titles).to_have_count(3)

    page.reload()
    expect(titles).to_have_text(
        ["Today's bears", "Where do salmon swim in autumn and why…", "Picnic by the river"]
    )
    assert Conversation.objects.get(id=picnic.id).title == "Picnic by the river"
    assert not Conversation.objects.filter(title="Honey recipes").exists()


def test_it_goes_home_after_deleting_the_open_conversation(open_tab, alice, fake_llm):
    current = conversation_create(owner=alice, title="Doomed")
    page = chat_page(open_tab(alice), current)

    page.get_by_role("button", name="Delete Doomed").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()

    expect(page).to_have_url(re.compile(r"/$"))
    expect(page.locator("#conversation-search-empty")).to_have_text("No conversations yet.")
    assert not Conversation.objects.exists()


def test_it_collapses_the_sidebar_at_phone_width(open_tab, alice, fake_llm):
    conversation = conversation_create(owner=alice, title="On the go")
    answered(conversation, "Is a table readable here?", MARKDOWN_ANSWER)
    page = chat_page(open_tab(alice, width=390, height=844), conversation)
    sidebar = page.locator("#sidebar")
    toggle = page.get_by_role("button", name="Conversations")

    expect(sidebar).to_be_hidden()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(page.locator("#composer-input")).to_be_visible()
    screenshot(page, "phone")
    toggle.click()
    expect(sidebar).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    expect(page.locator("#conversation-search")).to_be_focused()
    screenshot(page, "phone-sidebar")
    page.keyboard.press("Escape")
    expect(sidebar).to_be_hidden()
    expect(toggle).to_be_focused()


def test_it_can_be_used_by_keyboard_alone(open_tab, alice, fake_llm):
    fake_llm.default = Behaviour(reply="By keyboard.")
    conversation = conversation_create(owner=alice, title="Keys")
    page = chat_page(open_tab(alice), conversation)
    order = []
    for _ in range(12):
        page.keyboard.press("Tab")
        order.append(
            page.evaluate(
                "(() => { const e = document.activeElement;"
                " return e.id || e.getAttribute('aria-label') || e.textContent.trim(); })()"
            )
        )
        if order[-1] == "composer-input":
            break

    assert order.index("new-chat") < order.index("conversation-search")
    assert order.index("conversation-search") < order.index("Rename Keys")
    assert order[-1] == "composer-input"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
    page.keyboard.type("Hello")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("again")
    expect(page.locator("#composer-input")).to_have_value("Hello\nagain")
    page.keyboard.press("Enter")
    expect(page.locator("#transcript li.msg-user")).to_have_text(re.compile("Hello\nagain"))
    expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")


# --- A conversation's settings ----------------------------------------------------------


def test_it_answers_with_the_model_and_system_prompt_chosen_in_the_settings(
    open_tab, alice, fake_llm
):
    fake_llm.default = Behaviour(reply="Grr, hello.")
    conversation = conversation_create(owner=alice, title="Bear talk")
    tab = open_tab(alice)
    page = chat_page(tab, conversation)
    button = page.get_by_role("button", name="Settings", exact=True)
    panel = page.get_by_role("dialog", name="Conversation settings")

    button.click()
    expect(panel).to_be_visible()
    expect(panel.get_by_label("Model")).to_be_focused()
    panel.get_by_label("System prompt").fill("Forgotten on Escape.")
    page.keyboard.press("Escape")
    expect(panel).to_be_hidden()
    expect(button).to_be_focused()
    page.keyboard.press("Enter")
    expect(panel.get_by_label("System prompt")).to_have_value("")
    panel.get_by_label("Model").select_option("fake-large")
    panel.get_by_label("System prompt").fill("You are a grizzly bear.")
    screenshot(page, "settings")
    panel.get_by_role("button", name="Save").click()
    expect(panel).to_be_hidden()
    expect(button).to_be_focused()
    expect(page.locator("#system-prompt")).to_contain_text("You are a grizzly bear.")
    send(page, "Who are you?")
    expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete")

    request = fake_llm.requests[-1]
    assert request["model"] == "fake-large"
    assert request["messages"][0] == {"role": "system", "content": "You are a grizzly bear."}
    page.reload()
    button.click()
    expect(panel.get_by_label("Model")).to_have_value("fake-large")
    expect(panel.get_by_label("System prompt")).to_have_value("You are a grizzly bear.")
    panel.get_by_role("button", name="Cancel").click()
    expect(button).to_be_focused()
    assert tab.errors == []


def test_it_fits_the_settings_panel_in_a_phone_screen_and_says_what_it_refused(
    open_tab, alice, fake_llm
):
    conversation = conversation_create(owner=alice, title="Small screen")
    page = chat_page(open_tab(alice, width=390, height=844), conversation)
    page.get_by_role("button", name="Settings", exact=True).click()
    panel = page.get_by_role("dialog", name="Conversation settings")
    expect(panel).to_be_visible()

    box = panel.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    # A model the server no longer offers (the page is older than the configuration).
    panel.get_by_label("Model").evaluate(
        "select => { select.add(new Option('gpt-9', 'gpt-9')); select.value = 'gpt-9'; }"
    )
    panel.get_by_role("button", name="Save").click()
    expect(panel.get_by_role("alert")).to_contain_text("'gpt-9' is not offered here")
    expect(panel).to_be_visible()
    assert Conversation.objects.get(id=conversation.id).model == ""


# --- Rendering cost -----------------------------------------------------------------------


def test_it_renders_a_4000_token_answer_cheaply(open_tab, alice, fake_llm, capsys):
    paragraph = [*words(36, "tok"), "\n\n"]
    tokens = (paragraph * 110)[:4000]
    fake_llm.default = Behaviour(tokens=tokens, interval=0.0005)
    conversation = conversation_create(owner=alice)
    page = chat_page(open_tab(alice), conversation)
    page.evaluate("Object.assign(GrizzMarkdown.stats, {renders: 0, ms: 0, maxMs: 0})")

    send(page, "A long one")
    expect(page.locator(ANSWER).last).to_have_attribute("data-status", "complete", timeout=60_000)
    live = page.evaluate("({...GrizzMarkdown.stats})")
    # In the page: the worst case, a render after every one of the 4,000 tokens, and what the
    # last 200 of those cost against 200 whole parses of the answer at its full length.
    measured = page.evaluate(
        """(tokens) => {
            const box = document.createElement("div");
            const stream = new GrizzMarkdown.StreamRenderer(box);
            const split = tokens.length - 200;
            let started = performance.now();
            let lastRenders = 0;
            tokens.forEach((token, index) => {
                if (index === split) { lastRenders = performance.now(); }
                stream.append(token); stream.schedule(); stream.flush();
            });
            const ended = performance.now();
            const text = tokens.join("");
            const wholeStarted = performance.now();
            for (let i = 0; i < 200; i++) { GrizzMarkdown.render(text); }
            return {
                perToken: ended - started,
                last200: ended - lastRenders,
                whole200: performance.now() - wholeStarted,
                blocks: box.children.length,
            };
        }""",
        tokens,
    )

    with capsys.disabled():
        print(
            f"\n4,000-token answer streamed: {live['renders']} renders, {live['ms']:.0f} ms"
            f" rendering in all, the longest {live['maxMs']:.1f} ms. A render per token:"
            f" {measured['perToken']:.0f} ms for 4,000 tokens, the last 200 renders"
            f" {measured['last200']:.1f} ms, against {measured['whole200']:.0f} ms for 200"
            f" whole parses of the full answer"
        )
    assert len(answer_text(page).split()) == sum(1 for token in tokens if token.strip())
    # A render costs the same at the end of a long answer as at its start (compared within
    # the run: a wall-clock bound on one render fails on a busy machine; the figures above
    # are printed for the record, and speed targets belong to the bench).
    assert measured["last200"] * 5 < measured["whole200"]
    assert measured["blocks"] > 100  # finished paragraphs were kept, not re-rendered


# --- The session ------------------------------------------------------------------------


def _session_expiry_left(tab: Tab, seconds: int) -> str:
    """Shorten the tab's session to `seconds` from now; its key."""
    key = next(c["value"] for c in tab.page.context.cookies() if c["name"] == "sessionid")
    session = SessionStore(session_key=key)
    session.set_expiry(seconds)
    session.save()
    return key


def test_an_open_page_renews_its_session_before_it_lapses(open_tab, alice, fake_llm):
    fake_llm.default = Behaviour(reply="Still here.")
    conversation = conversation_create(owner=alice)
    tab = open_tab(alice)
    key = _session_expiry_left(tab, 4)

    with tab.page.expect_response("**/session/refresh/") as renewal:
        chat_page(tab, conversation)  # renews at half the 4 s left

    assert renewal.value.status == 200
    assert SessionStore(session_key=key).get_expiry_age() > 3600
    # Past the 4 s the session had: still signed in, without a reload.
    expect(tab.page.locator("#connection-status")).to_have_text("Connected")
    send(tab.page, "Are you there?")
    expect(tab.page.locator(ANSWER).last).to_have_attribute("data-status", "complete")
    assert answer_text(tab.page) == "Still here."


def test_a_signed_out_page_says_so_and_offers_to_sign_in(
    open_tab, alice, fake_llm, start_daphne, service_env
):
    first = start_daphne()
    conversation = conversation_create(owner=alice)
    page = open_tab(alice).page
    page.goto(f"http://127.0.0.1:{first.port}/c/{conversation.id}/")
    expect(page.locator("#connection-status")).to_have_text("Connected")

    Session.objects.all().delete()  # signed out elsewhere, or the session expired
    first.kill()
    again = daphne_start(env=service_env, port=first.port)
    try:
        expect(page.locator("#connection-status")).to_have_text("Signed out")
        expect(page.locator("#notice")).to_contain_text("You have been signed out.")
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(re.compile(rf"/accounts/login/\?next=/c/{conversation.id}/$"))
    finally:
        again.stop()


def test_it_links_a_favicon_and_names_pages(open_tab, alice, fake_llm):
    conversation = conversation_create(owner=alice, title="Named")
    page = chat_page(open_tab(alice), conversation)

    expect(page).to_have_title("Named · Grizz")
    icon = page.locator("link[rel=icon]").get_attribute("href")
    assert icon == "/static/chat/favicon.svg"
    assert page.request.get(icon).status == 200
    response = page.request.get("/favicon.ico")  # followed to the icon
    assert (response.status, response.url.endswith(icon)) == (200, True)


def test_it_shows_staff_the_transcript_in_the_admin(open_tab, alice, fake_llm):
    conversation = conversation_create(owner=alice, title="Reviewed")
    answered(conversation, "What do bears eat?", "Mostly berries.")
    usage = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    answered(conversation, "And in winter?", "Nothing, they sleep.", usage=usage)
    staff = User.objects.create_superuser("carol", "carol@example.com", None)
    tab = open_tab(staff)

    tab.page.goto(f"/admin/chat/conversation/{conversation.id}/change/")

    transcript = tab.page.locator("#messages-group")
    expect(transcript.locator("td.field-content")).to_have_text(
        ["What do bears eat?", "Mostly berries.", "And in winter?", "Nothing, they sleep."]
    )
    expect(transcript.locator("td.field-status")).to_have_text(["Complete"] * 4)
    expect(transcript.locator("td.field-tokens").last).to_have_text("42 (12 in, 30 out)")
    expect(transcript.locator("textarea, input[type=text]")).to_have_count(0)  # read-only
    transcript.scroll_into_view_if_needed()
    screenshot(tab.page, "admin")
    assert tab.errors == []
