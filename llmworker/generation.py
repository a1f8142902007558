"""Generating one reply: prompt from PostgreSQL, tokens from the provider, frames to the
conversation's sockets as they come, the whole answer back to PostgreSQL."""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from asgiref.sync import sync_to_async

from chat import services as chat_services
from llmworker.jobs import Job
from llmworker.providers import Provider, ProviderError, model_default
from llmworker.replies import ReplyPublisher

logger = logging.getLogger(__name__)

reply_start = sync_to_async(chat_services.reply_start)
reply_complete = sync_to_async(chat_services.reply_complete)
reply_fail = sync_to_async(chat_services.reply_fail)


class DeltaBatcher:
    """Sends text as soon as it arrives, but never more than one send at a time: tokens that
    arrive while a send is in flight go out together in the next one. No timer, so no added
    latency when Redis keeps up, and fewer Redis calls when it does not."""

    def __init__(self, send: Callable[[str], Awaitable[object]]) -> None:
        self.send = send
        self.pending: list[str] = []
        self.sender: asyncio.Task[None] | None = None

    def push(self, text: str) -> None:
        self.pending.append(text)
        if self.sender is None or self.sender.done():
            self._raise_failure()
            self.sender = asyncio.create_task(self._send_pending())

    async def _send_pending(self) -> None:
        while self.pending:
            batch = "".join(self.pending)
            self.pending.clear()
            await self.send(batch)

    def _raise_failure(self) -> None:
        if self.sender is not None and self.sender.done():
            self.sender.result()

    async def flush(self) -> None:
        if self.sender is not None:
            await self.sender
        if self.pending:
            await self._send_pending()


async def reply_generate(*, job: Job, provider: Provider, publisher: ReplyPublisher) -> None:
    """Run one delivery of a job to its end. Returns once the job may be acknowledged."""
    start = await reply_start(reply_id=job.reply_id, default_model=model_default())
    if start is None:
        logger.info("job %s: reply already finished, acknowledging", job.job_id)
        return
    logger.info(
        "job %s: attempt %d for conversation %s", job.job_id, start.attempt, job.conversation_id
    )
    parts: list[str] = []
    usage: dict[str, int] | None = None
    batcher = DeltaBatcher(publisher.delta)
    try:
        async for chunk in provider.stream(messages=start.prompt, model=start.model):
            if chunk.text:
                parts.append(chunk.text)
                batcher.push(chunk.text)
            if chunk.usage is not None:
                usage = chunk.usage
        await batcher.flush()
    except ProviderError as error:
        logger.warning("job %s: provider failed: %s", job.job_id, error.message)
        await _reply_failed(
            job=job, attempt=start.attempt, message=error.message, publisher=publisher
        )
        return
    content = "".join(parts)
    if await reply_complete(
        reply_id=job.reply_id, attempt=start.attempt, content=content, usage=usage
    ):
        await publisher.done(reply_id=job.reply_id, status="complete", content=content, usage=usage)
        logger.info("job %s: complete, %d characters", job.job_id, len(content))


async def _reply_failed(*, job: Job, attempt: int, message: str, publisher: ReplyPublisher) -> None:
    if await reply_fail(reply_id=job.reply_id, attempt=attempt, error=message):
        await publisher.error(code="llm_error", message=message)
