"""Structured logs (docs/logging.md).

Every line names the job, reply, conversation, user, consumer and attempt it is about,
without each call passing them: a job's task (llmworker/worker.py) and a socket's task
(chat/consumers.py) set them once in a context variable, and a filter on the handler puts
them on each record, whichever logger made it (ours, Django's, daphne's, a library's).
A call's own `extra` wins over the context.

Message text and tokens stay out: a call that has some puts it in a field named in
CONTENT_FIELDS, never in its message, and the filter drops those fields unless LOG_CONTENT.
"""

import contextlib
import logging
import logging.config
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from types import MappingProxyType, TracebackType
from typing import Any

# What a user wrote or a model answered, and the provider's own words about a failed
# request, which can quote the prompt back.
CONTENT_FIELDS = ("content", "provider_error")

_context: ContextVar[Mapping[str, object]] = ContextVar("log_context", default=MappingProxyType({}))


def log_context_bind(**fields: object) -> None:
    """Put `fields` on every line logged from now on by this task and the tasks it starts.
    For a task of its own (a job, a socket), which ends with what it is about."""
    _context.set({**_context.get(), **fields})


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """Put `fields` on every line logged within the block (one turn of a socket)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """On the handler, not on a logger, so that it sees the records of every logger."""

    def __init__(self, *, content: bool = False) -> None:
        super().__init__()
        self.content = content

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        for name, value in _context.get().items():
            fields.setdefault(name, value)
        if not self.content:
            for name in CONTENT_FIELDS:
                fields.pop(name, None)
        return True


def logging_configure(config: dict[str, Any]) -> None:
    """settings.LOGGING_CONFIG. Warnings and a crash's traceback go through the handler
    too, so that they come out as one line in the format of all the others."""
    logging.config.dictConfig(config)
    logging.captureWarnings(True)
    sys.excepthook = _uncaught_log


def _uncaught_log(
    kind: type[BaseException], error: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, traceback)
        return
    logging.getLogger("grizz").critical(
        "uncaught exception; the process stops", exc_info=(kind, error, traceback)
    )


def milliseconds(seconds: float) -> float:
    """A duration as the logs give them: `*_ms` fields, to a tenth of a millisecond."""
    return round(seconds * 1000, 1)
