"""Prometheus metrics as an operator's Prometheus sees them: real daphne, real workers and
a real supervised pool, scraped over HTTP and read with prometheus_client's parser."""

import asyncio
import json
import os
import signal
from typing import Any

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.contrib.auth.models import User
from django.test import Client

from tests.conftest import RUN_ID
from tests.support.fake_openai import Behaviour
from tests.support.metrics import Scrape, http_get, scrape, scrape_until
from tests.support.processes import ServiceProcess, free_port
from tests.support.sockets import chat_opened, daphne_socket_ready, message_queued, session_cookie

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "metrics-token-of-the-tests-0123456789"
TOKENS = [f" tok{i}" for i in range(30)]


def _web(web: ServiceProcess, path: str = "/metrics") -> str:
    return f"http://127.0.0.1:{web.port}{path}"


async def _scrape(url: str, **options: Any) -> Scrape:
    return await asyncio.to_thread(scrape, url, **options)


async def _scrape_until(url: str, condition: Any, **options: Any) -> Scrape:
    return await asyncio.to_thread(scrape_until, url, condition, **options)


async def _frames_until(ws: websockets.ClientConnection, kind: str) -> list[dict[str, Any]]:
    frames = []
    while True:
        frames.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        if frames[-1]["type"] == kind:
            return frames


def _worker_metrics_port(service_env: dict[str, str]) -> str:
    port = free_port()
    service_env["LLM_WORKER_METRICS_PORT"] = str(port)
    return f"http://127.0.0.1:{port}/metrics"


async def test_a_turn_moves_the_web_and_worker_metrics(
    alice, fake_llm, service_env, start_daphne, start_worker
):
    worker_url = _worker_metrics_port(service_env)
    fake_llm.enqueue(Behaviour(tokens=TOKENS, hold_after=3))
    web = start_daphne(METRICS_TOKEN=TOKEN)
    await asyncio.to_thread(start_worker, "metrics")
    before = await _scrape(worker_url)
    ws = await daphne_socket_ready(web, alice)

    await ws.send(json.dumps({"type": "message", "content": "Go"}))
    assert (await _frames_until(ws, "queued"))[-1]["type"] == "queued"
    await _frames_until(ws, "delta")  # streaming, held after three tokens
    web_during = await _scrape(_web(web), token=TOKEN)
    cluster_during = await _scrape(_web(web, "/metrics/cluster"), token=TOKEN)
    worker_during = await _scrape(worker_url)
    fake_llm.release()
    done = (await _frames_until(ws, "done"))[-1]
    worker_after = await _scrape_until(
        worker_url, lambda s: s.value("grizz_worker_slots_busy") == 0
    )
    cluster_after = await _scrape_until(
        _web(web, "/metrics/cluster"),
        lambda s: s.value("grizz_queue_length", priority="normal") == 0,
        token=TOKEN,
    )
    await ws.close()
    web_after = await _scrape_until(
        _web(web), lambda s: s.value("grizz_sockets_open") == 0, token=TOKEN
    )

    assert done["status"] == "complete"
    assert web_during.value("grizz_sockets_open") == 1
    assert cluster_during.value("grizz_queue_length", priority="normal") == 1
    assert cluster_during.value("grizz_queue_pending", priority="normal") == 1
    assert cluster_during.value("grizz_queue_waiting", priority="normal") == 0
    consumer = f"metrics-{RUN_ID}"
    assert cluster_during.value("grizz_consumer_pending_jobs", consumer=consumer) == 1
    assert cluster_during.value("grizz_dead_letters") == 0
    assert cluster_during.value("grizz_redis_used_memory_bytes") > 0
    assert cluster_after.value("grizz_consumer_pending_jobs", consumer=consumer) == 0
    assert (
        worker_during.value("grizz_worker_slots_busy"),
        worker_during.value("grizz_worker_slots_free"),
    ) == (1, 7)
    assert worker_after.value("grizz_worker_slots_free") == 8

    def moved(name: str, **labels: str) -> float:
        return worker_after.value(name, **labels) - before.value(name, **labels)

    assert moved("grizz_replies_total", outcome="complete") == 1
    assert moved("grizz_replies_total", outcome="failed") == 0
    assert moved("grizz_tokens_streamed_total") == len(TOKENS)
    assert moved("grizz_queue_wait_seconds_count") == 1
    assert moved("grizz_reply_first_token_seconds_count") == 1
    assert moved("grizz_reply_first_token_to_done_seconds_count") == 1
    assert moved("grizz_provider_usage_tokens_total", kind="completion") == len(TOKENS)
    assert worker_after.value("grizz_provider_circuit_state") == 0
    assert worker_after.value("grizz_provider_errors_total") == 0
    # Nothing of the web's on a worker, nor of the worker's on the web.
    assert not worker_after.has("grizz_sockets_open")
    assert not web_after.has("grizz_replies_total")


async def test_provider_errors_and_the_open_breaker_show(
    alice, fake_llm, service_env, start_worker
):
    worker_url = _worker_metrics_port(service_env)
    service_env.update(LLM_BREAKER_FAILURES="2", LLM_BREAKER_RESET_SECONDS="3", LLM_RETRY_LIMIT="5")
    fake_llm.enqueue(Behaviour(status=503), Behaviour(status=503))
    fake_llm.default = Behaviour(tokens=TOKENS)
    await asyncio.to_thread(start_worker, "breaker")
    socket = await chat_opened(alice)
    await message_queued(socket)

    notice = await socket.receive(timeout=30)  # the circuit has opened: the reply waits
    opened = await _scrape(worker_url)
    done = (await socket.receive_until("done", timeout=30))[-1]
    closed = await _scrape(worker_url)

    assert notice["code"] == "llm_unavailable"
    assert opened.value("grizz_provider_circuit_state") == 2
    assert opened.value("grizz_provider_errors_total", kind="status", status="503") == 2
    assert opened.value("grizz_replies_total", outcome="retried") == 2
    assert done["status"] == "complete"
    assert closed.value("grizz_provider_circuit_state") == 0
    assert closed.value("grizz_provider_errors_total") == 2
    await socket.close()


async def test_an_admission_refusal_is_counted_by_reason(alice, start_daphne):
    web = start_daphne(METRICS_TOKEN=TOKEN, CHAT_RATE_LIMIT="1/min")
    ws = await daphne_socket_ready(web, alice)

    await ws.send(json.dumps({"type": "message", "content": "First"}))
    await _frames_until(ws, "queued")
    await ws.send(json.dumps({"type": "message", "content": "Second"}))
    refused = (await _frames_until(ws, "error"))[-1]
    got = await _scrape(_web(web), token=TOKEN)

    assert refused["code"] == "rate_limited"
    assert got.value("grizz_admission_refusals_total", reason="rate") == 1
    assert got.value("grizz_admission_refusals_total") == 1
    await ws.close()


async def test_metrics_answer_only_the_token_or_a_staff_session(alice, start_daphne):
    web = start_daphne(METRICS_TOKEN=TOKEN)
    staff = await User.objects.acreate(username="ops", is_staff=True)
    cookie = sync_to_async(session_cookie)
    cookies = {"alice": await cookie(alice), "staff": await cookie(staff)}

    for path in ("/metrics", "/metrics/cluster"):
        url = _web(web, path)
        assert (await asyncio.to_thread(http_get, url))[0] == 404
        assert (await asyncio.to_thread(http_get, url, token="not-the-token"))[0] == 404
        assert (await asyncio.to_thread(http_get, url, cookie=cookies["alice"]))[0] == 404
        assert (await asyncio.to_thread(http_get, url, cookie=cookies["staff"]))[0] == 200
        status, body = await asyncio.to_thread(http_get, url, token=TOKEN)
        assert status == 200 and Scrape(body).samples


def test_without_a_token_setting_no_bearer_is_let_in(settings, transactional_db):
    settings.METRICS_TOKEN = ""

    response = Client(HTTP_AUTHORIZATION="Bearer ").get("/metrics")

    assert response.status_code == 404


async def test_a_supervised_pool_serves_its_childrens_metrics_on_one_port(
    alice, fake_llm, start_pool
):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    pool = await asyncio.to_thread(
        start_pool, "scraped", processes=2, options=(f"--metrics-port={port}",)
    )
    socket = await chat_opened(alice)
    await message_queued(socket)
    await socket.receive_until("done", timeout=30)
    served = await _scrape_until(url, lambda s: s.value("grizz_worker_slots_busy") == 0)
    child = int(pool.wait_for_line(r"slot 0 \(\S+\): started, pid \d+").rsplit(" ", 1)[-1])

    os.kill(child, signal.SIGKILL)
    await asyncio.to_thread(pool.wait_for_line, rf"pid {child} killed by SIGKILL")
    one_left = await _scrape(url)
    await asyncio.to_thread(pool.wait_for_line, rf"worker scraped-{RUN_ID}-0: ready", count=2)
    restarted = await _scrape(url)

    assert served.value("grizz_replies_total", outcome="complete") == 1
    assert served.value("grizz_tokens_streamed_total") == len(Behaviour().token_list())
    assert served.value("grizz_worker_slots_free") == 16  # two children of 8
    assert one_left.value("grizz_worker_slots_free") == 8
    # The dead child's counts stay in the totals; its slots came back with its successor.
    assert restarted.value("grizz_replies_total", outcome="complete") == 1
    assert restarted.value("grizz_worker_slots_free") == 16
    assert restarted.value("grizz_worker_restarts_total") == 1
    await socket.close()
