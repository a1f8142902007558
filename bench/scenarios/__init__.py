"""The scenarios, in the order a full run plays them. Each is `async def run(ctx)` returning
a ScenarioResult; idle comes first so that its RSS figures start from a fresh web process.
`profile` runs only when asked for (`--profile`, or `--only profile`)."""

from collections.abc import Awaitable, Callable

from bench.context import Context
from bench.report import ScenarioResult
from bench.scenarios import (
    capacity,
    cpu,
    floor,
    idle,
    latency,
    profile,
    queue,
    recovery,
    redis_turn,
    sockets,
)

Scenario = Callable[[Context], Awaitable[ScenarioResult]]

SCENARIOS: dict[str, Scenario] = {
    "idle": idle.run,
    "open": sockets.run,
    "redis-turn": redis_turn.run,
    "queue": queue.run,
    "latency": latency.run,
    "cpu": cpu.run,
    "capacity": capacity.run,
    "floor": floor.run,
    "recovery": recovery.run,
    "profile": profile.run,
}
DEFAULT = [name for name in SCENARIOS if name != "profile"]
