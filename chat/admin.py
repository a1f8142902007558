from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from chat.models import Conversation, Message

# Field names only, so the one tuple fits both `fields` and `readonly_fields`.
MESSAGE_INLINE_FIELDS = (
    "position",
    "role",
    "status",
    "content",
    "error",
    "total_tokens",
    "created_at",
)


class MessageInline(admin.TabularInline[Message, Conversation]):
    model = Message
    fields = MESSAGE_INLINE_FIELDS
    readonly_fields = MESSAGE_INLINE_FIELDS
    ordering = ["position"]
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Conversation | None = None) -> bool:
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin[Conversation]):
    list_display = ["__str__", "owner", "model", "created_at", "updated_at"]
    list_filter = ["model", "created_at"]
    search_fields = ["title", "owner__username", "messages__content"]
    readonly_fields = ["id", "created_at", "updated_at"]
    raw_id_fields = ["owner"]
    inlines = [MessageInline]

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Conversation], search_term: str
    ) -> tuple[QuerySet[Conversation], bool]:
        queryset, _ = super().get_search_results(request, queryset, search_term)
        return queryset.distinct(), False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin[Message]):
    list_display = ["id", "conversation", "role", "status", "model", "total_tokens", "created_at"]
    list_filter = ["role", "status", "model", "created_at"]
    search_fields = ["content", "error", "=job_id", "conversation__owner__username"]
    readonly_fields = [f.name for f in Message._meta.fields]
    list_select_related = ["conversation"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Messages are written by the chat only: every field here is read-only, so the add
        # form would save an empty row and fail on the database's constraints.
        return False
