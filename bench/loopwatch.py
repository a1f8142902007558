"""`python -m bench --loop-watch` (diagnosis only): how late the event loops of web and
worker woke during the run, what held them, and what the garbage collector cost them.

The watch itself is bench/watch_site/sitecustomize.py, put on the PYTHONPATH of the Grizz
processes with BENCH_LOOP_WATCH naming a directory of the run's logs; this module sets that
up and turns what the processes wrote into the results' tables. Its 2 ms ticks cost each
process a few percent of a core, so a watched run's other figures are not to be compared
with a plain run's (the results file gets the suffix `-loop-watch`). This is how the full
collections of the startup heap were found (grizz/heap.py, docs/performance.md).
"""

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import ScenarioResult, Section

SITE = Path(__file__).resolve().parent / "watch_site"
TOP_STALL_SITES = 8


def watch_env(directory: Path) -> dict[str, str]:
    """The environment that makes the Grizz processes watch their loops into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "BENCH_LOOP_WATCH": str(directory)}


@dataclass
class _Process:
    """What one process wrote: its 5 s windows, its stalls, its full collections (ms)."""

    name: str
    windows: list[dict[str, Any]] = field(default_factory=list)
    stalls: list[dict[str, Any]] = field(default_factory=list)
    full_collections_ms: list[float] = field(default_factory=list)


def watch_result(directory: Path) -> ScenarioResult:
    result = ScenarioResult("Event loops of web and worker (--loop-watch)")
    processes = [_process_read(path) for path in sorted(directory.glob("*.jsonl"))]
    watched = [p for p in processes if p.windows]
    result.sections.append(_loops_table(watched))
    result.sections.append(_stalls_table(watched))
    result.notes.append(
        "Each process's loop sleeps 2 ms at a time; its lag is how much later it woke. A "
        "stall is 25 ms or more without a wake-up; its site is the innermost frame of the "
        "loop thread's stack then (the code that held the loop, or that was running when "
        "the process lost its core). Full collections are the garbage collector's "
        "generation 2. Times include waiting for a core."
    )
    return result


def _process_read(path: Path) -> _Process:
    process = _Process(name=path.stem)
    for line in path.read_text().splitlines():
        record = json.loads(line)
        kind = record["kind"]
        if kind == "start":
            process.name = _process_name(record["argv"], path.stem)
        elif kind == "window":
            process.windows.append(record)
        elif kind == "stall":
            process.stalls.append(record)
        elif kind == "gc" and record["generation"] == 2:
            process.full_collections_ms.append(record["ms"])
    return process


def _process_name(argv: list[str], pid: str) -> str:
    if "run_llm_worker" in argv:
        return f"worker {pid}"
    if any("grizz.asgi" in arg for arg in argv):
        return f"web {pid}"
    return f"{' '.join(argv[:2])} {pid}"


def _loops_table(processes: list[_Process]) -> Section:
    rows = []
    for process in processes:
        windows = process.windows
        worst = max(windows, key=lambda w: w["lag_p99_ms"])
        gc_ms: Counter[str] = Counter()
        for window in windows:
            gc_ms.update({f"gen{g}": ms for g, ms in window["gc_ms"].items()})
        full = process.full_collections_ms
        rows.append(
            [
                process.name,
                str(len(windows)),
                f"{worst['lag_p50_ms']:.2f} / {worst['lag_p99_ms']:.1f}",
                f"{max(w['lag_max_ms'] for w in windows):.1f}",
                str(len(process.stalls)),
                f"{len(full)}, max {max(full):.1f}" if full else "0",
                ", ".join(f"{g} {ms:.0f}" for g, ms in sorted(gc_ms.items())),
            ]
        )
    headers = [
        "Process",
        "5 s windows",
        "Worst window's lag p50 / p99 (ms)",
        "Largest lag (ms)",
        "Stalls ≥ 25 ms",
        "Full collections over 5 ms (n, ms)",
        "Collections in all, ms by generation",
    ]
    return Section("Event-loop lag and garbage collection", headers, rows)


def _stalls_table(processes: list[_Process]) -> Section:
    rows = []
    for process in processes:
        sites: Counter[str] = Counter()
        longest: dict[str, float] = {}
        for stall in process.stalls:
            site = stall["stack"][-1].splitlines()[0] if stall["stack"] else "?"
            sites[site] += 1
            longest[site] = max(longest.get(site, 0.0), stall["ms"])
        for site, count in sites.most_common(TOP_STALL_SITES):
            rows.append([process.name, str(count), f"{longest[site]:.0f}", site])
    return Section("Stall sites", ["Process", "Stalls", "Longest (ms)", "Innermost frame"], rows)
