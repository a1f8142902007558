"""The logs as an operator's log collector reads them (docs/logging.md): a real daphne and a
real worker, with the production default (LOG_FORMAT=json under DJANGO_DEBUG=0), drive one
turn; every line they print is a JSON object, and one job id ties the web's line to the
worker's."""

import asyncio
import json
import re
from typing import Any

import pytest
import websockets
from asgiref.sync import sync_to_async

from chat.models import Message
from chat.services import conversation_create
from tests.conftest import RUN_ID
from tests.support.fake_openai import Behaviour
from tests.support.processes import ServiceProcess
from tests.support.sockets import token_for

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

# Words that appear nowhere but in the user's message and in the model's answer.
QUESTION = "Is the vault code qx7vault still valid?"
ANSWER_TOKENS = [" The", " code", " zk4reply", " expired."]
ANSWER = "".join(ANSWER_TOKENS)
SECRETS = ("qx7vault", "zk4reply")


async def _turn(web: ServiceProcess, user, content: str) -> list[dict[str, Any]]:
    """Send one message over a real socket; the frames up to the reply's end."""
    conversation = await sync_to_async(conversation_create)(owner=user)
    url = f"ws://127.0.0.1:{web.port}/ws/chat/{conversation.id}/?token={token_for(user)}"
    frames: list[dict[str, Any]] = []
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
        await ws.send(json.dumps({"type": "message", "content": content}))
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
    return frames


def _records(process: ServiceProcess) -> list[dict[str, Any]]:
    """Every line the process printed, each parsed as JSON: one that is not fails here."""
    process.stop()  # all of its lines written, the last ones (shutdown) too
    records = []
    for line in process.lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "process", "message"} <= record.keys(), line
        records.append(record)
    return records


def _of_job(records: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [record for record in records if record.get("job_id") == job_id]


async def _logged_turn(web, worker, user, fake_llm, content: str = QUESTION):
    fake_llm.default = Behaviour(tokens=ANSWER_TOKENS)
    frames = await _turn(web, user, content)
    job_id = frames[0]["job_id"]
    await asyncio.to_thread(worker.wait_for_line, rf"job {job_id}: (complete|failed)")
    return frames, _records(web), _records(worker)


async def test_it_logs_a_turn_as_json_lines_tied_by_the_job_id(
    alice, fake_llm, daphne, start_worker
):
    worker = start_worker("logs")

    frames, web_records, worker_records = await _logged_turn(daphne, worker, alice, fake_llm)

    queued, done = frames[0], frames[-1]
    job_id = queued["job_id"]
    ids = {
        "job_id": job_id,
        "reply_id": queued["reply_id"],
        "conversation_id": str((await Message.objects.aget(id=queued["reply_id"])).conversation_id),
        "user_id": str(alice.id),
    }
    assert done["status"] == "complete"
    (enqueued,) = _of_job(web_records, job_id)
    assert enqueued["message"].startswith(f"job {job_id}: enqueued")
    assert enqueued["level"] == "INFO"
    assert ids.items() <= enqueued.items()
    assert enqueued["duration_ms"] > 0
    started, complete = _of_job(worker_records, job_id)
    for record in (started, complete):
        assert ids.items() <= record.items()
        assert record["consumer"] == f"logs-{RUN_ID}"
        assert record["attempt"] == 1
        assert record["level"] == "INFO"
    assert started["queued_ms"] >= 0
    assert complete["message"].startswith(f"job {job_id}: complete in ")
    assert complete["outcome"] == "complete"
    assert complete["tokens"] == len(ANSWER_TOKENS)
    assert 0 < complete["ttft_ms"] <= complete["duration_ms"]
    assert complete["usage"]["completion_tokens"] == len(ANSWER_TOKENS)
    # Lines that are not about the job still name the worker that wrote them.
    assert all(r["consumer"] == f"logs-{RUN_ID}" for r in worker_records if "ready" in r["message"])
    # The access log is JSON too, without the socket's token.
    connects = [r for r in web_records if r["logger"] == "grizz.access"]
    assert any(r["request"].startswith("WSCONNECT /ws/chat/") for r in connects)
    for process_records in (web_records, worker_records):
        text = json.dumps(process_records)
        assert not [secret for secret in SECRETS if secret in text]
        assert token_for(alice)[:20] not in text


async def test_it_logs_the_texts_only_with_log_content(alice, fake_llm, start_daphne, start_worker):
    web = start_daphne(LOG_CONTENT="1")
    worker = start_worker("logs", env={"LOG_CONTENT": "1"})

    frames, web_records, worker_records = await _logged_turn(web, worker, alice, fake_llm)

    job_id = frames[0]["job_id"]
    (enqueued,) = _of_job(web_records, job_id)
    assert enqueued["content"] == QUESTION
    complete = _of_job(worker_records, job_id)[-1]
    assert complete["content"] == ANSWER
    assert "zk4reply" not in complete["message"]  # in its field, the message reads the same


async def test_it_keeps_a_provider_error_that_quotes_the_prompt_out_of_the_logs(
    alice, fake_llm, daphne, start_worker
):
    worker = start_worker("logs")
    # As some servers answer a request they refuse: with the offending input quoted back.
    fake_llm.enqueue(Behaviour(status=400, error_message=f"Input rejected: {QUESTION!r}"))

    frames = await _turn(daphne, alice, QUESTION)
    error = frames[-1]
    await asyncio.to_thread(worker.wait_for_line, rf"job {error['job_id']}: failed")
    worker_records = _records(worker)

    assert error["code"] == "llm_error"
    assert "qx7vault" in error["message"]  # the user sees what the provider said
    (failed,) = [r for r in _of_job(worker_records, error["job_id"]) if "failed" in r["message"]]
    assert failed["message"].endswith(": The model provider refused the request (400)")
    assert (failed["outcome"], failed["code"], failed["attempt"]) == ("failed", "llm_error", 1)
    assert "qx7vault" not in json.dumps(worker_records)


async def test_it_logs_plain_lines_with_log_format_text(start_daphne):
    web = start_daphne(LOG_FORMAT="text")
    web.stop()

    listening = web.wait_for_line("Listening on TCP address")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO MainProcess daphne.server "
        rf"Listening on TCP address 127.0.0.1:{web.port}\n",
        listening,
    )
    assert not [line for line in web.lines if line.startswith("{")]
