"""WebSocket authentication: a simplejwt access token (as the subprotocol `jwt.<token>`, or
`?token=`), else the session cookie.

The session cookie is honoured only from a page of our own origin: a page elsewhere could
otherwise open a socket as the signed-in user (cross-site WebSocket hijacking).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

from asgiref.typing import ASGI3Application, ASGIReceiveCallable, ASGISendCallable
from channels.auth import get_user
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db import DatabaseError
from django.http import parse_cookie
from django.http.request import validate_host
from rest_framework_simplejwt.authentication import JWTAuthentication
from rest_framework_simplejwt.exceptions import AuthenticationFailed, InvalidToken, TokenError

from grizz.database import database_call

if TYPE_CHECKING:
    from channels.consumer import _ChannelScope

# Set in the scope when the user could not be looked up because the database is down: the
# consumer then closes with "try again later" rather than daphne failing the handshake (500).
DATABASE_DOWN = "grizz.database_down"


@database_call
def user_from_token(raw_token: str) -> Any:
    auth = JWTAuthentication()
    try:
        return auth.get_user(auth.get_validated_token(raw_token.encode()))
    except (InvalidToken, TokenError, AuthenticationFailed):
        return AnonymousUser()


def _header(scope: "_ChannelScope", name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def origin_is_trusted(scope: "_ChannelScope") -> bool:
    origin = _header(scope, b"origin")
    if origin is None:
        return False  # browsers always send Origin on WebSockets; others must use a token
    origin_host = urlsplit(origin).netloc
    host = _header(scope, b"host")
    if host is not None and origin_host == host:
        return True
    trusted = [urlsplit(o).netloc for o in settings.CSRF_TRUSTED_ORIGINS]
    return origin_host in trusted or validate_host(
        origin_host.split(":")[0], settings.ALLOWED_HOSTS
    )


def _token_from_query(scope: "_ChannelScope") -> str | None:
    tokens = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
    return tokens[0] if tokens else None


def _token_from_subprotocols(scope: "_ChannelScope") -> str | None:
    # Keeps the token out of URLs and access logs: Sec-WebSocket-Protocol: grizz, jwt.<token>
    for protocol in scope.get("subprotocols", []):
        if protocol.startswith("jwt."):
            return protocol.removeprefix("jwt.")
    return None


async def user_from_session(scope: "_ChannelScope") -> Any:
    session_key = _session_key(scope)
    if session_key is None:
        return AnonymousUser()
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    # Channels' lookup (the session's user, checked against its auth hash), given only the
    # session: the socket's scope needs neither it nor the cookies once the user is known.
    return await get_user({"session": session})  # type: ignore[typeddict-item]


def _session_key(scope: "_ChannelScope") -> str | None:
    cookie_header = _header(scope, b"cookie")
    return parse_cookie(cookie_header).get(settings.SESSION_COOKIE_NAME) if cookie_header else None


class SocketAuthMiddleware:
    """Puts the socket's user in scope["user"]: the token's when one is given, else the
    session's when the socket comes from a page of our own origin, else AnonymousUser. A
    database that is down leaves the socket anonymous and marked DATABASE_DOWN, instead of
    daphne failing the handshake.

    One layer in place of Channels' AuthMiddlewareStack (cookies, session, user): each of its
    layers copied the scope and stayed suspended in the socket's task for the socket's life,
    with the cookies and the session in the scope they kept, about 3 KiB of an idle socket.
    Its session layer also wrapped every send to save a changed session, and a chat socket
    never changes it (4 % of the web's CPU while replies streamed, bench profile)."""

    def __init__(self, inner: ASGI3Application) -> None:
        self.inner = inner

    async def __call__(
        self, scope: "_ChannelScope", receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        try:
            extra: dict[str, Any] = {"user": await self._user(scope)}
        except DatabaseError:
            extra = {"user": AnonymousUser(), DATABASE_DOWN: True}
        # A copy, as ASGI asks of a middleware; the stubs' scope is a TypedDict without room
        # for keys of our own.
        await self.inner(cast("_ChannelScope", {**scope, **extra}), receive, send)

    async def _user(self, scope: "_ChannelScope") -> Any:
        token = _token_from_subprotocols(scope) or _token_from_query(scope)
        if token is not None:
            return await user_from_token(token)
        if not origin_is_trusted(scope):
            return AnonymousUser()
        return await user_from_session(scope)
