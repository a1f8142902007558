"""The operator's commands against a running deployment: a real worker, PostgreSQL, Redis
and the fake provider; what the operator reads, and what the user's socket then sees."""

import asyncio
import io
import json
from typing import Any, cast

import pytest
from django.core.management import CommandError, call_command

from chat.models import Message
from llmworker.names import host_name
from llmworker.redis import StreamEntries, dead_letter_key, redis_get, redis_now_ms
from tests.conftest import RUN_ID
from tests.support.dead_letters import dead_letters_once_written
from tests.support.fake_openai import Behaviour
from tests.support.sockets import ChatSocket, chat_opened, message_queued

pytestmark = pytest.mark.django_db(transaction=True)

TOKENS = [f" tok{i}" for i in range(10)]
ANSWER = "".join(TOKENS)
DAY_MS = 86_400_000


async def run(*args: str) -> str:
    """What the command prints (on its own event loop, as from a shell)."""
    out = io.StringIO()
    await asyncio.to_thread(call_command, *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


async def dead_letter_ids() -> list[str]:
    entries = cast(StreamEntries, await redis_get().xrange(dead_letter_key()))
    return [entry_id for entry_id, _ in entries]


async def reply_dead_lettered(socket: ChatSocket, content: str = "Go") -> tuple[str, str]:
    """Send a message whose request the provider refuses: its job id and dead letter."""
    queued = await message_queued(socket, content)
    error = await socket.receive()
    assert error["type"] == "error", error
    await dead_letters_once_written()
    [entry_id] = await dead_letter_ids()
    return queued["job_id"], entry_id


async def test_it_retries_a_dead_letter_until_the_users_reply_completes(alice, fake_llm, worker):
    fake_llm.enqueue(Behaviour(status=400, error_message="Bad prompt"))
    fake_llm.default = Behaviour(tokens=TOKENS)
    socket = await chat_opened(alice)
    job_id, entry_id = await reply_dead_lettered(socket)
    [dead] = await dead_letters_once_written()

    listed = await run("llm_dead_letters", "list")
    shown = await run("llm_dead_letters", "show", entry_id)
    status = await run("llm_status")
    retried = await run("llm_dead_letters", "retry", entry_id)
    frames = await socket.receive_until("done")

    assert entry_id in listed and job_id[:8] in listed and "Bad prompt" in listed
    assert all(len(line) <= 100 for line in listed.splitlines())
    assert f"reply_id: {dead['reply_id']}" in shown
    assert "DEAD LETTERS  1, oldest" in status and "Bad prompt" in status
    assert f"job {job_id} enqueued again" in retried
    done = frames[-1]
    assert (done["job_id"], done["status"], done["content"]) == (
        job_id,
        "complete",
        ANSWER,
    )
    reply = await Message.objects.aget(job_id=job_id)
    assert (reply.status, reply.content, reply.error) == ("complete", ANSWER, "")
    assert await run("llm_dead_letters", "list") == "No dead letters.\n"
    await socket.close()


async def test_it_retries_a_job_that_had_used_up_its_attempts(alice, fake_llm, worker):
    # A reply failed with as many attempts as LLM_MAX_ATTEMPTS allows (3): the retry
    # counts its attempts afresh rather than failing it again at once.
    fake_llm.enqueue(Behaviour(status=400, error_message="Bad prompt"))
    fake_llm.default = Behaviour(tokens=TOKENS)
    socket = await chat_opened(alice)
    job_id, _ = await reply_dead_lettered(socket)
    await Message.objects.filter(job_id=job_id).aupdate(attempt=3)

    await run("llm_dead_letters", "retry", "--all")
    done = (await socket.receive_until("done"))[-1]

    assert (done["status"], done["content"]) == ("complete", ANSWER)
    reply = await Message.objects.aget(job_id=job_id)
    assert (reply.status, reply.attempt) == ("complete", 4)
    await socket.close()


async def test_it_refuses_to_retry_while_the_conversation_has_another_reply(
    alice, fake_llm, worker
):
    fake_llm.enqueue(Behaviour(status=400, error_message="Bad prompt"))
    fake_llm.default = Behaviour(tokens=TOKENS, hold_after=2)
    socket = await chat_opened(alice)
    _, entry_id = await reply_dead_lettered(socket, "First")
    await message_queued(socket, "Second")

    with pytest.raises(CommandError, match="another reply queued or being generated"):
        await run("llm_dead_letters", "retry", entry_id)

    assert await redis_get().xlen(dead_letter_key()) == 1  # kept, for a later retry
    fake_llm.release()
    await socket.receive_until("done")
    await socket.close()


async def test_it_says_an_unknown_dead_letter_does_not_exist():
    with pytest.raises(CommandError, match="no dead letter 1-0"):
        await run("llm_dead_letters", "show", "1-0")
    with pytest.raises(CommandError, match="not a stream entry id"):
        await run("llm_dead_letters", "retry", "bob")


async def test_it_purges_the_dead_letters_older_than_a_given_age():
    now_ms = await redis_now_ms()
    old = await redis_get().xadd(
        dead_letter_key(), {"reason": "old"}, id=f"{now_ms - 8 * DAY_MS}-0"
    )
    recent = await redis_get().xadd(
        dead_letter_key(), {"reason": "recent"}, id=f"{now_ms - DAY_MS}-0"
    )

    purged = await run("llm_dead_letters", "purge", "--older-than", "7")
    left = await dead_letter_ids()
    purged_all = await run("llm_dead_letters", "purge")

    assert purged == "Removed 1 dead letters.\n"
    assert old not in left and left == [recent]
    assert purged_all == "Removed 1 dead letters.\n"
    assert await redis_get().xlen(dead_letter_key()) == 0


async def test_it_shows_the_job_a_worker_runs_and_the_job_waiting(
    alice, bob, fake_llm, start_worker
):
    fake_llm.default = Behaviour(tokens=TOKENS, hold_after=2)
    worker = await asyncio.to_thread(start_worker, "busy", concurrency=1)
    alices = await chat_opened(alice)
    await message_queued(alices)
    await alices.receive()  # its first delta: the worker holds alice's job
    bobs = await chat_opened(bob)
    await message_queued(bobs)  # waits: the worker has no free slot

    status = json.loads(await run("llm_status", "--json"))
    table = await run("llm_status")

    normal = next(s for s in status["streams"] if s["priority"] == "normal")
    assert (normal["length"], normal["pending"], normal["waiting"]) == (2, 1, 1)
    assert normal["oldest_waiting_age_seconds"] >= 0
    assert normal["oldest_pending_age_seconds"] >= normal["oldest_waiting_age_seconds"]
    [consumer] = status["consumers"]
    assert consumer["name"] == worker.args[3].removeprefix("--name=")
    assert consumer["pending"] == 1
    assert status["redis_memory"]["used_bytes"] > 0
    assert all(len(line) <= 100 for line in table.splitlines())
    assert consumer["name"] in table
    fake_llm.release()
    await alices.receive_until("done")
    await bobs.receive_until("done")
    await alices.close()
    await bobs.close()


async def _status_once(condition, timeout: float = 20) -> dict[str, Any]:
    """llm_status --json, polled until the condition holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        status: dict[str, Any] = json.loads(await run("llm_status", "--json"))
        if condition(status):
            return status
        assert asyncio.get_running_loop().time() < deadline, status
        await asyncio.sleep(0.1)


async def test_it_shows_each_workers_replies_of_the_last_minute_and_its_breaker(
    alice, fake_llm, service_env, start_worker
):
    service_env["LLM_WORKER_SNAPSHOT_SECONDS"] = "0.5"
    fake_llm.default = Behaviour(tokens=TOKENS)
    worker = await asyncio.to_thread(start_worker, "figures")
    name = worker.args[3].removeprefix("--name=")
    socket = await chat_opened(alice)
    await message_queued(socket)
    await socket.receive_until("done")

    # Once the job is acknowledged too (counted complete before its last frame).
    status = await _status_once(
        lambda s: (
            [(w["last_minute"]["complete"], w["slots_busy"]) for w in s["workers"]] == [(1, 0)]
        )
    )
    table = await run("llm_status")
    await asyncio.to_thread(worker.stop)
    after_stop = json.loads(await run("llm_status", "--json"))

    [figures] = status["workers"]
    assert figures["name"] == name
    assert (figures["slots_busy"], figures["concurrency"]) == (0, 8)
    assert figures["last_minute"]["tokens"] == len(TOKENS)
    assert figures["last_minute"]["failed"] == 0
    assert figures["totals"]["complete"] == 1
    assert list(figures["circuits"].values()) == ["closed"]
    assert 0 < figures["window_seconds"] <= 70
    workers = table.split("\nWORKER ", 1)[1]  # its own section, after the consumers'
    [row] = [line for line in workers.splitlines() if line.startswith(name)]
    assert row.split()[1:6] == ["0/8", "1", "0", str(len(TOKENS)), "closed"]
    assert all(len(line) <= 100 for line in table.splitlines())
    assert after_stop["workers"] == []
    await socket.close()


async def test_it_shows_the_pool_its_workers_run_in(service_env, start_pool):
    service_env["LLM_WORKER_SNAPSHOT_SECONDS"] = "0.5"
    pool = await asyncio.to_thread(start_pool, "shown", processes=2)
    names = [f"shown-{RUN_ID}-0", f"shown-{RUN_ID}-1"]

    status = await _status_once(lambda s: sorted(w["name"] for w in s["workers"]) == names)
    table = await run("llm_status")

    supervisor_pids = {w["supervisor_pid"] for w in status["workers"]}
    assert supervisor_pids == {pool.process.pid}
    pools = table.split("\nPOOL ", 1)[1].splitlines()
    assert pools[1].split() == [
        *f"{host_name()}, supervisor pid {pool.process.pid}".split(),
        "2",
        f"{names[0]},",
        names[1],
    ]
    assert all(len(line) <= 100 for line in table.splitlines())
