"""Figure 5, opening sockets: how fast one web process opens authenticated chat sockets
(handshake, token, conversation, subscribe, until the `hello` frame arrives), with 32
handshakes in flight; and a reconnect wave, what a web restart causes: 1,000 sockets opened
at the same instant, each timed to its `hello`.

Both run through the load generator's processes (bench/fleet.py): a client handshake costs
the client real CPU too, and one process opening hundreds a second would time its own
delay. The sockets send no message, so their conversations are free again afterwards.
"""

import time

from bench.context import Context
from bench.fleet import START_AHEAD_S, Opened
from bench.meter import Usage
from bench.report import Row, ScenarioResult, Section

PARALLEL = 32
RATE_TARGET = 500  # sockets opened per second
WAVE_TARGET_S = 5.0
WAVE_OPEN_TIMEOUT_S = 30.0  # the client's; daphne's own handshake timeouts come first
SECONDS_PER_SOCKET_GUESS = 1 / 50  # for the budget, before anything was measured


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("Opening sockets")
    await ctx.close_sockets()
    first_seed = ctx.pool.next_seed
    rate_count, wave_count = ctx.profile.open_sockets, ctx.profile.open_wave
    per_socket = 1 / ctx.open_rate if ctx.open_rate else SECONDS_PER_SOCKET_GUESS
    try:
        started = time.monotonic_ns()
        async with ctx.meter() as meter:
            steady = await ctx.fleet.open("open-rate", ctx.urls(rate_count), parallel=PARALLEL)
        steady_s = (time.monotonic_ns() - started) / 1e9
        async with ctx.meter() as closing:
            await ctx.fleet.close_group("open-rate")
        ctx.check_alive()
        _rate_rows(result, steady, rate_count)
        assert meter.usage is not None and closing.usage is not None
        _cpu_rows(result, meter.usage, len(steady.times))
        _close_rows(result, closing.usage, len(steady.times))
        wave = None
        if ctx.budget.remaining() - ctx.profile.idle_leaves_s > wave_count * per_socket * 2:
            await ctx.quiesce("reconnect wave")
            at_ns = time.monotonic_ns() + int(START_AHEAD_S * 1e9)
            urls = ctx.urls(wave_count)
            wave = await ctx.fleet.open(
                "wave", urls, parallel=None, timeout=WAVE_OPEN_TIMEOUT_S, at_ns=at_ns
            )
            await ctx.fleet.close_group("wave")
            ctx.check_alive()
            _wave_rows(result, wave, wave_count, at_ns)
        else:
            result.notes.append("The reconnect wave was skipped: time budget.")
    finally:
        ctx.pool.next_seed = first_seed  # no message was sent on these conversations
    result.sections.append(_table(steady, wave))
    result.data["took_s_steady"] = steady_s
    return result


def _rate_rows(result: ScenarioResult, opened: Opened, count: int) -> None:
    span_s = opened.span_ns() / 1e9
    rate = len(opened.times) / span_s if span_s else 0.0
    result.rows.append(
        Row(
            f"Sockets opened per second by one web process, {PARALLEL} handshakes in flight "
            f"({count} sockets, until hello)",
            f"{rate:.0f}/s" + (f", {len(opened.failures)} failed" if opened.failures else ""),
            f"≥ {RATE_TARGET}/s",
            rate >= RATE_TARGET and not opened.failures,
        )
    )
    if opened.failures:
        result.notes.append("First failures (steady): " + "; ".join(opened.failures[:3]))
    result.data["steady"] = _data(opened, rate=rate)


def _cpu_rows(result: ScenarioResult, usage: Usage, opened: int) -> None:
    # The steady phase's CPU over its sockets: the figure that holds on a noisy machine,
    # where the rate also measures what else ran meanwhile.
    per_socket = {name: s * 1000 / opened for name, s in usage.cpu_s.items()} if opened else {}

    def ms(name: str) -> str:
        return f"{per_socket.get(name, 0.0):.2f}"

    result.rows.append(
        Row(
            f"Web CPU per socket opened, {PARALLEL} handshakes in flight",
            f"{ms('web')} ms (PostgreSQL {ms('postgres')}, Redis {ms('redis')}, "
            f"load generator {ms('load')} ms)",
        )
    )
    result.data["steady_usage"] = usage.as_dict()
    result.data["steady_cpu_ms_per_socket"] = {k: round(v, 3) for k, v in per_socket.items()}


def _close_rows(result: ScenarioResult, usage: Usage, closed: int) -> None:
    # The client closes; the web's share is its disconnect path (the consumer's, the
    # hub's unsubscribe, daphne's).
    per_socket = usage.cpu_s.get("web", 0.0) * 1000 / closed if closed else 0.0
    result.rows.append(Row("Web CPU per socket closed by its client", f"{per_socket:.2f} ms"))
    result.data["close_usage"] = usage.as_dict()
    result.data["close_web_cpu_ms_per_socket"] = round(per_socket, 3)


def _wave_rows(result: ScenarioResult, opened: Opened, count: int, at_ns: int) -> None:
    all_s = opened.span_ns(at_ns) / 1e9
    times = opened.per_socket()
    failed = len(opened.failures)
    result.rows.append(
        Row(
            f"Reconnect wave: {count} sockets opened at once, time until all got hello",
            f"{all_s:.2f} s (per socket p50 {times.p50:.0f} / p99 {times.p99:.0f} / max "
            f"{times.max:.0f} ms; {failed} failed)",
            f"≤ {WAVE_TARGET_S:g} s, none failed",
            all_s <= WAVE_TARGET_S and not failed and len(opened.times) == count,
        )
    )
    if failed:
        result.notes.append("First failures (wave): " + "; ".join(opened.failures[:3]))
    result.data["wave"] = _data(opened, all_s=all_s)


def _data(opened: Opened, **extra: float) -> dict[str, object]:
    return {
        "opened": len(opened.times),
        "failed": len(opened.failures),
        "failures": opened.failures[:10],
        "per_socket": opened.per_socket().as_dict(),
        **extra,
    }


def _table(steady: Opened, wave: Opened | None) -> Section:
    rows = []
    for label, opened in ((f"{PARALLEL} in flight", steady), ("all at once", wave)):
        if opened is None:
            continue
        t = opened.per_socket()
        rows.append(
            [
                label,
                str(len(opened.times)),
                str(len(opened.failures)),
                f"{opened.span_ns() / 1e9:.2f} s",
                f"{t.p50:.0f} / {t.p99:.0f} / {t.max:.0f}",
            ]
        )
    headers = ["Opening", "Opened", "Failed", "First start → last hello", "Per socket p50/p99/max"]
    return Section("Sockets opened (per socket: connect → hello, ms)", headers, rows)
