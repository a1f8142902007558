"""The REST API: DRF views over the same services the socket uses."""

from django.conf import settings
from django.shortcuts import get_object_or_404
from rest_framework import generics, serializers
from rest_framework.request import Request

from chat import services
from chat.models import Conversation, Message


class ConversationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Conversation
        fields = ["id", "title", "model", "system_prompt", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]
        extra_kwargs = {
            "title": {"required": False},
            # The same limit as the web form: the system prompt goes into every prompt.
            "system_prompt": {"required": False, "max_length": settings.CHAT_MAX_MESSAGE_CHARS},
        }


class MessageSerializer(serializers.ModelSerializer):
    usage = serializers.JSONField(read_only=True)

    class Meta:
        model = Message
        fields = ["id", "role", "content", "status", "job_id", "error", "usage", "created_at"]


class ConversationListCreate(generics.ListCreateAPIView):
    serializer_class = ConversationSerializer

    def get_queryset(self):  # type: ignore[no-untyped-def]
        return Conversation.objects.filter(owner=self.request.user)

    def perform_create(self, serializer: ConversationSerializer) -> None:
        serializer.instance = services.conversation_create(
            owner=self.request.user, **serializer.validated_data
        )


class MessageList(generics.ListAPIView):
    serializer_class = MessageSerializer

    def get_queryset(self):  # type: ignore[no-untyped-def]
        request: Request = self.request
        # Another user's conversation is a 404, exactly like one that does not exist.
        conversation = get_object_or_404(
            Conversation, id=self.kwargs["conversation_id"], owner=request.user
        )
        return conversation.messages.order_by("position")
