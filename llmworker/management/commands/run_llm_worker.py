import asyncio
import multiprocessing
import os
import signal
import socket
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from grizz.eventloop import event_loop_policy_install
from llmworker.worker import Worker


class Command(BaseCommand):
    help = "Generate LLM replies: read jobs from the Redis Stream and stream answers back."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--concurrency",
            type=int,
            default=settings.LLM_WORKER_CONCURRENCY,
            help="replies generated at once by this process (default %(default)s)",
        )
        parser.add_argument(
            "--name",
            default=f"{socket.gethostname()}-{os.getpid()}",
            help="consumer name in the group; keep it stable across restarts to pick up "
            "this worker's unfinished jobs at once (default: host-pid)",
        )
        parser.add_argument(
            "--grace",
            type=float,
            default=25.0,
            help="seconds in-flight jobs may take to finish after SIGTERM (default %(default)s)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        multiprocessing.current_process().name = options["name"]  # shown in every log line
        event_loop_policy_install()
        asyncio.run(self.run(options))

    async def run(self, options: dict[str, Any]) -> None:
        worker = Worker(
            name=options["name"], concurrency=options["concurrency"], grace=options["grace"]
        )
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.shutdown.set)
        await worker.run()
