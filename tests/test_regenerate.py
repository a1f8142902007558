"""Regenerating the last answer over the socket: the `regenerate` frame, its refusals, what
the other tabs on the conversation see, and the prompt the model then receives."""

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async

from chat.models import Conversation, Message
from chat.services import conversation_create
from tests.support.fake_openai import Behaviour
from tests.support.sockets import ChatSocket, chat_opened, message_queued
from tests.support.transcripts import answered

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def _answered(conversation: Conversation, question: str, answer: str) -> Message:
    return await sync_to_async(answered)(conversation, question, answer)


async def _regenerate(socket: ChatSocket, reply_id: object) -> dict[str, Any]:
    await socket.send({"type": "regenerate", "reply_id": str(reply_id)})
    return await socket.receive()


async def _answer_to_own_frame(socket: ChatSocket) -> dict[str, Any]:
    """The answer to the socket's frame, past the announcement of another tab's turn."""
    while (frame := await socket.receive())["type"] == "regenerated":
        pass
    return frame


async def test_it_queues_a_new_reply_in_place_of_the_last_answer(alice, conversation):
    old = await _answered(conversation, "What do bears eat?", "Mostly berries.")
    socket = await chat_opened(alice, conversation.id)
    other_tab = await chat_opened(alice, conversation.id)

    queued = await _regenerate(socket, old.id)
    announced = await other_tab.receive()

    new = await Message.objects.aget(id=queued["reply_id"])
    question = await Message.objects.aget(conversation=conversation, role="user")
    assert queued == {
        "type": "queued",
        "job_id": str(new.job_id),
        "message_id": str(question.id),
        "reply_id": str(new.id),
        "superseded_reply_id": str(old.id),
    }
    assert announced == {**queued, "type": "regenerated"}
    assert (new.role, new.status, new.position) == ("assistant", "queued", 3)
    kept = await Message.objects.aget(id=old.id)
    assert (kept.content, kept.status, kept.superseded) == ("Mostly berries.", "complete", True)
    assert await socket.nothing_received()  # not told of its own regenerate
    for tab in (socket, other_tab):
        await tab.close()


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "regenerate"},
        {"type": "regenerate", "reply_id": "nope"},
        {"type": "regenerate", "reply_id": 7},
    ],
)
async def test_it_answers_invalid_to_a_regenerate_without_a_reply_id(alice, conversation, frame):
    await _answered(conversation, "Hello", "Hi.")
    socket = await chat_opened(alice, conversation.id)

    await socket.send(frame)

    assert await socket.receive() == {
        "type": "error",
        "code": "invalid",
        "message": "regenerate needs a reply_id.",
    }
    assert await Message.objects.acount() == 2
    await socket.close()


async def test_it_answers_invalid_to_a_regenerate_of_an_earlier_answer(alice, conversation):
    first = await _answered(conversation, "One?", "One.")
    await _answered(conversation, "Two?", "Two.")
    socket = await chat_opened(alice, conversation.id)

    error = await _regenerate(socket, first.id)

    assert (error["code"], error["message"]) == (
        "invalid",
        "Only the last answer can be regenerated.",
    )
    assert not await Message.objects.filter(superseded_at__isnull=False).aexists()
    await socket.close()


async def test_it_answers_invalid_to_a_regenerate_of_another_users_answer(alice, bob, conversation):
    await _answered(conversation, "Mine?", "Alice's.")
    bobs_conversation = await sync_to_async(conversation_create)(owner=bob)
    bobs = await _answered(bobs_conversation, "Yours?", "Bob's.")
    socket = await chat_opened(alice, conversation.id)

    error = await _regenerate(socket, bobs.id)

    assert (error["code"], error["message"]) == ("invalid", "No such reply in this conversation.")
    assert not (await Message.objects.aget(id=bobs.id)).superseded
    await socket.close()


async def test_it_answers_busy_to_a_regenerate_while_a_reply_is_in_flight(alice, conversation):
    old = await _answered(conversation, "One?", "One.")
    socket = await chat_opened(alice, conversation.id)
    await message_queued(socket, "Two?")

    error = await _regenerate(socket, old.id)

    assert error["code"] == "busy"
    assert await Message.objects.acount() == 4
    await socket.close()


async def test_it_queues_one_of_two_regenerates_sent_at_once(alice, conversation):
    old = await _answered(conversation, "Hello", "Hi.")
    tabs = [await chat_opened(alice, conversation.id) for _ in range(2)]

    for tab in tabs:
        await tab.send({"type": "regenerate", "reply_id": str(old.id)})
    answers = await asyncio.gather(*(_answer_to_own_frame(tab) for tab in tabs))

    kinds = sorted(answer["type"] for answer in answers)
    assert kinds == ["error", "queued"]
    [refusal] = [answer for answer in answers if answer["type"] == "error"]
    assert refusal["code"] in ("busy", "invalid")
    assert await Message.objects.filter(role="assistant").acount() == 2
    for tab in tabs:
        await tab.close()


async def test_it_stops_a_regenerated_reply_like_any_other(alice, conversation):
    old = await _answered(conversation, "Hello", "Hi.")
    socket = await chat_opened(alice, conversation.id)
    queued = await _regenerate(socket, old.id)

    await socket.send({"type": "cancel", "job_id": queued["job_id"]})
    done = await socket.receive()

    assert (done["type"], done["job_id"], done["status"]) == ("done", queued["job_id"], "cancelled")
    assert (await Message.objects.aget(id=old.id)).superseded
    await socket.close()


async def test_the_model_receives_the_prompt_without_the_old_answer(alice, fake_llm, worker):
    fake_llm.default = Behaviour(reply="Salmon, in autumn.")
    conversation = await sync_to_async(conversation_create)(owner=alice, system_prompt="Be brief.")
    old = await _answered(conversation, "What do bears eat?", "Mostly berries.")
    socket = await chat_opened(alice, conversation.id)

    queued = await _regenerate(socket, old.id)
    *_, done = await socket.receive_until("done")

    assert (done["job_id"], done["status"], done["content"]) == (
        queued["job_id"],
        "complete",
        "Salmon, in autumn.",
    )
    assert fake_llm.requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What do bears eat?"},
    ]
    await socket.close()
