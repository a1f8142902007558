"""Figure 3, capacity: the most concurrent streaming conversations (100-token replies at 20
tokens/s, a new message 0-0.2 s after each reply) served with p99 per-token latency under
50 ms and no failed turn. Steps go up the profile's list and stop at the first failure (then
one step halfway back, when there is time) or when the time budget runs out.

Every step runs the same load twice, as in the latency scenario: first straight to the model
server (the load generator's direct clients read the stream as Grizz's worker does), then
through Grizz's sockets; both through the load generator's processes (bench/fleet.py). The
direct run shows what the machine, the model server and the load generator carry by
themselves at that count; its clients' event-loop lag says whether the load generator kept
up. When the steps end below the target, one more direct run at the target count shows that
the bench itself could have carried the target load.

Each step also gives the CPU seconds the web and worker processes spent per 1,000 tokens
delivered, over the whole step (so the per-turn work, transactions and queue, is included);
the fixed-load figures of issue 10 are the `cpu` scenario's.
"""

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

from bench.analysis import Analysis
from bench.context import Context
from bench.drive import Outcome, Plan
from bench.fleet import Played
from bench.load import Turn
from bench.meter import Usage
from bench.report import Row, ScenarioResult, Section

TOKEN_P99_LIMIT_MS = 50.0
CAPACITY_TARGET = 300
CLIENT_LAG_TARGET_MS = 5.0
ROUND_TO = 50
SMALLEST = 5
OPEN_PARALLEL = 32  # handshakes in flight while the step's sockets open
GROUP = "capacity"


@dataclass
class Run:
    """One path's run of a step's load."""

    analysis: Analysis
    usage: Usage
    played: Played
    tokens: int  # delivered during the whole run

    def cpu_per_1000(self, name: str) -> float:
        return self.usage.cpu_s.get(name, math.nan) / max(self.tokens, 1) * 1000

    @property
    def machine_per_1000(self) -> float:
        """The whole machine's busy CPU (every process and the kernel's network work) per
        1,000 tokens delivered."""
        return self.usage.machine_busy_s / max(self.tokens, 1) * 1000

    @property
    def client_lag_p99(self) -> float:
        return self.played.lag.p99


@dataclass
class Step:
    conversations: int
    direct: Run
    grizz: Run
    passed: bool
    reason: str

    @property
    def analysis(self) -> Analysis:
        return self.grizz.analysis

    @property
    def usage(self) -> Usage:
        return self.grizz.usage

    @property
    def tokens(self) -> int:
        return self.grizz.tokens

    def cpu_per_1000(self, name: str) -> float:
        return self.grizz.cpu_per_1000(name)


async def run(ctx: Context) -> ScenarioResult:
    opened = 0
    steps: list[Step] = []
    budget_hit = False
    try:
        for count in _candidates(ctx.profile.capacity_steps, steps):
            if ctx.budget.remaining() < _step_seconds(ctx, count, opened):
                budget_hit = True
                break
            if count > opened:
                await ctx.fleet.open(GROUP, ctx.urls(count - opened), parallel=OPEN_PARALLEL)
                opened = count
            steps.append(await _step(ctx, count))
            ctx.check_alive()
        reach = None
        best = max((s.conversations for s in steps if s.passed), default=0)
        check = ctx.profile.capacity_check
        if best < check and ctx.budget.remaining() > _phase_seconds(ctx) + 5:
            reach = await _path_run(ctx, check, group=None)
    finally:
        await ctx.fleet.close_group(GROUP)
    target_rate = ctx.profile.capacity_check * ctx.profile.capacity_shape.tokens_per_s
    return _result(steps, budget_hit, reach, ctx.profile.capacity_check, target_rate)


def _candidates(ladder: tuple[int, ...], steps: list[Step]) -> Iterator[int]:
    """Up the ladder to the first failure; below its first rung by halves until something
    passes; then once halfway between the best pass and the first failure. A generator, so
    that it sees each step's outcome before choosing the next."""
    for count in ladder:
        yield count
        if not steps[-1].passed:
            break
    while not any(s.passed for s in steps) and steps[-1].conversations // 2 >= SMALLEST:
        yield steps[-1].conversations // 2
    passed = [s.conversations for s in steps if s.passed]
    failed = [s.conversations for s in steps if not s.passed]
    if passed and failed:
        low, high = max(passed), min(failed)
        middle = (
            round((low + high) / 2 / ROUND_TO) * ROUND_TO
            if high > 2 * ROUND_TO
            else (low + high) // 2
        )
        if low < middle < high:
            yield middle


def _phase_seconds(ctx: Context) -> float:
    shape = ctx.profile.capacity_shape
    return shape.duration_s * 2 + ctx.profile.capacity_window_s + 2


def _step_seconds(ctx: Context, count: int, open_now: int) -> float:
    opening = max(count - open_now, 0) / (ctx.open_rate or 20)
    return opening + 2 * _phase_seconds(ctx)


def _plan(ctx: Context, count: int) -> Plan:
    shape = ctx.profile.capacity_shape
    return Plan(
        shape, count, ctx.profile.capacity_window_s, stagger_s=shape.duration_s, think_s=(0, 0.2)
    )


async def _path_run(ctx: Context, count: int, *, group: str | None) -> Run:
    """`count` conversations of the step's load on one path (group None: direct)."""
    await ctx.quiesce(f"capacity {count} {'direct' if group is None else 'Grizz'}")
    async with ctx.meter() as meter:
        played = await ctx.fleet.play(_plan(ctx, count), group=group, seed=count)
    assert meter.usage is not None
    analysis = Analysis.of_outcome(played.outcome, ctx.profile.capacity_shape)
    return Run(analysis, meter.usage, played, _tokens(played.outcome))


async def _step(ctx: Context, count: int) -> Step:
    direct = await _path_run(ctx, count, group=None)
    grizz = await _path_run(ctx, count, group=GROUP)
    reason = _failure(grizz.analysis, grizz.analysis.per_token().p99)
    return Step(count, direct, grizz, not reason, reason)


def _failure(analysis: Analysis, p99: float) -> str:
    if analysis.problems:
        return f"{len(analysis.problems)} failed turns ({analysis.problems[0]})"
    if not analysis.timings:
        return "no turn completed"
    if not p99 < TOKEN_P99_LIMIT_MS:
        return f"p99 per-token {p99:.0f} ms"
    return ""


def _tokens(outcome: Outcome) -> int:
    return sum(_turn_tokens(turn) for turn in outcome.every)


def _turn_tokens(turn: Turn) -> int:
    # Every token is one word, and the first one carries one more (the arrival stamp).
    words = sum(len(content.split()) for _, _, content in turn.deltas)
    return max(words - 1, 0)


def _result(
    steps: list[Step], budget_hit: bool, reach: Run | None, check: int, target_rate: float
) -> ScenarioResult:
    result = ScenarioResult("Capacity")
    passed = [s for s in steps if s.passed]
    failed = [s for s in steps if not s.passed]
    best = max(passed, key=lambda s: s.conversations, default=None)
    smallest = min((s.conversations for s in steps), default=None)
    measured = str(best.conversations) if best else f"< {smallest}" if smallest else "n/a"
    if failed:
        first = min(failed, key=lambda s: s.conversations)
        measured += f" (failed at {first.conversations}: {first.reason})"
    elif budget_hit:
        measured += " (time budget reached before a failure)"
    result.rows.append(
        Row(
            "Concurrent streaming conversations at 20 tokens/s (p99 per-token < 50 ms, no errors)",
            measured,
            f"≥ {CAPACITY_TARGET}",
            bool(best and best.conversations >= CAPACITY_TARGET),
        )
    )
    result.rows += _floor_rows(steps, reach, check)
    result.rows += _machine_rows(steps, reach, check, target_rate)
    reference = best or (steps[0] if steps else None)
    if reference is not None:
        for name in ("web", "worker", "redis"):
            result.rows.append(
                Row(
                    f"CPU seconds per 1,000 streamed tokens, {name} "
                    f"({reference.conversations} conversations, whole step)",
                    f"{reference.cpu_per_1000(name):.3f} s",
                )
            )
    result.sections.append(_table(steps, reach, check))
    result.data = {
        "steps": [_step_data(s) for s in steps],
        "budget_hit": budget_hit,
        "direct_at_target": _run_data(reach) if reach else None,
    }
    return result


def _floor_rows(steps: list[Step], reach: Run | None, check: int) -> list[Row]:
    """Whether the bench could carry the target load itself: the direct path at the target
    count (the largest step at or above it, else the extra run), client lag and failures."""
    at_target = [s for s in steps if s.conversations >= check]
    run, count = (at_target[0].direct, at_target[0].conversations) if at_target else (reach, check)
    if run is None:
        return [Row(f"Direct path at {count} conversations", "not run (time budget)")]
    a = run.analysis
    tokens = a.per_token()
    failed = f", {len(a.problems)} failed turns" if a.problems else ""
    return [
        Row(
            f"Load generator and model server alone: direct path at {count} conversations, "
            "client event-loop lag p99",
            f"{run.client_lag_p99:.1f} ms (per-token p50 {tokens.p50:.1f} / p99 "
            f"{tokens.p99:.1f} ms{failed})",
            f"≤ {CLIENT_LAG_TARGET_MS:g} ms, no failed turn",
            run.client_lag_p99 <= CLIENT_LAG_TARGET_MS and not a.problems,
        )
    ]


def _machine_rows(
    steps: list[Step], reach: Run | None, check: int, target_rate: float
) -> list[Row]:
    """Whether the machine has the cores for the target load: the whole machine's CPU per
    token at the largest step (where the fixed costs weigh least), times the target's
    tokens per second. Above the machine's cores the target cannot pass on this machine
    at that cost per token, whatever the scheduling; the direct path shows what the model
    server and the load generator take of them by themselves."""
    if not steps:
        return []
    largest = max(steps, key=lambda s: s.conversations)
    at_target = [s for s in steps if s.conversations >= check]
    direct = at_target[0].direct if at_target else reach or largest.direct
    grizz_cores = largest.grizz.machine_per_1000 * target_rate / 1000
    direct_cores = direct.machine_per_1000 * target_rate / 1000
    return [
        Row(
            f"Whole machine's CPU seconds per 1,000 tokens at {largest.conversations} "
            "conversations (every process, the kernel's too): Grizz path (direct path)",
            f"{largest.grizz.machine_per_1000:.3f} s ({direct.machine_per_1000:.3f} s)",
        ),
        Row(
            f"Cores the target load ({check} conversations, {target_rate:,.0f} tokens/s) needs "
            "at that cost per token: Grizz path (direct path)",
            f"{grizz_cores:.2f} ({direct_cores:.2f}) of the machine's {os.cpu_count()}",
        ),
    ]


def _table(steps: list[Step], reach: Run | None, check: int) -> Section:
    headers = [
        "Conversations", "Path", "Verdict", "Tokens/s", "Per token p50/p99/max", "TTFT p50/p99",
        "Gap excess p99", "Model late p99", "CPU s/1k tokens web/worker/redis",
        "CPU cores web/worker/redis/model/load", "Other CPU cores", "Client loop lag p99",
    ]  # fmt: skip
    rows = []
    for s in steps:
        rows.append(_run_row(str(s.conversations), "direct", "", s.direct))
        verdict = "pass" if s.passed else f"fail: {s.reason}"
        rows.append(_run_row(str(s.conversations), "Grizz", verdict, s.grizz))
    if reach is not None:
        rows.append(_run_row(str(check), "direct", "(the target load)", reach))
    return Section("Steps (times in ms)", headers, rows)


def _run_row(count: str, path: str, verdict: str, r: Run) -> list[str]:
    a, u = r.analysis, r.usage
    tok, ttft = a.per_token(), a.ttft()
    cores = "/".join(
        f"{u.cpu_s.get(n, 0) / u.wall_s:.2f}" for n in ("web", "worker", "redis", "model", "load")
    )
    per_1k = (
        "—"
        if path == "direct"
        else "/".join(f"{r.cpu_per_1000(n):.3f}" for n in ("web", "worker", "redis"))
    )
    if path == "direct" and a.problems:
        verdict = f"{len(a.problems)} failed ({a.problems[0]})"
    return [
        count,
        path,
        verdict,
        f"{r.tokens / u.wall_s:.0f}",
        f"{tok.p50:.1f} / {tok.p99:.1f} / {tok.max:.0f}",
        f"{ttft.p50:.0f} / {ttft.p99:.0f}",
        f"{a.gap_excess().p99:.1f}",
        f"{a.field('lateness').p99:.1f}",
        per_1k,
        cores,
        f"{u.other_cpu_s / u.wall_s:.2f}",
        f"{r.client_lag_p99:.1f}",
    ]


def _run_data(r: Run) -> dict[str, object]:
    a = r.analysis
    return {
        "tokens": r.tokens,
        "turns": len(a.timings),
        "failed": a.problems[:20],
        "per_token": a.per_token().as_dict(),
        "ttft": a.ttft().as_dict(),
        "gap_excess": a.gap_excess().as_dict(),
        "model_lateness": a.field("lateness").as_dict(),
        "frames_per_turn": a.frames() / max(len(a.timings), 1),
        "cpu_s_per_1000_tokens": {
            n: r.cpu_per_1000(n) for n in ("web", "worker", "redis", "model", "load")
        },
        "machine_cpu_s_per_1000_tokens": r.machine_per_1000,
        "client_loop_lag": r.played.lag.as_dict(),
        "usage": r.usage.as_dict(),
    }


def _step_data(step: Step) -> dict[str, object]:
    return {
        "conversations": step.conversations,
        "passed": step.passed,
        "reason": step.reason,
        "direct": _run_data(step.direct),
        "grizz": _run_data(step.grizz),
    }
