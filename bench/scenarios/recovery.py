"""Figure 7, recovery (kill -9 of a worker mid-reply, the reply completes on another
worker): Grizz's delivery guarantees (issue 4) have not landed, so there is nothing to
measure yet. The row stays in the table so that the gap is visible."""

from bench.context import Context
from bench.report import Row, ScenarioResult


async def run(ctx: Context) -> ScenarioResult:
    row = Row(
        "Recovery: worker killed (kill -9) mid-reply → reply completes on another worker",
        "not measured yet: needs issue 4",
    )
    return ScenarioResult("Recovery", rows=[row])
