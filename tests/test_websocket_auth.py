"""Who may open a chat socket, and the close codes of those who may not."""

import uuid
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from rest_framework_simplejwt.tokens import AccessToken

from tests.support.sockets import ChatSocket, session_headers, token_for

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def test_it_says_hello_with_a_token(alice, conversation):
    socket = await ChatSocket.open(conversation.id, user=alice)
    hello = await socket.receive()
    assert hello == {
        "type": "hello",
        "conversation_id": str(conversation.id),
        "active_job_id": None,
    }
    await socket.close()


async def test_it_accepts_the_path_without_trailing_slash(alice, conversation):
    socket = ChatSocket(f"/ws/chat/{conversation.id}?token={token_for(alice)}")
    connected, _ = await socket.communicator.connect()
    assert connected
    assert (await socket.receive())["type"] == "hello"
    await socket.close()


async def test_it_closes_4401_without_credentials(conversation):
    socket = await ChatSocket.open(conversation.id)
    assert await socket.close_code() == 4401


async def test_it_closes_4401_for_a_malformed_token(conversation):
    socket = ChatSocket(f"/ws/chat/{conversation.id}/?token=not-a-jwt")
    await socket.communicator.connect()
    assert await socket.close_code() == 4401


async def test_it_closes_4401_for_an_expired_token(alice, conversation):
    token = AccessToken.for_user(alice)
    token.set_exp(lifetime=-timedelta(seconds=1))
    socket = ChatSocket(f"/ws/chat/{conversation.id}/?token={token}")
    await socket.communicator.connect()
    assert await socket.close_code() == 4401


async def test_it_closes_4404_on_another_users_conversation(bob, conversation):
    socket = await ChatSocket.open(conversation.id, user=bob)
    assert await socket.close_code() == 4404


async def test_it_closes_4404_on_an_unknown_conversation(alice):
    socket = await ChatSocket.open(uuid.uuid4(), user=alice)
    assert await socket.close_code() == 4404


async def test_it_closes_4404_on_an_id_that_is_not_a_uuid(alice):
    socket = await ChatSocket.open("not-a-uuid", user=alice)
    assert await socket.close_code() == 4404


async def test_it_accepts_the_session_cookie_from_its_own_origin(alice, conversation):
    socket = await ChatSocket.open(
        conversation.id, headers=await sync_to_async(session_headers)(alice)
    )
    assert (await socket.receive())["type"] == "hello"
    await socket.close()


async def test_it_ignores_the_session_cookie_from_another_origin(alice, conversation):
    headers = await sync_to_async(session_headers)(alice, origin="http://evil.example")
    socket = await ChatSocket.open(conversation.id, headers=headers)
    assert await socket.close_code() == 4401


async def test_it_ignores_the_session_cookie_without_origin(alice, conversation):
    socket = await ChatSocket.open(
        conversation.id, headers=await sync_to_async(session_headers)(alice, origin=None)
    )
    assert await socket.close_code() == 4401
