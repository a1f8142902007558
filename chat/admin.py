"""The Django admin, where staff review conversations and their transcripts. Reviewing never
disturbs users: no page here writes a message or talks to Redis, and each page makes the
same few queries however many rows it shows (tests/test_admin.py)."""

from datetime import datetime
from typing import TYPE_CHECKING

from django.contrib import admin
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.text import Truncator, smart_split, unescape_string_literal

from chat import export
from chat.models import Conversation, Message
from chat.services import (
    conversations_search,
    conversations_with_activity,
    conversations_with_replies,
    conversations_with_transcripts,
)

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations

    from chat.services import ConversationActivity

    # A conversation as conversations_with_activity annotates it (only django-stubs can
    # subscript WithAnnotations with a TypedDict; at run time it takes one argument).
    ReviewedConversation = WithAnnotations[Conversation, ConversationActivity]


class MessageColumns:
    """What the transcript and the message list show of a message beyond its fields."""

    if TYPE_CHECKING:
        # The admin class's own, declared for mypy only. Columns return it, not None: an
        # inline's read-only cell would show None as "None" rather than the admin's "-".
        def get_empty_value_display(self) -> SafeString: ...

    @admin.display(description="tokens")
    def tokens(self, message: Message) -> str:
        usage = message.usage
        if usage is None:
            return self.get_empty_value_display()
        prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
        return f"{usage['total_tokens']} ({prompt} in, {completion} out)"

    @admin.display(description="latency")
    def latency(self, message: Message) -> str:
        return export.latency_text(message) or self.get_empty_value_display()

    @admin.display(description="attempts")
    def attempts(self, message: Message) -> str:
        if message.role != Message.Role.ASSISTANT:
            return self.get_empty_value_display()
        before = message.attempts_before_retry
        return f"{message.attempt} ({before} before a retry)" if before else str(message.attempt)

    @admin.display(description="regenerated")
    def regenerated(self, message: Message) -> str:
        # Kept for review; the user sees the answer after it instead.
        return export.SUPERSEDED if message.superseded else self.get_empty_value_display()


# Field names only, so the one tuple fits both `fields` and `readonly_fields`.
MESSAGE_INLINE_FIELDS = (
    "position",
    "role",
    "status",
    "content",
    "error",
    "model",
    "tokens",
    "latency",
    "attempts",
    "regenerated",
    "created_at",
)


class MessageInline(MessageColumns, admin.TabularInline[Message, Conversation]):
    """The transcript, in order and read-only: messages are written by the chat alone."""

    model = Message
    fields = MESSAGE_INLINE_FIELDS
    readonly_fields = MESSAGE_INLINE_FIELDS
    ordering = ["position"]
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return False


class ReplyStatusFilter(admin.SimpleListFilter):
    title = "replies"
    parameter_name = "replies"
    CHOICES = {
        "failed": ("With a failed reply", [Message.Status.FAILED]),
        "active": ("With a reply in progress", list(Message.ACTIVE_STATUSES)),
        "cancelled": ("With a cancelled reply", [Message.Status.CANCELLED]),
    }

    def lookups(
        self, request: HttpRequest, model_admin: admin.ModelAdmin[Conversation]
    ) -> list[tuple[str, str]]:
        return [(value, label) for value, (label, _) in self.CHOICES.items()]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[Conversation]
    ) -> QuerySet[Conversation]:
        choice = self.CHOICES.get(self.value() or "")
        if choice is None:
            return queryset
        return conversations_with_replies(conversations=queryset, statuses=choice[1])


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin[Conversation]):
    list_display = [
        "__str__",
        "owner",
        "model",
        "message_count",
        "tokens_used",
        "last_activity",
        "has_failed_reply",
    ]
    list_filter = [
        ReplyStatusFilter,
        "model",
        "created_at",
        ("owner", admin.RelatedOnlyFieldListFilter),
    ]
    # What get_search_results searches; declared so that the search box shows.
    search_fields = ["title", "owner__username", "messages__content"]
    search_help_text = "Titles, usernames and message contents; each word must match one."
    list_select_related = ["owner"]
    readonly_fields = [
        "id",
        "created_at",
        "updated_at",
        "message_count",
        "tokens_used",
        "last_activity",
        "has_failed_reply",
    ]
    raw_id_fields = ["owner"]
    inlines = [MessageInline]
    actions = ["export_json", "export_markdown"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Conversation]:
        return conversations_with_activity(conversations=super().get_queryset(request))

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Conversation], search_term: str
    ) -> tuple[QuerySet[Conversation], bool]:
        # Split as the admin does: words, or phrases in quotes.
        terms = [
            unescape_string_literal(bit) if bit[0] in "\"'" and bit[0] == bit[-1] else bit
            for bit in smart_split(search_term)
        ]
        return conversations_search(conversations=queryset, terms=terms), False

    def save_model(
        self, request: HttpRequest, obj: Conversation, form: ModelForm[Conversation], change: bool
    ) -> None:
        # Only what staff changed: a page opened a while ago must not undo a rename the user
        # made since, and a Save with no change must not move the conversation up their list.
        obj.save(update_fields=form.changed_data if change else None)

    @admin.display(description="messages", ordering="message_count")
    def message_count(self, conversation: "ReviewedConversation") -> int:
        return conversation.message_count

    @admin.display(description="tokens used", ordering="tokens_used")
    def tokens_used(self, conversation: "ReviewedConversation") -> int:
        return conversation.tokens_used

    @admin.display(description="last activity", ordering="last_activity")
    def last_activity(self, conversation: "ReviewedConversation") -> datetime:
        return conversation.last_activity

    @admin.display(description="a reply failed", boolean=True, ordering="has_failed_reply")
    def has_failed_reply(self, conversation: "ReviewedConversation") -> bool:
        return conversation.has_failed_reply

    @admin.action(description="Export the selected conversations as JSON", permissions=["view"])
    def export_json(self, request: HttpRequest, queryset: QuerySet[Conversation]) -> HttpResponse:
        text = export.conversations_as_json(
            conversations=conversations_with_transcripts(conversations=queryset)
        )
        return _download(text, extension="json", content_type="application/json")

    @admin.action(description="Export the selected conversations as Markdown", permissions=["view"])
    def export_markdown(
        self, request: HttpRequest, queryset: QuerySet[Conversation]
    ) -> HttpResponse:
        text = export.conversations_as_markdown(
            conversations=conversations_with_transcripts(conversations=queryset)
        )
        return _download(text, extension="md", content_type="text/markdown")


def _download(text: str, *, extension: str, content_type: str) -> HttpResponse:
    name = f"conversations-{timezone.now():%Y%m%d-%H%M%S}.{extension}"
    return HttpResponse(
        text,
        content_type=f"{content_type}; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@admin.register(Message)
class MessageAdmin(MessageColumns, admin.ModelAdmin[Message]):
    """Every message, newest first, for finding failures. Read-only: a save would write the
    whole row back, over what a worker wrote to a streaming reply meanwhile."""

    list_display = [
        "created_at",
        "role",
        "status",
        "excerpt",
        "error_excerpt",
        "model",
        "tokens",
        "latency",
        "attempts",
        "conversation_link",
        "owner",
    ]
    list_display_links = ["created_at"]
    list_filter = ["status", "role", "model", "created_at"]
    search_fields = ["content", "error", "=job_id", "conversation__owner__username"]
    list_select_related = ["conversation__owner"]
    ordering = ["-created_at", "-position"]
    readonly_fields = [*(f.name for f in Message._meta.fields), "tokens", "latency", "attempts"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Every field is read-only: the add form would save an empty row.
        return False

    def has_change_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        return False

    @admin.display(description="content")
    def excerpt(self, message: Message) -> str:
        return Truncator(message.content).chars(80)

    @admin.display(description="error")
    def error_excerpt(self, message: Message) -> str:
        return Truncator(message.error).chars(80)

    @admin.display(description="conversation", ordering="conversation__title")
    def conversation_link(self, message: Message) -> SafeString:
        url = reverse("admin:chat_conversation_change", args=[message.conversation_id])
        return format_html('<a href="{}">{}</a>', url, message.conversation)

    @admin.display(description="owner", ordering="conversation__owner__username")
    def owner(self, message: Message) -> str:
        return message.conversation.owner.get_username()
