from django.urls import re_path

from chat.consumers import ChatConsumer

websocket_urlpatterns = [
    # The trailing slash is optional; an id that is not a UUID reaches the consumer, which
    # refuses it with 4404 like an unknown conversation.
    re_path(r"^ws/chat/(?P<conversation_id>[^/]+)/?$", ChatConsumer.as_asgi()),
]
