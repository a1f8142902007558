"""Results: the rows of the main table (figure, measured, target, met?), per-scenario detail
tables, and the writing of bench/results/<date>.md and .json."""

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    figure: str
    measured: str
    target: str = "—"
    met: bool | None = None  # None: no target, or not measured


@dataclass
class Section:
    title: str
    headers: list[str]
    rows: list[list[str]]


@dataclass
class ScenarioResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)


def ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f} ms"


def met_mark(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "—"}[met]


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return lines


def main_table(results: list[ScenarioResult]) -> list[str]:
    rows = [
        [row.figure, row.measured, row.target, met_mark(row.met)]
        for result in results
        for row in result.rows
    ]
    return _table(["Figure", "Measured", "Target", "Met?"], rows)


def markdown(run: dict[str, object], results: list[ScenarioResult]) -> str:
    machine = run["machine"]
    assert isinstance(machine, dict)
    dirty = " (with uncommitted changes)" if machine["work_tree_dirty"] else ""
    settings = run.get("grizz_settings_changed") or {}
    assert isinstance(settings, dict)
    lines = [
        f"# Grizz bench, {run['date']} ({run['profile']} run)",
        "",
        f"Command: `{run['command']}`. Took {run['took_s']} s. Grizz commit "
        f"{machine['grizz_commit']}{dirty}.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM, "
        f"Linux {machine['kernel']}, Python {machine['python']}, Redis {machine['redis']}, "
        f"PostgreSQL {machine['postgresql']}. Load average when the run started: "
        f"{machine['loadavg_at_start']}. Everything (web, worker, Redis, PostgreSQL, model "
        "server, load generator) ran on this machine, shared with other users. Grizz settings "
        "changed from their defaults: "
        + (", ".join(f"`{k}={v}`" for k, v in settings.items()) or "none")
        + f". Worker concurrency: {run.get('worker_concurrency', 'default')}. Load generator: "
        f"{run.get('load_generator_processes', 1)} processes besides the bench's own.",
        "",
        *main_table(results),
    ]
    quiesce = run.get("quiesce") or []
    assert isinstance(quiesce, list)
    stuck = [str(q["before"]) for q in quiesce if not q["drained"]]
    if stuck:
        lines += [
            "",
            "Before these phases the previous one's load had not drained within 45 s, so "
            f"they ran with it: {', '.join(stuck)}.",
        ]
    for result in results:
        lines += _scenario_markdown(result)
    return "\n".join(lines) + "\n"


def _scenario_markdown(result: ScenarioResult) -> list[str]:
    if not result.sections and not result.notes:
        return []
    lines = ["", f"## {result.name}"]
    for note in result.notes:
        lines += ["", note]
    for section in result.sections:
        lines += ["", f"**{section.title}**", "", *_table(section.headers, section.rows)]
    return lines


def write(run: dict[str, object], results: list[ScenarioResult], *, suffix: str = "") -> Path:
    """Write <date><suffix>.md and .json through .tmp files, so that an interrupted write
    never leaves half a results file behind."""
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = f"{run['date']}{suffix}"
    payload = {**run, "scenarios": [asdict(result) for result in results]}
    outputs = {
        RESULTS_DIR / f"{stem}.md": markdown(run, results),
        RESULTS_DIR / f"{stem}.json": json.dumps(payload, indent=2, default=str) + "\n",
    }
    for path, text in outputs.items():
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return RESULTS_DIR / f"{stem}.md"


def today() -> str:
    return date.today().isoformat()
