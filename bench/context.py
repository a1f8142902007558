"""What every scenario gets: the deployment, the socket pool, the run profile and budget, a
control connection to the private Redis, and fresh conversations on request."""

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from bench.config import Budget, Profile
from bench.deployment import Deployment, Seed
from bench.fleet import Fleet
from bench.load import ChatClient, SocketPool
from bench.meter import Meter
from bench.procstat import process_cpu_s

# Commands the bench itself sends to Redis; they are left out of every count.
BENCH_COMMANDS = {"info", "config|resetstat", "config|set", "monitor"}
QUIESCE_SAMPLE_S = 1.0
QUIET_CORES = 0.15  # web + worker below this share of one core: nothing left running


@dataclass
class Context:
    deployment: Deployment
    profile: Profile
    budget: Budget
    pool: SocketPool
    redis: aioredis.Redis
    fleet: Fleet
    profiling: bool = False  # --profile: py-spy attaches in a phase of its own
    used: int = 0  # sockets [0, used) belong to earlier scenarios
    open_rate: float = 0.0  # sockets per second the web process accepted lately
    quiesce_log: list[dict[str, object]] = field(default_factory=list)

    async def sockets(self, count: int) -> list[ChatClient]:
        """`count` open sockets on conversations no earlier scenario used, so that one
        scenario's history does not lengthen the next one's prompts."""
        start = self.used
        await self.pool.grow(start + count)
        if len(self.pool.clients) < start + count:
            raise RuntimeError(f"sockets failed to open: {self.pool.failures[-3:]}")
        self.used = start + count
        return self.pool.clients[start : start + count]

    def seeds(self, count: int) -> list[Seed]:
        """`count` conversations no earlier scenario used, for sockets the fleet opens."""
        start = self.pool.next_seed
        seeds = self.deployment.seeds[start : start + count]
        if len(seeds) < count:
            raise RuntimeError(f"{count} more conversations wanted, {len(seeds)} seeded left")
        self.pool.next_seed += count
        return seeds

    def urls(self, count: int) -> list[str]:
        return [self.deployment.ws_url(seed) for seed in self.seeds(count)]

    async def close_sockets(self) -> None:
        await self.pool.close_all()
        self.used = 0

    def meter(self) -> Meter:
        """CPU of every process of ours: Grizz's, Redis, PostgreSQL, the model server, the
        bench and (summed, as "load") the load generator's processes."""
        return Meter({**self.deployment.cpu_readers(), "load": self.fleet.cpu_s})

    async def commandstats(self) -> dict[str, int]:
        """Calls per command since the last reset, without the bench's own commands."""
        info: dict[str, Any] = await self.redis.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in info.items()}
        return {name: n for name, n in calls.items() if name not in BENCH_COMMANDS}

    async def commandstats_reset(self) -> None:
        await self.redis.config_resetstat()

    def check_alive(self) -> None:
        """Raise if a Grizz process died: nothing after that would mean anything."""
        dead = self.deployment.dead_services()
        if dead:
            logs = "\n".join(f"--- {n}:\n{self.deployment.services[n].tail()}" for n in dead)
            raise RuntimeError(f"processes died: {', '.join(dead)}\n{logs}")

    async def quiesce(self, label: str, *, most_s: float = 45.0) -> bool:
        """Wait until no job is left (the jobs stream is empty: a job's entry is deleted when
        it is acknowledged) and web and worker have gone quiet (messages may still wait in
        the web process's database thread before their XADD), so that the replies of a phase
        whose turns timed out do not load the next one. False if that never happened."""
        started = time.monotonic()
        key = self.deployment.jobs_stream_key()
        busy = [self.deployment.pids[name] for name in ("web", "worker")]
        drained, cores, jobs = False, 0.0, 0
        while not drained and time.monotonic() - started < most_s:
            before = sum(process_cpu_s(pid) for pid in busy)
            await asyncio.sleep(QUIESCE_SAMPLE_S)
            cores = (sum(process_cpu_s(pid) for pid in busy) - before) / QUIESCE_SAMPLE_S
            jobs = await self.redis.xlen(key)
            drained = cores < QUIET_CORES and not jobs
        self.quiesce_log.append(
            {
                "before": label,
                "waited_s": round(time.monotonic() - started, 1),
                "drained": drained,
                "last_web_worker_cores": round(cores, 2),
                "last_jobs_in_stream": jobs,
            }
        )
        return drained
