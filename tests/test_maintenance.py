"""The maintenance chores and the one worker that runs them (llmworker/maintenance.py): the
holder of a Redis lease, replaced when it is killed, handing over when it stops; the
reconciler, dead consumer removal and dead-letter trimming it runs. Real workers, the real
Redis and PostgreSQL."""

import asyncio
import re
import signal
import time
from typing import Any, cast

import pytest
from asgiref.sync import sync_to_async

from chat.services import conversation_create
from llmworker.redis import (
    WORKER_GROUP,
    StreamEntries,
    dead_letter_key,
    jobs_stream_key,
    maintenance_lease_key,
    redis_get,
    redis_now_ms,
)
from tests.conftest import RUN_ID
from tests.support.orphans import sent_by_a_web_process_that_died
from tests.support.processes import ServiceProcess
from tests.support.restarts import reply_streaming_on_a_long_lease
from tests.support.sockets import ChatSocket, chat_opened

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]

LEASE_SECONDS = 3
DAY_MS = 86_400_000


@pytest.fixture
def quick_maintenance(service_env):
    service_env["LLM_MAINTENANCE_LEASE_SECONDS"] = str(LEASE_SECONDS)
    service_env["LLM_RECONCILE_SECONDS"] = "1"
    service_env["LLM_MAINTENANCE_SECONDS"] = "1"
    return service_env


async def _lease_holder(*, other_than: str | None = None, timeout: float = 20) -> str:
    """The name in the maintenance lease, once there is one (other than `other_than`)."""
    deadline = time.monotonic() + timeout
    while True:
        holder = await redis_get().get(maintenance_lease_key())
        if holder is not None and holder != other_than:
            return str(holder)
        assert time.monotonic() < deadline, f"no new maintenance lease holder in {timeout}s"
        await asyncio.sleep(0.05)


async def _workers(start_worker, *names: str) -> dict[str, ServiceProcess]:
    return {f"{name}-{RUN_ID}": await asyncio.to_thread(start_worker, name) for name in names}


async def _orphan_completed(alice) -> tuple[str, ChatSocket]:
    """A reply whose web process died before its XADD, once the user has seen it done."""
    conversation = await sync_to_async(conversation_create)(owner=alice)
    lost = await sent_by_a_web_process_that_died(alice, conversation)
    socket = await chat_opened(alice, conversation.id)
    done = (await socket.receive_until("done", timeout=30))[-1]
    assert (done["job_id"], done["status"]) == (str(lost.reply.job_id), "complete")
    return done["job_id"], socket


async def test_it_runs_the_maintenance_on_one_worker_and_another_takes_over_when_it_is_killed(
    alice, fake_llm, quick_maintenance, start_worker
):
    workers = await _workers(start_worker, "one", "two")
    holder_name = await _lease_holder()
    holder = workers.pop(holder_name)
    [(other_name, other)] = workers.items()

    first_job, first_socket = await _orphan_completed(alice)
    only_one_ran = "runs the maintenance" not in other.output
    await asyncio.to_thread(holder.kill)
    killed_at = time.monotonic()
    second_job, second_socket = await _orphan_completed(alice)
    new_holder = await _lease_holder(other_than=holder_name)
    taken_over_in = time.monotonic() - killed_at

    assert only_one_ran
    assert f"job {first_job}: found without a queue entry" in holder.output
    assert f"job {first_job}: found without" not in other.output
    assert new_holder == other_name
    # Its lease, renewed a third of a lease before at most, runs out; the next try takes it.
    assert taken_over_in < 2 * LEASE_SECONDS
    assert f"worker {other_name}: runs the maintenance" in other.output
    assert f"job {second_job}: found without a queue entry" in other.output
    assert "maintenance: enqueued 1 replies again" in other.output
    for socket in (first_socket, second_socket):
        await socket.close()


async def test_a_worker_that_stops_hands_the_maintenance_over_at_once(
    fake_llm, quick_maintenance, start_worker
):
    # A long lease, renewed every 5 s: waiting for it to run out would take 9 s or more.
    quick_maintenance["LLM_MAINTENANCE_LEASE_SECONDS"] = "15"
    workers = await _workers(start_worker, "one", "two")
    holder_name = await _lease_holder()
    holder = workers.pop(holder_name)
    [(other_name, _)] = workers.items()

    stopped_at = time.monotonic()
    lease_left_ms = await redis_get().pttl(maintenance_lease_key())
    holder.send_signal(signal.SIGTERM)
    new_holder = await _lease_holder(other_than=holder_name)
    taken_over_ms = (time.monotonic() - stopped_at) * 1000

    assert new_holder == other_name
    assert taken_over_ms < lease_left_ms, "taken over only once the lease had run out"
    assert await asyncio.to_thread(holder.wait) == 0
    assert f"worker {holder_name}: handed the maintenance over" in holder.output


async def _consumers(priority: str) -> dict[str, int]:
    """The group's consumers on a stream, with their pending counts."""
    found = await redis_get().xinfo_consumers(jobs_stream_key(priority), WORKER_GROUP)
    return {str(c["name"]): int(c["pending"]) for c in found}


async def test_it_removes_dead_consumers_with_nothing_pending_and_keeps_the_others(
    alice, fake_llm, quick_maintenance, start_worker
):
    quick_maintenance["LLM_CONSUMER_REMOVE_IDLE_SECONDS"] = "10"
    # Killed with a reply in hand, which no one takes over within the test (a long lease).
    holding, socket, _ = await reply_streaming_on_a_long_lease(
        alice, fake_llm, quick_maintenance, lambda: start_worker("holding")
    )
    await asyncio.to_thread(holding.kill)
    # A live worker under its host's slot name, <host>-<n>, idle from its start to the end.
    live = await asyncio.to_thread(start_worker, None)
    live_started = time.monotonic()
    [live_name] = re.findall(r"worker (\S+): ready", live.output)
    gone = await asyncio.to_thread(start_worker, "gone")
    await asyncio.to_thread(gone.stop)
    holding_name, gone_name = f"holding-{RUN_ID}", f"gone-{RUN_ID}"

    deadline = time.monotonic() + 40
    wanted = {"normal": {holding_name: 1, live_name: 0}, "high": {live_name: 0}}
    while (after := {p: await _consumers(p) for p in wanted}) != wanted:
        assert time.monotonic() < deadline, f"consumers left: {after}"
        await asyncio.sleep(0.2)

    assert time.monotonic() - live_started > 10, "the live worker was idle past the bound"
    removed = re.findall(
        r"consumers idle over 10.0s with nothing pending: (.*)", "\n".join(live.messages)
    )
    assert sorted(", ".join(removed).split(", ")) == sorted(
        [f"{gone_name} (high)", f"{gone_name} (normal)", f"{holding_name} (high)"]
    )
    await socket.close()


async def _dead_letter_added(entry_id: str = "*") -> str:
    fields: dict[Any, Any] = {"job_id": "0" * 32, "reason": "a test's", "worker": "earlier"}
    return str(await redis_get().xadd(dead_letter_key(), fields, id=entry_id))


async def test_it_trims_the_dead_letters_by_age_and_by_count(
    fake_llm, quick_maintenance, start_worker
):
    quick_maintenance["LLM_DEAD_LETTER_MAXLEN"] = "4"
    now_ms = await redis_now_ms()
    for age_days in (9, 8, 6):  # the default keeps 7 days
        await _dead_letter_added(f"{now_ms - age_days * DAY_MS}-0")
    newest = [await _dead_letter_added() for _ in range(4)]

    worker = await asyncio.to_thread(start_worker, "trimming")
    await asyncio.to_thread(worker.wait_for_line, r"removed \d+ dead letters")
    left = cast(StreamEntries, await redis_get().xrange(dead_letter_key()))

    assert [entry_id for entry_id, _ in left] == newest
    assert "removed 2 dead letters older than 7.0 days and 1 beyond 4" in worker.output
