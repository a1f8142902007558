from typing import TYPE_CHECKING

from django.urls import re_path

from chat.consumers import ChatConsumer

if TYPE_CHECKING:
    from channels.routing import URLRouter, _ExtendedURLPattern

websocket_urlpatterns: "list[_ExtendedURLPattern | URLRouter]" = [
    # The trailing slash is optional; an id that is not a UUID reaches the consumer, which
    # refuses it with 4404 like an unknown conversation.
    # django-stubs types re_path for views only, not for the ASGI apps Channels routes.
    re_path(r"^ws/chat/(?P<conversation_id>[^/]+)/?$", ChatConsumer.as_asgi()),  # type: ignore[arg-type,list-item]
]
