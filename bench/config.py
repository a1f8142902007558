"""Run profiles: the full run (`make bench`, under 10 minutes on 2 cores) and `--quick`
(a smoke run, under 2 minutes). Times are seconds."""

import time
from dataclasses import dataclass

from bench.protocol import ReplyShape

# Reply shapes, 20 tokens/s like a fast hosted model unless noted.
SHAPE_SINGLE = ReplyShape(ttft_ms=50, tokens=4, interval_ms=50)
SHAPE_CONCURRENT = ReplyShape(ttft_ms=50, tokens=60, interval_ms=50)
SHAPE_CAPACITY = ReplyShape(ttft_ms=50, tokens=100, interval_ms=50)
SHAPE_TURN = ReplyShape(ttft_ms=20, tokens=200, interval_ms=10)  # 100 tokens/s
SHAPE_INSTANT = ReplyShape(ttft_ms=0, tokens=1, interval_ms=0)
SHAPE_CAPACITY_QUICK = ReplyShape(ttft_ms=50, tokens=40, interval_ms=50)
# Fixed-load CPU (`cpu`, and `profile`): 20 tokens/s, each token alone, and 60 tokens/s,
# where the worker may put several tokens in one frame; replies of Profile.cpu_reply_s.
CPU_RATES = (20, 60)


def shape_cpu(tokens_per_s: int, reply_s: float) -> ReplyShape:
    return ReplyShape(
        ttft_ms=50, tokens=round(tokens_per_s * reply_s), interval_ms=1000 / tokens_per_s
    )


SHAPE_BURST = ReplyShape(ttft_ms=50, tokens=10, interval_ms=50)  # TTFT is what counts


@dataclass(frozen=True)
class Profile:
    name: str
    budget_s: float  # the whole run, setup and teardown included
    teardown_reserve_s: float
    conversations: int  # seeded; every scenario gets conversations no other one used
    idle_counts: tuple[int, ...]
    idle_window_s: float
    idle_settle_s: float  # after opening sockets, before measuring
    idle_leaves_s: float  # opening idle sockets stops when less is left for the rest
    turn_rounds: int  # Redis per turn: rounds of `turn_parallel` 200-token replies
    turn_parallel: int
    queue_serial_s: float
    queue_parallel: int
    queue_window_s: float
    latency_levels: tuple[int, ...]
    latency_window_s: float
    latency_single_window_s: float  # 1 conversation: short replies, more samples
    burst_sockets: int  # sockets that all send at one instant
    burst_rounds: int
    open_sockets: int  # opened with `open_parallel` handshakes in flight
    open_wave: int  # opened all at once (a web restart's reconnect wave)
    cpu_conversations: int
    cpu_window_s: float
    cpu_reply_s: float
    capacity_steps: tuple[int, ...]
    capacity_window_s: float
    capacity_shape: ReplyShape
    capacity_check: int  # the direct path runs at this count even if Grizz failed below it
    profile_conversations: int  # --profile: the load py-spy samples under
    profile_s: float


FULL = Profile(
    name="full",
    budget_s=640,
    teardown_reserve_s=25,
    conversations=5000,
    idle_counts=(1000, 5000),
    idle_window_s=10,
    idle_settle_s=3,
    idle_leaves_s=230,
    turn_rounds=2,
    turn_parallel=10,
    queue_serial_s=6,
    queue_parallel=64,
    queue_window_s=6,
    latency_levels=(1, 200),
    latency_window_s=6,
    latency_single_window_s=8,
    burst_sockets=200,
    burst_rounds=3,
    open_sockets=1000,
    open_wave=1000,
    cpu_conversations=100,
    cpu_window_s=8,
    cpu_reply_s=5,
    capacity_steps=(50, 100, 200, 300, 400, 600, 800, 1000),
    capacity_window_s=6,
    capacity_shape=SHAPE_CAPACITY,
    capacity_check=300,
    profile_conversations=100,
    profile_s=15,
)

QUICK = Profile(
    name="quick",
    budget_s=110,
    teardown_reserve_s=7,
    conversations=800,
    idle_counts=(40, 80),
    idle_window_s=2,
    idle_settle_s=0.5,
    idle_leaves_s=45,
    turn_rounds=1,
    turn_parallel=5,
    queue_serial_s=2,
    queue_parallel=16,
    queue_window_s=2,
    latency_levels=(1,),
    latency_window_s=1.5,
    latency_single_window_s=1.5,
    burst_sockets=10,
    burst_rounds=2,
    open_sockets=64,
    open_wave=64,
    cpu_conversations=10,
    cpu_window_s=1.5,
    cpu_reply_s=1,
    capacity_steps=(10,),
    capacity_window_s=2,
    capacity_shape=SHAPE_CAPACITY_QUICK,
    capacity_check=20,
    profile_conversations=10,
    profile_s=3,
)


class Budget:
    """The run's deadline; scenarios ask how much is left before each phase."""

    def __init__(self, total_s: float, reserve_s: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + total_s - reserve_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started
