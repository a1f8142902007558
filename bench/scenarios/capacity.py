"""Figure 3, capacity: the most concurrent streaming conversations (100-token replies at 20
tokens/s, a new message 0-0.2 s after each reply) served with p99 per-token latency under
50 ms and no failed turn. Steps go up the profile's list and stop at the first failure (then
one step halfway back, when there is time) or when the time budget runs out.

Each step also gives the CPU seconds the web and worker processes spent per 1,000 tokens
delivered, over the whole step (so the per-turn work, transactions and queue, is included).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

from bench.analysis import Analysis
from bench.context import Context
from bench.drive import Outcome, Plan, run_plan
from bench.load import ChatClient, Turn
from bench.meter import Usage
from bench.report import Row, ScenarioResult, Section

TOKEN_P99_LIMIT_MS = 50.0
CAPACITY_TARGET = 500
ROUND_TO = 50
SMALLEST = 5


@dataclass
class Step:
    conversations: int
    analysis: Analysis
    usage: Usage
    tokens: int  # delivered during the whole step
    passed: bool
    reason: str

    def cpu_per_1000(self, name: str) -> float:
        return self.usage.cpu_s.get(name, math.nan) / max(self.tokens, 1) * 1000


async def run(ctx: Context) -> ScenarioResult:
    mine: list[ChatClient] = []
    steps: list[Step] = []
    budget_hit = False
    for count in _candidates(ctx.profile.capacity_steps, steps):
        if ctx.budget.remaining() < _step_seconds(ctx, count, len(mine)):
            budget_hit = True
            break
        if count > len(mine):
            mine += await ctx.sockets(count - len(mine))
        steps.append(await _step(ctx, mine[:count]))
        ctx.check_alive()
    return _result(steps, budget_hit)


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


def _step_seconds(ctx: Context, count: int, open_now: int) -> float:
    opening = max(count - open_now, 0) / (ctx.open_rate or 20)
    shape = ctx.profile.capacity_shape
    return opening + shape.duration_s * 2 + ctx.profile.capacity_window_s + 2


async def _step(ctx: Context, sockets: list[ChatClient]) -> Step:
    plan = Plan(
        ctx.profile.capacity_shape,
        len(sockets),
        ctx.profile.capacity_window_s,
        stagger_s=ctx.profile.capacity_shape.duration_s,
        think_s=(0.0, 0.2),
    )
    await ctx.quiesce(f"capacity {len(sockets)}")
    async with ctx.meter() as meter:
        outcome = await run_plan(sockets, plan)
    assert meter.usage is not None
    analysis = Analysis.of_outcome(outcome, ctx.profile.capacity_shape)
    p99 = analysis.per_token().p99
    reason = _failure(analysis, p99)
    return Step(len(sockets), analysis, meter.usage, _tokens(outcome), not reason, reason)


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


def _result(steps: list[Step], budget_hit: bool) -> ScenarioResult:
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
    reference = best or (steps[0] if steps else None)
    if reference is not None:
        for name in ("web", "worker"):
            result.rows.append(
                Row(
                    f"CPU seconds per 1,000 streamed tokens, {name} "
                    f"({reference.conversations} conversations)",
                    f"{reference.cpu_per_1000(name):.3f} s",
                )
            )
    result.sections.append(_table(steps))
    result.data = {"steps": [_step_data(s) for s in steps], "budget_hit": budget_hit}
    return result


def _table(steps: list[Step]) -> Section:
    headers = [
        "Conversations", "Verdict", "Tokens/s", "Per token p50/p99/max", "TTFT p50/p99",
        "Gap excess p99", "Model late p99", "CPU s/1k tokens web/worker",
        "CPU cores web/worker/model/redis/bench", "Other CPU cores", "Bench loop lag p99",
    ]  # fmt: skip
    rows = []
    for s in steps:
        a, u = s.analysis, s.usage
        tok, ttft = a.per_token(), a.ttft()
        cores = "/".join(
            f"{u.cpu_s.get(n, 0) / u.wall_s:.2f}"
            for n in ("web", "worker", "model", "redis", "bench")
        )
        rows.append(
            [
                str(s.conversations),
                "pass" if s.passed else f"fail: {s.reason}",
                f"{s.tokens / u.wall_s:.0f}",
                f"{tok.p50:.1f} / {tok.p99:.1f} / {tok.max:.0f}",
                f"{ttft.p50:.0f} / {ttft.p99:.0f}",
                f"{a.gap_excess().p99:.1f}",
                f"{a.field('lateness').p99:.1f}",
                f"{s.cpu_per_1000('web'):.3f} / {s.cpu_per_1000('worker'):.3f}",
                cores,
                f"{u.other_cpu_s / u.wall_s:.2f}",
                f"{u.loop_lag.p99:.1f}",
            ]
        )
    return Section("Steps (times in ms)", headers, rows)


def _step_data(step: Step) -> dict[str, object]:
    a = step.analysis
    return {
        "conversations": step.conversations,
        "passed": step.passed,
        "reason": step.reason,
        "tokens": step.tokens,
        "turns": len(a.timings),
        "failed": a.problems[:20],
        "per_token": a.per_token().as_dict(),
        "ttft": a.ttft().as_dict(),
        "gap_excess": a.gap_excess().as_dict(),
        "model_lateness": a.field("lateness").as_dict(),
        "frames_per_turn": a.frames() / max(len(a.timings), 1),
        "cpu_s_per_1000_tokens": {n: step.cpu_per_1000(n) for n in ("web", "worker", "model")},
        "usage": step.usage.as_dict(),
    }
