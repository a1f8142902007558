"""The supervisor of a worker pool (`run_llm_worker --processes P`, or `--supervise`).

It starts P children, each `manage.py run_llm_worker --processes 1` under the name of its
slot, restarts a child that exits without being asked to (whatever its exit code) after an
exponential backoff, and gives up, exit code 1, after more than `max_restarts` crashes
within `restart_window` seconds, stopping the other children first: a crash loop is then
the platform's to see. SIGTERM or SIGINT go to every child as SIGTERM; each stops reading
and finishes or hands back its jobs within its grace, and the supervisor exits 0.

Children are fresh interpreters (subprocess, not multiprocessing's fork): nothing of the
supervisor (an event loop, a Redis or database connection, threads) is carried into them,
and a child is exactly the worker that runs on its own. The supervisor waits on a self-pipe
that signals (SIGCHLD included) write to; its only I/O besides its children is, in an
autoscaled pool (llmworker/autoscale.py), a sample of the backlog every second.

An autoscaled pool has a slot, and holds its name, for each of its MAX processes; the
lowest `size` of them run. A step down sends SIGTERM to the highest running one, which
stops as on a shutdown (its grace, then killed): not a crash, and not restarted. A step up
starts the lowest slot not running, under its own name, so that it resumes its own jobs.
"""

import asyncio
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass

from django.conf import settings

from grizz.metrics import PoolMetrics
from llmworker.autoscale import Autoscaler
from llmworker.names import LOCK_FD_ENV, NameClaim

logger = logging.getLogger(__name__)

PARENT_ENV = "GRIZZ_SUPERVISOR_PID"
BACKOFF_FIRST = 0.5
BACKOFF_MOST = 30.0
# A child that ran this long before it died starts the backoff again from its first step.
STABLE_SECONDS = 30.0
# Beyond their grace, how long children may take to exit before they are killed.
STOP_MARGIN = 10.0


@dataclass
class Slot:
    number: int
    claim: NameClaim
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    failures: int = 0  # consecutive crashes, for the backoff
    stop_by: float | None = None  # asked to stop: killed if still running then

    @property
    def label(self) -> str:
        return f"slot {self.number} ({self.claim.name})"


def _exit_status(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(
        self,
        *,
        claims: list[NameClaim],
        processes: int,
        concurrency: int,
        grace: float,
        max_restarts: int,
        restart_window: float,
        autoscaler: Autoscaler | None = None,
        metrics: PoolMetrics | None = None,
    ) -> None:
        self.slots = [Slot(number, claim) for number, claim in enumerate(claims)]
        self.size = processes  # the slots below it are to run
        self.concurrency = concurrency
        self.grace = grace
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.autoscaler = autoscaler
        self.metrics = metrics
        self.crashes: deque[float] = deque()
        self.shutdown = False
        self.gave_up = False
        self.stop_signal: int | None = None
        self.wakeup, self._wakeup_write = socket.socketpair()

    def run(self) -> int:
        self._signals_install()
        logger.info("supervisor: starting %d worker processes", self.size)
        if self.autoscaler is not None:
            logger.info("supervisor: %s", self.autoscaler.describe())
        while not self.shutdown:
            self._size_follow()
            self._wait(self._next_event_in())
            self._exited_reap()
            self._restarts_due()
            self._stops_overdue()
            self._autoscale()
        self._children_stop()
        return 1 if self.gave_up else 0

    # Signals: the handlers only set a flag; the self-pipe wakes the loop.

    def _signals_install(self) -> None:
        for end in (self.wakeup, self._wakeup_write):
            end.setblocking(False)
        signal.set_wakeup_fd(self._wakeup_write.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._stop_requested)
        signal.signal(signal.SIGINT, self._stop_requested)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only the wake-up

    def _stop_requested(self, signum: int, frame: object) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        self.shutdown = True

    def _wait(self, timeout: float | None) -> None:
        select.select([self.wakeup], [], [], timeout)
        while True:
            try:
                if not self.wakeup.recv(4096):
                    return
            except BlockingIOError:
                return

    # Children

    def _start(self, slot: Slot) -> None:
        slot.restart_at = None
        args = [
            sys.executable,
            str(settings.BASE_DIR / "manage.py"),
            "run_llm_worker",
            "--processes=1",
            f"--name={slot.claim.name}",
            f"--concurrency={self.concurrency}",
            f"--grace={self.grace}",
            "--metrics-port=0",  # the supervisor serves its children's metrics
        ]
        env = {**os.environ, LOCK_FD_ENV: str(slot.claim.fd), PARENT_ENV: str(os.getpid())}
        if self.metrics is not None:
            env.update(self.metrics.child_env())
        slot.started_at = time.monotonic()
        try:
            slot.process = subprocess.Popen(args, env=env, pass_fds=(slot.claim.fd,))
        except OSError as error:
            logger.error("%s: cannot start a worker process: %s", slot.label, error)
            self._crashed(slot)
            return
        logger.info("%s: started, pid %d", slot.label, slot.process.pid)

    def _exited_reap(self) -> None:
        for slot in self.slots:
            if slot.process is None or (code := slot.process.poll()) is None:
                continue
            asked = self.shutdown or slot.stop_by is not None
            why = " (scaled down)" if asked and not self.shutdown else ""
            if self.metrics is not None:
                self.metrics.child_exited(slot.process.pid)
            logger.log(
                logging.INFO if asked else logging.ERROR,
                "%s: pid %d %s%s", slot.label, slot.process.pid, _exit_status(code), why,
            )  # fmt: skip
            slot.process = None
            slot.stop_by = None
            if not asked:
                self._crashed(slot)  # exit code 0 too: it was not asked to stop

    def _crashed(self, slot: Slot) -> None:
        now = time.monotonic()
        self.crashes.append(now)
        while self.crashes[0] < now - self.restart_window:
            self.crashes.popleft()
        if len(self.crashes) > self.max_restarts:
            self._give_up()
            return
        if self.metrics is not None:
            self.metrics.restarts.inc()
        if now - slot.started_at >= STABLE_SECONDS:
            slot.failures = 0
        delay = min(BACKOFF_MOST, BACKOFF_FIRST * 2.0**slot.failures)
        slot.failures += 1
        slot.restart_at = now + delay
        logger.warning("%s: restart in %.1fs", slot.label, delay)

    def _give_up(self) -> None:
        logger.critical(
            "supervisor: giving up after %d crashes in %gs (--max-restarts %d); "
            "stopping the other worker processes",
            len(self.crashes), self.restart_window, self.max_restarts,
        )  # fmt: skip
        self.gave_up = self.shutdown = True

    def _next_event_in(self) -> float | None:
        """Seconds until the next kill of a child past its stop, restart or sample (the
        last two not once shutting down)."""
        due = [slot.stop_by for slot in self._running() if slot.stop_by is not None]
        if not self.shutdown:
            due += [slot.restart_at for slot in self.slots if slot.restart_at is not None]
            if self.autoscaler is not None:
                due.append(self.autoscaler.sample_at)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def _restarts_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if not self.shutdown and slot.restart_at is not None and slot.restart_at <= now:
                self._start(slot)

    # The pool's size

    def _size_follow(self) -> None:
        """Start the slots below the size that are not running (nor waiting to restart);
        stop those above it. One stopped but not yet exited starts again once it has."""
        for slot in self.slots[: self.size]:
            if not self.shutdown and slot.process is None and slot.restart_at is None:
                self._start(slot)
        for slot in self.slots[self.size :]:
            slot.restart_at = None  # a crashed slot above the size stays down
            if slot.process is not None and slot.stop_by is None:
                logger.info("%s: stopping pid %d (scaled down)", slot.label, slot.process.pid)
                self._stop(slot)

    def _autoscale(self) -> None:
        if self.autoscaler is not None and not self.shutdown:
            self.size = self.autoscaler.size_next(processes=self.size, now=time.monotonic())

    # Stopping children

    def _running(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.process is not None]

    def _stop(self, slot: Slot) -> None:
        assert slot.process is not None
        slot.process.send_signal(signal.SIGTERM)
        slot.stop_by = time.monotonic() + self.grace + STOP_MARGIN

    def _stops_overdue(self) -> None:
        now = time.monotonic()
        for slot in self._running():
            if slot.stop_by is not None and slot.stop_by <= now:
                assert slot.process is not None
                logger.error("%s: pid %d still running; killing it", slot.label, slot.process.pid)
                slot.process.kill()
                slot.process.wait()
                slot.process = None
                slot.stop_by = None

    def _children_stop(self) -> None:
        if self.stop_signal is not None:
            logger.info(
                "supervisor: %s; stopping %d worker processes",
                signal.Signals(self.stop_signal).name, len(self._running()),
            )  # fmt: skip
        for slot in self._running():
            if slot.stop_by is None:  # those scaled down have their stop under way
                self._stop(slot)
        while self._running():
            self._wait(self._next_event_in())
            self._exited_reap()
            self._stops_overdue()
        logger.info("supervisor: stopped")


async def supervisor_watch(shutdown: asyncio.Event) -> None:
    """In a child: stop when its supervisor is gone (killed itself, say), rather than run
    on unsupervised."""
    supervisor = os.environ.get(PARENT_ENV)
    if not supervisor:
        return
    while not shutdown.is_set():
        if os.getppid() != int(supervisor):
            logger.warning("worker: its supervisor (pid %s) is gone; stopping", supervisor)
            shutdown.set()
            return
        await asyncio.sleep(1.0)
