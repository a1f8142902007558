"""The bench's own Grizz deployment: a private redis-server, a PostgreSQL database of its
own, the stamped model server, one daphne and one run_llm_worker, each a child process
whose output goes to a log file. `Deployment.close()` takes it all down again and is safe
to call at any point of `start()`."""

import ctypes
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis

from bench import hops
from bench.procstat import postgres_cpu_s, process_cpu_s

ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1
DB_PREFIX = "grizz_bench_"
KEY_PREFIX = "grizz-bench"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# Grizz settings the bench changes from their defaults (results list them): its synthetic
# users are not people.
BENCH_SETTINGS = {
    # Tokens must outlive the whole run.
    "JWT_ACCESS_MINUTES": "240",
    # A bench user sends a message every second or so. The limit is checked on every
    # message all the same (its cost is measured), it just never refuses one.
    "CHAT_RATE_LIMIT": "1000000/min",
}


class DeploymentError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # In the child, before exec: if the bench is killed outright (kill -9), the kernel
    # sends SIGTERM to the children instead of leaving them running.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Service:
    """A child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], *, env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        # Appended to: a service restarted under the same name keeps its earlier output.
        with self.log_path.open("ab") as log:
            self.log_start = log.tell()  # what wait_for reads: this process's output only
            # A session of its own: Ctrl-C reaches only the bench, which then stops the
            # children in order (worker before Redis) instead of all of them at once.
            self.process = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _output_since_start(self) -> str:
        return self.log_path.read_bytes()[self.log_start :].decode(errors="replace")

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self._output_since_start())
            if match:
                return match
            if self.process.poll() is not None or time.monotonic() > deadline:
                state = f"exited {self.process.returncode}" if self.process.poll() else "timed out"
                raise DeploymentError(
                    f"{self.name} {state} before printing {pattern!r}:\n{self.tail()}"
                )
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass(frozen=True)
class Seed:
    conversation_id: str
    token: str


def _postgres_version(admin_url: str) -> str:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def _postmaster_pid(admin_url: str) -> int | None:
    """The PostgreSQL server's pid, when it runs on this machine and we may read its data
    directory (for its CPU use); None otherwise."""
    try:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        pid = int((Path(str(row[0])) / "postmaster.pid").read_text().split()[0]) if row else 0
    except (psycopg.Error, OSError, ValueError, IndexError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _database_drop(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        # FORCE ends the connections Grizz's processes may still hold.
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _stale_databases_drop(admin_url: str) -> list[str]:
    """Databases of earlier bench runs that were killed before their cleanup."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        names = [
            row[0]
            for row in conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s", (DB_PREFIX + "%",)
            )
        ]
    stale = [n for n in names if not Path(f"/proc/{n.removeprefix(DB_PREFIX)}").exists()]
    for name in stale:
        _database_drop(admin_url, name)
    return stale


class Deployment:
    def __init__(
        self,
        *,
        conversations: int,
        extra_env: dict[str, str],
        admin_url: str = DEFAULT_POSTGRES_URL,
    ) -> None:
        self.conversations = conversations
        self.worker_concurrency = 0  # the worker's own default, read from its log at start
        self.extra_env = extra_env
        self.admin_url = admin_url
        self.db_name = f"{DB_PREFIX}{os.getpid()}"
        self.logs = Path(tempfile.mkdtemp(prefix="grizz-bench-"))
        self.services: dict[str, Service] = {}
        self.db_created = False
        self.seeds: list[Seed] = []
        self.redis_url = self.model_url = ""
        self.web_port = 0
        self.postgres_version = ""
        self.postmaster: int | None = None
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        stale = _stale_databases_drop(self.admin_url)
        if stale:
            print(f"dropped databases of killed bench runs: {', '.join(stale)}", flush=True)
        self.postgres_version = _postgres_version(self.admin_url)
        self.postmaster = _postmaster_pid(self.admin_url)
        self._redis_start()
        self._model_start()
        self._database_create()
        env = self.env = self._grizz_env()
        self._manage(env, "migrate", "--noinput", "-v0")
        self.web_port = free_port()
        self._web_start(env)
        self._worker_start(env)
        self.seeds = self._seed(env)
        self.services["web"].wait_for(r"Listening on TCP address")
        self.services["worker"].wait_for(r"worker \S+: ready")
        started = self.services["worker"].wait_for(r"started, concurrency (\d+)")
        self.worker_concurrency = int(started.group(1))

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Service:
        service = Service(name, args, env=env or dict(os.environ), logs=self.logs)
        self.services[name] = service
        return service

    def _redis_start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise DeploymentError("redis-server is not installed (apt install redis-server)")
        port = free_port()
        # No persistence: nothing to save, and no fork for a background save mid-scenario.
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.logs), "--maxclients", "10000"]
        self._spawn("redis", args).wait_for(r"Ready to accept connections", timeout=20)
        self.redis_url = f"redis://127.0.0.1:{port}/0"

    def _model_start(self) -> None:
        args = [sys.executable, "-m", "bench.model_server", "--port", "0"]
        match = self._spawn("model", args).wait_for(r"listening on (\S+)", timeout=30)
        self.model_url = match.group(1)

    def _database_create(self) -> None:
        _database_drop(self.admin_url, self.db_name)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.db_created = True

    def database_url(self) -> str:
        base = self.admin_url.rsplit("/", 1)[0]
        return f"{base}/{self.db_name}"

    def _grizz_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "DATABASE_URL": self.database_url(),
            "REDIS_URL": self.redis_url,
            "REDIS_KEY_PREFIX": KEY_PREFIX,
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
            "DJANGO_DEBUG": "0",
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "OPENAI_API_KEY": "bench-key",
            "OPENAI_BASE_URL": self.model_url,
            "LLM_MODEL": "bench-model",
            **BENCH_SETTINGS,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }

    def _manage(self, env: dict[str, str], *args: str) -> None:
        result = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            raise DeploymentError(f"manage.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")

    def _web_start(self, env: dict[str, str]) -> None:
        args = [sys.executable, "-m", "grizz.server", "-b", "127.0.0.1", "-p", str(self.web_port)]
        self._spawn("web", [*args, "grizz.asgi:application"], env)

    def floor_start(self) -> str:
        """Start the web's server with bench/floor_app.py's bare application (service
        `floor`) and return the URL of its sockets."""
        port = free_port()
        args = [sys.executable, "-m", "grizz.server", "-b", "127.0.0.1", "-p", str(port)]
        service = self._spawn("floor", [*args, "bench.floor_app:application"], self.env)
        service.wait_for(r"Listening on TCP address")
        return f"ws://127.0.0.1:{port}/"

    def floor_stop(self) -> None:
        self.services.pop("floor").stop()

    def hops_worker_start(self) -> None:
        """Start bench/hops.py's worker (service `hops`) beside the floor's server."""
        hops.table_create(self.database_url())
        service = self._spawn("hops", [sys.executable, "-m", "bench.hops"], self.env)
        service.wait_for(r"bench.hops worker: ready")

    def hops_worker_stop(self) -> None:
        self.services.pop("hops").stop()

    def _worker_start(self, env: dict[str, str], key: str = "worker", name: str = "") -> Service:
        args = [sys.executable, "manage.py", "run_llm_worker", "--name", name or "bench-worker-1"]
        # No --concurrency: the worker runs as a user gets it (its default, read from the
        # log line it starts with, is stated in the results).
        args += ["--grace", "3"]
        return self._spawn(key, args, env)

    def worker_start(self, key: str, name: str, env: dict[str, str] | None = None) -> Service:
        """Start one more run_llm_worker (service `key`, worker `name`), with the settings
        in `env` changed, and wait until it is ready (blocking)."""
        service = self._worker_start({**self.env, **(env or {})}, key, name)
        service.wait_for(r"worker \S+: ready")
        return service

    def worker_stop(self, key: str) -> None:
        """Stop a worker (SIGTERM, its --grace) and forget it: its end is intended."""
        self.services.pop(key).stop()

    def worker_kill(self, key: str) -> int:
        """`kill -9` a worker and forget it; returns the CLOCK_MONOTONIC ns of the kill."""
        service = self.services.pop(key)
        killed_ns = time.monotonic_ns()
        service.process.kill()
        service.process.wait(timeout=10)
        return killed_ns

    def _seed(self, env: dict[str, str]) -> list[Seed]:
        result = subprocess.run(
            [sys.executable, "-m", "bench.seed", str(self.conversations)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise DeploymentError(f"seeding failed:\n{result.stderr[-3000:]}")
        return [Seed(**json.loads(line)) for line in result.stdout.splitlines() if line]

    # ------------------------------------------------------------------ use

    @property
    def pids(self) -> dict[str, int]:
        return {name: service.pid for name, service in self.services.items()}

    def cpu_readers(self) -> dict[str, Callable[[], float]]:
        readers: dict[str, Callable[[], float]] = {
            name: functools.partial(process_cpu_s, pid) for name, pid in self.pids.items()
        }
        if self.postmaster is not None:
            # The whole server: other users' databases on it are counted too.
            readers["postgres"] = functools.partial(postgres_cpu_s, self.postmaster)
        return readers

    def ws_url(self, seed: Seed) -> str:
        return f"ws://127.0.0.1:{self.web_port}/ws/chat/{seed.conversation_id}/?token={seed.token}"

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def jobs_stream_key(self) -> str:
        return "{" + KEY_PREFIX + "}:jobs"

    def dead_services(self) -> list[str]:
        return [name for name, service in self.services.items() if not service.alive()]

    # ------------------------------------------------------------------ stop

    def close(self, *, keep_logs: bool = False) -> None:
        """Stop everything (worker first, Redis last), drop the database, remove the logs
        unless asked to keep them. Never raises: a partial teardown still does the rest."""
        order = ("worker", "web", "model", "redis")
        extra_workers = [name for name in self.services if name not in order]
        for name in (*extra_workers, *order):
            service = self.services.get(name)
            if service is not None:
                try:
                    service.stop()
                except Exception as error:
                    print(f"could not stop {name}: {error}", file=sys.stderr)
        if self.db_created:
            try:
                _database_drop(self.admin_url, self.db_name)
            except psycopg.Error as error:
                print(f"could not drop {self.db_name}: {error}", file=sys.stderr)
        if not keep_logs:
            shutil.rmtree(self.logs, ignore_errors=True)
