import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.services import ConversationBusy
from llmworker.dead_letters import (
    DeadLetter,
    DeadLetterNotFound,
    DeadLetterNotRetryable,
    dead_letter_get,
    dead_letter_retry,
    dead_letters_list,
    dead_letters_purge,
)
from llmworker.status import duration

T = TypeVar("T")

# What an operator can do about each refusal, in the words of the command's output.
REFUSALS = (DeadLetterNotFound, DeadLetterNotRetryable)
BUSY = "its conversation has another reply queued or being generated: retry once it has ended"


class Command(BaseCommand):
    help = "List, show, retry or purge the jobs that failed for good (the dead letters)."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(dest="action", required=True)
        listing = actions.add_parser("list", help="the newest dead letters first")
        listing.add_argument("--limit", type=int, default=20, help="at most N (default 20)")
        show = actions.add_parser("show", help="every field of one dead letter")
        show.add_argument("entry", help="its entry id, as `list` shows it")
        retry = actions.add_parser("retry", help="enqueue the job again, with its ids")
        which = retry.add_mutually_exclusive_group(required=True)
        which.add_argument("entry", nargs="?", help="its entry id")
        which.add_argument("--all", action="store_true", help="every dead letter, oldest first")
        purge = actions.add_parser("purge", help="remove dead letters: one, old ones, or all")
        purge.add_argument("entry", nargs="?", help="just this entry")
        purge.add_argument("--older-than", type=float, metavar="DAYS", help="added before then")

    def handle(self, *args: object, **options: Any) -> None:
        action = options["action"]
        if action == "list":
            self._list(limit=options["limit"])
        elif action == "show":
            self._show(entry_id=options["entry"])
        elif action == "retry" and options["all"]:
            self._retry_all()
        elif action == "retry":
            self._retry(entry_id=options["entry"])
        else:
            self._purge(entry_id=options["entry"], older_than_days=options["older_than"])

    def _list(self, *, limit: int) -> None:
        letters = _run(dead_letters_list(limit=limit))
        if not letters:
            self.stdout.write("No dead letters.")
            return
        self.stdout.write(f"{'ENTRY':<16} {'AGE':>7} {'JOB':<8} {'TRIES':>5}  REASON")
        for letter in letters:
            self.stdout.write(_row(letter))

    def _show(self, *, entry_id: str) -> None:
        letter = _run(dead_letter_get(entry_id=entry_id))
        self.stdout.write(f"entry: {letter.entry_id} ({_age(letter)} ago)")
        for name, value in letter.fields.items():
            self.stdout.write(f"{name}: {value}")

    def _retry(self, *, entry_id: str) -> None:
        job = _run(dead_letter_retry(entry_id=entry_id))
        self.stdout.write(f"{entry_id}: job {job.job_id} enqueued again ({job.priority})")

    def _retry_all(self) -> None:
        refused = 0
        for letter in _run(dead_letters_list(oldest_first=True)):
            try:
                self._retry(entry_id=letter.entry_id)
            except CommandError as error:
                refused += 1
                self.stderr.write(str(error))
        if refused:
            raise CommandError(f"{refused} dead letters were not retried (above)")

    def _purge(self, *, entry_id: str | None, older_than_days: float | None) -> None:
        if entry_id is not None and older_than_days is not None:
            raise CommandError("purge takes an entry or --older-than, not both")
        removed = _run(dead_letters_purge(entry_id=entry_id, older_than_days=older_than_days))
        self.stdout.write(f"Removed {removed} dead letters.")


def _run(call: Coroutine[Any, Any, T]) -> T:
    """The call's result; its refusals as the command's error (exit code 1)."""
    try:
        return asyncio.run(call)
    except REFUSALS as error:
        raise CommandError(str(error)) from None
    except ConversationBusy:
        raise CommandError(f"not retried: {BUSY}") from None


def _age(letter: DeadLetter) -> str:
    return duration(max(0.0, time.time() - letter.added_ms / 1000))


def _row(letter: DeadLetter) -> str:
    # The job id's first 8 characters, as git shortens a hash, to leave the reason room
    # within 100 columns; `show` has it whole.
    job_id = letter.job.job_id[:8] if letter.job else "?"
    reason = " ".join(letter.reason.split())[:58]
    return f"{letter.entry_id:<16} {_age(letter):>7} {job_id:<8} {letter.attempts:>5}  {reason}"
