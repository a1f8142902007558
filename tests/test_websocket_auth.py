"""Who may open a chat socket, and the close codes of those who may not."""

import uuid
from datetime import timedelta

import jwt
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from rest_framework_simplejwt.settings import api_settings
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from tests.support.sockets import ChatSocket, session_headers, token_for

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


@pytest.mark.usefixtures("both_database_paths")
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


async def _close_code_with(conversation_id: object, token: object) -> int:
    socket = ChatSocket(f"/ws/chat/{conversation_id}/?token={token}")
    await socket.communicator.connect()
    return await socket.close_code()


async def test_it_closes_4401_for_a_token_signed_with_another_key(alice, conversation):
    payload = AccessToken.for_user(alice).payload
    forged = jwt.encode(payload, "not-the-secret-key-of-this-deployment", algorithm="HS256")
    assert await _close_code_with(conversation.id, forged) == 4401


async def test_it_closes_4401_for_a_refresh_token(alice, conversation):
    assert await _close_code_with(conversation.id, RefreshToken.for_user(alice)) == 4401


async def test_it_closes_4401_for_a_token_without_a_user_that_can_be_read(conversation):
    token = AccessToken()
    token["user_id"] = "not-a-number"
    assert await _close_code_with(conversation.id, token) == 4401
    del token["user_id"]
    assert await _close_code_with(conversation.id, token) == 4401


@pytest.mark.usefixtures("both_database_paths")
async def test_it_closes_4401_for_an_inactive_users_token(alice, conversation):
    token = token_for(alice)
    await User.objects.filter(id=alice.id).aupdate(is_active=False)
    assert await _close_code_with(conversation.id, token) == 4401


@pytest.mark.usefixtures("both_database_paths")
async def test_it_closes_4401_for_a_deleted_users_token_even_on_a_missing_conversation(bob):
    token = token_for(bob)
    await User.objects.filter(id=bob.id).adelete()
    assert await _close_code_with(uuid.uuid4(), token) == 4401
    assert await _close_code_with("not-a-uuid", token) == 4401


async def test_it_closes_4401_for_a_token_from_before_a_password_change_when_so_configured(
    alice, conversation, monkeypatch
):
    # simplejwt's modules share this one object; a changed SIMPLE_JWT would replace it in
    # its settings module alone.
    monkeypatch.setattr(api_settings, "CHECK_REVOKE_TOKEN", True)
    before = token_for(alice)
    alice.set_password("a-new-password-2")
    await alice.asave()
    after = token_for(alice)

    assert await _close_code_with(conversation.id, before) == 4401
    socket = ChatSocket(f"/ws/chat/{conversation.id}/?token={after}")
    await socket.communicator.connect()
    assert (await socket.receive())["type"] == "hello"
    await socket.close()


@pytest.mark.usefixtures("both_database_paths")
async def test_it_closes_4404_on_another_users_conversation(bob, conversation):
    socket = await ChatSocket.open(conversation.id, user=bob)
    assert await socket.close_code() == 4404


async def test_it_closes_4404_on_an_unknown_conversation(alice):
    socket = await ChatSocket.open(uuid.uuid4(), user=alice)
    assert await socket.close_code() == 4404


async def test_it_closes_4404_on_an_id_that_is_not_a_uuid(alice):
    socket = await ChatSocket.open("not-a-uuid", user=alice)
    assert await socket.close_code() == 4404


@pytest.mark.usefixtures("both_database_paths")
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
