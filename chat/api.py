"""The REST API: DRF views over the same services the socket uses."""

import uuid

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import Http404
from django.shortcuts import get_object_or_404
from redis.exceptions import RedisError
from rest_framework import generics, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from chat import services
from chat.models import Conversation, Message


class AuthenticatedRequest(Request):
    """The request of a view behind IsAuthenticated, the default permission: its user is
    signed in (for mypy only)."""

    user: User


class ConversationSerializer(serializers.ModelSerializer[Conversation]):
    class Meta:
        model = Conversation
        fields = ["id", "title", "model", "system_prompt", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {
            "title": {"required": False},
            # The same limit as the web form: the system prompt goes into every prompt.
            "system_prompt": {"required": False, "max_length": settings.CHAT_MAX_MESSAGE_CHARS},
        }


class MessageSerializer(serializers.ModelSerializer[Message]):
    usage = serializers.JSONField(read_only=True)

    class Meta:
        model = Message
        fields = ["id", "role", "content", "status", "job_id", "error", "usage", "created_at"]


class ConversationListCreate(generics.ListCreateAPIView[Conversation]):
    serializer_class = ConversationSerializer
    request: AuthenticatedRequest

    def get_queryset(self) -> QuerySet[Conversation]:
        return Conversation.objects.filter(owner=self.request.user)

    def perform_create(self, serializer: serializers.BaseSerializer[Conversation]) -> None:
        serializer.instance = services.conversation_create(
            owner=self.request.user, **serializer.validated_data
        )


class ConversationDetail(generics.RetrieveUpdateDestroyAPIView[Conversation]):
    """One conversation of the caller's: read, rename (or change its model or system
    prompt), delete. Another user's is a 404, like one that does not exist."""

    serializer_class = ConversationSerializer
    lookup_url_kwarg = "conversation_id"
    request: AuthenticatedRequest

    def get_queryset(self) -> QuerySet[Conversation]:
        return Conversation.objects.filter(owner=self.request.user)

    def perform_update(self, serializer: serializers.BaseSerializer[Conversation]) -> None:
        # A rename is not activity: updated_at (the list's order, newest first) stays as the
        # last message left it, which save() and its auto_now would not.
        conversation = serializer.instance
        assert conversation is not None
        Conversation.objects.filter(pk=conversation.pk).update(**serializer.validated_data)
        conversation.refresh_from_db()

    def destroy(self, request: Request, *args: object, **kwargs: object) -> Response:
        try:
            services.conversation_delete(conversation=self.get_object())
        except (RedisError, OSError):
            return _redis_unavailable()
        return Response(status=status.HTTP_204_NO_CONTENT)


class MessageList(generics.ListAPIView[Message]):
    serializer_class = MessageSerializer
    request: AuthenticatedRequest

    def get_queryset(self) -> QuerySet[Message]:
        # Another user's conversation is a 404, exactly like one that does not exist.
        conversation = get_object_or_404(
            Conversation, id=self.kwargs["conversation_id"], owner=self.request.user
        )
        return conversation.messages.order_by("position")


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
            return Response(
                {"detail": "The reply has already finished.", "status": reply.status},
                status=status.HTTP_409_CONFLICT,
            )
        try:
            async_to_sync(services.reply_cancel)(reply=reply)
        except (RedisError, OSError):
            return _redis_unavailable()
        # "cancelled" for a queued reply; "streaming" while its worker stops a running one.
        reply.refresh_from_db(fields=["status"])
        return Response(
            {"job_id": str(reply.job_id), "status": reply.status},
            status=status.HTTP_202_ACCEPTED,
        )


def _redis_unavailable() -> Response:
    return Response(
        {"detail": "Server busy, please retry your request."},
        status=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": "5"},
    )
