"""Conversations with history, built through the services as the pipeline would build them."""

from chat.models import Conversation, Message
from chat.services import message_send, reply_complete, reply_start


def answered(
    conversation: Conversation,
    question: str,
    answer: str,
    *,
    status: str = "complete",
    usage: dict[str, int] | None = None,
) -> Message:
    """A user message and its reply, complete (or cancelled after `answer`); the reply."""
    sent = message_send(conversation=conversation, content=question)
    start = reply_start(reply_id=sent.reply.id, default_model="test-model")
    assert start is not None
    assert reply_complete(
        reply_id=sent.reply.id, attempt=start.attempt, content=answer, usage=usage, status=status
    )
    return Message.objects.get(id=sent.reply.id)
