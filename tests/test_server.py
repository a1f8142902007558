"""grizz/server.py's change to autobahn: its per-connection debug lines are formatted only
when written, and read as before when they are."""

import subprocess
import sys
import textwrap
from pathlib import Path

# In a process of its own: importing grizz.server installs Twisted's asyncio reactor.
CHECK = textwrap.dedent(
    """
    import pprint
    from grizz.server import autobahn_pformat_defer
    from autobahn.websocket import protocol
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.logger import formatEvent

    factory = WebSocketServerFactory()
    attrs = [(name, getattr(factory, name), "Factory") for name in
             WebSocketServerProtocol.CONFIG_ATTRS]
    before = formatEvent({"log_format": "\\n{attrs}", "attrs": protocol.pformat(attrs)})
    autobahn_pformat_defer()
    after = formatEvent({"log_format": "\\n{attrs}", "attrs": protocol.pformat(attrs)})
    timings = protocol.Timings()
    timings.track("onOpen")
    print(before == after == "\\n" + pprint.pformat(attrs), "onOpen" in str(timings))
    """
)


def test_it_writes_autobahns_debug_lines_and_timings_as_autobahn_does():
    done = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "True True"), done.stderr
