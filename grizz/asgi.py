import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "grizz.settings")
# Django must be set up before the consumers (and their models) are imported.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.sessions import CookieMiddleware  # noqa: E402

from chat.auth import (  # noqa: E402
    SessionAuthMiddleware,
    SessionReadMiddleware,
    TokenAuthMiddleware,
)
from chat.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Channels' AuthMiddlewareStack, with a read-only session (no wrapper around every
        # send) and an auth step that survives a database outage.
        "websocket": CookieMiddleware(
            SessionReadMiddleware(
                SessionAuthMiddleware(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))
            )
        ),
    }
)
