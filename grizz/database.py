"""Database calls from async code (the chat socket, the worker): on a bounded pool of
threads, and the hot path's written-out statements awaited on the event loop itself
(LoopConnections, below).

asgiref's default (thread_sensitive) runs every synchronous call of a process on one
thread: 200 replies starting at once each waited for every `reply_start` ahead of it, most
of that time idle on PostgreSQL's round trips (queued → model request p50 266 ms at 200
conversations, docs/performance.md), and 200 messages sent at once each waited for every
`message_send` ahead of it. These calls share nothing but the database, so they run on
DATABASE_THREADS threads per process, each with its own persistent connection.

After each call the thread's connection is left as Django leaves it after a request
(close_old_connections): closed if it broke or outlived DATABASE_CONN_MAX_AGE, otherwise
checked before its next use (`_health_check_skip_if_fresh` says how).
"""

import asyncio
import functools
import select
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar, cast

import psycopg
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, close_old_connections, connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg.pq import TransactionStatus

P = ParamSpec("P")
R = TypeVar("R")


@functools.cache
def _executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=settings.DATABASE_THREADS, thread_name_prefix="database")


def database_call(
    func: Callable[P, R], *, executor: ThreadPoolExecutor | None = None
) -> Callable[P, Coroutine[Any, Any, R]]:
    """`func`, awaitable, run on the process's database threads (or on `executor`'s)."""

    @functools.wraps(func)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        _health_check_skip_if_fresh()
        try:
            return func(*args, **kwargs)
        finally:
            close_old_connections()
            _last_use.connection, _last_use.at = connection.connection, time.monotonic()

    return sync_to_async(call, thread_sensitive=False, executor=executor or _executor())


# Per database thread: its connection's last use, (psycopg connection, time.monotonic()).
_last_use = threading.local()


def _health_check_skip_if_fresh() -> None:
    """Spare a connection used in the last DATABASE_HEALTH_CHECK_IDLE_SECONDS Django's health
    check, a `SELECT 1` round trip before its first statement (0.4 ms of each call under the
    bench, two calls on the way to every first token), when nothing waits to be read on it.

    A connection that PostgreSQL ended (a restart, pg_terminate_backend, idle_session_timeout)
    has its server's last words or its end of file waiting on the socket, which a poll sees
    without a round trip: that one is checked, fails, and is replaced before the call, as
    before. Only a connection lost without a word (a network or a firewall dropping it) is
    not seen by the poll, and those drop idle connections after minutes, not seconds: one
    idle longer than the bound is checked as before."""
    pg = connection.connection
    if getattr(_last_use, "connection", None) is not pg:
        return
    if pg is None or connection.vendor != "postgresql":
        return
    if time.monotonic() - _last_use.at > settings.DATABASE_HEALTH_CHECK_IDLE_SECONDS:
        return
    if not _server_words_waiting(pg.fileno()):
        # Django's own flag (BaseDatabaseWrapper), which its stubs do not declare.
        cast(Any, connection).health_check_done = True


def _server_words_waiting(fileno: int) -> bool:
    """Whether an idle connection's socket has something to read: the goodbye (or the end of
    file) of a server that ended it, seen without a round trip."""
    poller = select.poll()  # not select(): a web process's descriptors go far past 1,024
    poller.register(fileno, select.POLLIN)
    return bool(poller.poll(0))


def statement_rows(sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of one of the hot path's written-out PostgreSQL statements, run on Django's
    connection of this thread (its transaction, its health check, its error classes) with
    the parameters bound by the server and, by default, as a prepared statement.

    Django's cursor binds parameters on the client (psycopg's ClientCursor quotes each into
    the text), and PostgreSQL then parses and plans the whole text at every call. Prepared,
    a statement is parsed and planned once per connection (docs/performance.md). Set
    DATABASE_PREPARED_STATEMENTS=0 behind a pooler that cannot keep prepared statements
    (PgBouncer in transaction mode before 1.21, or without max_prepared_statements)."""
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(sql, params, prepare=settings.DATABASE_PREPARED_STATEMENTS)
        return cursor.fetchall()


# The hot path's statements awaited on the event loop itself


@functools.cache
def loop_database() -> BaseDatabaseWrapper:
    """The default database's wrapper for the event loop's statements: their connection
    parameters, adapters and error classes, and the vendor the statements are written for;
    never connected itself. Django's `connection` is one per async context: each socket's
    task that touched it made a wrapper of its own and kept it for the socket's life (1.6
    KiB of every idle socket, tracemalloc), and each job's task one more."""
    return connections.create_connection(DEFAULT_DB_ALIAS)


class LoopConnections:
    """psycopg's async connections of one process, for the hot path's written-out statements
    awaited on the event loop (statement_rows_async): at most DATABASE_LOOP_CONNECTIONS in
    use by each loop at once, kept open between calls and checked as the threads' are.

    A call on the database threads (database_call) hands the statement to a thread and its
    result back: under a wave of sockets, 370-410 µs of the process's CPU per opening
    statement, against 160-190 µs for the same statement awaited here (32 at once, a scratch
    measurement), the difference the threads' hand-offs and their fight for the GIL; and
    over daphne, the web's CPU per socket opened fell by about a fifth (docs/performance.md).

    Autocommit: each statement is committed on its own, as those of the threads are. The
    connections take the parameters, the adapters (time zones) and the error classes of
    Django's: a failure raises django.db's DatabaseError, as on the threads."""

    def __init__(self) -> None:
        # Most recently used last: the one taken next is the likeliest to skip its check.
        self.idle: list[tuple[psycopg.AsyncConnection[Any], float, float]] = []
        self.slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    async def rows(self, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> list[Any]:
        async with self._slot():
            with loop_database().wrap_database_errors:
                pg, born = await self._take()
                try:
                    async with psycopg.AsyncCursor(pg) as cursor:
                        await cursor.execute(
                            sql, params, prepare=settings.DATABASE_PREPARED_STATEMENTS
                        )
                        return await cursor.fetchall()
                finally:
                    self._give_back(pg, born)

    def _give_back(self, pg: psycopg.AsyncConnection[Any], born: float) -> None:
        # One the server refused a statement on (a constraint: a resend, a busy
        # conversation) is as good as before; one cancelled mid-statement, or broken, is not.
        if pg.info.transaction_status == TransactionStatus.IDLE:
            self.idle.append((pg, born, time.monotonic()))
        else:
            pg.pgconn.finish()

    def _slot(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        slot = self.slots.get(loop)
        if slot is None:
            slot = self.slots[loop] = asyncio.Semaphore(settings.DATABASE_LOOP_CONNECTIONS)
        return slot

    async def _take(self) -> tuple[psycopg.AsyncConnection[Any], float]:
        while self.idle:
            pg, born, used_at = self.idle.pop()
            if await _loop_connection_usable(pg, born=born, used_at=used_at):
                return pg, born
            pg.pgconn.finish()
        return await _loop_connection_open(), time.monotonic()


async def _loop_connection_open() -> psycopg.AsyncConnection[Any]:
    database = loop_database()
    params = database.get_connection_params()
    # Django's cursor class is a synchronous one; ours is named at each statement.
    params.pop("cursor_factory", None)
    pg = await psycopg.AsyncConnection.connect(**params, autocommit=True)
    # As Django's connection does (init_connection_state): the session's time zone is
    # Django's, for any time the server computes.
    if pg.info.parameter_status("TimeZone") != database.timezone_name:
        await pg.execute("SELECT set_config('TimeZone', %s, false)", [database.timezone_name])
    return pg


async def _loop_connection_usable(
    pg: psycopg.AsyncConnection[Any], *, born: float, used_at: float
) -> bool:
    """Whether an idle connection may take the next statement: not older than
    DATABASE_CONN_MAX_AGE, and used within DATABASE_HEALTH_CHECK_IDLE_SECONDS with nothing
    from the server on its socket (a connection PostgreSQL ended has its goodbye there), or
    else answering a `SELECT 1`: the rules of the threads' connections."""
    max_age = settings.DATABASES["default"].get("CONN_MAX_AGE")
    now = time.monotonic()
    if pg.closed or (max_age is not None and now - born >= max_age):
        return False
    fresh = now - used_at <= settings.DATABASE_HEALTH_CHECK_IDLE_SECONDS
    if fresh and not _server_words_waiting(pg.fileno()):
        return True
    try:
        await pg.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


loop_connections = LoopConnections()


async def statement_rows_async(
    sql: str, params: Sequence[Any] | Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """statement_rows, awaited on the event loop (LoopConnections): for a statement of the
    hot path that needs no transaction of its own caller's."""
    return await loop_connections.rows(sql, params)
