"""Figures 1 and 2: added time to first token, and per-token latency, at each level of
concurrent conversations (1, 200), and added time to first token in a burst (200 sockets
that all send at the same instant, a few rounds).

At each level the same closed-loop load runs twice: first straight to the model server with
openai.AsyncOpenAI (the baseline), then through Grizz's sockets. Added TTFT is the Grizz
quantile minus the direct quantile (send → first token vs. request → first content chunk).
Per-token latency is absolute: the model server's emit stamp of each token to the moment the
socket frame holding it reached the client. The largest-gap figure compares, per reply, the
longest silence between frames at the client with the longest between tokens at the model.

With one conversation, replies are short (4 tokens) so that the window holds enough turns
for a p99; with more, they are 60 tokens at 20 tokens/s (3 s), and users think 0-0.5 s.
One conversation runs in the bench's own process; more run through the load generator's
processes (bench/fleet.py), so the client's own delay stays out of the figures. The burst
runs there too: each process sends its share of the messages at one CLOCK_MONOTONIC
instant, and a round ends when every reply is done.

Last, the floor under the added time to first token: the same two shapes (one socket with
a user's pause between messages; the burst's sockets all at once) on bench/hops.py's way to
a first token, daphne and Channels with the turn's round trips and none of Grizz's work.
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench import hops
from bench.analysis import Analysis, Summary
from bench.config import SHAPE_BURST, SHAPE_CONCURRENT, SHAPE_SINGLE, Profile
from bench.context import Context
from bench.drive import Outcome, Plan, Turner, run_plan
from bench.fleet import START_AHEAD_S
from bench.load import direct_clients
from bench.meter import Usage
from bench.report import Row, ScenarioResult, Section, ms

# Issue 10's targets. Added TTFT: one conversation (closed loop) and the burst; per token:
# p50 and p99 for one conversation, p99 only when many stream at once.
TTFT_TARGETS = {1: (5.0, 15.0)}
BURST_TTFT_P50_TARGET, BURST_TTFT_P99_TARGET = 25.0, 100.0
TOKEN_TARGETS = {1: (2.0, 15.0)}
TOKEN_P99_TARGET_MANY = 50.0
GAP_EXCESS_TARGET = 50.0
BURST_GROUP = "burst"
ROUND_PAUSE_S = 0.5  # after a round's last reply, before the next instant
SINGLE_ROTATION = 10  # conversations the single slot rotates over
SINGLE_THINK_S = (0.05, 0.15)  # one conversation's user pauses between a reply and the next
HOPS_TURNS_PER_S = 8  # one socket's messages on the hops' way, a user's pause between
HOPS_SECONDS_GUESS = 25.0  # for the budget: both shapes, starting and stopping
HOPS_FIGURE = (
    "The first token's hops alone (daphne and Channels, admission's script, two durable "
    "commits, XADD and read, PUBLISH; no model), {}, p50 / p99"
)
LATE_CLIENT_MS = 20.0


@dataclass
class Phase:
    label: str
    analysis: Analysis
    usage: Usage
    client_lag: Summary | None = None  # the load generator's processes, when they played

    @property
    def lag(self) -> Summary:
        return self.client_lag or self.usage.loop_lag


def _plan(profile: Profile, level: int) -> Plan:
    if level == 1:
        return Plan(SHAPE_SINGLE, 1, profile.latency_single_window_s, 0.5, SINGLE_THINK_S)
    stagger = min(3.0, profile.latency_window_s)
    return Plan(SHAPE_CONCURRENT, level, profile.latency_window_s, stagger, (0.0, 0.5))


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("Latency: time to first token and per token")
    for level in ctx.profile.latency_levels:
        plan = _plan(ctx.profile, level)
        needed = 2 * (plan.stagger_s + plan.window_s + plan.shape.duration_s + 2)
        if ctx.budget.remaining() < needed:
            result.notes.append(f"{level} conversations skipped: time budget")
            continue
        direct = await _direct_phase(ctx, plan)
        grizz = await _grizz_phase(ctx, plan)
        ctx.check_alive()
        _level_report(result, level, plan, direct, grizz)
    await _burst(ctx, result)
    await _hops_floor(ctx, result)
    return result


async def _direct_phase(ctx: Context, plan: Plan) -> Phase:
    if plan.concurrency > 1:
        return await _fleet_phase(ctx, "direct", plan, group=None)
    client, turners = direct_clients(ctx.deployment.model_url, plan.concurrency)
    # The SDK's first request pays for lazy imports and client setup: not a model cost.
    await turners[0].turn(plan.shape.message(), 30)
    try:
        return await _phase(ctx, "direct", turners, plan)
    finally:
        await client.aclose()


async def _grizz_phase(ctx: Context, plan: Plan) -> Phase:
    if plan.concurrency > 1:
        group = f"latency-{plan.concurrency}"
        await ctx.fleet.open(group, ctx.urls(plan.concurrency), parallel=32)
        try:
            return await _fleet_phase(ctx, "Grizz", plan, group=group)
        finally:
            await ctx.fleet.close_group(group)
    sockets = await ctx.sockets(SINGLE_ROTATION)
    return await _phase(ctx, "Grizz", sockets, plan)


async def _fleet_phase(ctx: Context, label: str, plan: Plan, *, group: str | None) -> Phase:
    await ctx.quiesce(f"latency {plan.concurrency} {label}")
    async with ctx.meter() as meter:
        played = await ctx.fleet.play(plan, group=group, seed=plan.concurrency)
    assert meter.usage is not None
    return Phase(label, Analysis.of_outcome(played.outcome, plan.shape), meter.usage, played.lag)


async def _phase(ctx: Context, label: str, turners: Sequence[Turner], plan: Plan) -> Phase:
    await ctx.quiesce(f"latency {plan.concurrency} {label}")
    async with ctx.meter() as meter:
        outcome = await run_plan(turners, plan)
    assert meter.usage is not None
    return Phase(label, Analysis.of_outcome(outcome, plan.shape), meter.usage)


def _level_report(
    result: ScenarioResult, level: int, plan: Plan, direct: Phase, grizz: Phase
) -> None:
    name = f"{level} conversation{'s' if level > 1 else ''}"
    d, g = direct.analysis.ttft(), grizz.analysis.ttft()
    added_p50, added_p99 = g.p50 - d.p50, g.p99 - d.p99
    ttft_p50, ttft_p99 = TTFT_TARGETS.get(level, (None, None))
    token_p50, token_p99 = TOKEN_TARGETS.get(level, (None, TOKEN_P99_TARGET_MANY))
    tokens, gaps = grizz.analysis.per_token(), grizz.analysis.gap_excess()
    direct_tokens = direct.analysis.per_token()
    result.rows += [
        _row(
            f"Added TTFT, {name}, p50",
            added_p50,
            ttft_p50,
            f"Grizz {g.p50:.1f}, direct {d.p50:.1f}",
        ),
        _row(
            f"Added TTFT, {name}, p99",
            added_p99,
            ttft_p99,
            f"Grizz {g.p99:.1f}, direct {d.p99:.1f}",
        ),
        _row(
            f"Per-token latency model → browser, {name}, p50",
            tokens.p50,
            token_p50,
            f"direct {direct_tokens.p50:.1f}",
        ),
        _row(
            f"Per-token latency model → browser, {name}, p99",
            tokens.p99,
            token_p99,
            f"direct {direct_tokens.p99:.1f}",
        ),
        _row(f"Largest gap at browser minus model's, {name}, p99", gaps.p99, GAP_EXCESS_TARGET),
    ]
    _late_notes(result, name, [direct, grizz])
    problems = direct.analysis.problems + grizz.analysis.problems
    if problems:
        result.rows.append(Row(f"Failed turns, {name}", str(len(problems)), "0", False))
        result.notes.append(f"{name}: failed turns: {problems[:3]}")
    result.sections += [_phase_table(name, plan, [direct, grizz]), _breakdown(name, grizz)]
    result.data[name] = {
        "shape": plan.shape.__dict__,
        "added_ttft_ms": {"p50": added_p50, "p99": added_p99},
        **{phase.label: _phase_data(phase) for phase in (direct, grizz)},
    }


def _late_notes(result: ScenarioResult, name: str, phases: list[Phase]) -> None:
    for phase in phases:
        if phase.lag.p99 > LATE_CLIENT_MS:
            result.notes.append(
                f"{name}, {phase.label}: the load generator itself was late (event-loop lag "
                f"p99 {phase.lag.p99:.0f} ms): this phase's times include the client's own "
                "delay."
            )


def _row(figure: str, value: float, target: float | None, beside: str = "") -> Row:
    measured = ms(value) + (f" ({beside} ms)" if beside else "")
    if target is None:
        return Row(figure, measured)
    return Row(figure, measured, f"≤ {target:g} ms", value <= target)


async def _burst(ctx: Context, result: ScenarioResult) -> None:
    """`burst_sockets` messages sent at one instant, `burst_rounds` times, directly and
    through Grizz: added TTFT = Grizz's quantile minus the direct path's."""
    count, rounds, shape = ctx.profile.burst_sockets, ctx.profile.burst_rounds, SHAPE_BURST
    needed = 2 * rounds * (shape.duration_s + START_AHEAD_S + 3)
    if ctx.budget.remaining() < needed:
        result.notes.append(f"The burst of {count} was skipped: time budget")
        return
    await ctx.fleet.open(BURST_GROUP, ctx.urls(count), parallel=32)
    try:
        direct = await _burst_phase(ctx, "direct", count, rounds, group=None)
        grizz = await _burst_phase(ctx, "Grizz", count, rounds, group=BURST_GROUP)
    finally:
        await ctx.fleet.close_group(BURST_GROUP)
    ctx.check_alive()
    name = f"burst of {count} sent at once"
    d, g = direct.analysis.ttft(), grizz.analysis.ttft()
    added_p50, added_p99 = g.p50 - d.p50, g.p99 - d.p99
    beside = "Grizz {:.1f}, direct {:.1f}"
    result.rows += [
        _row(
            f"Added TTFT, {name}, p50",
            added_p50,
            BURST_TTFT_P50_TARGET,
            beside.format(g.p50, d.p50),
        ),
        _row(
            f"Added TTFT, {name}, p99",
            added_p99,
            BURST_TTFT_P99_TARGET,
            beside.format(g.p99, d.p99),
        ),
    ]
    _late_notes(result, name, [direct, grizz])
    problems = direct.analysis.problems + grizz.analysis.problems
    if problems:
        result.rows.append(Row(f"Failed turns, {name}", str(len(problems)), "0", False))
        result.notes.append(f"{name}: failed turns: {problems[:3]}")
    plan = Plan(shape, count, 0.0)
    title_plan = f"{rounds} rounds"
    section = _phase_table(name, plan, [direct, grizz])
    section.title = (
        f"{name}: {shape.tokens} tokens at {shape.tokens_per_s:g}/s after {shape.ttft_ms:g} ms, "
        f"{title_plan} (times in ms)"
    )
    result.sections += [section, _breakdown(name, grizz)]
    result.data[name] = {
        "shape": shape.__dict__,
        "rounds": rounds,
        "added_ttft_ms": {"p50": added_p50, "p99": added_p99},
        **{phase.label: _phase_data(phase) for phase in (direct, grizz)},
    }


async def _hops_floor(ctx: Context, result: ScenarioResult) -> None:
    """bench/hops.py's way to a first token, one socket at a time and in a burst: the
    floor that Grizz's added time to first token stands on here."""
    if ctx.budget.remaining() < HOPS_SECONDS_GUESS:
        result.notes.append("The first token's hops alone were skipped: time budget")
        return
    profile = ctx.profile
    url = ctx.deployment.floor_start()
    try:
        ctx.deployment.hops_worker_start()
        turns = int(profile.latency_single_window_s * HOPS_TURNS_PER_S)
        single = Summary.of(await hops.single(url, turns, SINGLE_THINK_S))
        many = Summary.of(
            await hops.burst(url, profile.burst_sockets, profile.burst_rounds, ROUND_PAUSE_S)
        )
    finally:
        ctx.deployment.hops_worker_stop()
        ctx.deployment.floor_stop()
    result.rows += [
        Row(
            HOPS_FIGURE.format("1 conversation"),
            f"{single.p50:.1f} / {single.p99:.1f} ms ({single.n} turns)",
        ),
        Row(
            HOPS_FIGURE.format(f"burst of {profile.burst_sockets} sent at once"),
            f"{many.p50:.1f} / {many.p99:.1f} ms ({profile.burst_rounds} rounds; one client "
            "process)",
        ),
    ]
    result.data["hops_alone"] = {"single": single.as_dict(), "burst": many.as_dict()}


async def _burst_phase(
    ctx: Context, label: str, count: int, rounds: int, *, group: str | None
) -> Phase:
    """Each round: every process sends its share at one instant; the next round starts
    once every reply of this one is done (and Grizz is quiet again)."""
    turns = Outcome([], [], [], 0, 0)
    lags: list[int] = []
    await ctx.quiesce(f"burst {label}")
    async with ctx.meter() as meter:
        for index in range(rounds):
            if index:
                await ctx.quiesce(f"burst {label} round {index + 1}", most_s=15)
            instant = time.monotonic_ns() + int((START_AHEAD_S + ROUND_PAUSE_S) * 1e9)
            played = await ctx.fleet.burst(SHAPE_BURST, count, group=group, instants=[instant])
            turns.turns += played.outcome.turns
            turns.every += played.outcome.every
            lags += played.lags_ns
    assert meter.usage is not None
    return Phase(label, Analysis.of_outcome(turns, SHAPE_BURST), meter.usage, Summary.of(lags))


def _cell(summary: Summary) -> str:
    return f"{summary.p50:.1f} / {summary.p99:.1f}"


def _phase_table(name: str, plan: Plan, phases: list[Phase]) -> Section:
    rows = []
    for phase in phases:
        a, u = phase.analysis, phase.usage
        cores = {k: v / u.wall_s for k, v in u.cpu_s.items()}
        rows.append(
            [
                phase.label,
                str(len(a.timings)),
                str(len(a.problems)),
                _cell(a.ttft()),
                _cell(a.per_token()),
                f"{a.per_token().max:.1f}",
                _cell(a.gap_excess()),
                f"{a.field('lateness').p99:.1f}",
                " ".join(f"{k} {v:.2f}" for k, v in cores.items() if v >= 0.01),
                f"{u.other_cpu_s / u.wall_s:.2f}",
                f"{phase.lag.p99:.1f}",
            ]
        )
    headers = [
        "Path", "Turns", "Failed", "TTFT p50/p99", "Per token p50/p99", "Per token max",
        "Gap excess p50/p99", "Model late p99", "CPU cores (ours)", "Other CPU cores",
        "Client loop lag p99",
    ]  # fmt: skip
    title = (
        f"{name}: {plan.shape.tokens} tokens at {plan.shape.tokens_per_s:g}/s after "
        f"{plan.shape.ttft_ms:g} ms, {plan.window_s:g} s window (times in ms)"
    )
    return Section(title, headers, rows)


# Consecutive steps of one turn through Grizz: (label, from, to).
_STEPS = [
    ("send → queued frame (web: transaction, XADD)", "t_send", "t_queued"),
    ("queued frame → model request (queue, worker, PostgreSQL)", "t_queued", "arrival"),
    ("model request → first token (the model's own TTFT)", "arrival", "first_emit"),
    ("first token → browser (Redis, web, socket)", "first_emit", "first_recv"),
]


def _breakdown(name: str, grizz: Phase) -> Section:
    rows = [[label, _cell(grizz.analysis.span(a, b))] for label, a, b in _STEPS]
    title = f"{name}: where Grizz's time to first token goes (ms)"
    return Section(title, ["Step", "p50 / p99"], rows)


def _phase_data(phase: Phase) -> dict[str, object]:
    a = phase.analysis
    return {
        "turns": len(a.timings),
        "failed": a.problems[:20],
        "ttft": a.ttft().as_dict(),
        "per_token": a.per_token().as_dict(),
        "gap_excess": a.gap_excess().as_dict(),
        "browser_gap": a.field("browser_gap").as_dict(),
        "model_gap": a.field("model_gap").as_dict(),
        "model_lateness": a.field("lateness").as_dict(),
        "send_to_queued": a.span("t_send", "t_queued").as_dict(),
        "queued_to_model_request": a.span("t_queued", "arrival").as_dict(),
        "model_request_to_first_emit": a.span("arrival", "first_emit").as_dict(),
        "first_emit_to_first_recv": a.span("first_emit", "first_recv").as_dict(),
        "frames_per_turn": a.frames() / max(len(a.timings), 1),
        "client_loop_lag": phase.lag.as_dict(),
        "usage": phase.usage.as_dict(),
    }
