"""Where web and worker spend their CPU (`--profile` only): a fixed load (100 conversations
at 20 tokens/s) of its own, during which py-spy samples both processes at once for 15 s.

py-spy (requirements-dev.txt, diagnosis only) is a sampling profiler in another process;
with `--nonblocking` it reads the target's memory without stopping it, but it still costs
the machine CPU, so it runs in this phase alone and never while a figure is measured. The
raw output (one line per distinct stack, `frame;frame;... count`, aggregated by function
with `--function`; `profile/web.txt` and `profile/worker.txt` in the logs folder, kept
with `--keep-logs`) gives each function's own time (samples where it is the innermost
frame) and cumulative time (samples where it is anywhere on the stack, counted once).

Only samples of the thread that holds the GIL are taken (`--gil`): that is Python's CPU,
uvloop's and Twisted's C parts included. Without it py-spy also counted an event loop
waiting in epoll (uvloop waits inside `Runner.run`, so no leaf tells it apart) and the
database threads waiting for PostgreSQL. System calls made without the GIL (psycopg's
socket I/O) are left out, so the shares are of the Python side of each process. The
cumulative table leaves out the frames every sample of a thread passes through (the
interpreter's, daphne's and Django's entry points, the event loop, the thread pool).
"""

import asyncio
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.config import shape_cpu
from bench.context import Context
from bench.drive import Plan
from bench.fleet import START_AHEAD_S
from bench.report import Row, ScenarioResult, Section
from bench.scenarios.cpu import OPEN_PARALLEL, THINK_S, measure_window

GROUP = "profile"
TOP = 15
RATE = 100  # samples per second (py-spy's default)
# py-spy's idle detection misses an event loop blocked in epoll_wait; those samples are the
# loop waiting, not CPU, and are left out (other waits, e.g. psycopg's, stay: they are shown).
WAITING_LEAVES = ("EpollSelector.select (",)
# Entry points and loops on the stack of every sample of their thread: not where time goes.
PLUMBING = (
    "<frozen runpy>", "daphne/cli.py", "daphne/server.py", "grizz/server.py", "manage.py",
    "django/core/management/", "asyncio/runners.py", "asyncio/base_events.py",
    "asyncio/events.py", "threading.py", "concurrent/futures/thread.py",
    "twisted/internet/asyncioreactor.py", "twisted/python/log.py", "twisted/python/context.py",
    "asgiref/sync.py",
)  # fmt: skip


@dataclass
class Profiled:
    process: str
    samples: int
    own: Counter[str]
    cumulative: Counter[str]
    error: str = ""


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("Where the CPU goes (py-spy)")
    binary = py_spy()
    if binary is None:
        result.rows.append(Row("Profile of web and worker", "skipped: py-spy is not installed"))
        return result
    count, seconds = ctx.profile.profile_conversations, ctx.profile.profile_s
    shape = shape_cpu(20, ctx.profile.cpu_reply_s)
    await ctx.fleet.open(GROUP, ctx.urls(count), parallel=OPEN_PARALLEL)
    # Beside the logs: with --keep-logs, the raw stacks stay for a flame graph or a closer look.
    out = ctx.deployment.logs / "profile"
    out.mkdir(exist_ok=True)
    try:
        await ctx.quiesce("profile")
        plan = Plan(shape, count, seconds + 1, shape.duration_s, THINK_S)
        recording = asyncio.create_task(_record_after(ctx, binary, out, plan.stagger_s, seconds))
        await measure_window(ctx, plan, group=GROUP)
        profiles = await recording
    finally:
        await ctx.fleet.close_group(GROUP)
    load = f"{count} conversations at {shape.tokens_per_s:g} tokens/s, {seconds:g} s"
    for p in profiles:
        result.rows.append(
            Row(
                f"Profile of {p.process} under {load}",
                p.error or f"{p.samples} samples, top function by own time: {_top_name(p)}",
            )
        )
        if not p.error:
            result.sections += _sections(p, load)
    result.data = {
        p.process: {
            "samples": p.samples,
            "own": p.own.most_common(TOP),
            "cumulative": p.cumulative.most_common(TOP),
            "error": p.error,
        }
        for p in profiles
    }
    return result


async def _record_after(
    ctx: Context, binary: str, out: Path, delay_s: float, seconds: float
) -> list[Profiled]:
    """py-spy on web and on worker at the same time, once every conversation streams."""
    await asyncio.sleep(START_AHEAD_S + delay_s)  # the steady state
    pids = {name: ctx.deployment.pids[name] for name in ("web", "worker")}
    return list(
        await asyncio.gather(
            *(_record(binary, name, pid, out, seconds) for name, pid in pids.items())
        )
    )


async def _record(binary: str, name: str, pid: int, out: Path, seconds: float) -> Profiled:
    path = out / f"{name}.txt"
    args = [binary, "record", "-p", str(pid), "-f", "raw", "--nonblocking", "--function", "--gil"]
    args += ["-r", str(RATE), "-d", f"{seconds:g}", "-o", str(path)]
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0 or not path.exists():
        text = output.decode(errors="replace").strip().splitlines()
        return Profiled(name, 0, Counter(), Counter(), f"py-spy failed: {text[-1:]}")
    return _parse(name, path.read_text())


def _parse(name: str, raw: str) -> Profiled:
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        if frames[-1].startswith(WAITING_LEAVES):
            continue
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            if not any(part in frame for part in PLUMBING):
                cumulative[frame] += count
    return Profiled(name, samples, own, cumulative)


def _short(frame: str) -> str:
    """`function (/long/path/site-packages/pkg/mod.py:12)` → `function (pkg/mod.py:12)`."""
    function, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    else:
        root = str(Path(__file__).resolve().parent.parent.parent) + "/"
        where = where.removeprefix(root)
    return f"{function} ({where})" if where else function


def _top_name(p: Profiled) -> str:
    if not p.own:
        return "none"
    frame, count = p.own.most_common(1)[0]
    return f"{frame} {100 * count / max(p.samples, 1):.1f} %"


def _sections(p: Profiled, load: str) -> list[Section]:
    def rows(counter: Counter[str]) -> list[list[str]]:
        return [
            [frame, f"{100 * n / max(p.samples, 1):.1f} %"] for frame, n in counter.most_common(TOP)
        ]

    headers = ["Function", "Share of samples"]
    return [
        Section(f"{p.process}, top {TOP} by own time ({load})", headers, rows(p.own)),
        Section(f"{p.process}, top {TOP} by cumulative time ({load})", headers, rows(p.cumulative)),
    ]
