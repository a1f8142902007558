"""The load generator spread over several processes: `Fleet` starts `procs` children (spawned
Python processes, one asyncio loop each) and plays one plan in all of them at once.

Why: at 300 conversations at 20 tokens/s the clients receive 6,000 frames (or SSE chunks) a
second; one Python event loop doing that, next to Grizz on the same cores, gets late, and
the lateness would be counted as latency of the path being measured. Each child holds its
share of the sockets (socket k of a group lives in child k mod procs), runs its share of the
slots, and measures its own event-loop lag; the parent merges the turns. Every child starts
the plan at the same CLOCK_MONOTONIC instant, which all processes of the machine share, so
the merged turns are one run on one clock.

The parent talks to each child over a multiprocessing Pipe: one command, one answer.
"""

import asyncio
import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from websockets.exceptions import WebSocketException

from bench.analysis import Summary
from bench.drive import Outcome, Plan, run_burst, run_plan, sleep_until
from bench.load import ChatClient, direct_clients
from bench.meter import Meter
from bench.procstat import process_cpu_s
from bench.protocol import ReplyShape
from grizz.eventloop import event_loop_policy_install

START_AHEAD_S = 1.0  # a plan starts this long after it is handed out: every child has it


@dataclass
class Opened:
    """Sockets opened by the fleet: per socket (start ns, hello ns), and the failures."""

    times: list[tuple[int, int]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def per_socket(self) -> Summary:
        return Summary.of(end - start for start, end in self.times)

    def span_ns(self, since_ns: int | None = None) -> int:
        """From the first start (or `since_ns`) to the last hello."""
        if not self.times:
            return 0
        first = since_ns if since_ns is not None else min(s for s, _ in self.times)
        return max(end for _, end in self.times) - first


@dataclass
class Played:
    """A plan played by the whole fleet: the merged turns and every child's loop lag."""

    outcome: Outcome
    lags_ns: list[int]

    @property
    def lag(self) -> Summary:
        return Summary.of(self.lags_ns)


def shares(count: int, procs: int) -> list[int]:
    """How many of the first `count` sockets (or slots) child i has: k lives in k mod procs."""
    return [len(range(i, count, procs)) for i in range(procs)]


class Fleet:
    def __init__(self, *, procs: int, model_url: str) -> None:
        self.procs = procs
        self.model_url = model_url
        self.children: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
        self.sizes: dict[str, int] = {}

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        # spawn, not fork: the parent runs an event loop and threads.
        context = multiprocessing.get_context("spawn")
        for index in range(self.procs):
            ours, theirs = context.Pipe()
            child = context.Process(
                target=_child_main, args=(theirs, self.model_url), name=f"bench-load-{index}"
            )
            child.daemon = True
            child.start()
            theirs.close()
            self.children.append((child, ours))
        for _, conn in self.children:
            if conn.recv() != "ready":
                raise RuntimeError("a load generator process did not start")

    def close(self) -> None:
        for child, conn in self.children:
            with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                conn.send(("stop",))
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
        self.children.clear()

    @property
    def pids(self) -> list[int]:
        return [child.pid for child, _ in self.children if child.pid is not None]

    def cpu_s(self) -> float:
        """CPU seconds of all the load generator's processes so far."""
        return sum(process_cpu_s(pid) for pid in self.pids)

    # ------------------------------------------------------------------ commands

    async def _all(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Command i to child i, in parallel; the answers in order."""

        def call(conn: Connection, command: tuple[Any, ...]) -> Any:
            conn.send(command)
            answer = conn.recv()
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return await asyncio.gather(
            *(
                asyncio.to_thread(call, conn, command)
                for (_, conn), command in zip(self.children, commands, strict=True)
            )
        )

    async def open(
        self,
        group: str,
        urls: Sequence[str],
        *,
        parallel: int | None,
        timeout: float = 60.0,
        at_ns: int | None = None,
    ) -> Opened:
        """Open sockets to `urls` into `group` (added to what it holds). `parallel`: how many
        handshakes are in flight at once over the whole fleet (None: all at once). `at_ns`:
        start them at that instant (a reconnect wave)."""
        gates = shares(parallel, self.procs) if parallel else [None] * self.procs
        start = self.sizes.get(group, 0)
        commands = [
            (
                "open",
                group,
                list(urls[(i - start) % self.procs :: self.procs]),
                gates[i],
                timeout,
                at_ns,
            )
            for i in range(self.procs)
        ]
        answers = await self._all(commands)
        self.sizes[group] = start + len(urls)
        opened = Opened()
        for times, failures in answers:
            opened.times += times
            opened.failures += failures
        return opened

    async def play(
        self, plan: Plan, *, group: str | None, seed: int = 1, start_ns: int | None = None
    ) -> Played:
        """Run `plan` over the first plan.concurrency sockets of `group` (None: the direct
        path, one shared AsyncOpenAI client per child), in every child at once."""
        start_ns = start_ns or time.monotonic_ns() + int(START_AHEAD_S * 1e9)
        parts = shares(plan.concurrency, self.procs)
        commands = [
            ("play", group, _sub_plan(plan, parts[i]), seed * 1000 + i, start_ns)
            for i in range(self.procs)
        ]
        return _merged(await self._all(commands), start_ns, plan)

    async def burst(
        self, shape: ReplyShape, count: int, *, group: str | None, instants: Sequence[int]
    ) -> Played:
        """The first `count` sockets of `group` (None: `count` direct clients) all send at
        each of `instants`."""
        parts = shares(count, self.procs)
        commands = [("burst", group, shape, parts[i], list(instants)) for i in range(self.procs)]
        answers = await self._all(commands)
        return _merged(answers, instants[0], None)

    async def close_group(self, group: str) -> None:
        await self._all([("close", group)] * self.procs)
        self.sizes.pop(group, None)


def _sub_plan(plan: Plan, concurrency: int) -> Plan:
    if plan.max_turns is not None:
        raise ValueError("the fleet plays windows, not turn counts")
    return Plan(plan.shape, concurrency, plan.window_s, plan.stagger_s, plan.think_s)


def _merged(answers: list[tuple[Outcome, list[int]]], start_ns: int, plan: Plan | None) -> Played:
    end = max((o.window_end_ns for o, _ in answers), default=start_ns)
    if plan is not None:
        start_ns = min(o.window_start_ns for o, _ in answers)
    merged = Outcome([], [], [], start_ns, end)
    lags: list[int] = []
    for outcome, child_lags in answers:
        merged.turns += outcome.turns
        merged.other_failures += outcome.other_failures
        merged.every += outcome.every
        lags += child_lags
    return Played(merged, lags)


# ---------------------------------------------------------------------- the child


def _child_main(conn: Connection, model_url: str) -> None:
    event_loop_policy_install()  # as Grizz's processes: the load generator's CPU is the box's
    asyncio.run(_Child(conn, model_url).serve())


class _Child:
    def __init__(self, conn: Connection, model_url: str) -> None:
        self.conn = conn
        self.model_url = model_url
        self.groups: dict[str, list[ChatClient]] = {}

    async def serve(self) -> None:
        self.conn.send("ready")
        while True:
            command = await asyncio.to_thread(self.conn.recv)
            if command[0] == "stop":
                break
            try:
                answer = await getattr(self, "_" + command[0])(*command[1:])
            except Exception as error:  # handed to the parent, which raises it
                answer = RuntimeError(f"load generator: {type(error).__name__}: {error}")
            self.conn.send(answer)
        for group in list(self.groups):
            await self._close(group)

    async def _open(
        self, group: str, urls: list[str], parallel: int | None, timeout: float, at_ns: int | None
    ) -> tuple[list[tuple[int, int]], list[str]]:
        gate = asyncio.Semaphore(parallel or max(len(urls), 1))
        times: list[tuple[int, int]] = []
        failures: list[str] = []
        clients = self.groups.setdefault(group, [])
        if at_ns is not None:
            await sleep_until(at_ns)

        async def one(url: str) -> ChatClient | None:
            async with gate:
                client = ChatClient(url)
                start = time.monotonic_ns()
                try:
                    times.append((start, start + await client.open(timeout)))
                except (OSError, TimeoutError, WebSocketException, RuntimeError) as error:
                    failures.append(f"{type(error).__name__}: {error}")
                    return None
                return client

        opened = await asyncio.gather(*(one(url) for url in urls))
        clients.extend(client for client in opened if client is not None)
        return times, failures

    async def _turners(self, group: str | None, count: int) -> tuple[list[Any], Any]:
        if group is None:
            client, turners = direct_clients(self.model_url, count)
            if count:  # the SDK's first request pays for lazy imports and client setup
                await turners[0].turn(ReplyShape().message(), 30)
            return list(turners), client
        clients = self.groups.get(group, [])
        if len(clients) < count:
            raise RuntimeError(f"{count} sockets wanted in {group}, {len(clients)} open")
        return list(clients[:count]), None

    async def _play(
        self, group: str | None, plan: Plan, seed: int, start_ns: int
    ) -> tuple[Outcome, list[int]]:
        turners, client = await self._turners(group, plan.concurrency)
        try:
            async with Meter({}) as meter:
                if plan.concurrency:
                    outcome = await run_plan(turners, plan, seed=seed, start_ns=start_ns)
                else:
                    outcome = Outcome([], [], [], start_ns, start_ns)
            return outcome, meter.lags
        finally:
            if client is not None:
                await client.aclose()

    async def _burst(
        self, group: str | None, shape: ReplyShape, count: int, instants: list[int]
    ) -> tuple[Outcome, list[int]]:
        turners, client = await self._turners(group, count)
        try:
            async with Meter({}) as meter:
                outcome = await run_burst(turners, shape, instants)
            return outcome, meter.lags
        finally:
            if client is not None:
                await client.aclose()

    async def _close(self, group: str) -> None:
        clients = self.groups.pop(group, [])
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
