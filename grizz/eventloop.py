"""The event loop of Grizz's processes: uvloop, libuv's loop for asyncio, when installed.

Both processes spend much of their CPU per token in the event loop itself (waking on a
socket, scheduling the callback, writing): under the bench's fixed load of 100
conversations at 20 tokens/s, uvloop took about 6 % off the CPU per token of the web and of
the worker and halved the worker's per-token latency at 60 tokens/s (docs/performance.md).
Twisted's asyncio reactor, which daphne runs on, only needs add_reader/add_writer and
timers, which uvloop provides. Where uvloop cannot be installed (it has no Windows build),
asyncio's own loop runs and nothing else changes.
"""

import asyncio


def event_loop_policy_install() -> str:
    """Make new event loops uvloop's, if it is installed; say which loop runs."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
