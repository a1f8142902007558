"""From timestamped turns to figures: per-turn timings, integrity checks, percentiles."""

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.drive import Outcome
from bench.load import Turn
from bench.protocol import ReplyShape, StampError, stamps_parse


@dataclass(frozen=True)
class TurnTiming:
    t_send: int
    t_queued: int | None
    arrival: int  # the model server received the request
    first_emit: int  # the model server wrote the first token
    first_recv: int  # the client got the first token
    token_latencies: list[int]  # emit -> client receive, one per token
    browser_gap: int  # largest gap between consecutive frames at the client
    model_gap: int  # largest gap between consecutive token emits at the model
    lateness: int  # worst lag of the model server behind its own schedule
    frames: int

    @property
    def ttft(self) -> int:
        return self.first_recv - self.t_send


def turn_problem(turn: Turn, shape: ReplyShape) -> str | None:
    """Why a turn does not count as a clean, complete reply, or None."""
    if turn.error:
        return turn.error
    if turn.restarts:
        return f"{turn.restarts} restart frames (the reply was generated again)"
    if not turn.deltas:
        return "no token received"
    seqs = [seq for _, seq, _ in turn.deltas]
    if seqs != list(range(1, len(seqs) + 1)):
        return f"delta seqs not 1..n without gaps: {seqs[:10]}"
    text = "".join(content for _, _, content in turn.deltas)
    if turn.content is not None and turn.content != text:
        return "the done frame's content differs from the deltas"
    try:
        count = len(stamps_parse(text).emits_ns)
    except StampError as error:
        return str(error)
    return None if count == shape.tokens else f"{count} tokens received, {shape.tokens} sent"


def turn_timing(turn: Turn, shape: ReplyShape) -> TurnTiming:
    """Timings of a turn that passed turn_problem()."""
    latencies: list[int] = []
    emits: list[int] = []
    arrival: int | None = None
    for t_recv, _, content in turn.deltas:
        stamps = stamps_parse(content)
        arrival = stamps.arrival_ns if stamps.arrival_ns is not None else arrival
        latencies.extend(t_recv - emit for emit in stamps.emits_ns)
        emits.extend(stamps.emits_ns)
    if arrival is None:
        raise StampError("the reply carries no arrival stamp")
    recvs = [t for t, _, _ in turn.deltas]
    return TurnTiming(
        t_send=turn.t_send,
        t_queued=turn.t_queued,
        arrival=arrival,
        first_emit=emits[0],
        first_recv=recvs[0],
        token_latencies=latencies,
        browser_gap=_largest_gap(recvs),
        model_gap=_largest_gap(emits),
        lateness=_lateness(emits, arrival, shape),
        frames=len(recvs),
    )


def _largest_gap(times: Sequence[int]) -> int:
    return max((b - a for a, b in itertools.pairwise(times)), default=0)


def _lateness(emits: Sequence[int], arrival: int, shape: ReplyShape) -> int:
    ttft, interval = int(shape.ttft_ms * 1e6), int(shape.interval_ms * 1e6)
    return max(emit - (arrival + ttft + i * interval) for i, emit in enumerate(emits))


@dataclass
class Analysis:
    timings: list[TurnTiming]
    problems: list[str]

    @classmethod
    def of_outcome(cls, outcome: Outcome, shape: ReplyShape) -> "Analysis":
        """The counted turns, plus the failures of turns outside the window."""
        analysis = cls.of(outcome.turns, shape)
        analysis.problems += [turn.error or "failed" for turn in outcome.other_failures]
        return analysis

    @classmethod
    def of(cls, turns: Iterable[Turn], shape: ReplyShape) -> "Analysis":
        timings, problems = [], []
        for turn in turns:
            problem = turn_problem(turn, shape)
            if problem is None:
                timings.append(turn_timing(turn, shape))
            else:
                problems.append(problem)
        return cls(timings, problems)

    def ttft(self) -> "Summary":
        return Summary.of(t.ttft for t in self.timings)

    def per_token(self) -> "Summary":
        return Summary.of(lat for t in self.timings for lat in t.token_latencies)

    def gap_excess(self) -> "Summary":
        """Per reply: the client's largest gap minus the model's largest gap."""
        return Summary.of(t.browser_gap - t.model_gap for t in self.timings)

    def field(self, name: str) -> "Summary":
        return Summary.of(getattr(t, name) for t in self.timings)

    def span(self, start: str, end: str) -> "Summary":
        pairs = ((getattr(t, start), getattr(t, end)) for t in self.timings)
        return Summary.of(b - a for a, b in pairs if a is not None and b is not None)

    def tokens(self) -> int:
        return sum(len(t.token_latencies) for t in self.timings)

    def frames(self) -> int:
        return sum(t.frames for t in self.timings)


@dataclass(frozen=True)
class Summary:
    """A distribution of nanosecond values, reported in milliseconds."""

    n: int
    p50: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values_ns: Iterable[int]) -> "Summary":
        values = sorted(values_ns)
        if not values:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        ms = [v / 1e6 for v in values]
        return cls(len(ms), _quantile(ms, 0.5), _quantile(ms, 0.99), ms[-1], sum(ms) / len(ms))

    def as_dict(self) -> dict[str, float | int]:
        return {
            "n": self.n,
            "p50_ms": round(self.p50, 3),
            "p99_ms": round(self.p99, 3),
            "max_ms": round(self.max, 3),
            "mean_ms": round(self.mean, 3),
        }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
