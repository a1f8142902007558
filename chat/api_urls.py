from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from chat import api, stream

urlpatterns = [
    path("auth/token/", api.TokenObtain.as_view(), name="token-obtain"),
    path("auth/token/refresh/", api.TokenRefresh.as_view(), name="token-refresh"),
    path("auth/token/verify/", api.TokenVerify.as_view(), name="token-verify"),
    path("conversations/", api.ConversationListCreate.as_view(), name="api-conversations"),
    path(
        "conversations/<uuid:conversation_id>/",
        api.ConversationDetail.as_view(),
        name="api-conversation",
    ),
    path(
        "conversations/<uuid:conversation_id>/messages/",
        api.MessageListCreate.as_view(),
        name="api-messages",
    ),
    path(
        "conversations/<uuid:conversation_id>/messages/<uuid:message_id>/",
        api.MessageDetail.as_view(),
        name="api-message",
    ),
    path(
        "conversations/<uuid:conversation_id>/messages/<uuid:message_id>/regenerate/",
        api.MessageRegenerate.as_view(),
        name="api-message-regenerate",
    ),
    path(
        "conversations/<uuid:conversation_id>/replies/<uuid:job_id>/cancel/",
        api.ReplyCancel.as_view(),
        name="api-reply-cancel",
    ),
    path("models/", api.ModelList.as_view(), name="api-models"),
    path("replies/<uuid:job_id>/stream", stream.reply_stream, name="api-reply-stream"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
]
