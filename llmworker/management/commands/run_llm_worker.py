import argparse
import asyncio
import multiprocessing
import signal
import sys
from typing import Any, TypeVar

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from grizz.eventloop import event_loop_policy_install
from grizz.heap import heap_freeze
from grizz.metrics import MetricsServer, PoolMetrics
from grizz.settings import bounds_parse
from llmworker.autoscale import Autoscaler, BacklogReader
from llmworker.names import NameInUse, consumer_name_claim, host_name, names_claim_free
from llmworker.supervisor import Supervisor, supervisor_watch
from llmworker.worker import Worker

T = TypeVar("T", MetricsServer, PoolMetrics)


def _bounds(value: str) -> tuple[int, int]:
    try:
        return bounds_parse(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class Command(BaseCommand):
    help = "Generate LLM replies: read jobs from the Redis Stream and stream answers back."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency",
            type=int,
            default=settings.LLM_WORKER_CONCURRENCY,
            help="replies generated at once by each worker process (default %(default)s)",
        )
        parser.add_argument(
            "--name",
            default=None,
            help="consumer name in the group, refused while a live process of this host has "
            "it; with a supervisor, the base of its children's names <name>-<n> (default: "
            "the lowest free <host>-<n>)",
        )
        parser.add_argument(
            "--grace",
            type=float,
            default=25.0,
            help="seconds in-flight jobs may take to finish after SIGTERM (default %(default)s)",
        )
        parser.add_argument(
            "--processes",
            type=int,
            default=settings.LLM_WORKER_PROCESSES,
            help="worker processes; more than one runs them under a supervisor "
            "(default LLM_WORKER_PROCESSES, %(default)s)",
        )
        parser.add_argument(
            "--supervise",
            action="store_true",
            help="run even one process under a supervisor that restarts it when it dies",
        )
        parser.add_argument(
            "--max-restarts",
            type=int,
            default=5,
            help="the supervisor gives up (exit code 1) after more crashes than this "
            "within --restart-window (default %(default)s)",
        )
        parser.add_argument(
            "--restart-window",
            type=float,
            default=60.0,
            help="seconds over which --max-restarts counts crashes (default %(default)s)",
        )
        parser.add_argument(
            "--autoscale",
            type=_bounds,
            default=settings.LLM_WORKER_AUTOSCALE,
            metavar="MIN,MAX",
            help="a supervised pool whose processes follow the backlog between MIN and MAX, "
            "starting from --processes within them (default LLM_WORKER_AUTOSCALE: none)",
        )
        parser.add_argument(
            "--autoscale-cooldown",
            type=float,
            default=settings.LLM_WORKER_AUTOSCALE_COOLDOWN,
            metavar="SECONDS",
            help="least time between two scaling steps, and how long the backlog must stay "
            "low for a step down (default LLM_WORKER_AUTOSCALE_COOLDOWN, %(default)s)",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=settings.LLM_WORKER_METRICS_PORT,
            help="serve Prometheus metrics on this port, a supervisor for its whole pool "
            "(default LLM_WORKER_METRICS_PORT, %(default)s: none)",
        )
        parser.add_argument(
            "--metrics-bind",
            default=settings.LLM_WORKER_METRICS_BIND,
            help="the address of --metrics-port (default LLM_WORKER_METRICS_BIND, %(default)s)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["processes"] < 1:
            raise CommandError("--processes must be at least 1")
        if options["autoscale_cooldown"] < 0:
            raise CommandError("--autoscale-cooldown must not be negative")
        if options["processes"] > 1 or options["supervise"] or options["autoscale"]:
            sys.exit(self.supervise(options))
        try:
            claim = consumer_name_claim(options["name"])
        except NameInUse as error:
            raise CommandError(str(error)) from None
        multiprocessing.current_process().name = claim.name  # shown in every log line
        event_loop_policy_install()
        server = self.metrics_serve(MetricsServer, options)
        try:
            asyncio.run(self.run(claim.name, options))
        finally:
            if server is not None:
                server.close()

    def metrics_serve(self, kind: type[T], options: dict[str, Any]) -> T | None:
        port, bind = options["metrics_port"], options["metrics_bind"]
        if not port:
            return None
        try:
            return kind(port=port, bind=bind)
        except OSError as error:
            raise CommandError(f"cannot serve metrics on {bind}:{port}: {error}") from None

    def supervise(self, options: dict[str, Any]) -> int:
        base = options["name"] or host_name()
        processes, autoscaler = options["processes"], self.autoscaler(options)
        if autoscaler is not None:
            processes = min(max(processes, autoscaler.least), autoscaler.most)
        try:
            # An autoscaled pool holds the names of all its slots, running or not: a slot
            # scaled down may have left jobs pending under its name, its own to resume.
            claims = names_claim_free(base, autoscaler.most if autoscaler else processes)
        except NameInUse as error:
            raise CommandError(str(error)) from None
        multiprocessing.current_process().name = f"{base}-supervisor"
        metrics = self.metrics_serve(PoolMetrics, options)
        supervisor = Supervisor(
            claims=claims,
            processes=processes,
            concurrency=options["concurrency"],
            grace=options["grace"],
            max_restarts=options["max_restarts"],
            restart_window=options["restart_window"],
            autoscaler=autoscaler,
            metrics=metrics,
        )
        try:
            return supervisor.run()
        finally:
            if metrics is not None:
                metrics.close()

    def autoscaler(self, options: dict[str, Any]) -> Autoscaler | None:
        if options["autoscale"] is None:
            return None
        least, most = options["autoscale"]
        return Autoscaler(
            least=least,
            most=most,
            concurrency=options["concurrency"],
            cooldown=options["autoscale_cooldown"],
            backlog_read=BacklogReader(),
        )

    async def run(self, name: str, options: dict[str, Any]) -> None:
        worker = Worker(name=name, concurrency=options["concurrency"], grace=options["grace"])
        heap_freeze()  # after the worker and its provider client are built (grizz/heap.py)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.shutdown.set)
        watch = asyncio.create_task(supervisor_watch(worker.shutdown))
        await worker.run()
        watch.cancel()
