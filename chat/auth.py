"""WebSocket authentication: a simplejwt access token (as the subprotocol `jwt.<token>`, or
`?token=`), else the session cookie.

The session cookie is honoured only from a page of our own origin: a page elsewhere could
otherwise open a socket as the signed-in user (cross-site WebSocket hijacking).
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qs, urlsplit

from asgiref.typing import ASGIReceiveCallable, ASGISendCallable
from channels.auth import AuthMiddleware
from channels.middleware import BaseMiddleware
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db import DatabaseError
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


class SessionReadMiddleware(BaseMiddleware):
    """Channels' SessionMiddleware without its wrapper around every send: the socket's
    session is there to find the signed-in user at connect, and a chat socket never changes
    it. The wrapper checked at each send whether the session had changed, to save it: 4 % of
    the web's CPU while replies stream, 18 % counting what it calls (bench profile). Needs
    CookieMiddleware above it."""

    async def __call__(
        self, scope: "_ChannelScope", receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Any:
        session_key = scope["cookies"].get(settings.SESSION_COOKIE_NAME)
        session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
        # Loaded from the database only when read (the user lookup, on a database thread).
        return await super().__call__({**scope, "session": session}, receive, send)


class SessionAuthMiddleware(AuthMiddleware):
    """Channels' AuthMiddleware (the session's user), but a database that is down leaves the
    socket anonymous and marked DATABASE_DOWN instead of raising."""

    async def resolve_scope(self, scope: "_ChannelScope") -> None:
        if _token_from_subprotocols(scope) or _token_from_query(scope):
            return  # the token decides (TokenAuthMiddleware): no session lookup to wait for
        try:
            await super().resolve_scope(scope)
        except DatabaseError:
            user = scope["user"]  # the lazy user AuthMiddleware.populate_scope put there
            assert user is not None
            user._wrapped = AnonymousUser()
            _scope_dict(scope)[DATABASE_DOWN] = True


def _scope_dict(scope: "_ChannelScope") -> dict[str, Any]:
    # The stubs' scope is a TypedDict without room for keys of our own; it is a plain dict.
    return cast(dict[str, Any], scope)


class TokenAuthMiddleware(BaseMiddleware):
    """Runs below the session user in the socket stack (grizz/asgi.py): replaces that user
    when a token is given, and drops it when the socket comes from another origin."""

    async def __call__(
        self, scope: "_ChannelScope", receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Any:
        token = _token_from_subprotocols(scope) or _token_from_query(scope)
        if token is not None:
            try:
                scope = {**scope, "user": await user_from_token(token)}
            except DatabaseError:
                scope = {**scope, "user": AnonymousUser()}  # type: ignore[typeddict-item]
                _scope_dict(scope)[DATABASE_DOWN] = True
        elif not origin_is_trusted(scope):
            # The stubs allow only AuthMiddleware's lazy user in scope["user"], but for a
            # signed-out socket that lazy user is this same AnonymousUser.
            scope = {**scope, "user": AnonymousUser()}  # type: ignore[typeddict-item]
        return await super().__call__(scope, receive, send)
