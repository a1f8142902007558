"""daphne alone, the floor under the web's figures: the web's server (`python -m
grizz.server`, with its changes to daphne) serving bench/floor_app.py, Grizz's consumer
with none of Grizz's work. Its sockets are opened as the `open` scenario opens the web's
(the same count, 32 handshakes in flight, until `hello`), then as many sockets as the
capacity target are sent a delta-sized frame 20 times a second each, as the capacity
load's replies send tokens. What the process spends per socket and per frame is what the
web cannot spend less than while daphne serves it (issue 10: "if daphne's share becomes
the limit, say so with numbers")."""

import asyncio

from bench.context import Context
from bench.meter import Usage
from bench.report import Row, ScenarioResult

OPEN_PARALLEL = 32
FRAMES_PER_S = 20  # bench/floor_app.py's rate per socket
SETTLE_S = 2.0  # every socket's frames flowing before the window
WINDOW_S = 8.0
SECONDS_GUESS = 30.0  # for the budget: opening both sets, settling, the window


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("daphne alone: the floor under the web")
    if ctx.budget.remaining() < SECONDS_GUESS:
        result.notes.append("Skipped: time budget.")
        return result
    url = ctx.deployment.floor_start()
    try:
        await ctx.quiesce("floor")
        _open_rows(result, *await _opening(ctx, url, ctx.profile.open_sockets))
        sockets = ctx.profile.capacity_check
        _frame_rows(result, sockets, await _streaming(ctx, url, sockets))
    finally:
        ctx.deployment.floor_stop()
    return result


async def _opening(ctx: Context, url: str, count: int) -> tuple[int, Usage]:
    async with ctx.meter() as meter:
        opened = await ctx.fleet.open("floor-open", [url] * count, parallel=OPEN_PARALLEL)
    await ctx.fleet.close_group("floor-open")
    if opened.failures:
        raise RuntimeError(f"bare daphne: sockets failed to open: {opened.failures[:3]}")
    assert meter.usage is not None
    return len(opened.times), meter.usage


async def _streaming(ctx: Context, url: str, sockets: int) -> Usage:
    await ctx.fleet.open("floor-frames", [url + "?frames=1"] * sockets, parallel=OPEN_PARALLEL)
    try:
        await asyncio.sleep(SETTLE_S)  # not a wait for an event: the window starts in steady state
        async with ctx.meter() as meter:
            await asyncio.sleep(WINDOW_S)
    finally:
        await ctx.fleet.close_group("floor-frames")
    assert meter.usage is not None
    return meter.usage


def _open_rows(result: ScenarioResult, opened: int, usage: Usage) -> None:
    per_socket_ms = usage.cpu_s.get("floor", 0.0) * 1000 / opened
    rate = opened / usage.wall_s
    result.rows.append(
        Row(
            f"daphne alone: CPU per socket opened, {OPEN_PARALLEL} handshakes in flight "
            f"({opened} sockets, until hello; the floor under the web's)",
            f"{per_socket_ms:.2f} ms ({rate:.0f} sockets/s; at most {1000 / per_socket_ms:.0f}/s "
            "on a core of its own)",
        )
    )
    result.data["open"] = {"sockets": opened, "cpu_ms_per_socket": per_socket_ms, "rate": rate}
    result.data["open_usage"] = usage.as_dict()


def _frame_rows(result: ScenarioResult, sockets: int, usage: Usage) -> None:
    frames = sockets * FRAMES_PER_S * usage.wall_s
    cores = usage.cpu_s.get("floor", 0.0) / usage.wall_s
    per_1000 = usage.cpu_s.get("floor", 0.0) / frames * 1000
    result.rows.append(
        Row(
            f"daphne alone: CPU seconds per 1,000 frames sent, {sockets} sockets at "
            f"{FRAMES_PER_S} frames/s (the floor under the web's per token at one token a "
            "frame)",
            f"{per_1000:.3f} s ({cores:.2f} cores)",
        )
    )
    if cores > 0.9:
        result.notes.append(
            f"The bare server was at {cores:.2f} cores: it may have sent fewer frames than "
            "its schedule, so the CPU per frame is an underestimate."
        )
    result.data["frames"] = {
        "sockets": sockets,
        "frames_per_s": FRAMES_PER_S,
        "cpu_s_per_1000_frames": per_1000,
        "cores": cores,
    }
    result.data["frames_usage"] = usage.as_dict()
