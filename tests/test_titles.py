"""Conversation titles: after a conversation's first answer a real worker asks the fake
model for a title, saves it unless the user named the conversation meanwhile, and every
socket on the conversation gets it; when it cannot have one, the first words stay."""

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from chat.models import Conversation, Message
from chat.services import conversation_create
from chat.sidebar import sidebar_conversations, title_from_message
from llmworker.breaker import breaker_for
from llmworker.providers import OpenAIProvider
from llmworker.titles import MAX_TOKENS, FirstAnswer, TitleWriter, title_clean
from tests.support.fake_openai import Behaviour
from tests.support.metrics import scrape
from tests.support.processes import ServiceProcess, free_port
from tests.support.sockets import ChatSocket, chat_opened

pytestmark = pytest.mark.django_db(transaction=True)

QUESTION = "Why does the quick brown fox jump over the lazy dog every single time?"
REPLY = "Because the sentence uses every letter of the alphabet."
TITLES_ON = {"LLM_TITLES": "1", "LLM_TITLE_TIMEOUT_SECONDS": "1"}


async def _worker(start_worker: Any, **env: str) -> ServiceProcess:
    process: ServiceProcess = await asyncio.to_thread(
        start_worker, "titles", env={**TITLES_ON, **env}
    )
    return process


async def _untitled(owner: User) -> Conversation:
    return await sync_to_async(conversation_create)(owner=owner)


async def _asked(socket: ChatSocket, content: str = QUESTION) -> list[dict[str, Any]]:
    """Send a message; the frames up to its reply's done."""
    await socket.send({"type": "message", "content": content})
    return await socket.receive_until("done")


async def _sidebar_title(owner: User, conversation: Conversation) -> str:
    entries = await sync_to_async(sidebar_conversations)(owner=owner)
    return next(entry.title for entry in entries if entry.id == str(conversation.id))


@pytest.mark.asyncio
async def test_it_titles_the_conversation_after_its_first_answer(
    alice, fake_llm, service_env, start_worker
):
    metrics_port = free_port()
    fake_llm.enqueue(Behaviour(reply=REPLY), Behaviour(reply='"The fox and the alphabet."\n'))
    worker = await _worker(start_worker, LLM_WORKER_METRICS_PORT=str(metrics_port))
    conversation = await _untitled(alice)
    tab = await chat_opened(alice, conversation.id)
    other_tab = await chat_opened(alice, conversation.id)

    frames = [*await _asked(tab), *await tab.receive_until("title")]
    worker.wait_for_line("titled by the model")

    queued, done, title = frames[0], frames[-2], frames[-1]
    assert (done["type"], done["status"], done["content"]) == ("done", "complete", REPLY)
    expected = {
        "type": "title",
        "conversation_id": str(conversation.id),
        "title": "The fox and the alphabet",
    }
    assert title == expected
    assert (await other_tab.receive_until("title"))[-1] == expected
    await conversation.arefresh_from_db()
    assert conversation.title == "The fox and the alphabet"
    assert await _sidebar_title(alice, conversation) == "The fox and the alphabet"
    # Not activity: the sidebar's order stays as the message left it.
    message = await Message.objects.aget(id=queued["message_id"])
    assert conversation.updated_at == message.created_at
    request = fake_llm.requests[1]
    assert request.get("stream") is not True
    assert request["max_tokens"] == MAX_TOKENS
    assert request["model"] == "fake-model"
    assert request["messages"][0]["role"] == "system"
    assert QUESTION in request["messages"][1]["content"]
    assert REPLY in request["messages"][1]["content"]
    titles = await asyncio.to_thread(scrape, f"http://127.0.0.1:{metrics_port}/metrics")
    assert titles.value("grizz_titles_total", outcome="generated") == 1
    assert titles.value("grizz_titles_total", outcome="fallback") == 0
    for socket in (tab, other_tab):
        await socket.close()


@pytest.mark.asyncio
async def test_it_keeps_the_name_a_user_gives_meanwhile(alice, fake_llm, start_worker):
    fake_llm.enqueue(Behaviour(reply=REPLY), Behaviour(reply="Model's title", hold_after=0))
    worker = await _worker(start_worker)
    conversation = await _untitled(alice)
    tab = await chat_opened(alice, conversation.id)

    await _asked(tab)
    await asyncio.to_thread(fake_llm.wait_for_requests, 2)  # the title's, held
    api = APIClient()
    api.force_authenticate(alice)
    renamed = await sync_to_async(api.patch)(
        f"/api/conversations/{conversation.id}/", {"title": "Fox facts"}, format="json"
    )
    fake_llm.release()
    worker.wait_for_line("named by its user meanwhile")

    assert renamed.status_code == 200
    await conversation.arefresh_from_db()
    assert conversation.title == "Fox facts"
    assert await tab.nothing_received()  # no title frame
    await tab.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "title_answer",
    [
        Behaviour(status=500),
        Behaviour(status=400, error_message="max_tokens is not supported"),
        Behaviour(hang=True),  # past LLM_TITLE_TIMEOUT_SECONDS
        Behaviour(reply=' "" \n\n'),
    ],
    ids=["server_error", "refused", "timeout", "nothing_usable"],
)
async def test_it_keeps_the_first_words_when_the_model_gives_no_title(
    alice, fake_llm, start_worker, title_answer
):
    fake_llm.enqueue(Behaviour(reply=REPLY), title_answer)
    worker = await _worker(start_worker)
    conversation = await _untitled(alice)
    tab = await chat_opened(alice, conversation.id)

    frames = await _asked(tab)
    worker.wait_for_line("no title .*; it keeps the first words of its first message")

    done = frames[-1]
    assert (done["status"], done["content"]) == ("complete", REPLY)
    reply = await Message.objects.aget(id=done["reply_id"])
    assert (reply.status, reply.content) == ("complete", REPLY)
    await conversation.arefresh_from_db()
    assert conversation.title == ""
    assert await _sidebar_title(alice, conversation) == title_from_message(QUESTION)
    assert await tab.nothing_received()
    await tab.close()


@pytest.mark.asyncio
async def test_it_asks_for_one_title_per_untitled_conversation(
    alice, conversation, fake_llm, start_worker
):
    fake_llm.enqueue(
        Behaviour(reply=REPLY), Behaviour(reply="Fox title"), Behaviour(reply="Second answer.")
    )
    worker = await _worker(start_worker)
    untitled = await chat_opened(alice, (await _untitled(alice)).id)
    titled = await chat_opened(alice, conversation.id)  # "Alice's chat"

    await _asked(untitled)
    await untitled.receive_until("title")
    await _asked(untitled, "And a second question?")
    await _asked(titled)
    # Stopping lets a title under way finish: after the exit, every request has arrived.
    await asyncio.to_thread(worker.stop)

    streamed = [request.get("stream") is True for request in fake_llm.requests]
    assert streamed == [True, False, True, True]
    await conversation.arefresh_from_db()
    assert conversation.title == "Alice's chat"
    for socket in (untitled, titled):
        await socket.close()


@pytest.mark.asyncio
async def test_it_asks_the_demo_model_for_no_title(alice, fake_llm, start_worker):
    worker = await _worker(start_worker, OPENAI_API_KEY="")
    conversation = await _untitled(alice)
    tab = await chat_opened(alice, conversation.id)

    done = (await _asked(tab))[-1]
    await asyncio.to_thread(worker.stop)

    assert done["status"] == "complete"
    assert done["content"].startswith("[Demo model]")
    assert fake_llm.requests == []
    await conversation.arefresh_from_db()
    assert conversation.title == ""
    assert await _sidebar_title(alice, conversation) == title_from_message(QUESTION)
    await tab.close()


@pytest.mark.asyncio
async def test_it_asks_for_no_title_while_the_providers_circuit_is_open(alice, fake_llm, settings):
    conversation = await _untitled(alice)
    provider = OpenAIProvider(api_key="test-key", base_url=fake_llm.base_url, timeout=5)
    breaker = breaker_for(provider.base_url)
    for _ in range(settings.LLM_BREAKER_FAILURES):
        permit = breaker.admit()
        assert permit is not None
        permit.failed()
    writer = TitleWriter(provider=provider)

    writer.write(
        FirstAnswer(
            conversation_id=str(conversation.id),
            model="fake-model",
            question=QUESTION,
            answer=REPLY,
        )
    )
    await writer.aclose()
    await provider.aclose()

    assert breaker.state() == "open"
    assert fake_llm.requests == []
    await conversation.arefresh_from_db()
    assert conversation.title == ""


@pytest.mark.parametrize(
    ("answer", "title"),
    [
        ("Fox facts", "Fox facts"),
        ('"The Fox and the Dog."', "The Fox and the Dog"),
        ("Title: **Pangrams explained**", "Pangrams explained"),
        ("# Pangrams\n\nThis title says it all.", "Pangrams"),
        ("\n\n  \u201cLe renard\u201d.  \n", "Le renard"),
        ("C# in   ten\twords", "C# in ten words"),
        (
            "A title that goes on and on about foxes and dogs and letters of the alphabet",
            "A title that goes on and on about foxes and dogs and\u2026",
        ),
        ('  ""  ', ""),
        ("", ""),
    ],
)
def test_it_cleans_the_models_answer_into_a_title(answer: str, title: str) -> None:
    assert title_clean(answer) == title
