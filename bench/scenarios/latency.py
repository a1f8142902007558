"""Figures 1 and 2: added time to first token, and per-token latency, at each level of
concurrent conversations (1, 50, 200).

At each level the same closed-loop load runs twice: first straight to the model server with
openai.AsyncOpenAI (the baseline), then through Grizz's sockets. Added TTFT is the Grizz
quantile minus the direct quantile (send → first token vs. request → first content chunk).
Per-token latency is absolute: the model server's emit stamp of each token to the moment the
socket frame holding it reached the client. The largest-gap figure compares, per reply, the
longest silence between frames at the client with the longest between tokens at the model.

With one conversation, replies are short (4 tokens) so that the window holds enough turns
for a p99; with more, they are 60 tokens at 20 tokens/s (3 s), and users think 0-0.5 s.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from bench.analysis import Analysis, Summary
from bench.config import SHAPE_CONCURRENT, SHAPE_SINGLE, Profile
from bench.context import Context
from bench.drive import Plan, Turner, run_plan
from bench.load import direct_clients
from bench.meter import Usage
from bench.report import Row, ScenarioResult, Section, ms

TTFT_TARGET_LEVEL = 200
TTFT_P50_TARGET, TTFT_P99_TARGET = 5.0, 25.0
TOKEN_P50_TARGET, TOKEN_P99_TARGET = 2.0, 15.0
GAP_EXCESS_TARGET = 50.0
SINGLE_ROTATION = 10  # conversations the single slot rotates over
LATE_CLIENT_MS = 20.0


@dataclass
class Phase:
    label: str
    analysis: Analysis
    usage: Usage


def _plan(profile: Profile, level: int) -> Plan:
    if level == 1:
        return Plan(SHAPE_SINGLE, 1, profile.latency_single_window_s, 0.5, (0.05, 0.15))
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
    return result


async def _direct_phase(ctx: Context, plan: Plan) -> Phase:
    client, turners = direct_clients(ctx.deployment.model_url, plan.concurrency)
    # The SDK's first request pays for lazy imports and client setup: not a model cost.
    await turners[0].turn(plan.shape.message(), 30)
    try:
        return await _phase(ctx, "direct", turners, plan)
    finally:
        await client.close()


async def _grizz_phase(ctx: Context, plan: Plan) -> Phase:
    count = SINGLE_ROTATION if plan.concurrency == 1 else plan.concurrency
    sockets = await ctx.sockets(count)
    return await _phase(ctx, "Grizz", sockets, plan)


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
    at_target = level == TTFT_TARGET_LEVEL
    tokens, gaps = grizz.analysis.per_token(), grizz.analysis.gap_excess()
    result.rows += [
        _row(f"Added TTFT, {name}, p50", added_p50, TTFT_P50_TARGET if at_target else None),
        _row(f"Added TTFT, {name}, p99", added_p99, TTFT_P99_TARGET if at_target else None),
        _row(f"Per-token latency model → browser, {name}, p50", tokens.p50, TOKEN_P50_TARGET),
        _row(f"Per-token latency model → browser, {name}, p99", tokens.p99, TOKEN_P99_TARGET),
        _row(f"Largest gap at browser minus model's, {name}, p99", gaps.p99, GAP_EXCESS_TARGET),
    ]
    for phase in (direct, grizz):
        if phase.usage.loop_lag.p99 > LATE_CLIENT_MS:
            result.notes.append(
                f"{name}, {phase.label}: the load generator itself was late (event-loop lag "
                f"p99 {phase.usage.loop_lag.p99:.0f} ms): this phase's times include the "
                "client's own delay."
            )
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


def _row(figure: str, value: float, target: float | None) -> Row:
    if target is None:
        return Row(figure, ms(value))
    return Row(figure, ms(value), f"≤ {target:g} ms", value <= target)


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
                f"{u.loop_lag.p99:.1f}",
            ]
        )
    headers = [
        "Path", "Turns", "Failed", "TTFT p50/p99", "Per token p50/p99", "Per token max",
        "Gap excess p50/p99", "Model late p99", "CPU cores (ours)", "Other CPU cores",
        "Bench loop lag p99",
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
        "usage": phase.usage.as_dict(),
    }
