"""Figure 1, CPU per 1,000 streamed tokens at a fixed load: 100 conversations streaming
at 20 tokens/s (each token its own frame) and at 60 tokens/s (where the worker may put
several tokens in one frame).

The capacity steps give CPU per token too, but at whatever count they reach; this measures
it at exactly the loads of issue 10. Each load runs on the direct path, then through Grizz,
both through the load generator's processes (bench/fleet.py), as closed loops of 5 s
replies (1 s in --quick) with a new message 0-0.2 s after each reply. CPU is read from
/proc over a window that starts once every conversation is streaming (after one reply's
duration of staggered starts) and ends before the last replies, so it is the steady state,
per-turn work (transaction, queue, prompt) included in proportion; the tokens are those
whose frame reached a client inside that window. Web + worker is the figure; Redis is
given apart, and so are PostgreSQL, the model server and the load generator.
"""

import asyncio
import time
from dataclasses import dataclass

from bench.analysis import Analysis
from bench.config import shape_cpu
from bench.context import Context
from bench.drive import Outcome, Plan, sleep_until
from bench.fleet import START_AHEAD_S, Played
from bench.meter import Usage
from bench.protocol import ARRIVAL_MARK, ReplyShape
from bench.report import Row, ScenarioResult, Section

GROUP = "cpu"
OPEN_PARALLEL = 32
THINK_S = (0.0, 0.2)
# (tokens/s, target for web + worker CPU seconds per 1,000 tokens)
LOADS = ((20, 0.25), (60, 0.12))
PROCESSES = ("web", "worker", "redis", "postgres", "model", "load")


@dataclass
class Measured:
    path: str
    shape: ReplyShape
    analysis: Analysis
    usage: Usage  # over the window only
    played: Played
    tokens: int  # whose frame reached a client inside the window
    frames: int

    def per_1000(self, *names: str) -> float:
        return sum(self.usage.cpu_s.get(n, 0.0) for n in names) / max(self.tokens, 1) * 1000


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("CPU per 1,000 streamed tokens at a fixed load")
    count = ctx.profile.cpu_conversations
    await ctx.fleet.open(GROUP, ctx.urls(count), parallel=OPEN_PARALLEL)
    measured: list[tuple[Measured, Measured, float]] = []
    try:
        for rate, target in LOADS:
            shape = shape_cpu(rate, ctx.profile.cpu_reply_s)
            if ctx.budget.remaining() < 2 * _seconds(ctx, shape):
                result.notes.append(f"{shape.tokens_per_s:g} tokens/s skipped: time budget")
                continue
            direct = await _measure(ctx, shape, count, group=None)
            grizz = await _measure(ctx, shape, count, group=GROUP)
            ctx.check_alive()
            measured.append((direct, grizz, target))
    finally:
        await ctx.fleet.close_group(GROUP)
    for direct, grizz, target in measured:
        _report(result, count, direct, grizz, target)
    result.sections.append(_table(count, [m for d, g, _ in measured for m in (d, g)]))
    return result


def _seconds(ctx: Context, shape: ReplyShape) -> float:
    return START_AHEAD_S + 2 * shape.duration_s + ctx.profile.cpu_window_s + 3


async def measure_window(
    ctx: Context, plan: Plan, *, group: str | None
) -> tuple[Played, Usage, int, int]:
    """Play `plan` on the fleet and meter only its steady window (after the stagger).
    Returns what was played, the window's usage, and its start and end (ns)."""
    start_ns = time.monotonic_ns() + int(START_AHEAD_S * 1e9)
    window_start = start_ns + int(plan.stagger_s * 1e9)
    window_end = window_start + int(plan.window_s * 1e9)
    playing = asyncio.create_task(ctx.fleet.play(plan, group=group, start_ns=start_ns))
    await sleep_until(window_start)
    async with ctx.meter() as meter:
        await sleep_until(window_end)
    played = await playing
    assert meter.usage is not None
    return played, meter.usage, window_start, window_end


async def _measure(ctx: Context, shape: ReplyShape, count: int, *, group: str | None) -> Measured:
    path = "direct" if group is None else "Grizz"
    plan = Plan(shape, count, ctx.profile.cpu_window_s, shape.duration_s, THINK_S)
    await ctx.quiesce(f"cpu {shape.tokens_per_s:g}/s {path}")
    played, usage, start, end = await measure_window(ctx, plan, group=group)
    tokens, frames = tokens_in_window(played.outcome, start, end)
    analysis = Analysis.of_outcome(played.outcome, shape)
    return Measured(path, shape, analysis, usage, played, tokens, frames)


def tokens_in_window(outcome: Outcome, start: int, end: int) -> tuple[int, int]:
    """Tokens, and frames, that reached a client between `start` and `end` (ns)."""
    tokens = frames = 0
    for turn in outcome.every:
        for t_recv, _, content in turn.deltas:
            if start <= t_recv < end:
                frames += 1
                tokens += sum(not word.startswith(ARRIVAL_MARK) for word in content.split())
    return tokens, frames


def _report(
    result: ScenarioResult, count: int, direct: Measured, grizz: Measured, target: float
) -> None:
    load = f"{count} conversations at {grizz.shape.tokens_per_s:g} tokens/s"
    value = grizz.per_1000("web", "worker")
    failed = grizz.analysis.problems + direct.analysis.problems
    result.rows.append(
        Row(
            f"CPU seconds per 1,000 streamed tokens, web + worker, {load}",
            f"{value:.3f} s (web {grizz.per_1000('web'):.3f}, worker "
            f"{grizz.per_1000('worker'):.3f}; Redis apart {grizz.per_1000('redis'):.3f}; "
            f"{grizz.tokens / max(grizz.frames, 1):.2f} tokens per frame)",
            f"≤ {target:g} s",
            value <= target and not failed,
        )
    )
    g, d = grizz.analysis.per_token(), direct.analysis.per_token()
    result.rows.append(
        Row(
            f"Per-token latency at that load, {load}, p50 / p99: Grizz (direct)",
            f"{g.p50:.1f} / {g.p99:.1f} ms ({d.p50:.1f} / {d.p99:.1f} ms)",
        )
    )
    if failed:
        result.rows.append(Row(f"Failed turns, {load}", str(len(failed)), "0", False))
        result.notes.append(f"{load}: failed turns: {failed[:3]}")
    result.data[load] = {path.path: _data(path) for path in (direct, grizz)}


def _table(count: int, rows: list[Measured]) -> Section:
    headers = [
        "Load", "Path", "Tokens in window", "Tokens/frame", "Per token p50/p99",
        "CPU s/1k tokens " + "/".join(PROCESSES), "Other CPU cores", "Client loop lag p99",
    ]  # fmt: skip
    cells = []
    for m in rows:
        tok = m.analysis.per_token()
        cells.append(
            [
                f"{count} at {m.shape.tokens_per_s:g} tokens/s",
                m.path,
                str(m.tokens),
                f"{m.tokens / max(m.frames, 1):.2f}",
                f"{tok.p50:.1f} / {tok.p99:.1f}",
                "/".join(f"{m.per_1000(n):.3f}" for n in PROCESSES),
                f"{m.usage.other_cpu_s / m.usage.wall_s:.2f}",
                f"{m.played.lag.p99:.1f}",
            ]
        )
    title = (
        f"Steady window of {rows[0].usage.wall_s:.0f} s, {rows[0].shape.duration_s:.0f} s "
        "replies (times in ms)"
        if rows
        else "Steady window"
    )
    return Section(title, headers, cells)


def _data(m: Measured) -> dict[str, object]:
    return {
        "shape": m.shape.__dict__,
        "tokens_in_window": m.tokens,
        "frames_in_window": m.frames,
        "cpu_s_per_1000_tokens": {n: m.per_1000(n) for n in PROCESSES},
        "per_token": m.analysis.per_token().as_dict(),
        "failed": m.analysis.problems[:20],
        "client_loop_lag": m.played.lag.as_dict(),
        "usage": m.usage.as_dict(),
    }
