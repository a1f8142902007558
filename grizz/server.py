"""The web server: daphne, run as `python -m grizz.server` with daphne's own arguments.

Two changes to daphne's WebSocket handling, so that a client always learns why a frame
was refused instead of seeing the connection drop (1006, no reason), and one to autobahn's
(below, `_Pformat`):

- daphne reads a message whole before the consumer sees it, up to its own limit (1 MiB by
  default), and above it autobahn drops the TCP connection without a close frame. Here a
  frame over the consumer's limit (WS_MAX_FRAME_BYTES) but within the transport limit is
  refused by the consumer with `too_long` and the socket stays open; the transport limit is
  WS_TRANSPORT_MAX_BYTES (4 x WS_MAX_FRAME_BYTES, at least 1 MiB), which bounds what one
  socket can make the process hold in memory.
- Above the transport limit the frame is not read: the socket is closed with 1009 and a
  reason naming WS_MAX_FRAME_BYTES (autobahn's failByDrop off, so it sends a close frame).

And its access log goes through logging, in the format of every other line (LOG_FORMAT),
instead of straight to stdout; a frame goes to the socket when it is sent
(`FrameLimitedWebSocketProtocol.sendData`); and the transport limit applies only to what
clients send (`FrameLimitedWebSocketProtocol.sendMessage`).
"""

import logging
import os
import pprint
import sys
from typing import Any

from grizz.eventloop import event_loop_policy_install
from grizz.heap import heap_freeze

# Before daphne.server, which makes the event loop that Twisted's reactor runs on.
event_loop_policy_install()
# daphne.server installs Twisted's asyncio reactor: it must come before anything that
# imports Twisted.
from daphne.server import Server  # isort: skip  # noqa: E402
from autobahn.websocket import protocol as autobahn_protocol  # noqa: E402
from daphne.access import AccessLogGenerator  # noqa: E402
from daphne.cli import CommandLineInterface  # noqa: E402
from daphne.ws_protocol import WebSocketProtocol  # noqa: E402
from django.conf import settings  # noqa: E402
from twisted.internet import tcp  # noqa: E402


class _Pformat:
    """pprint.pformat(obj), made when a log line formats it. autobahn passes the pformat of
    its ~30 settings to a debug line on every connection, made before the logger drops it
    (under daphne autobahn logs nothing below info): about 120 µs of CPU a socket, 5 % of
    the web's samples while sockets open. autobahn's module uses pformat for two debug
    lines and for Timings' str (below)."""

    __slots__ = ("obj",)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __str__(self) -> str:
        return pprint.pformat(self.obj)


def _timings_str(self: autobahn_protocol.Timings) -> str:
    return pprint.pformat(self._timings)


def autobahn_pformat_defer() -> None:
    autobahn_protocol.pformat = _Pformat  # type: ignore[attr-defined,assignment]
    autobahn_protocol.Timings.__str__ = _timings_str  # type: ignore[method-assign]


class FrameLimitedWebSocketProtocol(WebSocketProtocol):
    def connectionMade(self) -> None:
        super().connectionMade()
        # daphne hands the upgraded connection over with the HTTP channel that read the
        # handshake still registered as the transport's producer, so the transport kept that
        # channel, its request and their headers for the socket's life: about 4 KiB of an
        # idle socket. As producer it paused nothing: a channel whose request is in hand
        # (daphne never finishes an upgraded one) does not pause reading.
        self.transport.unregisterProducer()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        """A frame written to the socket at once when nothing waits before it, not queued for
        the reactor's next turn. Twisted buffers every write and registers the socket for
        writing (an epoll_ctl), writes in its next turn, then unregisters it (another): per
        frame per socket, most of the web's cost of relaying a token beyond the framing
        (docs/performance.md). autobahn's own sendData also formatted a debug line's fields
        per frame before its logger dropped it."""
        if sync or chopsize or self.send_queue:
            return super().sendData(data, sync, chopsize)  # type: ignore[no-any-return]
        transport_write_now(self.transport, data)

    def sendMessage(
        self,
        payload: bytes,
        isBinary: bool = False,
        fragmentSize: int | None = None,
        sync: bool = False,
        doNotCompress: bool = False,
    ) -> None:
        """A message to the client, whatever its size. autobahn holds what the server sends
        to the limit on what a client may send (maxMessagePayloadSize, the transport limit)
        and refuses longer ones: the `done` frame of a reply over ~1 MiB would never reach
        the client. The server's own frames are bounded by the replies it makes."""
        limit: int = self.maxMessagePayloadSize  # type: ignore[has-type]
        self.maxMessagePayloadSize = 0
        try:
            super().sendMessage(payload, isBinary, fragmentSize, sync, doNotCompress)
        finally:
            self.maxMessagePayloadSize = limit

    def _max_message_size_exceeded(self, msg_size: int, max_msg_size: int, reason: str) -> None:
        # autobahn's hook for a message over maxMessagePayloadSize; its default reason
        # names the transport limit, which the client never otherwise hears of.
        self._fail_connection(
            self.CLOSE_STATUS_CODE_MESSAGE_TOO_BIG,
            f"Frames are limited to {settings.WS_MAX_FRAME_BYTES} bytes.",
        )


def transport_write_now(transport: Any, data: bytes) -> None:
    """Write `data` on a TCP transport now if it holds nothing unsent, the rest (what the
    socket's buffer would not take, or all of it after an error) through Twisted's buffer
    as before: bytes never overtake bytes written earlier, and a broken connection is
    found and closed by Twisted's own write path."""
    if isinstance(transport, tcp.Connection) and transport.connected and _unsent_none(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):  # else the connection is lost: Twisted's to close
            data = data[sent:]
    if data:
        writer: Any = transport  # Twisted's write is not annotated
        writer.write(data)


def _unsent_none(transport: tcp.Connection) -> bool:
    # Twisted's FileDescriptor buffers: bytes being written, and bytes written after them.
    return (
        not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and not transport.disconnecting
        and not transport._writeDisconnected
    )


class AccessLog(AccessLogGenerator):
    """daphne's access log entries, as log records: `client`, `request`, `status`, `size`."""

    logger = logging.getLogger("grizz.access")

    def __init__(self) -> None:
        super().__init__(stream=None)

    def write_entry(
        self,
        host: str,
        date: object,
        request: str,
        status: int | None = None,
        length: int | None = None,
        ident: str | None = None,
        user: str | None = None,
    ) -> None:
        self.logger.info(
            '%s "%s" %s %s', host, request, status or "-", length or "-",
            extra={"client": host, "request": request, "status": status, "size": length},
        )  # fmt: skip


def _access_log(daphne_log: AccessLogGenerator | None) -> AccessLogGenerator | None:
    # daphne's access log (on unless -v0) writes to stdout itself; one asked for in a file
    # (--access-log) stays daphne's.
    if daphne_log is not None and daphne_log.stream is sys.stdout:
        return AccessLog()
    return daphne_log


def endpoint_backlog_set(description: str) -> str:
    """A TCP endpoint (daphne's `-b/-p`, or `-e tcp:...` without a backlog) listening with
    WEB_LISTEN_BACKLOG: a reconnect wave must not overflow Twisted's default of 50."""
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6") or ":backlog=" in description:
        return description
    return f"{description}:backlog={settings.WEB_LISTEN_BACKLOG}"


class GrizzServer(Server):
    def __init__(
        self, *args: Any, ready_callable: Any = None, action_logger: Any = None, **kwargs: Any
    ) -> None:
        # daphne calls ready_callable once its factories exist and before the reactor
        # runs, that is before any socket is accepted: the place to adjust the factory.
        endpoints = [endpoint_backlog_set(e) for e in kwargs.pop("endpoints", None) or []]
        super().__init__(
            *args,
            endpoints=endpoints,
            ready_callable=self._websockets_configure,
            action_logger=_access_log(action_logger),
            **kwargs,
        )
        self.then_ready = ready_callable

    def _websockets_configure(self) -> None:
        self.ws_factory.protocol = FrameLimitedWebSocketProtocol
        self.ws_factory.setProtocolOptions(failByDrop=False)
        if self.then_ready is not None:
            self.then_ready()


class GrizzCommandLineInterface(CommandLineInterface):
    server_class = GrizzServer

    def __init__(self) -> None:
        super().__init__()
        # Explicit --websocket-max-message-size / --websocket-max-frame-size still win.
        self.parser.set_defaults(
            websocket_max_message_size=settings.WS_TRANSPORT_MAX_BYTES,
            websocket_max_frame_size=settings.WS_TRANSPORT_MAX_BYTES,
        )

    def load_asgi_app(self, asgi_app_path: str) -> Any:
        application = super().load_asgi_app(asgi_app_path)
        heap_freeze()  # the application and all it imports are loaded (grizz/heap.py)
        return application


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "grizz.settings")
    autobahn_pformat_defer()
    GrizzCommandLineInterface().run(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
