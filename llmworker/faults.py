"""Fault injection for the crash tests: GRIZZ_FAULTS=<point>[,<point>] makes the process die
at that point exactly like `kill -9` (no cleanup, no acknowledgement). Unset in production."""

import os


def fault_point(name: str) -> None:
    if name in os.environ.get("GRIZZ_FAULTS", "").split(","):
        os._exit(137)
