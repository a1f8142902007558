"""grizz/server.py's change to autobahn: its per-connection debug lines are formatted only
when written, and read as before when they are; and the heap it freezes once the
application is loaded (grizz/heap.py)."""

import os
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


def _run_alone(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "grizz.settings"},
    )


def test_it_writes_autobahns_debug_lines_and_timings_as_autobahn_does():
    done = _run_alone(CHECK)
    assert (done.returncode, done.stdout.strip()) == (0, "True True"), done.stderr


# A real TCP connection under Twisted's asyncio reactor: 2 MB written through
# grizz.server's write-at-once path, half of it at once and half while the network drains,
# to a client with little room to receive that reads slowly. What arrives must be what was
# written, in order, whatever the socket took at each write.
WRITES_IN_ORDER = textwrap.dedent(
    """
    import socket, threading, time
    from grizz.server import transport_write_now
    from twisted.internet import protocol, reactor

    chunks = [bytes([65 + i % 26]) * 50_000 for i in range(40)]
    received = []

    class Sender(protocol.Protocol):
        def connectionMade(self):
            self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for chunk in chunks[:20]:
                transport_write_now(self.transport, chunk)
            reactor.callLater(0, self.more, 20)

        def more(self, i):
            if i == len(chunks):
                return self.transport.loseConnection()
            transport_write_now(self.transport, chunks[i])
            reactor.callLater(0.002, self.more, i + 1)

    def read(port):
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        while data := client.recv(8192):
            received.append(data)
            time.sleep(0.0005)
        reactor.callFromThread(reactor.stop)

    factory = protocol.Factory.forProtocol(Sender)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1").getHost().port
    threading.Thread(target=read, args=(port,), daemon=True).start()
    reactor.callLater(60, reactor.stop)
    reactor.run()
    print(b"".join(received) == b"".join(chunks))
    """
)


def test_frames_written_at_once_never_overtake_bytes_waiting_to_be_sent():
    done = _run_alone(WRITES_IN_ORDER)
    assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr


def test_the_web_server_freezes_its_heap_once_the_application_is_loaded() -> None:
    code = textwrap.dedent(
        """
        import gc
        from grizz.server import GrizzCommandLineInterface
        GrizzCommandLineInterface().load_asgi_app("grizz.asgi:application")
        print(gc.get_freeze_count(), len(gc.get_objects()))
        """
    )
    result = _run_alone(code)
    assert result.returncode == 0, result.stderr
    frozen, collectable = map(int, result.stdout.split())
    # What a full collection still walks is a small part of what the process holds.
    assert frozen > 50_000
    assert collectable < frozen / 20
