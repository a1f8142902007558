"""What a supervised pool's output and the kernel tell of its children: for the tests of pools
(their restarts, their autoscaling)."""

import os
import re
import select

from tests.support.processes import ServiceProcess


def child_pid(pool: ServiceProcess, slot: int, *, other_than: int | None = None) -> int:
    """The pid of the slot's child, from the supervisor's line; with `other_than`, of the
    next child once that one has been replaced."""
    other = "" if other_than is None else rf"(?!{other_than}\b)"
    line = pool.wait_for_line(rf"slot {slot} \(\S+\): started, pid {other}\d+")
    return int(line.rsplit(" ", 1)[-1])


def children_pids(pool: ServiceProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r": started, pid (\d+)", pool.output)]


def process_ended(pid: int, timeout: float = 0.0) -> bool:
    """Whether the process has ended, or ends within the timeout (a pidfd is readable once
    it has exited, even before whoever reaps it has)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout)[0])
    finally:
        os.close(pidfd)
