"""Real Grizz processes for the tests: `run_llm_worker` and daphne, started as subprocesses
with their output collected so that a test can wait for a line instead of sleeping.

They log as in production, one JSON object per line (LOG_FORMAT's default with
DJANGO_DEBUG=0): a test waits for a line by its message, whatever the format."""

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port nothing listens on (until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServiceProcess:
    port: int  # daphne's, set by daphne_start

    def __init__(self, args: list[str], *, env: dict[str, str]) -> None:
        self.args = args
        self.process = subprocess.Popen(
            args,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[str] = []
        self.messages: list[str] = []  # of each line: a JSON line's message, or the line
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._collect, daemon=True)
        self.reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line)
                self.messages.append(_message_of(line))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def output(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 20.0, *, count: int = 1) -> str:
        """The message of the `count`-th line whose message matches, once printed."""
        regex = re.compile(pattern)

        def matches() -> list[str]:
            return [message for message in self.messages if regex.search(message)]

        with self.changed:
            found = self.changed.wait_for(
                lambda: (
                    len(matches()) >= count
                    or (self.process.poll() is not None and not self.reader.is_alive())
                ),
                timeout=timeout,
            )
            matched = matches()
        if not found or len(matched) < count:
            raise AssertionError(
                f"{self.args[1:3]} never printed {pattern!r} {count} times:\n{self.output}"
            )
        return matched[count - 1]

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.reader.join(timeout=5)


def _message_of(line: str) -> str:
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            message = record.get("message") if isinstance(record, dict) else None
            if isinstance(message, str):
                return message
    return line


def _worker_args(*, name: str | None, concurrency: int, grace: float) -> list[str]:
    named = [] if name is None else [f"--name={name}"]
    args = [sys.executable, "manage.py", "run_llm_worker", *named]
    return [*args, f"--concurrency={concurrency}", f"--grace={grace}"]


def worker_start(
    *, env: dict[str, str], name: str | None, concurrency: int = 8, grace: float = 10.0
) -> ServiceProcess:
    """One worker process, unsupervised; without a name, it takes the lowest free
    <host>-<n>."""
    process = ServiceProcess(_worker_args(name=name, concurrency=concurrency, grace=grace), env=env)
    process.wait_for_line(r"worker \S+: ready")
    return process


def pool_start(
    *,
    env: dict[str, str],
    name: str,
    processes: int,
    options: tuple[str, ...] = (),
    ready: bool = True,
    concurrency: int = 8,
    grace: float = 10.0,
) -> ServiceProcess:
    """A supervised pool of `processes` workers named <name>-0, <name>-1...; waits until
    each is ready, unless `ready` is false."""
    args = _worker_args(name=name, concurrency=concurrency, grace=grace)
    process = ServiceProcess([*args, f"--processes={processes}", "--supervise", *options], env=env)
    for slot in range(processes if ready else 0):
        process.wait_for_line(rf"worker {re.escape(name)}-{slot}: ready")
    return process


def daphne_start(*, env: dict[str, str], port: int) -> ServiceProcess:
    process = ServiceProcess(
        [
            sys.executable,
            "-m",
            "grizz.server",
            "-b",
            "127.0.0.1",
            "-p",
            str(port),
            "grizz.asgi:application",
        ],
        env=env,
    )
    process.wait_for_line(r"Listening on TCP address")
    process.port = port
    return process
