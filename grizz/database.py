"""Database calls from async code (the chat socket, the worker), on a bounded pool of
threads.

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

import functools
import select
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar, cast

import psycopg
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection

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
    poller = select.poll()  # not select(): a web process's descriptors go far past 1,024
    poller.register(pg.fileno(), select.POLLIN)
    if not poller.poll(0):
        # Django's own flag (BaseDatabaseWrapper), which its stubs do not declare.
        cast(Any, connection).health_check_done = True


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
