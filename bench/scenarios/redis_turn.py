"""Figure 5, Redis commands per chat turn: INFO commandstats delta over a few rounds of
200-token replies, divided by the turns, by command.

commandstats also counts the commands a Lua script runs (the emit script's XLEN, XADD,
EXPIRE, PUBLISH...). MONITOR tags those as "lua", so a MONITOR connection running alongside
splits what Grizz sends (round trips, the target's unit) from what its scripts do inside
Redis. The delta batches are the delta frames a socket received.

What is fixed per turn and what comes with each batch is not assumed from Grizz's code but
measured: a second, short round (20-token replies) gives a second point, and the line
through both, sent = fixed + k * batches, gives both numbers.
"""

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass

import redis.asyncio as aioredis

from bench.analysis import Analysis
from bench.config import SHAPE_TURN
from bench.context import Context
from bench.drive import TURN_SLACK_S
from bench.load import ChatClient, Turn
from bench.protocol import ReplyShape
from bench.report import Row, ScenarioResult, Section

BACKGROUND_S = 3.0
FIXED_TARGET = 10
PER_BATCH_TARGET = 1.0
PER_BATCH_NOISE = 0.05  # timer-driven worker chores (lease renewal) land in any window
SHAPE_SHORT = ReplyShape(ttft_ms=SHAPE_TURN.ttft_ms, tokens=20, interval_ms=SHAPE_TURN.interval_ms)


@dataclass
class Counted:
    """The Redis commands of some turns of one shape."""

    analysis: Analysis
    turns: int
    calls: dict[str, int]
    script_calls: Counter[str]
    connections: int  # new connections Redis accepted meanwhile

    def per_turn(self, n: float) -> float:
        return n / max(self.turns, 1)

    @property
    def sent(self) -> float:
        return self.per_turn(sum(self.calls.values()) - sum(self.script_calls.values()))

    @property
    def total(self) -> float:
        return self.per_turn(sum(self.calls.values()))

    @property
    def batches(self) -> float:
        return self.per_turn(self.analysis.frames())


async def run(ctx: Context) -> ScenarioResult:
    clients = await ctx.sockets(ctx.profile.turn_parallel)
    background, background_s = await _background(ctx)
    long = await _counted(ctx, clients, SHAPE_TURN, ctx.profile.turn_rounds)
    short = await _counted(ctx, clients, SHAPE_SHORT, 1)
    idle_per_s = sum(background.values()) / background_s
    return _result(long, short, idle_per_s)


async def _background(ctx: Context) -> tuple[dict[str, int], float]:
    """What Redis sees with the sockets open and nothing happening, for comparison."""
    await ctx.commandstats_reset()
    async with ctx.meter() as meter:
        await asyncio.sleep(min(BACKGROUND_S, ctx.profile.idle_window_s))
    assert meter.usage is not None
    return await ctx.commandstats(), meter.usage.wall_s


async def _counted(
    ctx: Context, clients: list[ChatClient], shape: ReplyShape, rounds: int
) -> Counted:
    script_calls: Counter[str] = Counter()
    started = asyncio.Event()
    url = ctx.deployment.redis_url
    monitor = asyncio.create_task(_count_script_calls(url, script_calls, started))
    await asyncio.wait_for(started.wait(), 10)
    await ctx.commandstats_reset()
    connections = await _connections_received(ctx)
    turns: list[Turn] = []
    for _ in range(rounds):
        timeout = shape.duration_s + TURN_SLACK_S
        turns += await asyncio.gather(*(c.turn(shape.message(), timeout) for c in clients))
    calls = await ctx.commandstats()
    connections = await _connections_received(ctx) - connections
    await asyncio.sleep(0.5)  # let MONITOR's stream catch up before it stops
    monitor.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await monitor
    return Counted(Analysis.of(turns, shape), len(turns), calls, script_calls, connections)


async def _connections_received(ctx: Context) -> int:
    stats = await ctx.redis.info("stats")
    return int(stats["total_connections_received"])


async def _count_script_calls(url: str, counts: Counter[str], started: asyncio.Event) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        async with client.monitor() as monitor:
            started.set()
            async for command in monitor.listen():
                if command.get("client_type") == "lua":
                    counts[command["command"].split(" ", 1)[0].lower()] += 1
    finally:
        await client.aclose()


def _fit(long: Counted, short: Counted) -> tuple[float, float]:
    """(fixed, per batch) of the line through the two points (batches, sent)."""
    spread = long.batches - short.batches
    if spread <= 0:
        return float("nan"), float("nan")
    per_batch = (long.sent - short.sent) / spread
    return long.sent - per_batch * long.batches, per_batch


def _result(long: Counted, short: Counted, idle_per_s: float) -> ScenarioResult:
    result = ScenarioResult("Redis commands per turn")
    fixed, per_batch = _fit(long, short)
    problems = long.analysis.problems + short.analysis.problems
    result.rows.append(
        Row(
            f"Redis commands per chat turn ({SHAPE_TURN.tokens}-token reply)",
            f"{long.sent:.1f} sent in {long.batches:.1f} delta batches = {fixed:.1f} fixed + "
            f"{per_batch:.2f} per batch; {long.total:.1f} counting commands run inside scripts",
            f"≤ {FIXED_TARGET} fixed + ≤ 1 per delta batch",
            not problems
            and fixed <= FIXED_TARGET
            and per_batch <= PER_BATCH_TARGET + PER_BATCH_NOISE,
        )
    )
    if problems:
        result.notes.append(f"{len(problems)} turns failed: {problems[:3]}")
    result.notes.append(
        f"{long.turns} turns of {SHAPE_TURN.tokens} tokens at {SHAPE_TURN.tokens_per_s:g} "
        f"tokens/s ({long.batches:.1f} batches per turn) and {short.turns} of "
        f"{SHAPE_SHORT.tokens} ({short.batches:.1f} batches, {short.sent:.1f} commands sent "
        f"per turn); fixed and per-batch come from the line through both. With nothing "
        f"happening, Redis saw {idle_per_s:.2f} commands/s (timers), part of every window. "
        f"Redis accepted {long.per_turn(long.connections):.2f} new connections per turn in "
        f"the long round, {short.per_turn(short.connections):.2f} in the short one after it "
        "(a new connection starts with HELLO: pools growing, or connections not reused)."
    )
    result.sections.append(_breakdown(long))
    result.data = {
        "long": _data(long),
        "short": _data(short),
        "fit": {"fixed": fixed, "per_batch": per_batch},
        "idle_commands_per_s": idle_per_s,
    }
    return result


def _data(counted: Counted) -> dict[str, object]:
    return {
        "turns": counted.turns,
        "calls": counted.calls,
        "calls_inside_scripts": dict(counted.script_calls),
        "per_turn": {
            "sent": counted.sent,
            "total": counted.total,
            "batches": counted.batches,
            "new_connections": counted.per_turn(counted.connections),
        },
        "failed": counted.analysis.problems[:20],
    }


def _breakdown(counted: Counted) -> Section:
    rows = [
        [
            name,
            f"{counted.per_turn(n):.2f}",
            f"{counted.per_turn(counted.script_calls.get(name.split('|')[0], 0)):.2f}",
        ]
        for name, n in sorted(counted.calls.items(), key=lambda item: -item[1])
    ]
    headers = ["Command", "Calls per turn", "Of which inside scripts"]
    return Section(f"Per {SHAPE_TURN.tokens}-token turn, by command", headers, rows)
