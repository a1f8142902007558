"""Figure 5, Redis commands per chat turn: INFO commandstats delta over a few rounds of
200-token replies, divided by the turns, by command.

commandstats also counts the commands a Lua script runs (the emit script's XLEN, XADD,
EXPIRE, PUBLISH...). MONITOR tags those as "lua", so a MONITOR connection running alongside
splits what Grizz sends (round trips, the target's unit) from what its scripts do inside
Redis. The delta batches are the delta frames a socket received.

What is fixed per turn and what comes with each batch is not assumed from Grizz's code but
measured: a second, short round (20-token replies) gives a second point, and the line
through both, sent = fixed + k * batches, gives both numbers.

MONITOR lists a script call (EVALSHA) before the commands it runs, and Redis runs one
command at a time, so each `lua` line belongs to the script call listed last: that gives
the commands run inside each call, by script. The per-batch emit script is the script
called most often (once per delta batch); its commands per call are a figure of their own.
"""

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from bench.analysis import Analysis
from bench.config import SHAPE_TURN
from bench.context import Context
from bench.drive import TURN_SLACK_S
from bench.load import ChatClient, Turn
from bench.protocol import ReplyShape
from bench.report import Row, ScenarioResult, Section

BACKGROUND_S = 3.0
FIXED_TARGET = 8
PER_BATCH_TARGET = 1.0
INSIDE_SCRIPT_TARGET = 4  # commands run inside the per-batch emit script, per call
SCRIPT_CALLS = {"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"}
PER_BATCH_NOISE = 0.05  # timer-driven worker chores (lease renewal) land in any window
SHAPE_SHORT = ReplyShape(ttft_ms=SHAPE_TURN.ttft_ms, tokens=20, interval_ms=SHAPE_TURN.interval_ms)


@dataclass
class Script:
    """The calls of one Lua script (by SHA) and the commands they ran inside Redis."""

    calls: int = 0
    inside: Counter[str] = field(default_factory=Counter)
    per_call: Counter[int] = field(default_factory=Counter)  # commands inside -> calls

    @property
    def inside_per_call(self) -> float:
        return sum(self.inside.values()) / max(self.calls, 1)

    @property
    def most_inside(self) -> int:
        return max(self.per_call, default=0)


@dataclass
class Counted:
    """The Redis commands of some turns of one shape."""

    analysis: Analysis
    turns: int
    calls: dict[str, int]
    script_calls: Counter[str]
    scripts: dict[str, Script]  # by SHA (its first 8 characters)
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

    def emit_script(self) -> tuple[str, Script] | None:
        """The per-batch script: the one called most often."""
        return max(self.scripts.items(), key=lambda item: item[1].calls, default=None)


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
    scripts: dict[str, Script] = {}
    started = asyncio.Event()
    url = ctx.deployment.redis_url
    monitor = asyncio.create_task(_count_script_calls(url, script_calls, scripts, started))
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
    analysis = Analysis.of(turns, shape)
    return Counted(analysis, len(turns), calls, script_calls, scripts, connections)


async def _connections_received(ctx: Context) -> int:
    stats = await ctx.redis.info("stats")
    return int(stats["total_connections_received"])


async def _count_script_calls(
    url: str, counts: Counter[str], scripts: dict[str, Script], started: asyncio.Event
) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    current: Script | None = None  # the script call MONITOR listed last
    inside = 0
    try:
        async with client.monitor() as monitor:
            started.set()
            async for command in monitor.listen():
                words = command["command"].split(" ", 2)
                name = words[0].lower()
                if command.get("client_type") == "lua":
                    counts[name] += 1
                    if current is not None:
                        current.inside[name] += 1
                        inside += 1
                    continue
                if current is not None:
                    current.per_call[inside] += 1
                    current = None
                if name in SCRIPT_CALLS and len(words) > 1:
                    current = scripts.setdefault(words[1][:8], Script())
                    current.calls += 1
                    inside = 0
    finally:
        if current is not None:
            current.per_call[inside] += 1
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
    result.rows.append(_inside_row(long))
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
    result.sections += [_breakdown(long), _scripts_table(long)]
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
        "scripts": {
            sha: {
                "calls": script.calls,
                "inside": dict(script.inside),
                "inside_per_call": script.inside_per_call,
                "calls_by_commands_inside": {str(k): v for k, v in script.per_call.items()},
            }
            for sha, script in counted.scripts.items()
        },
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


def _inside_row(counted: Counted) -> Row:
    figure = "Redis commands run inside the per-batch emit script, per call"
    found = counted.emit_script()
    if found is None:
        return Row(figure, "no script call seen", f"≤ {INSIDE_SCRIPT_TARGET}", False)
    sha, script = found
    by_command = ", ".join(
        f"{name} {n / script.calls:.2f}" for name, n in script.inside.most_common()
    )
    return Row(
        figure,
        f"{script.inside_per_call:.2f} (max {script.most_inside}; {by_command}; script "
        f"{sha}, {counted.per_turn(script.calls):.1f} calls per turn)",
        f"≤ {INSIDE_SCRIPT_TARGET}",
        script.inside_per_call <= INSIDE_SCRIPT_TARGET,
    )


def _scripts_table(counted: Counted) -> Section:
    rows = [
        [
            sha,
            f"{counted.per_turn(script.calls):.2f}",
            f"{script.inside_per_call:.2f}",
            ", ".join(f"{k}: {v}" for k, v in sorted(script.per_call.items())),
            ", ".join(
                f"{name} {n / max(script.calls, 1):.2f}" for name, n in script.inside.most_common()
            ),
        ]
        for sha, script in sorted(counted.scripts.items(), key=lambda item: -item[1].calls)
    ]
    headers = [
        "Script (SHA)", "Calls per turn", "Commands inside per call",
        "Calls by commands inside (n: calls)", "Inside, per call, by command",
    ]  # fmt: skip
    return Section(f"Per {SHAPE_TURN.tokens}-token turn, by script call (MONITOR)", headers, rows)
