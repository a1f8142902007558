"""Browser pages: the home page and the chat page, each with the sidebar of conversations.

The views stay thin: creating a conversation is a service call, and the chat itself runs over
the WebSocket (see static/chat/chat.js), so the chat page only renders the transcript so far.
Renaming and deleting go through the REST API (static/chat/sidebar.js).
"""

import uuid

from django import forms
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_http_methods, require_safe

from chat.models import Conversation
from chat.services import (
    ModelChoices,
    conversation_create,
    conversation_transcript,
    model_choices,
)
from chat.sidebar import UNTITLED, SidebarConversation, sidebar_conversations
from llmworker.providers import demo_mode_active


class AuthenticatedHttpRequest(HttpRequest):
    """The request a @login_required view gets: its user is signed in (for mypy only)."""

    user: User


class ConversationCreateForm(forms.Form):
    # The limits match the model (title) and the per-message limit the chat enforces.
    title = forms.CharField(
        max_length=Conversation._meta.get_field("title").max_length,
        required=False,
        widget=forms.TextInput(attrs={"placeholder": "Untitled", "autocomplete": "off"}),
    )
    system_prompt = forms.CharField(
        max_length=settings.CHAT_MAX_MESSAGE_CHARS,
        required=False,
        widget=forms.Textarea(
            attrs={"rows": 3, "placeholder": "e.g. You are a concise assistant."}
        ),
    )


@login_required
@require_http_methods(["GET", "HEAD", "POST"])
def conversation_list(request: AuthenticatedHttpRequest) -> HttpResponse:
    if request.method == "POST":
        form = ConversationCreateForm(request.POST)
        if form.is_valid():
            conversation = conversation_create(
                owner=request.user,
                title=form.cleaned_data["title"],
                system_prompt=form.cleaned_data["system_prompt"],
            )
            return redirect("conversation-detail", conversation_id=conversation.id)
    else:
        form = ConversationCreateForm()
    return render(
        request,
        "chat/conversation_list.html",
        {
            "conversations": sidebar_conversations(owner=request.user),
            "form": form,
            "demo_model": demo_mode_active(),
        },
    )


@login_required
@require_safe
def conversation_detail(
    request: AuthenticatedHttpRequest, conversation_id: uuid.UUID
) -> HttpResponse:
    # Filtering on the owner makes another user's conversation a 404, not a 403: whether an
    # id exists is none of their business.
    conversation = get_object_or_404(Conversation, id=conversation_id, owner=request.user)
    conversations = sidebar_conversations(owner=request.user)
    current = next(
        (c for c in conversations if c.id == str(conversation.id)),
        SidebarConversation(id=str(conversation.id), title=UNTITLED, titled=False),
    )
    return render(
        request,
        "chat/conversation_detail.html",
        {
            "conversation": conversation,
            "conversations": conversations,
            "current": current,
            "transcript": conversation_transcript(conversation=conversation),
            "ws_path": f"/ws/chat/{conversation.id}/",
            "demo_model": demo_mode_active(),
            "max_message_chars": settings.CHAT_MAX_MESSAGE_CHARS,
            "model_options": model_options(choices=model_choices(), kept=conversation.model),
            "session_refresh_ms": session_refresh_interval_ms(request),
        },
    )


# The longest an open page waits between renewals of its session, however long it lasts.
SESSION_REFRESH_MAX_MS = 3600 * 1000


def session_refresh_interval_ms(request: HttpRequest) -> int:
    """How often the chat page renews its session: at half the time left on it."""
    return min(SESSION_REFRESH_MAX_MS, max(1000, request.session.get_expiry_age() * 500))


@require_http_methods(["POST"])
def session_refresh(request: HttpRequest) -> JsonResponse:
    """Renew the signed-in browser's session for another SESSION_COOKIE_AGE (its cookie too),
    so that a chat page left open does not sign its user out. 401 once the session is gone:
    the page then says so. CSRF-checked like every POST."""
    if not request.user.is_authenticated:
        error = {"code": "unauthenticated", "message": "You have been signed out."}
        return JsonResponse({"error": error}, status=401)
    request.session.set_expiry(None)  # marks it modified: saved, and its cookie sent again
    expires_in = request.session.get_expiry_age()
    return JsonResponse(
        {"expires_in": expires_in, "refresh_in_ms": session_refresh_interval_ms(request)}
    )


def model_options(*, choices: ModelChoices, kept: str) -> list[tuple[str, str]]:
    """The settings panel's models, as (value, label): the default first, then the others
    (the default named again would only pin it). The conversation's own model stays listed
    when it is no longer offered, so that saving the system prompt alone keeps it."""
    options = [("", f"Default ({choices.default})")]
    options += [(name, name) for name in choices.models if name != choices.default]
    if kept and kept not in (value for value, _ in options):
        options.append((kept, kept if kept in choices.models else f"{kept} (no longer offered)"))
    return options
