from django.urls import path
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView

from chat import api

urlpatterns = [
    path("auth/token/", TokenObtainPairView.as_view(), name="token-obtain"),
    path("auth/token/refresh/", TokenRefreshView.as_view(), name="token-refresh"),
    path("conversations/", api.ConversationListCreate.as_view(), name="api-conversations"),
    path(
        "conversations/<uuid:conversation_id>/",
        api.ConversationDetail.as_view(),
        name="api-conversation",
    ),
    path(
        "conversations/<uuid:conversation_id>/messages/",
        api.MessageList.as_view(),
        name="api-messages",
    ),
    path(
        "conversations/<uuid:conversation_id>/replies/<uuid:job_id>/cancel/",
        api.ReplyCancel.as_view(),
        name="api-reply-cancel",
    ),
]
