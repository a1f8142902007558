"""Autoscaled pools (`run_llm_worker --autoscale MIN,MAX`): real supervisors and children, the
real Redis and PostgreSQL, the fake model holding its replies so that the jobs stay running
until the test lets them go."""

import asyncio
import re
import signal
import time

import pytest

from chat.models import Message
from llmworker.autoscale import SHRINK_SAMPLES_LEAST, Autoscaler
from tests.conftest import RUN_ID
from tests.support.fake_openai import Behaviour
from tests.support.pools import child_pid, process_ended
from tests.support.processes import ServiceProcess
from tests.support.sockets import ChatSocket, chat_opened, message_queued

# Not module-wide: the rule's tests below need neither a loop nor a database.
real_pool = pytest.mark.django_db(transaction=True)

TOKENS = [f" tok{i}" for i in range(5)]
ANSWER = "".join(TOKENS)
CONCURRENCY = 2
AUTOSCALE = ("--autoscale=1,3", "--autoscale-cooldown=1")


async def _backlog_queued(
    user, fake_llm, settings, jobs: int
) -> tuple[list[ChatSocket], list[str]]:
    """`jobs` messages of the user's, each on a conversation of its own, whose replies hold
    after their first token until fake_llm.release()."""
    settings.CHAT_MAX_INFLIGHT_PER_USER = 0
    settings.CHAT_RATE_LIMIT = (0, 60)
    fake_llm.default = Behaviour(tokens=TOKENS, hold_after=1)
    sockets = [await chat_opened(user) for _ in range(jobs)]
    return sockets, [(await message_queued(socket))["job_id"] for socket in sockets]


def _pool_started(start_pool, name: str) -> ServiceProcess:
    # Not waiting for its first child here: the test waits for the ones it needs, on a
    # deadline long enough for three interpreters starting at once on a loaded machine.
    pool: ServiceProcess = start_pool(
        name, processes=1, concurrency=CONCURRENCY, options=AUTOSCALE, ready=False
    )
    return pool


async def _replies_finished(job_ids: list[str], timeout: float = 30) -> list[Message]:
    """The replies, once none of them is queued or streaming any more (as the user's page
    reads them from PostgreSQL)."""
    deadline = time.monotonic() + timeout
    while True:
        replies = [m async for m in Message.objects.filter(job_id__in=job_ids)]
        if all(reply.status not in ("queued", "streaming") for reply in replies):
            return replies
        assert time.monotonic() < deadline, [reply.status for reply in replies]
        await asyncio.sleep(0.1)


@real_pool
async def test_it_grows_to_max_under_a_backlog_and_shrinks_back_after_it(
    alice, fake_llm, settings, start_pool
):
    sockets, jobs = await _backlog_queued(alice, fake_llm, settings, 12)
    pool = await asyncio.to_thread(_pool_started, start_pool, "scaling")

    await asyncio.to_thread(pool.wait_for_line, rf"worker scaling-{RUN_ID}-2: ready", 60)
    # Each of the three processes runs as many replies as its concurrency.
    await asyncio.to_thread(fake_llm.wait_for_active_streams, 3 * CONCURRENCY, 20)
    pids = [child_pid(pool, slot) for slot in range(3)]
    assert not any(process_ended(pid) for pid in pids)
    assert (
        "autoscale: 1 -> 2 processes: backlog 12 above the high water 1.6 "
        "(80% of 1 process x concurrency 2) on 3 samples in a row"
    ) in pool.output
    assert (
        "autoscale: 2 -> 3 processes: backlog 12 above the high water 3.2 "
        "(80% of 2 processes x concurrency 2) on 3 samples in a row"
    ) in pool.output

    await asyncio.to_thread(fake_llm.release)
    replies = await _replies_finished(jobs)
    assert [(r.status, r.content, r.attempt) for r in replies] == [("complete", ANSWER, 1)] * 12

    await asyncio.to_thread(pool.wait_for_line, r"autoscale: 2 -> 1 process:", 60)
    for slot in (2, 1):
        await asyncio.to_thread(
            pool.wait_for_line, rf"slot {slot} \(\S+\): pid {pids[slot]} exited with code 0 "
            r"\(scaled down\)", 40,
        )  # fmt: skip
        assert f"worker scaling-{RUN_ID}-{slot}: stopped" in pool.output
    assert (
        "autoscale: 3 -> 2 processes: backlog 0 below the low water 2 "
        f"(50% of 2 processes x concurrency 2) on {SHRINK_SAMPLES_LEAST} samples in a row"
    ) in pool.output
    assert (
        "autoscale: 2 -> 1 process: backlog 0 below the low water 1 "
        f"(50% of 1 process x concurrency 2) on {SHRINK_SAMPLES_LEAST} samples in a row"
    ) in pool.output
    assert not process_ended(pids[0])
    assert "restart in" not in pool.output, "a slot scaled down is not a crash"
    assert pool.output.count(": started, pid ") == 3
    for socket in sockets:
        await socket.close()


@real_pool
async def test_it_holds_its_size_while_redis_does_not_answer(
    alice, fake_llm, private_redis, service_env, settings, start_pool
):
    service_env["REDIS_URL"] = settings.REDIS_URL  # the private one
    # Three jobs: two processes (3 > 80 % of 2 slots, not of 4), and no step down from two
    # unless the outage were read as an empty queue.
    sockets, jobs = await _backlog_queued(alice, fake_llm, settings, 3)
    pool = await asyncio.to_thread(_pool_started, start_pool, "outage")
    await asyncio.to_thread(pool.wait_for_line, rf"worker outage-{RUN_ID}-1: ready", 60)
    # Every reply streaming, held at the model, its first token through Redis: a worker's
    # frame caught in flight by the outage fails its reply (not the supervisor's doing).
    for socket in sockets:
        await socket.receive_until("delta", timeout=20)
    pids = [child_pid(pool, slot) for slot in (0, 1)]

    private_redis.send_signal(signal.SIGSTOP)  # hung: every call waits for its timeout
    await asyncio.to_thread(pool.wait_for_line, r"autoscale: cannot read the backlog")
    # The outage itself, longer than the pool takes to step down on an empty queue.
    await asyncio.sleep(SHRINK_SAMPLES_LEAST + 5)
    private_redis.send_signal(signal.SIGCONT)
    line = await asyncio.to_thread(pool.wait_for_line, r"autoscale: Redis answers again")

    missed = re.search(r"after (\d+) samples missed", line)
    assert missed and int(missed[1]) > SHRINK_SAMPLES_LEAST
    assert line.rstrip().endswith("backlog 3")
    assert pool.output.count("autoscale: cannot read the backlog") == 1
    assert "autoscale: 2 -> " not in pool.output
    assert pool.process.poll() is None
    assert not any(process_ended(pid) for pid in pids)
    await asyncio.to_thread(fake_llm.release)
    replies = await _replies_finished(jobs)
    assert [(r.status, r.content) for r in replies] == [("complete", ANSWER)] * 3
    for socket in sockets:
        await socket.close()


# The rule alone, on a clock and a backlog of the test's


def _sizes(backlogs: list[int], *, cooldown: float = 0.0, most: int = 4) -> list[int]:
    """The pool's size after each sample, one a second, from one process of concurrency 10."""
    readings = iter(backlogs)
    scaler = Autoscaler(
        least=1, most=most, concurrency=10, cooldown=cooldown, backlog_read=lambda: next(readings)
    )
    sizes, size = [], 1
    for second in range(len(backlogs)):
        size = scaler.size_next(processes=size, now=float(second))
        sizes.append(size)
    return sizes


def test_it_does_not_grow_for_a_burst_shorter_than_three_samples():
    assert _sizes([50, 50, 0, 50, 50, 0]) == [1] * 6


def test_it_does_not_flap_on_a_backlog_between_its_marks():
    # Up to 2 above 8 (80 % of one process's 10); back to 1 only below 5 (50 % of 10).
    sizes = _sizes([9, 9, 9] + [6] * 20 + [4] * 5)
    assert sizes == [1, 1, 2] + [2] * 20 + [2, 2, 2, 2, 1]


def test_it_steps_at_most_once_a_cooldown():
    sizes = _sizes([100] * 12, cooldown=4)
    assert sizes == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4]
