"""The scenarios, in the order a full run plays them. Each is `async def run(ctx)` returning
a ScenarioResult; idle comes first so that its RSS figures start from a fresh web process."""

from collections.abc import Awaitable, Callable

from bench.context import Context
from bench.report import ScenarioResult
from bench.scenarios import capacity, idle, latency, queue, recovery, redis_turn

Scenario = Callable[[Context], Awaitable[ScenarioResult]]

SCENARIOS: dict[str, Scenario] = {
    "idle": idle.run,
    "redis-turn": redis_turn.run,
    "queue": queue.run,
    "latency": latency.run,
    "capacity": capacity.run,
    "recovery": recovery.run,
}
