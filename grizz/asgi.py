import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "grizz.settings")
# Django must be set up before the consumers (and their models) are imported.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from chat.auth import SocketAuthMiddleware  # noqa: E402
from chat.routing import websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # In place of Channels' AuthMiddlewareStack: one layer, token or session, that
        # survives a database outage (chat/auth.py).
        "websocket": SocketAuthMiddleware(URLRouter(websocket_urlpatterns)),
    }
)
