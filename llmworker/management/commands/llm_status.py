import asyncio
import contextlib
import dataclasses
import json
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from llmworker.status import QueueStatus, queue_status, status_table


class Command(BaseCommand):
    help = "Show the job queue: streams, consumers, dead letters, Redis memory (read-only)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="one JSON object per status")
        parser.add_argument(
            "--watch",
            type=float,
            metavar="SECONDS",
            help="show it again every SECONDS until Ctrl-C",
        )

    def handle(self, *args: object, **options: Any) -> None:
        if options["watch"] is not None and options["watch"] <= 0:
            raise CommandError("--watch takes a number of seconds above 0")
        # Ctrl-C is the way out of --watch.
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(self._show(as_json=options["json"], every=options["watch"]))

    async def _show(self, *, as_json: bool, every: float | None) -> None:
        while True:
            self._print(await queue_status(), as_json=as_json, redraw=every is not None)
            if every is None:
                return
            await asyncio.sleep(every)

    def _print(self, status: QueueStatus, *, as_json: bool, redraw: bool) -> None:
        if as_json:
            self.stdout.write(json.dumps(dataclasses.asdict(status)))
            return
        if redraw:
            self.stdout.write("\x1b[2J\x1b[H", ending="")  # clear the terminal, cursor home
        self.stdout.write(status_table(status, local_time=time.strftime("%H:%M:%S")))
