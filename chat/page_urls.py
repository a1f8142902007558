"""URLs of the browser pages, included at the site root."""

from django.urls import path

from chat import views

urlpatterns = [
    path("", views.conversation_list, name="conversation-list"),
    path("c/<uuid:conversation_id>/", views.conversation_detail, name="conversation-detail"),
    path("session/refresh/", views.session_refresh, name="session-refresh"),
]
