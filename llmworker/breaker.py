"""A circuit breaker per provider base URL: when the provider keeps failing, stop sending it
requests for a while instead of spending every job's retries (and the provider's patience)
on an outage.

Closed: calls go through; `LLM_BREAKER_FAILURES` consecutive retryable failures (across all
the jobs of the process) open it. Open: no call for `LLM_BREAKER_RESET_SECONDS`; jobs wait.
Half-open: one job, the probe, may call; its success closes the breaker and wakes every
waiting job, its failure opens it for another period.

The state is per worker process, on purpose: every process learns of an outage by itself
after a handful of failed requests, and probes by itself once per period. That costs a few
requests per process per outage, and buys a breaker that needs no Redis round trip on every
provider call, no lease for a probe whose process may die, and that keeps working when Redis
does not. A process that cannot reach the provider (its own network path) also stops alone.
"""

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Callable

from django.conf import settings

from grizz import metrics

logger = logging.getLogger(__name__)


class Permit:
    """Leave to make one provider call, and its verdict: `succeeded` when the provider
    answers, `failed` on a retryable failure (also after a success: a stream that breaks
    off), `release` when the call ended with neither (cancelled, refused with a 400...)."""

    def __init__(self, breaker: "CircuitBreaker", *, probe: bool) -> None:
        self.breaker = breaker
        self.probe = probe
        self.answered = False
        self.settled = False

    def succeeded(self) -> None:
        if not (self.answered or self.settled):
            self.answered = True
            self.breaker._succeeded(self)

    def failed(self) -> None:
        if not self.settled:
            self.settled = True
            self.breaker._failed(self)

    def release(self) -> None:
        if not (self.answered or self.settled):
            self.settled = True
            self.breaker._released(self)


class CircuitBreaker:
    def __init__(
        self,
        *,
        name: str,
        failures: int,
        reset_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.threshold = failures
        self.reset_seconds = reset_seconds
        self.clock = clock
        self.failures = 0  # consecutive retryable failures
        self.open_until: float | None = None  # None: closed
        self.probe: Permit | None = None  # the half-open call in flight
        # Set (then replaced) on every change: waiters wake at once, no polling.
        self.changed = asyncio.Event()
        self._state_show()

    def state(self) -> str:
        """closed, half_open (a probe in flight) or open (including past its period, until
        a job asks to call: half-opening is lazy)."""
        if self.open_until is None:
            return "closed"
        return "half_open" if self.probe is not None else "open"

    def _state_show(self) -> None:
        metrics.worker().circuit(provider=self.name, state=self.state())

    def admit(self) -> Permit | None:
        """Leave to call the provider now, or None: wait (`wait_for_change`), then ask again."""
        if self.open_until is None:
            return Permit(self, probe=False)
        if self.probe is not None or self.clock() < self.open_until:
            return None
        self.probe = Permit(self, probe=True)
        self._state_show()
        logger.info("provider %s: circuit half-open; one job probes it", self.name)
        return self.probe

    def seconds_until_half_open(self) -> float:
        if self.open_until is None:
            return 0.0
        return max(0.0, self.open_until - self.clock())

    async def wait_for_change(self) -> None:
        """Return when the state changes, or when the breaker half-opens."""
        changed = self.changed
        # Half-open with a probe in flight: only the probe's verdict can let anyone through.
        timeout = None
        if self.probe is None:
            # Open: it half-opens by the clock, maybe already since the caller's admit() (a
            # timer can fire a moment before its time), and then nothing would wake it.
            timeout = self.seconds_until_half_open()
            if timeout <= 0:
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), timeout)

    def _succeeded(self, permit: Permit) -> None:
        self.failures = 0
        if permit is self.probe:
            self.probe = None
        # Any success closes it, a call sent before it opened included: the provider answers.
        if self.open_until is not None:
            self.open_until = None
            self.probe = None
            logger.info("provider %s: circuit closed; waiting jobs proceed", self.name)
            self._notify()
            self._state_show()

    def _failed(self, permit: Permit) -> None:
        self.failures += 1
        if permit is self.probe:
            self.probe = None
            self._open("the probe failed")
        elif self.open_until is None and self.failures >= self.threshold:
            self._open(f"{self.failures} consecutive failures")

    def _released(self, permit: Permit) -> None:
        if permit is self.probe:
            # The probe ended without a verdict: let another waiting job probe.
            self.probe = None
            self._notify()
            self._state_show()

    def _open(self, why: str) -> None:
        self.open_until = self.clock() + self.reset_seconds
        logger.warning("provider %s: circuit open for %gs (%s)", self.name, self.reset_seconds, why)
        self._notify()
        self._state_show()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


# Per event loop: asyncio events belong to one loop (the worker has one; tests have many).
_breakers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, CircuitBreaker]]" = (
    weakref.WeakKeyDictionary()
)


def breaker_states() -> dict[str, str]:
    """The state of each provider's breaker in this process (and event loop)."""
    breakers = _breakers.get(asyncio.get_running_loop(), {})
    return {name: breaker.state() for name, breaker in breakers.items()}


def breaker_for(base_url: str) -> CircuitBreaker:
    """The breaker of a provider base URL, in this process (and event loop)."""
    breakers = _breakers.setdefault(asyncio.get_running_loop(), {})
    breaker = breakers.get(base_url)
    if breaker is None:
        breaker = breakers[base_url] = CircuitBreaker(
            name=base_url,
            failures=settings.LLM_BREAKER_FAILURES,
            reset_seconds=settings.LLM_BREAKER_RESET_SECONDS,
        )
    return breaker
