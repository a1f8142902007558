"""The health endpoints as a platform's probe sees them, on a real daphne process."""

import asyncio
import json
import re
import urllib.error
import urllib.request

import pytest
from django.test import Client

from tests.support.processes import ServiceProcess, free_port
from tests.support.sockets import session_cookie

pytestmark = pytest.mark.django_db(transaction=True)


def _get(web: ServiceProcess, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{web.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def probe(web: ServiceProcess, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(_get, web, path)


async def test_it_is_ready_when_postgresql_and_redis_answer(daphne):
    status, body = await probe(daphne, "/readyz")

    assert status == 200
    assert json.loads(body) == {
        "status": "ready",
        "parts": {"postgresql": "ok", "redis": "ok"},
    }


async def test_it_names_redis_when_redis_is_down_and_stays_alive(start_daphne):
    web = start_daphne(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens

    ready = await probe(web, "/readyz")
    alive = await probe(web, "/healthz")

    assert ready[0] == 503
    assert json.loads(ready[1]) == {
        "status": "unavailable",
        "parts": {"postgresql": "ok", "redis": "error"},
    }
    assert alive == (200, "ok")


async def test_it_names_postgresql_when_the_database_is_down(service_env, start_daphne):
    nowhere = re.sub(r"@[^/]+/", f"@127.0.0.1:{free_port()}/", service_env["DATABASE_URL"])
    web = start_daphne(DATABASE_URL=nowhere)

    ready = await probe(web, "/readyz")
    alive = await probe(web, "/healthz")

    assert ready[0] == 503
    assert json.loads(ready[1])["parts"] == {"postgresql": "error", "redis": "ok"}
    assert alive == (200, "ok")


def test_it_answers_healthz_without_a_query_even_for_a_signed_in_user(
    alice, django_assert_num_queries
):
    # Sent with alice's session cookie: the session and the user must stay unloaded.
    client = Client(HTTP_COOKIE=session_cookie(alice))

    with django_assert_num_queries(0):
        response = client.get("/healthz")

    assert (response.status_code, response.content) == (200, b"ok")
    assert response["Cache-Control"].startswith("max-age=0")
