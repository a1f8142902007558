from django.contrib import admin

from chat.models import Conversation, Message


class MessageInline(admin.TabularInline):
    model = Message
    fields = ["position", "role", "status", "content", "error", "total_tokens", "created_at"]
    readonly_fields = fields
    ordering = ["position"]
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:  # type: ignore[no-untyped-def]
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["__str__", "owner", "model", "created_at", "updated_at"]
    list_filter = ["model", "created_at"]
    search_fields = ["title", "owner__username", "messages__content"]
    readonly_fields = ["id", "created_at", "updated_at"]
    raw_id_fields = ["owner"]
    inlines = [MessageInline]

    def get_search_results(self, request, queryset, search_term):  # type: ignore[no-untyped-def]
        queryset, _ = super().get_search_results(request, queryset, search_term)
        return queryset.distinct(), False


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ["id", "conversation", "role", "status", "model", "total_tokens", "created_at"]
    list_filter = ["role", "status", "model", "created_at"]
    search_fields = ["content", "error", "=job_id", "conversation__owner__username"]
    readonly_fields = [f.name for f in Message._meta.fields]
    list_select_related = ["conversation"]

    def has_add_permission(self, request) -> bool:  # type: ignore[no-untyped-def]
        # Messages are written by the chat only: every field here is read-only, so the add
        # form would save an empty row and fail on the database's constraints.
        return False
