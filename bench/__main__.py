"""`python -m bench` (`make bench`): start a private Grizz deployment, play the scenarios,
write bench/results/<date>.md and .json, print the table, take everything down again.

    python -m bench                      # the full run, under 10 minutes
    python -m bench --quick              # a smoke run, under 2 minutes
    python -m bench --only latency       # some scenarios only (repeat or comma-separate)
    python -m bench --env DATABASE_CONN_MAX_AGE=0    # run Grizz with other settings
    python -m bench --profile            # also: where web and worker spend CPU (py-spy)
    python -m bench --loop-watch         # also: their event loops' lag, stalls, collections

BENCH_POSTGRES_URL names the PostgreSQL server and an existing database to connect to for
creating and dropping the bench's own (default postgresql://postgres@127.0.0.1:5432/postgres).
"""

import argparse
import asyncio
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from types import FrameType

import redis.asyncio as aioredis

from bench.analysis import turn_problem
from bench.config import FULL, QUICK, SHAPE_SINGLE, Budget, Profile
from bench.context import Context
from bench.deployment import (
    BENCH_SETTINGS,
    DEFAULT_POSTGRES_URL,
    Deployment,
    DeploymentError,
)
from bench.fleet import Fleet
from bench.load import SocketPool
from bench.loopwatch import watch_env, watch_result
from bench.procstat import machine_describe
from bench.report import Row, ScenarioResult, main_table, today, write
from bench.scenarios import DEFAULT, SCENARIOS


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (< 2 minutes)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help=f"scenarios to run, of: {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the Grizz processes' logs, even on success"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the Grizz processes",
    )
    parser.add_argument(
        "--load-procs",
        type=int,
        default=LOAD_PROCS,
        help="processes the load generator is spread over (default %(default)s)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile web and worker with py-spy in a phase of their own (needs py-spy)",
    )
    parser.add_argument(
        "--loop-watch",
        action="store_true",
        help="diagnosis: record how late web's and worker's event loops woke, what held them "
        "and what garbage collection cost them (costs them CPU: bench/loopwatch.py)",
    )
    args = parser.parse_args(argv)
    if args.load_procs < 1:
        parser.error("--load-procs takes a number ≥ 1")
    args.only = [name for item in args.only for name in item.split(",") if name]
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if any("=" not in item for item in args.env):
        parser.error("--env takes NAME=VALUE")
    return args


# The load generator's processes. More than the cores: a process's event-loop lag grows with
# the frames it handles per loop iteration, so smaller shares keep each one punctual.
LOAD_PROCS = 3


def _fd_limit_raise() -> int:
    """Thousands of sockets need thousands of descriptors, here and in the web process,
    which inherits the limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _sigterm_to_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    profile = QUICK if args.quick else FULL
    names = args.only or list(DEFAULT)
    if args.profile and "profile" not in names:
        names.append("profile")
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    fd_limit = _fd_limit_raise()
    budget = Budget(profile.budget_s, profile.teardown_reserve_s)
    extra_env = dict(item.split("=", 1) for item in args.env)
    deployment = Deployment(
        conversations=profile.conversations,
        extra_env=extra_env,
        admin_url=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
    )
    watch_dir = deployment.logs / "loop-watch"
    if args.loop_watch:
        deployment.extra_env.update(watch_env(watch_dir))
    results: list[ScenarioResult] = []
    run: dict[str, object] = {
        "date": today(),
        "profile": profile.name,
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "scenarios_run": names,
        "grizz_settings_changed": {**BENCH_SETTINGS, **extra_env},
        "load_generator_processes": args.load_procs,
        "conversations_seeded": profile.conversations,
        "fd_limit": fd_limit,
    }
    failed = True
    try:
        print(f"bench: starting a private deployment (logs in {deployment.logs})", flush=True)
        deployment.start()
        run["worker_concurrency"] = f"{deployment.worker_concurrency} (its default)"
        run["setup_s"] = round(budget.elapsed(), 1)
        run["machine"] = machine_describe(
            redis_url=deployment.redis_url, postgres_version=deployment.postgres_version
        )
        fleet = Fleet(procs=args.load_procs, model_url=deployment.model_url)
        try:
            fleet.start()
            ctx_args = (deployment, profile, budget, fleet, args.profile)
            asyncio.run(_scenarios_run(ctx_args, names, results, run))
        finally:
            fleet.close()
        failed = False
    except KeyboardInterrupt:
        print("bench: interrupted; tearing down", file=sys.stderr)
    except DeploymentError as error:
        print(f"bench: the deployment failed: {error}", file=sys.stderr)
    finally:
        if args.loop_watch and results:
            results.append(watch_result(watch_dir))
        deployment.close(keep_logs=failed or args.keep_logs)
        if failed or args.keep_logs:
            print(f"bench: logs kept in {deployment.logs}", file=sys.stderr)
    return _finish(run, results, args, budget, failed)


def _finish(
    run: dict[str, object],
    results: list[ScenarioResult],
    args: argparse.Namespace,
    budget: Budget,
    failed: bool,
) -> int:
    if not results or "machine" not in run:
        return 1
    run["took_s"] = round(budget.elapsed(), 1)
    run["complete"] = not failed
    suffix = (
        ("-quick" if args.quick else "")
        + ("-only-" + "-".join(args.only) if args.only else "")
        + ("-env" if args.env else "")
        + ("-loop-watch" if args.loop_watch else "")
    )
    path = write(run, results, suffix=suffix)
    print("\n".join(["", *main_table(results), "", f"bench: results in {path} and .json"]))
    return 1 if failed else 0


async def _scenarios_run(
    ctx_args: tuple[Deployment, Profile, Budget, Fleet, bool],
    names: list[str],
    results: list[ScenarioResult],
    run: dict[str, object],
) -> None:
    deployment, profile, budget, fleet, profiling = ctx_args
    control = aioredis.Redis.from_url(deployment.redis_url, decode_responses=True)
    pool = SocketPool(deployment)
    ctx = Context(deployment, profile, budget, pool, control, fleet, profiling)
    try:
        await _self_check(ctx)
        for name in names:
            print(f"bench: [{budget.elapsed():4.0f} s] {name}", flush=True)
            if not await _scenario_run(ctx, name, results):
                break
    finally:
        run["quiesce"] = ctx.quiesce_log
        await ctx.close_sockets()
        await control.aclose()


async def _scenario_run(ctx: Context, name: str, results: list[ScenarioResult]) -> bool:
    """Run one scenario; a failure is recorded as a row. False when nothing after it can
    mean anything (a Grizz process died)."""
    started = time.monotonic()
    try:
        result = await SCENARIOS[name](ctx)
    except Exception as error:
        traceback.print_exc()
        summary = (
            f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        )
        result = ScenarioResult(
            name, rows=[Row(f"Scenario {name}", f"failed: {summary}", met=False)]
        )
    result.data["took_s"] = round(time.monotonic() - started, 1)
    results.append(result)
    return not ctx.deployment.dead_services()


async def _self_check(ctx: Context) -> None:
    """One turn end to end before anything is measured: it warms every process up, and
    fails loudly if the model server stopped stamping its tokens (bench/model_server.py
    overrides a private method of tests/support/fake_openai.py)."""
    (client,) = await ctx.sockets(1)
    turn = await client.turn(SHAPE_SINGLE.message(), timeout=60)
    problem = turn_problem(turn, SHAPE_SINGLE)
    if problem:
        raise DeploymentError(f"the self-check turn failed: {problem}")
    await ctx.close_sockets()


if __name__ == "__main__":
    sys.exit(main())
