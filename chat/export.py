"""Conversations written out for staff to keep or share: JSON for programs, Markdown for
people. The caller passes conversations with their owner and messages already loaded
(services.conversations_with_transcripts): nothing here queries."""

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from django.utils import timezone

from chat.models import Conversation, Message


def conversations_as_json(*, conversations: Iterable[Conversation]) -> str:
    exported = {
        "exported_at": _timestamp(timezone.now()),
        "conversations": [_conversation_fields(conversation) for conversation in conversations],
    }
    return json.dumps(exported, ensure_ascii=False, indent=2) + "\n"


def conversations_as_markdown(*, conversations: Iterable[Conversation]) -> str:
    return "\n---\n\n".join(_conversation_markdown(c) for c in conversations)


def _conversation_fields(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": str(conversation.id),
        "owner": conversation.owner.get_username(),
        "title": conversation.title,
        "model": conversation.model,
        "system_prompt": conversation.system_prompt,
        "created_at": _timestamp(conversation.created_at),
        "updated_at": _timestamp(conversation.updated_at),
        "messages": [_message_fields(message) for message in conversation.messages.all()],
    }


def _message_fields(message: Message) -> dict[str, Any]:
    latency = message.latency
    return {
        "position": message.position,
        "role": message.role,
        "status": message.status,
        "content": message.content,
        "error": message.error,
        "model": message.model,
        "usage": message.usage,
        "attempts": message.attempt,
        "superseded": message.superseded,  # replaced by the regenerated answer after it
        "created_at": _timestamp(message.created_at),
        "finished_at": _timestamp(message.finished_at),
        "superseded_at": _timestamp(message.superseded_at),
        "latency_seconds": None if latency is None else latency.total_seconds(),
    }


def _conversation_markdown(conversation: Conversation) -> str:
    lines = [
        f"# {conversation}",
        "",
        f"- Conversation: `{conversation.id}`",
        f"- Owner: {conversation.owner.get_username()}",
        f"- Model: {conversation.model or 'the default'}",
        f"- Started: {_timestamp(conversation.created_at)}",
        "",
    ]
    if conversation.system_prompt:
        lines += ["## System prompt", "", conversation.system_prompt, ""]
    for message in conversation.messages.all():
        lines += [f"## {message_heading(message)}", "", message.content or "_(no content)_", ""]
        if message.error:
            lines += [*(f"> {line}" for line in f"Error: {message.error}".splitlines()), ""]
    return "\n".join(lines)


SUPERSEDED = "replaced by a regenerated answer"


def message_heading(message: Message) -> str:
    """`3. Assistant · failed · gpt-4o · 42 tokens · 1.2 s · 2 attempts · <sent at>`: what a
    reviewer wants to know of a message before its content."""
    parts = [f"{message.position}. {message.get_role_display()}"]
    if message.role == Message.Role.ASSISTANT:
        details = [
            message.status,
            message.model,
            "" if message.total_tokens is None else f"{message.total_tokens} tokens",
            latency_text(message),
            f"{message.attempt} attempt{'' if message.attempt == 1 else 's'}",
            SUPERSEDED if message.superseded else "",
        ]
        parts += [detail for detail in details if detail]
    parts.append(_timestamp(message.created_at) or "")
    return " · ".join(parts)


def latency_text(message: Message) -> str:
    """The reply's latency in seconds, "" until it has ended."""
    latency = message.latency
    return "" if latency is None else f"{latency.total_seconds():.1f} s"


def _timestamp(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()
