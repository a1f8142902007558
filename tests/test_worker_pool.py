"""Supervised worker pools (`run_llm_worker --processes P`, `--supervise`) and the consumer
names that make a restarted slot resume its own jobs: real supervisors, real children, the
real Redis and PostgreSQL. (That a worker restarted under its name resumes its jobs at once
is test_delivery's; here, that the supervisor restarts a slot under its name.)"""

import asyncio
import os
import signal
import socket
import sys

import pytest

from tests.conftest import RUN_ID
from tests.support.pools import child_pid, children_pids, process_ended
from tests.support.processes import ServiceProcess
from tests.support.restarts import reply_completed_once, reply_streaming_on_a_long_lease
from tests.support.sockets import chat_opened, message_queued

pytestmark = [pytest.mark.asyncio, pytest.mark.django_db(transaction=True)]


async def test_it_restarts_a_killed_worker_child(alice, fake_llm, start_pool):
    pool = await asyncio.to_thread(start_pool, "pool", processes=2)
    name = f"pool-{RUN_ID}-1"
    killed = child_pid(pool, 1)

    os.kill(killed, signal.SIGKILL)
    restarted = await asyncio.to_thread(child_pid, pool, 1, other_than=killed)
    await asyncio.to_thread(pool.wait_for_line, rf"worker {name}: ready", count=2)
    socket = await chat_opened(alice)
    queued = await message_queued(socket)
    done = (await socket.receive_until("done", timeout=30))[-1]

    assert f"slot 1 ({name}): pid {killed} killed by SIGKILL" in pool.output
    assert f"slot 1 ({name}): restart in 0.5s" in pool.output
    assert restarted != killed and not process_ended(restarted)
    assert pool.output.count("slot 0 (") == 1, "only the killed slot restarts"
    assert (done["job_id"], done["status"]) == (queued["job_id"], "complete")
    assert done["content"] == "Hello from the fake model."
    await socket.close()


async def test_it_resumes_a_killed_childs_reply_under_the_same_name(
    alice, fake_llm, service_env, start_pool
):
    pool, socket, queued = await reply_streaming_on_a_long_lease(
        alice, fake_llm, service_env, lambda: start_pool("resuming", processes=1)
    )

    os.kill(child_pid(pool, 0), signal.SIGKILL)

    await reply_completed_once(socket, queued["job_id"])
    assert pool.output.count(f"worker resuming-{RUN_ID}-0: ready") == 2
    assert "took over" not in pool.output
    await socket.close()


# In an autoscaled pool too: its slots' crashes count against the same cap.
@pytest.mark.parametrize("autoscale", [(), ("--autoscale=2,3", "--autoscale-cooldown=0")])
async def test_it_gives_up_after_too_many_crashes(service_env, start_pool, autoscale):
    service_env["GRIZZ_FAULTS"] = "before_own_pending_read"  # every child dies once ready
    options = ("--max-restarts=2", *autoscale)
    pool = await asyncio.to_thread(
        start_pool, "crashing", processes=2, options=options, ready=False
    )

    code = await asyncio.to_thread(pool.wait)

    assert code == 1
    assert "supervisor: giving up after 3 crashes in 60s (--max-restarts 2)" in pool.output
    # The third crash trips the cap; the other child may have reached its fault by then.
    assert pool.output.count("exited with code 137") >= 3
    assert pool.output.count(": restart in ") == 2
    assert pool.messages[-1].endswith("supervisor: stopped")
    assert all(process_ended(pid, 10) for pid in children_pids(pool))


async def test_it_stops_every_child_on_sigterm(start_pool):
    pool = await asyncio.to_thread(start_pool, "stopping", processes=2)
    pids = [child_pid(pool, slot) for slot in (0, 1)]

    pool.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(pool.wait)

    assert code == 0
    assert "supervisor: SIGTERM; stopping 2 worker processes" in pool.output
    for slot in (0, 1):
        assert f"worker stopping-{RUN_ID}-{slot}: stopped" in pool.output
    assert pool.output.count("exited with code 0") == 2
    assert "restart in" not in pool.output
    assert all(process_ended(pid, 10) for pid in pids)


async def test_it_stops_a_child_whose_supervisor_is_killed(start_pool):
    pool = await asyncio.to_thread(start_pool, "orphaned", processes=1)
    child = child_pid(pool, 0)

    pool.kill()
    # The child writes to the same pipe: its lines still arrive.
    await asyncio.to_thread(pool.wait_for_line, rf"worker orphaned-{RUN_ID}-0: stopped")

    assert f"its supervisor (pid {pool.process.pid}) is gone; stopping" in pool.output
    assert await asyncio.to_thread(process_ended, child, 10)


# Consumer names


async def test_it_gives_unnamed_workers_of_one_host_names_of_their_own(start_worker):
    workers = [await asyncio.to_thread(start_worker, None) for _ in range(2)]

    host = socket.gethostname()
    assert f"worker {host}-0: ready" in workers[0].output
    assert f"worker {host}-1: ready" in workers[1].output


async def test_it_refuses_a_name_that_a_live_process_holds(service_env, start_pool):
    pool = await asyncio.to_thread(start_pool, "held", processes=1)
    supervisor = pool.process.pid
    second = ServiceProcess(
        [sys.executable, "manage.py", "run_llm_worker", f"--name=held-{RUN_ID}-0"], env=service_env
    )

    code = await asyncio.to_thread(second.wait)

    assert code == 1
    assert f"consumer name held-{RUN_ID}-0 is in use by process {supervisor}" in second.output
