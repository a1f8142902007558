"""Redis clients and key names.

asyncio Redis clients belong to the event loop that created them, so each loop gets its own
client (the web process has one loop; the test suite makes a loop per test).
"""

import asyncio
import math
import random
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeAlias, cast

import hiredis
import redis
import redis.asyncio as aioredis
import redis.retry
from django.conf import settings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError, ResponseError

# A stream's entries as these clients return them. They decode replies (decode_responses),
# which redis-py's types cannot know: there every reply is bytes or str, and may be None.
StreamEntries: TypeAlias = list[tuple[str, dict[str, str]]]
StreamsRead: TypeAlias = list[tuple[str, StreamEntries]]  # XREAD(GROUP): (stream, entries)

# What a Redis call may fail with and succeed when tried again later.
TRANSIENT_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis]" = (
    weakref.WeakKeyDictionary()
)


_scripts: "weakref.WeakKeyDictionary[aioredis.Redis, dict[str, AsyncScript]]" = (
    weakref.WeakKeyDictionary()
)


def script_get(client: aioredis.Redis, source: str) -> AsyncScript:
    """A Lua script bound to a client, made once: calls go by EVALSHA (the source travels
    only when Redis has not seen it), and the per-turn paths build nothing."""
    scripts = _scripts.setdefault(client, {})
    if source not in scripts:
        scripts[source] = client.register_script(source)
    return scripts[source]


# redis-py tells Redis its name and version on every connection it opens (CLIENT SETINFO,
# shown by CLIENT LIST), and reads that version from the installed package's metadata for
# each connection it makes: a scan of sys.path's distributions, 0.5-1 ms of CPU and a few
# dozen system calls on the event loop each time a pool grows or reconnects (one stalled a
# loaded worker 34 ms, bench --loop-watch). Read once, here.
_DRIVER_INFO = DriverInfo(name="redis-py", lib_version=redis.__version__)


def redis_get() -> aioredis.Redis:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        # A blocking pool: with more calls in flight than connections, a call waits for a
        # free connection (up to `timeout`) instead of failing at once.
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.REDIS_URL,
            max_connections=settings.REDIS_MAX_CONNECTIONS,
            timeout=5,
            socket_connect_timeout=3,
            # Long enough for a blocking XREADGROUP (which adds its own block time).
            socket_timeout=10,
            socket_keepalive=True,
            # Spread the health checks of a process's connections over time.
            health_check_interval=25 + random.random() * 10,
            decode_responses=True,
            driver_info=_DRIVER_INFO,
        )
        client = aioredis.Redis(connection_pool=pool)
        _clients[loop] = client
    return client


def redis_pubsub_client(purpose: str = "pubsub") -> aioredis.Redis:
    # No silent retries: the reply hub must see a lost connection, because frames published
    # while it was down have to be read back from the replay logs.
    return aioredis.Redis.from_url(
        settings.REDIS_URL,
        # Tells an operator (CLIENT LIST) whose connection it is, and which deployment's.
        client_name=f"grizz-{purpose}:{settings.REDIS_KEY_PREFIX}",
        socket_connect_timeout=3,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        driver_info=_DRIVER_INFO,
        # RESP2, not redis-py 8's default RESP3: there a published message is a push, and
        # redis-py's push handler formats each one whole into a debug line that is then
        # dropped, a third of what the reply hub spent reading a frame (17 → 11 µs, 16
        # frames per read, docs/performance.md).
        protocol=2,
    )


def redis_sync_client(*, purpose: str, timeout: float) -> redis.Redis:
    """A synchronous client, for a process with no event loop (a pool's supervisor). Each
    call is bounded by `timeout` and never retried: a Redis that is down or hung costs the
    caller one timeout, not a backoff of retries."""
    return redis.Redis.from_url(
        settings.REDIS_URL,
        client_name=f"grizz-{purpose}:{settings.REDIS_KEY_PREFIX}",
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=redis.retry.Retry(NoBackoff(), 0),
        decode_responses=True,
        driver_info=_DRIVER_INFO,
    )


Command: TypeAlias = list[str | int]


class CommandBatches:
    """Batches of commands on a connection of their own, each batch one write whose replies
    are read in order (an error reply as its exception): a pipeline without a transaction,
    for a caller that sends one batch at a time (the worker's FrameEmitter).

    redis-py's Pipeline packed each command in Python (about 16 µs of CPU each) and took a
    connection from the pool, with its checks, for each batch (about 85 µs more): most of
    what a round of frames cost the worker (docs/performance.md). And no retries here: a
    batch whose replies were lost may have run, and running it again could do it twice."""

    def __init__(self, client: aioredis.Redis) -> None:
        pool = client.connection_pool
        self.connection = pool.connection_class(**pool.connection_kwargs)
        self.read_timeout = pool.connection_kwargs.get("socket_timeout")

    async def run(self, commands: list[Command]) -> list[Any]:
        try:
            await self.connection.send_packed_command(commands_packed(commands))
            # One timeout for the batch's replies: redis-py's, per reply, set a timer each.
            async with asyncio.timeout(self.read_timeout):
                return [await self._reply() for _ in commands]
        except BaseException:
            # Replies left unread would answer the next batch: start again on a new one.
            await self.connection.disconnect()
            raise

    async def _reply(self) -> Any:
        try:
            return await self.connection.read_response(timeout=math.inf)
        except ResponseError as error:
            return error


def commands_packed(commands: list[Command]) -> bytes:
    """The commands in RESP, Redis's wire format, packed by hiredis's C packer: a frame's
    script call packed in Python cost the worker 6.3 µs, in hiredis 2.5 (docs/performance.md)."""
    # hiredis's stub declares a one-element tuple for what is any number of arguments.
    pack = cast(Callable[[tuple[str | int, ...]], bytes], hiredis.pack_command)
    return b"".join([pack(tuple(command)) for command in commands])


def key(*parts: str) -> str:
    # The prefix sits in a hash tag: every key of one deployment lives in one Cluster slot,
    # so a script may touch several of them.
    return ":".join(("{" + settings.REDIS_KEY_PREFIX + "}", *parts))


def jobs_stream_key(priority: str = "normal") -> str:
    return key("jobs") if priority == "normal" else key("jobs", priority)


def jobs_reserved_key() -> str:
    # Jobs admitted whose rows are being committed: counted in the queue's length until
    # job_enqueue puts them on a stream (llmworker/admission.py).
    return key("jobs", "admitted")


def dead_letter_key() -> str:
    return key("jobs", "dead")


async def redis_now_ms() -> int:
    """Redis's clock, in the milliseconds of stream entry ids (which it stamps with it)."""
    seconds, micros = await redis_get().time()
    return int(seconds) * 1000 + int(micros) // 1000


def entry_id_ms(entry_id: str) -> int:
    """When a stream entry was added, in Redis's milliseconds: the first part of its id."""
    return int(entry_id.partition("-")[0])


def entry_age_seconds(entry_id: str) -> float:
    """How long ago a stream entry was added, by this host's clock against Redis's (which
    stamped the id): on the hot path, where a TIME round trip would cost more than the
    figure is worth, so hosts' clocks must agree (NTP). Never negative."""
    return max(0.0, time.time() - entry_id_ms(entry_id) / 1000)


def reply_log_key(job_id: str) -> str:
    return key("reply", job_id, "log")


def reply_attempt_key(job_id: str) -> str:
    return key("reply", job_id, "attempt")


def reply_cancel_key(job_id: str) -> str:
    return key("reply", job_id, "cancel")


def user_rate_key(user_id: int | str) -> str:
    return key("user", str(user_id), "rate")


def user_inflight_key(user_id: int | str) -> str:
    return key("user", str(user_id), "inflight")


def cancel_channel() -> str:
    return key("cancel")


def maintenance_lease_key() -> str:
    # Its value is the consumer name of the worker that runs the chores (llmworker/maintenance.py).
    return key("maintenance")


def conversation_channel(conversation_id: str) -> str:
    return key("conv", conversation_id)


def worker_snapshot_key(name: str) -> str:
    # A worker's latest figures for llm_status (llmworker/snapshots.py), with a TTL.
    return key("worker", name, "snapshot")


def worker_snapshots_key() -> str:
    # The names of the workers that published a snapshot, scored by when (ms): llm_status
    # reads the snapshots without a SCAN.
    return key("workers")


WORKER_GROUP = "workers"


# Only the holder extends or releases its lease, checked in the same step: a holder that
# stalled past its lease can neither keep nor drop its successor's.
LEASE_EXTEND_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""

LEASE_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""


class Lease:
    """A key held by one name at a time for `ttl_ms` unless extended: taken only when free
    (SET NX PX), so that a holder that dies is replaced once its lease has run out."""

    def __init__(self, *, key: str, holder: str, ttl_ms: int) -> None:
        self.key, self.holder, self.ttl_ms = key, holder, ttl_ms

    async def take(self) -> bool:
        return bool(await redis_get().set(self.key, self.holder, nx=True, px=self.ttl_ms))

    async def extend(self) -> bool:
        """False when the lease is no longer this holder's."""
        extend = script_get(redis_get(), LEASE_EXTEND_SCRIPT)
        return bool(await extend(keys=[self.key], args=[self.holder, self.ttl_ms]))

    async def release(self) -> bool:
        release = script_get(redis_get(), LEASE_RELEASE_SCRIPT)
        return bool(await release(keys=[self.key], args=[self.holder]))
