"""The REST API: DRF views over the same services and the same turns the socket uses.
Every object is the caller's own: another user's is a 404, like one that does not exist.
Errors: chat/api_errors.py. The reply stream (SSE) is not DRF: chat/stream.py."""

import contextlib
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import QuerySet
from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from redis.exceptions import RedisError
from rest_framework import generics, pagination, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework_simplejwt.serializers import (
    TokenObtainPairSerializer,
    TokenRefreshSerializer,
    TokenVerifySerializer,
)
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView, TokenVerifyView

from chat import services
from chat.api_errors import ApiError, unavailable
from chat.models import Conversation, Message
from chat.turns import (
    CLIENT_MSG_ID_MAX_CHARS,
    Queued,
    Refused,
    Sender,
    TurnOutcome,
    turn_regenerate,
    turn_send,
)

# The turns of the API, in the announcement other sockets on the conversation get: no socket
# has this id, so every socket open on the conversation shows the message.
API_ORIGIN = "api"

# The socket's refusals, as HTTP statuses.
REFUSAL_STATUSES = {
    "invalid": status.HTTP_400_BAD_REQUEST,
    "too_long": status.HTTP_400_BAD_REQUEST,
    "busy": status.HTTP_409_CONFLICT,
    "rate_limited": status.HTTP_429_TOO_MANY_REQUESTS,
    "overloaded": status.HTTP_503_SERVICE_UNAVAILABLE,
}


class AuthenticatedRequest(Request):
    """The request of a view behind IsAuthenticated, the default permission: its user is
    signed in (for mypy only)."""

    user: User


# --- Bodies -----------------------------------------------------------------------------


class ConversationSerializer(serializers.ModelSerializer[Conversation]):
    class Meta:
        model = Conversation
        fields = ["id", "title", "model", "system_prompt", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {
            "title": {"required": False},
            "model": {
                "required": False,
                "help_text": "One of GET /api/models/'s `models`; blank: the default, its "
                "`default`. Used from the conversation's next reply on.",
            },
            # The same limit as the web form: the system prompt goes into every prompt.
            "system_prompt": {"required": False, "max_length": settings.CHAT_MAX_MESSAGE_CHARS},
        }


class UsageSerializer(serializers.Serializer[Any]):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class MessageSerializer(serializers.ModelSerializer[Message]):
    usage = UsageSerializer(read_only=True, allow_null=True, help_text="A finished reply's.")
    superseded = serializers.BooleanField(
        read_only=True,
        help_text=(
            "An answer replaced by a regenerated one (the reply after it): kept, but left "
            "out of later prompts and of the chat page."
        ),
    )

    class Meta:
        model = Message
        fields = [
            "id",
            "role",
            "content",
            "status",
            "job_id",
            "error",
            "usage",
            "superseded",
            "created_at",
        ]


class MessageSendSerializer(serializers.Serializer[Any]):
    """The request of a send (for the schema: the turn itself checks it, as for the socket,
    so that both refuse with the same codes and words)."""

    content = serializers.CharField(max_length=settings.CHAT_MAX_MESSAGE_CHARS)
    client_msg_id = serializers.CharField(
        required=False,
        allow_null=True,
        max_length=CLIENT_MSG_ID_MAX_CHARS,
        help_text="Sending it again in the conversation returns the first send's answer.",
    )


class TurnSerializer(serializers.Serializer[Queued]):
    job_id = serializers.UUIDField(source="sent.reply.job_id")
    message = MessageSerializer(source="sent.message")
    reply = MessageSerializer(source="sent.reply")
    queue_position = serializers.IntegerField(
        allow_null=True, help_text="Given when the queue is long."
    )


class ApiErrorFields(serializers.Serializer[Any]):
    code = serializers.CharField(help_text="The socket's error codes (docs/websocket.md).")
    message = serializers.CharField()
    retry_after = serializers.IntegerField(
        required=False, help_text="Seconds; also the Retry-After header (429, 503)."
    )
    status = serializers.CharField(required=False, help_text="A finished reply's (409).")

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        # `fields` is also a Serializer's attribute: declared here, not on the class.
        fields = super().get_fields()
        fields["fields"] = serializers.DictField(
            child=serializers.ListField(child=serializers.CharField()),
            required=False,
            help_text="A request that does not validate: the problems of each field.",
        )
        return fields


class ApiErrorSerializer(serializers.Serializer[Any]):
    error = ApiErrorFields()


def error_responses(*statuses: int) -> dict[int, OpenApiResponse]:
    descriptions = {
        400: "Invalid request (`invalid`, `too_long`).",
        401: "No credentials, wrong ones, or an invalid or expired token.",
        404: "Not found, or another user's.",
        409: "Conflict: `busy` (a reply is in flight) or `finished`.",
        429: "`rate_limited`, with Retry-After.",
        503: "`overloaded`, or Redis or PostgreSQL down (`unavailable`), with Retry-After.",
    }
    return {code: OpenApiResponse(ApiErrorSerializer, descriptions[code]) for code in statuses}


# --- Tokens ---------------------------------------------------------------------------
# simplejwt's views, with their errors in the schema.


@extend_schema(responses={200: TokenObtainPairSerializer, **error_responses(400, 401)})
class TokenObtain(TokenObtainPairView):
    pass


@extend_schema(responses={200: TokenRefreshSerializer, **error_responses(400, 401)})
class TokenRefresh(TokenRefreshView):
    pass


@extend_schema(responses={200: TokenVerifySerializer, **error_responses(400, 401)})
class TokenVerify(TokenVerifyView):
    """200 with an empty object for a valid token of either kind; 401 otherwise."""


# --- Conversations ----------------------------------------------------------------------


@contextlib.contextmanager
def refused_settings_as_400() -> Iterator[None]:
    """The services' refusal of a conversation's settings as the API's 400, with `fields`."""
    try:
        yield
    except DjangoValidationError as error:
        raise serializers.ValidationError(serializers.as_serializer_error(error)) from None


class ConversationPages(pagination.PageNumberPagination):
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200


@extend_schema_view(
    get=extend_schema(
        summary="The caller's conversations, the most recently active first",
        responses={200: ConversationSerializer, **error_responses(401)},
    ),
    post=extend_schema(
        summary="Create a conversation",
        responses={201: ConversationSerializer, **error_responses(400, 401)},
    ),
)
class ConversationListCreate(generics.ListCreateAPIView[Conversation]):
    serializer_class = ConversationSerializer
    pagination_class = ConversationPages
    request: AuthenticatedRequest

    def get_queryset(self) -> QuerySet[Conversation]:
        # The most recently active first (Meta.ordering); the id keeps pages stable.
        return Conversation.objects.filter(owner=self.request.user).order_by("-updated_at", "-id")

    def perform_create(self, serializer: serializers.BaseSerializer[Conversation]) -> None:
        data = serializer.validated_data
        with refused_settings_as_400():
            services.conversation_settings_check(
                conversation=None, model=data.get("model"), system_prompt=data.get("system_prompt")
            )
        serializer.instance = services.conversation_create(owner=self.request.user, **data)


@extend_schema_view(
    get=extend_schema(
        summary="One of the caller's conversations",
        responses={200: ConversationSerializer, **error_responses(401, 404)},
    ),
    patch=extend_schema(
        summary="Rename a conversation, or change its model or system prompt",
        responses={200: ConversationSerializer, **error_responses(400, 401, 404)},
    ),
    delete=extend_schema(
        summary="Delete a conversation and its messages (its reply in flight is cancelled)",
        responses={204: None, **error_responses(401, 404, 503)},
    ),
)
class ConversationDetail(generics.RetrieveUpdateDestroyAPIView[Conversation]):
    """One conversation of the caller's: read, rename (or change its model or system
    prompt), delete. Another user's is a 404, like one that does not exist."""

    serializer_class = ConversationSerializer
    lookup_url_kwarg = "conversation_id"
    # PATCH only: a PUT would have to send every field to change one.
    http_method_names = ["get", "patch", "delete", "head", "options"]
    request: AuthenticatedRequest

    def get_queryset(self) -> QuerySet[Conversation]:
        return Conversation.objects.filter(owner=self.request.user)

    def perform_update(self, serializer: serializers.BaseSerializer[Conversation]) -> None:
        conversation = serializer.instance
        assert conversation is not None
        with refused_settings_as_400():
            services.conversation_update(conversation=conversation, **serializer.validated_data)

    def perform_destroy(self, instance: Conversation) -> None:
        try:
            services.conversation_delete(conversation=instance)
        except (RedisError, OSError):
            raise unavailable() from None


# --- Models -----------------------------------------------------------------------------


class ModelChoicesSerializer(serializers.Serializer[services.ModelChoices]):
    default = serializers.CharField(help_text="The model of a conversation whose `model` is blank.")
    models = serializers.ListField(
        child=serializers.CharField(),
        help_text="The models a conversation may name (only the demo model in demo mode).",
    )


@extend_schema(
    summary="The models a conversation may use, and the default",
    responses={200: ModelChoicesSerializer, **error_responses(401)},
)
class ModelList(APIView):
    """The same for every user: what the deployment offers (LLM_MODELS, LLM_MODEL)."""

    def get(self, request: Request) -> Response:
        return Response(ModelChoicesSerializer(services.model_choices()).data)


# --- Messages ---------------------------------------------------------------------------


class MessagePages(pagination.CursorPagination):
    """Oldest first, in the transcript's order: a message sent meanwhile is added at the end,
    so the pages a client has read never shift."""

    ordering = "position"
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 500


def conversation_of(request: AuthenticatedRequest, conversation_id: uuid.UUID) -> Conversation:
    return get_object_or_404(Conversation, id=conversation_id, owner=request.user)


@extend_schema_view(
    get=extend_schema(
        summary="The conversation's messages, oldest first",
        responses={200: MessageSerializer, **error_responses(401, 404)},
    ),
    post=extend_schema(
        summary="Send a message: it is queued for a reply",
        description=(
            "The same admission, limits, idempotency (client_msg_id) and queue as the "
            "socket's `message` frame. Follow the reply at /api/replies/{job_id}/stream, or "
            "poll the reply's message."
        ),
        request=MessageSendSerializer,
        responses={202: TurnSerializer, **error_responses(400, 401, 404, 409, 429, 503)},
    ),
)
class MessageListCreate(generics.ListAPIView[Message]):
    serializer_class = MessageSerializer
    pagination_class = MessagePages
    request: AuthenticatedRequest

    def get_queryset(self) -> QuerySet[Message]:
        return conversation_of(self.request, self.kwargs["conversation_id"]).messages.all()

    def post(self, request: AuthenticatedRequest, conversation_id: uuid.UUID) -> Response:
        conversation = conversation_of(request, conversation_id)
        data: Mapping[str, Any] = request.data if isinstance(request.data, Mapping) else {}
        # A sync view, holding its request's thread for the turn (a few ms; up to a second
        # when the queue is long): DRF's views are sync. The turn's database calls run on
        # the database threads, as the socket's do.
        outcome = async_to_sync(turn_send)(
            conversation=conversation,
            sender=Sender(user=request.user, origin=API_ORIGIN),
            content=data.get("content"),
            client_msg_id=data.get("client_msg_id"),
        )
        return turn_response(outcome)


def turn_response(outcome: TurnOutcome) -> Response:
    if isinstance(outcome, Refused):
        raise refusal_error(outcome)
    return Response(TurnSerializer(outcome).data, status=status.HTTP_202_ACCEPTED)


def refusal_error(refused: Refused) -> ApiError:
    if refused.code == "unavailable":
        return unavailable()
    return ApiError(
        http_status=REFUSAL_STATUSES[refused.code],
        code=refused.code,
        message=refused.message,
        retry_after=refused.retry_after,
    )


@extend_schema(
    summary="One message, to poll its status",
    responses={200: MessageSerializer, **error_responses(401, 404)},
)
class MessageDetail(generics.RetrieveAPIView[Message]):
    serializer_class = MessageSerializer
    lookup_url_kwarg = "message_id"
    request: AuthenticatedRequest

    def get_queryset(self) -> QuerySet[Message]:
        return Message.objects.filter(
            conversation_id=self.kwargs["conversation_id"], conversation__owner=self.request.user
        )


@extend_schema(
    summary="Regenerate the last answer: a new reply to the same message, in its place",
    description=(
        "Like the socket's `regenerate` frame: only the conversation's last answer, once it "
        "has finished (complete, cancelled or failed). The old answer is kept, marked "
        "`superseded`, and left out of later prompts. The same admission, limits and queue "
        "as a send, and the same body: `message` is the user message answered again, "
        "`reply` the new reply."
    ),
    request=None,
    responses={202: TurnSerializer, **error_responses(400, 401, 404, 409, 429, 503)},
)
class MessageRegenerate(APIView):
    def post(
        self, request: AuthenticatedRequest, conversation_id: uuid.UUID, message_id: uuid.UUID
    ) -> Response:
        conversation = conversation_of(request, conversation_id)
        # A message of another conversation is a 404, as for GET; any other of this one's
        # but its last answer is the turn's 400 `invalid`.
        get_object_or_404(conversation.messages, id=message_id)
        outcome = async_to_sync(turn_regenerate)(
            conversation=conversation,
            sender=Sender(user=request.user, origin=API_ORIGIN),
            reply_id=message_id,
        )
        return turn_response(outcome)


# --- Replies ----------------------------------------------------------------------------


class ReplyCancelSerializer(serializers.Serializer[Message]):
    job_id = serializers.UUIDField()
    status = serializers.CharField(help_text="`cancelled`, or `streaming` while it stops.")


@extend_schema(
    summary="Stop a reply, like the socket's cancel frame",
    request=None,
    responses={202: ReplyCancelSerializer, **error_responses(401, 404, 409, 503)},
)
class ReplyCancel(APIView):
    """Stop a reply, like the socket's `cancel` frame: a queued one is cancelled at once, a
    running one by its worker, which saves the partial answer as `cancelled`."""

    def post(self, request: Request, conversation_id: uuid.UUID, job_id: uuid.UUID) -> Response:
        # Another user's conversation, or a job not in this one, is a 404 like an unknown id.
        conversation = get_object_or_404(Conversation, id=conversation_id, owner=request.user)
        reply = services.reply_for_job(job_id=job_id, conversation_id=conversation.id)
        if reply is None:
            raise Http404
        if reply.status not in Message.ACTIVE_STATUSES:
            raise ApiError(
                http_status=status.HTTP_409_CONFLICT,
                code="finished",
                message="The reply has already finished.",
                job_id=str(reply.job_id),
                status=reply.status,
            )
        try:
            async_to_sync(services.reply_cancel)(reply=reply)
        except (RedisError, OSError):
            raise unavailable() from None
        # "cancelled" for a queued reply; "streaming" while its worker stops a running one.
        reply.refresh_from_db(fields=["status"])
        return Response(ReplyCancelSerializer(reply).data, status=status.HTTP_202_ACCEPTED)
