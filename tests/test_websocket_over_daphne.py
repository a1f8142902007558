"""The socket contract as a browser or a client library meets it: a real `websockets`
client through a real daphne, close codes as they arrive on the wire (docs/websocket.md)."""

import asyncio
import json
import re
import subprocess
import time
import uuid
from datetime import timedelta
from typing import Any

import jwt
import pytest
import websockets
from asgiref.sync import sync_to_async
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken
from websockets.typing import Origin

from chat.services import conversation_create
from tests.support.processes import ServiceProcess, free_port
from tests.support.sockets import session_cookie, token_for

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


def _url(daphne: ServiceProcess, conversation_id: object, query: str = "") -> str:
    return f"ws://127.0.0.1:{daphne.port}/ws/chat/{conversation_id}/{query}"


async def _close_code(url: str, **options: Any) -> int:
    """The code of the server's close, on a socket that gets no hello (refused)."""
    async with websockets.connect(url, open_timeout=15, **options) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            frame = await asyncio.wait_for(ws.recv(), 15)
            raise AssertionError(f"not refused: {frame!r}")
    assert ws.close_code is not None
    return ws.close_code


async def _hello(ws: websockets.ClientConnection) -> dict[str, Any]:
    hello: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 15))
    return hello


def _badly_signed(token: AccessToken) -> str:
    return jwt.encode(token.payload, "not-the-servers-key-0123456789abcdef", algorithm="HS256")


def _expired(user) -> str:
    token = AccessToken.for_user(user)
    token.set_exp(lifetime=-timedelta(seconds=1))
    return str(token)


async def test_it_closes_4401_for_missing_or_bad_credentials(alice, conversation, daphne):
    access = AccessToken.for_user(alice)
    refusals = {
        "no credentials": _url(daphne, conversation.id),
        "malformed token": _url(daphne, conversation.id, "?token=not-a-jwt"),
        "refresh token": _url(daphne, conversation.id, f"?token={RefreshToken.for_user(alice)}"),
        "bad signature": _url(daphne, conversation.id, f"?token={_badly_signed(access)}"),
        "expired token": _url(daphne, conversation.id, f"?token={_expired(alice)}"),
    }

    codes = {why: await _close_code(url) for why, url in refusals.items()}
    forged_protocol = await _close_code(
        _url(daphne, conversation.id), subprotocols=["grizz", "jwt.forged"]
    )

    assert codes == dict.fromkeys(refusals, 4401)
    assert forged_protocol == 4401
    async with websockets.connect(_url(daphne, conversation.id, f"?token={access}")) as ws:
        assert (await _hello(ws))["type"] == "hello"  # the same server takes a good token


async def test_it_closes_4404_for_a_conversation_that_is_not_the_users(
    alice, bob, conversation, daphne
):
    bobs_token = f"?token={token_for(bob)}"
    codes = [
        await _close_code(_url(daphne, conversation.id, bobs_token)),
        await _close_code(_url(daphne, uuid.uuid4(), bobs_token)),
        await _close_code(_url(daphne, "not-a-uuid", bobs_token)),
    ]
    assert codes == [4404, 4404, 4404]


async def test_it_closes_a_silent_socket_with_4408_but_not_one_that_pings(
    alice, conversation, start_daphne
):
    daphne = start_daphne(WS_IDLE_TIMEOUT_SECONDS="1")
    url = _url(daphne, conversation.id, f"?token={token_for(alice)}")
    async with websockets.connect(url) as silent, websockets.connect(url) as pinging:
        await _hello(silent)
        await _hello(pinging)
        opened = time.monotonic()
        pongs = 0
        # The client's cadence (a quarter of the timeout), not a wait for the server.
        while not (silent.close_code and time.monotonic() - opened > 3):
            await pinging.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(pinging.recv(), 15)) == {"type": "pong"}
            pongs += 1
            await asyncio.sleep(0.25)
            assert time.monotonic() - opened < 30, "the silent socket was never closed"

        assert silent.close_code == 4408
        assert pinging.close_code is None  # open at three times the timeout
        assert pongs >= 8


async def test_it_accepts_the_session_cookie_from_a_trusted_origin(
    alice, conversation, start_daphne
):
    daphne = start_daphne(DJANGO_CSRF_TRUSTED_ORIGINS="https://chat.example.com")
    cookie = {"Cookie": await sync_to_async(session_cookie)(alice)}
    url = _url(daphne, conversation.id)

    async with websockets.connect(
        url, origin=Origin("https://chat.example.com"), additional_headers=cookie
    ) as ws:
        hello = await _hello(ws)
    elsewhere = await _close_code(
        url, origin=Origin("https://evil.example"), additional_headers=cookie
    )

    assert (hello["type"], hello["conversation_id"]) == ("hello", str(conversation.id))
    assert elsewhere == 4401  # the same cookie from a page that is not trusted


async def test_it_closes_4503_when_redis_is_down(alice, conversation, start_daphne):
    daphne = start_daphne(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    url = _url(daphne, conversation.id, f"?token={token_for(alice)}")
    assert await _close_code(url) == 4503


async def test_it_closes_4503_when_the_database_is_down(alice, service_env, start_daphne):
    conversation = await sync_to_async(conversation_create)(owner=alice)
    cookie = {"Cookie": await sync_to_async(session_cookie)(alice)}
    nowhere = re.sub(r"@[^/]+/", f"@127.0.0.1:{free_port()}/", service_env["DATABASE_URL"])
    daphne = start_daphne(DATABASE_URL=nowhere)
    url = _url(daphne, conversation.id)

    by_token = await _close_code(f"{url}?token={token_for(alice)}")
    by_cookie = await _close_code(
        url, origin=f"http://127.0.0.1:{daphne.port}", additional_headers=cookie
    )

    assert (by_token, by_cookie) == (4503, 4503)


async def test_it_listens_with_a_backlog_that_holds_a_reconnect_wave(start_daphne):
    # Twisted's default backlog (50) drops the SYNs of a wave of reconnects beyond it, and
    # each of those browsers waits a second or more to try again. `ss` shows a listening
    # socket's backlog as its Send-Q.
    daphne = start_daphne(WEB_LISTEN_BACKLOG="700")
    listing = await asyncio.to_thread(
        subprocess.run,
        ["ss", "-Hltn", f"sport = :{daphne.port}"],
        capture_output=True,
        text=True,
        check=True,
    )
    state, _queued, backlog, *_ = listing.stdout.split()
    assert (state, backlog) == ("LISTEN", "700")
