"""The sidebar of the browser pages: a user's conversations, newest first, each with the
title it shows. A conversation without a title shows the first words of its first message
(static/chat/sidebar.js applies the same rule to a conversation's first message sent)."""

from dataclasses import dataclass

from django.contrib.auth.models import User
from django.db.models import OuterRef, Subquery
from django.db.models.functions import Substr

from chat.models import Conversation, Message

UNTITLED = "New chat"
TITLE_WORDS = 8
TITLE_CHARS = 60
# Enough of the first message for TITLE_CHARS, without reading a long message whole.
_OPENING_CHARS = 2 * TITLE_CHARS


@dataclass(frozen=True)
class SidebarConversation:
    id: str
    title: str
    titled: bool  # the title was set, not taken from the first message


def title_from_message(content: str) -> str:
    words = content.split()
    title = " ".join(words[:TITLE_WORDS])
    if len(title) > TITLE_CHARS:
        title = title[: TITLE_CHARS - 1].rstrip()
    return title + ("…" if title != " ".join(words) else "")


def conversation_title(*, conversation: Conversation, opening: str | None) -> str:
    if conversation.title:
        return conversation.title
    return title_from_message(opening) if opening and opening.strip() else UNTITLED


def sidebar_conversations(*, owner: User) -> list[SidebarConversation]:
    first_message = (
        Message.objects.filter(conversation=OuterRef("pk"), role=Message.Role.USER)
        .order_by("position")
        .values("content")[:1]
    )
    conversations = (
        Conversation.objects.filter(owner=owner)
        .order_by("-updated_at")
        .only("id", "title")
        .annotate(opening=Substr(Subquery(first_message), 1, _OPENING_CHARS))
    )
    return [
        SidebarConversation(
            id=str(conversation.id),
            title=conversation_title(conversation=conversation, opening=conversation.opening),
            titled=bool(conversation.title),
        )
        for conversation in conversations
    ]
