"""Real Grizz processes for the tests: `run_llm_worker` and daphne, started as subprocesses
with their output collected so that a test can wait for a line instead of sleeping."""

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
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._collect, daemon=True)
        self.reader.start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    @property
    def output(self) -> str:
        with self.changed:
            return "".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 20.0) -> str:
        regex = re.compile(pattern)
        with self.changed:
            found = self.changed.wait_for(
                lambda: (
                    any(regex.search(line) for line in self.lines)
                    or (self.process.poll() is not None and not self.reader.is_alive())
                ),
                timeout=timeout,
            )
            match = next((line for line in self.lines if regex.search(line)), None)
        if not found or match is None:
            raise AssertionError(f"{self.args[1:3]} never printed {pattern!r}:\n{self.output}")
        return match

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


def worker_start(
    *, env: dict[str, str], name: str, concurrency: int = 8, grace: float = 10.0
) -> ServiceProcess:
    process = ServiceProcess(
        [
            sys.executable,
            "manage.py",
            "run_llm_worker",
            f"--name={name}",
            f"--concurrency={concurrency}",
            f"--grace={grace}",
        ],
        env=env,
    )
    process.wait_for_line(r"worker \S+: ready")
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
