"""What the bench's clients and its model server agree on.

The client asks for a reply shape in the text of its message (``bench ttft_ms=50 tokens=20
interval_ms=50``), so one model server process serves every scenario and the Grizz path and
the direct path get exactly the same behaviour.

Every token the model server sends is its own emit time: `` <CLOCK_MONOTONIC in µs>``. The
first token also carries the time the request arrived (`` q<µs> <µs>``). CLOCK_MONOTONIC is
shared by all processes of one machine, so the client can tell, for every token inside a
coalesced delta, how long it took from the model to the "browser".
"""

import re
from dataclasses import dataclass

ARRIVAL_MARK = "q"
_DIRECTIVE = re.compile(r"\b(ttft_ms|tokens|interval_ms)=(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class ReplyShape:
    ttft_ms: float = 0.0
    tokens: int = 1
    interval_ms: float = 0.0

    def message(self) -> str:
        return (
            f"bench ttft_ms={self.ttft_ms:g} tokens={self.tokens} interval_ms={self.interval_ms:g}"
        )

    @property
    def duration_s(self) -> float:
        """How long the model takes for one reply when nothing else is slow."""
        return (self.ttft_ms + self.interval_ms * max(self.tokens - 1, 0)) / 1000

    @property
    def tokens_per_s(self) -> float:
        return 1000 / self.interval_ms if self.interval_ms else float("inf")

    @classmethod
    def from_text(cls, text: str) -> "ReplyShape | None":
        found = dict(_DIRECTIVE.findall(text))
        if not found:
            return None
        return cls(
            ttft_ms=float(found.get("ttft_ms", 0)),
            tokens=max(int(float(found.get("tokens", 1))), 1),
            interval_ms=float(found.get("interval_ms", 0)),
        )


def token_text(*, emit_ns: int, arrival_ns: int | None = None) -> str:
    if arrival_ns is None:
        return f" {emit_ns // 1000}"
    return f" {ARRIVAL_MARK}{arrival_ns // 1000} {emit_ns // 1000}"


@dataclass
class Stamps:
    arrival_ns: int | None
    emits_ns: list[int]


class StampError(ValueError):
    """A reply's text is not made of the bench model server's stamps."""


def stamps_parse(text: str) -> Stamps:
    """The stamps in some reply text (one delta, or a whole reply), in order."""
    arrival: int | None = None
    emits: list[int] = []
    for word in text.split():
        try:
            if word.startswith(ARRIVAL_MARK):
                arrival = int(word[1:]) * 1000
            else:
                emits.append(int(word) * 1000)
        except ValueError:
            raise StampError(f"not a bench stamp: {word[:40]!r}") from None
    return Stamps(arrival, emits)
