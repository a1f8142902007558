"""Fault injection for the crash tests, unset in production. GRIZZ_FAULTS=<fault>[,<fault>]:
`<point>` makes the process die at that point exactly like `kill -9` (no cleanup, no
acknowledgement); `<point>:stop` stops it there like a SIGSTOP from outside, after printing
`fault: stopped at <point>`, until it gets SIGCONT (a stall at a known place); only the
first time the process passes there, so that it stalls once and then runs on."""

import os
import signal

_stopped_at: set[str] = set()


def fault_point(name: str) -> None:
    faults = os.environ.get("GRIZZ_FAULTS", "").split(",")
    if name in faults:
        os._exit(137)
    if f"{name}:stop" in faults and name not in _stopped_at:
        _stopped_at.add(name)
        print(f"fault: stopped at {name}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
