"""Figure 6, queue dispatch, with an instant model (no wait, one token).

Dispatch is timed from the XADD of the job to the model server receiving the worker's
request: everything the queue and the worker add before the model is asked (the blocking
XREADGROUP waking up, the task start, reply_start's PostgreSQL transaction, the prompt query,
the HTTP request). The XADD time comes from a Redis keyspace notification (enabled only for
this phase) received by the bench; the request arrival is stamped by the model server into
its first token. Both are CLOCK_MONOTONIC. Notifications are matched to turns by order, so
this runs one job at a time. Under load (many conversations at once) the notifications can
no longer be matched, and dispatch is timed from the socket's `queued` frame instead, which
the web process sends right after its XADD.

Throughput: completed chat turns per second with that many conversations sending again as
soon as their reply is done; each turn is one job through the queue.
"""

import asyncio
import bisect
import contextlib
import time

import redis.asyncio as aioredis

from bench.analysis import Analysis, Summary
from bench.config import SHAPE_INSTANT
from bench.context import Context
from bench.drive import Outcome, Plan, run_plan
from bench.report import Row, ScenarioResult, Section, ms

SERIAL_CONVERSATIONS = 20  # rotated over, so that no prompt grows long


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("Queue dispatch")
    serial_clients = await ctx.sockets(SERIAL_CONVERSATIONS)
    xadds: list[int] = []
    watcher = await _watch_job_xadds(ctx, xadds)
    try:
        serial = await run_plan(
            serial_clients, Plan(SHAPE_INSTANT, 1, ctx.profile.queue_serial_s, stagger_s=0.5)
        )
    finally:
        await _stop_watching(ctx, watcher)
    parallel_clients = await ctx.sockets(ctx.profile.queue_parallel)
    plan = Plan(SHAPE_INSTANT, ctx.profile.queue_parallel, ctx.profile.queue_window_s, 1.0)
    await ctx.quiesce("queue, many conversations")
    async with ctx.meter() as meter:
        loaded = await run_plan(parallel_clients, plan)
    ctx.check_alive()
    assert meter.usage is not None
    return _result(result, serial, xadds, loaded, plan, meter.usage.as_dict())


async def _watch_job_xadds(ctx: Context, xadds: list[int]) -> asyncio.Task[None]:
    await ctx.redis.config_set("notify-keyspace-events", "Et")
    client = aioredis.Redis.from_url(ctx.deployment.redis_url, decode_responses=True)
    pubsub = client.pubsub()
    await pubsub.subscribe("__keyevent@0__:xadd")
    jobs_key = ctx.deployment.jobs_stream_key()

    async def watch() -> None:
        try:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message and message["type"] == "message" and message["data"] == jobs_key:
                    xadds.append(time.monotonic_ns())
        finally:
            await pubsub.aclose()
            await client.aclose()

    return asyncio.create_task(watch())


async def _stop_watching(ctx: Context, watcher: asyncio.Task[None]) -> None:
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await ctx.redis.config_set("notify-keyspace-events", "")


def _dispatch_from_xadd(analysis: Analysis, xadds: list[int]) -> Summary:
    """Per turn: the first job XADD seen after the message was sent, to the model request."""
    values = []
    for timing in analysis.timings:
        index = bisect.bisect_left(xadds, timing.t_send)
        if index < len(xadds) and xadds[index] <= timing.arrival:
            values.append(timing.arrival - xadds[index])
    return Summary.of(values)


def _result(
    result: ScenarioResult,
    serial: Outcome,
    xadds: list[int],
    loaded: Outcome,
    plan: Plan,
    usage: dict[str, object],
) -> ScenarioResult:
    one = Analysis.of_outcome(serial, SHAPE_INSTANT)
    many = Analysis.of_outcome(loaded, SHAPE_INSTANT)
    dispatch = _dispatch_from_xadd(one, xadds)
    loaded_dispatch = many.span("t_queued", "arrival")
    jobs_per_s = len(many.timings) / plan.window_s
    errors = one.problems + many.problems
    result.rows += [
        Row(
            "Queue dispatch XADD → worker's model request, one job at a time, p50", ms(dispatch.p50)
        ),
        Row(
            "Queue dispatch XADD → worker's model request, one job at a time, p99", ms(dispatch.p99)
        ),
        Row(
            f"Jobs per second through the queue (instant model, {plan.concurrency} conversations)",
            f"{jobs_per_s:.0f} jobs/s" + (f", {len(errors)} errors" if errors else ""),
            met=False if errors else None,
        ),
    ]
    result.sections.append(
        Section(
            "Dispatch and turn timings (ms)",
            [
                "Load",
                "Turns",
                "XADD → model request",
                "queued frame → model request",
                "send → queued frame",
                "send → first delta",
            ],
            [
                _timing_row("1 job at a time", one, dispatch),
                _timing_row(f"{plan.concurrency} conversations", many, None),
            ],
        )
    )
    if errors:
        result.notes.append(f"{len(errors)} turns failed: {errors[:3]}")
    result.data = {
        "xadd_to_model_request": dispatch.as_dict(),
        "queued_to_model_request_serial": one.span("t_queued", "arrival").as_dict(),
        "queued_to_model_request_loaded": loaded_dispatch.as_dict(),
        "jobs_per_s": jobs_per_s,
        "loaded_usage": usage,
        "errors": errors[:20],
    }
    return result


def _timing_row(label: str, analysis: Analysis, dispatch: Summary | None) -> list[str]:
    def cell(summary: Summary) -> str:
        return f"p50 {summary.p50:.1f} / p99 {summary.p99:.1f}"

    return [
        label,
        str(len(analysis.timings)),
        cell(dispatch) if dispatch else "not matched under load",
        cell(analysis.span("t_queued", "arrival")),
        cell(analysis.span("t_send", "t_queued")),
        cell(analysis.ttft()),
    ]
