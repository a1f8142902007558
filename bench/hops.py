"""The first token's hops alone: what a turn's way to its first token costs on this machine
with none of Grizz's work in it, the floor under the added time to first token.

A message takes the way a Grizz turn takes, each step cut down to its round trip: over a
WebSocket into the web's server (`python -m grizz.server` with bench/floor_app.py: daphne
and Channels), one Lua script call (admission's reservation), one INSERT committed durably
(the message, before the user may be told `queued`), one XADD; a worker process (`python -m
bench.hops`) reads it through a consumer group, commits one UPDATE durably (the claim that
fences out other attempts) and PUBLISHes; the web's subscriber sends a frame back on the
socket. No model is asked (the direct path asks it too), and there is no ORM, no token, no
JSON beyond the frame, no log line. What this takes is what any design with Grizz's
guarantees pays on this host before its own code runs: the latency scenario reports it
beside the added time to first token, for one conversation and for a burst.
"""

import asyncio
import contextlib
import itertools
import os
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import cast

import psycopg
import redis.asyncio as aredis
from websockets.asyncio.client import ClientConnection, connect

STREAM = "bench-hops:jobs"
GROUP = "bench-hops"
CHANNEL = "bench-hops:replies"
RESERVED = "bench-hops:reserved"
TABLE_DDL = "CREATE TABLE IF NOT EXISTS bench_hops_turn (id uuid PRIMARY KEY, attempt int NOT NULL)"
# Admission's shape: drop the expired, count, reserve.
ADMIT_SCRIPT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - 60000)
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"""
INSERT_SQL = "INSERT INTO bench_hops_turn (id, attempt) VALUES (%s, 0)"
CLAIM_SQL = "UPDATE bench_hops_turn SET attempt = attempt + 1 WHERE id = %s RETURNING attempt"
StreamsRead = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
FRAME = '{"type": "delta", "seq": 1, "content": "first"}'
# As many connections as Grizz's loop keeps (DATABASE_LOOP_CONNECTIONS), so that a burst
# is not serialised on one.
DATABASE_CONNECTIONS = 4
REDIS_CONNECTIONS = 64


class Connections:
    """PostgreSQL connections taken in turn; psycopg queues statements on a busy one."""

    def __init__(self, connections: list[psycopg.AsyncConnection]) -> None:
        self._next = itertools.cycle(connections)

    @classmethod
    async def open(cls) -> "Connections":
        url = os.environ["DATABASE_URL"]
        opened = [
            await psycopg.AsyncConnection.connect(url, autocommit=True)
            for _ in range(DATABASE_CONNECTIONS)
        ]
        return cls(opened)

    async def execute(self, sql: str, reply_id: str) -> None:
        cursor = await next(self._next).execute(sql, (reply_id,))
        if cursor.description is not None:
            await cursor.fetchall()


def redis_pool() -> aredis.Redis:
    pool = aredis.BlockingConnectionPool.from_url(
        os.environ["REDIS_URL"], max_connections=REDIS_CONNECTIONS
    )
    return aredis.Redis(connection_pool=pool)


class WebHops:
    """The web's half, one per floor process: a socket's message becomes a reserved place,
    a durable row and a job; the reply's PUBLISH comes back through one subscriber."""

    def __init__(self) -> None:
        self.ready = asyncio.Lock()
        self.started = False
        self.waiting: dict[str, Callable[[str], Awaitable[None]]] = {}

    async def turn(self, send: Callable[[str], Awaitable[None]]) -> None:
        await self._start()
        reply_id = str(uuid.uuid4())
        await self.admit(keys=[RESERVED], args=[int(time.time() * 1000), reply_id])
        await self.database.execute(INSERT_SQL, reply_id)
        self.waiting[reply_id] = send
        await self.redis.xadd(STREAM, {"r": reply_id})

    async def _start(self) -> None:
        async with self.ready:
            if self.started:
                return
            self.redis = redis_pool()
            self.admit = self.redis.register_script(ADMIT_SCRIPT)
            self.database = await Connections.open()
            subscriber = aredis.Redis.from_url(os.environ["REDIS_URL"], protocol=2).pubsub()
            await subscriber.subscribe(CHANNEL)
            self.relay = asyncio.create_task(self._relay(subscriber))
            self.started = True

    async def _relay(self, subscriber: aredis.client.PubSub) -> None:
        async for message in subscriber.listen():
            if message["type"] == "message":
                send = self.waiting.pop(message["data"].decode(), None)
                if send is not None:
                    await send(FRAME)


async def worker_serve() -> None:
    """The worker's half: read, claim durably, publish, acknowledge; a task per job, as
    Grizz's worker runs one per reply."""
    reader = aredis.Redis.from_url(os.environ["REDIS_URL"], protocol=2)
    client, database = redis_pool(), await Connections.open()
    with contextlib.suppress(aredis.ResponseError):  # the group exists
        await reader.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    tasks: set[asyncio.Task[None]] = set()

    async def job(entry_id: bytes, reply_id: str) -> None:
        await database.execute(CLAIM_SQL, reply_id)
        await client.publish(CHANNEL, reply_id)
        await client.xack(STREAM, GROUP, entry_id)

    print("bench.hops worker: ready", flush=True)
    while True:
        read = await reader.xreadgroup(GROUP, "floor", {STREAM: ">"}, count=100, block=0)
        for _, entries in cast(StreamsRead, read):
            for entry_id, fields in entries:
                task = asyncio.create_task(job(entry_id, fields[b"r"].decode()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


def table_create(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(TABLE_DDL)


async def _socket(url: str) -> ClientConnection:
    ws = await connect(url + "?hops=1", ping_interval=None, max_size=None)
    await ws.recv()  # hello
    return ws


async def _one(ws: ClientConnection) -> int:
    start = time.monotonic_ns()
    await ws.send("m")
    await ws.recv()
    return time.monotonic_ns() - start


async def single(url: str, turns: int, think_s: tuple[float, float]) -> list[int]:
    """One socket, one message at a time with a pause between: the times to its frame, ns."""
    ws = await _socket(url)
    try:
        await _one(ws)  # the first opens the process's connections
        times = []
        for _ in range(turns):
            await asyncio.sleep(random.uniform(*think_s))  # a user's pause, not a wait
            times.append(await _one(ws))
        return times
    finally:
        await ws.close()


async def burst(url: str, sockets: int, rounds: int, pause_s: float) -> list[int]:
    """`sockets` messages sent at once, `rounds` times: the times to each one's frame, ns."""
    opened = [await _socket(url) for _ in range(sockets)]
    try:
        await asyncio.gather(*(_one(ws) for ws in opened))
        times: list[int] = []
        for _ in range(rounds):
            await asyncio.sleep(pause_s)  # between rounds, as the latency burst pauses
            times += await asyncio.gather(*(_one(ws) for ws in opened))
        return times
    finally:
        await asyncio.gather(*(ws.close() for ws in opened))


if __name__ == "__main__":
    asyncio.run(worker_serve())
