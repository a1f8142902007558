"""Readings from /proc: CPU seconds and RSS of our processes, how busy the machine is, and
what the machine is (for the results header)."""

import os
import platform
import subprocess
from pathlib import Path

import redis

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent  # the Grizz tree being measured


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def postgres_cpu_s(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL server: the postmaster, its live backends, and (through
    the postmaster's cutime/cstime) every backend that has exited. Grizz opens a connection
    per request by default, so most of its backends are short-lived."""
    fields = _stat_fields(postmaster)
    total = sum(int(x) for x in fields[11:15]) / CLOCK_TICKS
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                child = _stat_fields(int(entry.name))
            except OSError:
                continue  # gone meanwhile
            if int(child[1]) == postmaster:
                total += (int(child[11]) + int(child[12])) / CLOCK_TICKS
    return total


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on: index 1 is the ppid, 11-14 the CPU times."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; the fields after it are fixed.
    return stat[stat.rindex(")") + 2 :].split()


def process_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle, summed over cores, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def loadavg_1min() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_describe(*, redis_url: str, postgres_version: str) -> dict[str, object]:
    info = redis.Redis.from_url(redis_url).info("server")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(_mem_total_gib(), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": info.get("redis_version", "unknown"),
        "postgresql": postgres_version,
        "loadavg_at_start": loadavg_1min(),
        "grizz_commit": _git("rev-parse", "--short", "HEAD"),
        "work_tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
