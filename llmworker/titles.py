"""Conversation titles: after a conversation's first answer, a second, small request asks
the model for a short title; it is saved unless the user named the conversation meanwhile,
and pushed to the sockets open on the conversation (docs/titles.md).

A title is cosmetic, so it never costs the reply anything: it is asked for once the reply is
saved, its done frame sent and its job acknowledged, by a task of the worker's process (not
a job on the queue: lost with the process, it leaves what any failure leaves, the first
words of the first message in the sidebar). Per process at most REQUESTS_AT_ONCE requests
run at once and WAITING_MAX titles wait; each is bounded by LLM_TITLE_TIMEOUT_SECONDS, and
none is asked for while the provider's circuit is not closed.
"""

import asyncio
import logging
import re
from dataclasses import dataclass

from django.conf import settings

from chat import services as chat_services
from chat.sidebar import TITLE_CHARS
from grizz import metrics
from grizz.database import database_call
from llmworker.breaker import breaker_for
from llmworker.providers import DemoProvider, Provider, ProviderError
from llmworker.replies import conversation_title_announce

logger = logging.getLogger(__name__)

INSTRUCTION = (
    "Write a short title, at most six words, for the conversation below, in the language of "
    "the user's message. Answer with the title alone: no quotes, no final period."
)
MAX_TOKENS = 24
# The conversation as the model sees it for the title: enough to know what it is about.
QUESTION_CHARS = 1500
ANSWER_CHARS = 1500
REQUESTS_AT_ONCE = 4
WAITING_MAX = 200

conversation_untitled = database_call(chat_services.conversation_untitled)
conversation_title_generated = database_call(chat_services.conversation_title_generated)

# Around a title: whitespace, quotes (typographic ones too), Markdown emphasis.
_QUOTES = " \t\"'`*\u201c\u201d\u2018\u2019\u00ab\u00bb\u201e"
_LABEL = re.compile(r"^(title|titre|titel|t\u00edtulo|titolo)\s*:", re.IGNORECASE)


def title_clean(text: str) -> str:
    """The model's answer as a title: its first line that says something, without a
    "Title:" label, a heading's marks, quotes or a final period, at most TITLE_CHARS; ""
    when nothing is left."""
    lines = (_unwrapped(line) for line in text.splitlines())
    title = " ".join(next((line for line in lines if line), "").split())
    if len(title) > TITLE_CHARS:
        title = title[: TITLE_CHARS - 1].rsplit(" ", 1)[0].rstrip(",;:-") + "\u2026"
    return title


def _unwrapped(line: str) -> str:
    line = line.strip(_QUOTES).lstrip("# ").strip(_QUOTES)
    line = _LABEL.sub("", line).strip(_QUOTES)
    return line.rstrip(".").rstrip(_QUOTES)


@dataclass(frozen=True)
class FirstAnswer:
    conversation_id: str
    model: str
    question: str
    answer: str

    def prompt(self) -> list[dict[str, str]]:
        conversation = (
            f"User: {self.question[:QUESTION_CHARS]}\n\nAssistant: {self.answer[:ANSWER_CHARS]}"
        )
        return [
            {"role": "system", "content": INSTRUCTION},
            {"role": "user", "content": conversation},
        ]


def first_answer(
    *, conversation_id: str, model: str, prompt: list[dict[str, str]], answer: str
) -> FirstAnswer | None:
    """The answer, when it is its conversation's first: its prompt holds no earlier one.
    Failed replies are left out of prompts, so after a failure the first that completes
    counts; a stopped one stays in them, so after a Stop none does."""
    if any(turn["role"] == "assistant" for turn in prompt):
        return None
    question = next((turn["content"] for turn in prompt if turn["role"] == "user"), "")
    return FirstAnswer(
        conversation_id=conversation_id, model=model, question=question, answer=answer
    )


def title_writer_for(provider: Provider) -> "TitleWriter | None":
    """The process's title writer; None when titles are off, or for the demo model, which
    has nothing to ask: no request at all, the first words stay."""
    if not settings.LLM_TITLES or isinstance(provider, DemoProvider):
        return None
    return TitleWriter(provider=provider)


class TitleWriter:
    """The titles of one worker process, each a task of its own."""

    def __init__(self, *, provider: Provider) -> None:
        self.provider = provider
        self.requests = asyncio.Semaphore(REQUESTS_AT_ONCE)
        self.tasks: set[asyncio.Task[None]] = set()
        self.outcomes = metrics.worker().titles

    def write(self, answer: FirstAnswer) -> None:
        if len(self.tasks) >= WAITING_MAX:
            logger.warning(
                "conversation %s: no title (%d titles waiting already)",
                answer.conversation_id, len(self.tasks),
            )  # fmt: skip
            self.outcomes.labels("fallback").inc()
            return
        task = asyncio.create_task(self._write(answer), name=f"title-{answer.conversation_id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def aclose(self) -> None:
        """At shutdown: the titles under way may finish (each is bounded); none is left."""
        if self.tasks:
            _, unfinished = await asyncio.wait(
                self.tasks, timeout=settings.LLM_TITLE_TIMEOUT_SECONDS
            )
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)

    async def _write(self, answer: FirstAnswer) -> None:
        try:
            outcome = await self._title_save(answer)
        except Exception:
            # Never more than a title lost: the reply is long saved and acknowledged.
            logger.exception("conversation %s: the title failed", answer.conversation_id)
            outcome = "fallback"
        if outcome:
            self.outcomes.labels(outcome).inc()

    async def _title_save(self, answer: FirstAnswer) -> str | None:
        conversation_id = answer.conversation_id
        if not await conversation_untitled(conversation_id=conversation_id):
            return None  # named when it was created: nothing to do
        title = await self._title_ask(answer)
        if not title:
            return "fallback"
        if not await conversation_title_generated(conversation_id=conversation_id, title=title):
            logger.info(
                "conversation %s: named by its user meanwhile; the model's title is dropped",
                conversation_id,
            )
            return "kept"
        await conversation_title_announce(conversation_id=conversation_id, title=title)
        logger.info(
            "conversation %s: titled by the model", conversation_id, extra={"content": title}
        )
        return "generated"

    async def _title_ask(self, answer: FirstAnswer) -> str:
        """The model's title, cleaned; "" when the provider cannot give one."""
        why = "the model's answer is not a title"
        try:
            async with asyncio.timeout(settings.LLM_TITLE_TIMEOUT_SECONDS), self.requests:
                title = title_clean(await self._provider_ask(answer))
        except TimeoutError:
            title, why = "", f"no answer within {settings.LLM_TITLE_TIMEOUT_SECONDS:g}s"
        except ProviderError as error:
            title, why = "", error.summary
        if not title:
            logger.warning(
                "conversation %s: no title (%s); it keeps the first words of its first message",
                answer.conversation_id, why,
            )  # fmt: skip
        return title

    async def _provider_ask(self, answer: FirstAnswer) -> str:
        """One request, through the provider's circuit breaker: a success or a retryable
        failure counts like a reply's; a timeout, the title's own and shorter, gives no
        verdict."""
        breaker = breaker_for(self.provider.base_url)
        if breaker.state() != "closed":
            raise ProviderError("the provider's circuit is open", retryable=False)
        permit = breaker.admit()
        assert permit is not None  # closed: always
        try:
            text = await self.provider.complete(
                messages=answer.prompt(), model=answer.model, max_tokens=MAX_TOKENS
            )
            permit.succeeded()
            return text
        except ProviderError as error:
            metrics.worker().provider_error(
                provider=breaker.name, kind=error.kind, status=error.status
            )
            if error.retryable:
                permit.failed()
            raise
        finally:
            permit.release()
